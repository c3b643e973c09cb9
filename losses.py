"""Training losses of IL2Vseg: the paper's "Loss Function" section, eqs (14) and (15).

    L_total = beta * L_reg + gamma * L_fs + L_smo + L_corr      eq (15), beta = 0.05, gamma = 0.1

The paper gives no formula for the four terms; this file writes each one down:
- L_smo : SmooSeg's smoothness loss (Lan et al. 2024), `smoothness_loss`, with SmooSeg's data term
          `data_loss` (SmooSeg's energy is data + smoothness; it trains the local centres).
- L_corr: STEGO's correspondence loss (Hamilton et al. 2022), `correspondence_loss`, of an image
          with itself, a nearest-neighbour image (STEGO), its jittered copy Ĩ (the paper) and other
          images: `correspondence_terms`.
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
    """The peers' tuned loss constants for a data set and a backbone, and whether they were tuned for
    exactly this pair (then `published` says so per loss; pairs.py measures the others).

    SmooSeg (train_config.yaml): b_close and b_far of the smoothness loss. STEGO (train_config.yml):
    weights and shifts of its correspondence terms, "pos_intra" (image with itself), "pos_inter" (with a
    nearest-neighbour image), "neg_inter" (with other images). "aug", the paper's pair of an image with
    its jittered copy, has no published constants: it takes pos_intra's (docs/choices.md). A pair no
    peer tuned gets the same data set's constants for another backbone, else COCO-Stuff's ViT-S/8 ones.
    Returns fresh dicts {"smooseg_shifts", "stego_weights", "stego_shifts", "published"}.
    """
    smooseg = {  # (data set, arch): (b_close, b_far)
        ("cityscapes", "vits8"): (-0.02, 0.5), ("cocostuff", "vits8"): (-0.02, 0.48),
        ("potsdam", "vitb8"): (0.1, 0.5), ("potsdam", "dinov2-vitb14"): (0.32, 0.5)}
    stego = {  # (data set, arch): (weights, shifts), each (pos_intra, pos_inter, neg_inter)
        ("cocostuff", "vits8"): ((0.67, 0.25, 0.63), (0.08, 0.02, 0.66)),
        ("potsdam", "vits8"): ((0.67, 0.25, 0.63), (0.08, 0.02, 0.46)),
        ("cityscapes", "vitb8"): ((1.0, 0.577, 0.906), (0.458, 0.175, 0.314)),  # STEGO's released ViT-B/8 model
        ("cocostuff", "resnet50-mocov2"): ((0.67, 0.25, 0.63), (0.32, 0.36, 0.26))}

    name = "cocostuff" if str(dataset).startswith("coco") else str(dataset)

    def lookup(table, fallback):
        if (name, arch) in table:
            return table[name, arch], True
        same_data = [value for (data, _), value in table.items() if data == name]
        return (same_data[0] if same_data else table[fallback]), False

    (close, far), smooseg_published = lookup(smooseg, ("cocostuff", "vits8"))
    moco = arch.startswith("resnet")
    (weights, shifts), stego_published = lookup(stego, ("cocostuff", "resnet50-mocov2" if moco else "vits8"))
    keys = ("pos_intra", "pos_inter", "neg_inter")
    weights, shifts = dict(zip(keys, weights)), dict(zip(keys, shifts))
    weights["aug"], shifts["aug"] = weights["pos_intra"], shifts["pos_intra"]
    return {"smooseg_shifts": {"close": close, "far": far}, "stego_weights": weights, "stego_shifts": shifts,
            "published": {"smooseg": smooseg_published, "stego": stego_published}}


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


def correspondence_terms(feats, codes, partners, shifts, weights, generator=None, n_points=11, n_negatives=5):
    """L_corr of eq (15): STEGO's loss on n x n random points of each image, in four pairings, and their sum.

    feats (B, C, h, w), codes (B, D, h, w) of the images I; partners: {"knn": (feats, codes) of each
    image's nearest-neighbour image (STEGO), "aug": (feats, codes) of Ĩ (the paper)}, either may be missing
    (its term is 0). shifts, weights: dicts with the keys pos_intra, pos_inter, aug, neg_inter.
      corr_intra  I at coords1 with I at coords1          pos_intra
      corr_knn    I at coords1 with its kNN at coords2     pos_inter
      corr_aug    I at coords1 with Ĩ at coords2           aug
      corr_neg    I at coords1 with I_perm at coords2, mean over n_negatives derangements (B = 1: 0)
      corr = sum of weight * term. Draws: random_coords, random_coords, derangements.
    needs: random_coords, sample_points, derangements, correspondence_loss
    """
    batch = feats.shape[0]
    coords1 = random_coords(batch, n_points, generator, feats.device)  # (B, n, n, 2)
    coords2 = random_coords(batch, n_points, generator, feats.device)  # (B, n, n, 2)
    use_negatives = batch > 1 and n_negatives > 0
    if use_negatives:
        perms = derangements(n_negatives, batch, generator, feats.device)  # (G, B)

    feats1, codes1 = sample_points(feats, coords1), sample_points(codes, coords1)  # (B, C | D, n, n)
    zero = codes1.sum() * 0.0  # a 0 that keeps the graph of the codes
    terms = {"corr_intra": correspondence_loss(feats1, feats1, codes1, codes1, shifts["pos_intra"]),
             "corr_knn": zero, "corr_aug": zero, "corr_neg": zero}
    for name, key in (("knn", "pos_inter"), ("aug", "aug")):
        if name in partners:
            feats2, codes2 = (sample_points(t, coords2) for t in partners[name])  # (B, C | D, n, n)
            terms[f"corr_{name}"] = correspondence_loss(feats1, feats2, codes1, codes2, shifts[key])
    if use_negatives:
        feats2, codes2 = sample_points(feats, coords2), sample_points(codes, coords2)  # (B, C | D, n, n)
        terms["corr_neg"] = torch.stack([correspondence_loss(feats1, feats2[perm], codes1, codes2[perm],
                                                             shifts["neg_inter"]) for perm in perms]).mean()
    terms["corr"] = (weights["pos_intra"] * terms["corr_intra"] + weights["pos_inter"] * terms["corr_knn"]
                     + weights["aug"] * terms["corr_aug"] + weights["neg_inter"] * terms["corr_neg"])  # L_corr
    return terms


# ------------------------------------------------------------------------------------------------
# Eq (14): feature-similarity loss L_fs and regulariser L_reg
# ------------------------------------------------------------------------------------------------

def pair_weights(codes, image_small, sigma_xy=3.0, sigma_rgb=0.1):
    """Eq (14)'s two similarity matrices, multiplied: W (B, N, N), W_ii = 0, no gradient.

      W_ij = max(cos(F^c_i, F^c_j), 0)                                        feature similarity
             * exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |c_i - c_j|^2 / 2 sigma_rgb^2)  pixel similarity
    codes F^c (B, D, h, w); image_small (B, 3, h, w) the image on the feature grid, colours in [0, 1];
    p the grid position in cells, c the RGB colour.
    """
    height, width = codes.shape[2:]
    with torch.no_grad():
        unit = F.normalize(codes.flatten(2), dim=1)  # (B, D, N), unit columns
        weights_feat = torch.bmm(unit.transpose(1, 2), unit).clamp(min=0)  # (B, N, N)
        ys = torch.arange(height, device=codes.device, dtype=codes.dtype)  # (h,)
        xs = torch.arange(width, device=codes.device, dtype=codes.dtype)  # (w,)
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
    return weights


def balance_regulariser(q):
    """L_reg of eq (14), our reading: (mean_ij G_ij - 1/K) / (1 - 1/K) with G = Q Q^T over all pixels of the
    batch: 0 for balanced clusters, 1 when every pixel is in one cluster (K = 1: 0). q: Q (B, N, K)."""
    n_clusters = q.shape[2]
    if n_clusters == 1:
        return q.sum() * 0.0  # one cluster cannot collapse
    mean_q = q.mean(dim=(0, 1))  # (K,) over the batch's pixels; |mean_q|^2 = mean_ij G_ij
    return (n_clusters * mean_q.pow(2).sum() - 1) / (n_clusters - 1)  # eq (14) L_reg


def feature_similarity_losses(codes, fused, image_small, tau=0.1, sigma_xy=3.0, sigma_rgb=0.1):
    """Eq (14), the Laplacian reading: (L_fs, L_reg) from codes F^c (B, D, h, w), fused F^f (B, K, h, w)
    and the image on the feature grid (B, 3, h, w); gradient flows into `fused` only.

      Q    = softmax_k(F^f / tau) (B, N, K), G = Q Q^T, W = pair_weights(F^c, I)
      L_fs = sum_ij W_ij |q_i - q_j|^2 / (2 sum_ij W_ij)   per image, then the batch mean
    run as (sum_i d_i |q_i|^2 - tr(Q^T W Q)) / sum_ij W_ij with d_i = sum_j W_ij (no (B, N, N, K) tensor).
    needs: pair_weights, balance_regulariser
    """
    q = torch.softmax(fused / tau, dim=1).flatten(2).transpose(1, 2)  # Q (B, N, K)
    weights = pair_weights(codes, image_small, sigma_xy, sigma_rgb)  # W (B, N, N)
    degree = weights.sum(dim=2)  # d (B, N)
    total_weight = degree.sum(dim=1).clamp(min=torch.finfo(fused.dtype).tiny)  # sum W (B,)
    degree_term = (degree * q.pow(2).sum(dim=2)).sum(dim=1)  # sum_i d_i |q_i|^2 (B,)
    trace_term = (q * torch.bmm(weights, q)).sum(dim=(1, 2))  # tr(Q^T W Q) (B,)
    loss_fs = ((degree_term - trace_term) / total_weight).mean()  # eq (14) L_fs
    return loss_fs, balance_regulariser(q)


def feature_correlation_losses(codes, fused, image_small, tau=0.1, sigma_xy=3.0, sigma_rgb=0.1):
    """Eq (14), the correlation reading: the pair similarity W projected on the Gram matrix G of F^f, built
    as STEGO's correspondence loss is (W centred per row; the pull is not normalised by sum W).

      Q    = softmax_k(F^f / tau) (B, N, K), G = Q Q^T, W = pair_weights(F^c, I)
      L_fs = -mean_i sum_j (W_ij - mean_j' W_ij') G_ij     per image, then the batch mean
    Pairs more alike than the row's average are pulled into one cluster (G_ij up), the others apart.
    W is local (sigma_xy), so the sum over j stays bounded whatever the grid's size.
    needs: pair_weights, balance_regulariser
    """
    q = torch.softmax(fused / tau, dim=1).flatten(2).transpose(1, 2)  # Q (B, N, K)
    weights = pair_weights(codes, image_small, sigma_xy, sigma_rgb)  # W (B, N, N)
    centred = weights - weights.mean(dim=2, keepdim=True)  # W_ij - mean_j W_ij (B, N, N)
    gram = torch.bmm(q, q.transpose(1, 2))  # G (B, N, N)
    loss_fs = -(centred * gram).sum(dim=2).mean()  # eq (14) L_fs: the sum over j, the mean over i and images
    return loss_fs, balance_regulariser(q)
