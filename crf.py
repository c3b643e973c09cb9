"""Dense CRF post-processing of the evaluation (the paper: "we apply Conditional Random Fields (CRF)
(Krähenbühl and Koltun 2011) to post-process the predicted results"), in plain PyTorch.

What it computes (as Krähenbühl's densecrf 2 behind pydensecrf: densecrf.cpp, pairwise.cpp,
labelcompatibility.cpp, permutohedral.cpp), with the peers' constants (STEGO, HP, SmooSeg):
- Unary = -log(clip(p, 1e-5, 1)), RGB in 0..255.
- Two Gaussian kernels k(i, j) = exp(-|f_i - f_j|^2 / 2), the sum over j including j = i:
  smoothness f = (x/1, y/1) with Potts weight 3, appearance f = (x/67, y/67, r/3, g/3, b/3) with
  Potts weight 4 (x the column, y the row).
- Symmetric normalisation (pydensecrf's default): n = 1 / sqrt(K 1 + 1e-20), message m = n * K(n * Q);
  a constant factor in K cancels.
- Potts: logits = -unary + sum_terms w * m (the textbook [l != l'] form differs by a term that does
  not depend on the label and cancels in the softmax).
- Mean field: Q0 = softmax(-unary), Q <- softmax(logits), 10 steps; the result is the last Q.

Two implementations with the same signature: `dense_crf_exact` sums the kernels over all pixel
pairs in chunks (O(N^2), a reference for small images); `dense_crf` filters the smoothness kernel
with a separable convolution truncated at 4 sigma (a lattice above 4 px) and the appearance kernel
with a vectorised permutohedral lattice (Adams, Baek & Davis 2010) built as the reference C++ builds
it, so it has the reference's approximation. How close they are: docs/evaluation.md; how fast: docs/speed.md.

Every public function pastes alone (math, torch and F imported, plus the functions on its "needs:"
line); the limits are keyword arguments.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# The pieces shared by both versions
# ---------------------------------------------------------------------------------------------

def unary_from_probs(probs):
    """Unary energy -log(clip(p, 1e-5, 1)) as pydensecrf's unary_from_softmax. (B, K, H, W) -> same."""
    return -torch.log(probs.clamp(1e-5, 1.0))


def pixel_features(images, sxy, srgb=None):
    """Scaled pixel features (x/sxy, y/sxy), or (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) with srgb.

    x is the column, y the row (as densecrf). images (B, 3, H, W) float in 0..255 -> (B, H, W, d), d = 2 or 5.
    """
    B, _, H, W = images.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=images.device, dtype=torch.float32),
                            torch.arange(W, device=images.device, dtype=torch.float32), indexing="ij")
    position = torch.stack([xs, ys], dim=2).expand(B, H, W, 2) / sxy            # (B, H, W, 2)
    if srgb is None:
        return position.contiguous()
    return torch.cat([position, images.permute(0, 2, 3, 1) / srgb], dim=3)      # (B, H, W, 5)


def mean_field(unary, kernels, iterations):
    """Mean-field inference with Potts compatibilities (K&K 2011, Algorithm 1), labels last.

    unary (B, H, W, K); kernels: list of (compat, kernel_filter), kernel_filter mapping (B, H, W, C)
    to sum_j k(i, j) v_j (self term included). Returns Q (B, H, W, K) after `iterations` updates.
    """
    # Symmetric normalisation per kernel: n = 1 / sqrt(K 1 + 1e-20), computed once.
    ones = torch.ones_like(unary[..., :1])                                      # (B, H, W, 1)
    terms = []
    for compat, kernel_filter in kernels:
        if compat != 0:
            norm = torch.rsqrt(kernel_filter(ones) + 1e-20)                     # (B, H, W, 1)
            terms.append((norm, compat * norm, kernel_filter))

    Q = torch.softmax(-unary, dim=-1)                                           # Q0, (B, H, W, K)
    for _ in range(iterations):
        # Potts update: Q <- softmax(-unary + sum_terms compat * n * K(n * Q))
        logits = -unary                                                         # (B, H, W, K)
        for norm, compat_norm, kernel_filter in terms:
            logits = torch.addcmul(logits, compat_norm, kernel_filter(norm * Q))
        Q = torch.softmax(logits, dim=-1)                                       # (B, H, W, K)
    return Q


def run_crf(probs, kernels, iterations):
    """Unary from probs (B, K, H, W) float32, mean field, back to (B, K, H, W) contiguous.

    needs: unary_from_probs, mean_field
    """
    unary = unary_from_probs(probs).permute(0, 2, 3, 1).contiguous()            # (B, H, W, K)
    Q = mean_field(unary, kernels, iterations)                                  # (B, H, W, K)
    return Q.permute(0, 3, 1, 2).contiguous()                                   # (B, K, H, W)


