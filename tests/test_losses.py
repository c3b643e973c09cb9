"""Tests of losses.py: every loss against a slow float64 loop reference, plus the behaviour its
source states (signs and shifts, gradients, collapse, batch balance, pasting alone)."""

import inspect
import math

import pytest
import torch

import losses
from pasting import paste_alone


# ------------------------------------------------------------------------------------------------
# slow references: python loops over pixels, float64
# ------------------------------------------------------------------------------------------------

def pixels(t):
    """(B, C, h, w) tensor -> list over images of lists over pixels (row-major) of channel lists."""
    batch, channels, height, width = t.shape
    data = t.double().tolist()
    return [[[data[b][c][y][x] for c in range(channels)] for y in range(height) for x in range(width)]
            for b in range(batch)]


def cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def ref_affinity(feats_a, feats_b):
    """Centred cosine: row-centred over j, then shifted to the raw mean of all entries."""
    pa, pb = pixels(feats_a), pixels(feats_b)
    raw = [[[cos(u, v) for v in pb[b]] for u in pa[b]] for b in range(len(pa))]
    entries = [x for image in raw for row in image for x in row]
    old_mean = sum(entries) / len(entries)
    centred = [[[x - sum(row) / len(row) for x in row] for row in image] for image in raw]
    entries = [x for image in centred for row in image for x in row]
    new_mean = sum(entries) / len(entries)
    return [[[x - new_mean + old_mean for x in row] for row in image] for image in centred]


def ref_smoothness(feats, probs, shift_close, shift_far, perm):
    pf, pp = pixels(feats), pixels(probs)
    batch = len(pf)

    def term(partner, shift):
        fd = ref_affinity(feats, feats[partner])
        total, count = 0.0, 0
        for b in range(batch):
            for i, p_i in enumerate(pp[b]):
                for j, p_j in enumerate(pp[partner[b]]):
                    total += (fd[b][i][j] - shift) * (1 - cos(p_i, p_j))
                    count += 1
        return total / count

    loss = term(list(range(batch)), shift_close)
    if batch > 1:
        loss += term(list(perm), shift_far)
    return loss


def ref_correspondence(feats_a, feats_b, codes_a, codes_b, shift):
    fd = ref_affinity(feats_a, feats_b)
    ca, cb = pixels(codes_a), pixels(codes_b)
    total, count = 0.0, 0
    for b in range(len(ca)):
        for i, u in enumerate(ca[b]):
            for j, v in enumerate(cb[b]):
                total += -max(cos(u, v), 0.0) * (fd[b][i][j] - shift)
                count += 1
    return total / count


def ref_sample(t, coords):
    """Bilinear sampling, align_corners=True, border padding, written out by hand."""
    batch, channels, height, width = t.shape
    data = t.double().tolist()
    grid = coords.double().tolist()
    out = []
    for b in range(batch):
        image = []
        for c in range(channels):
            rows = []
            for row in grid[b]:
                values = []
                for gx, gy in row:
                    x = min(max((gx + 1) / 2 * (width - 1), 0.0), width - 1)
                    y = min(max((gy + 1) / 2 * (height - 1), 0.0), height - 1)
                    x0, y0 = int(math.floor(x)), int(math.floor(y))
                    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
                    wx, wy = x - x0, y - y0
                    d = data[b][c]
                    values.append((1 - wy) * ((1 - wx) * d[y0][x0] + wx * d[y0][x1])
                                  + wy * ((1 - wx) * d[y1][x0] + wx * d[y1][x1]))
                rows.append(values)
            image.append(rows)
        out.append(image)
    return torch.tensor(out, dtype=torch.float64)


def ref_data_loss(inner_local, inner_global, temperature):
    local, glob = pixels(inner_local), pixels(inner_global)
    total, count = 0.0, 0
    for b in range(len(local)):
        for logits, scores in zip(local[b], glob[b]):
            target = max(range(len(scores)), key=lambda k: scores[k])
            scaled = [v / temperature for v in logits]
            log_norm = math.log(sum(math.exp(v) for v in scaled))
            total += log_norm - scaled[target]
            count += 1
    return total / count


