"""pairs.py: STEGO's nearest-neighbour images and the shifts measured from the backbone."""
import json
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cli
import data
import losses
import pairs


class Colours(nn.Module):
    """A frozen stand-in backbone: the 8 x 8 cells' mean colour and its square, stride 8."""
    dim, stride = 6, 8

    def forward(self, images):  # ImageNet-normalised (B, 3, H, W) -> (B, 6, H/8, W/8)
        cells = F.avg_pool2d(images, 8)
        return torch.cat([cells, cells.square()], dim=1)


def test_nearest_neighbours_are_the_k_most_similar_other_images_in_any_block_size():
    descriptors = F.normalize(torch.randn(37, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    for block in (1, 5, 64):
        got = pairs.nearest_neighbours(descriptors, 4, block=block)
        assert got.shape == (37, 4)
        for i in range(37):  # the reference: every other image sorted by cosine, written out
            ranked = sorted((j for j in range(37) if j != i), key=lambda j: -float(descriptors[i] @ descriptors[j]))
            assert got[i].tolist() == ranked[:4]


def test_the_block_bounds_the_memory_of_the_similarities(monkeypatch):
    largest = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **k: largest.append(self.numel()) or real_topk(self, *a, **k))
    pairs.nearest_neighbours(F.normalize(torch.randn(1000, 8), dim=1), 3, block=100)
    assert max(largest) == 100 * 1000  # a block of rows times N, never N x N


def test_a_partner_is_one_of_the_k_drawn_from_seed_step_and_index_alone():
    neighbours = torch.arange(50).view(10, 5)
    drawn = [pairs.partner_of(neighbours, 3, step, 4) for step in range(40)]
    assert set(drawn) == set(neighbours[4].tolist())  # every one of the 5 comes up
    assert drawn == [pairs.partner_of(neighbours, 3, step, 4) for step in range(40)]  # and again the same
    assert drawn != [pairs.partner_of(neighbours, 4, step, 4) for step in range(40)]


def test_the_rule_attracts_the_share_of_pairs_that_fall_into_the_same_cluster():
    generator = np.random.default_rng(0)
    similarity = generator.normal(size=10000)
    same = generator.random(10000) < 0.3
    shift = pairs.proposed_shift(similarity, same)
    assert abs((similarity > shift).mean() - same.mean()) < 1e-3
    assert pairs.proposed_shift(similarity, np.zeros(10000, bool)) == similarity.max()


def settings(tmp_path, *extra):
    cfg = cli.parse_args(["--data", "synthetic", "--out", str(tmp_path), "--knn", "2", "--calibrate-images", "6",
                          "--crop", "32", "--eval-batch-size", "3", *extra])
    return cli.resolve_defaults(cfg, torch.device("cpu"))


def synthetic(length=8):
    return data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, length=length)


def test_neighbours_for_run_are_cached_and_computed_again_for_another_run(tmp_path):
    cfg, backbone, dataset = settings(tmp_path), Colours(), synthetic()
    lines = []
    first = pairs.neighbours_for_run(cfg, backbone, dataset, torch.device("cpu"), lines.append)
    assert first.shape == (8, 2) and (tmp_path / "neighbours.pt").is_file()
    with torch.no_grad():  # what it computed: descriptors of the items' centre crops, then the top 2
        descriptors = torch.stack([F.normalize(backbone(backbones_normalize(dataset[i]["image"]))[0].mean((1, 2)), dim=0)
                                   for i in range(8)])
    assert torch.equal(first, pairs.nearest_neighbours(descriptors, 2))
    lines.clear()
    assert torch.equal(pairs.neighbours_for_run(cfg, backbone, dataset, torch.device("cpu"), lines.append), first)
    assert len(lines) == 1 and "neighbours.pt" in lines[0]  # read back, not computed
    cfg.knn = 3  # another setting: computed again
    assert pairs.neighbours_for_run(cfg, backbone, dataset, torch.device("cpu"), lines.append).shape == (8, 3)
    (tmp_path / "neighbours.pt").write_bytes(b"broken")  # a broken cache: computed again
    assert pairs.neighbours_for_run(cfg, backbone, dataset, torch.device("cpu"), lines.append).shape == (8, 3)


def backbones_normalize(image):
    import backbones
    return backbones.normalize(image[None])


def test_measured_pairings_hold_every_pairing_with_its_same_cluster_share(tmp_path):
    dataset = synthetic()
    neighbours = torch.tensor([[(i + 1) % 8, (i + 2) % 8] for i in range(8)])
    measured = pairs.measure_pairings(Colours(), dataset, neighbours, 6, 3, torch.device("cpu"), batch_size=3)
    assert set(measured) == set(pairs.PAIRINGS)
    for name, (values, same) in measured.items():
        assert values.shape == same.shape and values.size > 0 and same.dtype == bool, name
        assert np.isfinite(values).all()
    # an image with itself shares clusters more often than with other images, and is more alike
    assert measured["pos_intra"][1].mean() > measured["neg_inter"][1].mean()
    assert np.median(measured["close"][0]) > np.median(measured["far"][0])


def test_calibrate_writes_the_table_the_json_and_the_histograms(tmp_path):
    cfg, lines = settings(tmp_path), []
    proposed = pairs.calibrate(cfg, Colours(), synthetic(), None, torch.device("cpu"), lines.append)
    assert set(proposed) == set(pairs.PAIRINGS)
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["images"] == 6 and report["clusters"] == 3
    for name, row in report["pairings"].items():
        assert row["proposed"] == proposed[name]
        q = row["quantiles_5_25_50_75_95"]
        assert q == sorted(q) and 0 <= row["same_cluster"] <= 1
        assert row["peers"] == (losses.loss_constants("synthetic")["smooseg_shifts"][name] if name in ("close", "far")
                                else losses.loss_constants("synthetic")["stego_shifts"][name])
        assert row["peers_tuned_for_this"] is False  # nobody tuned the synthetic scenes
    picture = Image.open(tmp_path / "calibration.png")
    assert picture.size == (3 * 360, 30 + 2 * 200)
    assert any("proposed" in line and "peers attract" in line for line in lines)


def test_settle_shifts_published_never_measures(monkeypatch):
    monkeypatch.setattr(pairs, "calibrate", lambda *a, **k: pytest.fail("measured"))
    cfg = types.SimpleNamespace(data="cityscapes", arch="vits8", shifts="published")
    pairs.settle_shifts(cfg, None, None, None, "cpu", log=lambda *a: None)
    assert (cfg.shift_close, cfg.shift_far) == (-0.02, 0.5)


def test_the_calibrate_command_needs_no_trained_checkpoint(tmp_path):
    import il2vseg
    tiny = ["--weights", "random", "--crop", "32", "--batch-size", "4", "--dim", "8", "--knn", "0",
            "--calibrate-images", "4"]
    assert il2vseg.main(["--calibrate", "--out", str(tmp_path)] + tiny) == 0
    assert (tmp_path / "calibration.json").exists() and (tmp_path / "calibration.png").exists()
    assert not (tmp_path / "checkpoint.pt").exists()  # measuring trains nothing
