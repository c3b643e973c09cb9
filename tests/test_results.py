"""Tests of results.py: colours, the table, metrics.json and the pictures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import pictures
import results


def test_palette_and_colourise():
    colours = results.palette(255)
    assert colours.shape == (255, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == 255
    assert not (colours == 0).all(axis=1).any()
    assert np.array_equal(results.palette(27), colours[:27])  # fixed: class colours do not depend on n
    assert colours[:3].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0]]  # the PASCAL VOC colours
    with pytest.raises(ValueError):
        results.palette(256)
    image = results.colourise(torch.tensor([[0, 1], [-1, 26]]))
    assert image.shape == (2, 2, 3)
    assert (image[1, 0] == 0).all()
    assert np.array_equal(image[0, 0], colours[0]) and np.array_equal(image[1, 1], colours[26])


def scores(acc, miou, iou, matching=(0, 1)):
    return {"acc": acc, "miou": miou, "iou": iou, "matching": list(matching)}


def test_format_table_has_a_column_per_probe_before_and_after_the_crf():
    result = {"probes": {
        "kmeans": {"before_crf": scores(0.5, 0.25, [0.5, float("nan")]), "after_crf": scores(0.75, 0.5, [0.5, 0.5]),
                   "clusters_used": 2},
        "centres": {"before_crf": scores(0.4, 0.2, [0.4, 0.0]), "after_crf": None, "clusters_used": 1}}}
    table = results.format_table(result, ["road", "sky"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "kmeans", "kmeans+CRF", "centres", "centres+CRF"]
    assert lines[-3].split() == ["Acc", "50.0", "75.0", "40.0", "-"]
    assert lines[-2].split() == ["mIoU", "25.0", "50.0", "20.0", "-"]
    assert lines[-1].split() == ["clusters", "2", "1"]  # how many of the K clusters each probe predicts
    assert lines[3].split() == ["sky", "-", "50.0", "0.0", "-"]


def test_format_spread():
    line = results.format_spread({"before_crf": {"acc": (0.5, 0.01), "miou": (0.2, 0.02)}, "after_crf": None}, 3)
    assert line == "k-means over 3 seeds: Acc 50.0 +- 1.0, mIoU 20.0 +- 2.0"


def test_metrics_json_is_valid_json_without_nan(tmp_path):
    result = {"probes": {"kmeans": {"before_crf": scores(float("nan"), 0.5, [np.float32(0.5), float("nan")]),
                                    "after_crf": None}},
              "n_images": np.int64(3), "kept": ["dropped"]}
    path = results.write_metrics(tmp_path, result, {"alpha": 0.5, "shape": (1, 2)})
    metrics = json.loads(path.read_text())
    assert metrics["probes"]["kmeans"]["before_crf"]["acc"] is None
    assert metrics["probes"]["kmeans"]["before_crf"]["iou"] == [0.5, None]
    assert metrics["n_images"] == 3 and "kept" not in metrics and metrics["settings"]["shape"] == [1, 2]


def test_pictures_show_each_probe_through_its_own_matching(tmp_path):
    label = torch.tensor([[0, 1], [1, -1]])
    pred = torch.tensor([[1, 0], [0, 0]])  # cluster 1 is class 0 for probe "a" ...
    result = {"probes": {"a": {"before_crf": scores(1, 1, [1, 1], matching=(1, 0)), "after_crf": None},
                         "b": {"before_crf": scores(1, 1, [1, 1], matching=(0, 1)), "after_crf": None}},
              "kept": [("dir/x.png", torch.zeros(3, 2, 2), label, {"a": (pred, None), "b": (pred, None)})]}
    (path,) = results.save_pictures(tmp_path, result)
    assert path == tmp_path / "side_by_side" / "dir_x.png"
    picture = np.asarray(Image.open(path))
    assert picture.shape[1] == 4 * 2 + 3 * pictures.GAP
    truth, panel_a, panel_b = [picture[top:top + 2, left:left + 2] for top, left in
                               (pictures.panel_origin(i, 2, 2, 4) for i in (1, 2, 3))]
    assert (panel_a[:, :][label >= 0] == truth[label >= 0]).all()  # probe a's matching undoes its order
    assert not (panel_b[label >= 0] == truth[label >= 0]).all()


def test_mask_and_overlay(tmp_path):
    image = torch.ones(3, 2, 3) * 0.5
    pred = torch.tensor([[0, 1, -1], [2, 2, -1]])
    mask_path, overlay_path = results.save_mask_and_overlay(tmp_path, "a/b.jpg", image, pred, opacity=0.5)
    assert mask_path.name == "a_b_mask.png" and overlay_path.name == "a_b_overlay.png"
    mask, picture = np.asarray(Image.open(mask_path)), np.asarray(Image.open(overlay_path))
    top, left = pictures.panel_origin(1, 2, 3, 2)
    overlay = picture[top:top + 2, left:left + 3]  # the second panel, under its caption
    assert np.array_equal(mask, results.colourise(pred))
    assert (overlay[:, 2] == 128).all()  # -1 pixels show the plain image
    expected = np.round(0.5 * 128 + 0.5 * mask[0, 0].astype(np.float32)).astype(np.uint8)
    assert np.array_equal(overlay[0, 0], expected)
