"""Tests of evaluate.py: confusion matrix, Hungarian metrics, cosine k-means, prediction, PNGs, whole protocol."""

import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import il2vseg
import results
from pasting import paste_alone


# ----------------------------------------------------------------------------------------------------
# confusion matrix
# ----------------------------------------------------------------------------------------------------

def test_confusion_matrix_matches_python_loop_and_ignores_void():
    generator = torch.Generator().manual_seed(0)
    n_classes, n_pred = 4, 5
    label = torch.randint(-1, n_classes + 2, (2, 7, 9), generator=generator)  # -1 and ids >= n_classes = void
    label[0, 0, 0] = 255
    pred = torch.randint(0, n_pred, (2, 7, 9), generator=generator)
    reference = np.zeros((n_classes, n_pred), dtype=np.int64)
    for y, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= y < n_classes:
            reference[y, p] += 1
    confusion = evaluate.confusion_matrix(pred, label, n_pred, n_classes)
    assert confusion.dtype == torch.int64 and confusion.shape == (n_classes, n_pred)
    assert np.array_equal(confusion.numpy(), reference)
    assert confusion.sum() == ((label >= 0) & (label < n_classes)).sum()


def test_confusion_matrix_ignores_any_prediction_on_a_void_pixel():
    assert evaluate.confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, -1]), 2, 2).tolist() == [[1, 0], [0, 0]]


# ----------------------------------------------------------------------------------------------------
# Hungarian matching and scores
# ----------------------------------------------------------------------------------------------------