def ref_feature_similarity(codes, fused, image_small, tau, sigma_xy, sigma_rgb):
    batch, n_clusters, height, width = fused.shape
    pc, pf, pi = pixels(codes), pixels(fused), pixels(image_small)
    positions = [(y, x) for y in range(height) for x in range(width)]
    l_fs, all_q = 0.0, []
    for b in range(batch):
        q = []
        for logits in pf[b]:
            exps = [math.exp(v / tau) for v in logits]
            q.append([e / sum(exps) for e in exps])
        numerator, denominator = 0.0, 0.0
        for i in range(len(q)):
            for j in range(len(q)):
                if i == j:
                    continue
                w_feat = max(cos(pc[b][i], pc[b][j]), 0.0)
                d_xy = sum((a - c) ** 2 for a, c in zip(positions[i], positions[j]))
                d_rgb = sum((a - c) ** 2 for a, c in zip(pi[b][i], pi[b][j]))
                w = w_feat * math.exp(-d_xy / (2 * sigma_xy ** 2) - d_rgb / (2 * sigma_rgb ** 2))
                numerator += w * sum((a - c) ** 2 for a, c in zip(q[i], q[j]))
                denominator += w
        l_fs += numerator / (2 * denominator)
        all_q.extend(q)
    # Gram form of L_reg over all pixels of the batch: (mean_ij q_i . q_j - 1/K) / (1 - 1/K)
    gram_mean = sum(sum(a * c for a, c in zip(all_q[i], all_q[j]))
                    for i in range(len(all_q)) for j in range(len(all_q))) / len(all_q) ** 2
    l_reg = (gram_mean - 1 / n_clusters) / (1 - 1 / n_clusters)
    return l_fs / batch, l_reg


def ref_feature_correlation(codes, fused, image_small, tau, sigma_xy, sigma_rgb):
    """L_fs = -mean_i sum_j (W_ij - mean_j W_ij) q_i . q_j per image, then the batch mean; L_reg as above."""
    batch, n_clusters, height, width = fused.shape
    pc, pf, pi = pixels(codes), pixels(fused), pixels(image_small)
    positions = [(y, x) for y in range(height) for x in range(width)]
    l_fs = 0.0
    for b in range(batch):
        q = []
        for logits in pf[b]:
            exps = [math.exp(v / tau) for v in logits]
            q.append([e / sum(exps) for e in exps])
        n = len(q)
        w = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j:
                    d_xy = sum((a - c) ** 2 for a, c in zip(positions[i], positions[j]))
                    d_rgb = sum((a - c) ** 2 for a, c in zip(pi[b][i], pi[b][j]))
                    w[i][j] = max(cos(pc[b][i], pc[b][j]), 0.0) * math.exp(-d_xy / (2 * sigma_xy ** 2)
                                                                         - d_rgb / (2 * sigma_rgb ** 2))
        total = 0.0
        for i in range(n):
            row_mean = sum(w[i]) / n
            for j in range(n):
                total += (w[i][j] - row_mean) * sum(a * c for a, c in zip(q[i], q[j]))
        l_fs += -total / n
    return l_fs / batch, ref_feature_similarity(codes, fused, image_small, tau, sigma_xy, sigma_rgb)[1]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# feature affinity, derangement
# ------------------------------------------------------------------------------------------------

def test_feature_affinity_matches_loop_reference_and_has_no_grad():
    feats_a = rand(2, 5, 3, 3, seed=0).requires_grad_()
    feats_b = rand(2, 5, 2, 4, seed=1)
    got = losses.feature_affinity(feats_a, feats_b)
    assert got.shape == (2, 9, 8)
    assert not got.requires_grad
    assert torch.allclose(got, torch.tensor(ref_affinity(feats_a, feats_b), dtype=torch.float64),
                          atol=1e-12)


@pytest.mark.parametrize("batch", [2, 3, 4, 7, 16])
def test_derangement_has_no_fixed_points_and_is_a_permutation(batch):
    generator = torch.Generator().manual_seed(batch)
    for _ in range(50):
        perm = losses.derangement(batch, generator, "cpu")
        assert perm.dtype == torch.long
        assert sorted(perm.tolist()) == list(range(batch))
        assert (perm != torch.arange(batch)).all()


