"""The wiring: which tensor reaches which call, with which constant.

Every equation function is tested against its own reference elsewhere. Here one training step of the
real training loop (`il2vseg.train`, CPU, seeded, a tiny stand-in backbone) is recomputed independently
from the public equation functions and the paper's / peers' numbers, written below as literals, and each
term of eq (15), the total with beta and gamma, the gradient that reached the head and the centres
(Adam's first moment in the checkpoint) and the EMA of the global centres are compared. Further tests
spy on the calls of one step and of the evaluation and check what each one received.
"""
import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import checkpoints
import cli
import data
import evaluate
import fcm
import il2vseg
import losses
import pairs

# The numbers as the paper and ../shared/docs/anchors.md give them (not read from the code).
SMOOSEG_TEMPERATURE = 0.1          # "P = softmax(inner_global / 0.1)"
CITYSCAPES_SMOOSEG = (-0.02, 0.5)  # "cityscapes b_far 0.5, b_close -0.02": (close, far)
# "cityscapes weights .906/.577/1.0, shifts .314/.175/.458" in the order w_ni, w_pi, w_pa (STEGO's
# Cityscapes configuration, the published values --shifts published takes); the jittered pair takes pos_intra's
CITYSCAPES_STEGO_WEIGHTS = {"neg_inter": 0.906, "pos_inter": 0.577, "pos_intra": 1.0, "aug": 1.0}
CITYSCAPES_STEGO_SHIFTS = {"neg_inter": 0.314, "pos_inter": 0.175, "pos_intra": 0.458, "aug": 0.458}
K, B, CROP, N_ITEMS, KNN = 3, 4, 32, 6, 2


