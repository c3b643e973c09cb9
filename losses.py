"""Training losses of IL2Vseg: the paper's "Loss Function" section, eqs (14) and (15).

    L_total = beta * L_reg + gamma * L_fs + L_smo + L_corr      eq (15), beta = 0.05, gamma = 0.1

The paper gives no formula for the four terms; this file writes each one down:
- L_smo : SmooSeg's smoothness loss (Lan et al. 2024), `smoothness_loss`, with SmooSeg's data term
          `data_loss` (SmooSeg's energy is data + smoothness; it trains the local centres).
- L_corr: STEGO's correspondence loss (Hamilton et al. 2022), `correspondence_loss`, of an image
          with itself, its jittered copy Ĩ and other images: `correspondence_terms`.
- L_fs, L_reg: eq (14), our reading, `feature_similarity_losses`.
The peers' constants: `loss_constants`. Eq (15) itself is written in il2vseg.loss_terms.

Contract, checked by the caller (the training step): every tensor is float32 (float64 works too),
all on one device, shapes consistent, no autocast around the calls, B >= 2 wherever a permutation
is drawn or given. Every public function pastes alone (torch, F and its "needs:" line).
"""

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
    """`count` random permutations of range(B) without fixed points: (count, B) long, B >= 2.

    Each row sends every image to the next one in a random order of the batch (a random B-cycle).
    Drawn on the generator's device (CPU when None), then moved to `device`.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(count, B, generator=generator, device=draw_device)  # (count, B)
    order = noise.argsort(dim=1)  # (count, B) random orders of the batch
    perm = torch.empty_like(order)
    perm.scatter_(1, order, order.roll(shifts=-1, dims=1))  # image order[i] -> image order[i+1]
    return perm if device is None else perm.to(device, non_blocking=True)  # (count, B)


def derangement(B, generator=None, device=None):
    """One random permutation of range(B) without fixed points: (B,) long. See `derangements`.
    needs: derangements
    """
    return derangements(1, B, generator, device)[0]


# ------------------------------------------------------------------------------------------------
# Frozen-feature affinity (SmooSeg and STEGO)
# ------------------------------------------------------------------------------------------------

def feature_affinity(feats_a, feats_b):
    """Centred cosine affinity of frozen features (SmooSeg's fd, STEGO's F), no gradient.

    feats_a (B, C, ha, wa), feats_b (B, C, hb, wb) -> (B, Na, Nb):
        fd_ij = cos(f_i, g_j);  fd_ij -= mean_j fd_ij;  fd = fd - mean(fd) + mean(raw fd)
    (the means without an index run over the whole tensor, all images of the batch, as the peers).
    """
    with torch.no_grad():
        unit_a = F.normalize(feats_a.flatten(2), dim=1)  # (B, C, Na), unit columns
        unit_b = F.normalize(feats_b.flatten(2), dim=1)  # (B, C, Nb)
        affinity = torch.bmm(unit_a.transpose(1, 2), unit_b)  # cosines (B, Na, Nb)
        old_mean = affinity.mean()
        affinity = affinity - affinity.mean(dim=2, keepdim=True)  # centre every row over j
        affinity = affinity - affinity.mean() + old_mean
    return affinity  # (B, Na, Nb)


# ------------------------------------------------------------------------------------------------
# SmooSeg: smoothness (L_smo of eq 15) and data term
# ------------------------------------------------------------------------------------------------

def smoothness_loss(feats, probs, shift_close, shift_far, perm):
    """SmooSeg's smoothness loss L_smo of eq (15); a scalar.

    feats (B, C, h, w) frozen features; probs (B, K, h, w) = softmax(inner_global / 0.1) over K;
    perm (B,) long derangement pairing image b with image perm[b], or None for a batch of one image
    (then the close term only).
        cd_ij = 1 - cos(P_i, P_j)
        L_smo = mean[(fd(x, x) - b_close) cd(x, x)] + mean[(fd(x, x_perm) - b_far) cd(x, x_perm)]
    needs: feature_affinity
    """
    probs_unit = F.normalize(probs.flatten(2), dim=1)  # (B, K, N), unit columns
    affinity = feature_affinity(feats, feats)  # fd (B, N, N)
    label_distance = 1 - torch.bmm(probs_unit.transpose(1, 2), probs_unit)  # cd (B, N, N)
    loss = ((affinity - shift_close) * label_distance).mean()  # eq (15) L_smo: image with itself
    if perm is not None:  # image b with image perm[b]
        affinity = feature_affinity(feats, feats[perm])  # (B, N, N)
        label_distance = 1 - torch.bmm(probs_unit.transpose(1, 2), probs_unit[perm])  # (B, N, N)
        loss = loss + ((affinity - shift_far) * label_distance).mean()  # + the far term
    return loss


def data_loss(inner_local, inner_global, temperature=1.0):
    """SmooSeg's data term: mean_i CE(inner_local[:, i] / temperature, argmax_k inner_global[k, i]).

    inner_local (B, K, h, w) = cos(code.detach(), local centres); inner_global (B, K, h, w), only
    its argmax is used (no gradient). SmooSeg uses the raw cosines as logits: temperature 1.0.
    """
    target = inner_global.detach().argmax(dim=1)  # (B, h, w)
    return F.cross_entropy(inner_local / temperature, target)


# ------------------------------------------------------------------------------------------------
# STEGO: correspondence distillation (L_corr of eq 15)
# ------------------------------------------------------------------------------------------------

def random_coords(B, n, generator=None, device=None):
    """Random sampling positions for `sample_points`: (B, n, n, 2), (x, y) uniform in [-1, 1].

    Drawn on the generator's device (CPU when None), then moved to `device`.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    coords = torch.rand(B, n, n, 2, generator=generator, device=draw_device) * 2 - 1  # (B, n, n, 2)
    return coords if device is None else coords.to(device, non_blocking=True)


