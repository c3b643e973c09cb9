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
    assert lines[-3].split() == ["Acc", "50.0", "75.0", "40.0", "off"]  # the CRF did not run
    assert lines[-2].split() == ["mIoU", "25.0", "50.0", "20.0", "off"]
    assert lines[-1].split() == ["clusters", "2", "1"]  # how many of the K clusters each probe predicts
    assert lines[3].split() == ["sky", "n/a", "50.0", "0.0", "off"]  # n/a: no labelled pixel, never "off"
    ends = {len(line) for line in lines if not line.startswith(("-", "clusters"))}
    assert len(ends) == 1  # every column right-aligned to the same edge


def test_ablation_table_is_aligned_and_says_what_made_it():
    entry = {"before_crf": scores(0.5, 0.25, [0.5]), "after_crf": None}
    rows = [("alpha = 0.0", {"kmeans": entry, "centres": entry}), ("alpha = 0.25", {"kmeans": entry, "centres": entry})]
    made = {"warning": results.RANDOM_WARNING, "weights": "random", "arch": "vits8", "data": "synthetic",
            "data_root": None, "date": "2026-12-02T13:00:00+00:00", "code_version": "abc123"}
    table = results.format_ablation("Figure 5", rows, results.provenance_lines(made)).splitlines()
    assert table[0] == "Figure 5" and "random weights" in table[1] and "weights random" in table[2]
    header, *body = table[-3:]
    assert header.split() == ["setting", "kmeans", "kmeans+CRF", "centres", "centres+CRF"]
    assert body[0].split()[3:] == ["50.0", "/", "25.0", "off", "50.0", "/", "25.0", "off"]
    assert body[1].startswith("alpha = 0.25")
    for word in ("kmeans ", "kmeans+CRF", "centres ", "centres+CRF"):  # every cell ends under its header
        end = header.index(word) + len(word.strip())
        assert all(line[end - 1] != " " and line[end:end + 1] in ("", " ") for line in body)


def test_provenance_names_weights_hash_date_and_version(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    cfg = type("Cfg", (), {})()
    vars(cfg).update(weights=str(weights), arch="vits8", data="folder", data_root="/d", checkpoint=None,
                     out=str(tmp_path), alpha=0.5, corr_shifts={"aug": 0.1})
    made = results.provenance(cfg, 7)
    import hashlib
    assert made["weights"] == {"file": str(weights), "sha256": hashlib.sha256(b"weights").hexdigest()[:16]}
    assert made["step"] == 7 and made["data_root"] == "/d" and made["settings"]["alpha"] == 0.5
    assert made["checkpoint"] == str(tmp_path / "checkpoint.pt") and made["date"].startswith("20")
    assert made["code_version"] and "warning" not in made
    cfg.weights = "random"
    made = results.provenance(cfg)
    assert made["weights"] == "random" and list(made)[0] == "warning"
    path = results.write_metrics(tmp_path, {"probes": {}}, {}, made)
    assert list(json.loads(path.read_text()))[:2] == ["warning", "provenance"]  # the first thing a reader sees


def test_ticker_prints_by_time_not_by_count():
    clock, lines = [0.0], []
    ticker = results.Ticker("stage", 10, lines.append, every=10.0, clock=lambda: clock[0])
    for seconds in (1, 2, 12, 13, 30):
        clock[0] = seconds
        ticker.tick()
    assert len(lines) == 2  # at 12 s and at 30 s: one line per 10 s of work, however many items
    assert lines[0] == "stage: 3/10 images, 12 s so far, ETA 28 s"
    clock[0] = 40
    ticker.tick(5)
    assert lines[-1] == "stage: 10/10 images, 40 s so far, done"
    quiet = results.Ticker("quick", 2, lines.append, every=10.0, clock=lambda: 0.0)
    quiet.tick(2)
    assert len(lines) == 3  # a stage that never took 10 s prints nothing


def test_class_ids_png_is_read_back_exactly(tmp_path):
    pred = torch.tensor([[0, 1, 2], [254, 255, 3]])
    path = results.save_class_ids(tmp_path / "x_ids.png", pred)
    back = np.asarray(Image.open(path))
    assert back.dtype == np.uint8 and np.array_equal(back, pred.numpy())
    wide = results.save_class_ids(tmp_path / "w_ids.png", torch.tensor([[0, 300]]))
    assert np.array_equal(np.asarray(Image.open(wide)).astype(np.int64), [[0, 300]])  # uint16 above 255


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


def test_safe_stem_drops_only_an_image_suffix_and_the_path():
    assert results.safe_stem("dir/one.png") == "dir_one" and results.safe_stem("a\\b.JPG") == "a_b"
    assert results.safe_stem("photo.v1") == "photo.v1" != results.safe_stem("photo.v2")  # two images, two names