class StandIn(nn.Module):
    """A frozen stand-in backbone with the interface of backbones.py: .dim, .stride, normalised images
    (B, 3, H, W) -> (B, dim, H/8, W/8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.dim, self.stride = 16, 8
        self.conv = nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, images):
        return torch.tanh(self.conv(images))


def settings(tmp_path, *extra):
    """A run on the 'cityscapes' constants with beta, gamma, alpha, ema and learning rates that differ
    from each other, so that a swap at a call site changes the numbers."""
    cfg = cli.parse_args(["--data", "cityscapes", "--weights", "random", "--out", str(tmp_path), "--crop", str(CROP),
                              "--batch-size", str(B), "--steps", "1", "--save-every", "1", "--fcm-iters", "4",
                              "--dim", "8", "--dropout", "0", "--beta", "0.3", "--gamma", "0.7", "--alpha", "0.6",
                              "--ema", "0.9", "--lr-head", "0.01", "--lr-centres", "0.02", "--seed", "5",
                              "--shifts", "published", "--knn", str(KNN), *extra])
    return cli.resolve_defaults(cfg, torch.device("cpu"))


def nearest_neighbours(backbone, dataset):
    """STEGO's kNN by its definition: the spatial mean of F^p, L2-normalised, the KNN most similar other
    images by cosine, written out (and compared with pairs.py's blocked top-k in test_pairs.py)."""
    with torch.no_grad():
        descriptors = [F.normalize(backbone(backbones.normalize(dataset[i]["image"][None])).mean((2, 3)), dim=1)[0]
                       for i in range(len(dataset))]
    neighbours = []
    for i, d in enumerate(descriptors):
        others = sorted((j for j in range(len(dataset)) if j != i), key=lambda j: -float(d @ descriptors[j]))
        neighbours.append(others[:KNN])
    return neighbours


def batch_of_step_one(dataset, cfg, neighbours):
    """The images train() sees at its first step and each one's kNN partner, drawn independently of the
    loader: step 0's partner of item i is its neighbour number rng([seed, 0, i]).integers(KNN)."""
    (indices,) = il2vseg.Batches(len(dataset), cfg.batch_size, cfg.seed, 0, 1)
    dataset.set_epoch(0)
    partners = [neighbours[i][np.random.default_rng([cfg.seed, 0, i]).integers(KNN)] for _, _, i in indices]
    return (torch.stack([dataset[i]["image"] for _, _, i in indices]),
            torch.stack([dataset[j]["image"] for j in partners]))


def aligned(f_low, f_seg):
    """Eq (13)'s cluster correspondence (tested against brute force in test_model.py)."""
    return il2vseg.align_clusters(f_low, f_seg)


def expected_step(backbone, model, images, partners, cfg):
    """One step of eq (15) composed from the public functions and the literal numbers above; returns
    (terms, total, gradients by parameter, local and global centres after Adam and the EMA)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    f_low = fcm.low_level_cue(images, K, m=2.0, sigma=cfg.fcm_sigma, patch=8, affinity=cfg.affinity,
                              radius=cfg.radius, max_iter=4)  # eqs (1), (3)-(12)
    images_aug = data.photometric_augment(images, generator=generator)  # I~
    assert not torch.equal(images_aug, images)
    with torch.no_grad():
        feats = backbone(backbones.normalize(images))  # F^p
        feats_aug = backbone(backbones.normalize(images_aug))
        feats_knn = backbone(backbones.normalize(partners))
    codes, codes_aug, codes_knn = model.head(torch.cat([feats, feats_aug, feats_knn])).split(B)  # F^c
    f_seg = il2vseg.cosine_to_centres(codes, model.global_centres)  # eq (2)
    terms = {"data": losses.data_loss(il2vseg.cosine_to_centres(codes.detach(), model.local_centres), f_seg)}
    perm = losses.derangement(B, generator=generator)
    probs = torch.softmax(f_seg / SMOOSEG_TEMPERATURE, dim=1)
    terms["smo"] = losses.smoothness_loss(feats, probs, *CITYSCAPES_SMOOSEG, perm=perm)
    pairs_of_corr = {"aug": (feats_aug, codes_aug), "knn": (feats_knn, codes_knn)}
    terms["corr"] = losses.correspondence_terms(feats, codes, pairs_of_corr, CITYSCAPES_STEGO_SHIFTS,
                                                CITYSCAPES_STEGO_WEIGHTS, generator=generator)["corr"]
    fused = (1 - 0.6) * f_seg + 0.6 * aligned(f_low, f_seg)  # eq (13), alpha 0.6
    small = F.interpolate(images, size=(CROP // 8, CROP // 8), mode="bilinear", align_corners=False)
    terms["fs"], terms["reg"] = losses.feature_similarity_losses(codes, fused, small)  # eq (14)
    total = 0.3 * terms["reg"] + 0.7 * terms["fs"] + terms["smo"] + terms["data"] + terms["corr"]  # eq (15)
    total.backward()
    parameters = list(model.head.parameters()) + [model.local_centres]
    gradients = [p.grad.clone() for p in parameters]
    torch.optim.Adam([{"params": list(model.head.parameters()), "lr": 0.01},
                      {"params": [model.local_centres], "lr": 0.02}]).step()
    global_centres = 0.9 * model.global_centres + 0.1 * model.local_centres.detach()  # EMA, momentum 0.9
    return terms, total, gradients, model.local_centres.detach(), global_centres


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The real training loop for one step, and the independent recomputation of that step."""
    tmp_path = tmp_path_factory.mktemp("wiring")
    cfg = settings(tmp_path)
    backbone = StandIn().eval().requires_grad_(False)
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=CROP, seed=cfg.seed,
                                 length=N_ITEMS)
    model = il2vseg.build_model(cfg, backbone, K, "cpu")
    expected = expected_step(backbone, model, *batch_of_step_one(dataset, cfg, nearest_neighbours(backbone, dataset)),
                             cfg)
    history = il2vseg.train(backbone, model, dataset, cfg, torch.device("cpu"), log=lambda *a: None)
    state = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    return history[0], state, model, expected


@pytest.mark.parametrize("term", ["data", "smo", "corr", "fs", "reg"])
def test_each_term_of_eq15_is_what_the_equations_give(one_step, term):
    values, _, _, (terms, _, _, _, _) = one_step
    assert values[term] == pytest.approx(terms[term].item(), rel=1e-5, abs=1e-6), term


def test_the_total_weighs_reg_by_beta_and_fs_by_gamma(one_step):
    values, _, _, (terms, total, _, _, _) = one_step
    assert values["total"] == pytest.approx(total.item(), rel=1e-5, abs=1e-6)


