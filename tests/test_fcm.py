"""Tests for fcm.py: every equation (1, 3-12) against a slow float64 loop reference, each public
function pasted alone, and the properties the paper states (memberships sum to 1, spatial FCM
removes isolated noise, F_l = A P). Each test names the one-line mistake it is there to catch."""

import functools
import inspect
import itertools
import math

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fcm
from pasting import paste_alone


# ----------------------------------------------------------------------------------------------
# Slow, obviously correct references (python loops over pixels, float64)
# ----------------------------------------------------------------------------------------------

def ref_bilinear(image, out_h, out_w):
    """Bilinear resize of one image (C, H, W), align_corners=False, no antialias (PyTorch's rule:
    source = (dest + 0.5) * in / out - 0.5, clamped at 0; the upper neighbour clamped at the edge)."""
    C, H, W = image.shape
    out = torch.zeros(C, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            sy, sx = max((i + 0.5) * H / out_h - 0.5, 0.0), max((j + 0.5) * W / out_w - 0.5, 0.0)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
            ly, lx = sy - y0, sx - x0
            for c in range(C):
                out[c, i, j] = ((1 - ly) * (1 - lx) * image[c, y0, x0] + (1 - ly) * lx * image[c, y0, x1]
                                + ly * (1 - lx) * image[c, y1, x0] + ly * lx * image[c, y1, x1])
    return out


def colour(x, b, i, j):
    return [float(v) for v in x[b, :, i, j]]


def dist2(p, q):
    return sum((a - c) ** 2 for a, c in zip(p, q))


def cells(h, w):
    return [(i, j) for i in range(h) for j in range(w)]


def ref_squared_distance(x, centres):
    """d_ij^2 = ||x_i - v_j||^2 as (B, K, h, w)."""
    B, C, h, w = x.shape
    return torch.tensor([[[[dist2(colour(x, b, i, j), centres[b, k].tolist()) for j in range(w)] for i in range(h)]
                          for k in range(centres.shape[1])] for b in range(B)], dtype=torch.float64)


def ref_membership(d2, m, power=1.0):
    """Eq (4) literally: U_ij = (1/d_ij)^(p/(m-1)) / sum_k (1/d_ik)^(p/(m-1)); p = 1 as printed."""
    B, K, h, w = d2.shape
    U = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for i, j in cells(h, w):
            d = [math.sqrt(float(d2[b, k, i, j])) for k in range(K)]
            if 0.0 in d:          # limit d_ij -> 0: all membership to the centre(s) the pixel sits on
                inv = [float(dk == 0.0) for dk in d]
            else:
                inv = [(1.0 / dk) ** (power / (m - 1)) for dk in d]
            for k in range(K):
                U[b, k, i, j] = inv[k] / sum(inv)
    return U


def ref_objective(U, d2, m):
    """Eq (3): J = sum_i sum_j U_ij^m d_ij^2, per image."""
    return torch.tensor([sum(float(u) ** m * float(d) for u, d in zip(U[b].flatten(), d2[b].flatten()))
                         for b in range(U.shape[0])], dtype=torch.float64)


def ref_spatial_information(U):
    """Eq (5): sum of U over the in-image 3 x 3 neighbourhood (pixel included)."""
    B, K, h, w = U.shape
    S = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            for i, j in cells(h, w):
                S[b, k, i, j] = sum(float(U[b, k, i + di, j + dj]) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                                    if 0 <= i + di < h and 0 <= j + dj < w)
    return S


def ref_normalise_over_k(V):
    """V_ij / sum_k V_ik per pixel: eq (6) on U * S, eq (8) on U'."""
    B, K, h, w = V.shape
    out = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for i, j in cells(h, w):
            total = sum(float(V[b, k, i, j]) for k in range(K))
            for k in range(K):
                out[b, k, i, j] = float(V[b, k, i, j]) / total
    return out


def ref_centres(x, U, m):
    """Eq (7): v_j = sum_i U_ij^m x_i / sum_i U_ij^m."""
    B, C, h, w = x.shape
    V = torch.zeros(B, U.shape[1], C, dtype=torch.float64)
    for b in range(B):
        for k in range(U.shape[1]):
            weights = [(float(U[b, k, i, j]) ** m, colour(x, b, i, j)) for i, j in cells(h, w)]
            for c in range(C):
                V[b, k, c] = sum(wt * p[c] for wt, p in weights) / sum(wt for wt, _ in weights)
    return V


def ref_affinity(x, sigma):
    """Eqs (9)-(11): a_jk = exp(-||x_j - x_k||^2 / (2 sigma^2)) over all pixel pairs (B, N, N)."""
    B, C, h, w = x.shape
    pix = [[colour(x, b, i, j) for i, j in cells(h, w)] for b in range(B)]
    return torch.tensor([[[math.exp(-dist2(p, q) / (2 * sigma * sigma)) for q in pix[b]] for p in pix[b]]
                         for b in range(B)], dtype=torch.float64)


def ref_boost(A, P):
    """Eq (12) with A's rows normalised: F_j = sum_l a_jl P_l / sum_l a_jl."""
    B, K, h, w = P.shape
    F = [[[sum(float(a) * float(p) for a, p in zip(A[b, j], P[b, k].flatten())) / float(A[b, j].sum())
           for j in range(h * w)] for k in range(K)] for b in range(B)]
    return torch.tensor(F, dtype=torch.float64).reshape(B, K, h, w)


def ref_local_affinity(x, sigma, r):
    """Eqs (9)-(10) on the (2r+1)^2 window: weights[b, (dy+r)(2r+1) + dx+r, i, j], 0 outside the image."""
    B, C, h, w = x.shape
    W = torch.zeros(B, (2 * r + 1) ** 2, h, w, dtype=torch.float64)
    for b in range(B):
        for i, j in cells(h, w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if 0 <= i + dy < h and 0 <= j + dx < w:
                        d2 = dist2(colour(x, b, i, j), colour(x, b, i + dy, j + dx))
                        W[b, (dy + r) * (2 * r + 1) + dx + r, i, j] = math.exp(-d2 / (2 * sigma * sigma))
    return W


def ref_local_boost(W, P):
    """Eq (12) on the band: F(i, j) = sum_o w_o P(i + dy, j + dx) / sum_o w_o."""
    B, K, h, w = P.shape
    side = math.isqrt(W.shape[1])
    F = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for i, j in cells(h, w):
            for k in range(K):
                terms = [(float(W[b, o, i, j]), i + o // side - side // 2, j + o % side - side // 2)
                         for o in range(side * side)]
                F[b, k, i, j] = (sum(wt * float(P[b, k, y, z]) for wt, y, z in terms if 0 <= y < h and 0 <= z < w)
                                 / sum(wt for wt, _, _ in terms))
    return F


def ref_fcm(x, centres, m, spatial, iterations):
    """The whole iteration from given initial centres, composed from the loop references."""
    history = []
    for _ in range(iterations + 1):
        d2 = ref_squared_distance(x, centres)
        U = ref_membership(d2, m)
        if spatial:
            U = ref_normalise_over_k(U * ref_spatial_information(U))
        if len(history) == iterations:
            return ref_normalise_over_k(U), centres, torch.stack(history, dim=1)
        history.append(ref_objective(U, d2, m))
        centres = ref_centres(x, U, m)


def random_grid(shape=(2, 3, 5, 4), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_membership(shape=(2, 4, 5, 4), seed=1):
    U = random_grid(shape, seed) + 0.05
    return U / U.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Each equation against its loop reference
# ----------------------------------------------------------------------------------------------

def test_downsample_eq1_matches_loop_bilinear():      # catches align_corners=True / antialias / W and H swapped
    images = random_grid((2, 3, 16, 24))
    expected = torch.stack([ref_bilinear(im, 2, 3) for im in images])
    torch.testing.assert_close(fcm.downsample(images, patch=8), expected, rtol=1e-12, atol=1e-12)
    images = random_grid((1, 3, 10, 13), seed=3)       # a grid that is no integer fraction of the image
    torch.testing.assert_close(fcm.downsample(images, size=(3, 5)), ref_bilinear(images[0], 3, 5)[None],
                               rtol=1e-12, atol=1e-12)


def test_squared_distance_is_exact():                 # catches a missing square / the rounding expansion
    x, centres = random_grid(), random_grid((2, 4, 3), seed=5)
    torch.testing.assert_close(fcm.squared_distance(x, centres), ref_squared_distance(x, centres),
                               rtol=1e-12, atol=1e-14)
    on_pixel = x[:, :, 1, 2][:, None].float()          # a centre on pixel (1, 2): exactly 0 there
    assert fcm.squared_distance(x.float(), on_pixel)[:, 0, 1, 2].eq(0).all()


@pytest.mark.parametrize("m", [1.5, 2.0, 3.0])
def test_fuzzy_membership_eq4_as_printed_and_textbook(m):   # catches d^2 for d / a wrong sign / 1/(m-1)
    d2 = fcm.squared_distance(random_grid(), random_grid((2, 4, 3), seed=5))
    U = fcm.fuzzy_membership(d2, m)
    torch.testing.assert_close(U, ref_membership(d2, m), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U.sum(dim=1), torch.ones(2, 5, 4, dtype=torch.float64))
    textbook = fcm.fuzzy_membership(d2, m, textbook=True)
    torch.testing.assert_close(textbook, ref_membership(d2, m, power=2.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U, fcm.fuzzy_membership(d2, 2 * m - 1, textbook=True))  # printed m = textbook 2m - 1


def test_fuzzy_membership_pixel_on_a_centre_gets_one_and_m_near_one_does_not_overflow():
    x = random_grid((1, 3, 3, 3))
    centres = torch.stack([x[0, :, 1, 2], x[0, :, 0, 0], torch.full((3,), 0.5, dtype=torch.float64)])[None]
    d2 = fcm.squared_distance(x, centres)
    for m in (1.001, 1.05, 2.0, 10.0):                # catches powers computed directly (inf / inf = NaN)
        U = fcm.fuzzy_membership(d2, m)
        assert torch.isfinite(U).all()
        assert U[0, 0, 1, 2] == 1 and U[0, 1:, 1, 2].eq(0).all()
        assert U[0, 1, 0, 0] == 1 and U[0, [0, 2], 0, 0].eq(0).all()
        torch.testing.assert_close(U.sum(dim=1), torch.ones(1, 3, 3, dtype=torch.float64))
    assert fcm.fuzzy_membership(d2, 1.001).argmax(dim=1).equal(d2.argmin(dim=1))    # m -> 1: hard assignment
    two = fcm.fuzzy_membership(fcm.squared_distance(x, torch.stack([x[0, :, 1, 1]] * 2)[None]))
    assert two[0, :, 1, 1].tolist() == [0.5, 0.5]      # two coinciding centres share the pixel equally


def test_fcm_objective_eq3():                         # catches U instead of U^m / d instead of d^2
    d2 = fcm.squared_distance(random_grid(), random_grid((2, 4, 3), seed=5))
    U = random_membership()
    for m in (1.5, 2.0):
        torch.testing.assert_close(fcm.fcm_objective(U, d2, m), ref_objective(U, d2, m), rtol=1e-10, atol=1e-12)


def test_spatial_information_eq5_zero_padded_borders():   # catches replicate padding / a 2x2 window
    U = random_membership()
    torch.testing.assert_close(fcm.spatial_information(U), ref_spatial_information(U), rtol=1e-12, atol=1e-12)
    ones = fcm.spatial_information(torch.ones(1, 1, 4, 5, dtype=torch.float64))
    assert ones[0, 0, 0, 0] == 4 and ones[0, 0, 0, 2] == 6 and ones[0, 0, 2, 2] == 9


def test_spatial_membership_eq6_and_probability_eq8():   # catches a sum over pixels, not clusters
    U = random_membership()
    S = fcm.spatial_information(U)
    U2 = fcm.spatial_membership(U, S)
    torch.testing.assert_close(U2, ref_normalise_over_k(U * S), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U2.sum(dim=1), torch.ones(2, 5, 4, dtype=torch.float64))
    torch.testing.assert_close(fcm.cluster_probability(U * 3), ref_normalise_over_k(U * 3), rtol=1e-12, atol=1e-12)


def test_update_centres_eq7():                        # catches U instead of U^m / a sum over clusters
    x, U = random_grid(), random_membership()
    for m in (1.5, 2.0, 3.0):
        torch.testing.assert_close(fcm.update_centres(x, U, m), ref_centres(x, U, m), rtol=1e-10, atol=1e-12)
    U[:, 0] = 0                                        # a cluster with no weight keeps its previous centre
    previous = torch.full((2, 4, 3), 0.25, dtype=torch.float64)
    assert fcm.update_centres(x, U, 2.0, previous=previous)[:, 0].eq(0.25).all()
    assert fcm.update_centres(x, U, 2.0)[:, 0].eq(0).all()


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_colour_affinity_eqs9_11(sigma):              # catches sigma for sigma^2 / a missing 2 / d for d^2
    x = random_grid((2, 3, 3, 4))
    A = fcm.colour_affinity(x, sigma)
    torch.testing.assert_close(A, ref_affinity(x, sigma), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fcm.colour_affinity(x.float(), sigma), A.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(A.diagonal(dim1=1, dim2=2), torch.ones(2, 12, dtype=torch.float64))  # a_jj = 1
    far = torch.zeros(1, 3, 1, 2)
    far[..., 1] = 0.8                                  # d^2 = 1.92: exp(-96) = 2e-42 is subnormal: raised
    A = fcm.colour_affinity(far, 0.1)
    assert (A >= torch.finfo(A.dtype).tiny).all() and A.min() < 1e-37


def test_feature_boost_eq12_rows_normalised():        # catches A^T P / unnormalised rows / P A
    x, P = random_grid((2, 3, 3, 4)), random_membership((2, 5, 3, 4))
    A = ref_affinity(x, 0.3)
    F = fcm.feature_boost(A, P)
    torch.testing.assert_close(F, ref_boost(A, P), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.sum(dim=1), torch.ones(2, 3, 4, dtype=torch.float64))
    torch.testing.assert_close(fcm.feature_boost(A / A.sum(dim=2, keepdim=True), P), F)   # idempotent
    identity = torch.eye(12, dtype=torch.float64).expand(2, 12, 12)
    torch.testing.assert_close(fcm.feature_boost(identity, P), P)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_local_colour_affinity_and_boost_match_loops(radius):   # catches a flipped offset / padding as black
    x, P = random_grid((2, 3, 4, 5)), random_membership((2, 3, 4, 5))
    W = fcm.local_colour_affinity(x, 0.3, radius)
    assert W.shape == (2, (2 * radius + 1) ** 2, 4, 5)
    torch.testing.assert_close(W, ref_local_affinity(x, 0.3, radius), rtol=1e-10, atol=1e-12)
    F = fcm.local_feature_boost(W, P)
    torch.testing.assert_close(F, ref_local_boost(W, P), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.sum(dim=1), torch.ones(2, 4, 5, dtype=torch.float64))
    if radius == 0:
        torch.testing.assert_close(F, P)               # only the pixel itself


def test_local_with_a_window_covering_the_grid_equals_global():  # catches the two readings drifting apart
    images = random_grid((2, 3, 24, 32), seed=4)
    for sigma in (0.1, 0.3):
        glob = fcm.low_level_cue(images, 4, sigma=sigma, affinity="global")
        local = fcm.low_level_cue(images, 4, sigma=sigma, affinity="local", radius=3)
        torch.testing.assert_close(local, glob, rtol=1e-12, atol=1e-12)   # 3 x 4 grid: radius 3 covers it
        assert not torch.allclose(fcm.low_level_cue(images, 4, sigma=sigma, affinity="local", radius=1), glob)


def test_spatial_fcm_matches_loop_iteration():        # catches J after the update / U instead of U' in eq (7)
    x = random_grid()
    init = fcm.initial_centres(x, 3, seed=7)
    for spatial in (False, True):
        P, centres, history = fcm.spatial_fcm(x, 3, spatial=spatial, max_iter=3, tol=0.0, seed=7)
        P_ref, centres_ref, history_ref = ref_fcm(x, init, 2.0, spatial, 3)
        torch.testing.assert_close(centres, centres_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(history, history_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(P, P_ref, rtol=1e-9, atol=1e-12)


def ref_kmeans_plus_plus(points, k, seed):
    """D^2 sampling over points (N, C), float64, from the module's draws (K uniforms of a seeded CPU
    generator): point = the first whose running sum of weights reaches u * total (weights 1 for the
    first draw, then the squared distance to the nearest centre so far)."""
    uniforms = torch.rand(1, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0].tolist()
    points = [[float(v) for v in p] for p in points]
    weights, chosen = [1.0] * len(points), []
    for u in uniforms:
        sums = list(itertools.accumulate(weights))
        chosen.append(points[sum(1 for value in sums if value < u * sums[-1])])
        distances = [dist2(p, chosen[-1]) for p in points]
        weights = distances if len(chosen) == 1 else [min(a, b) for a, b in zip(weights, distances)]
    return torch.tensor(chosen, dtype=torch.float64)


def ref_greedy_kmeans_plus_plus(points, k, seed, trials):
    """Greedy k-means++ (scikit-learn's): the first centre as above, then for each next one `trials` D^2
    draws, keeping the draw after which the summed D^2 is smallest; the draws (1, k, trials) in order."""
    uniforms = torch.rand(1, k, trials, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0].tolist()
    points = [[float(v) for v in p] for p in points]
    weights, chosen = [1.0] * len(points), []
    for step, draws in enumerate(uniforms):
        sums = list(itertools.accumulate(weights))
        best = None
        for u in draws[:1] if step == 0 else draws:
            candidate = points[sum(1 for value in sums if value < u * sums[-1])]
            distances = [dist2(p, candidate) for p in points]
            new = distances if step == 0 else [min(a, b) for a, b in zip(weights, distances)]
            if best is None or sum(new) < sum(best[1]):
                best = (candidate, new)
        chosen.append(best[0])
        weights = best[1]
    return torch.tensor(chosen, dtype=torch.float64)


def test_greedy_kmeans_plus_plus_matches_loop_and_one_trial_is_the_plain_draw():   # catches argmax for argmin
    x = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    points = x.flatten(2)[0].T
    for seed in (0, 1, 2):
        got = fcm.initial_centres(x, 5, seed=seed, trials=3)[0]
        torch.testing.assert_close(got, ref_greedy_kmeans_plus_plus(points, 5, seed, 3), rtol=0, atol=0)
        assert torch.equal(fcm.initial_centres(x, 5, seed=seed, trials=1), fcm.initial_centres(x, 5, seed=seed))


def test_initial_centres_kmeans_plus_plus_matches_loop():   # catches D instead of D^2 / min left out
    x = random_grid((2, 3, 6, 6))
    for seed in (0, 3):
        centres = fcm.initial_centres(x, 5, seed=seed)
        for b in range(2):
            torch.testing.assert_close(centres[b], ref_kmeans_plus_plus(x[b].flatten(1).T, 5, seed), rtol=0, atol=0)


def test_initial_centres_on_unit_vectors_is_the_per_image_draw():   # catches a (B, C, h, w)-only flatten
    # evaluate.py's cosine k-means++: points (M, D) unit rows passed as (1, D, M)
    points = torch.nn.functional.normalize(torch.randn(500, 16, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64), dim=1)
    centres = fcm.initial_centres(points.T[None], 9, 4)[0]                     # (k, D)
    assert centres.shape == (9, 16) and len({tuple(c.tolist()) for c in centres}) == 9
    assert all((points == c).all(dim=1).any() for c in centres)                 # k distinct input points
    torch.testing.assert_close(centres, ref_kmeans_plus_plus(points, 9, 4), rtol=0, atol=0)
    assert torch.equal(centres, fcm.initial_centres(points.T.contiguous()[None], 9, 4)[0])   # a view or not
    assert torch.equal(centres, fcm.initial_centres(points.T[None], 9, 4)[0])   # same seed, same draw
    x = random_grid((3, 3, 5, 4), seed=2)                                       # the FCM's own grids:
    for b in range(3):                                                          # (1, C, N) = image b of (B, C, h, w)
        assert torch.equal(fcm.initial_centres(x[b:b + 1].flatten(2), 4, 7), fcm.initial_centres(x, 4, 7)[b:b + 1])


def test_initial_centres_pick_distinct_pixels():      # catches D instead of D^2 sampling drawing a taken pixel
    x = random_grid((2, 3, 6, 6))
    pixels = x.flatten(2).transpose(1, 2)
    for init in ("kmeans++", "random"):
        centres = fcm.initial_centres(x, 5, seed=0, init=init)
        assert centres.shape == (2, 5, 3)
        assert all((pixels[b] == centres[b, k]).all(dim=1).any() for b in range(2) for k in range(5))
        assert len({tuple(c.tolist()) for c in centres[0]}) == 5
    two_colours = torch.zeros(3, 3, 6, 6, dtype=torch.float64)
    two_colours[..., 5] = 1.0                          # k-means++ never doubles a colour while another is left
    centres = fcm.initial_centres(two_colours, 2, seed=0)
    assert (centres[:, 0] != centres[:, 1]).any(dim=1).all()


# ----------------------------------------------------------------------------------------------
# Functions that copy: each public function pasted alone gives the module's result
# ----------------------------------------------------------------------------------------------

X, C3 = random_grid((2, 3, 4, 5)), random_grid((2, 3, 3), seed=5)
U3, IMAGES = random_membership((2, 3, 4, 5)), random_grid((2, 3, 16, 24), seed=2).float()
PASTE_CALLS = {
    "downsample": lambda f: f(IMAGES, 8),
    "squared_distance": lambda f: f(X, C3),
    "fcm_objective": lambda f: f(U3, fcm.squared_distance(X, C3), 1.5),
    "fuzzy_membership": lambda f: f(fcm.squared_distance(X, C3), 1.7),
    "spatial_information": lambda f: f(U3),
    "spatial_membership": lambda f: f(U3, U3 + 0.5),
    "update_centres": lambda f: f(X, U3, 2.5, previous=C3),
    "cluster_probability": lambda f: f(U3 * 2),
    "initial_centres": lambda f: [f(X, 3, seed=2), f(X, 3, seed=2, init="random"), f(X.flatten(2)[:1], 4, seed=1)],
    "spatial_fcm": lambda f: f(X, 3, max_iter=4, seed=1),
    "colour_affinity": lambda f: f(X, 0.2),
    "feature_boost": lambda f: f(fcm.colour_affinity(X, 0.2), U3),
    "local_colour_affinity": lambda f: f(X, 0.2, radius=1),
    "local_feature_boost": lambda f: f(fcm.local_colour_affinity(X, 0.2, 1), U3),
    "low_level_cue": lambda f: torch.cat([f(IMAGES, 3, max_iter=3, affinity=a) for a in ("global", "local", "none")]),
}


def test_every_public_function_is_pasted_below():
    public = {name for name, f in inspect.getmembers(fcm, inspect.isfunction)
              if not name.startswith("_") and f.__module__ == "fcm"}
    assert public == set(PASTE_CALLS)


@pytest.mark.parametrize("name", sorted(PASTE_CALLS))
def test_function_works_pasted_alone(name):           # catches a module constant or an unnamed helper
    pasted = paste_alone("fcm", name)
    call = PASTE_CALLS[name]
    for got, expected in zip(tree_leaves(call(pasted)),
                             tree_leaves(call(getattr(fcm, name)))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1.5, 2.0, 3.0])
def test_objective_never_increases_for_plain_textbook_fcm(m):
    # Textbook FCM (d^2 in eq 4) alternates the exact minimisers of eq (3): J must never rise.
    _, _, history = fcm.spatial_fcm(random_grid((3, 3, 16, 16), seed=11), 6, m=m, spatial=False, max_iter=40,
                                    tol=0.0, textbook=True)
    assert ((history[:, 1:] - history[:, :-1]) <= 1e-12 * history[:, :1]).all()
    assert (history[:, -1] < history[:, 0]).all()


def test_printed_fcm_converges_but_is_not_an_exact_descent_of_eq3():
    # Printed eq (4) minimises J with fuzzifier 2m - 1 while eq (7) uses m: J falls overall and the
    # centres settle, yet single iterations may raise J (documented in fuzzy_membership).
    _, _, history = fcm.spatial_fcm(random_grid((4, 3, 12, 12), seed=2), 5, spatial=False, max_iter=200, tol=1e-10)
    assert history.shape[1] < 200 and (history[:, -1] < history[:, 0]).all()
    assert ((history[:, 1:] - history[:, :-1]) / history[:, :1]).max() > 1e-6


def two_region_image(noise, seed, impulses=False):
    """Grey 24 x 24 image: left half 0.3, right half 0.7, plus Gaussian noise; and the truth mask.
    impulses=True also plants isolated pixels (on a lattice 4 apart, away from the border) whose colour
    lies just past 0.5, on the other region's side."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.zeros(24, 24, dtype=torch.long)
    truth[:, 12:] = 1
    image = 0.3 + 0.4 * truth.double() + noise * torch.randn(24, 24, generator=generator, dtype=torch.float64)
    if impulses:
        rows, cols = torch.meshgrid(torch.arange(1, 24, 4), torch.tensor([1, 5, 8, 15, 18, 22]), indexing="ij")
        offsets = 0.02 + 0.08 * torch.rand(rows.shape, generator=generator, dtype=torch.float64)
        image[rows, cols] = torch.where(truth[rows, cols] == 0, 0.5 + offsets, 0.5 - offsets)
    return image.expand(3, 24, 24)[None].float(), truth


def errors(probability, truth):
    wrong = (probability[0].argmax(dim=0) != truth).sum().item()
    return min(wrong, truth.numel() - wrong)           # best of the two cluster orders


def test_spatial_fcm_removes_isolated_noisy_pixels_that_plain_fcm_mislabels():   # catches S unused in eq (6)
    for seed in (0, 1, 2):
        x, truth = two_region_image(noise=0.03, seed=seed, impulses=True)         # 36 isolated noisy pixels
        assert errors(fcm.spatial_fcm(x, 2, spatial=False)[0], truth) >= 30
        assert errors(fcm.spatial_fcm(x, 2, spatial=True)[0], truth) == 0
    for seed in (0, 1):
        x, truth = two_region_image(noise=0.12, seed=seed)                        # ~5% cross the midpoint
        plain, spatial = errors(fcm.spatial_fcm(x, 2, spatial=False)[0], truth), errors(fcm.spatial_fcm(x, 2)[0], truth)
        assert plain >= 15 and spatial <= plain // 2, (plain, spatial)


def test_low_level_cue_composes_the_equations():      # catches P used for x / the affinity on the image
    images = random_grid((2, 3, 48, 40), seed=4)
    x = fcm.downsample(images, 8)
    P = fcm.spatial_fcm(x, 4)[0]
    for affinity, expected in (("global", fcm.feature_boost(fcm.colour_affinity(x, 0.2), P)),
                               ("local", fcm.local_feature_boost(fcm.local_colour_affinity(x, 0.2, 2), P)),
                               ("none", P)):
        cue = fcm.low_level_cue(images, 4, sigma=0.2, affinity=affinity, radius=2)
        assert cue.shape == (2, 4, 6, 5) and cue.dtype == torch.float64
        torch.testing.assert_close(cue, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cue.sum(dim=1), torch.ones(2, 6, 5, dtype=torch.float64))
        torch.testing.assert_close(fcm.low_level_cue(images.float(), 4, sigma=0.2, affinity=affinity, radius=2),
                                   cue.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fcm.low_level_cue(images, 4, sigma=0.2, radius=2),   # catches a default other
                               fcm.low_level_cue(images, 4, sigma=0.2, affinity="local", radius=2))  # than the CLI's


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [value.numel() for value in tree_leaves(out) if isinstance(value, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_affinity_memory_is_bounded():                # catches a batched N x N (global) or any N x N (local)
    images, N = torch.rand(3, 3, 24, 24), 12 * 12       # patch 2: a 12 x 12 grid; the images are < N^2
    for affinity, bound in (("global", N * N), ("local", N * N - 1)):
        with LargestTensor() as probe:
            fcm.low_level_cue(images, 4, patch=2, affinity=affinity, radius=2, max_iter=2)
        assert probe.largest <= bound, (affinity, probe.largest)


def test_low_level_cue_shapes_grid_size_and_autocast():
    images = random_grid((3, 3, 32, 48), seed=6).float()
    cue = functools.partial(fcm.low_level_cue, affinity="global")
    shapes = [cue(images, 7, **grid).shape[2:] for grid in ({}, {"patch": 4}, {"size": (5, 3)})]
    assert shapes == [(4, 6), (8, 12), (5, 3)]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # catches autocast left on (bf16 matmuls)
        under_autocast = cue(images, 7)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, cue(images, 7))
    half = cue(images.bfloat16(), 7)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not cue(images.requires_grad_(), 3).requires_grad


def test_deterministic_under_seed():                  # catches draws from the global RNG
    x = random_grid((2, 3, 10, 10), seed=9).float()
    P1, c1, h1 = fcm.spatial_fcm(x, 6, seed=3)
    torch.manual_seed(123)
    P2, c2, h2 = fcm.spatial_fcm(x, 6, seed=3)
    assert torch.equal(P1, P2) and torch.equal(c1, c2) and torch.equal(h1, h2)
    assert not torch.equal(fcm.initial_centres(x, 6, 3), fcm.initial_centres(x, 6, 4))
    P4 = fcm.spatial_fcm(x, 6, seed=3, init="random")[0]
    assert torch.equal(P4, fcm.spatial_fcm(x, 6, seed=3, init="random")[0]) and not torch.equal(P4, P1)


def fast_and_slow_images(seed=0):
    """Float64 grids (1, 3, 8, 8): two slightly noisy colours (FCM with tol 1e-3 stops in a few
    iterations) and two of uniform noise (stop later)."""
    fast = torch.full((1, 3, 8, 8), 0.1, dtype=torch.float64)
    fast[..., 4:] = 0.8
    noise = torch.randn(fast.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (fast + 0.02 * noise).clamp(0, 1), random_grid((1, 3, 8, 8), seed=seed), random_grid((1, 3, 8, 8), seed=7)


@pytest.mark.parametrize("spatial", [False, True])
def test_each_image_stops_on_its_own(spatial):        # catches one `running` flag for the whole batch
    # Every image gets the same seeded draws, so an image's result does not depend on its batch mates.
    fast, slow, other = fast_and_slow_images()
    run = functools.partial(fcm.spatial_fcm, n_clusters=3, spatial=spatial, max_iter=40, seed=5)
    P, centres, history = run(torch.cat([fast, slow]))
    P_alone, centres_alone, history_alone = run(fast)
    T = history_alone.shape[1]
    assert T < history.shape[1]                        # it stopped before the slow one
    for got, alone in ((P[:1], P_alone), (centres[:1], centres_alone), (history[:1, :T], history_alone)):
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
    distance = fcm.squared_distance(fast, centres_alone)       # later entries repeat J at the final centres
    U = fcm.fuzzy_membership(distance)
    if spatial:
        U = fcm.spatial_membership(U, fcm.spatial_information(U))
    final = fcm.fcm_objective(U, distance).expand(history.shape[1] - T)
    torch.testing.assert_close(history[0, T:], final, rtol=1e-9, atol=1e-12)
    P_mate = run(torch.cat([other, slow]))[0]          # the slow image with another batch mate
    torch.testing.assert_close(P_mate[1:], P[1:], rtol=1e-12, atol=1e-12)
    # early_exit=False (for torch.compile) runs to the cap with the same results
    P_full, centres_full, history_full = run(torch.cat([fast, slow]), early_exit=False)
    assert history_full.shape[1] == 40
    for got, early in ((P_full, P), (centres_full, centres), (history_full[:, :history.shape[1]], history)):
        torch.testing.assert_close(got, early, rtol=1e-12, atol=1e-12)
    assert run(torch.cat([fast, slow]), max_iter=3, tol=0.0)[2].shape == (2, 3)   # the cap


def test_low_level_cue_of_an_image_does_not_depend_on_the_batch():
    fast, slow, _ = fast_and_slow_images()
    for init in ("kmeans++", "random"):
        for affinity in ("global", "local"):
            alone = fcm.low_level_cue(fast, 3, patch=1, init=init, affinity=affinity, max_iter=40)
            batched = fcm.low_level_cue(torch.cat([fast, slow]), 3, patch=1, init=init, affinity=affinity, max_iter=40)
            torch.testing.assert_close(batched[:1], alone, rtol=1e-12, atol=1e-12)
            second = fcm.low_level_cue(torch.cat([slow, slow, fast]), 3, patch=1, init=init, affinity=affinity,
                                       max_iter=40)  # nor on its place in the batch
            torch.testing.assert_close(second[2:], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affinity", ["local", "global"])
def test_torch_compile_traces_and_matches_eager(affinity):   # catches a data-dependent branch in the loop
    images = random_grid((2, 3, 24, 16), seed=3).float()
    cue = functools.partial(fcm.low_level_cue, n_clusters=3, max_iter=2, early_exit=False, affinity=affinity)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(cue)(images)
    assert explained.graph_break_count <= 8           # the checks and the seeded CPU draws only
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(cue, backend="eager")(images), cue(images), rtol=0, atol=0)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Degenerate inputs give finite results; bad inputs to the branch a one-line ValueError
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial", [False, True])
def test_degenerate_inputs_give_finite_results(spatial):
    constant = torch.full((2, 3, 6, 5), 0.4)
    two_colours = torch.zeros(1, 3, 6, 6)
    two_colours[..., 3:] = 1.0
    cases = [(constant, 4), (two_colours, 5), (random_grid((1, 3, 6, 6)).float(), 1),
             (torch.rand(1, 3, 1, 1), 3), (torch.rand(2, 3, 1, 2), 2), (torch.rand(1, 3, 2, 1), 4)]
    for x, K in cases:
        P, centres, history = fcm.spatial_fcm(x, K, spatial=spatial)
        assert P.shape == (x.shape[0], K) + x.shape[2:]
        assert torch.isfinite(P).all() and torch.isfinite(centres).all() and torch.isfinite(history).all()
        torch.testing.assert_close(P.sum(dim=1), torch.ones(x.shape[0], *x.shape[2:]))
    torch.testing.assert_close(fcm.spatial_fcm(constant, 4, spatial=spatial)[0], torch.full((2, 4, 6, 5), 0.25))
    assert fcm.spatial_fcm(random_grid((1, 3, 6, 6)).float(), 1, spatial=spatial)[0].eq(1).all()
    for images in (torch.full((1, 3, 8, 8), 0.7), torch.zeros(2, 3, 16, 8), torch.rand(1, 3, 8, 16)):
        for affinity in ("global", "local"):
            cue = fcm.low_level_cue(images, 3, spatial=spatial, affinity=affinity, radius=5)
            assert torch.isfinite(cue).all()
            torch.testing.assert_close(cue.sum(dim=1), torch.ones(images.shape[0], *cue.shape[2:]))


def test_low_level_cue_checks_its_input_in_one_line():   # the branch's boundary: images and affinity
    ok = torch.rand(1, 3, 16, 16)
    one_nan, one_inf = ok.clone(), ok.clone()
    one_nan[0, 1, 2, 3], one_inf[0, 0, 5, 5] = float("nan"), float("inf")
    calls = [
        lambda: fcm.low_level_cue(ok * 255, 3),                  # 0..255 input
        lambda: fcm.low_level_cue(torch.randn(1, 3, 16, 16), 3),  # ImageNet-normalised
        lambda: fcm.low_level_cue(one_nan, 3), lambda: fcm.low_level_cue(one_inf, 3),
        lambda: fcm.low_level_cue(ok[0], 3),                     # 3-D
        lambda: fcm.low_level_cue(ok.numpy(), 3),                # not a tensor
        lambda: fcm.low_level_cue((ok * 255).byte(), 3),         # integer dtype
        lambda: fcm.low_level_cue(torch.zeros(1, 3, 0, 16), 3),  # empty
        lambda: fcm.low_level_cue(ok, 3, affinity="locale"),
        lambda: fcm.low_level_cue(ok, 3, affinity=True),         # the old boolean spelling is gone
    ]
    for index, call in enumerate(calls):
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value), index