# ---------------------------------------------------------------------------------------------
# Exact version: all pairs, chunked
# ---------------------------------------------------------------------------------------------

def exact_gaussian_filter(features, chunk_entries=2 ** 22, cache_entries=2 ** 25):
    """Return kernel_filter: v -> sum_j exp(-|f_i - f_j|^2 / 2) v_j over ALL pixels j (self included).

    features (B, H, W, d); the filter maps (B, H, W, C) -> same. Kernel rows come in chunks of at
    most `chunk_entries` entries (at least one row), kept if all fit in `cache_entries`, else
    recomputed at every call: O(N^2) time, bounded memory.
    """
    B, H, W, d = features.shape
    N = H * W
    feats = features.reshape(B, N, d)                                           # (B, N, d)
    chunk = max(1, int(chunk_entries) // N)
    starts = range(0, N, chunk)

    def kernel_rows(b, start):
        # exact pairwise distances (no |a|^2 + |b|^2 - 2ab expansion, to stay accurate in float32)
        dist = torch.cdist(feats[b, start:start + chunk], feats[b],
                           compute_mode="donot_use_mm_for_euclid_dist")         # (c, N)
        return torch.exp(dist.square_().mul_(-0.5))                             # (c, N)

    cache = None
    if B * N * N <= cache_entries:
        cache = {(b, start): kernel_rows(b, start) for b in range(B) for start in starts}

    def kernel_filter(values):
        vals = values.reshape(B, N, -1)                                         # (B, N, C)
        out = torch.empty_like(vals)                                            # (B, N, C)
        for b in range(B):
            for start in starts:
                rows = cache[(b, start)] if cache is not None else kernel_rows(b, start)
                out[b, start:start + chunk] = rows @ vals[b]                    # (c, C)
        return out.view(values.shape)

    return kernel_filter


def dense_crf_exact(images, probs, iterations=10, sxy_gauss=1.0, compat_gauss=3.0,
                    sxy_bilateral=67.0, srgb=3.0, compat_bilateral=4.0, *,
                    chunk_entries=2 ** 22, cache_entries=2 ** 25):
    """Dense CRF with exact all-pairs Gaussian kernels: the reference for small images.

    images (B, 3, H, W) RGB 0..255, probs (B, K, H, W) probabilities, same device -> refined
    probabilities (B, K, H, W) float32. O((H W)^2) per iteration; chunk_entries, cache_entries
    are the memory limits of `exact_gaussian_filter` (same result).
    needs: pixel_features, exact_gaussian_filter, run_crf
    """
    images, probs = images.float(), probs.float()                               # uint8 images too
    kernels = [
        (compat_gauss, exact_gaussian_filter(pixel_features(images, sxy_gauss),
                                             chunk_entries, cache_entries)),
        (compat_bilateral, exact_gaussian_filter(pixel_features(images, sxy_bilateral, srgb),
                                                 chunk_entries, cache_entries)),
    ]
    return run_crf(probs, kernels, iterations)


# ---------------------------------------------------------------------------------------------
# Fast version: separable convolution (smoothness) + permutohedral lattice (appearance)
# ---------------------------------------------------------------------------------------------

def separable_gaussian_filter(sxy):
    """Return kernel_filter: v -> sum_j exp(-|p_i - p_j|^2 / (2 sxy^2)) v_j over the pixels j within
    4 sxy along each axis (self included; the rest of the sum is < 1e-4 of it). (B, H, W, C) -> same.

    The Gaussian is separable: a 1-D depthwise convolution along x, then y, with zero padding
    (no pixels outside the image).
    """
    radius = max(1, math.ceil(4 * sxy))

    def kernel_filter(values):
        B, H, W, C = values.shape
        offsets = torch.arange(-radius, radius + 1, device=values.device, dtype=values.dtype)
        taps = torch.exp(-0.5 * (offsets / sxy) ** 2)                           # (2r+1,)
        x = values.permute(0, 3, 1, 2)                                          # (B, C, H, W) view
        x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, radius), groups=C)
        x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(radius, 0), groups=C)
        return x.permute(0, 2, 3, 1).contiguous()                               # (B, H, W, C)

    return kernel_filter


def sparse_csr(crow, columns, values, size):
    """torch.sparse_csr_tensor without torch's "sparse CSR support is in beta state" warning."""
    # imported here, not at the top, so that the function also works pasted alone (with torch only)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size, check_invariants=False)


def csr_from_rows(columns, values, n_columns):
    """Sparse CSR matrix (R, n_columns) whose row r holds values[r, k] at columns[r, k].

    columns, values (R, k); column -1 is an empty slot, no column repeats within a row.
    needs: sparse_csr
    """
    columns, order = torch.sort(columns, dim=1)                                 # CSR wants sorted columns
    values = torch.gather(values, 1, order)
    filled = columns >= 0                                                       # (R, k)
    crow = torch.cat([filled.new_zeros(1, dtype=torch.long), filled.sum(1).cumsum(0)])   # (R+1,)
    return sparse_csr(crow, columns[filled], values[filled], (columns.shape[0], n_columns))