def test_the_gradient_that_reached_the_head_and_the_centres(one_step):
    _, state, model, (_, _, gradients, _, _) = one_step
    moments = state["optimiser"]["state"]  # Adam's first moment after one step is (1 - 0.9) * gradient
    assert len(moments) == len(gradients)
    for index, gradient in enumerate(gradients):
        torch.testing.assert_close(moments[index]["exp_avg"] / 0.1, gradient, rtol=1e-4, atol=1e-7)
    groups = state["optimiser"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.01, 0.02] and groups[1]["params"] == [len(gradients) - 1]


def test_the_global_centres_follow_by_ema_with_the_configured_momentum(one_step):
    _, state, model, (_, _, _, local, global_centres) = one_step
    torch.testing.assert_close(state["model"]["local_centres"], local, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["model"]["global_centres"], global_centres, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.global_centres, global_centres, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------- spies on one step

class Spy:
    """Wraps module.name, recording the arguments of every call."""

    def __init__(self, monkeypatch, module, name):
        self.calls, self.results, real = [], [], getattr(module, name)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            self.results.append(real(*args, **kwargs))
            return self.results[-1]
        monkeypatch.setattr(module, name, spy)


def step_inputs(tmp_path, *extra):
    cfg = settings(tmp_path, *extra)
    backbone = StandIn().eval().requires_grad_(False)
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=CROP, seed=0, length=B)
    images = torch.stack([dataset[i]["image"] for i in range(B)])
    return cfg, backbone, il2vseg.build_model(cfg, backbone, K, "cpu"), images


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_eq14_sees_the_low_level_cue_exactly_when_alpha_is_positive(tmp_path, monkeypatch, alpha):
    cfg, backbone, model, images = step_inputs(tmp_path, "--alpha", str(alpha))
    spy = Spy(monkeypatch, losses, "feature_similarity_losses")
    cues = [torch.softmax(torch.randn(B, K, 4, 4, generator=torch.Generator().manual_seed(s)) * 3, dim=1) for s in (1, 2)]
    for cue in cues:
        il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0), lambda x, cue=cue: cue)
    (codes_1, fused_1, small_1), (codes_2, fused_2, _) = [call[0] for call in spy.calls]
    f_seg = il2vseg.cosine_to_centres(codes_1, model.global_centres)
    if alpha == 0:
        assert torch.equal(fused_1, fused_2) and torch.allclose(fused_1, f_seg)
    else:
        assert not torch.allclose(fused_1, fused_2)
        torch.testing.assert_close(fused_1, (1 - alpha) * f_seg + alpha * aligned(cues[0], f_seg))
    torch.testing.assert_close(small_1, F.interpolate(images, size=(4, 4), mode="bilinear", align_corners=False))


def test_the_correspondence_pairs_are_the_jittered_copy_and_the_nearest_neighbour(tmp_path, monkeypatch):
    cfg, backbone, model, images = step_inputs(tmp_path)
    partners = images.flip(0)
    spy = Spy(monkeypatch, losses, "correspondence_terms")
    il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(3), partners=partners)
    (feats, codes, pairs_of_corr), kwargs = spy.calls[0]
    images_aug = data.photometric_augment(images, generator=torch.Generator().manual_seed(3))  # I~, drawn first
    assert not torch.equal(images_aug, images)
    torch.testing.assert_close(feats, backbones.features(backbone, images))
    torch.testing.assert_close(pairs_of_corr["aug"][0], backbones.features(backbone, images_aug))
    torch.testing.assert_close(pairs_of_corr["knn"][0], backbones.features(backbone, partners))
    model.eval()  # dropout off: the codes are the head's of those features
    torch.testing.assert_close(pairs_of_corr["knn"][1], model(pairs_of_corr["knn"][0]), rtol=1e-5, atol=1e-6)
    assert kwargs["shifts"] == CITYSCAPES_STEGO_SHIFTS and kwargs["weights"] == CITYSCAPES_STEGO_WEIGHTS
    for flag, missing in (("--no-aug", "aug"), ("--knn", "knn")):
        cfg, backbone, model, images = step_inputs(tmp_path, *([flag] if flag == "--no-aug" else [flag, "0"]))
        spy.calls.clear()
        il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(3),
                           partners=None if flag == "--knn" else partners)
        assert missing not in spy.calls[0][0][2] and len(spy.calls[0][0][2]) == 1, flag


