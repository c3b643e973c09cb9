"""Low-level visual cue of IL2Vseg: spatially constrained fuzzy c-means on colour + colour affinity.

Paper section "Low-Level Visual Features", eqs (1) and (3)-(12):

    x    = bilinear(I)                                   eq (1)   image -> feature grid (H/8, W/8)
    J    = sum_i sum_j U_ij^m d_ij^2                      eq (3)   FCM objective
    U_ij = (1/d_ij)^(1/(m-1)) / sum_k (1/d_ik)^(1/(m-1))  eq (4)   fuzzy memberships (as printed)
    S    = 3x3 neighbourhood sum of U                     eq (5)   spatial information
    U'   = U * S / sum_k U * S                            eq (6)   spatial memberships
    v_j  = sum_i U'_ij^m x_i / sum_i U'_ij^m              eq (7)   centre update
    P    = U' / sum_k U'                                  eq (8)   cluster probabilities
    A    = exp(-||x_j - x_k||^2 / (2 sigma^2))            eqs (9)-(11) colour affinity, all pixel pairs
    F_l  = A . P                                          eq (12)  low-level cue (A row-normalised here)

Everything is plain batched PyTorch (no loop over pixels), works on CPU and CUDA, and uses the dtype
and device of its input. Shapes: B images, C colour channels, h x w grid, N = h * w pixels,
K clusters. Pixels are flattened row-major (index = row * w + col).

The FCM cluster order is arbitrary (it depends on the initialisation); matching FCM cluster j to
semantic cluster j of the segmentation head before the fusion of eq (13) is done where the fusion
happens (il2vseg.py), not here.
"""

import inspect
import math
import warnings

import torch
import torch.nn.functional as F

# Defaults, chosen for RGB colours in [0, 1] on a 40 x 40 (320 px / 8) feature grid.
DEFAULT_SIGMA = 0.1      # eq (10): colours 0.1 apart (~25 grey levels) get affinity 0.61, 0.3 apart 0.011
DEFAULT_MAX_ITER = 20    # FCM iteration cap (CamVid val scores within 0.3 points at 15, 20, 30, 60)
DEFAULT_TOL = 1e-3       # stop when no centre moves more than this (per channel, colour units)
AFFINITY_CHUNK_BYTES = 512 * 2**20   # low_level_cue builds A for at most this many bytes of images at once


# ----------------------------------------------------------------------------------------------
# Input checks: one clear line per problem, raised as ValueError.
# ----------------------------------------------------------------------------------------------

def _check_grid(x, name="x", finite=True):
    """Check that x is a floating tensor (B, C, h, w) with no empty dimension (and, if `finite`,
    no NaN / inf: one host sync)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, h, w), got {type(x).__name__}")
    if x.dim() != 4 or min(x.shape) < 1:
        raise ValueError(f"{name} must have shape (B, C, h, w) with every size >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_membership(membership, name="membership"):
    """Check a membership / probability map (B, K, h, w)."""
    _check_grid(membership, name)


def _check_centres(x, centres):
    """Check centres (B, K, C) against a grid x (B, C, h, w)."""
    if not isinstance(centres, torch.Tensor) or centres.dim() != 3:
        raise ValueError(f"centres must be a tensor of shape (B, K, C), got "
                         f"{tuple(centres.shape) if isinstance(centres, torch.Tensor) else type(centres).__name__}")
    if centres.shape[0] != x.shape[0] or centres.shape[2] != x.shape[1] or centres.shape[1] < 1:
        raise ValueError(f"centres {tuple(centres.shape)} do not match x {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, K >= 1, {x.shape[1]})")


def _check_m(m):
    """The fuzzifier m must be a finite number > 1 (eq 4 divides by m - 1)."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 1:
        raise ValueError(f"fuzzifier m must be a finite number > 1, got {m!r}")


def _check_positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_matching(x, membership):
    """x (B, C, h, w) and membership (B, K, h, w) must share B, h and w."""
    if membership.shape[0] != x.shape[0] or membership.shape[2:] != x.shape[2:]:
        raise ValueError(f"membership {tuple(membership.shape)} does not match x {tuple(x.shape)}: "
                         f"expected (B, K, h, w) = ({x.shape[0]}, K, {x.shape[2]}, {x.shape[3]})")


# ----------------------------------------------------------------------------------------------
# Eq (1): bilinear downsampling to the feature grid.
# ----------------------------------------------------------------------------------------------