def permutohedral_lattice(features):
    """Permutohedral lattice of all pixels of a batch (densecrf's Permutohedral::init), as the
    sparse matrices of out = slice @ blur_d @ ... @ blur_0 @ splat @ values.

    features (B, H, W, d) scaled; P = B*H*W pixels, M lattice points. splat (M, P): barycentric
    weights; blurs: d+1 (M, M), v <- v + (v[plus] + v[minus]) / 2 along each lattice direction;
    slice (P, M): the transpose of splat. The image is part of each point's key.
    needs: sparse_csr, csr_from_rows
    """
    B, H, W, d = features.shape
    P = B * H * W
    device = features.device
    f = features.reshape(P, d)                                                   # (P, d)

    # Elevate to the hyperplane sum(y) = 0 in d+1 dims: y = E f (Adams et al. 2010, p.5),
    # with the reference's scaling so the lattice blur approximates a Gaussian of std 1.
    inv_std_dev = math.sqrt(2.0 / 3.0) * (d + 1)
    i = torch.arange(d, device=device, dtype=torch.float32)
    scale = inv_std_dev / torch.sqrt((i + 1) * (i + 2))                          # (d,)
    cf = f * scale                                                               # (P, d)
    # suffix[:, j] = sum_{k >= j} cf[:, k] for j = 0..d (suffix[:, d] = 0)
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), torch.zeros_like(cf[:, :1])], dim=1)   # (P, d+1)
    j = torch.arange(1, d + 1, device=device, dtype=torch.float32)
    elevated = suffix.clone()                                                    # (P, d+1)
    elevated[:, 1:] -= j * cf                                                    # y_j = S_j - j cf_{j-1}

    # Nearest remainder-0 lattice point: round each coordinate to a multiple of d+1
    # (the SSE code path of the reference: round to nearest).
    rounded = torch.round(elevated / (d + 1))                                    # (P, d+1)
    rem0 = rounded * (d + 1)                                                     # (P, d+1)
    coordinate_sum = rounded.sum(dim=1, keepdim=True).long()                     # (P, 1)

    # Rank of each coordinate of the residual (0 = largest; ties: the earlier coordinate first,
    # as the reference's pairwise comparisons): a stable descending sort, inverted.
    order = torch.sort(elevated - rem0, dim=1, descending=True, stable=True).indices   # (P, d+1)
    positions = torch.arange(d + 1, device=device).expand(P, d + 1)
    rank = torch.empty_like(order).scatter_(1, order, positions) + coordinate_sum      # (P, d+1)

    # Bring the point back onto the plane if the rounded coordinates do not sum to 0
    wrap = (rank < 0).long() - (rank > d).long()                                 # (P, d+1)
    rem0 = rem0 + (d + 1) * wrap
    rank = rank + (d + 1) * wrap                                                 # (P, d+1) in 0..d

    # Barycentric coordinates (p.10 of Adams et al. 2010): the weights of the d+1 simplex corners
    v = (elevated - rem0) / (d + 1)                                              # (P, d+1)
    barycentric = torch.zeros(P, d + 2, device=device, dtype=torch.float32)
    barycentric.scatter_add_(1, d - rank, v)
    barycentric.scatter_add_(1, d - rank + 1, -v)
    weight = barycentric[:, :d + 1].clone()                                      # (P, d+1)
    weight[:, 0] += 1.0 + barycentric[:, d + 1]

    # A lattice point is keyed by (image, its first d coordinates; the last one is minus their sum),
    # packed into one int64 (mixed radix). The image is part of the key so the images of a batch
    # never share points. Corners and their blur neighbours lie within 2(d+1) of rem0.
    origin = rem0[:, :d].long()                                                  # (P, d)
    low = origin.min(dim=0).values - 2 * (d + 1)                                 # (d,)
    span = (origin.max(dim=0).values - low + 2 * (d + 1) + 1).tolist()
    if math.prod(span) * B >= 2 ** 62:
        raise ValueError("dense_crf: the lattice keys do not fit in 64 bits (sxy/srgb too small for the "
                         "feature range, or too large a batch); use larger sxy/srgb or smaller batches")
    stride = torch.tensor([math.prod(span[k + 1:]) for k in range(d)], device=device)   # (d,)
    image = torch.arange(B, device=device).repeat_interleave(H * W)              # (P,)
    base = ((origin - low) * stride).sum(1) + image * math.prod(span)            # (P,)
    # Corner r of the simplex: key_k = rem0_k + canonical[r][rank_k], with canonical[r][k] = r if
    # k <= d - r else r - (d+1)
    corner = torch.arange(d + 1, device=device).view(1, -1, 1)                   # (1, d+1, 1)
    wraps = (rank[:, None, :d] > d - corner).long()                              # (P, d+1, d)
    codes = (base.view(-1, 1) + corner.view(1, -1) * stride.sum()
             - (d + 1) * (wraps * stride).sum(2))                                # (P, d+1)

    # Lattice points = distinct codes. One stable sort gives the points (sorted), the point of
    # each (pixel, corner) and the splat matrix's entries already ordered by point, then pixel.
    sorted_codes, entry = torch.sort(codes.reshape(-1), stable=True)             # (P*(d+1),)
    is_new = torch.ones_like(sorted_codes, dtype=torch.bool)
    is_new[1:] = sorted_codes[1:] != sorted_codes[:-1]
    point_of_sorted = is_new.long().cumsum(0) - 1                                # (P*(d+1),)
    point_codes = sorted_codes[is_new]                                           # (M,) ascending
    n_points = point_codes.shape[0]
    vertex = torch.empty_like(point_of_sorted)
    vertex[entry] = point_of_sorted                                              # (P*(d+1),)

    counts = torch.bincount(point_of_sorted, minlength=n_points)                 # (M,)
    splat = sparse_csr(torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                       torch.div(entry, d + 1, rounding_mode="floor"),           # pixel of each entry
                       weight.reshape(-1)[entry], (n_points, P))                 # (M, P)
    slice_ = csr_from_rows(vertex.view(P, d + 1), weight, n_points)             # (P, M)

    # Blur neighbours along lattice direction k: all coordinates -1 and coordinate k +d ("plus"),
    # and the opposite ("minus"); direction d changes only the implicit last coordinate.
    # In packed form that is code +- delta_k; found by binary search among the points.
    step = -torch.ones(d + 1, d, dtype=torch.long, device=device)                # (d+1, d)
    step[torch.arange(d), torch.arange(d)] = d
    delta = (step * stride).sum(1)                                               # (d+1,)

    def find(target):                                                            # (M,) -> (M,), -1 absent
        index = torch.searchsorted(point_codes, target).clamp_(max=n_points - 1)
        return torch.where(point_codes[index] == target, index, -1)

    point = torch.arange(n_points, device=device)                                # (M,)
    blur_weights = torch.tensor([0.5, 1.0, 0.5], device=device).expand(n_points, 3)
    blurs = []                                                                   # d+1 x (M, M)
    for k in range(d + 1):
        neighbours = torch.stack([find(point_codes + delta[k]), point, find(point_codes - delta[k])], 1)
        blurs.append(csr_from_rows(neighbours, blur_weights, n_points))          # (M, M)
    return {"splat": splat, "blurs": blurs, "slice": slice_}