def test_smoothness_and_data_terms_get_the_centres_smooseg_uses(tmp_path, monkeypatch):
    cfg, backbone, model, images = step_inputs(tmp_path)
    with torch.no_grad():  # make the local and global centres differ, as they do after a few steps
        model.local_centres.add_(torch.randn(model.local_centres.shape, generator=torch.Generator().manual_seed(0)))
    smo, data_term = Spy(monkeypatch, losses, "smoothness_loss"), Spy(monkeypatch, losses, "data_loss")
    il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0))
    (feats, probs, close, far), kwargs = smo.calls[0]
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(B, 4, 4))
    codes = model(backbones.features(backbone, images))
    f_seg = il2vseg.cosine_to_centres(codes, model.global_centres)
    torch.testing.assert_close(probs, torch.softmax(f_seg / SMOOSEG_TEMPERATURE, dim=1))
    assert (close, far) == CITYSCAPES_SMOOSEG and torch.equal(feats, backbones.features(backbone, images))
    perm = kwargs["perm"]
    assert sorted(perm.tolist()) == list(range(B)) and all(perm[i] != i for i in range(B))
    (inner_local, inner_global), _ = data_term.calls[0]
    torch.testing.assert_close(inner_global, f_seg)  # the target: argmax over the global centres
    torch.testing.assert_close(inner_local, il2vseg.cosine_to_centres(codes, model.local_centres))


def test_dropout_as_smooseg_draws_it_a_mask_per_branch_and_one_for_the_smoothness_features(tmp_path, monkeypatch):
    cfg, backbone, model, images = step_inputs(tmp_path, "--dropout", "0.5")
    model = il2vseg.build_model(cfg, backbone, K, "cpu").train()
    smo = Spy(monkeypatch, losses, "smoothness_loss")
    masks = []
    real = model.head.dropout.forward
    model.head.dropout.forward = lambda x: masks.append(real(torch.ones_like(x))) or masks[-1] * x
    il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0))
    feats = backbones.features(backbone, images)
    assert len(masks) == 3  # the linear branch, the nonlinear branch, L_smo's features: three masks
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    torch.testing.assert_close(smo.calls[0][0][0], masks[2] * feats)  # L_smo's fd from the dropped-out features


def test_the_align_switch_reaches_eq13(tmp_path, monkeypatch):
    cue = torch.softmax(torch.randn(B, K, 4, 4, generator=torch.Generator().manual_seed(1)) * 3, dim=1)
    for align in ("soft", "hard"):
        cfg, backbone, model, images = step_inputs(tmp_path, "--align", align)
        spy = Spy(monkeypatch, losses, "feature_similarity_losses")
        il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0), lambda x: cue)
        codes, fused, _ = spy.calls[0][0]
        f_seg = il2vseg.cosine_to_centres(codes, model.global_centres)
        expected = il2vseg.align_clusters(cue, f_seg, how=align)
        torch.testing.assert_close(fused, 0.4 * f_seg + 0.6 * expected)
        monkeypatch.undo()


@pytest.mark.parametrize("reading", ["laplacian", "correlation"])
def test_the_fs_reading_switch_reaches_eq14(tmp_path, monkeypatch, reading):
    """--fs-reading picks which formula of eq (14) computes L_fs and L_reg, and only that one is called."""
    cfg, backbone, model, images = step_inputs(tmp_path, "--fs-reading", reading)
    chosen, other = ("feature_similarity_losses", "feature_correlation_losses")[::1 if reading == "laplacian" else -1]
    spies = {name: Spy(monkeypatch, losses, name) for name in (chosen, other)}
    _, terms, _ = il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0))
    assert len(spies[chosen].calls) == 1 and not spies[other].calls
    fs, reg = spies[chosen].results[0]
    assert terms["fs"] is fs and terms["reg"] is reg