def brute_force_scores(confusion):
    """Reference: try every injective map between classes and clusters (rows = classes, columns = clusters).
    Returns (acc, miou, iou, number of optimal maps)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n_classes, n_pred = confusion.shape
    candidates = []  # dicts class -> cluster
    if n_pred >= n_classes:
        for clusters in itertools.permutations(range(n_pred), n_classes):  # class c -> clusters[c]
            candidates.append({c: clusters[c] for c in range(n_classes)})
    else:
        for classes in itertools.permutations(range(n_classes), n_pred):  # cluster j -> classes[j]
            candidates.append({classes[j]: j for j in range(n_pred)})
    totals = [sum(confusion[c, j] for c, j in m.items()) for m in candidates]
    best = max(totals)
    n_optimal = sum(1 for t in totals if t == best)
    best_map = candidates[totals.index(best)]
    iou = []
    for c in range(n_classes):
        tp = confusion[c, best_map[c]] if c in best_map else 0.0
        predicted = confusion[:, best_map[c]].sum() if c in best_map else 0.0
        union = confusion[c].sum() + predicted - tp
        iou.append(tp / union if union > 0 else float("nan"))
    present = [v for v in iou if not math.isnan(v)]
    return best / confusion.sum(), sum(present) / len(present), iou, n_optimal


def test_scores_permuted_perfect_prediction():
    permutation = [2, 0, 3, 1]  # cluster j holds class permutation[j]
    confusion = np.zeros((4, 4), dtype=np.int64)
    for cluster, class_id in enumerate(permutation):
        confusion[class_id, cluster] = 10 * (cluster + 1)
    result = evaluate.scores(confusion)
    assert result["acc"] == 1.0 and result["miou"] == 1.0
    assert result["iou"] == [1.0] * 4
    assert result["matching"] == permutation
    assert np.array_equal(np.array(result["confusion"]), np.diag(np.diag(np.array(result["confusion"]))))


def test_scores_hand_computed():
    # rows = classes, columns = clusters. Greedy row-wise matching would give class 0 -> cluster 1,
    # the optimum is the identity: 3 + 5 + 2 = 10 of 14 pixels.
    confusion = np.array([[3, 4, 0],
                          [0, 5, 0],
                          [0, 0, 2]])
    result = evaluate.scores(confusion)
    assert result["matching"] == [0, 1, 2]
    assert result["acc"] == pytest.approx(10 / 14)
    iou = [3 / (7 + 3 - 3), 5 / (5 + 9 - 5), 2 / (2 + 2 - 2)]
    assert result["iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou) / 3)
    assert result["n_pixels"] == 14

    # A permuted version: cluster 0 <-> class 2, cluster 2 <-> class 0.
    permuted = confusion[:, [2, 1, 0]]
    again = evaluate.scores(permuted)
    assert again["matching"] == [2, 1, 0]
    assert again["acc"] == pytest.approx(10 / 14) and again["miou"] == pytest.approx(sum(iou) / 3)


def test_scores_classes_absent_from_labels():
    # class 2: no ground truth and nothing predicted for it -> nan, left out of mIoU.
    confusion = np.array([[6, 0, 0],
                          [1, 3, 0],
                          [0, 0, 0]])
    result = evaluate.scores(confusion)
    assert result["acc"] == pytest.approx(9 / 10)
    assert math.isnan(result["iou"][2])
    assert result["iou"][:2] == pytest.approx([6 / 7, 3 / 4])
    assert result["miou"] == pytest.approx((6 / 7 + 3 / 4) / 2)
    # class 2: no ground truth but a cluster matched to it predicts labelled pixels -> IoU 0 (peers count it).
    confusion = np.array([[6, 0, 2],
                          [0, 3, 0],
                          [0, 0, 0]])
    result = evaluate.scores(confusion)
    assert result["iou"] == pytest.approx([6 / 8, 1.0, 0.0])
    assert result["miou"] == pytest.approx((6 / 8 + 1.0 + 0.0) / 3)


def test_scores_more_and_fewer_clusters_than_classes():
    # 2 classes, 3 clusters: one cluster is unmatched (-1) and its pixels count as errors.
    confusion = np.array([[5, 0, 2],
                          [0, 4, 1]])
    result = evaluate.scores(confusion)
    assert result["matching"] == [0, 1, -1]
    assert result["acc"] == pytest.approx(9 / 12)
    assert result["iou"] == pytest.approx([5 / 7, 4 / 5])
    # 3 classes, 2 clusters: one class is never predicted.
    confusion = np.array([[5, 1],
                          [0, 4],
                          [3, 0]])
    result = evaluate.scores(confusion)
    assert sorted(result["matching"]) == [0, 1]
    assert result["iou"][2] == 0.0


def test_scores_against_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    checked = 0
    for n_classes, n_pred in [(3, 3), (4, 4), (3, 5), (4, 2), (5, 5)]:
        for _ in range(5):
            confusion = rng.integers(0, 1000, size=(n_classes, n_pred))
            confusion[rng.integers(0, n_classes)] = 0  # one class absent from the labels
            acc, miou, iou, n_optimal = brute_force_scores(confusion)
            result = evaluate.scores(confusion)
            assert result["acc"] == pytest.approx(acc)
            if n_optimal == 1:  # with ties (the absent class may take any spare cluster) IoUs may differ
                checked += 1
                assert result["miou"] == pytest.approx(miou)
                assert np.allclose(result["iou"], iou, equal_nan=True)
    assert checked >= 15


def test_scores_without_pixels_is_nan():
    result = evaluate.scores(np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(result["acc"]) and math.isnan(result["miou"])


# ----------------------------------------------------------------------------------------------------
# cosine k-means
# ----------------------------------------------------------------------------------------------------

def separated_points(seed=0, k=4, dim=16, per_cluster=300, noise=0.05):
    generator = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(k, dim, generator=generator), dim=1)  # (k, D)
    truth = torch.arange(k).repeat_interleave(per_cluster)  # (N,)
    points = directions[truth] + noise * torch.randn(k * per_cluster, dim, generator=generator)
    scale = torch.rand(k * per_cluster, 1, generator=generator) * 3 + 0.5  # cosine k-means ignores the norm
    order = torch.randperm(k * per_cluster, generator=generator)
    return directions, truth[order], (points * scale)[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_directions(seed):
    directions, truth, points = separated_points(seed=seed)
    centres, assignments, _ = evaluate.kmeans_cosine(points, 4, n_iter=5, batch_size=256, seed=seed)
    assert centres.shape == (4, 16) and assignments.shape == (1200,) and assignments.dtype == torch.long
    assert torch.allclose(centres.norm(dim=1), torch.ones(4), atol=1e-5)
    confusion = evaluate.confusion_matrix(assignments, truth, 4, 4)
    assert evaluate.scores(confusion)["acc"] == 1.0
    # every true direction has a centre within 3 degrees
    angles = torch.rad2deg(torch.acos((directions @ centres.T).clamp(-1, 1)))  # (k, k)
    assert angles.min(dim=1).values.max() < 3.0
    # assignments are the nearest centres
    assert torch.equal(assignments, (F.normalize(points, dim=1) @ centres.T).argmax(1))


def test_kmeans_deterministic_under_seed_and_verbose(capsys):
    _, _, points = separated_points(seed=3, noise=0.3)
    first = evaluate.kmeans_cosine(points, 4, n_iter=3, batch_size=100, seed=7, verbose=True)
    second = evaluate.kmeans_cosine(points, 4, n_iter=3, batch_size=100, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]
    printed = capsys.readouterr().out
    assert printed.count("kmeans run") == 1 and f"{first[2]:.5f}" in printed


def spherical_lloyd_reference(unit, centres, n_steps=100):
    """Full-batch spherical k-means (Lloyd) in float64 with python-level clarity: assign, mean, normalise."""
    centres = centres.double()
    for _ in range(n_steps):
        assignment = (unit @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres)
        for point, cluster in zip(unit, assignment.tolist()):
            sums[cluster] += point
        centres = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=1), centres)
    return centres


def test_kmeans_loss_close_to_full_lloyd():
    _, _, points = separated_points(seed=0, k=6, dim=8, per_cluster=250, noise=0.35)  # overlapping clusters
    unit = F.normalize(points, dim=1).double()

    def loss(centres):
        return (1 - (unit @ centres.double().T).max(dim=1).values).mean().item()

    initial, _, _ = evaluate.kmeans_cosine(points, 6, n_iter=0, seed=0)
    trained, assignments, reported = evaluate.kmeans_cosine(points, 6, n_iter=10, batch_size=128, seed=0)
    assert reported == pytest.approx(loss(trained), abs=1e-5)
    lloyd = spherical_lloyd_reference(unit, initial, n_steps=30)
    assert loss(trained) < loss(initial) - 0.05
    assert loss(trained) < loss(lloyd) * 1.01  # mini-batch ends within 1 % of full Lloyd from the same start
    assert torch.bincount(assignments, minlength=6).min() > 0


def test_kmeans_with_duplicated_points():
    # exactly k points, some duplicated: still k unit centres
    centres, assignments, _ = evaluate.kmeans_cosine(torch.ones(3, 4), 3, n_iter=2)
    assert centres.shape == (3, 4) and torch.isfinite(centres).all()


# ----------------------------------------------------------------------------------------------------
# prediction
# ----------------------------------------------------------------------------------------------------

def bilinear_reference(grid, out_h, out_w):
    """Bilinear upsampling, align_corners=False, in python loops: grid is a list of rows."""
    in_h, in_w = len(grid), len(grid[0])

    def source(index, in_size, out_size):
        position = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(position)), in_size - 1)
        high = min(low + 1, in_size - 1)
        return low, high, position - low

    out = [[0.0] * out_w for _ in range(out_h)]
    for y in range(out_h):
        y0, y1, ty = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, tx = source(x, in_w, out_w)
            out[y][x] = ((1 - ty) * ((1 - tx) * grid[y0][x0] + tx * grid[y0][x1])
                         + ty * ((1 - tx) * grid[y1][x0] + tx * grid[y1][x1]))
    return out


def test_cluster_probs_of_the_models_scores_match_a_loop_reference():
    """softmax(2 cos(code upsampled bilinearly to the label size, centre)): SmooSeg's prediction, from
    il2vseg's scores (eq (2), no --eval-alpha) and evaluate's softmax."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(2, 3, 2, 3, generator=generator)  # (B, D, h, w)
    centres = torch.randn(4, 3, generator=generator) * 5  # (K, D), not normalised
    score_fn = il2vseg.make_score_fn(types.SimpleNamespace(eval_alpha=0.0), 4, 8)
    out = evaluate.cluster_probs(score_fn, None, codes, centres, (5, 7), scale=2.0)
    assert out.shape == (2, 4, 5, 7)
    c = codes.double().tolist()
    for b in range(2):
        up = [bilinear_reference(c[b][d], 5, 7) for d in range(3)]
        for y in range(5):
            for x in range(7):
                vector = [up[d][y][x] for d in range(3)]
                norm = math.sqrt(sum(v * v for v in vector))
                logits = []
                for k in range(4):
                    centre = centres[k].double().tolist()
                    centre_norm = math.sqrt(sum(v * v for v in centre))
                    cos = sum(a * b_ for a, b_ in zip(vector, centre)) / (norm * centre_norm)
                    logits.append(2.0 * cos)
                total = sum(math.exp(v) for v in logits)
                assert out[b, :, y, x].tolist() == pytest.approx([math.exp(v) / total for v in logits], abs=1e-6)