def lattice_filter(features):
    """Return kernel_filter: v -> approx. sum_j exp(-|f_i - f_j|^2 / 2) v_j, by splat - blur - slice
    on the permutohedral lattice (permutohedral.cpp seqCompute), built once here.

    features (B, H, W, d); (B, H, W, C) -> same. The reference's constant alpha is left out (it
    cancels in the symmetric normalisation).
    needs: permutohedral_lattice
    """
    lattice = permutohedral_lattice(features)

    def kernel_filter(values):
        rows = values.reshape(-1, values.shape[-1])                             # (P, C)
        grid = lattice["splat"] @ rows                                          # (M, C)
        for blur in lattice["blurs"]:
            grid = blur @ grid                                                  # (M, C)
        return (lattice["slice"] @ grid).view(values.shape)                     # (B, H, W, C)

    return kernel_filter


def dense_crf(images, probs, iterations=10, sxy_gauss=1.0, compat_gauss=3.0,
              sxy_bilateral=67.0, srgb=3.0, compat_bilateral=4.0, *, max_conv_sxy=4.0):
    """Fast dense CRF (Krähenbühl & Koltun 2011), the peers' pydensecrf constants as defaults.

    images (B, 3, H, W) RGB 0..255, probs (B, K, H, W) probabilities, same device -> refined
    probabilities (B, K, H, W) float32. Smoothness: separable convolution (a lattice when
    sxy_gauss > max_conv_sxy); appearance: permutohedral lattice.
    needs: pixel_features, separable_gaussian_filter, lattice_filter, run_crf
    """
    images, probs = images.float(), probs.float()                               # uint8 images too
    if sxy_gauss <= max_conv_sxy:
        smooth_filter = separable_gaussian_filter(sxy_gauss)
    else:
        smooth_filter = lattice_filter(pixel_features(images, sxy_gauss))
    kernels = [
        (compat_gauss, smooth_filter),
        (compat_bilateral, lattice_filter(pixel_features(images, sxy_bilateral, srgb))),
    ]
    return run_crf(probs, kernels, iterations)