def test_derangement_is_reproducible():
    a = losses.derangement(8, torch.Generator().manual_seed(3))
    b = losses.derangement(8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# SmooSeg smoothness and data terms
# ------------------------------------------------------------------------------------------------

def test_smoothness_matches_loop_reference():
    feats = rand(3, 4, 3, 3, seed=2)
    probs = torch.softmax(rand(3, 3, 3, 3, seed=3) / 0.1, dim=1)
    perm = torch.tensor([2, 0, 1])
    got = losses.smoothness_loss(feats, probs, -0.02, 0.5, perm)
    assert got.dtype == torch.float64
    assert abs(got.item() - ref_smoothness(feats, probs, -0.02, 0.5, perm.tolist())) < 1e-12


def test_smoothness_single_image_skips_far_term():
    feats = rand(1, 4, 3, 3, seed=4)
    probs = torch.softmax(rand(1, 3, 3, 3, seed=5), dim=1)
    got = losses.smoothness_loss(feats, probs, 0.1, 0.5, None)
    assert abs(got.item() - ref_smoothness(feats, probs, 0.1, 0.5, None)) < 1e-12


def test_smoothness_identical_probabilities_give_zero():
    feats = rand(2, 4, 3, 3, seed=6)
    probs = torch.softmax(rand(1, 3, 1, 1, seed=7), dim=1).expand(2, 3, 3, 3)
    got = losses.smoothness_loss(feats, probs, -0.02, 0.5, torch.tensor([1, 0]))
    assert abs(got.item()) < 1e-12


def test_smoothness_gradient_reaches_probs_only():
    feats = rand(2, 4, 3, 3, seed=8).requires_grad_()
    logits = rand(2, 3, 3, 3, seed=9).requires_grad_()
    loss = losses.smoothness_loss(feats, torch.softmax(logits / 0.1, dim=1), -0.02, 0.5,
                                  torch.tensor([1, 0]))
    loss.backward()
    assert feats.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_data_loss_matches_loop_reference_and_targets_have_no_grad():
    inner_local = rand(2, 3, 3, 3, seed=10).tanh().requires_grad_()
    inner_global = rand(2, 3, 3, 3, seed=11).tanh().requires_grad_()
    for temperature in (1.0, 0.1):
        got = losses.data_loss(inner_local, inner_global, temperature)
        expected = ref_data_loss(inner_local, inner_global, temperature)
        assert abs(got.item() - expected) < 1e-12
    got.backward()
    assert inner_global.grad is None
    assert inner_local.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# STEGO correspondence
# ------------------------------------------------------------------------------------------------

def test_random_coords_shape_range_and_reproducibility():
    coords = losses.random_coords(3, 5, torch.Generator().manual_seed(0), "cpu")
    assert coords.shape == (3, 5, 5, 2)
    assert coords.min() >= -1 and coords.max() <= 1
    assert coords.std() > 0.3
    again = losses.random_coords(3, 5, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(coords, again)


def test_sample_points_matches_hand_written_bilinear():
    t = rand(2, 3, 4, 5, seed=12)
    coords = rand(2, 3, 2, 2, seed=13).clamp(-1.3, 1.3)  # some points outside: border padding
    coords[0, 0, 0] = torch.tensor([-1.0, 1.0])  # exact corner
    got = losses.sample_points(t, coords)
    assert got.shape == (2, 3, 3, 2)
    assert torch.allclose(got, ref_sample(t, coords), atol=1e-12)


def test_correspondence_loss_matches_loop_reference():
    feats_a, feats_b = rand(2, 5, 3, 3, seed=14), rand(2, 5, 2, 3, seed=15)
    codes_a, codes_b = rand(2, 4, 3, 3, seed=16), rand(2, 4, 2, 3, seed=17)
    got = losses.correspondence_loss(feats_a, feats_b, codes_a, codes_b, 0.2)
    assert abs(got.item() - ref_correspondence(feats_a, feats_b, codes_a, codes_b, 0.2)) < 1e-12


def test_correspondence_loss_sign_and_shift():
    # identical features: F = 1 everywhere; identical codes: S = 1
    feats = torch.ones(2, 5, 3, 3, dtype=torch.float64)
    codes = rand(2, 4, 1, 1, seed=18).expand(2, 4, 3, 3)
    loss = losses.correspondence_loss(feats, feats, codes, codes, 0.5)
    assert abs(loss.item() - (-0.5)) < 1e-12  # F > shift, positive S: negative loss
    # raising the shift raises the loss (random inputs)
    feats_a, codes_a = rand(2, 5, 3, 3, seed=19), rand(2, 4, 3, 3, seed=20)
    shifts = [-0.5, 0.0, 0.3, 0.8]
    values = [losses.correspondence_loss(feats_a, feats_a, codes_a, codes_a, s).item()
              for s in shifts]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_correspondence_loss_gradient_to_codes_only():
    feats = rand(2, 5, 3, 3, seed=21).requires_grad_()
    codes = rand(2, 4, 3, 3, seed=22).requires_grad_()
    losses.correspondence_loss(feats, feats, codes, codes, 0.1).backward()
    assert feats.grad is None
    assert codes.grad.abs().sum() > 0


def test_correspondence_terms_match_composition_of_references():
    feats, codes = rand(3, 5, 4, 4, seed=23), rand(3, 4, 4, 4, seed=24)
    feats_aug, codes_aug = rand(3, 5, 4, 4, seed=25), rand(3, 4, 4, 4, seed=26)
    feats_knn, codes_knn = rand(3, 5, 4, 4, seed=51), rand(3, 4, 4, 4, seed=52)
    shifts = {"pos_intra": 0.1, "pos_inter": 0.05, "aug": 0.2, "neg_inter": 0.4}
    weights = {"pos_intra": 0.7, "pos_inter": 0.3, "aug": 0.9, "neg_inter": 0.6}
    partners = {"aug": (feats_aug, codes_aug), "knn": (feats_knn, codes_knn)}
    got = losses.correspondence_terms(feats, codes, partners, shifts, weights, torch.Generator().manual_seed(5),
                                      n_points=3, n_negatives=2)

    # the same random draws, in the documented order
    generator = torch.Generator().manual_seed(5)
    coords1 = losses.random_coords(3, 3, generator, "cpu")
    coords2 = losses.random_coords(3, 3, generator, "cpu")
    perms = losses.derangements(2, 3, generator, "cpu")
    f1, c1 = ref_sample(feats, coords1), ref_sample(codes, coords1)
    f2, c2 = ref_sample(feats, coords2), ref_sample(codes, coords2)
    intra = ref_correspondence(f1, f1, c1, c1, 0.1)  # STEGO: the same points with themselves
    knn = ref_correspondence(f1, ref_sample(feats_knn, coords2), c1, ref_sample(codes_knn, coords2), 0.05)
    aug = ref_correspondence(f1, ref_sample(feats_aug, coords2), c1, ref_sample(codes_aug, coords2), 0.2)
    neg = sum(ref_correspondence(f1, f2[p], c1, c2[p], 0.4) for p in perms) / 2
    for name, value in (("corr_intra", intra), ("corr_knn", knn), ("corr_aug", aug), ("corr_neg", neg)):
        assert abs(got[name].item() - value) < 1e-10, name
    assert abs(got["corr"].item() - (0.7 * intra + 0.3 * knn + 0.9 * aug + 0.6 * neg)) < 1e-10
    # a missing partner is a 0 term, the others unchanged
    only_aug = losses.correspondence_terms(feats, codes, {"aug": (feats_aug, codes_aug)}, shifts, weights,
                                           torch.Generator().manual_seed(5), n_points=3, n_negatives=2)
    assert only_aug["corr_knn"].item() == 0 and abs(only_aug["corr_aug"].item() - aug) < 1e-10


def test_correspondence_terms_single_image():
    feats, codes = rand(1, 5, 4, 4, seed=27), rand(1, 4, 4, 4, seed=28).requires_grad_()
    constants = losses.loss_constants("cityscapes")
    got = losses.correspondence_terms(feats, codes, {}, constants["stego_shifts"], constants["stego_weights"],
                                      torch.Generator(), n_points=3)
    assert got["corr_neg"].item() == 0 and got["corr_aug"].item() == 0 and got["corr_knn"].item() == 0
    got["corr"].backward()
    assert codes.grad.abs().sum() > 0


# The peers' constants as their configurations publish them, written down here from the files themselves:
# SmooSeg's configs/train_config.yaml ("cityscapes dino small" neg_inter_shift 0.5 = b_far, pos_intra_shift
# -0.02 = b_close; "cocostuff27 dino small" 0.48 / -0.02; "potsdam dino base" 0.5 / 0.1; "potsdam dinov2 base"
# 0.5 / 0.32) and STEGO's src/configs/train_config.yml (weights and shifts in the order pos_intra, pos_inter,
# neg_inter: "Cocostuff27 vit small" .67/.25/.63 and .08/.02/.66; "Potsdam vit small" the same weights and
# .08/.02/.46; "Cityscapes 10/3" 1/.577/.906 and .458/.175/.314, the configuration of STEGO's released
# cityscapes_vit_base checkpoint; "Cocostuff27 10/3 moco" .67/.25/.63 and .32/.36/.26).
PUBLISHED_SMOOSEG = {("cityscapes", "vits8"): (-0.02, 0.5), ("cocostuff", "vits8"): (-0.02, 0.48),
                     ("potsdam", "vitb8"): (0.1, 0.5), ("potsdam", "dinov2-vitb14"): (0.32, 0.5)}
PUBLISHED_STEGO = {("cocostuff", "vits8"): ((0.67, 0.25, 0.63), (0.08, 0.02, 0.66)),
                   ("potsdam", "vits8"): ((0.67, 0.25, 0.63), (0.08, 0.02, 0.46)),
                   ("cityscapes", "vitb8"): ((1.0, 0.577, 0.906), (0.458, 0.175, 0.314)),
                   ("cocostuff", "resnet50-mocov2"): ((0.67, 0.25, 0.63), (0.32, 0.36, 0.26))}
STEGO_KEYS = ("pos_intra", "pos_inter", "neg_inter")
ARCHS = ["vits8", "vits16", "vitb8", "dinov2-vits14", "dinov2-vitb14", "resnet50-mocov2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dataset", ["cityscapes", "cocostuff", "potsdam", "mastr1325", "camvid", "folder"])
def test_loss_constants_are_the_published_ones_where_published_and_say_so(dataset, arch):
    got = losses.loss_constants(dataset, arch)
    if (dataset, arch) in PUBLISHED_SMOOSEG:
        assert (got["smooseg_shifts"]["close"], got["smooseg_shifts"]["far"]) == PUBLISHED_SMOOSEG[dataset, arch]
    assert got["published"]["smooseg"] is ((dataset, arch) in PUBLISHED_SMOOSEG)
    if (dataset, arch) in PUBLISHED_STEGO:
        weights, shifts = PUBLISHED_STEGO[dataset, arch]
        assert tuple(got["stego_weights"][k] for k in STEGO_KEYS) == weights
        assert tuple(got["stego_shifts"][k] for k in STEGO_KEYS) == shifts
    assert got["published"]["stego"] is ((dataset, arch) in PUBLISHED_STEGO)
    # the paper's jittered pair has no published constant: it takes pos_intra's
    assert got["stego_shifts"]["aug"] == got["stego_shifts"]["pos_intra"]
    assert got["stego_weights"]["aug"] == got["stego_weights"]["pos_intra"]


def test_loss_constants_fall_back_to_the_same_data_set_then_to_cocostuff():
    weights, shifts = PUBLISHED_STEGO["cityscapes", "vitb8"]  # Cityscapes with ViT-S/8: the ViT-B/8 values
    assert tuple(losses.loss_constants("cityscapes", "vits8")["stego_shifts"][k] for k in STEGO_KEYS) == shifts
    _, shifts = PUBLISHED_STEGO["cocostuff", "vits8"]  # a data set no peer tuned: COCO-Stuff's ViT-S/8 values
    assert tuple(losses.loss_constants("camvid", "dinov2-vits14")["stego_shifts"][k] for k in STEGO_KEYS) == shifts
    _, shifts = PUBLISHED_STEGO["cocostuff", "resnet50-mocov2"]  # ...or its MoCo ones for a ResNet
    assert tuple(losses.loss_constants("camvid", "resnet50-mocov2")["stego_shifts"][k] for k in STEGO_KEYS) == shifts
    assert losses.loss_constants("cocostuff27") == losses.loss_constants("cocostuff")
    first = losses.loss_constants("potsdam")
    first["stego_shifts"]["neg_inter"] = 99.0  # the caller's copy: the next call is untouched
    assert losses.loss_constants("potsdam")["stego_shifts"]["neg_inter"] == 0.46


# ------------------------------------------------------------------------------------------------
# eq (14): L_fs, L_reg
# ------------------------------------------------------------------------------------------------

def test_feature_similarity_losses_match_loop_reference():
    codes = rand(2, 4, 3, 3, seed=29)
    fused = rand(2, 3, 3, 3, seed=30)
    image = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(31),
                       dtype=torch.float64)
    for tau, sigma_xy, sigma_rgb in ((0.1, 3.0, 0.1), (0.5, 1.0, 0.4)):
        l_fs, l_reg = losses.feature_similarity_losses(codes, fused, image, tau, sigma_xy, sigma_rgb)
        ref_fs, ref_reg = ref_feature_similarity(codes, fused, image, tau, sigma_xy, sigma_rgb)
        assert abs(l_fs.item() - ref_fs) < 1e-12
        assert abs(l_reg.item() - ref_reg) < 1e-12


def test_feature_correlation_losses_match_loop_reference():
    codes = rand(2, 4, 3, 3, seed=29)
    fused = rand(2, 3, 3, 3, seed=30)
    image = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    for tau, sigma_xy, sigma_rgb in ((0.1, 3.0, 0.1), (0.5, 1.0, 0.4)):
        l_fs, l_reg = losses.feature_correlation_losses(codes, fused, image, tau, sigma_xy, sigma_rgb)
        ref_fs, ref_reg = ref_feature_correlation(codes, fused, image, tau, sigma_xy, sigma_rgb)
        assert abs(l_fs.item() - ref_fs) < 1e-12 and abs(l_reg.item() - ref_reg) < 1e-12


def test_the_correlation_reading_pulls_alike_pixels_together_and_pushes_the_others_apart():
    codes = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    codes[:, 0, :, :2] = 1  # columns 0-1 alike, column 2 another object
    codes[:, 1, :, 2] = 1
    image = torch.full((1, 3, 3, 3), 0.5, dtype=torch.float64)
    along = torch.tensor([[[0, 0, 1], [0, 0, 1], [0, 0, 1]]])  # clusters follow the objects
    across = torch.tensor([[[0, 1, 1], [0, 1, 1], [0, 1, 1]]])  # a boundary through an object
    merged = torch.zeros(1, 3, 3, dtype=torch.long)  # one cluster for both objects
    values = [losses.feature_correlation_losses(codes, one_hot_logits(a, 3), image)[0].item()
              for a in (along, across, merged)]
    assert values[0] < values[1] and values[0] < values[2]


def one_hot_logits(assignment, n_clusters, scale=100.0):
    """assignment (B, h, w) long -> fused logits (B, K, h, w) that give near one-hot q."""
    one_hot = torch.nn.functional.one_hot(assignment, n_clusters).permute(0, 3, 1, 2)
    return scale * one_hot.double()


def test_regulariser_collapse_balanced_and_monotone():
    codes = rand(1, 4, 3, 3, seed=32)
    image = torch.full((1, 3, 3, 3), 0.5, dtype=torch.float64)
    balanced = torch.tensor([[[0, 1, 2], [1, 2, 0], [2, 0, 1]]])  # 3 pixels per cluster
    partial = torch.tensor([[[0, 0, 2], [0, 2, 0], [2, 0, 0]]])  # 6 / 0 / 3
    collapse = torch.zeros(1, 3, 3, dtype=torch.long)  # all pixels in cluster 0
    values = [losses.feature_similarity_losses(codes, one_hot_logits(a, 3), image)[1].item()
              for a in (balanced, partial, collapse)]
    assert abs(values[0]) < 1e-9
    assert abs(values[2] - 1) < 1e-9
    assert values[0] < values[1] < values[2]
    # K = 1 cannot collapse: 0
    assert losses.feature_similarity_losses(codes, rand(1, 1, 3, 3, seed=33), image)[1].item() == 0


def test_fs_zero_for_equal_q_and_grows_when_similar_pixels_differ():
    codes = torch.ones(1, 4, 3, 3, dtype=torch.float64)  # all pixels alike in features
    image = torch.full((1, 3, 3, 3), 0.3, dtype=torch.float64)  # and in colour
    same = rand(1, 3, 1, 1, seed=34).expand(1, 3, 3, 3)
    assert abs(losses.feature_similarity_losses(codes, same, image)[0].item()) < 1e-12
    noise = rand(1, 3, 3, 3, seed=35)
    values = [losses.feature_similarity_losses(codes, same + s * noise, image, tau=1.0)[0].item()
              for s in (0.1, 0.5, 2.0)]
    assert 0 < values[0] < values[1] < values[2]
    # a label boundary along a colour edge costs (almost) nothing, one across a uniform region does
    image_two = torch.full((1, 3, 3, 3), 0.2, dtype=torch.float64)
    image_two[..., 2] = 0.9  # column 2 has another colour
    along_edge = torch.tensor([[[0, 0, 1], [0, 0, 1], [0, 0, 1]]])
    across_region = torch.tensor([[[0, 1, 1], [0, 1, 1], [0, 1, 1]]])
    l_along = losses.feature_similarity_losses(codes, one_hot_logits(along_edge, 3), image_two)[0]
    l_across = losses.feature_similarity_losses(codes, one_hot_logits(across_region, 3), image_two)[0]
    assert l_across.item() > 0.1 and l_along.item() < 1e-9 * l_across.item()
    # the same with a feature edge: codes orthogonal across the boundary, colours all equal
    codes_two = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    codes_two[:, 0, :, :2] = 1
    codes_two[:, 1, :, 2] = 1
    l_along = losses.feature_similarity_losses(codes_two, one_hot_logits(along_edge, 3), image)[0]
    l_across = losses.feature_similarity_losses(codes_two, one_hot_logits(across_region, 3), image)[0]
    assert l_across.item() > 0.1 and l_along.item() < 1e-12


def test_eq14_gradient_reaches_fused_only():
    codes = rand(2, 4, 3, 3, seed=37).requires_grad_()
    fused = rand(2, 3, 3, 3, seed=38).requires_grad_()
    image = torch.rand(2, 3, 3, 3, dtype=torch.float64).requires_grad_()
    l_fs, l_reg = losses.feature_similarity_losses(codes, fused, image)
    (l_fs + l_reg).backward()
    assert codes.grad is None and image.grad is None
    assert fused.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# CUDA agrees with CPU (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    codes, fused = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    feats, image = torch.randn(2, 16, 5, 5), torch.rand(2, 3, 5, 5)
    cpu = losses.feature_similarity_losses(codes, fused, image)
    gpu = losses.feature_similarity_losses(codes.cuda(), fused.cuda(), image.cuda())
    for a, b in zip(cpu, gpu):
        assert abs(a.item() - b.item()) < 1e-4
    probs = torch.softmax(fused / 0.1, dim=1)
    perm = torch.tensor([1, 0])
    a = losses.smoothness_loss(feats, probs, -0.02, 0.5, perm)
    b = losses.smoothness_loss(feats.cuda(), probs.cuda(), -0.02, 0.5, perm.cuda())
    assert abs(a.item() - b.item()) < 1e-4
    constants = losses.loss_constants("camvid")
    shifts, weights = constants["stego_shifts"], constants["stego_weights"]
    a = losses.correspondence_terms(feats, codes, {"aug": (feats, codes)}, shifts, weights,
                                    torch.Generator().manual_seed(0))["corr"]
    b = losses.correspondence_terms(feats.cuda(), codes.cuda(), {"aug": (feats.cuda(), codes.cuda())}, shifts,
                                    weights, torch.Generator().manual_seed(0))["corr"]
    assert abs(a.item() - b.item()) < 1e-4


def test_reg_balances_clusters_over_the_batch_not_per_image():
    # image 0 is all cluster 0, image 1 all cluster 1: each image alone is "collapsed", the batch is balanced
    fused = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    fused[0, 0] = 10.0
    fused[1, 1] = 10.0
    codes = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    image = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    _, balanced = losses.feature_similarity_losses(codes, fused, image)
    fused[1] = fused[0]
    _, collapsed = losses.feature_similarity_losses(codes, fused, image)
    assert balanced.item() < 1e-6 and collapsed.item() > 1 - 1e-6


# ------------------------------------------------------------------------------------------------
# every public function works pasted alone (tests/pasting.py) and gives exactly the module's result
# ------------------------------------------------------------------------------------------------

def paste_inputs():
    """name -> a function that calls `fn` on a small input (fresh generators: repeatable draws)."""
    feats, codes = rand(3, 5, 4, 4, seed=40), rand(3, 4, 4, 4, seed=41)
    feats_aug, codes_aug = rand(3, 5, 4, 4, seed=42), rand(3, 4, 4, 4, seed=43)
    probs = torch.softmax(rand(3, 3, 4, 4, seed=44) / 0.1, dim=1)
    image = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(45), dtype=torch.float64)
    coords = rand(3, 2, 3, 2, seed=46).clamp(-1.2, 1.2)
    constants = losses.loss_constants("cityscapes")
    shifts, weights = constants["stego_shifts"], constants["stego_weights"]

    def gen():
        return torch.Generator().manual_seed(7)

    return {
        "loss_constants": lambda fn: [fn(d, a) for d in ("potsdam", "camvid", "cityscapes")
                                      for a in ("vits8", "vitb8", "resnet50-mocov2")],
        "derangements": lambda fn: fn(4, 5, gen()),
        "derangement": lambda fn: fn(5, gen(), "cpu"),
        "feature_affinity": lambda fn: fn(feats, feats_aug),
        "smoothness_loss": lambda fn: (fn(feats, probs, -0.02, 0.5, torch.tensor([2, 0, 1])),
                                       fn(feats, probs, 0.48, 0.5, torch.tensor([1, 2, 0])),
                                       fn(feats[:1], probs[:1], 0.1, 0.5, None)),
        "data_loss": lambda fn: fn(rand(3, 3, 4, 4, seed=47), probs, 0.5),
        "random_coords": lambda fn: fn(3, 4, gen(), "cpu"),
        "sample_points": lambda fn: fn(codes, coords),
        "correspondence_loss": lambda fn: fn(feats, feats_aug, codes, codes_aug, 0.2),
        "correspondence_terms": lambda fn: (
            fn(feats, codes, {"aug": (feats_aug, codes_aug), "knn": (feats_aug.flip(0), codes_aug.flip(0))},
               shifts, weights, gen(), n_points=3, n_negatives=2),
            fn(feats[:1], codes[:1], {}, shifts, weights, gen(), n_points=3)),
        "feature_similarity_losses": lambda fn: fn(codes, probs, image, 0.5, 2.0, 0.3),
        "feature_correlation_losses": lambda fn: fn(codes, probs, image, 0.5, 2.0, 0.3),
        "pair_weights": lambda fn: fn(codes, image, 2.0, 0.3),
        "balance_regulariser": lambda fn: fn(probs.flatten(2).transpose(1, 2)),
    }


def test_every_public_function_has_a_paste_test():
    public = sorted(name for name, value in inspect.getmembers(losses, inspect.isfunction)
                    if value.__module__ == "losses" and not name.startswith("_"))
    assert public == sorted(paste_inputs())


@pytest.mark.parametrize("name", sorted(paste_inputs()))
def test_public_function_pasted_alone_gives_the_same_result(name):
    call = paste_inputs()[name]
    pasted = paste_alone("losses", name)
    # exactly equal (rtol = atol = 0): values, dtypes, shapes, nested dicts / tuples / lists
    torch.testing.assert_close(call(pasted), call(getattr(losses, name)), rtol=0, atol=0)
