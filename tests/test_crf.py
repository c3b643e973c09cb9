"""Tests of crf.py: the dense CRF (Krähenbühl & Koltun 2011) used to post-process predictions.

References: a float64 Python-loop mean-field step, a line-by-line Python port of densecrf's
permutohedral lattice, and the exact all-pairs CRF; plus the properties a CRF must have.
"""
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crf
from pasting import paste_alone

SHARED = Path(__file__).resolve().parents[2] / "shared"
CAMVID = SHARED / "data" / "camvid"


# ---------------------------------------------------------------------------------------------
# Slow, obviously correct references
# ---------------------------------------------------------------------------------------------

def loop_mean_field(image, probs, iterations, sxy_gauss=1.0, compat_gauss=3.0,
                    sxy_bilateral=67.0, srgb=3.0, compat_bilateral=4.0):
    """Mean field of the dense CRF with Python loops over pixel pairs, float64.

    image (3, H, W) 0..255, probs (K, H, W) -> Q (K, H, W). Kernel sums include j = i, symmetric
    normalisation n_i = 1/sqrt(sum_j k(i, j)), Potts: logits = -unary + sum_w w * n_i sum_j k n_j Q_j.
    """
    image = image.double().numpy()
    probs = probs.double().numpy()
    K, H, W = probs.shape
    pixels = [(y, x) for y in range(H) for x in range(W)]
    unary = -np.log(np.clip(probs, 1e-5, 1.0))

    def smooth(a, b):
        (ya, xa), (yb, xb) = a, b
        return math.exp(-((xa - xb) ** 2 + (ya - yb) ** 2) / (2 * sxy_gauss ** 2))

    def appearance(a, b):
        (ya, xa), (yb, xb) = a, b
        colour = sum((image[c, ya, xa] - image[c, yb, xb]) ** 2 for c in range(3))
        return math.exp(-((xa - xb) ** 2 + (ya - yb) ** 2) / (2 * sxy_bilateral ** 2)
                        - colour / (2 * srgb ** 2))

    kernels = [(compat_gauss, smooth), (compat_bilateral, appearance)]
    norms = [{a: 1.0 / math.sqrt(sum(k(a, b) for b in pixels)) for a in pixels} for _, k in kernels]

    Q = np.exp(-unary) / np.exp(-unary).sum(0)
    for _ in range(iterations):
        new_Q = np.zeros_like(Q)
        for a in pixels:
            logits = -unary[:, a[0], a[1]].copy()
            for (w, k), n in zip(kernels, norms):
                for label in range(K):
                    message = n[a] * sum(k(a, b) * n[b] * Q[label, b[0], b[1]] for b in pixels)
                    logits[label] += w * message
            e = np.exp(logits - logits.max())
            new_Q[:, a[0], a[1]] = e / e.sum()
        Q = new_Q
    return torch.from_numpy(Q)