def test_fusion_in_all_feeds_the_fused_scores_to_smoothness_and_data_terms(tmp_path, monkeypatch):
    cfg, backbone, model, images = step_inputs(tmp_path, "--fusion-in", "all")
    smo, data_term = Spy(monkeypatch, losses, "smoothness_loss"), Spy(monkeypatch, losses, "data_loss")
    cue = torch.softmax(torch.randn(B, K, 4, 4, generator=torch.Generator().manual_seed(1)) * 3, dim=1)
    il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0), lambda x: cue)
    codes = model(backbones.features(backbone, images))
    f_seg = il2vseg.cosine_to_centres(codes, model.global_centres)
    fused = (1 - 0.6) * f_seg + 0.6 * aligned(cue, f_seg)
    torch.testing.assert_close(smo.calls[0][0][1], torch.softmax(fused / SMOOSEG_TEMPERATURE, dim=1))
    torch.testing.assert_close(data_term.calls[0][0][1], fused)


def test_each_step_draws_each_items_nearest_neighbour_anew(tmp_path):
    """The kNN partner of item i at step t: neighbour number rng([seed, t, i]).integers(k) of its k (STEGO
    draws one of its nearest at every step), the image as the same epoch crops it."""
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=CROP, length=N_ITEMS)
    neighbours = np.array([[(i + 1) % N_ITEMS, (i + 2) % N_ITEMS, (i + 3) % N_ITEMS] for i in range(N_ITEMS)])
    items = il2vseg.EpochItems(dataset, neighbours, seed=5)
    index, epoch = 2, 1
    drawn = [int(np.random.default_rng([5, step, index]).integers(3)) for step in range(8)]
    assert len(set(drawn)) > 1  # the draws differ between steps, so a fixed step would be seen
    for step, choice in enumerate(drawn):
        partner = items[(epoch, step, index)]["partner"]
        dataset.set_epoch(epoch)
        assert torch.equal(partner, dataset[int(neighbours[index, choice])]["image"]), step


MEASURED = {"close": 0.11, "far": 0.22, "pos_intra": 0.33, "pos_inter": 0.44, "aug": 0.55, "neg_inter": 0.66}


@pytest.mark.parametrize("data_set, arch, shifts, smooseg_measured, stego_measured", [
    ("cityscapes", "vits8", "auto", False, True),      # SmooSeg tuned Cityscapes for ViT-S/8, STEGO for ViT-B/8
    ("cityscapes", "vitb8", "auto", True, False),
    ("cocostuff", "vits8", "auto", False, False),      # both tuned COCO-Stuff for ViT-S/8
    ("cocostuff", "resnet50-mocov2", "auto", True, False),  # STEGO tuned MoCo v2 on COCO-Stuff: its own constants
    ("camvid", "vits8", "auto", True, True),           # nobody tuned CamVid
    ("cocostuff", "vits8", "calibrate", True, True),
    ("camvid", "vits8", "published", False, False)])
def test_each_measured_or_published_shift_reaches_its_own_slot(tmp_path, monkeypatch, data_set, arch, shifts,
                                                               smooseg_measured, stego_measured):
    cfg = cli.resolve_defaults(cli.parse_args(["--data", data_set, "--arch", arch, "--shifts", shifts,
                                               "--out", str(tmp_path)]), torch.device("cpu"))
    monkeypatch.setattr(pairs, "calibrate", lambda *args, **kwargs: dict(MEASURED))
    pairs.settle_shifts(cfg, None, None, None, torch.device("cpu"), log=lambda *a: None)
    table = losses.loss_constants(data_set, arch)
    expected_smooseg = ((MEASURED["close"], MEASURED["far"]) if smooseg_measured else
                        (table["smooseg_shifts"]["close"], table["smooseg_shifts"]["far"]))
    assert (cfg.shift_close, cfg.shift_far) == expected_smooseg
    for name in ("pos_intra", "pos_inter", "neg_inter"):
        assert cfg.corr_shifts[name] == (MEASURED[name] if stego_measured else table["stego_shifts"][name]), name
    # the jittered pair has no published shift: measured unless --shifts published
    assert cfg.corr_shifts["aug"] == (table["stego_shifts"]["aug"] if shifts == "published" else MEASURED["aug"])
    assert cfg.corr_weights == table["stego_weights"]