def downsample(images, patch=8, size=None):
    """Bilinearly downsample images (B, C, H, W) to the feature grid (B, C, H // patch, W // patch).

    eq (1): x = bilinear(I). align_corners=False, antialias off (as F.interpolate does by default),
    so each grid value interpolates the image at the centre of its patch x patch cell.
    `size=(h, w)` overrides `patch` when the feature grid has another size.
    """
    _check_grid(images, "images")
    return _bilinear(images, _grid_size(images, patch, size))                 # eq (1)  (B, C, h, w)


def _grid_size(images, patch, size):
    """Feature-grid size (h, w): `size` if given, else (H // patch, W // patch); checked."""
    if size is None:
        _check_positive_int(patch, "patch")
        if images.shape[2] < patch or images.shape[3] < patch:
            raise ValueError(f"images {tuple(images.shape)} are smaller than one patch of {patch} pixels")
        return images.shape[2] // patch, images.shape[3] // patch
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"size must be a pair of integers (h, w) >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def _bilinear(images, size):
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                         antialias=False)                                   # eq (1)  (B, C, h, w)


# ----------------------------------------------------------------------------------------------
# Building blocks on flattened pixels, channel-major: x (B, C, N), centres (B, K, C), maps (B, K, N).
# ----------------------------------------------------------------------------------------------

def _squared_distance(x_cn, centres):
    """Squared Euclidean distance d_ij^2 = ||x_i - v_j||^2 as (B, K, N) for pixels x (B, C, N) and
    centres (B, K, C).

    From exact differences (no |a|^2 + |b|^2 - 2ab rounding), so a pixel equal to a centre has
    distance exactly 0. (torch.cdist's exact mode does the same but is ~50x slower on CUDA.)
    Memory B * K * C * N, meant for colours (C = 3)."""
    difference = centres[:, :, :, None] - x_cn[:, None, :, :]                   # (B, K, C, N)
    return difference.square_().sum(dim=2)                                      # (B, K, N)


def _membership_from_squared_distance(squared_distance, m, textbook=False):
    """Eq (4) from squared distances d^2 (B, K, N) -> memberships U (B, K, N), summing to 1 over K.

    Computed as a softmax over clusters of -log(d) / (m - 1) = -log(d^2) / (2 (m - 1)), which equals
    eq (4) exactly but cannot overflow for m close to 1. d = 0 gives log = -inf -> logit +inf,
    replaced by the largest finite number, so a pixel sitting on a centre gets membership exactly 1
    there (shared equally if several centres coincide with it) and never NaN.
    """
    power = 2.0 if textbook else 1.0        # textbook FCM: d^(2/(m-1)); as printed: d^(1/(m-1))
    logits = squared_distance.log().mul_(-power / (2.0 * (m - 1)))         # (B, K, N), +inf where d == 0
    logits = torch.nan_to_num_(logits, posinf=torch.finfo(logits.dtype).max)
    return torch.softmax(logits, dim=1)                                     # eq (4)  (B, K, N)


def _box_sum_3x3(maps, separable=None):
    """3 x 3 neighbourhood sum of maps (B, K, h, w) with zero padding (eq 5).

    Zero padding means a border pixel sums over its in-image neighbours only (6 at an edge,
    4 at a corner, 9 inside). Two exact implementations, picked for speed by device unless
    `separable` is given: on CPU separable shifted in-place adds (rows, then columns; ~4x faster
    than pooling there), elsewhere one avg_pool2d kernel with divisor 1 (= sum).
    """
    if separable is None:
        separable = maps.device.type == "cpu"
    if not separable:
        return F.avg_pool2d(maps, kernel_size=3, stride=1, padding=1, count_include_pad=True,
                            divisor_override=1)          # (B, K, h, w)
    rows = maps.clone()                                   # (B, K, h, w)
    rows[:, :, 1:] += maps[:, :, :-1]                     # + the pixel above
    rows[:, :, :-1] += maps[:, :, 1:]                     # + the pixel below
    box = rows.clone()
    box[..., 1:] += rows[..., :-1]                        # + the column to the left
    box[..., :-1] += rows[..., 1:]                        # + the column to the right
    return box                                            # (B, K, h, w)


def _spatial_membership_flat(membership, h, w):
    """Eqs (5)-(6) on flattened maps (B, K, N) -> U' (B, K, N)."""
    B, K, N = membership.shape
    spatial = _box_sum_3x3(membership.reshape(B, K, h, w)).reshape(B, K, N)  # eq (5)  (B, K, N)
    weighted = membership * spatial                                           # U_ij * S_ij
    # sum_k U_ik S_ik >= sum_k U_ik^2 >= 1/K > 0 because S includes the pixel itself.
    return weighted / weighted.sum(dim=1, keepdim=True)                       # eq (6)  (B, K, N)