def test_flip_tta():
    ramp = torch.arange(6.0).view(1, 1, 1, 6)

    def code_fn(images):  # not flip-equivariant: depends on the absolute column
        return images[:, :2] * ramp

    images = torch.rand(2, 3, 4, 6)
    expected = (code_fn(images) + (images[:, :2].flip(-1) * ramp).flip(-1)) / 2
    assert torch.allclose(evaluate.flip_tta(code_fn, images), expected)
    # a flip-equivariant code_fn is unchanged
    assert torch.allclose(evaluate.flip_tta(lambda x: 2 * x, images), 2 * images)


# ----------------------------------------------------------------------------------------------------
# colours and images
# ----------------------------------------------------------------------------------------------------

def test_kmeans_restarts_keep_the_lowest_loss_and_continue_one_stream():
    _, _, points = separated_points(seed=5, k=6, dim=8, per_cluster=100, noise=0.4)
    single = evaluate.kmeans_cosine(points, 6, n_iter=2, batch_size=64, seed=3)
    several = evaluate.kmeans_cosine(points, 6, n_iter=2, batch_size=64, seed=3, n_init=4, verbose=False)
    assert several[2] <= single[2]  # run 0 of the restarts is the single run: never worse
    unit = F.normalize(points, dim=1)
    assert several[2] == pytest.approx((1 - (unit @ several[0].T).max(dim=1).values).mean().item(), abs=1e-5)
    # the kept run is the one with the lowest loss among those printed
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.kmeans_cosine(points, 6, n_iter=2, batch_size=64, seed=3, n_init=4, verbose=True)
    losses = [float(line.rsplit(" ", 1)[1]) for line in printed.getvalue().splitlines()]
    assert len(losses) == 4 and min(losses) == pytest.approx(several[2], abs=1e-5)
    assert losses[0] == pytest.approx(single[2], abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# the whole protocol with a fake code network
# ----------------------------------------------------------------------------------------------------

CLASS_COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])  # class c -> RGB


