"""Tests for fcm.py: every equation (1, 3-12) against a slow float64 loop reference, plus the
properties the paper states (memberships sum to 1, spatial FCM removes isolated noise, F_l = A P)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fcm


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
            sy = max((i + 0.5) * H / out_h - 0.5, 0.0)
            sx = max((j + 0.5) * W / out_w - 0.5, 0.0)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
            ly, lx = sy - y0, sx - x0
            for c in range(C):
                out[c, i, j] = ((1 - ly) * (1 - lx) * image[c, y0, x0] + (1 - ly) * lx * image[c, y0, x1]
                                + ly * (1 - lx) * image[c, y1, x0] + ly * lx * image[c, y1, x1])
    return out


def pixels(x):
    """x (B, C, h, w) -> list over images of lists of pixel vectors, row-major."""
    B, C, h, w = x.shape
    return [[x[b, :, i, j] for i in range(h) for j in range(w)] for b in range(B)]


def ref_membership(x, centres, m, power=1.0):
    """Eq (4) literally: U_ij = (1/d_ij)^(p/(m-1)) / sum_k (1/d_ik)^(p/(m-1)); p = 1 as printed."""
    B, C, h, w = x.shape
    K = centres.shape[1]
    U = torch.zeros(B, K, h * w, dtype=torch.float64)
    for b, pix in enumerate(pixels(x)):
        for i, p in enumerate(pix):
            d = [math.sqrt(sum((float(p[c]) - float(centres[b, k, c])) ** 2 for c in range(C))) for k in range(K)]
            if 0.0 in d:      # limit d_ij -> 0: all membership to the centre(s) the pixel sits on
                for k in range(K):
                    U[b, k, i] = (d[k] == 0.0) / d.count(0.0)
                continue
            inv = [(1.0 / dk) ** (power / (m - 1)) for dk in d]
            for k in range(K):
                U[b, k, i] = inv[k] / sum(inv)
    return U.reshape(B, K, h, w)


def ref_objective(x, centres, U, m):
    """Eq (3): J = sum_i sum_j U_ij^m d_ij^2, per image."""
    B, C, h, w = x.shape
    K = centres.shape[1]
    J = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                for k in range(K):
                    d2 = sum((float(x[b, c, i, j]) - float(centres[b, k, c])) ** 2 for c in range(C))
                    J[b] += float(U[b, k, i, j]) ** m * d2
    return J


def ref_spatial_information(U):
    """Eq (5): sum of U over the in-image 3 x 3 neighbourhood (pixel included)."""
    B, K, h, w = U.shape
    S = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            for i in range(h):
                for j in range(w):
                    for di in (-1, 0, 1):
                        for dj in (-1, 0, 1):
                            if 0 <= i + di < h and 0 <= j + dj < w:
                                S[b, k, i, j] += float(U[b, k, i + di, j + dj])
    return S


def ref_spatial_membership(U, S):
    """Eq (6): U'_ij = U_ij S_ij / sum_k U_ik S_ik."""
    B, K, h, w = U.shape
    out = torch.zeros(B, K, h, w, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                total = sum(float(U[b, k, i, j]) * float(S[b, k, i, j]) for k in range(K))
                for k in range(K):
                    out[b, k, i, j] = float(U[b, k, i, j]) * float(S[b, k, i, j]) / total
    return out


def ref_centres(x, U, m):
    """Eq (7): v_j = sum_i U_ij^m x_i / sum_i U_ij^m."""
    B, C, h, w = x.shape
    K = U.shape[1]
    V = torch.zeros(B, K, C, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            num, den = [0.0] * C, 0.0
            for i in range(h):
                for j in range(w):
                    weight = float(U[b, k, i, j]) ** m
                    den += weight
                    for c in range(C):
                        num[c] += weight * float(x[b, c, i, j])
            for c in range(C):
                V[b, k, c] = num[c] / den
    return V


def ref_probability(U):
    """Eq (8): P_ij = U'_ij / sum_k U'_ik."""
    B, K, h, w = U.shape
    P = torch.zeros_like(U, dtype=torch.float64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                total = sum(float(U[b, k, i, j]) for k in range(K))
                for k in range(K):
                    P[b, k, i, j] = float(U[b, k, i, j]) / total
    return P


def ref_affinity(x, sigma, normalise):
    """Eqs (9)-(11): a_jk = exp(-||x_j - x_k||^2 / (2 sigma^2)), optionally rows divided by their sum."""
    B, C, h, w = x.shape
    N = h * w
    A = torch.zeros(B, N, N, dtype=torch.float64)
    for b, pix in enumerate(pixels(x)):
        for j in range(N):
            for k in range(N):
                d = math.sqrt(sum((float(pix[j][c]) - float(pix[k][c])) ** 2 for c in range(C)))
                A[b, j, k] = math.exp(-d * d / (2 * sigma * sigma))
            if normalise:
                A[b, j] /= A[b, j].sum()
    return A


def ref_fcm(x, centres, m, spatial, iterations):
    """The whole iteration from given initial centres, composed from the loop references."""
    history = []
    for _ in range(iterations):
        U = ref_membership(x, centres, m)
        if spatial:
            U = ref_spatial_membership(U, ref_spatial_information(U))
        history.append(ref_objective(x, centres, U, m))
        centres = ref_centres(x, U, m)
    U = ref_membership(x, centres, m)
    if spatial:
        U = ref_spatial_membership(U, ref_spatial_information(U))
    return ref_probability(U), centres, torch.stack(history, dim=1)


def random_grid(shape=(2, 3, 5, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def random_membership(shape=(2, 4, 5, 4), seed=1):
    generator = torch.Generator().manual_seed(seed)
    U = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    return U / U.sum(dim=1, keepdim=True)


def flat(x):
    return x.flatten(2).transpose(1, 2)   # (B, N, C)


# ----------------------------------------------------------------------------------------------
# Each equation against its loop reference
# ----------------------------------------------------------------------------------------------

def test_downsample_eq1_matches_loop_bilinear():
    images = random_grid((2, 3, 16, 24))
    out = fcm.downsample(images, patch=8)
    assert out.shape == (2, 3, 2, 3)
    expected = torch.stack([ref_bilinear(im, 2, 3) for im in images])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # a grid size that is not an integer fraction of the image
    images = random_grid((1, 3, 10, 13), seed=3)
    torch.testing.assert_close(fcm.downsample(images, size=(3, 5)), ref_bilinear(images[0], 3, 5)[None],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [1.5, 2.0, 3.0])
def test_fuzzy_membership_eq4_as_printed(m):
    x = random_grid()
    centres = random_grid((2, 4, 3), seed=5)
    U = fcm.fuzzy_membership(x, centres, m)
    assert U.shape == (2, 4, 5, 4)
    torch.testing.assert_close(U, ref_membership(x, centres, m), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U.sum(dim=1), torch.ones(2, 5, 4, dtype=torch.float64))


def test_fuzzy_membership_textbook_variant_and_fuzzifier_relation():
    x = random_grid()
    centres = random_grid((2, 4, 3), seed=5)
    textbook = fcm.fuzzy_membership(x, centres, 2.0, textbook=True)
    torch.testing.assert_close(textbook, ref_membership(x, centres, 2.0, power=2.0), rtol=1e-10, atol=1e-12)
    # printed eq (4) with m == textbook FCM with m' = 2m - 1
    for m in (1.25, 2.0, 4.0):
        torch.testing.assert_close(fcm.fuzzy_membership(x, centres, m),
                                   fcm.fuzzy_membership(x, centres, 2 * m - 1, textbook=True))


def test_fuzzy_membership_pixel_on_a_centre_gets_one_not_nan():
    x = random_grid((1, 3, 3, 3))
    centres = torch.stack([x[0, :, 1, 2], x[0, :, 0, 0], torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)])[None]
    for m in (1.05, 2.0, 10.0):
        U = fcm.fuzzy_membership(x, centres, m)
        assert torch.isfinite(U).all()
        assert U[0, 0, 1, 2] == 1 and U[0, 1:, 1, 2].eq(0).all()
        assert U[0, 1, 0, 0] == 1 and U[0, [0, 2], 0, 0].eq(0).all()
    # two coinciding centres share the pixel equally
    U = fcm.fuzzy_membership(x, torch.stack([x[0, :, 1, 1]] * 2)[None], 2.0)
    assert U[0, :, 1, 1].tolist() == [0.5, 0.5]


def test_fcm_objective_eq3():
    x = random_grid()
    centres = random_grid((2, 4, 3), seed=5)
    U = random_membership()
    for m in (1.5, 2.0):
        J = fcm.fcm_objective(x, centres, U, m)
        assert J.shape == (2,)
        torch.testing.assert_close(J, ref_objective(x, centres, U, m), rtol=1e-10, atol=1e-12)


def test_spatial_information_eq5_zero_padded_borders():
    U = random_membership()
    S = fcm.spatial_information(U)
    torch.testing.assert_close(S, ref_spatial_information(U), rtol=1e-12, atol=1e-12)
    # borders sum the in-image neighbours only: a corner of an all-ones map sees 4, an edge 6, inside 9
    ones = fcm.spatial_information(torch.ones(1, 1, 4, 5, dtype=torch.float64))
    assert ones[0, 0, 0, 0] == 4 and ones[0, 0, 0, 2] == 6 and ones[0, 0, 2, 2] == 9
    # both implementations (separable adds: CPU default; pooling: CUDA default) agree with the loop
    for separable in (True, False):
        torch.testing.assert_close(fcm._box_sum_3x3(U, separable=separable), ref_spatial_information(U),
                                   rtol=1e-12, atol=1e-12)


def test_spatial_membership_eq6():
    U = random_membership()
    S = fcm.spatial_information(U)
    U2 = fcm.spatial_membership(U, S)
    torch.testing.assert_close(U2, ref_spatial_membership(U, S), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U2.sum(dim=1), torch.ones(2, 5, 4, dtype=torch.float64))


def test_update_centres_eq7():
    x = random_grid()
    U = random_membership()
    for m in (1.5, 2.0, 3.0):
        torch.testing.assert_close(fcm.update_centres(x, U, m), ref_centres(x, U, m), rtol=1e-10, atol=1e-12)
    # a cluster with no weight at all keeps its previous centre
    U0 = U.clone()
    U0[:, 0] = 0
    previous = torch.full((2, 4, 3), 0.25, dtype=torch.float64)
    assert fcm.update_centres(x, U0, 2.0, previous=previous)[:, 0].eq(0.25).all()


def test_cluster_probability_eq8():
    U = random_membership() * 3.0
    P = fcm.cluster_probability(U)
    torch.testing.assert_close(P, ref_probability(U), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.sum(dim=1), torch.ones(2, 5, 4, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_colour_affinity_eqs9_11(sigma):
    x = random_grid((2, 3, 3, 4))
    raw = fcm.colour_affinity(x, sigma, normalise=False)
    assert raw.shape == (2, 12, 12)
    torch.testing.assert_close(raw, ref_affinity(x, sigma, False), rtol=1e-9, atol=1e-12)
    A = fcm.colour_affinity(x, sigma, normalise=True)
    torch.testing.assert_close(A, ref_affinity(x, sigma, True), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(A.sum(dim=2), torch.ones(2, 12, dtype=torch.float64))
    # float32 path of the |a|^2 + |b|^2 - 2ab expansion stays close
    torch.testing.assert_close(fcm.colour_affinity(x.float(), sigma), A.float(), rtol=1e-4, atol=1e-5)


def test_spatial_fcm_matches_loop_iteration():
    x = random_grid()
    K, m = 3, 2.0
    init = fcm.initial_centres(x.flatten(2), K, seed=7)
    for spatial in (False, True):
        P, centres, history = fcm.spatial_fcm(x, K, m=m, spatial=spatial, max_iter=3, tol=0.0, seed=7)
        P_ref, centres_ref, history_ref = ref_fcm(x, init, m, spatial, 3)
        torch.testing.assert_close(centres, centres_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(history, history_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(P, P_ref, rtol=1e-9, atol=1e-12)


def test_kmeanspp_init_picks_pixels():
    x = random_grid((2, 3, 6, 6))
    x_flat = flat(x)
    for init in (fcm.initial_centres(x.flatten(2), 5, seed=0),
                 fcm.initial_centres(x.flatten(2), 5, seed=0, init="random")):
        assert init.shape == (2, 5, 3)
        for b in range(2):
            for k in range(5):
                assert (x_flat[b] == init[b, k]).all(dim=1).any()
        assert len({tuple(c.tolist()) for c in init[0]}) == 5      # distinct pixels -> distinct centres
    # k-means++ never starts two centres on one colour while other colours are left
    two_colours = torch.zeros(3, 3, 6, 6, dtype=torch.float64)
    two_colours[:, :, :, 5] = 1.0                                    # one column of white, rest black
    init = fcm.initial_centres(two_colours.flatten(2), 2, seed=0)
    assert (init[:, 0] != init[:, 1]).any(dim=1).all()


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

def test_memberships_and_probabilities_sum_to_one():
    x = random_grid((2, 3, 12, 10)).float()
    for spatial in (False, True):
        P, centres, history = fcm.spatial_fcm(x, 5, spatial=spatial)
        assert P.shape == (2, 5, 12, 10) and centres.shape == (2, 5, 3) and history.shape[0] == 2
        assert (P >= 0).all()
        torch.testing.assert_close(P.sum(dim=1), torch.ones(2, 12, 10))
        torch.testing.assert_close(fcm.fuzzy_membership(x, centres).sum(dim=1), torch.ones(2, 12, 10))


@pytest.mark.parametrize("m", [1.5, 2.0, 3.0])
def test_objective_never_increases_for_plain_textbook_fcm(m):
    # Textbook FCM (d^2 in eq 4) alternates the exact minimisers of eq (3): J must never rise.
    x = random_grid((3, 3, 16, 16), seed=11)
    _, _, history = fcm.spatial_fcm(x, 6, m=m, spatial=False, max_iter=40, tol=0.0, textbook=True)
    rises = history[:, 1:] - history[:, :-1]
    assert (rises <= 1e-12 * history[:, :1]).all()
    assert (history[:, -1] < history[:, 0]).all()


def test_printed_fcm_converges_but_is_not_an_exact_descent_of_eq3():
    # As printed, eq (4) minimises J with fuzzifier 2m - 1 while eq (7) uses m, so J of eq (3) decreases
    # overall and the centres reach a fixed point, yet single iterations may raise J (documented in fcm.py).
    x = random_grid((16, 3, 12, 12), seed=2)
    P, centres, history = fcm.spatial_fcm(x, 5, spatial=False, max_iter=200, tol=1e-10)
    assert history.shape[1] < 200                                          # converged before the cap
    assert (history[:, -1] < history[:, 0]).all()
    rises = (history[:, 1:] - history[:, :-1]) / history[:, :1]
    assert rises.max() > 1e-6        # this seed shows a rise; the textbook test above shows none


def two_region_image(noise, seed, impulses=False):
    """Grey image 24 x 24: left half 0.3, right half 0.7, plus iid Gaussian noise; truth mask.

    impulses=True also plants isolated noisy pixels on a sparse lattice (4 pixels apart, away from the
    region border) whose colour lies just past the midpoint 0.5, on the other region's side."""
    generator = torch.Generator().manual_seed(seed)
    h = w = 24
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, w // 2:] = 1
    image = 0.3 + 0.4 * truth.double() + noise * torch.randn(h, w, generator=generator, dtype=torch.float64)
    if impulses:
        rows, cols = torch.meshgrid(torch.arange(1, h, 4), torch.tensor([1, 5, 8, 15, 18, 22]), indexing="ij")
        offsets = 0.02 + 0.08 * torch.rand(rows.shape, generator=generator, dtype=torch.float64)
        image[rows, cols] = torch.where(truth[rows, cols] == 0, 0.5 + offsets, 0.5 - offsets)
    return image.expand(3, h, w)[None].float(), truth


def errors(probability, truth):
    labels = probability[0].argmax(dim=0)
    wrong = (labels != truth).sum().item()
    return min(wrong, truth.numel() - wrong)     # best of the two cluster orders


def test_spatial_fcm_removes_isolated_noisy_pixels_that_plain_fcm_mislabels():
    for seed in (0, 1, 2):
        x, truth = two_region_image(noise=0.03, seed=seed, impulses=True)    # 36 isolated noisy pixels
        plain, _, _ = fcm.spatial_fcm(x, 2, spatial=False)
        spatial, _, _ = fcm.spatial_fcm(x, 2, spatial=True)
        assert errors(plain, truth) >= 30                 # plain FCM labels them by colour alone
        assert errors(spatial, truth) == 0                # the 3 x 3 spatial information relabels them


def test_spatial_fcm_reduces_errors_under_gaussian_noise():
    for seed in (0, 1):
        x, truth = two_region_image(noise=0.12, seed=seed)     # ~5% of 576 pixels cross the midpoint
        plain, _, _ = fcm.spatial_fcm(x, 2, spatial=False)
        spatial, _, _ = fcm.spatial_fcm(x, 2, spatial=True)
        plain_errors, spatial_errors = errors(plain, truth), errors(spatial, truth)
        assert plain_errors >= 15, plain_errors
        assert spatial_errors <= plain_errors // 2, (plain_errors, spatial_errors)


def test_low_level_cue_is_affinity_times_probability_and_sums_to_one():
    images = random_grid((2, 3, 48, 40), seed=4)
    cue = fcm.low_level_cue(images, 4, sigma=0.2)
    assert cue.shape == (2, 4, 6, 5) and cue.dtype == torch.float64
    x = fcm.downsample(images, 8)
    P, _, _ = fcm.spatial_fcm(x, 4)
    A = fcm.colour_affinity(x, 0.2, normalise=True)
    expected = torch.bmm(A, P.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 4, 6, 5)   # eq (12)
    torch.testing.assert_close(cue, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cue.sum(dim=1), torch.ones(2, 6, 5, dtype=torch.float64))
    # float32 path (one-image chunks on CPU) agrees
    torch.testing.assert_close(fcm.low_level_cue(images.float(), 4, sigma=0.2), cue.float(), rtol=1e-4, atol=1e-5)
    # affinity=False gives P itself
    torch.testing.assert_close(fcm.low_level_cue(images, 4, sigma=0.2, affinity=False), P)


def test_low_level_cue_shapes_grid_size_and_autocast():
    images = random_grid((3, 3, 32, 48), seed=6).float()
    assert fcm.low_level_cue(images, 7).shape == (3, 7, 4, 6)
    assert fcm.low_level_cue(images, 7, patch=4).shape == (3, 7, 8, 12)
    assert fcm.low_level_cue(images, 7, size=(5, 3)).shape == (3, 7, 5, 3)
    reference = fcm.low_level_cue(images, 7)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = fcm.low_level_cue(images, 7)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)
    half = fcm.low_level_cue(images.bfloat16(), 7)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_no_gradient_is_recorded():
    images = random_grid((1, 3, 16, 16)).float().requires_grad_()
    assert not fcm.low_level_cue(images, 3).requires_grad


def test_deterministic_under_seed():
    x = random_grid((2, 3, 10, 10), seed=9).float()
    P1, c1, h1 = fcm.spatial_fcm(x, 6, seed=3)
    P2, c2, h2 = fcm.spatial_fcm(x, 6, seed=3)
    assert torch.equal(P1, P2) and torch.equal(c1, c2) and torch.equal(h1, h2)
    torch.manual_seed(123)                           # the global RNG plays no part
    P3, _, _ = fcm.spatial_fcm(x, 6, seed=3)
    assert torch.equal(P1, P3)
    assert not torch.equal(fcm.initial_centres(x.flatten(2), 6, 3), fcm.initial_centres(x.flatten(2), 6, 4))
    P4, _, _ = fcm.spatial_fcm(x, 6, seed=3, init="random")
    assert torch.equal(P4, fcm.spatial_fcm(x, 6, seed=3, init="random")[0]) and not torch.equal(P4, P1)


def test_early_stop_and_iteration_cap():
    x, _ = two_region_image(noise=0.05, seed=0)
    _, _, history = fcm.spatial_fcm(x, 2, max_iter=100, tol=1e-4)
    assert 1 < history.shape[1] < 100
    _, _, capped = fcm.spatial_fcm(x, 2, max_iter=3, tol=0.0)
    assert capped.shape == (1, 3)


def fast_and_slow_images(seed=0):
    """Two float64 grids (1, 3, 8, 8) in [0, 1]: two slightly noisy colours (FCM with tol 1e-3
    settles in ~6 iterations, yet its centres still creep) and uniform noise (settles later)."""
    generator = torch.Generator().manual_seed(seed + 1)
    fast = torch.full((1, 3, 8, 8), 0.1, dtype=torch.float64)
    fast[..., 4:] = 0.8
    fast = (fast + 0.02 * torch.randn(fast.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    slow = random_grid((1, 3, 8, 8), seed=seed)
    return fast, slow


@pytest.mark.parametrize("spatial", [False, True])
def test_each_image_stops_on_its_own(spatial):
    # An image's FCM must not depend on its batch mates: the fast image stops when it converged,
    # not when the slow one does, and its later history entries repeat J at its final centres.
    fast, slow = fast_and_slow_images()
    K, tol = 3, 1e-3
    draws = fcm._init_draws(2, K, 64, 5, "kmeans++")                          # (2, K)
    run = lambda x, d, early: fcm._spatial_fcm(x, d, 2.0, spatial, 200, tol, False, "kmeans++", early)
    P, centres, history = run(torch.cat([fast, slow]), draws, True)
    for b, image in enumerate((fast, slow)):
        P_alone, centres_alone, history_alone = run(image, draws[b:b + 1], True)
        torch.testing.assert_close(P[b:b + 1], P_alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(centres[b:b + 1], centres_alone, rtol=1e-12, atol=1e-12)
        T = history_alone.shape[1]
        torch.testing.assert_close(history[b:b + 1, :T], history_alone, rtol=1e-12, atol=1e-12)
        U = fcm.fuzzy_membership(image, centres_alone)                      # J at the final centres
        if spatial:
            U = fcm.spatial_membership(U, fcm.spatial_information(U))
        final_J = fcm.fcm_objective(image, centres_alone, U)
        torch.testing.assert_close(history[b, T:], final_J.expand(history.shape[1] - T), rtol=1e-9, atol=1e-12)
        if b == 0:
            assert T < history.shape[1]                                    # it stopped before the slow one
    # without the early exit (the GPU path) the loop runs to the cap and the results are the same
    P_full, centres_full, history_full = run(torch.cat([fast, slow]), draws, False)
    assert history_full.shape[1] == 200
    torch.testing.assert_close(P_full, P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(centres_full, centres, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(history_full[:, :history.shape[1]], history, rtol=1e-12, atol=1e-12)


def test_low_level_cue_of_an_image_does_not_depend_on_the_batch():
    fast, slow = fast_and_slow_images()
    for init in fcm.INITS:
        # image 0 draws the same random numbers alone and in a batch (rows of one seeded stream)
        alone = fcm.low_level_cue(fast, 3, patch=1, init=init, max_iter=100)
        batched = fcm.low_level_cue(torch.cat([fast, slow]), 3, patch=1, init=init, max_iter=100)
        torch.testing.assert_close(batched[:1], alone, rtol=1e-12, atol=1e-12)


class NoHostTensors(TorchDispatchMode):
    """Fails on any op that reads a CPU tensor with data (not a 0-dim scalar): on CUDA that is a
    host-to-device copy, which CUDA graph capture forbids. (torch.tensor(data, device=...) builds on
    the device without dispatching any op, so it is not seen here; the core uses none.)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for value in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() > 0:
                raise RuntimeError(f"{func} reads a host tensor of shape {tuple(value.shape)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spatial,affinity,init", [(True, True, "kmeans++"), (False, False, "random")])
def test_low_level_core_has_no_host_sync_and_no_host_tensors(spatial, affinity, init):
    # Run the check-free core on the "meta" device, which holds no data: any .item() / bool() of a
    # tensor (a host sync on CUDA) raises there, and so does mixing in a tensor made on the CPU.
    # That is what capturing it in a CUDA graph (GraphedLowLevelCue) needs.
    images = torch.empty(2, 3, 32, 24, device="meta")
    draws = fcm._init_draws(2, 4, 12, 0, init).to("meta")
    with NoHostTensors():
        cue = fcm._low_level_cue(images, draws, (4, 3), 2.0, 0.1, spatial, 5, 1e-3, False, affinity, init,
                                 stop_early=False)
    assert cue.shape == (2, 4, 4, 3) and cue.device.type == "meta"
    with NoHostTensors(), pytest.raises(RuntimeError, match="reads a host tensor"):
        torch.ones(3).to("meta")                         # the probe does see a host-to-device copy
    with pytest.raises(RuntimeError):                    # the early exit does sync: the probe sees it
        fcm._low_level_cue(images, draws, (4, 3), 2.0, 0.1, spatial, 5, 1e-3, False, affinity, init,
                           stop_early=True)


def test_graphed_low_level_cue_on_cpu_is_low_level_cue():
    images = torch.rand(3, 3, 40, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(sigma=0.2, max_iter=7, m=1.8, seed=4, init="random")
    graphed = fcm.GraphedLowLevelCue(5, **settings)
    assert torch.equal(graphed(images), fcm.low_level_cue(images, 5, **settings))
    assert torch.equal(fcm.GraphedLowLevelCue(4, affinity=False)(images),
                       fcm.low_level_cue(images, 4, affinity=False))
    with pytest.raises(TypeError, match="unknown settings"):
        fcm.GraphedLowLevelCue(5, sigmma=0.2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        graphed(images * 255)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("error")                     # a fallback to eager fails the test
def test_graphed_low_level_cue_replays_on_cuda():
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    graphed = fcm.GraphedLowLevelCue(6, max_iter=12)
    for _ in range(3):                                   # new numbers each call: the replay must read them
        images = torch.rand(4, 3, 64, 48, generator=generator).to(device)
        first = graphed(images)
        expected = fcm.low_level_cue(images, 6, max_iter=12)
        torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    assert len(graphed.graphs) == 1 and next(iter(graphed.graphs.values())) is not None   # replayed, not eager
    torch.cuda.empty_cache()
    junk = [torch.rand(size, device=device) for size in (8, 64, 512, 1 << 20) for _ in range(64)]  # reuse freed memory
    second = graphed(images.flip(-2))
    del junk
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)   # not overwritten by the next call
    torch.testing.assert_close(second, fcm.low_level_cue(images.flip(-2), 6, max_iter=12), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Degenerate inputs: finite results
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial", [False, True])
def test_degenerate_inputs_give_finite_results(spatial):
    constant = torch.full((2, 3, 6, 5), 0.4)
    two_colours = torch.zeros(1, 3, 6, 6)
    two_colours[:, :, :, 3:] = 1.0
    cases = [(constant, 4), (two_colours, 5), (random_grid((1, 3, 6, 6)).float(), 1),
             (torch.rand(1, 3, 1, 1), 3), (torch.rand(2, 3, 1, 2), 2), (torch.rand(1, 3, 2, 1), 4)]
    for x, K in cases:
        P, centres, history = fcm.spatial_fcm(x, K, spatial=spatial)
        assert P.shape == (x.shape[0], K) + x.shape[2:]
        assert torch.isfinite(P).all() and torch.isfinite(centres).all() and torch.isfinite(history).all()
        torch.testing.assert_close(P.sum(dim=1), torch.ones(x.shape[0], *x.shape[2:]))
    P, centres, _ = fcm.spatial_fcm(constant, 4, spatial=spatial)
    torch.testing.assert_close(P, torch.full_like(P, 0.25))                    # every centre on the colour
    P, _, _ = fcm.spatial_fcm(random_grid((1, 3, 6, 6)).float(), 1, spatial=spatial)
    assert P.eq(1).all()                                                       # K = 1
    for images in (torch.full((1, 3, 8, 8), 0.7), torch.zeros(2, 3, 16, 8), torch.rand(1, 3, 8, 16)):
        cue = fcm.low_level_cue(images, 3, spatial=spatial)
        assert torch.isfinite(cue).all()
        torch.testing.assert_close(cue.sum(dim=1), torch.ones(images.shape[0], *cue.shape[2:]))


# ----------------------------------------------------------------------------------------------
# Bad inputs: one-line ValueError
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_value_error():
    x = torch.rand(1, 3, 4, 4)
    centres = torch.rand(1, 2, 3)
    U = torch.full((1, 2, 4, 4), 0.5)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    calls = [
        lambda: fcm.spatial_fcm(x[0], 2),                        # 3-D
        lambda: fcm.spatial_fcm(x.numpy(), 2),                   # not a tensor
        lambda: fcm.spatial_fcm(torch.zeros(1, 3, 0, 4), 2),     # empty
        lambda: fcm.spatial_fcm((x * 255).long(), 2),            # integer dtype
        lambda: fcm.spatial_fcm(nan_x, 2),                       # NaN
        lambda: fcm.spatial_fcm(x, 0),                           # K < 1
        lambda: fcm.spatial_fcm(x, 2.5),                         # K not an integer
        lambda: fcm.spatial_fcm(x, 2, m=1.0),                    # m <= 1
        lambda: fcm.spatial_fcm(x, 2, m=float("inf")),
        lambda: fcm.spatial_fcm(x, 2, max_iter=0),
        lambda: fcm.spatial_fcm(x, 2, tol=-1.0),
        lambda: fcm.spatial_fcm(x, 2, init="kmeans"),
        lambda: fcm.fuzzy_membership(x, torch.rand(1, 2, 4), 2.0),   # centres with wrong C
        lambda: fcm.fuzzy_membership(x, torch.rand(2, 2, 3), 2.0),   # centres with wrong B
        lambda: fcm.fuzzy_membership(x, centres, 0.5),
        lambda: fcm.fcm_objective(x, centres, torch.full((1, 3, 4, 4), 0.3), 2.0),  # K mismatch
        lambda: fcm.update_centres(x, torch.full((1, 2, 3, 4), 0.5), 2.0),        # h mismatch
        lambda: fcm.spatial_membership(U, torch.ones(1, 2, 4, 3)),
        lambda: fcm.spatial_information(U[0]),
        lambda: fcm.colour_affinity(x, 0.0),
        lambda: fcm.colour_affinity(x, float("nan")),
        lambda: fcm.downsample(x, patch=8),                      # image smaller than a patch
        lambda: fcm.downsample(x, size=(0, 2)),
        lambda: fcm.low_level_cue(torch.rand(1, 3, 16, 16) * 255, 3),               # 0..255 input
        lambda: fcm.low_level_cue(torch.randn(1, 3, 16, 16), 3),                    # ImageNet-normalised
        lambda: fcm.low_level_cue(torch.rand(1, 3, 16, 16), 3, sigma=-1.0),
        lambda: fcm.low_level_cue(torch.rand(1, 3, 16, 16), 3, patch=0),
        lambda: fcm.low_level_cue(torch.full((1, 3, 16, 16), float("nan")), 3),
        lambda: fcm.low_level_cue(torch.rand(1, 3, 16, 16), 0),
        lambda: fcm.low_level_cue(torch.rand(1, 3, 16, 16), 3, size=(4,)),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)