def _with_ones(x_cn):
    """Pixels (B, C, N) with a channel of ones appended (B, C + 1, N): one matmul with it gives both
    the numerator and the denominator of eq (7)."""
    return torch.cat([x_cn, torch.ones_like(x_cn[:, :1])], dim=1)


def _update_centres_flat(x_ones, weights_m, previous=None):
    """Eq (7) from U'^m (B, K, N) and pixels-with-ones (B, C + 1, N) -> centres (B, K, C).

    A cluster whose weights all underflow to 0 keeps its previous centre (or sits at 0 if none)."""
    C = x_ones.shape[1] - 1
    sums = torch.bmm(x_ones, weights_m.transpose(1, 2)).transpose(1, 2)      # (B, K, C + 1)
    numerator, denominator = sums[:, :, :C], sums[:, :, C:]                   # (B, K, C), (B, K, 1)
    if previous is None:
        return numerator / denominator.clamp_min(torch.finfo(x_ones.dtype).tiny)  # eq (7)  (B, K, C)
    return torch.where(denominator > 0, numerator / denominator, previous)    # eq (7)  (B, K, C)


# ----------------------------------------------------------------------------------------------
# Public per-equation functions on image-shaped tensors.
# ----------------------------------------------------------------------------------------------

def fuzzy_membership(x, centres, m=2.0, textbook=False):
    """Fuzzy memberships U (B, K, h, w) of pixels x (B, C, h, w) to centres (B, K, C); eq (4).

    As printed in the paper: U_ij = (1/d_ij)^(1/(m-1)) / sum_k (1/d_ik)^(1/(m-1)) with the plain
    distance d_ij = ||x_i - v_j||. Textbook FCM (Bezdek), which minimises J of eq (3) over U, uses
    U_ij = 1 / sum_k (d_ij/d_ik)^(2/(m-1)), i.e. the squared distance. Since
    d^(1/(m-1)) = d^(2/(m'-1)) with m' = 2m - 1, the printed memberships are the textbook ones with
    fuzzifier m' = 2m - 1 (m = 2 -> m' = 3: softer memberships). `textbook=True` uses d^2 instead.
    Because eq (7) still weights by U'^m, the printed iteration is not an exact descent of eq (3): J
    usually decreases but can rise a little between iterations (the textbook variant never rises).
    A pixel with d_ij = 0 gets U_ij = 1 (split equally between coinciding centres), never NaN.
    """
    _check_grid(x)
    _check_centres(x, centres)
    _check_m(m)
    B, C, h, w = x.shape
    squared_distance = _squared_distance(x.flatten(2), centres.to(x.dtype))  # (B, K, N)
    return _membership_from_squared_distance(squared_distance, m, textbook).reshape(B, -1, h, w)  # eq (4)


def fcm_objective(x, centres, membership, m=2.0):
    """FCM objective J (B,) = sum_i sum_j U_ij^m d_ij^2 for pixels x (B, C, h, w), centres (B, K, C)
    and memberships (B, K, h, w); eq (3). Pass U' to get the objective of the spatial iteration."""
    _check_grid(x)
    _check_centres(x, centres)
    _check_membership(membership)
    _check_matching(x, membership)
    _check_m(m)
    if membership.shape[1] != centres.shape[1]:
        raise ValueError(f"membership has {membership.shape[1]} clusters but centres have {centres.shape[1]}")
    squared_distance = _squared_distance(x.flatten(2), centres.to(x.dtype))  # d^2  (B, K, N)
    weights_m = membership.flatten(2).pow(m)                                  # U^m  (B, K, N)
    return (weights_m * squared_distance).sum(dim=(1, 2))                    # eq (3)  (B,)


def spatial_information(membership):
    """Spatial information S (B, K, h, w) of memberships (B, K, h, w); eq (5).

    S_ij = sum over the 3 x 3 neighbourhood (the pixel itself included) of cluster j's membership.
    Borders: zero padding, i.e. the sum runs over the in-image neighbours only."""
    _check_membership(membership)
    return _box_sum_3x3(membership)                                           # eq (5)  (B, K, h, w)


def spatial_membership(membership, spatial):
    """Spatially updated memberships U' (B, K, h, w) = U * S / sum_k U * S; eq (6).

    membership U and spatial information S are both (B, K, h, w)."""
    _check_membership(membership)
    _check_membership(spatial, "spatial")
    if spatial.shape != membership.shape:
        raise ValueError(f"spatial {tuple(spatial.shape)} must have the shape of membership "
                         f"{tuple(membership.shape)}")
    weighted = membership * spatial                                           # (B, K, h, w)
    total = weighted.sum(dim=1, keepdim=True)                                 # (B, 1, h, w)
    return weighted / total.clamp_min(torch.finfo(weighted.dtype).tiny)       # eq (6)  (B, K, h, w)