def test_the_settled_shifts_reach_the_losses_and_the_checkpoint_and_come_back_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs, "calibrate", lambda *args, **kwargs: dict(MEASURED))
    cfg = settings(tmp_path, "--shifts", "calibrate", "--steps", "2", "--save-every", "1")
    backbone = StandIn().eval().requires_grad_(False)
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=CROP, length=N_ITEMS)
    smo, corr = Spy(monkeypatch, losses, "smoothness_loss"), Spy(monkeypatch, losses, "correspondence_terms")
    il2vseg.train(backbone, il2vseg.build_model(cfg, backbone, K, "cpu"), dataset, cfg, torch.device("cpu"),
                  log=lambda *a: None)
    assert smo.calls[0][0][2:4] == (0.11, 0.22)
    assert corr.calls[0][1]["shifts"] == {k: MEASURED[k] for k in ("pos_intra", "pos_inter", "aug", "neg_inter")}
    assert checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")["shifts"]["corr"]["aug"] == 0.55
    monkeypatch.setattr(pairs, "calibrate", lambda *args, **kwargs: pytest.fail("a resumed run measured again"))
    resumed = settings(tmp_path, "--shifts", "calibrate", "--steps", "3", "--save-every", "1")
    resumed.resume = True
    smo.calls.clear()
    il2vseg.train(backbone, il2vseg.build_model(resumed, backbone, K, "cpu"), dataset, resumed, torch.device("cpu"),
                  log=lambda *a: None)
    assert smo.calls[0][0][2:4] == (0.11, 0.22) and resumed.corr_shifts["neg_inter"] == 0.66


def test_the_loss_switches_reach_the_total(tmp_path, monkeypatch):
    """--no-X makes its terms exactly 0 without computing them, and eq (15) sums what is left with beta 0.3
    and gamma 0.7 (the data term goes with L_smo)."""
    calls = {"smo": "smoothness_loss", "data": "data_loss", "fs": "feature_similarity_losses",
             "reg": "feature_similarity_losses", "corr": "correspondence_terms"}
    for flag, off in (("--no-smo", {"smo", "data"}), ("--no-fs", {"fs"}), ("--no-reg", {"reg"}),
                      ("--no-corr", {"corr"}), ("--no-fs --no-reg", {"fs", "reg"})):
        cfg, backbone, model, images = step_inputs(tmp_path, *flag.split())
        spies = {name: Spy(monkeypatch, losses, name) for name in set(calls.values())}
        total, terms, _ = il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0))
        for term in calls:
            assert (terms[term].item() == 0.0) is (term in off), (flag, term)
            if off >= {term for term, call in calls.items() if call == calls[term]}:
                assert not spies[calls[term]].calls, (flag, term)
        expected = 0.3 * terms["reg"] + 0.7 * terms["fs"] + terms["smo"] + terms["data"] + terms["corr"]
        torch.testing.assert_close(total, expected)
        monkeypatch.undo()


# -------------------------------------------------------------------------------- the evaluation switches

def eval_settings(tmp_path, *extra):
    cfg = cli.parse_args(["--eval", "--weights", "random", "--out", str(tmp_path), "--crop", str(CROP),
                              "--eval-crop", str(CROP), "--eval-images", "4", "--probe-images", "4", "--dim", "8",
                              "--fcm-iters", "3", "--save-images", "0", *extra])
    cfg = cli.resolve_defaults(cfg, torch.device("cpu"))
    train_set = data.build_dataset("synthetic", None, split="train", mode="eval", crop_size=CROP, length=6)
    val_set = data.build_dataset("synthetic", None, split="val", mode="eval", crop_size=CROP, length=4)
    return cfg, (None, val_set, train_set)


def run_evaluation_spied(tmp_path, monkeypatch, *extra):
    cfg, datasets = eval_settings(tmp_path, *extra)
    spies = {"evaluate": Spy(monkeypatch, evaluate, "evaluate"), "collect": Spy(monkeypatch, evaluate, "collect_codes"),
             "kmeans": Spy(monkeypatch, evaluate, "kmeans_cosine"), "crf": Spy(monkeypatch, evaluate, "refine_with_crf")}
    backbone = StandIn().eval().requires_grad_(False)
    model = il2vseg.build_model(cfg, backbone, K, "cpu")
    result = il2vseg.run_evaluation(backbone, model, cfg, torch.device("cpu"), datasets, log=lambda *a: None)
    return cfg, datasets, model, spies, result


