"""Training losses of IL2Vseg: the paper's "Loss Function" section, eqs (14) and (15).

The paper's total loss (eq 15) is

    L_total = beta * L_reg + gamma * L_fs + L_smo + L_corr

with beta = 0.05 and gamma = 0.1 ("Implementation Details"). The paper gives no formula for any of
the four terms; this file writes each one down:

- L_smo : SmooSeg's smoothness loss (Lan et al. 2024), `smoothness_loss`. SmooSeg's energy is
          data + smoothness, so SmooSeg's data term (`data_loss`, cross-entropy of the local centres
          against the global argmax) belongs with it: it is the only term that trains the local
          centres (the head only gets gradient through the global branch).
- L_corr: STEGO's correspondence distillation loss (Hamilton et al. 2022), `correspondence_loss`,
          applied between an image and (a) itself, (b) its colour/luminosity-jittered copy Ĩ (the
          paper's "contrast loss based on colour and luminosity invariance") and (c) other images of
          the batch as negatives: `correspondence_terms`.
- L_fs, L_reg: eq (14), `feature_similarity_losses`. The paper only says that a feature-similarity
          matrix and a pixel-similarity matrix are combined with the Gram matrix projection of the
          fused map F_f; the exact interpretation implemented here is written in that docstring.
- `total_loss` sums them (eq 15) with one switch per term for the ablation of Table 4 and stops with
  a one-line `FloatingPointError` naming the term (or the coefficient) that is NaN / inf.

The peers' constants (shifts, weights, temperature) per data set and backbone:
`loss_constants(dataset, arch)`.

Every public function can be copied alone into another project (with math and torch imported and
the functions named on its "needs:" line): no module constants, checks written inline.
Conventions: all functions take tensors and work on the inputs' device; computations are done in at
least float32 (float64 stays float64), and the matrix products run with autocast switched off, so
bf16/fp16 inputs under AMP do not lose the cosines.
"""

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# The peers' constants, per data set and backbone (../shared/docs/anchors.md)
# ------------------------------------------------------------------------------------------------