def update_centres(x, membership, m=2.0, previous=None):
    """Cluster centres (B, K, C) = sum_i U'_ij^m x_i / sum_i U'_ij^m; eq (7).

    x (B, C, h, w), membership U' (B, K, h, w). A cluster with zero total weight keeps `previous`
    (B, K, C) when given, else sits at 0."""
    _check_grid(x)
    _check_membership(membership)
    _check_matching(x, membership)
    _check_m(m)
    weights_m = membership.flatten(2).to(x.dtype).pow(m)                      # (B, K, N)
    if previous is not None:
        _check_centres(x, previous)
        previous = previous.to(x.dtype)
    return _update_centres_flat(_with_ones(x.flatten(2)), weights_m, previous)  # eq (7)  (B, K, C)


def cluster_probability(membership):
    """Cluster probabilities P (B, K, h, w) = U' / sum_k U'; eq (8). (U' of eq 6 already sums to 1,
    so this only removes rounding drift.)"""
    _check_membership(membership)
    total = membership.sum(dim=1, keepdim=True)                               # (B, 1, h, w)
    return membership / total.clamp_min(torch.finfo(membership.dtype).tiny)   # eq (8)  (B, K, h, w)


def _affinity_factors(x_flat, sigma):
    """Factors L, R (b, N, 5) with L R^T = -||x_j - x_k||^2 / (2 sigma^2) (eqs 9-10, exponent).

    ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b is written as one dot product of augmented vectors
    [a, |a|^2, 1] . [-2b, 1, |b|^2], so a single batched matmul gives all squared distances."""
    squared_norm = x_flat.square().sum(dim=2, keepdim=True)                   # (b, N, 1)
    ones = torch.ones_like(squared_norm)
    left = torch.cat([x_flat, squared_norm, ones], dim=2) * (-0.5 / sigma**2)  # (b, N, C + 2)
    right = torch.cat([-2.0 * x_flat, ones, squared_norm], dim=2)              # (b, N, C + 2)
    return left, right


def _affinity_into(x_flat, sigma, out):
    """Write the unnormalised affinity exp(-d^2 / (2 sigma^2)) of x (b, N, C) into out (b, N, N)."""
    left, right = _affinity_factors(x_flat, sigma)
    torch.bmm(left, right.transpose(1, 2), out=out)       # eq (9) squared, scaled: -d_jk^2 / (2 sigma^2)
    # The upper clamp at 0 removes the rounding of the expansion (d^2 >= 0). The lower clamp keeps
    # exp() out of the subnormal range (below ~1e-38 in float32), whose slow arithmetic made the
    # following matmul ~4x slower on CPU; it changes only affinities below that (absolute error
    # < 1e-37, invisible next to the row sums >= 1).
    lowest = math.log(torch.finfo(out.dtype).tiny) + 1.0  # -86.3 (float32), -707.4 (float64)
    return out.clamp_(min=lowest, max=0.0).exp_()          # eqs (10)-(11)  (b, N, N)


def _check_sigma(sigma):
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def colour_affinity(x, sigma=DEFAULT_SIGMA, normalise=True):
    """Gaussian colour affinity between all pixel pairs of x (B, C, h, w) -> A (B, N, N); eqs (9)-(11).

    d_jk = ||x_j - x_k||, a_jk = exp(-d_jk^2 / (2 sigma^2)), A = [a_jk]. Pixels are flattened
    row-major. sigma is in colour units (default 0.1 for RGB in [0, 1]: colours 0.1 apart get 0.61,
    0.2 apart 0.14, 0.3 apart 0.011). d^2 comes from the |a|^2 + |b|^2 - 2 a.b expansion (one
    matmul), clamped at 0, so a_jk is exact up to float rounding of d^2 (~1e-7 in colour units^2).

    normalise=True divides each row by its sum (A <- D^-1 A, D = diag(A 1)), so that F_l = A P of
    eq (12) is a convex combination of probability vectors and therefore again sums to 1 over K,
    on the same scale as the head's probabilities it is fused with in eq (13). Without it, a pixel's
    F_l grows with the number of similarly coloured pixels (up to N), which would swamp eq (13).
    Row sums are >= 1 (a_jj = 1), so the division is safe. Memory: B * N^2 values.
    """
    _check_grid(x)
    _check_sigma(sigma)
    B, C, h, w = x.shape
    x_flat = x.flatten(2).transpose(1, 2)                                     # (B, N, C)
    affinity = torch.empty(B, h * w, h * w, device=x.device, dtype=x.dtype)   # (B, N, N)
    _affinity_into(x_flat, sigma, affinity)                                   # eqs (9)-(11)
    if normalise:
        affinity /= affinity.sum(dim=2, keepdim=True)                          # rows sum to 1
    return affinity