def test_default_evaluation_fits_kmeans_on_training_images_and_reports_both_probes(tmp_path, monkeypatch):
    cfg, (_, val_set, train_set), model, spies, result = run_evaluation_spied(tmp_path, monkeypatch)
    (code_fn, loader, _), kwargs = spies["collect"].calls[0]
    assert loader.dataset is train_set and kwargs["flip"] is True  # fit on training images, flip TTA on
    (_, k), kmeans_kwargs = spies["kmeans"].calls[0]
    assert k == K and kmeans_kwargs["n_init"] == 5 and kmeans_kwargs["seed"] == cfg.seed
    (_, score_fn, val_loader, _, probes, _), eval_kwargs = spies["evaluate"].calls[0]
    assert val_loader.dataset is val_set and set(probes) == {"kmeans", "centres"}
    assert probes["centres"] is model.global_centres
    assert probes["kmeans"] is spies["kmeans"].results[0][0]  # the fitted centres, not the global ones
    assert not torch.allclose(probes["kmeans"], model.global_centres)
    assert eval_kwargs["flip"] is True and eval_kwargs["use_crf"] is True
    codes, centres = torch.randn(2, 8, 4, 4), torch.randn(K, 8)  # no --eval-alpha: eq (2) at the label size
    expected = il2vseg.cosine_to_centres(F.interpolate(codes, size=(32, 32), mode="bilinear"), centres)
    torch.testing.assert_close(score_fn(torch.rand(2, 3, CROP, CROP), codes, centres, (32, 32)), expected)
    assert set(result["probes"]) == {"kmeans", "centres"}
    assert all(result["probes"][p]["after_crf"] is not None for p in ("kmeans", "centres"))
    assert len(spies["crf"].calls) == 2  # one CRF per probe for the one batch


@pytest.mark.parametrize("probe", ["kmeans", "centres"])
def test_probe_switch_changes_only_the_probes(tmp_path, monkeypatch, probe):
    _, _, _, spies, result = run_evaluation_spied(tmp_path, monkeypatch, "--probe", probe, "--no-crf")
    assert set(result["probes"]) == {probe}
    assert bool(spies["kmeans"].calls) == (probe == "kmeans")


def test_transductive_fit_and_seeds_and_restarts(tmp_path, monkeypatch):
    _, (_, val_set, _), _, spies, result = run_evaluation_spied(
        tmp_path, monkeypatch, "--kmeans-fit", "val", "--kmeans-seeds", "3", "--kmeans-restarts", "2", "--no-crf")
    assert spies["collect"].calls[0][0][1].dataset is val_set
    assert [call[1]["seed"] for call in spies["kmeans"].calls] == [0, 1, 2]
    assert all(call[1]["n_init"] == 2 for call in spies["kmeans"].calls)
    assert set(result["probes"]) == {"kmeans", "kmeans seed 1", "kmeans seed 2", "centres"}
    assert set(result["spread"]["before_crf"]) == {"acc", "miou"} and result["spread"]["after_crf"] is None


def test_no_flip_tta_and_no_crf_change_what_they_say_and_nothing_else(tmp_path, monkeypatch):
    _, _, _, spies, plain = run_evaluation_spied(tmp_path / "a", monkeypatch, "--no-flip-tta", "--no-crf")
    assert spies["collect"].calls[0][1]["flip"] is False and spies["evaluate"].calls[0][1]["flip"] is False
    assert spies["evaluate"].calls[0][1]["use_crf"] is False and not spies["crf"].calls
    monkeypatch.undo()
    _, _, _, _, with_crf = run_evaluation_spied(tmp_path / "b", monkeypatch, "--no-flip-tta")
    for probe in ("kmeans", "centres"):
        assert plain["probes"][probe]["after_crf"] is None
        assert plain["probes"][probe]["before_crf"] == with_crf["probes"][probe]["before_crf"], probe