def loss_constants(dataset, arch="vits8"):
    """The peers' tuned loss constants for a data set name and a backbone name.

    dataset: e.g. "cityscapes", "cocostuff27", "potsdam", "mastr1325", "camvid", "folder".
        Matched by prefix ("cocostuff27" -> "cocostuff", any "coco..." -> "cocostuff"); a data set
        no peer tuned on gets the "default" entry (see below).
    arch: the backbone. Every ViT / DINOv2 name ("vits8", "vitb8", "dinov2_vits14", ...) gets
        STEGO's ViT constants; "resnet50-mocov2" gets STEGO's MoCo v2 ResNet-50 constants.
    Returns {"stego_weights": {...}, "stego_shifts": {...}, "smooseg_shifts": {...},
             "smooseg_temperature": 0.1}, fresh dicts the caller may change.
    """
    # STEGO's correspondence loss, its ViT-S/8 configurations. Keys: "pos_intra" = image with
    # itself, "pos_inter" = image with a positive partner (here: its photometric copy Ĩ),
    # "neg_inter" = image with other images of the batch.
    stego_weights = {
        "cocostuff": {"pos_intra": 0.67, "pos_inter": 0.25, "neg_inter": 0.63},
        "cityscapes": {"pos_intra": 1.0, "pos_inter": 0.577, "neg_inter": 0.906},
        "potsdam": {"pos_intra": 0.67, "pos_inter": 0.25, "neg_inter": 0.63},
        # Any other data set (MaSTr1325, CamVid, your own folder): no peer tuned one, so we fall
        # back to the COCO-Stuff values, the most varied natural-image set the peers tuned on.
        "default": {"pos_intra": 0.67, "pos_inter": 0.25, "neg_inter": 0.63},
    }
    stego_shifts = {
        "cocostuff": {"pos_intra": 0.08, "pos_inter": 0.02, "neg_inter": 0.66},
        "cityscapes": {"pos_intra": 0.458, "pos_inter": 0.175, "neg_inter": 0.314},
        "potsdam": {"pos_intra": 0.08, "pos_inter": 0.02, "neg_inter": 0.46},
        "default": {"pos_intra": 0.08, "pos_inter": 0.02, "neg_inter": 0.66},
    }
    # STEGO's COCO-Stuff configuration for MoCo v2 ResNet-50. STEGO published MoCo constants for
    # COCO-Stuff only, so they are used for every data set with this backbone.
    moco_weights = {"pos_intra": 0.67, "pos_inter": 0.25, "neg_inter": 0.63}
    moco_shifts = {"pos_intra": 0.32, "pos_inter": 0.36, "neg_inter": 0.26}
    # SmooSeg's smoothness loss: "close" = b_close (image with itself), "far" = b_far (image with
    # another). The Potsdam values were tuned by SmooSeg for a ViT-B/8 backbone (no ViT-S/8 values
    # are published); the anchors hold no ResNet-50 values, so these serve every backbone.
    smooseg_shifts = {
        "cocostuff": {"close": -0.02, "far": 0.48},
        "cityscapes": {"close": -0.02, "far": 0.5},
        "potsdam": {"close": 0.1, "far": 0.5},
        "default": {"close": -0.02, "far": 0.48},
    }
    # SmooSeg's temperature of the cluster probabilities of the smoothness loss:
    # probs = softmax(inner_global / 0.1) over the clusters (computed by the caller).
    smooseg_temperature = 0.1

    name, backbone = str(dataset).lower(), str(arch).lower()
    key = "default"
    for known in ("cityscapes", "cocostuff", "potsdam"):
        if name.startswith(known):
            key = known
    if key == "default" and name.startswith("coco"):
        key = "cocostuff"
    if backbone == "resnet50-mocov2":
        weights, shifts = moco_weights, moco_shifts
    elif backbone.startswith(("vit", "dinov2")):
        weights, shifts = stego_weights[key], stego_shifts[key]
    else:
        raise ValueError(f"loss_constants: unknown arch '{arch}' (a ViT/DINOv2 name such as "
                         "'vits8', or 'resnet50-mocov2')")
    return {"stego_weights": dict(weights), "stego_shifts": dict(shifts),
            "smooseg_shifts": dict(smooseg_shifts[key]), "smooseg_temperature": smooseg_temperature}


# ------------------------------------------------------------------------------------------------
# Pairing every image of a batch with another one
# ------------------------------------------------------------------------------------------------