# ----------------------------------------------------------------------------------------------
# Initialisation: k-means++ (D^2 sampling) or random pixels, batched, deterministic under a seed.
# The random numbers are drawn on the CPU first (`_init_draws`), so that what runs on the device
# afterwards is free of host syncs and host-to-device copies (see GraphedLowLevelCue).
# ----------------------------------------------------------------------------------------------

INITS = ("kmeans++", "random")


def _init_draws(batch, n_clusters, n_pixels, seed, init):
    """The random numbers of the initialisation, from a CPU torch.Generator seeded per call (the same
    draws on every device, no global RNG touched): for "kmeans++" uniforms (B, K) float64 in [0, 1),
    for "random" pixel indices (B, K) int64 (K distinct pixels, then repeats when K > N)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if init == "kmeans++":
        return torch.rand(batch, n_clusters, generator=generator, dtype=torch.float64)   # (B, K)
    order = torch.rand(batch, n_pixels, generator=generator).argsort(dim=1)              # (B, N) permutation
    return order[:, torch.arange(n_clusters) % n_pixels]                                 # (B, K)


def _kmeanspp_init(x_cn, uniforms):
    """Pick K initial centres (B, K, C) among the pixels x (B, C, N) by k-means++ D^2 sampling, driven
    by uniforms (B, K) in [0, 1) (from _init_draws, on x's device).

    The first centre is a uniformly random pixel; each next one is a pixel drawn with probability
    proportional to its squared distance to the nearest centre so far, so no pixel already on a
    centre is drawn while another pixel is left. When every pixel sits on a centre (constant image,
    K > number of distinct colours) the cdf is all 0 and pixel 0 is taken: a duplicate centre, which
    stays finite. K sequential steps of a few batched ops, no host sync.
    """
    B, C, N = x_cn.shape
    uniforms = uniforms.to(x_cn.dtype)                                         # (B, K)
    cdf = torch.arange(1, N + 1, device=x_cn.device, dtype=x_cn.dtype).expand(B, N)  # uniform first draw
    nearest = None                                                             # D^2 so far (B, N)
    centres = []
    for k in range(uniforms.shape[1]):                # loop over clusters, not pixels
        if k > 0:
            cdf = nearest.cumsum(dim=1)                                        # (B, N)
        target = uniforms[:, k:k + 1] * cdf[:, -1:]                            # (B, 1) < total
        index = torch.searchsorted(cdf.contiguous(), target)                   # (B, 1) first cdf >= target
        centre = x_cn.gather(2, index[:, None, :].expand(B, C, 1))            # (B, C, 1)
        centres.append(centre)
        squared = (x_cn - centre).square_().sum(dim=1)                         # (B, N)
        nearest = squared if k == 0 else torch.minimum(nearest, squared)
    return torch.cat(centres, dim=2).transpose(1, 2)                           # (B, K, C)


def _random_init(x_cn, index):
    """Initial centres (B, K, C) = the pixels x (B, C, N) at index (B, K) (from _init_draws). Cheaper
    than k-means++ on GPU (no K sequential steps) but may start two centres on the same colour (e.g.
    in a saturated region), and equal centres stay equal."""
    B, C, _ = x_cn.shape
    return x_cn.gather(2, index[:, None, :].expand(B, C, index.shape[1])).transpose(1, 2)  # (B, K, C)


def initial_centres(x_cn, n_clusters, seed=0, init="kmeans++"):
    """Initial centres (B, K, C) for pixels x (B, C, N): k-means++ or random pixels, seeded."""
    B, _, N = x_cn.shape
    draws = _init_draws(B, n_clusters, N, seed, init).to(x_cn.device)
    return (_kmeanspp_init if init == "kmeans++" else _random_init)(x_cn, draws)


# ----------------------------------------------------------------------------------------------
# The spatially constrained FCM (eqs 3-8) and the whole low-level cue (eqs 1, 3-12).
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def spatial_fcm(x, n_clusters, m=2.0, spatial=True, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, seed=0,
                textbook=False, init="kmeans++"):
    """Spatially constrained fuzzy c-means on a grid x (B, C, h, w); eqs (3)-(8).

    Returns (P, centres, history):
      P       (B, K, h, w)  cluster probabilities (eq 8) from the final centres, summing to 1 over K;
      centres (B, K, C)     final cluster centres (eq 7);
      history (B, T)        objective J (eq 3) of each of the T iterations run, J(U'_t, V_t): the
                            memberships used for the centre update against the centres they came from.

    One iteration: d = ||x - v|| -> U (eq 4) -> S (eq 5) -> U' (eq 6) -> J (eq 3) -> v (eq 7).
    spatial=False skips eqs (5)-(6) (U' = U, plain FCM). textbook=True uses d^2 in eq (4) (see
    fuzzy_membership); the default follows the paper as printed.
    init: "kmeans++" (default) or "random" pixels, seeded by `seed` (deterministic on a given device,
    independent of the global RNG).
    Each image stops on its own, after max_iter iterations or once none of its centre coordinates
    moved more than tol; its centres are frozen from then on, so an image's result does not depend
    on the other images of the batch. On the CPU the loop ends when every image has stopped (T <
    max_iter possible; a finished image's later history entries repeat J at its final centres); on
    other devices it always runs max_iter iterations, because asking whether all have stopped is a
    host sync (the frozen images make the results the same either way).
    Runs without autograd and in float32 (float64 if x is float64), autocast disabled.
    """
    _check_grid(x)
    _check_fcm_arguments(n_clusters, m, max_iter, tol, init)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        B, C, h, w = x.shape
        draws = _init_draws(B, n_clusters, h * w, seed, init).to(x.device)
        return _spatial_fcm(x, draws, m, spatial, max_iter, tol, textbook, init,
                            stop_early=x.device.type == "cpu")


def _check_fcm_arguments(n_clusters, m, max_iter, tol, init):
    _check_positive_int(n_clusters, "n_clusters")
    _check_m(m)
    _check_positive_int(max_iter, "max_iter")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _spatial_fcm(x, draws, m, spatial, max_iter, tol, textbook, init, stop_early):
    """spatial_fcm without the input checks, from the initialisation's draws (B, K) on x's device.

    x (B, C, h, w) float32/float64. No host sync and no host-to-device copy unless stop_early (so
    that it can be captured in a CUDA graph)."""
    B, C, h, w = x.shape
    x_cn = x.flatten(2).contiguous()                                          # (B, C, N)
    x_ones = _with_ones(x_cn)                                                 # (B, C + 1, N)
    start = _kmeanspp_init if init == "kmeans++" else _random_init
    centres = start(x_cn, draws)                                              # (B, K, C)
    n_clusters = centres.shape[1]
    running = torch.ones(B, 1, 1, dtype=torch.bool, device=x.device)          # images still iterating
    history = []
    for _ in range(max_iter):
        squared_distance = _squared_distance(x_cn, centres)                   # d^2  (B, K, N)
        membership = _membership_from_squared_distance(squared_distance, m, textbook)  # eq (4)
        if spatial:
            membership = _spatial_membership_flat(membership, h, w)           # eqs (5)-(6)  (B, K, N)
        weights_m = membership.pow(m)                                         # U'^m  (B, K, N)
        history.append((weights_m * squared_distance).sum(dim=(1, 2)))       # eq (3)  (B,)
        new_centres = _update_centres_flat(x_ones, weights_m, centres)        # eq (7)  (B, K, C)
        moved = (new_centres - centres).abs().amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        centres = torch.where(running, new_centres, centres)                  # stopped images keep theirs
        running = running & (moved > tol)
        if stop_early and not bool(running.any()):
            break
    # memberships of the final centres -> probabilities
    membership = _membership_from_squared_distance(_squared_distance(x_cn, centres), m, textbook)  # eq (4)
    if spatial:
        membership = _spatial_membership_flat(membership, h, w)               # eqs (5)-(6)
    probability = membership / membership.sum(dim=1, keepdim=True)            # eq (8)  (B, K, N)
    return probability.reshape(B, n_clusters, h, w), centres, torch.stack(history, dim=1)


def _check_low_level(images, n_clusters, m, sigma, patch, size, max_iter, tol, init):
    """All checks of low_level_cue (one host sync for the value range); returns the grid (h, w)."""
    _check_grid(images, "images", finite=False)
    grid = _grid_size(images, patch, size)
    _check_fcm_arguments(n_clusters, m, max_iter, tol, init)
    _check_sigma(sigma)
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()   # one host sync; NaN/inf fail too
    if not (-1e-3 <= low and high <= 1 + 1e-3):
        raise ValueError(f"images must be finite RGB in [0, 1] (not ImageNet-normalised, not 0..255), "
                         f"got values in [{low:.3g}, {high:.3g}]")
    return grid


@torch.no_grad()
def low_level_cue(images, n_clusters, m=2.0, sigma=DEFAULT_SIGMA, patch=8, spatial=True,
                  max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, seed=0, size=None, textbook=False,
                  affinity=True, init="kmeans++"):
    """Low-level visual cue F_l (B, K, H // patch, W // patch) of images (B, 3, H, W) in [0, 1]; eqs (1)-(12).

    x = bilinear(I) on the feature grid (eq 1; `size=(h, w)` overrides `patch`), P = spatial FCM of
    x (eqs 3-8, see spatial_fcm), A = row-normalised Gaussian colour affinity of x (eqs 9-11, see
    colour_affinity), F_l = A P (eq 12), which sums to 1 over K at every pixel.
    affinity=False returns P itself (ablation: no colour boosting).

    The order of the K clusters is arbitrary (set by the seeded initialisation); they are aligned
    with the head's clusters at fusion time (eq 13, in il2vseg.py). Each image's F_l depends on the
    image and its row of the seeded random draws, not on the other images of the batch (each image
    stops FCM on its own; up to float rounding, since the batch size can change the matmul kernels).
    Runs without autograd, in float32 (float64 if the images are float64) even under autocast.
    The affinity is built for a few images at a time (one on CPU) so that A never exceeds ~512 MiB.
    One host sync (the value-range check, which waits for the work already queued); on CUDA the rest
    is queued without waiting.
    """
    grid = _check_low_level(images, n_clusters, m, sigma, patch, size, max_iter, tol, init)
    draws = _init_draws(images.shape[0], n_clusters, grid[0] * grid[1], seed, init).to(images.device)
    with torch.autocast(device_type=images.device.type, enabled=False):
        return _low_level_cue(images, draws, grid, m, sigma, spatial, max_iter, tol, textbook, affinity,
                              init, stop_early=images.device.type == "cpu")


def _low_level_cue(images, draws, grid, m, sigma, spatial, max_iter, tol, textbook, affinity, init,
                   stop_early):
    """low_level_cue without the checks, from the initialisation's draws (B, K) on the images' device.
    No host sync and no host-to-device copy unless stop_early (CUDA-graph capturable). Call it with
    autocast disabled."""
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = _bilinear(images.to(dtype), grid)                                     # eq (1)  (B, C, h, w)
    probability, _, _ = _spatial_fcm(x, draws, m, spatial, max_iter, tol, textbook, init,
                                     stop_early)                              # eqs (3)-(8)  (B, K, h, w)
    if not affinity:
        return probability
    B, K, h, w = probability.shape
    N = h * w
    x_flat = x.flatten(2).transpose(1, 2)                                     # (B, N, C)
    prob_flat = probability.reshape(B, K, N)                                  # (B, K, N)
    # F_l = D^-1 A P with A symmetric: in (B, K, N) layout F^T = (P^T A) / rowsum(A). One matmul
    # with a row of ones appended to P yields both P^T A and the row sums of A.
    with_ones = torch.cat([prob_flat, torch.ones_like(prob_flat[:, :1])], dim=1)      # (B, K + 1, N)
    # A is built for a chunk of images at a time in one reused buffer: one image on CPU (stays in
    # cache, no page faults from fresh 10 MB allocations), as many as fit in ~512 MiB on GPU.
    if x.device.type == "cpu":
        chunk = 1
    else:
        chunk = max(1, min(B, AFFINITY_CHUNK_BYTES // (N * N * x.element_size())))
    buffer = torch.empty(chunk, N, N, device=x.device, dtype=x.dtype)         # (chunk, N, N)
    product = torch.empty(B, K + 1, N, device=x.device, dtype=x.dtype)        # (B, K + 1, N)
    for start in range(0, B, chunk):                  # loop over groups of images, bounding memory
        stop = min(B, start + chunk)
        block = _affinity_into(x_flat[start:stop], sigma, buffer[:stop - start])      # eqs (9)-(11)  A
        torch.bmm(with_ones[start:stop], block, out=product[start:stop])              # (b, K + 1, N)
    cue = product[:, :K] / product[:, K:]                                     # eq (12)  (B, K, N)
    return cue.reshape(B, K, h, w)                                            # (B, K, h, w)


# ----------------------------------------------------------------------------------------------
# The low-level cue replayed from a CUDA graph (training loop).
# ----------------------------------------------------------------------------------------------

class GraphedLowLevelCue:
    """low_level_cue(images, n_clusters, **settings) for a loop over equally shaped batches.

    The low-level branch is about a thousand small kernels (K k-means++ steps, then max_iter FCM
    iterations of ~20 elementwise ops, then A and A P) on a tiny grid. On a GPU launching them, not
    their arithmetic, sets its time. On CUDA this captures the whole branch (everything after the
    input checks) in a CUDA graph, once per batch shape, and replays it: one launch per call.
    On the CPU it simply runs low_level_cue.

    The result is low_level_cue's (same kernels on the same numbers). When a graph is captured it is
    replayed once on other images (the batch mirrored) and compared with the eager result; if that
    differs, a warning says so and that shape runs eagerly from then on. If capture itself fails,
    CudaGraphError is raised (use low_level_cue instead).
    Each call returns a fresh tensor (the graph's own output buffer is overwritten by the next call).
    Graphs, and the working memory they keep reserved (about the eager peak: ~0.4 GB for 32 images on
    a 40x40 grid, mostly A), live as long as this object; create one per training run.
    """

    def __init__(self, n_clusters, **settings):
        parameters = inspect.signature(low_level_cue).parameters
        allowed = set(parameters) - {"images", "n_clusters"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise TypeError(f"GraphedLowLevelCue got unknown settings {unknown}")
        self.n_clusters = n_clusters
        self.settings = {name: settings.get(name, parameters[name].default) for name in allowed}
        self.graphs = {}   # (shape, dtype, device) -> (graph, static images, draws, output) or None

    def __call__(self, images):
        if images.device.type != "cuda":
            return self._eager(images)
        s = self.settings
        grid = _check_low_level(images, self.n_clusters, s["m"], s["sigma"], s["patch"], s["size"],
                                s["max_iter"], s["tol"], s["init"])
        key = (tuple(images.shape), images.dtype, str(images.device))
        if key not in self.graphs:
            self.graphs[key] = self._capture(images, grid)
        if self.graphs[key] is None:
            return self._eager(images)
        graph, static_images, _, output = self.graphs[key]
        static_images.copy_(images)
        graph.replay()
        return output.clone()

    def _run(self, images, draws, grid, stop_early):
        s = self.settings
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            return _low_level_cue(images, draws, grid, s["m"], s["sigma"], s["spatial"], s["max_iter"],
                                  s["tol"], s["textbook"], s["affinity"], s["init"], stop_early)

    def _eager(self, images):
        return low_level_cue(images, self.n_clusters, **self.settings)

    def _capture(self, images, grid):
        """Capture the branch for this batch shape: (graph, static input, draws, static output), or
        None (eager) when the replay does not reproduce the eager result. The graph reads the memory
        of the static input and of the draws: both are kept in the returned entry so that they live
        as long as the graph. A failed capture raises CudaGraphError: it can leave CUDA's streams and
        random generator in capture mode, so going on eagerly in the same process is not safe."""
        shape = "x".join(map(str, images.shape))
        device = images.device
        draws = _init_draws(images.shape[0], self.n_clusters, grid[0] * grid[1], self.settings["seed"],
                            self.settings["init"]).to(device)  # the same every call: kept by the graph
        static_images = images.clone()
        caller_stream = torch.cuda.current_stream(device)
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(caller_stream)
            with torch.cuda.stream(side):                      # warm-up (allocator, cuBLAS) off the graph
                for _ in range(2):
                    self._run(static_images, draws, grid, stop_early=False)
            caller_stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (the data loader's pin-memory thread) may allocate meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self._run(static_images, draws, grid, stop_early=False)
        except Exception as error:
            torch.cuda.set_stream(caller_stream)   # graph's __exit__ skips this when capture_end raises
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise CudaGraphError(f"low-level branch: CUDA graph capture for batch {shape} failed "
                                 f"({type(error).__name__}: {first}); run it without a graph "
                                 f"(fcm.low_level_cue)") from None
        probe = images.flip(-1)                                # other numbers: the replay must read them
        static_images.copy_(probe)
        graph.replay()
        expected = self._eager(probe)
        if not torch.allclose(output, expected, rtol=1e-4, atol=1e-5):
            difference = (output - expected).abs().max().item()
            warnings.warn(f"low-level branch: the CUDA graph for batch {shape} differs from the eager "
                          f"result by {difference:.3g}; running it eagerly")
            return None
        return graph, static_images, draws, output


class CudaGraphError(RuntimeError):
    """Capturing the low-level branch in a CUDA graph failed (one-line message)."""