def test_the_crf_refines_the_probabilities_the_prediction_before_it_is_taken_from(monkeypatch):
    """evaluate(): the dense CRF gets softmax(scale F) of the probe's scores, the same tensor whose argmax
    is the prediction before the CRF, at the scale asked for (5 here, not SmooSeg's default 2)."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, K, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    codes, centres = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2)), torch.randn(K, 8)

    def score_fn(images, codes, centres, size):
        return il2vseg.cosine_to_centres(F.interpolate(codes, size=size, mode="bilinear"), centres)
    crf = Spy(monkeypatch, evaluate, "refine_with_crf")
    evaluate.evaluate(lambda x: codes, score_fn, [{"image": images, "label": labels}], K, {"probe": centres},
                      flip=False, scale=5.0)
    (crf_images, probs, _), _ = crf.calls[0]
    torch.testing.assert_close(probs, torch.softmax(5.0 * score_fn(images, codes, centres, (16, 16)), dim=1))
    assert torch.equal(crf_images, images)


@pytest.mark.parametrize("align", [None, "likelihood", "soft", "hard"])
def test_eval_alpha_fuses_the_aligned_low_level_cue_of_the_evaluated_images(tmp_path, monkeypatch, align):
    """--eval-align (default likelihood) decides the alignment at evaluation, not training's --align."""
    train_align = "soft" if align in (None, "likelihood", "hard") else "hard"
    cfg, _, model, spies, _ = run_evaluation_spied(tmp_path, monkeypatch, "--eval-alpha", "0.4", "--no-crf",
                                                   "--align", train_align,
                                                   *(["--eval-align", align] if align else []))
    align = align or "likelihood"
    score_fn = spies["evaluate"].calls[0][0][1]
    images = torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    codes, centres = torch.randn(2, 8, 4, 4), torch.randn(K, 8)
    f_low = fcm.low_level_cue(images, K, sigma=cfg.fcm_sigma, patch=8, affinity=cfg.affinity, radius=cfg.radius,
                              max_iter=3)
    aligned = il2vseg.align_clusters(f_low, il2vseg.cosine_to_centres(codes, centres), how=align)  # on the grid
    upsample = lambda t: F.interpolate(t, size=(16, 16), mode="bilinear")  # noqa: E731
    f_seg = il2vseg.cosine_to_centres(upsample(codes), centres)
    expected = f_seg + 0.4 / 0.6 * upsample(aligned)  # eq (13) with alpha 0.4, F^seg kept at its scale
    torch.testing.assert_close(score_fn(images, codes, centres, (16, 16)), expected)


def test_the_low_level_branch_uses_the_runs_fcm_settings(tmp_path):
    cfg = settings(tmp_path, "--fcm-sigma", "0.2", "--fcm-iters", "3", "--fcm-m", "1.5", "--affinity", "local",
                   "--radius", "1")
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    expected = fcm.low_level_cue(images, 4, m=1.5, sigma=0.2, patch=8, affinity="local", radius=1, max_iter=3)
    assert torch.equal(il2vseg.low_level_branch(cfg, 4, 8)(images), expected)
    different = fcm.low_level_cue(images, 4, m=1.5, sigma=0.1, patch=8, affinity="local", radius=1, max_iter=3)
    assert not torch.equal(expected, different)


def test_compiled_branch_falls_back_to_eager_with_one_line(tmp_path, monkeypatch):
    cfg = settings(tmp_path)
    lines = []

    def failing_compile(fn, **kwargs):
        assert kwargs == {"mode": "reduce-overhead"} and fn.keywords["early_exit"] is False
        return functools.partial(lambda *a: (_ for _ in ()).throw(RuntimeError("inductor: no C++ compiler")))

    monkeypatch.setattr(torch, "compile", failing_compile)
    branch = il2vseg.compiled_with_fallback(il2vseg.low_level_branch(cfg, 3, 8), log=lines.append)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = il2vseg.low_level_branch(cfg, 3, 8)(images)
    assert torch.equal(branch(images), expected) and torch.equal(branch(images), expected)
    assert len(lines) == 1 and "torch.compile" in lines[0] and "eagerly" in lines[0] and "\n" not in lines[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_branch_on_cuda_matches_eager_without_falling_back(tmp_path):
    cfg = settings(tmp_path)
    lines = []
    compiled = il2vseg.compiled_with_fallback(il2vseg.low_level_branch(cfg, 27, 8), lines.append)  # training's shapes:
    eager = il2vseg.low_level_branch(cfg, 27, 8)                                         # inductor bugs are
    for seed in (0, 1):  # a second batch of the same shape replays what the first captured   # shape-dependent
        images = torch.rand(32, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).cuda()
        torch.testing.assert_close(compiled(images), eager(images), atol=1e-3, rtol=1e-3)
    assert not lines, lines  # torch.compile worked: no eager fallback
