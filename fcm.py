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
    F^l  = A P                                            eq (12)  feature_boost, local_feature_boost
                                                                   low_level_cue composes all of it

Eqs (9)-(11) are read in two ways (low_level_cue's `affinity`):
  "global": A over all pixel pairs of the grid, as eqs (9)-(11) print it (N x N);
  "local":  A only between "neighboring pixels" (Introduction): a (2r+1) x (2r+1) window.
Eq (12) uses A with its rows normalised (D^-1 A), so F^l stays a probability map.

Shapes: B images, C colour channels, h x w grid, N = h * w pixels (row-major), K clusters.
Inputs are checked once, in low_level_cue; the equation functions assume valid input.
Each public function pastes alone beside math, numpy, scipy, torch, torch.nn.functional as F
(plus the functions on its docstring's "needs:" line). The FCM cluster order is arbitrary (seeded);
il2vseg.py matches it to the head's clusters for the fusion of eq (13).
"""

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Eq (1): the image on the feature grid.
# ----------------------------------------------------------------------------------------------

def downsample(images, patch=8, size=None):
    """Bilinear downsampling of images (B, C, H, W) to the grid (B, C, H // patch, W // patch); eq (1).

    align_corners=False, no antialias (F.interpolate's defaults): each grid value interpolates the
    image at the centre of its cell. `size=(h, w)` overrides `patch`.
    """
    if size is None:
        size = (images.shape[2] // patch, images.shape[3] // patch)
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=False)                                     # eq (1)  (B, C, h, w)


# ----------------------------------------------------------------------------------------------
# Spatially constrained fuzzy clustering, eqs (3)-(8).
# ----------------------------------------------------------------------------------------------

def squared_distance(x, centres):
    """Squared colour distances d_ij^2 = ||x_i - v_j||^2 (B, K, h, w) of pixels x (B, C, h, w) to
    centres v (B, K, C): the d_ij under eq (3). From exact differences, so a pixel on a centre is
    exactly 0 away; memory B K C h w (meant for colours, C = 3).
    """
    difference = x[:, None] - centres[:, :, :, None, None].to(x.dtype)        # (B, K, C, h, w)
    return difference.square_().sum(dim=2)                                    # d^2  (B, K, h, w)


def fcm_objective(membership, d2, m=2.0):
    """FCM objective J (B,) = sum_i sum_j U_ij^m d_ij^2 of memberships U (B, K, h, w) and squared
    distances d2 (B, K, h, w); eq (3). Pass U' (eq 6) for the objective of the spatial iteration.
    """
    return (membership.pow(m) * d2).sum(dim=(1, 2, 3))                        # eq (3)  (B,)


def fuzzy_membership(d2, m=2.0, textbook=False):
    """Fuzzy memberships U (B, K, h, w) from squared distances d2 (B, K, h, w); eq (4) as printed,
    U_ij = (1/d_ij)^(1/(m-1)) / sum_k (1/d_ik)^(1/(m-1)). textbook=True uses d^2 for d (Bezdek's U,
    the minimiser of eq (3)); the printed U is the textbook one with fuzzifier 2m - 1, so the printed
    iteration is no exact descent of eq (3). Computed as a softmax of the logs (no power overflows
    as m -> 1); a pixel on a centre gets membership 1 there (shared between coinciding centres).
    """
    power = 2.0 if textbook else 1.0
    logits = d2.log().mul_(-power / (2.0 * (m - 1)))                         # log (1/d)^(p/(m-1))
    logits.nan_to_num_(posinf=torch.finfo(logits.dtype).max)                 # d = 0: +inf -> largest
    return torch.softmax(logits, dim=1)                                       # eq (4)  (B, K, h, w)


def spatial_information(membership):
    """Spatial information S (B, K, h, w) of memberships U (B, K, h, w); eq (5): the 3 x 3
    neighbourhood sum, the pixel included. Outside the image counts 0 (zero padding): a border
    pixel sums its in-image neighbours only.
    """
    padded = F.pad(membership, (1, 1, 1, 1))                                  # (B, K, h + 2, w + 2)
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]          # over k (rows)  (B, K, h, w + 2)
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]                   # eq (5), then l  (B, K, h, w)


def spatial_membership(membership, spatial):
    """Spatially updated memberships U' = U * S / sum_k U * S (B, K, h, w) of memberships U and
    spatial information S (eq 5), both (B, K, h, w); eq (6).
    """
    weighted = membership * spatial                                           # U_ij S_ij  (B, K, h, w)
    return weighted / weighted.sum(dim=1, keepdim=True)                       # eq (6)  (B, K, h, w)


def update_centres(x, membership, m=2.0, previous=None):
    """Cluster centres v_j = sum_i U'_ij^m x_i / sum_i U'_ij^m (B, K, C) of pixels x (B, C, h, w)
    and memberships U' (B, K, h, w); eq (7). A cluster whose weights are all 0 keeps `previous`
    (B, K, C) when given, else sits at 0.
    """
    weights = membership.to(x.dtype).pow(m).flatten(2)                        # U'^m  (B, K, N)
    numerator = torch.bmm(weights, x.flatten(2).transpose(1, 2))              # sum_i U'^m x_i  (B, K, C)
    denominator = weights.sum(dim=2, keepdim=True)                            # sum_i U'^m  (B, K, 1)
    if previous is None:
        return numerator / denominator.clamp_min(torch.finfo(x.dtype).tiny)   # eq (7)  (B, K, C)
    return torch.where(denominator > 0, numerator / denominator, previous.to(x.dtype))  # eq (7)


def cluster_probability(membership):
    """Cluster probabilities P = U' / sum_k U' (B, K, h, w) of memberships U' (B, K, h, w); eq (8).
    (U' of eq (6) already sums to 1 over K: this only removes rounding drift.)
    """
    return membership / membership.sum(dim=1, keepdim=True)                   # eq (8)  (B, K, h, w)


def initial_centres(x, n_clusters, seed=0, init="kmeans++", trials=1):
    """Initial centres (B, K, C) among the points of x (B, C, *spatial), seeded (not in the paper).

    Draws come from a CPU torch.Generator seeded by `seed`, the same for every image, so an image's
    centres depend on its own points and the seed only. "kmeans++": D^2 sampling (a uniform first
    point, then each with probability proportional to its squared distance to the nearest centre
    so far: a point on a centre is not drawn while another is left; for unit vectors (1, D, M) this
    is cosine k-means++). trials > 1: greedy k-means++ (as scikit-learn): each next centre is the best
    of `trials` such draws, the one that lowers the summed D^2 most. "random": K distinct points.
    """
    points = x.flatten(2)                                                     # (B, C, N)
    B, C, N = points.shape
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if init == "random":
        order = torch.rand(1, N, generator=generator).argsort(dim=1)          # (1, N) a permutation
        index = order[:, torch.arange(n_clusters) % N].to(x.device).expand(B, n_clusters)  # (B, K)
        return points.gather(2, index[:, None].expand(B, C, n_clusters)).transpose(1, 2)  # (B, K, C)
    uniforms = torch.rand(1, n_clusters, trials, generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(device=x.device, dtype=x.dtype).expand(B, n_clusters, trials)  # one draw for all images
    cdf = torch.arange(1, N + 1, device=x.device, dtype=x.dtype).expand(B, N)  # first draw: uniform
    centres, nearest = [], None
    for k in range(n_clusters):                       # K sequential draws, each batched over images
        tries = 1 if k == 0 else trials               # the first centre: one uniform draw
        if k > 0:
            cdf = nearest.cumsum(dim=1)                                       # D^2 cdf  (B, N)
        target = uniforms[:, k, :tries] * cdf[:, -1:]                         # (B, T)
        # the first index whose cdf reaches the target, counted (as searchsorted on the sorted cdf)
        index = (cdf[:, None, :] < target[:, :, None]).sum(dim=2)             # (B, T)
        candidates = points.gather(2, index[:, None].expand(B, C, tries))     # (B, C, T)
        squared = (points[:, :, None] - candidates[..., None]).square_().sum(dim=1)  # (B, T, N)
        potential = squared if k == 0 else torch.minimum(nearest[:, None], squared)  # D^2 with each candidate
        best = potential.sum(dim=2).argmin(dim=1)                             # (B,) the greedy choice
        centres.append(candidates.gather(2, best[:, None, None].expand(B, C, 1)))  # (B, C, 1)
        nearest = potential.gather(1, best[:, None, None].expand(B, 1, N))[:, 0]  # D^2 to the nearest (B, N)
    return torch.cat(centres, dim=2).transpose(1, 2)                          # (B, K, C)


@torch.no_grad()
def spatial_fcm(x, n_clusters, m=2.0, spatial=True, max_iter=20, tol=1e-3, seed=0, textbook=False,
                init="kmeans++", early_exit=True):
    """Spatially constrained fuzzy c-means on a finite grid x (B, C, h, w); eqs (3)-(8).

    Returns P (B, K, h, w) (eq 8, from the final centres), centres (B, K, C) (eq 7) and history
    (B, T): J (eq 3) of each iteration d -> U (4) -> S (5) -> U' (6) -> J (3) -> v (7).
    spatial=False skips eqs (5)-(6) (plain FCM); textbook: see fuzzy_membership; init, seed: see
    initial_centres. An image stops once no centre coordinate moved more than tol (its later
    history repeats its final J), so it never depends on its batch mates; early_exit=True ends the
    loop when all have stopped (a host sync per iteration), False always runs max_iter (for
    torch.compile), with the same results. No autograd, no autocast, float32 (float64 stays).
    needs: initial_centres, squared_distance, fuzzy_membership, spatial_information, spatial_membership,
        fcm_objective, update_centres, cluster_probability
    """
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

@torch.no_grad()
def colour_affinity(x, sigma=0.1):
    """Gaussian colour affinity A (B, N, N) between all pixel pairs of x (B, C, h, w); eqs (9)-(11):
    d_jk = ||x_j - x_k|| (eq 9), a_jk = exp(-d_jk^2 / (2 sigma^2)) (eq 10), A = [a_jk] (eq 11).
    Plain form: A = exp(-cdist(x, x)^2 / (2 sigma^2)). Run in place in one N x N buffer (no
    autograd), with affinities below 3e-38 (float32) raised to that: subnormals are slow on CPU.
    sigma in colour units (0.1 for RGB in [0, 1]: colours 0.1 apart get 0.61, 0.3 apart 0.011).
    """
    pixels = x.flatten(2).transpose(1, 2)                                     # (B, N, C)
    d2 = torch.cdist(pixels, pixels).square_()                                # eq (9), squared  (B, N, N)
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0        # exp(floor): 3e-38 in float32, not subnormal
    return d2.mul_(-0.5 / sigma**2).clamp_(min=floor).exp_()                  # eqs (10)-(11)  A  (B, N, N)


def feature_boost(affinity, probability):
    """Low-level cue F^l = D^-1 A P (B, K, h, w) of A (B, N, N) and P (B, K, h, w); eq (12).

    Eq (12) prints F^l = A P; A's rows are normalised first (D = diag(A 1)), so a pixel's F^l is
    the affinity-weighted average of the probability vectors: it sums to 1 over K, on the scale of
    the head's probabilities of eq (13) (unnormalised it grows with the number of similar pixels).
    """
    B, K, h, w = probability.shape
    p = probability.flatten(2).transpose(1, 2)                                # P  (B, N, K)
    f_low = (affinity @ p) / affinity.sum(dim=2, keepdim=True)                # eq (12)  D^-1 A P  (B, N, K)
    return f_low.transpose(1, 2).reshape(B, K, h, w)                          # (B, K, h, w)


# ----------------------------------------------------------------------------------------------
# ... or between neighbouring pixels only ("local").
# ----------------------------------------------------------------------------------------------

def local_colour_affinity(x, sigma=0.1, radius=3):
    """Gaussian colour affinity (eq 10) of each pixel of x (B, C, h, w) to the pixels of its
    (2r+1) x (2r+1) window -> weights (B, (2r+1)^2, h, w): the band of a banded A (eqs 9-11 between
    "neighboring pixels"). weights[b, o, i, j] pairs pixel (i, j) with (i + dy - r, j + dx - r),
    (dy, dx) = divmod(o, 2r + 1); outside the image the weight is 0. A radius >= max(h, w) - 1
    gives colour_affinity's A, rearranged.
    """
    B, C, h, w = x.shape
    side = 2 * radius + 1
    padded = F.pad(x, (radius,) * 4)                                          # (B, C, h+2r, w+2r)
    inside = F.pad(torch.ones_like(x[:1, 0]), (radius,) * 4)                 # 1 in the image  (1, h+2r, w+2r)
    weights = []
    for o in range(side * side):                      # loop over the window's offsets, not pixels
        dy, dx = divmod(o, side)
        neighbour = padded[:, :, dy:dy + h, dx:dx + w]                        # x at (i + dy - r, j + dx - r)
        squared = (x - neighbour).square_().sum(dim=1)                        # eq (9)  d_jk^2  (B, h, w)
        affinity = squared.mul_(-0.5 / sigma**2).exp_()                       # eq (10)  a_jk  (B, h, w)
        weights.append(affinity * inside[:, dy:dy + h, dx:dx + w])           # 0 outside the image
    return torch.stack(weights, dim=1)                                        # eq (11)  (B, (2r+1)^2, h, w)


def local_feature_boost(weights, probability):
    """Low-level cue F^l = D^-1 A P (B, K, h, w) for the banded A of local_colour_affinity; eq (12).

    weights (B, (2r+1)^2, h, w), P (B, K, h, w): F^l(i, j) = sum_o w_o P(i + dy - r, j + dx - r)
    / sum_o w_o, rows normalised as in feature_boost; one multiply-add of shifted views per offset.
    """
    B, K, h, w = probability.shape
    side = math.isqrt(weights.shape[1])
    radius = side // 2
    weights = weights.to(probability.dtype)
    padded = F.pad(probability, (radius,) * 4)                                # 0 outside  (B, K, h+2r, w+2r)
    boosted = torch.zeros_like(probability)                                   # (B, K, h, w)
    for o in range(side * side):                      # loop over the window's offsets, not pixels
        dy, dx = divmod(o, side)
        neighbour = padded[:, :, dy:dy + h, dx:dx + w]                        # P at (i + dy - r, j + dx - r)
        boosted.addcmul_(weights[:, o:o + 1], neighbour)                      # A P: += a_jk P_k
    return boosted / weights.sum(dim=1, keepdim=True)                         # eq (12)  D^-1 A P  (B, K, h, w)


# ----------------------------------------------------------------------------------------------
# The whole low-level cue, eqs (1), (3)-(12).
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def low_level_cue(images, n_clusters, m=2.0, sigma=0.1, patch=8, affinity="local", radius=3, spatial=True,
                  max_iter=20, tol=1e-3, seed=0, size=None, textbook=False, init="kmeans++", early_exit=True):
    """Low-level cue F^l (B, K, H // patch, W // patch) of images (B, 3, H, W) in [0, 1]; eqs (1)-(12).

    x = downsample (eq 1), P = spatial_fcm of x (eqs 3-8), F^l = D^-1 A P (eq 12) with A (eqs 9-11)
    "local" (a (2r+1)^2 window, r = radius), "global" (all pixel pairs, one image's N x N at a time)
    or "none" (F^l = P). Checks the images (one host sync) and `affinity`; m, sigma, radius,
    max_iter, tol are the caller's to check. No autograd, no autocast, float32 (float64 stays).
    needs: downsample, spatial_fcm, colour_affinity, feature_boost, local_colour_affinity,
        local_feature_boost
    """
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point()
            and images.numel() > 0):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty 4-D floating-point tensor (B, 3, H, W), got {got}")
    if affinity not in ("global", "local", "none"):
        raise ValueError(f"affinity must be 'global', 'local' or 'none', got {affinity!r}")
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
            # eqs (9)-(11): A (1, N, N), then eq (12); A is freed at the end of the line
            boosted[b:b + 1] = feature_boost(colour_affinity(x[b:b + 1], sigma), P[b:b + 1])
        return boosted