def fake_batches(n_batches=3, batch_size=2, size=32, seed=0):
    """Images whose colour encodes the class, labels with some void pixels. The classes form 8-pixel stripes
    (vertical in even images, horizontal in odd ones): bilinear upsampling of 8x8-pooled codes then mixes
    at most two classes, with the pixel's own class weighted > 1/2, so the fake predictions are exact
    (at corners of 2-D blocks three classes mix and the protocol itself errs)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        stripes = torch.randint(0, 3, (batch_size, size // 8), generator=generator).repeat_interleave(8, 1)
        labels = stripes[:, None, :].expand(batch_size, size, size).clone()  # (B, H, W) vertical stripes
        labels[1::2] = labels[1::2].transpose(1, 2).clone()  # horizontal stripes in odd images
        images = CLASS_COLOURS[labels].permute(0, 3, 1, 2)  # (B, 3, H, W)
        images = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        labels = labels.clone()
        labels[:, :2, :] = -1  # void rows
        labels[:, 2, :3] = 255  # other void ids
        names = [f"img_{b}_{i}.png" for i in range(batch_size)]
        batches.append({"image": images, "label": labels, "name": names})
    return batches


def make_code_fn(calls):
    def code_fn(images):  # (B, 3, H, W) -> (B, 3 + 1, h, w): 8x8 mean colour (the "one-hot" class) + a constant
        calls.append(images.shape[0])
        pooled = F.avg_pool2d(images, 8)  # (B, 3, h, w)
        return torch.cat([pooled - 0.3, torch.zeros_like(pooled[:, :1])], dim=1)
    return code_fn


def true_centres():
    """The fake codes' cluster directions: class colour - 0.3 plus the constant channel."""
    return F.normalize(torch.cat([CLASS_COLOURS - 0.3, torch.zeros(3, 1)], dim=1), dim=1)


def cosine_scores(images, codes, centres, size):
    """A model's scores as il2vseg gives them without --eval-alpha: eq (2) on the upsampled codes."""
    up = F.normalize(F.interpolate(codes, size=size, mode="bilinear", align_corners=False), dim=1)
    return torch.einsum("bdhw,kd->bkhw", up, F.normalize(centres, dim=1))