def sample_points(t, coords):
    """Bilinear samples of t (B, C, h, w) at coords (B, n, m, 2) -> (B, C, n, m).

    grid_sample, align_corners=True (+-1 = centres of the corner pixels), padding 'border' (STEGO).
    """
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)  # (B, C, n, m)


def correspondence_loss(feats_a, feats_b, codes_a, codes_b, shift):
    """STEGO's correspondence distillation loss on sampled points; a scalar.

    feats_a (B, C, na, ma), feats_b (B, C, nb, mb) frozen features; codes_a (B, D, na, ma),
    codes_b (B, D, nb, mb) head codes (gradient flows).
        L = mean[-max(S_ij, 0) (F_ij - shift)]
    with F = feature_affinity(feats_a, feats_b) and S_ij = cos(z_i, z_j) of the codes.
    needs: feature_affinity
    """
    affinity = feature_affinity(feats_a, feats_b)  # F (B, Na, Nb)
    unit_a = F.normalize(codes_a.flatten(2), dim=1)  # (B, D, Na), unit columns
    unit_b = F.normalize(codes_b.flatten(2), dim=1)  # (B, D, Nb)
    code_similarity = torch.bmm(unit_a.transpose(1, 2), unit_b)  # S (B, Na, Nb)
    return (-code_similarity.clamp(min=0) * (affinity - shift)).mean()  # eq (15) L_corr


def correspondence_terms(feats, codes, feats_aug, codes_aug, shifts, weights, generator=None,
                         n_points=11, n_negatives=5):
    """L_corr of eq (15): STEGO's loss on n x n random points, in three pairings, and their sum.

    feats (B, C, h, w), codes (B, D, h, w) of I; feats_aug, codes_aug of Ĩ (None: "corr_aug" = 0);
    shifts, weights: dicts with the keys "pos_intra", "pos_inter", "neg_inter" (`loss_constants`).
      "corr_intra": I at coords1 with itself;  "corr_aug": I at coords1 with Ĩ at coords2;
      "corr_neg": I at coords1 with I_perm at coords2, mean over n_negatives derangements
                  (B = 1: 0);
      "corr" = w_intra corr_intra + w_inter corr_aug + w_neg corr_neg.
    Ĩ takes the place of STEGO's kNN positive. Draws: random_coords, random_coords, derangements.
    needs: random_coords, sample_points, derangements, correspondence_loss
    """
    batch = feats.shape[0]
    coords1 = random_coords(batch, n_points, generator, feats.device)  # (B, n, n, 2)
    coords2 = random_coords(batch, n_points, generator, feats.device)  # (B, n, n, 2)
    use_negatives = batch > 1 and n_negatives > 0
    if use_negatives:
        perms = derangements(n_negatives, batch, generator, feats.device)  # (G, B)

    feats1 = sample_points(feats, coords1)  # (B, C, n, n)
    codes1 = sample_points(codes, coords1)  # (B, D, n, n)
    zero = codes1.sum() * 0.0  # a 0 that keeps the graph of the codes
    intra = correspondence_loss(feats1, feats1, codes1, codes1, shifts["pos_intra"])
    aug = zero
    if feats_aug is not None:
        aug = correspondence_loss(feats1, sample_points(feats_aug, coords2),
                                  codes1, sample_points(codes_aug, coords2), shifts["pos_inter"])
    neg = zero
    if use_negatives:
        feats2 = sample_points(feats, coords2)  # (B, C, n, n)
        codes2 = sample_points(codes, coords2)  # (B, D, n, n)
        neg = torch.stack([correspondence_loss(feats1, feats2[perm], codes1, codes2[perm],
                                               shifts["neg_inter"]) for perm in perms]).mean()
    total = (weights["pos_intra"] * intra + weights["pos_inter"] * aug
             + weights["neg_inter"] * neg)  # eq (15) L_corr
    return {"corr_intra": intra, "corr_aug": aug, "corr_neg": neg, "corr": total}