def derangements(count, B, generator=None, device=None):
    """`count` random permutations of range(B), none with a fixed point: (count, B) long.

    Used to pair every image of a batch with a *different* image. Each row is a uniformly random
    order of the batch (argsort of uniform numbers, one draw for all rows) in which every image is
    sent to the next one: a random B-cycle. No rejection loop; not every derangement is reachable
    (e.g. two swaps for B = 4), which does not matter for drawing negatives.

    generator: torch.Generator or None (torch's default generator). Drawn on the generator's device
    (CPU when None) and moved to `device` (default: the draw device) without a device-wide sync,
    so a CPU generator gives the same permutations on CPU and CUDA.
    """
    if int(B) < 2:
        raise ValueError(f"derangement needs a batch of at least 2 images, got B={B}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(int(count), int(B), generator=generator, device=draw_device)
    order = noise.argsort(dim=1)  # (count, B) random orders of the batch
    perm = torch.empty_like(order)
    perm.scatter_(1, order, order.roll(shifts=-1, dims=1))  # image order[i] -> image order[i+1]
    return perm if device is None else perm.to(device, non_blocking=True)  # (count, B)


def derangement(B, generator=None, device=None):
    """One random permutation of range(B) with no fixed points (perm[i] != i): (B,) long.

    Same as derangements(1, B, generator, device)[0]; see there.
    needs: derangements
    """
    return derangements(1, B, generator, device)[0]


# ------------------------------------------------------------------------------------------------
# Frozen-feature affinity (SmooSeg and STEGO)
# ------------------------------------------------------------------------------------------------

def feature_affinity(feats_a, feats_b):
    """Centred cosine affinity of frozen backbone features (SmooSeg's fd, STEGO's F), no grad.

    feats_a (B, C, ha, wa), feats_b (B, C, hb, wb) -> (B, Na, Nb), Na = ha*wa, Nb = hb*wb:
        fd_ij  = cos(f_i, g_j)                      for every pixel i of a and j of b
        fd_ij -= mean_j fd_ij                       (each row centred: "pointwise" normalisation)
        fd     = fd - mean(fd) + old_mean           (old_mean = mean of the raw fd over the whole
                                                     tensor, all images of the batch, as the peers do)
    After the row centring the tensor's mean is 0 up to rounding, so the result is the row-centred
    cosine shifted to the raw global mean: the shifts b of the losses keep their meaning.
    """
    for name, t in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"feature_affinity: {name} must be a 4-D tensor (B, C, h, w), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if feats_a.shape[:2] != feats_b.shape[:2]:
        raise ValueError(f"feature_affinity: feats_a {tuple(feats_a.shape)} and feats_b "
                         f"{tuple(feats_b.shape)} differ in batch size or channels")
    dtype = torch.promote_types(torch.promote_types(feats_a.dtype, feats_b.dtype), torch.float32)
    with torch.no_grad(), torch.autocast(device_type=feats_a.device.type, enabled=False):
        unit_a = F.normalize(feats_a.to(dtype).flatten(2), dim=1)  # (B, C, Na), unit columns
        unit_b = F.normalize(feats_b.to(dtype).flatten(2), dim=1)  # (B, C, Nb)
        affinity = torch.bmm(unit_a.transpose(1, 2), unit_b)  # cosines (B, Na, Nb)
        old_mean = affinity.mean()
        affinity = affinity - affinity.mean(dim=2, keepdim=True)  # centre every row over j
        affinity = affinity - affinity.mean() + old_mean
    return affinity  # (B, Na, Nb)


# ------------------------------------------------------------------------------------------------
# SmooSeg: smoothness (L_smo of eq 15) and data term
# ------------------------------------------------------------------------------------------------

def smoothness_loss(feats, probs, shift_close, shift_far, perm=None, generator=None):
    """SmooSeg's smoothness loss L_smo (Lan et al. 2024), the L_smo of eq (15).

    feats (B, C, h, w): frozen backbone features (no gradient is taken through them).
    probs (B, K, h, w): cluster probabilities P = softmax(inner_global / 0.1) over K (SmooSeg's
        temperature, `loss_constants`), computed by the caller (inner_global = cos(code, global
        centres)); gradient flows into it.
    shift_close, shift_far: b_close, b_far (`loss_constants(...)["smooseg_shifts"]`).
    perm: (B,) long, a permutation of the batch without fixed points pairing each image with another
        one; None draws one with `derangement(B, generator)`.

        fd       = feature_affinity(.,.)                     centred cosine, no grad   (B, N, N)
        cd_ij    = 1 - cos(P_i, P_j)                         label distance in [0, 1]  (B, N, N)
        L_smo    = mean[(fd(x, x) - b_close) * cd(x, x)]                 image with itself
                 + mean[(fd(x, x_perm) - b_far) * cd(x, x_perm)]         image with another image
    Pairs whose features are more alike than b pull their label distributions together, the others
    push them apart. With B == 1 there is no other image: the far term is skipped (close term only).
    Returns a scalar.
    needs: feature_affinity, derangement
    """
    for name, t in (("feats", feats), ("probs", probs)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"smoothness_loss: {name} must be a 4-D tensor (B, C, h, w), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if feats.shape[0] != probs.shape[0] or feats.shape[2:] != probs.shape[2:]:
        raise ValueError(f"smoothness_loss: feats {tuple(feats.shape)} and probs "
                         f"{tuple(probs.shape)} must share batch size and grid size")
    batch = feats.shape[0]
    if batch > 1 and perm is None:
        perm = derangement(batch, generator, feats.device)  # (B,)
    elif batch > 1:  # a caller's permutation is checked (one small device sync)
        perm = torch.as_tensor(perm, device=feats.device).long()
        if perm.shape != (batch,) or (perm == torch.arange(batch, device=perm.device)).any():
            raise ValueError(f"smoothness_loss: perm must be a permutation of the {batch} images "
                             f"with no fixed points, got {perm.tolist()}")

    dtype = torch.promote_types(probs.dtype, torch.float32)
    with torch.autocast(device_type=probs.device.type, enabled=False):
        probs_unit = F.normalize(probs.to(dtype).flatten(2), dim=1)  # (B, K, N), unit columns
        # image with itself
        affinity = feature_affinity(feats, feats)  # fd (B, N, N), no grad
        label_distance = 1 - torch.bmm(probs_unit.transpose(1, 2), probs_unit)  # cd (B, N, N)
        loss = ((affinity - shift_close) * label_distance).mean()  # L_smo, eq (15): close term
        if batch > 1:  # image b with image perm[b]
            affinity = feature_affinity(feats, feats[perm])  # (B, N, N)
            label_distance = 1 - torch.bmm(probs_unit.transpose(1, 2), probs_unit[perm])
            loss = loss + ((affinity - shift_far) * label_distance).mean()  # + far term
    return loss


def data_loss(inner_local, inner_global, temperature=1.0):
    """SmooSeg's data term: cross-entropy of the local-centre logits against the global argmax.

    inner_local  (B, K, h, w) = cos(code.detach(), local centres)  -> trains the local centres
    inner_global (B, K, h, w) = cos(code, global centres.detach())  -> only its argmax is used
        target_i = argmax_k inner_global[k, i]          (no gradient through the target)
        L_data   = mean_i CE(inner_local[:, i] / temperature, target_i)
    Temperature: SmooSeg feeds the raw cosines in [-1, 1] as logits, i.e. temperature = 1.0, the
    default here (a smaller value sharpens the softmax and scales the gradient by 1/temperature).
    SmooSeg's energy is data + smoothness; this term goes with L_smo in eq (15).
    Returns a scalar.
    """
    for name, t in (("inner_local", inner_local), ("inner_global", inner_global)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"data_loss: {name} must be a 4-D tensor (B, K, h, w), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if inner_local.shape != inner_global.shape:
        raise ValueError(f"data_loss: inner_local {tuple(inner_local.shape)} and inner_global "
                         f"{tuple(inner_global.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"data_loss: temperature must be > 0, got {temperature}")
    target = inner_global.detach().argmax(dim=1)  # (B, h, w)
    dtype = torch.promote_types(inner_local.dtype, torch.float32)
    logits = inner_local.to(dtype) / temperature  # (B, K, h, w)
    return F.cross_entropy(logits, target)


# ------------------------------------------------------------------------------------------------
# STEGO: correspondence distillation (L_corr of eq 15)
# ------------------------------------------------------------------------------------------------

def random_coords(B, n, generator=None, device=None):
    """Random sampling positions for grid_sample: (B, n, n, 2) uniform in [-1, 1].

    Last axis is (x, y) in grid_sample's convention (-1 = left/top edge centre, +1 = right/bottom,
    align_corners=True). Drawn on the generator's device (CPU when None) and moved to `device`
    without a device-wide sync, so a CPU generator gives the same points on CPU and CUDA.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    coords = torch.rand(int(B), int(n), int(n), 2, generator=generator, device=draw_device) * 2 - 1
    return coords if device is None else coords.to(device, non_blocking=True)  # (B, n, n, 2)


def sample_points(t, coords):
    """Bilinear samples of t at coords: t (B, C, h, w), coords (B, n, m, 2) -> (B, C, n, m).

    grid_sample with align_corners=True (-1 and +1 are the centres of the corner pixels) and
    padding 'border', as STEGO does.
    """
    if not torch.is_tensor(t) or t.dim() != 4:
        raise ValueError(f"sample_points: t must be a 4-D tensor (B, C, h, w), got "
                         f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if not torch.is_tensor(coords) or coords.dim() != 4 or coords.shape[-1] != 2 \
            or coords.shape[0] != t.shape[0]:
        raise ValueError(f"sample_points: coords must be (B, n, m, 2) with B={t.shape[0]}, got "
                         f"{tuple(coords.shape) if torch.is_tensor(coords) else type(coords).__name__}")
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)  # (B, C, n, m)


def correspondence_loss(feats_a, feats_b, codes_a, codes_b, shift):
    """STEGO's correspondence distillation loss on already-sampled points.

    feats_a (B, C, na, ma), feats_b (B, C, nb, mb): frozen features (no gradient).
    codes_a (B, D, na, ma), codes_b (B, D, nb, mb): head outputs (gradient flows).
        F_ij = feature_affinity(feats_a, feats_b)   centred cosine, no grad    (B, Na, Nb)
        S_ij = cos(code_a_i, code_b_j)                                         (B, Na, Nb)
        L    = mean[ -max(S_ij, 0) * (F_ij - shift) ]
    Pairs with F above the shift are pulled together (S up lowers L), pairs below are pushed apart
    until their codes are orthogonal (the clamp stops the push at S = 0). Raising the shift raises L.
    Returns a scalar.
    needs: feature_affinity
    """
    tensors = (("feats_a", feats_a), ("feats_b", feats_b), ("codes_a", codes_a), ("codes_b", codes_b))
    for name, t in tensors:
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"correspondence_loss: {name} must be a 4-D tensor (B, C, h, w), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if codes_a.shape[2:] != feats_a.shape[2:] or codes_b.shape[2:] != feats_b.shape[2:]:
        raise ValueError("correspondence_loss: codes and feats must be sampled at the same points, "
                         f"got feats {tuple(feats_a.shape)}/{tuple(feats_b.shape)} and codes "
                         f"{tuple(codes_a.shape)}/{tuple(codes_b.shape)}")
    if feats_a.shape[0] != codes_a.shape[0] or feats_b.shape[0] != codes_b.shape[0]:
        raise ValueError("correspondence_loss: feats and codes must have the same batch size")
    affinity = feature_affinity(feats_a, feats_b)  # F (B, Na, Nb), no grad
    dtype = torch.promote_types(torch.promote_types(codes_a.dtype, codes_b.dtype), torch.float32)
    with torch.autocast(device_type=codes_a.device.type, enabled=False):
        unit_a = F.normalize(codes_a.to(dtype).flatten(2), dim=1)  # (B, D, Na), unit columns
        unit_b = F.normalize(codes_b.to(dtype).flatten(2), dim=1)  # (B, D, Nb)
        code_similarity = torch.bmm(unit_a.transpose(1, 2), unit_b)  # S (B, Na, Nb)
    return (-code_similarity.clamp(min=0) * (affinity - shift)).mean()  # L_corr of eq (15)


def correspondence_terms(feats, codes, feats_aug, codes_aug, shifts, weights, generator=None,
                         n_points=11, n_negatives=5):
    """The three correspondence terms of IL2Vseg and their weighted sum L_corr (eq 15).

    feats (B, C, h, w), codes (B, D, h, w): frozen features and head codes of the images I.
    feats_aug, codes_aug: the same for the colour/luminosity-jittered images Ĩ (None: term (b) is 0).
    shifts, weights: dicts with keys "pos_intra", "pos_inter", "neg_inter"
        (`loss_constants(...)["stego_shifts"]` and `["stego_weights"]`).
    generator: torch.Generator for the sampling points and negatives (None: torch's default).
    n_points: n x n random points per image (STEGO: 11). n_negatives: permutations (STEGO: 5).

    Two point sets are drawn per image, coords1 and coords2 ((B, n, n, 2) each), then
      (a) "corr_intra": I at coords1 with itself (all point pairs)  shift/weight "pos_intra"
      (b) "corr_aug"  : I at coords1 with Ĩ at coords2              shift/weight "pos_inter"
          (the paper's contrast loss based on colour and luminosity invariance; it replaces STEGO's
          kNN positive, so no kNN file is needed)
      (c) "corr_neg"  : I at coords1 with I_perm at coords2, averaged over n_negatives derangements
                                                                    shift/weight "neg_inter"
          (B == 1: no other image, the term is 0)
      "corr" = w_intra * (a) + w_inter * (b) + w_neg * (c)
    Each pairing is one correspondence_loss call (its own centring mean, as STEGO's separate calls).
    Random draws, in this order: random_coords (coords1), random_coords (coords2), then
    derangements(n_negatives, B) -- nothing forces a device sync.
    Returns a dict of scalars {"corr_intra", "corr_aug", "corr_neg", "corr"}.
    needs: random_coords, sample_points, derangements, correspondence_loss
    """
    for name, t in (("feats", feats), ("codes", codes)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"correspondence_terms: {name} must be a 4-D tensor (B, C, h, w), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    for key in ("pos_intra", "pos_inter", "neg_inter"):
        if key not in shifts or key not in weights:
            raise ValueError(f"correspondence_terms: shifts and weights need the key '{key}', "
                             f"got shifts {sorted(shifts)} and weights {sorted(weights)}")
    if (feats_aug is None) != (codes_aug is None):
        raise ValueError("correspondence_terms: give both feats_aug and codes_aug, or neither")
    batch = feats.shape[0]
    device = feats.device

    coords1 = random_coords(batch, n_points, generator, device)  # (B, n, n, 2)
    coords2 = random_coords(batch, n_points, generator, device)  # (B, n, n, 2)
    use_negatives = batch >= 2 and n_negatives > 0
    perms = derangements(n_negatives, batch, generator, device) if use_negatives else None  # (G, B)

    feats1 = sample_points(feats, coords1)  # (B, C, n, n)
    codes1 = sample_points(codes, coords1)  # (B, D, n, n)
    zero = codes1.sum() * 0.0  # a 0 that keeps the graph and dtype of the codes

    # (a) the points with themselves, as STEGO
    intra = correspondence_loss(feats1, feats1, codes1, codes1, shifts["pos_intra"])
    # (b) the photometric copy Ĩ (pixel-aligned, at the other random points)
    aug = zero
    if feats_aug is not None:
        aug = correspondence_loss(feats1, sample_points(feats_aug, coords2),
                                  codes1, sample_points(codes_aug, coords2), shifts["pos_inter"])
    # (c) other images of the batch, at the other random points
    neg = zero
    if use_negatives:
        feats2 = sample_points(feats, coords2)  # (B, C, n, n)
        codes2 = sample_points(codes, coords2)  # (B, D, n, n)
        neg = torch.stack([correspondence_loss(feats1, feats2[perm], codes1, codes2[perm],
                                               shifts["neg_inter"]) for perm in perms]).mean()
    total = (weights["pos_intra"] * intra + weights["pos_inter"] * aug
             + weights["neg_inter"] * neg)  # L_corr of eq (15)
    return {"corr_intra": intra, "corr_aug": aug, "corr_neg": neg, "corr": total}


# ------------------------------------------------------------------------------------------------
# Eq (14): feature-similarity loss L_fs and regulariser L_reg
# ------------------------------------------------------------------------------------------------

def feature_similarity_losses(codes, fused, image_small, tau=0.1, sigma_xy=3.0, sigma_rgb=0.1):
    """Eq (14): L_fs, L_reg = f(F^c, F_f, I). Our interpretation of the paper's description.

    Inputs, all on the feature grid (N = h*w pixels i):
      codes       F^c (B, D, h, w)  head output h_theta(F^p)
      fused       F_f (B, K, h, w)  fused map of eq (13)
      image_small     (B, 3, h, w)  the image bilinearly downsampled to the grid, colours in [0, 1]

      q_i      = softmax_k(F_f[:, i] / tau)                      Q (B, N, K), rows sum to 1
      G        = Q Q^T                                           Gram projection (B, N, N)
      Wfeat_ij = max(cos(F^c_i, F^c_j), 0)                        feature-similarity matrix
      Wpix_ij  = exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |c_i - c_j|^2 / (2 sigma_rgb^2))
                 p = (row, column) in grid cells, c = RGB colour:  pixel-similarity matrix
      W        = Wfeat * Wpix with W_ii = 0                       no gradient (detached)
      d_i      = sum_j W_ij

      L_fs  = sum_ij W_ij |q_i - q_j|^2 / (2 sum_ij W_ij)
            = (sum_i d_i |q_i|^2 - tr(Q^T W Q)) / sum_ij W_ij    (= sum_ij W_ij (G_ii - G_ij) / sum W)
        a normalised graph-Laplacian smoothness: pixels that are similar in code, nearby and alike
        in colour are pushed to the same fused distribution. In [0, 1]; 0 when all q_i are equal.
      L_reg = (K |mean_i q_i|^2 - 1) / (K - 1)  =  (mean_ij G_ij - 1/K) / (1 - 1/K)
        with the mean over all pixels of ALL images of the batch: 0 for perfectly balanced
        clusters, 1 when all pixels collapse into one cluster (K = 1: 0). It is the regulariser
        that keeps L_fs from being minimised by the collapse. Taken over the batch, not per image,
        so that a crop showing only a few of the K classes is not pushed to use all of them.
        (Uniform q_i = 1/K also give 0: confident assignments come from tau and the data term.)
    L_fs is computed per image and averaged over the batch.

    Defaults: tau = 0.1 (SmooSeg's cluster-probability temperature). sigma_rgb = 0.1: colours
    further apart than ~0.3 (3 sigma) in [0, 1] RGB barely interact. sigma_xy = 3 grid cells (24
    input pixels for a patch-8 backbone): neighbours 1 cell away weigh 0.95, 3 cells 0.61, 6 cells
    0.14, 9 cells 0.01, so the pixel matrix encodes local spatial continuity over a few patches (a
    wider 3x3-window neighbourhood than eq 5), while the feature matrix carries the semantics.
    Memory: a few (B, N, N) matrices (B=32, 28x28 grid: about 80 MB each in float32).
    Returns (L_fs, L_reg), two scalars; gradient flows into `fused` only.
    """
    for name, t in (("codes", codes), ("fused", fused), ("image_small", image_small)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"feature_similarity_losses: {name} must be a 4-D tensor (B, C, h, w), "
                             f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    batch, n_clusters, height, width = fused.shape
    if codes.shape[0] != batch or codes.shape[2:] != fused.shape[2:]:
        raise ValueError(f"feature_similarity_losses: codes {tuple(codes.shape)} and fused "
                         f"{tuple(fused.shape)} must share batch size and grid size")
    if image_small.shape != (batch, 3, height, width):
        raise ValueError(f"feature_similarity_losses: image_small must be (B, 3, h, w) = "
                         f"{(batch, 3, height, width)} (downsample the image to the feature grid), "
                         f"got {tuple(image_small.shape)}")
    if not (tau > 0 and sigma_xy > 0 and sigma_rgb > 0):
        raise ValueError(f"feature_similarity_losses: tau, sigma_xy, sigma_rgb must be > 0, "
                         f"got {tau}, {sigma_xy}, {sigma_rgb}")
    dtype = torch.promote_types(fused.dtype, torch.float32)
    device = fused.device

    with torch.autocast(device_type=device.type, enabled=False):
        probs = torch.softmax(fused.to(dtype) / tau, dim=1)  # (B, K, h, w)
        q = probs.flatten(2).transpose(1, 2)  # Q (B, N, K)

        with torch.no_grad():
            # feature-similarity matrix from the codes
            unit = F.normalize(codes.to(dtype).flatten(2), dim=1)  # (B, D, N), unit columns
            weights_feat = torch.bmm(unit.transpose(1, 2), unit).clamp(min=0)  # (B, N, N)

            # pixel-similarity matrix: grid positions and colours
            rows = torch.arange(height, device=device, dtype=dtype).repeat_interleave(width)  # (N,)
            cols = torch.arange(width, device=device, dtype=dtype).repeat(height)  # (N,)
            distance_xy = ((rows[:, None] - rows[None, :]) ** 2
                           + (cols[:, None] - cols[None, :]) ** 2)  # (N, N)
            colours = image_small.to(dtype).flatten(2)  # (B, 3, N)
            distance_rgb = torch.zeros_like(weights_feat)  # (B, N, N)
            for channel in range(3):
                values = colours[:, channel]  # (B, N)
                distance_rgb += (values[:, :, None] - values[:, None, :]) ** 2
            weights_pix = torch.exp(-distance_xy / (2 * sigma_xy ** 2)
                                    - distance_rgb / (2 * sigma_rgb ** 2))  # (B, N, N)

            weights = weights_feat * weights_pix  # W (B, N, N)
            weights.diagonal(dim1=1, dim2=2).zero_()
            degree = weights.sum(dim=2)  # d (B, N)
            total_weight = degree.sum(dim=1).clamp(min=torch.finfo(dtype).tiny)  # (B,)

        # sum_ij W_ij |q_i - q_j|^2 = 2 sum_i d_i |q_i|^2 - 2 tr(Q^T W Q)   (W symmetric)
        degree_term = (degree * q.pow(2).sum(dim=2)).sum(dim=1)  # (B,)
        trace_term = (q * torch.bmm(weights, q)).sum(dim=(1, 2))  # tr(Q^T W Q) (B,)
        loss_fs = ((degree_term - trace_term) / total_weight).mean()  # eq (14), L_fs

        if n_clusters == 1:
            loss_reg = q.sum() * 0.0  # a single cluster cannot collapse: defined as 0
        else:
            mean_q = q.mean(dim=(0, 1))  # (K,) over the batch's pixels; |mean_q|^2 = mean_ij G_ij
            loss_reg = (n_clusters * mean_q.pow(2).sum() - 1) / (n_clusters - 1)  # eq (14), L_reg
    return loss_fs, loss_reg


# ------------------------------------------------------------------------------------------------
# Eq (15): the total loss
# ------------------------------------------------------------------------------------------------

def total_loss(terms, beta=0.05, gamma=0.1, use_smo=True, use_fs=True, use_corr=True,
               use_reg=True, use_data=True):
    """Eq (15): L_total = beta * L_reg + gamma * L_fs + L_smo + L_corr  (+ SmooSeg's data term).

    terms: dict of scalar tensors with the keys "smo", "data", "fs", "reg", "corr" (a switched-off
        term may be missing). "data" is SmooSeg's data term: SmooSeg's energy is data + smoothness,
        so it belongs with L_smo; eq (15) does not print it, use_data=False drops it.
    beta, gamma: the weights of L_reg and L_fs (the paper: 0.05 and 0.1); must be finite.
    use_*: switch a term off (the ablation of the paper's Table 4: L_smo, L_fs, L_corr).
    A non-finite beta / gamma, or a used term that is not finite, stops with a one-line
    FloatingPointError naming it.
    Returns (total, values): total a scalar tensor with gradient, values a dict of python floats of
    every scalar in `terms` plus "total" (for logging; one device sync for all of them).
    """
    for name, value in (("beta", beta), ("gamma", gamma)):
        if not math.isfinite(float(value)):
            raise FloatingPointError(f"total_loss: coefficient {name} is {value} (not finite)")
    switches = {"smo": use_smo, "data": use_data, "fs": use_fs, "reg": use_reg, "corr": use_corr}
    coefficients = {"smo": 1.0, "data": 1.0, "fs": gamma, "reg": beta, "corr": 1.0}
    used = [name for name in ("smo", "data", "fs", "reg", "corr") if switches[name]]
    if not used:
        raise ValueError("total_loss: every term is switched off; nothing to optimise")
    for name in used:
        if name not in terms:
            raise ValueError(f"total_loss: term '{name}' is switched on but missing from terms "
                             f"(got {sorted(terms)})")

    # every scalar to python floats with one device sync
    names = list(terms)
    for name in names:
        if torch.as_tensor(terms[name]).numel() != 1:
            raise ValueError(f"total_loss: term '{name}' must be a scalar, got shape "
                             f"{tuple(torch.as_tensor(terms[name]).shape)}")
    device = next((terms[name].device for name in used if torch.is_tensor(terms[name])), "cpu")
    stacked = torch.stack([torch.as_tensor(terms[name]).detach().float().reshape(()).to(device)
                           for name in names])  # (n_terms,)
    values = dict(zip(names, stacked.tolist()))
    for name in used:
        if not math.isfinite(values[name]):
            raise FloatingPointError(f"loss term {name} is {values[name]} (not finite); stopping "
                                     "(try a lower learning rate, AMP off, or check the batch)")

    total = sum(coefficients[name] * terms[name] for name in used)  # eq (15)
    values["total"] = sum(coefficients[name] * values[name] for name in used)
    return total, values
