"""Low-level visual cue of IL2Vseg: spatially constrained fuzzy c-means on colour + colour affinity.

Paper section "Low-Level Visual Features", eqs (1) and (3)-(12), one public function per equation:

    x    = bilinear(I)                                   eq (1)   downsample
    d_ij = ||x_i - v_j||                                 (eq 3)   squared_distance (returns d^2)
    J    = sum_i sum_j U_ij^m d_ij^2                      eq (3)   fcm_objective
    U_ij = (1/d_ij)^(1/(m-1)) / sum_k (1/d_ik)^(1/(m-1))  eq (4)   fuzzy_membership (as printed)
    S    = 3x3 neighbourhood sum of U                     eq (5)   spatial_information
    U'   = U * S / sum_k U * S                            eq (6)   spatial_membership
    v_j  = sum_i U'_ij^m x_i / sum_i U'_ij^m              eq (7)   update_centres
    P    = U' / sum_k U'                                  eq (8)   cluster_probability
                                                                   spatial_fcm iterates (4)-(7), then (8)
    a_jk = exp(-||x_j - x_k||^2 / (2 sigma^2))            eqs (9)-(11)  colour_affinity (all pairs),
                                                                   local_colour_affinity (a window)
    F_l  = A P                                            eq (12)  feature_boost, local_feature_boost
                                                                   low_level_cue composes all of it

Eqs (9)-(12) are read in two ways (low_level_cue's `affinity`):
  "global": A over all pixel pairs of the grid, as eqs (9)-(11) print it (N x N);
  "local":  A only between "neighboring pixels" (Introduction), i.e. the "intra-class affinity of
            spatially-adjacent and similarly-colored pixels" (Abstract): a (2r+1) x (2r+1) window.
Eq (12) is computed with A's rows normalised (A <- D^-1 A), so F_l = A P stays a probability map.

Plain batched PyTorch on the dtype and device of the input. Shapes: B images, C colour channels,
h x w grid, N = h * w pixels (flattened row-major: index = row * w + col), K clusters.
Every public function works when pasted alone into a file that imports math, numpy, scipy, torch
and torch.nn.functional as F; the functions it calls are named on its docstring's "needs:" line.

The FCM cluster order is arbitrary (set by the seeded initialisation); matching FCM cluster j to
the head's cluster j before the fusion of eq (13) happens where the fusion happens (il2vseg.py).
"""

import math

import torch
import torch.nn.functional as F

# Documentation only: the functions write these values as literal defaults.
DEFAULT_SIGMA = 0.1      # eq (10): colours 0.1 apart (~25 grey levels) get affinity 0.61, 0.3 apart 0.011
DEFAULT_MAX_ITER = 20    # FCM iteration cap (CamVid val scores within 0.3 points at 15, 20, 30, 60)
DEFAULT_TOL = 1e-3       # an image stops when none of its centres moved more than this (colour units)