def test_evaluate_scores_every_probe_from_one_code_pass():
    calls = []
    batches = fake_batches()
    shuffled = true_centres()[[2, 0, 1]]  # another cluster order: Hungarian matching undoes it
    result = evaluate.evaluate(make_code_fn(calls), cosine_scores, batches, 3, {"a": true_centres(), "b": shuffled},
                               use_crf=False, flip=False, keep=3)
    assert len(calls) == 3  # one code pass per batch, shared by the probes
    assert set(result["probes"]) == {"a", "b"} and result["n_images"] == 6
    for name in ("a", "b"):
        before = result["probes"][name]["before_crf"]
        assert before["acc"] > 0.999 and before["miou"] > 0.998, name
        assert result["probes"][name]["after_crf"] is None
    n_labelled = sum(int(((b["label"] >= 0) & (b["label"] < 3)).sum()) for b in batches)
    assert result["probes"]["a"]["before_crf"]["n_pixels"] == n_labelled
    assert result["probes"]["b"]["before_crf"]["matching"] == [2, 0, 1]
    assert [k[0] for k in result["kept"]] == ["img_0_0.png", "img_0_1.png", "img_1_0.png"]
    name, image, label, outputs = result["kept"][0]
    assert image.shape == (3, 32, 32) and set(outputs) == {"a", "b"} and outputs["a"][1] is None
    # flip TTA doubles the code calls, nothing else changes for this flip-symmetric fake network
    calls.clear()
    flipped = evaluate.evaluate(make_code_fn(calls), cosine_scores, batches, 3, {"a": true_centres()}, use_crf=False,
                                flip=True)
    assert len(calls) == 6 and flipped["probes"]["a"]["before_crf"]["acc"] > 0.999


def test_the_scores_get_images_codes_the_probes_centres_and_the_label_size_and_decide_the_argmax():
    batches = fake_batches(n_batches=2)
    seen = []

    def flat_scores(images, codes, centres, size):  # the same for every cluster: every argmax is cluster 0
        seen.append((images.shape, codes.shape, centres.clone(), tuple(size)))
        return torch.zeros(codes.shape[0], centres.shape[0], *size)

    probes = {"a": true_centres(), "b": true_centres()[[1, 2, 0]]}
    flat = evaluate.evaluate(make_code_fn([]), flat_scores, batches, 3, probes, use_crf=False, flip=False)
    assert len(seen) == 4 and torch.equal(seen[0][2], probes["a"]) and torch.equal(seen[1][2], probes["b"])
    assert seen[0][:2] == ((2, 3, 32, 32), (2, 4, 4, 4)) and seen[0][3] == (32, 32)
    assert np.count_nonzero(np.array(flat["probes"]["a"]["raw_confusion_before"]).sum(0)) == 1


def test_the_crf_refines_the_probabilities_that_the_argmax_used(monkeypatch):
    """The CRF receives softmax(2 F) of the model's scores F (fused ones too), not the probe's plain cosines."""
    batches = fake_batches(n_batches=1)
    received = []
    real = evaluate.refine_with_crf

    def spy(images, probs, crf_kwargs=None):
        received.append(probs.clone())
        return real(images, probs, crf_kwargs)

    def fused_scores(images, codes, centres, size):  # as if a colour cue favoured cluster 1 everywhere
        scores = cosine_scores(images, codes, centres, size)
        return scores + 0.5 * F.one_hot(torch.ones(scores.shape[-2:], dtype=torch.long), 3).permute(2, 0, 1)

    monkeypatch.setattr(evaluate, "refine_with_crf", spy)
    centres = true_centres()
    result = evaluate.evaluate(make_code_fn([]), fused_scores, batches, 3, {"a": centres}, use_crf=True, flip=False)
    codes = make_code_fn([])(batches[0]["image"])
    expected = torch.softmax(2 * fused_scores(None, codes, centres, (32, 32)), dim=1)
    assert len(received) == 1 and torch.allclose(received[0], expected)
    assert result["probes"]["a"]["after_crf"] is not None


def test_evaluate_with_crf():
    batches = fake_batches(n_batches=1)
    result = evaluate.evaluate(make_code_fn([]), cosine_scores, batches, 3, {"a": true_centres()}, use_crf=True,
                               flip=False, keep=1)
    entry = result["probes"]["a"]
    assert entry["after_crf"]["acc"] > 0.95 and entry["raw_confusion_after"] is not None
    assert result["kept"][0][3]["a"][1].shape == (32, 32)
    # --no-crf changes nothing before the CRF
    plain = evaluate.evaluate(make_code_fn([]), cosine_scores, batches, 3, {"a": true_centres()}, use_crf=False,
                              flip=False)
    assert plain["probes"]["a"]["before_crf"] == entry["before_crf"]