def reference_lattice_filter(features, values):
    """Line-by-line port of densecrf's Permutohedral::init and seqCompute, float64, dict as hash.

    features (N, d), values (N, C) numpy -> (N, C) (including the reference's alpha constant).
    Rounding to nearest (Python's round), as the SSE code path the pip build uses.
    """
    N, d = features.shape
    canonical = [[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)]
    inv_std_dev = math.sqrt(2.0 / 3.0) * (d + 1)
    scale_factor = [inv_std_dev / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
    table = {}
    offsets, barycentrics = [], []
    for k in range(N):
        f = features[k]
        elevated = [0.0] * (d + 1)
        sm = 0.0
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale_factor[j - 1]
            elevated[j] = sm - j * cf
            sm += cf
        elevated[0] = sm
        rem0 = [0] * (d + 1)
        total = 0
        for i in range(d + 1):
            v = round(elevated[i] / (d + 1))
            rem0[i] = v * (d + 1)
            total += v
        rank = [0] * (d + 1)
        for i in range(d):
            di = elevated[i] - rem0[i]
            for j in range(i + 1, d + 1):
                if di < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        barycentric = [0.0] * (d + 2)
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) / (d + 1)
            barycentric[d - rank[i]] += v
            barycentric[d - rank[i] + 1] -= v
        barycentric[0] += 1.0 + barycentric[d + 1]
        for remainder in range(d + 1):
            key = tuple(rem0[i] + canonical[remainder][rank[i]] for i in range(d))
            offsets.append(table.setdefault(key, len(table)))
            barycentrics.append(barycentric[remainder])
    keys = list(table)  # insertion order = lattice index
    M, C = len(keys), values.shape[1]

    lattice = np.zeros((M + 1, C))  # row 0: "no neighbour"
    for k in range(N):
        for j in range(d + 1):
            lattice[offsets[k * (d + 1) + j] + 1] += barycentrics[k * (d + 1) + j] * values[k]
    for j in range(d + 1):
        new = lattice.copy()
        for i, key in enumerate(keys):
            n1 = [key[k] - 1 for k in range(d)]
            n2 = [key[k] + 1 for k in range(d)]
            if j < d:
                n1[j] = key[j] + d
                n2[j] = key[j] - d
            o1 = table.get(tuple(n1), -1) + 1
            o2 = table.get(tuple(n2), -1) + 1
            new[i + 1] = lattice[i + 1] + 0.5 * (lattice[o1] + lattice[o2])
        lattice = new
    alpha = 1.0 / (1 + 2.0 ** -d)
    out = np.zeros((N, C))
    for k in range(N):
        for j in range(d + 1):
            out[k] += barycentrics[k * (d + 1) + j] * lattice[offsets[k * (d + 1) + j] + 1] * alpha
    return out


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def noisy_probs(label, n_classes, generator, noise=1.5, margin=2.0):
    """Probability maps made from a label map (H, W): true class +margin, pixel and blob noise."""
    H, W = label.shape
    logits = torch.randn(n_classes, H, W, generator=generator) * noise
    blobs = torch.randn(1, n_classes, H // 8 + 1, W // 8 + 1, generator=generator)
    logits += 1.5 * torch.nn.functional.interpolate(blobs, size=(H, W), mode="bilinear")[0]
    logits += margin * torch.nn.functional.one_hot(label.clamp(0, n_classes - 1), n_classes).permute(2, 0, 1)
    return torch.softmax(logits, dim=0)                                          # (K, H, W)


def synthetic_scene(H=30, W=40, seed=0, noise=4.0):
    """A uint8 image (3, H, W) of 4 coloured regions with colour noise and its label map (H, W).

    With colour noise well above srgb (3) the lattice and the exact kernel differ more
    (docs/evaluation.md).
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    label = (ys > H // 2).long() * 2 + ((xs - ys // 3) > W // 2).long()          # 4 regions
    palette = torch.tensor([[200, 60, 40], [40, 150, 60], [60, 70, 190], [210, 200, 90]]).float()
    image = palette[label].permute(2, 0, 1) + noise * torch.randn(3, H, W, generator=g)
    return image.clamp(0, 255).to(torch.uint8), label


def camvid_frames(n, size=(60, 45)):
    """The first n CamVid val frames (uint8 (3, h, w), labels (h, w) with 11 = void), downscaled."""
    if not (CAMVID / "val").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID}")
    frames = []
    for path in sorted((CAMVID / "val").glob("*.png"))[:n]:
        image = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
        label = Image.open(CAMVID / "valannot" / path.name).resize(size, Image.NEAREST)
        frames.append((torch.from_numpy(np.array(image)).permute(2, 0, 1),
                       torch.from_numpy(np.array(label)).long()))
    return frames


# ---------------------------------------------------------------------------------------------
# Exact CRF = the loop reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_exact_crf_matches_loop_mean_field(iterations):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 4, 5), generator=g).to(torch.uint8)
    image[:, :, :2] //= 8                                  # some colour structure for the appearance term
    probs = torch.softmax(2 * torch.randn(3, 4, 5, generator=g, dtype=torch.float64), 0)
    probs[0, 0, 0], probs[1, 0, 0], probs[2, 0, 0] = 1.0, 0.0, 0.0       # exercises the 1e-5 clip
    # small sxy/srgb so that the kernels vary strongly inside the tiny image
    params = dict(sxy_gauss=1.0, compat_gauss=3.0, sxy_bilateral=2.0, srgb=20.0, compat_bilateral=4.0)
    expected = loop_mean_field(image, probs, iterations, **params)
    got = crf.dense_crf_exact(image[None], probs[None], iterations=iterations, **params)[0]
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=2e-6)
    # and the default constants
    expected = loop_mean_field(image, probs, iterations)
    got = crf.dense_crf_exact(image[None], probs[None], iterations=iterations)[0]
    assert torch.allclose(got.double(), expected, atol=2e-6)


def test_exact_crf_chunked_equals_unchunked():
    image, label = synthetic_scene(12, 10)
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(0))
    whole = crf.dense_crf_exact(image[None], probs[None], iterations=3)
    # 7 rows per chunk (not a divisor of 120), recomputed at every call
    chunked = crf.dense_crf_exact(image[None], probs[None], iterations=3, chunk_entries=7 * 120,
                                  cache_entries=0)
    assert torch.allclose(whole, chunked, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fast CRF: its parts against references, then the whole against the exact CRF
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 5])
def test_lattice_filter_matches_reference_port(d):
    g = torch.Generator().manual_seed(d)
    features = torch.rand(1, 6, 7, d, generator=g) * torch.tensor([3.0, 2.5, 4.0, 1.5, 3.5][:d])
    values = torch.rand(1, 6, 7, 3, generator=g)
    expected = reference_lattice_filter(features.reshape(-1, d).double().numpy(),
                                        values.reshape(-1, 3).double().numpy())
    alpha = 1.0 / (1 + 2.0 ** -d)                  # the reference's constant, left out by crf.py
    got = crf.lattice_filter(features)(values).reshape(-1, 3) * alpha
    assert torch.allclose(got.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


def test_separable_filter_equals_all_pairs_sum():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2, 13, 17, 3, generator=g)
    images = torch.zeros(2, 3, 13, 17)
    for sxy in (0.7, 1.0, 2.5):
        exact = crf.exact_gaussian_filter(crf.pixel_features(images, sxy))(values)
        conv = crf.separable_gaussian_filter(sxy)(values)
        assert torch.allclose(conv, exact, rtol=2e-4, atol=1e-5)


def test_fast_crf_agrees_with_exact_on_synthetic_image():
    image, label = synthetic_scene()
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(3))
    fast = crf.dense_crf(image[None], probs[None])
    exact = crf.dense_crf_exact(image[None], probs[None])
    agree = (fast.argmax(1) == exact.argmax(1)).float().mean().item()
    assert agree >= 0.98
    assert (fast - exact).abs().mean() < 0.01
    # the CRF did something: it fixed most of the noisy pixels
    before = (probs.argmax(0) == label).float().mean()
    after = (fast[0].argmax(0) == label).float().mean()
    assert after > before + 0.1


def test_fast_crf_agrees_with_exact_on_camvid():
    frames = camvid_frames(3)
    g = torch.Generator().manual_seed(0)
    for image, label in frames:
        probs = noisy_probs(label, 11, g)
        fast = crf.dense_crf(image[None], probs[None])
        exact = crf.dense_crf_exact(image[None], probs[None])
        agree = (fast.argmax(1) == exact.argmax(1)).float().mean().item()
        assert agree >= 0.97, agree
        assert (fast - exact).abs().mean() < 0.01
        # both improve the noisy prediction by about the same amount
        valid = label < 11
        acc = lambda q: (q.argmax(0) == label)[valid].float().mean().item()
        assert acc(fast[0]) > acc(probs) + 0.1
        assert abs(acc(fast[0]) - acc(exact[0])) < 0.02


def test_large_smoothness_sxy_uses_lattice_and_agrees():
    image, label = synthetic_scene()
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(5))
    params = dict(sxy_gauss=6.0, sxy_bilateral=20.0, srgb=10.0)
    fast = crf.dense_crf(image[None], probs[None], **params)
    exact = crf.dense_crf_exact(image[None], probs[None], **params)
    assert (fast.argmax(1) == exact.argmax(1)).float().mean() >= 0.97
    # the switch: below max_conv_sxy the convolution, above it the lattice (results differ a bit)
    conv = crf.dense_crf(image[None], probs[None], **params, max_conv_sxy=8.0)
    assert not torch.equal(conv, fast)
    assert (conv.argmax(1) == exact.argmax(1)).float().mean() >= 0.97


def test_batch_equals_one_image_at_a_time():
    scenes = [synthetic_scene(seed=s) for s in range(2)]
    images = torch.stack([s[0] for s in scenes])
    g = torch.Generator().manual_seed(0)
    probs = torch.stack([noisy_probs(s[1], 4, g) for s in scenes])
    batch = crf.dense_crf(images, probs)
    for b in range(2):
        assert torch.allclose(batch[b], crf.dense_crf(images[b:b + 1], probs[b:b + 1])[0], atol=1e-5)
    exact_batch = crf.dense_crf_exact(images, probs, iterations=2)
    exact_second = crf.dense_crf_exact(images[1:], probs[1:], iterations=2)[0]
    assert torch.allclose(exact_batch[1], exact_second, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("crf_fn", [crf.dense_crf, crf.dense_crf_exact])
def test_perfect_prediction_is_kept(crf_fn):
    image, label = synthetic_scene()
    frames = [(image, label, 4)]
    if (CAMVID / "val").is_dir():
        cam_image, cam_label = camvid_frames(1)[0]
        frames.append((cam_image, cam_label.clamp(max=10), 11))  # void as class 10: any labelling
    for image, label, n_classes in frames:
        probs = torch.nn.functional.one_hot(label, n_classes).permute(2, 0, 1).float()   # confident, correct
        refined = crf_fn(image[None], probs[None])[0]
        assert torch.equal(refined.argmax(0), label)


@pytest.mark.parametrize("crf_fn", [crf.dense_crf, crf.dense_crf_exact])
def test_salt_and_pepper_errors_are_removed(crf_fn):
    g = torch.Generator().manual_seed(0)
    H, W = 30, 40
    label = (torch.arange(W) >= W // 2).long().expand(H, W)                      # two halves
    image = torch.where(label.bool(), 200.0, 50.0).expand(3, H, W) + 5 * torch.randn(3, H, W, generator=g)
    flipped = torch.rand(H, W, generator=g) < 0.05                                # 5% isolated errors
    noisy = torch.where(flipped, 1 - label, label)
    probs = torch.where(torch.nn.functional.one_hot(noisy, 2).permute(2, 0, 1).bool(), 0.8, 0.2)
    errors_before = (probs.argmax(0) != label).sum()
    assert errors_before > 30
    # already one step removes most errors; 5 (odd, so an update that flips labels back and forth
    # cannot pass) and the default 10 steps remove all of them
    refined = crf_fn(image.clamp(0, 255)[None], probs[None], iterations=1)[0]
    assert (refined.argmax(0) != label).sum() < errors_before / 4
    for iterations in (5, 10):
        refined = crf_fn(image.clamp(0, 255)[None], probs[None], iterations=iterations)[0]
        assert torch.equal(refined.argmax(0), label)


def test_output_is_a_distribution_of_the_input_shape():
    image, label = synthetic_scene()
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(0)).half()
    for crf_fn in (crf.dense_crf, crf.dense_crf_exact):
        refined = crf_fn(image[None], probs[None], iterations=3)
        assert refined.shape == (1, 4, 30, 40) and refined.dtype == torch.float32
        assert torch.allclose(refined.sum(1), torch.ones(1, 30, 40), atol=1e-5)
        assert refined.min() >= 0


def test_zero_iterations_is_the_clipped_input():
    image, label = synthetic_scene()
    probs = torch.nn.functional.one_hot(label, 4).permute(2, 0, 1).float()
    refined = crf.dense_crf(image[None], probs[None], iterations=0)[0]
    clipped = probs.clamp(1e-5, 1)
    assert torch.allclose(refined, clipped / clipped.sum(0), atol=1e-6)


def test_uint8_and_float_images_give_the_same_result():
    image, label = synthetic_scene()
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(0))
    for crf_fn in (crf.dense_crf, crf.dense_crf_exact):
        assert torch.equal(crf_fn(image[None], probs[None], iterations=3),
                           crf_fn(image[None].float(), probs[None], iterations=3))
        assert torch.equal(crf_fn(image[None], probs[None], iterations=3),
                           crf_fn(image[None].double(), probs[None].double(), iterations=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    image, label = synthetic_scene()
    probs = noisy_probs(label, 4, torch.Generator().manual_seed(0))
    cpu = crf.dense_crf(image[None], probs[None])
    cuda = crf.dense_crf(image[None].cuda(), probs[None].cuda())
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Every public function works pasted alone (tests/pasting.py) and gives exactly the module's result
# ---------------------------------------------------------------------------------------------

def paste_inputs():
    """name -> a function that calls `fn` on a small input."""
    image, label = synthetic_scene(9, 11, seed=2)
    images = image[None]                                                          # (1, 3, 9, 11)
    probs = noisy_probs(label, 3, torch.Generator().manual_seed(1))[None]         # (1, 3, 9, 11)
    g = torch.Generator().manual_seed(3)
    values = torch.rand(1, 9, 11, 2, generator=g)                                 # (B, H, W, C)
    unary = torch.rand(1, 9, 11, 3, generator=g) * 3                              # (B, H, W, K)
    feats5 = crf.pixel_features(images.float(), 5.0, 20.0)                        # (1, 9, 11, 5)
    columns = torch.tensor([[2, -1, 0], [1, 3, -1]])
    csr_values = torch.tensor([[0.5, 9.0, 0.25], [1.0, 2.0, 9.0]])
    small = dict(sxy_bilateral=5.0, srgb=20.0)
    return {
        "unary_from_probs": lambda fn: fn(probs),
        "pixel_features": lambda fn: (fn(images.float(), 2.0), fn(images.float(), 5.0, 20.0)),
        "mean_field": lambda fn: fn(unary, [(3.0, crf.separable_gaussian_filter(1.0)),
                                            (0.0, crf.separable_gaussian_filter(2.0))], 3),
        "run_crf": lambda fn: fn(probs, [(3.0, crf.separable_gaussian_filter(1.0))], 2),
        "exact_gaussian_filter": lambda fn: (fn(feats5)(values),
                                             fn(feats5, chunk_entries=5 * 99, cache_entries=0)(values)),
        "dense_crf_exact": lambda fn: fn(images, probs, 3, **small, chunk_entries=4 * 99),
        "separable_gaussian_filter": lambda fn: fn(1.5)(values),
        "sparse_csr": lambda fn: fn(torch.tensor([0, 1, 3]), torch.tensor([1, 0, 2]),
                                    torch.tensor([1.0, 2.0, 3.0]), (2, 3)),
        "csr_from_rows": lambda fn: fn(columns, csr_values, 4),
        "permutohedral_lattice": lambda fn: fn(feats5),
        "lattice_filter": lambda fn: fn(feats5)(values),
        "dense_crf": lambda fn: (fn(images, probs, 3, **small), fn(images, probs, 2, sxy_gauss=6.0)),
    }


def test_every_public_function_has_a_paste_test():
    public = sorted(name for name, value in inspect.getmembers(crf, inspect.isfunction)
                    if value.__module__ == "crf" and not name.startswith("_"))
    assert public == sorted(paste_inputs())


@pytest.mark.parametrize("name", sorted(paste_inputs()))
def test_public_function_pasted_alone_gives_the_same_result(name):
    call = paste_inputs()[name]
    pasted = paste_alone("crf", name)
    # exactly equal (rtol = atol = 0): values, dtypes, shapes, nested dicts / tuples / lists
    torch.testing.assert_close(call(pasted), call(getattr(crf, name)), rtol=0, atol=0)