def _check_tensor(value, name, dims):
    """Raise a one-line ValueError unless `value` is a floating-point tensor with `dims` dimensions,
    none of them empty. Shape only: no host sync, so it is cheap inside the FCM loop."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor with {dims} dimensions, got {type(value).__name__}")
    if value.dim() != dims or value.numel() == 0:
        raise ValueError(f"{name} must have {dims} non-empty dimensions, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


# ----------------------------------------------------------------------------------------------
# Eq (1): the image on the feature grid.
# ----------------------------------------------------------------------------------------------

def downsample(images, patch=8, size=None):
    """Bilinearly downsample images (B, C, H, W) to the feature grid (B, C, H // patch, W // patch).

    eq (1): "x = bilinear(I_b) in R^{C3 x H/8 x W/8}". align_corners=False, no antialias (as
    F.interpolate by default): each grid value interpolates the image at the centre of its cell.
    `size=(h, w)` overrides `patch` when the feature grid has another size.
    needs: _check_tensor
    """
    _check_tensor(images, "images", 4)
    if size is None:
        if not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be an integer >= 1, got {patch!r}")
        if images.shape[2] < patch or images.shape[3] < patch:
            raise ValueError(f"images {tuple(images.shape)} are smaller than one patch of {patch} pixels")
        size = (images.shape[2] // patch, images.shape[3] // patch)
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and s >= 1 for s in size)):
        raise ValueError(f"size must be a pair of integers (h, w) >= 1, got {size!r}")
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=False)                                     # eq (1)  (B, C, h, w)


# ----------------------------------------------------------------------------------------------
# Spatially constrained fuzzy clustering, eqs (3)-(8).
# ----------------------------------------------------------------------------------------------

def squared_distance(x, centres):
    """Squared colour distances d_ij^2 = ||x_i - v_j||^2 (B, K, h, w) of pixels x (B, C, h, w) to
    centres v (B, K, C): the d_ij defined under eq (3), used by eqs (3) and (4).

    From exact differences (not |a|^2 + |b|^2 - 2ab), so a pixel equal to a centre is exactly 0 away.
    Memory B * K * C * h * w: meant for colours (C = 3).
    needs: _check_tensor
    """
    _check_tensor(x, "x", 4)
    _check_tensor(centres, "centres", 3)
    if centres.shape[0] != x.shape[0] or centres.shape[2] != x.shape[1]:
        raise ValueError(f"centres {tuple(centres.shape)} do not match x {tuple(x.shape)}: "
                         f"expected ({x.shape[0]}, K, {x.shape[1]})")
    difference = x[:, None] - centres[:, :, :, None, None].to(x.dtype)        # (B, K, C, h, w)
    return difference.square_().sum(dim=2)                                    # d^2  (B, K, h, w)


def fcm_objective(membership, d2, m=2.0):
    """FCM objective J (B,) = sum_i sum_j U_ij^m d_ij^2; eq (3).

    membership U (B, K, h, w) and squared distances d2 (B, K, h, w) (see squared_distance).
    Pass U' (eq 6) to get the objective of the spatial iteration.
    needs: _check_tensor
    """
    _check_tensor(membership, "membership", 4)
    _check_tensor(d2, "d2", 4)
    if membership.shape != d2.shape:
        raise ValueError(f"membership {tuple(membership.shape)} and d2 {tuple(d2.shape)} must have "
                         f"the same shape (B, K, h, w)")
    return (membership.pow(m) * d2).sum(dim=(1, 2, 3))                        # eq (3)  (B,)


def fuzzy_membership(d2, m=2.0, textbook=False):
    """Fuzzy memberships U (B, K, h, w) from squared distances d2 = d^2 (B, K, h, w); eq (4).

    As printed: U_ij = (1/d_ij)^(1/(m-1)) / sum_k (1/d_ik)^(1/(m-1)), d the plain distance.
    Textbook FCM (Bezdek), whose U minimises J of eq (3), uses U_ij = 1 / sum_k (d_ij/d_ik)^(2/(m-1)),
    i.e. d^2 in place of d: `textbook=True`. Since d^(1/(m-1)) = d^(2/(m'-1)) with m' = 2m - 1, the
    printed memberships are the textbook ones with fuzzifier 2m - 1 (m = 2 -> 3: softer). Because
    eq (7) still weights by U'^m, the printed iteration is not an exact descent of eq (3): J usually
    decreases but can rise a little between iterations (the textbook variant never rises).

    Computed as a softmax over clusters of log(1/d^p)/(m-1) = -log(d^2) p / (2 (m-1)) (p = 1 as
    printed, 2 textbook): equal to eq (4), but no power can overflow for m close to 1. A pixel on a
    centre (d = 0: logit +inf, replaced by the largest float) gets membership 1 there, shared
    equally between coinciding centres, never NaN.
    needs: _check_tensor
    """
    _check_tensor(d2, "d2", 4)
    if not (isinstance(m, (int, float)) and 1 < m < math.inf):
        raise ValueError(f"fuzzifier m must be a finite number > 1, got {m!r}")
    power = 2.0 if textbook else 1.0
    logits = d2.log().mul_(-power / (2.0 * (m - 1)))                         # log (1/d)^(p/(m-1))
    logits.nan_to_num_(posinf=torch.finfo(logits.dtype).max)                 # d = 0: +inf -> largest
    return torch.softmax(logits, dim=1)                                       # eq (4)  (B, K, h, w)


def spatial_information(membership):
    """Spatial information S (B, K, h, w) of memberships U (B, K, h, w); eq (5).

    S_ij = sum_{k=-1..1} sum_{l=-1..1} U_{i+k, j+l}: the 3 x 3 neighbourhood sum, the pixel itself
    included. Pixels outside the image count 0 (zero padding), so a border pixel sums its in-image
    neighbours only (6 at an edge, 4 at a corner).
    needs: _check_tensor
    """
    _check_tensor(membership, "membership", 4)
    padded = F.pad(membership, (1, 1, 1, 1))                                  # (B, K, h + 2, w + 2)
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]          # over k (rows)  (B, K, h, w + 2)
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]                   # eq (5), then l  (B, K, h, w)


def spatial_membership(membership, spatial):
    """Spatially updated memberships U' (B, K, h, w) = U * S / sum_k U * S; eq (6).

    membership U and spatial information S (eq 5) are both (B, K, h, w). (With S from U the sum is
    >= 1/K; the clamp only guards arbitrary inputs.)
    needs: _check_tensor
    """
    _check_tensor(membership, "membership", 4)
    _check_tensor(spatial, "spatial", 4)
    if spatial.shape != membership.shape:
        raise ValueError(f"spatial {tuple(spatial.shape)} must have the shape of membership "
                         f"{tuple(membership.shape)}")
    weighted = membership * spatial                                           # U_ij S_ij  (B, K, h, w)
    total = weighted.sum(dim=1, keepdim=True)                                 # (B, 1, h, w)
    return weighted.div_(total.clamp_min(torch.finfo(weighted.dtype).tiny))   # eq (6)  (B, K, h, w)


def update_centres(x, membership, m=2.0, previous=None):
    """Cluster centres v (B, K, C) = sum_i U'_ij^m x_i / sum_i U'_ij^m; eq (7).

    x (B, C, h, w), membership U' (B, K, h, w). A cluster whose weights are all 0 keeps `previous`
    (B, K, C) when given, else sits at 0.
    needs: _check_tensor
    """
    _check_tensor(x, "x", 4)
    _check_tensor(membership, "membership", 4)
    if membership.shape[0] != x.shape[0] or membership.shape[2:] != x.shape[2:]:
        raise ValueError(f"membership {tuple(membership.shape)} does not match x {tuple(x.shape)}: "
                         f"expected ({x.shape[0]}, K, {x.shape[2]}, {x.shape[3]})")
    weights = membership.to(x.dtype).pow(m).flatten(2)                        # U'^m  (B, K, N)
    numerator = torch.bmm(weights, x.flatten(2).transpose(1, 2))              # sum_i U'^m x_i  (B, K, C)
    denominator = weights.sum(dim=2, keepdim=True)                            # sum_i U'^m  (B, K, 1)
    if previous is None:
        return numerator / denominator.clamp_min(torch.finfo(x.dtype).tiny)   # eq (7)  (B, K, C)
    return torch.where(denominator > 0, numerator / denominator, previous.to(x.dtype))  # eq (7)


def cluster_probability(membership):
    """Cluster probabilities P (B, K, h, w) = U' / sum_k U'; eq (8).

    (U' of eq (6) already sums to 1 over K, so this only removes rounding drift.)
    needs: _check_tensor
    """
    _check_tensor(membership, "membership", 4)
    total = membership.sum(dim=1, keepdim=True)                               # (B, 1, h, w)
    return membership / total.clamp_min(torch.finfo(membership.dtype).tiny)   # eq (8)  (B, K, h, w)


def initial_centres(x, n_clusters, seed=0, init="kmeans++"):
    """Initial centres (B, K, C) among the pixels of x (B, C, h, w), seeded (not in the paper).

    The random numbers come from a CPU torch.Generator seeded by `seed`: deterministic, the same
    draws on any device, the global RNG untouched, and the SAME draws for every image of the batch, so
    an image's centres depend on its own pixels and the seed only (not on its place in the batch).
    init="kmeans++" (D^2 sampling): the first centre is a uniformly random pixel, each next one a
    pixel drawn with probability proportional to its squared distance to the nearest centre so far,
    so no pixel already on a centre is drawn while another is left. (When every pixel sits on a
    centre the cdf is all 0 and pixel 0 is taken: a duplicate centre, still finite.)
    init="random": K distinct random pixels (repeats once K > N); cheaper, but two centres may start
    on one colour (e.g. in a saturated region), and equal centres stay equal.
    needs: _check_tensor
    """
    _check_tensor(x, "x", 4)
    if not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    B, C, h, w = x.shape
    N = h * w
    pixels = x.flatten(2)                                                     # (B, C, N)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if init == "random":
        order = torch.rand(1, N, generator=generator).argsort(dim=1)          # (1, N) a permutation
        index = order[:, torch.arange(n_clusters) % N].to(x.device).expand(B, n_clusters)  # (B, K)
        return pixels.gather(2, index[:, None].expand(B, C, n_clusters)).transpose(1, 2)  # (B, K, C)
    uniforms = torch.rand(1, n_clusters, generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(device=x.device, dtype=x.dtype).expand(B, n_clusters)  # (B, K), one row for all
    cdf = torch.arange(1, N + 1, device=x.device, dtype=x.dtype).expand(B, N)  # first draw: uniform
    centres, nearest = [], None
    for k in range(n_clusters):                       # K sequential draws, each batched over images
        if k > 0:
            cdf = nearest.cumsum(dim=1)                                       # D^2 cdf  (B, N)
        target = uniforms[:, k:k + 1] * cdf[:, -1:]                           # (B, 1)
        index = (cdf < target).sum(dim=1, keepdim=True)                       # first cdf >= target  (B, 1)
        # (a count, as searchsorted would give on the sorted cdf; torch 2.11's compiler failed on searchsorted)
        centre = pixels.gather(2, index[:, None].expand(B, C, 1))             # (B, C, 1)
        centres.append(centre)
        squared = (pixels - centre).square().sum(dim=1)                       # (B, N)
        nearest = squared if k == 0 else torch.minimum(nearest, squared)     # D^2 to the nearest centre
    return torch.cat(centres, dim=2).transpose(1, 2)                          # (B, K, C)


@torch.no_grad()
def spatial_fcm(x, n_clusters, m=2.0, spatial=True, max_iter=20, tol=1e-3, seed=0, textbook=False,
                init="kmeans++", early_exit=True):
    """Spatially constrained fuzzy c-means on a grid x (B, C, h, w); eqs (3)-(8).

    Returns (P, centres, history):
      P       (B, K, h, w)  cluster probabilities (eq 8) from the final centres, summing to 1 over K;
      centres (B, K, C)     final cluster centres (eq 7);
      history (B, T)        objective J (eq 3) of each iteration run, J(U'_t, V_t): the memberships
                            used for the centre update against the centres they came from.

    One iteration: d -> U (eq 4) -> S (eq 5) -> U' (eq 6) -> J (eq 3) -> v (eq 7). spatial=False
    skips eqs (5)-(6) (U' = U: plain FCM). textbook=True uses d^2 in eq (4) (see fuzzy_membership).
    init and seed: see initial_centres.
    Each image stops on its own: once none of its centre coordinates moved more than tol, its
    centres are frozen, so its result never depends on the other images of the batch (its later
    history entries repeat J at its final centres). early_exit=True ends the loop once every image
    has stopped (one host sync per iteration; T <= max_iter); early_exit=False always runs max_iter
    iterations, with the same results (no sync: for torch.compile).
    Runs without autograd, autocast disabled, in float32 (float64 stays float64). The input must
    be finite (checked here, one host sync).
    needs: initial_centres, squared_distance, fuzzy_membership, spatial_information, spatial_membership,
        fcm_objective, update_centres, cluster_probability, _check_tensor
    """
    _check_tensor(x, "x", 4)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values")
    if not (isinstance(m, (int, float)) and 1 < m < math.inf):
        raise ValueError(f"fuzzifier m must be a finite number > 1, got {m!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)   # (B, C, h, w)
        centres = initial_centres(x, n_clusters, seed, init)                  # (B, K, C)
        running = torch.ones(x.shape[0], 1, 1, dtype=torch.bool, device=x.device)  # images still iterating
        history = []
        for _ in range(max_iter):
            distance = squared_distance(x, centres)                           # d^2  (B, K, h, w)
            membership = fuzzy_membership(distance, m, textbook)              # eq (4)  U
            if spatial:
                membership = spatial_membership(membership, spatial_information(membership))  # eqs (5)-(6)
            history.append(fcm_objective(membership, distance, m))           # eq (3)  (B,)
            new_centres = update_centres(x, membership, m, previous=centres)  # eq (7)  (B, K, C)
            moved = (new_centres - centres).abs().amax(dim=(1, 2), keepdim=True)   # (B, 1, 1)
            centres = torch.where(running, new_centres, centres)              # stopped images keep theirs
            running = running & (moved > tol)
            if early_exit and not bool(running.any()):
                break
        membership = fuzzy_membership(squared_distance(x, centres), m, textbook)  # eq (4), final centres
        if spatial:
            membership = spatial_membership(membership, spatial_information(membership))  # eqs (5)-(6)
        return cluster_probability(membership), centres, torch.stack(history, dim=1)    # eq (8)


# ----------------------------------------------------------------------------------------------
# Colour affinity for feature boosting, eqs (9)-(12): over all pixel pairs ("global") ...
# ----------------------------------------------------------------------------------------------

def colour_affinity(x, sigma=0.1):
    """Gaussian colour affinity between all pixel pairs of x (B, C, h, w) -> A (B, N, N); eqs (9)-(11).

    "the Euclidean distance between each pair of normalized pixel values x_j and x_k":
    d_jk = ||x_j - x_k|| (eq 9), a_jk = exp(-d_jk^2 / (2 sigma^2)) (eq 10), A = [a_jk] (eq 11).
    sigma is in colour units (0.1 for RGB in [0, 1]: colours 0.1 apart get 0.61, 0.3 apart 0.011).
    d^2 comes from the |a|^2 + |b|^2 - 2 a.b expansion (exact up to ~1e-7 in float32). Affinities
    below 3e-38 (6e-308 in float64) are raised to that: subnormal numbers made the matmul of
    eq (12) ~3x slower on CPU. Memory B * N^2 (low_level_cue builds one image's A at a time).
    needs: _check_tensor
    """
    _check_tensor(x, "x", 4)
    if not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    pixels = x.flatten(2).transpose(1, 2)                                     # (B, N, C)
    squared_norm = pixels.square().sum(dim=2, keepdim=True)                   # |x_j|^2  (B, N, 1)
    ones = torch.ones_like(squared_norm)
    # eq (9), squared, for all pairs from one matmul: d_jk^2 = |x_j|^2 + |x_k|^2 - 2 x_j . x_k
    #                                                       = [x_j, |x_j|^2, 1] . [-2 x_k, 1, |x_k|^2],
    # with eq (10)'s factor -1 / (2 sigma^2) applied to the left vectors (N x (C + 2) numbers, not N x N)
    left = torch.cat([pixels, squared_norm, ones], dim=2) * (-0.5 / sigma**2)  # (B, N, C + 2)
    right = torch.cat([-2.0 * pixels, ones, squared_norm], dim=2)             # (B, N, C + 2)
    exponent = torch.bmm(left, right.transpose(1, 2))                         # -d_jk^2 / (2 sigma^2)  (B, N, N)
    # In place from here: one N x N buffer. max=0: the expansion can round d^2 to -1e-7.
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0        # exp(floor): 3e-38 in float32, not subnormal
    return exponent.clamp_(min=floor, max=0.0).exp_()                         # eqs (10)-(11)  A  (B, N, N)


def feature_boost(affinity, probability):
    """Low-level cue F_l = D^-1 A P (B, K, h, w) from A (B, N, N) and P (B, K, h, w); eq (12).

    "the color affinity matrix and clustering results are combined ... This approach increases the
    likelihood that pixels with similar colors will be assigned to the same cluster". Eq (12)
    prints F_l = A P; here A's rows are normalised first (A <- D^-1 A, D = diag(A 1)), so pixel
    j's F_l is the affinity-weighted average of the pixels' probability vectors: it sums to 1 over
    K, on the scale of the head's probabilities it is fused with in eq (13). Without it a pixel's
    F_l grows with the number of similarly coloured pixels (up to N). Row sums are >= 1 for A from
    colour_affinity (a_jj = 1); an A already row-normalised is left as it is.
    needs: _check_tensor
    """
    _check_tensor(affinity, "affinity", 3)
    _check_tensor(probability, "probability", 4)
    B, K, h, w = probability.shape
    if affinity.shape != (B, h * w, h * w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not match probability "
                         f"{tuple(probability.shape)}: expected ({B}, {h * w}, {h * w})")
    # One matmul gives A P and the row sums A 1 together: a row of ones appended to P^T. It is
    # computed transposed, (A [P, 1])^T = [P, 1]^T A^T, in (B, K + 1, N) layout: 1.6x faster on CPU.
    with_ones = torch.cat([probability.flatten(2), torch.ones_like(probability[:, :1]).flatten(2)], dim=1)
    product = torch.bmm(with_ones, affinity.transpose(1, 2))                  # [A P, A 1]^T  (B, K + 1, N)
    row_sums = product[:, K:].clamp_min(torch.finfo(product.dtype).tiny)      # D = diag(A 1)  (B, 1, N)
    return (product[:, :K] / row_sums).reshape(B, K, h, w)                    # eq (12)  D^-1 A P  (B, K, h, w)


# ----------------------------------------------------------------------------------------------
# ... or between neighbouring pixels only ("local").
# ----------------------------------------------------------------------------------------------

def local_colour_affinity(x, sigma=0.1, radius=3):
    """Gaussian colour affinity of each pixel of x (B, C, h, w) to the pixels of its (2r+1) x (2r+1)
    window -> weights (B, (2r+1)^2, h, w); eqs (9)-(11) between neighbouring pixels.

    The Introduction computes "Euclidean distances of neighboring pixels to obtain the color
    affinity matrix"; the Abstract preserves "the intra-class affinity of spatially-adjacent and
    similarly-colored pixels". So a_jk is eq (10), exp(-||x_j - x_k||^2 / (2 sigma^2)), for k in
    the window around j, and 0 for every other k: A is banded, and only its band is stored:
    weights[b, o, i, j] = a between pixel (i, j) and pixel (i + dy - r, j + dx - r), where
    (dy, dx) = divmod(o, 2r + 1). Pixels outside the image do not exist: weight 0. Tiny affinities
    are raised to 3e-38 as in colour_affinity. A radius >= max(h, w) - 1 covers the whole grid:
    the weights are then colour_affinity's A, rearranged.
    needs: _check_tensor
    """
    _check_tensor(x, "x", 4)
    if not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    B, C, h, w = x.shape
    side = 2 * radius + 1
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0        # as in colour_affinity
    padded = F.pad(x, (radius,) * 4)                                          # (B, C, h+2r, w+2r)
    inside = F.pad(torch.ones_like(x[:1, 0]), (radius,) * 4)                 # 1 in the image  (1, h+2r, w+2r)
    weights = []
    for o in range(side * side):                      # loop over the window's offsets, not pixels
        dy, dx = divmod(o, side)
        neighbour = padded[:, :, dy:dy + h, dx:dx + w]                        # x at (i + dy - r, j + dx - r)
        squared = (x - neighbour).square_().sum(dim=1)                        # eq (9)  d_jk^2  (B, h, w)
        affinity = squared.mul_(-0.5 / sigma**2).clamp_(min=floor).exp_()     # eq (10)  a_jk  (B, h, w)
        weights.append(affinity * inside[:, dy:dy + h, dx:dx + w])           # 0 outside the image
    return torch.stack(weights, dim=1)                                        # eq (11)  (B, (2r+1)^2, h, w)


def local_feature_boost(weights, probability):
    """Low-level cue F_l = D^-1 A P (B, K, h, w) for the banded A of local_colour_affinity; eq (12).

    weights (B, (2r+1)^2, h, w) (see local_colour_affinity), probability P (B, K, h, w):
    F_l(i, j) = sum_o weights[o, i, j] P(i + dy - r, j + dx - r) / sum_o weights[o, i, j], the
    rows normalised over the window as in feature_boost (in-image pixels only: the others have
    weight 0). One fused multiply-add of shifted views per offset; no N x N matrix.
    needs: _check_tensor
    """
    _check_tensor(weights, "weights", 4)
    _check_tensor(probability, "probability", 4)
    B, K, h, w = probability.shape
    side = math.isqrt(weights.shape[1])
    if side % 2 == 0 or side * side != weights.shape[1] or weights.shape[0] != B or weights.shape[2:] != (h, w):
        raise ValueError(f"weights {tuple(weights.shape)} do not match probability {tuple(probability.shape)}: "
                         f"expected ({B}, (2r+1)^2, {h}, {w})")
    radius = side // 2
    weights = weights.to(probability.dtype)
    padded = F.pad(probability, (radius,) * 4)                                # 0 outside  (B, K, h+2r, w+2r)
    boosted = torch.zeros_like(probability)                                   # (B, K, h, w)
    for o in range(side * side):                      # loop over the window's offsets, not pixels
        dy, dx = divmod(o, side)
        neighbour = padded[:, :, dy:dy + h, dx:dx + w]                        # P at (i + dy - r, j + dx - r)
        boosted.addcmul_(weights[:, o:o + 1], neighbour)                      # A P: += a_jk P_k
    row_sums = weights.sum(dim=1, keepdim=True)                               # D = diag(A 1)  (B, 1, h, w)
    return boosted / row_sums.clamp_min(torch.finfo(boosted.dtype).tiny)      # eq (12)  D^-1 A P


# ----------------------------------------------------------------------------------------------
# The whole low-level cue, eqs (1), (3)-(12).
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def low_level_cue(images, n_clusters, m=2.0, sigma=0.1, patch=8, affinity="global", radius=3, spatial=True,
                  max_iter=20, tol=1e-3, seed=0, size=None, textbook=False, init="kmeans++", early_exit=True):
    """Low-level visual cue F_l (B, K, H // patch, W // patch) of images (B, 3, H, W) in [0, 1]; eqs (1)-(12).

    x = bilinear(I) on the feature grid (eq 1, see downsample; `size=(h, w)` overrides `patch`),
    P = spatial FCM of x (eqs 3-8, see spatial_fcm), then F_l = A P (eq 12, A's rows normalised)
    with the Gaussian colour affinity A (eqs 9-11), read as
      affinity="global": between all pixel pairs (colour_affinity + feature_boost; one image's
                         N x N matrix at a time, 10 MB for a 40 x 40 grid in float32);
      affinity="local":  between the pixels of each (2r+1) x (2r+1) window, r = radius
                         (local_colour_affinity + local_feature_boost; no N x N matrix);
      affinity="none":   F_l = P (ablation: no colour boosting).
    (affinity=True / False mean "global" / "none".) F_l sums to 1 over K at every pixel.

    The order of the K clusters is arbitrary (set by the seeded initialisation); il2vseg.py aligns
    them with the head's clusters for eq (13). Each image's F_l depends on that image and the seed
    only, not on its batch mates (up to float rounding of batch-size dependent kernels).
    Runs without autograd, in float32 (float64 stays float64) even under autocast. Two host syncs
    check the input (the value range here, finiteness in spatial_fcm); early_exit: see spatial_fcm.
    needs: downsample, spatial_fcm, colour_affinity, feature_boost, local_colour_affinity,
        local_feature_boost, _check_tensor
    """
    _check_tensor(images, "images", 4)
    if affinity is True or affinity is False:                                 # the older spelling
        affinity = "global" if affinity else "none"
    if affinity not in ("global", "local", "none"):
        raise ValueError(f"affinity must be 'global', 'local' or 'none', got {affinity!r}")
    if not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()         # one host sync; NaN fails too
    if not (-1e-3 <= low and high <= 1 + 1e-3):
        raise ValueError(f"images must be finite RGB in [0, 1] (not ImageNet-normalised, not 0..255), "
                         f"got values in [{low:.3g}, {high:.3g}]")
    with torch.autocast(device_type=images.device.type, enabled=False):
        images = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
        x = downsample(images, patch, size)                                   # eq (1)  (B, C, h, w)
        P, _, _ = spatial_fcm(x, n_clusters, m, spatial, max_iter, tol, seed, textbook, init,
                              early_exit)                                     # eqs (3)-(8)  (B, K, h, w)
        if affinity == "none":
            return P
        if affinity == "local":
            weights = local_colour_affinity(x, sigma, radius)             # eqs (9)-(11)  (B, (2r+1)^2, h, w)
            return local_feature_boost(weights, P)                            # eq (12)  (B, K, h, w)
        boosted = torch.empty_like(P)                                         # (B, K, h, w)
        for b in range(x.shape[0]):                   # one image's N x N affinity at a time: bounded memory
            # eqs (9)-(11): A (1, N, N), then eq (12); A is freed at the end of the line, before the
            # next image's (keeping it alive meanwhile made the CPU allocator map fresh pages: 1.3x slower)
            boosted[b:b + 1] = feature_boost(colour_affinity(x[b:b + 1], sigma), P[b:b + 1])
        return boosted