# ------------------------------------------------------------------------------------------------
# Eq (14): feature-similarity loss L_fs and regulariser L_reg
# ------------------------------------------------------------------------------------------------

def feature_similarity_losses(codes, fused, image_small, tau=0.1, sigma_xy=3.0, sigma_rgb=0.1):
    """Eq (14), our reading: (L_fs, L_reg) from codes F^c (B, D, h, w), fused F^f (B, K, h, w) and
    the image on the feature grid (B, 3, h, w), colours in [0, 1]; gradient flows into `fused` only.

      Q     = softmax_k(F^f / tau)  (B, N, K);  G = Q Q^T is the Gram projection
      W_ij  = max(cos(F^c_i, F^c_j), 0)                                      feature similarity
              * exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |c_i - c_j|^2 / 2 sigma_rgb^2)  pixel similarity
              W_ii = 0, no gradient (p: grid position in cells, c: RGB colour)
      L_fs  = sum_ij W_ij |q_i - q_j|^2 / (2 sum_ij W_ij)   per image, then the batch mean
      L_reg = (mean_ij G_ij - 1/K) / (1 - 1/K)             over all pixels of the batch (K = 1: 0)
    L_fs runs as (sum_i d_i |q_i|^2 - tr(Q^T W Q)) / sum_ij W_ij with d_i = sum_j W_ij, which needs
    no (B, N, N, K) tensor.
    """
    _, n_clusters, height, width = fused.shape
    q = torch.softmax(fused / tau, dim=1).flatten(2).transpose(1, 2)  # Q (B, N, K)

    with torch.no_grad():
        unit = F.normalize(codes.flatten(2), dim=1)  # (B, D, N), unit columns
        weights_feat = torch.bmm(unit.transpose(1, 2), unit).clamp(min=0)  # (B, N, N)
        ys = torch.arange(height, device=fused.device, dtype=fused.dtype)  # (h,)
        xs = torch.arange(width, device=fused.device, dtype=fused.dtype)  # (w,)
        rows, cols = ys.repeat_interleave(width), xs.repeat(height)  # (N,) position of pixel i
        distance_xy = ((rows[:, None] - rows[None, :]) ** 2
                       + (cols[:, None] - cols[None, :]) ** 2)  # |p_i - p_j|^2 (N, N)
        colours = image_small.flatten(2)  # (B, 3, N)
        distance_rgb = torch.zeros_like(weights_feat)  # (B, N, N)
        for channel in range(3):
            values = colours[:, channel]  # (B, N)
            distance_rgb += (values[:, :, None] - values[:, None, :]) ** 2  # |c_i - c_j|^2
        weights_pix = torch.exp(-distance_xy / (2 * sigma_xy ** 2)
                                - distance_rgb / (2 * sigma_rgb ** 2))  # pixel similarity (B, N, N)
        weights = weights_feat * weights_pix  # W (B, N, N)
        weights.diagonal(dim1=1, dim2=2).zero_()
        degree = weights.sum(dim=2)  # d (B, N)
        total_weight = degree.sum(dim=1).clamp(min=torch.finfo(fused.dtype).tiny)  # sum W (B,)

    degree_term = (degree * q.pow(2).sum(dim=2)).sum(dim=1)  # sum_i d_i |q_i|^2 (B,)
    trace_term = (q * torch.bmm(weights, q)).sum(dim=(1, 2))  # tr(Q^T W Q) (B,)
    loss_fs = ((degree_term - trace_term) / total_weight).mean()  # eq (14) L_fs
    if n_clusters == 1:
        return loss_fs, q.sum() * 0.0  # one cluster cannot collapse: L_reg = 0
    mean_q = q.mean(dim=(0, 1))  # (K,) over the batch's pixels; |mean_q|^2 = mean_ij G_ij
    loss_reg = (n_clusters * mean_q.pow(2).sum() - 1) / (n_clusters - 1)  # eq (14) L_reg
    return loss_fs, loss_reg