def test_collect_codes_and_spread():
    batches = fake_batches(n_batches=2)
    vectors = evaluate.collect_codes(make_code_fn([]), batches, flip=False)
    assert vectors.shape == (2 * 2 * 4 * 4, 4)
    codes = make_code_fn([])(batches[1]["image"])
    assert torch.equal(vectors[-16:], codes[1].permute(1, 2, 0).reshape(-1, 4))
    result = {"probes": {"x": {"before_crf": {"acc": 0.5, "miou": 0.2}, "after_crf": None},
                         "y": {"before_crf": {"acc": 0.7, "miou": 0.4}, "after_crf": None}}}
    summary = evaluate.spread(result, ["x", "y"])
    assert summary["before_crf"]["acc"] == pytest.approx((0.6, 0.1))
    assert summary["before_crf"]["miou"] == pytest.approx((0.3, 0.1)) and summary["after_crf"] is None


def test_predict_folder(tmp_path):
    batches = [{"image": b["image"], "name": b["name"]} for b in fake_batches(n_batches=1)]
    paths = evaluate.predict_folder(make_code_fn([]), cosine_scores, batches, true_centres(), tmp_path, use_crf=False,
                                    matching=[2, 0, 1])
    assert sorted(p.name for p in paths) == ["img_0_0_ids.png", "img_0_0_mask.png", "img_0_0_overlay.png",
                                             "img_0_1_ids.png", "img_0_1_mask.png", "img_0_1_overlay.png"]
    mask = np.asarray(Image.open(tmp_path / "img_0_0_mask.png"))
    assert mask.shape == (32, 32, 3)
    # cluster c is drawn in the colour of class matching[c]
    label = fake_batches(n_batches=1)[0]["label"][0]
    expected = results.colourise(torch.tensor([2, 0, 1])[label.clamp(0, 2)])
    assert (mask == expected).all(axis=2)[4:].mean() > 0.999


def test_cli_runs_il2vseg_eval_in_its_place(tmp_path, monkeypatch, capsys):
    received = []
    monkeypatch.setattr(evaluate.os, "execv", lambda path, argv: received.append((path, argv)))
    monkeypatch.chdir(tmp_path)  # CHECKPOINT must exist (a missing one is named as typed)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "checkpoint.pt").write_bytes(b"")
    evaluate.main(["runs/x/checkpoint.pt", "--data", "camvid", "--out", "x"])
    path, argv = received[0]
    assert path == sys.executable and argv[0] == sys.executable and argv[1].endswith("il2vseg.py")
    assert argv[2:] == ["--eval", "--checkpoint", "runs/x/checkpoint.pt", "--data", "camvid", "--out", "x"]
    assert evaluate.main([]) == 2 and "il2vseg.py --eval" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# pasted alone into an empty file, each function works
# ----------------------------------------------------------------------------------------------------

def test_functions_copy_alone():
    _, truth, points = separated_points(seed=1, k=3, dim=6, per_cluster=40)
    pasted = paste_alone("evaluate", "kmeans_cosine")(points, 3, n_iter=2, batch_size=32, seed=1, n_init=2)
    expected = evaluate.kmeans_cosine(points, 3, n_iter=2, batch_size=32, seed=1, n_init=2)
    assert torch.equal(pasted[0], expected[0]) and torch.equal(pasted[1], expected[1])
    confusion = paste_alone("evaluate", "confusion_matrix")(expected[1], truth, 3, 3)
    assert torch.equal(confusion, evaluate.confusion_matrix(expected[1], truth, 3, 3))
    assert paste_alone("evaluate", "scores")(confusion) == evaluate.scores(confusion)
    assert list(paste_alone("evaluate", "hungarian_match")(confusion)) == list(evaluate.hungarian_match(confusion))
    codes, centres = torch.randn(2, 4, 3, 5), torch.randn(6, 4)
    assert torch.equal(paste_alone("evaluate", "cluster_probs")(cosine_scores, None, codes, centres, (6, 10)),
                       evaluate.cluster_probs(cosine_scores, None, codes, centres, (6, 10)))
    assert torch.equal(paste_alone("evaluate", "flip_tta")(lambda x: x * torch.arange(5.0), codes),
                       evaluate.flip_tta(lambda x: x * torch.arange(5.0), codes))
