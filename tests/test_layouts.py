"""Tests of layouts.py through data.build_dataset: every published label table entry by entry, each
data set's loader on a tiny tree in its official layout, the real files in ../shared, bad input as one
DataError line naming the file, and the synthetic scenes."""

import warnings

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data
from data import IGNORE, DataError, build_dataset
from trees import (H, W, build_camvid, build_potsdam_mat, centre, check_item, eval_item, labels_from,
                   need_shared, raises_naming, rgb, save)

# ------------------------------------------------------------------------------------------------
# Published tables, written out literally
# ------------------------------------------------------------------------------------------------

# Official Cityscapes labelId -> name for the 27 evaluated ids (cityscapesScripts labels.py).
CITYSCAPES_IDS = {
    7: "road", 8: "sidewalk", 9: "parking", 10: "rail track", 11: "building", 12: "wall", 13: "fence",
    14: "guard rail", 15: "bridge", 16: "tunnel", 17: "pole", 18: "polegroup", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 29: "caravan", 30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle",
}
# ids 0..6: unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground -> void

# COCO-Stuff fine id (stuffthingmaps, 0..181) -> coarse id of COCO-Stuff-27, entry by entry (STEGO's table).
COCO_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # fine 0..19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # fine 20..39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # fine 40..59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # fine 60..79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # fine 80..99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # fine 100..119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # fine 120..139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # fine 140..159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # fine 160..179
    19, 24,  # fine 180..181
]
COCO_COARSE_NAMES = [
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff",
    "raw-material", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural",
    "water",
]
POTSDAM_MAT = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: IGNORE}  # STEGO release (6 fine ids)
POTSDAM_PNG = {0: IGNORE, 1: 0, 2: 1, 3: 2, 4: 2, 5: 0, 6: 1, 255: IGNORE}  # ISPRS PNG ids
CAMVID_NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                "pedestrian", "bicyclist"]


def map_with(table, raw):
    """Slow reference mapping, pixel by pixel."""
    out = np.empty(raw.shape, np.int64)
    for idx, value in np.ndenumerate(raw):
        out[idx] = table[int(value)]
    return out


def test_cityscapes_table():
    info = data.DATASETS["cityscapes"]
    assert info["n_classes"] == 27 and len(info["class_names"]) == 27
    for label_id in range(7):
        assert info["label_map"][label_id] == IGNORE
    for label_id, name in CITYSCAPES_IDS.items():
        assert info["class_names"][info["label_map"][label_id]] == name
    assert sorted(info["label_map"]) == list(range(34))


def test_cocostuff_table():
    info = data.DATASETS["cocostuff"]
    assert info["class_names"] == COCO_COARSE_NAMES
    for fine, coarse in enumerate(COCO_FINE_TO_COARSE):
        assert info["label_map"][fine] == coarse, fine
    assert info["label_map"][255] == IGNORE
    assert sorted(info["label_map"]) == list(range(182)) + [255]  # every fine id exactly once


def test_other_tables():
    assert data.DATASETS["potsdam"]["label_map"] == POTSDAM_MAT
    assert data.DATASETS["potsdam"]["label_map_png"] == POTSDAM_PNG
    assert data.DATASETS["potsdam"]["n_classes"] == 3
    assert data.DATASETS["mastr1325"]["label_map"] == {0: 0, 1: 1, 2: 2, 4: IGNORE}
    assert data.DATASETS["mastr1325"]["class_names"] == ["obstacle", "water", "sky"]
    assert data.DATASETS["camvid"]["class_names"] == CAMVID_NAMES
    assert data.DATASETS["camvid"]["label_map"] == {**{i: i for i in range(11)}, 11: IGNORE}
    assert data.DATASETS["synthetic"]["class_names"] == ["obstacle", "water", "sky"]
    for info in data.DATASETS.values():
        if info["n_classes"]:
            assert len(info["class_names"]) == info["n_classes"]


# ------------------------------------------------------------------------------------------------
# Each loader on a tiny tree in its official layout
# ------------------------------------------------------------------------------------------------

def test_cityscapes_tree(tmp_path):
    raws = {}
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"])):
        for k, city in enumerate(cities):
            stem = f"{city}_000000_00001{k}"
            save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(k))
            raws[stem] = labels_from(range(34), k)
            save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raws[stem])
            save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png", rgb(9))  # ignored
    table = {**{i: IGNORE for i in range(7)}, **{i: i - 7 for i in range(7, 34)}}
    ds = eval_item("cityscapes", tmp_path, "train")
    assert len(ds) == 2 and ds.n_classes == 27
    for i in range(2):
        item = ds[i]
        check_item(item, 27)
        assert item["has_label"]
        assert np.array_equal(item["label"].numpy(), centre(map_with(table, raws[item["name"]])))
    assert [ds[0]["name"]] == ["aachen_000000_000010"]
    assert np.allclose(ds[0]["image"].permute(1, 2, 0).numpy(), centre(rgb(0)) / 255.0, atol=1e-6)
    assert len(eval_item("cityscapes", tmp_path, "val")) == 1


def build_coco(root, ids, curated):
    for k, image_id in enumerate(ids):
        save(root / "images" / "train2017" / f"{image_id}.jpg", rgb(k))
        save(root / "annotations" / "train2017" / f"{image_id}.png", labels_from([*range(182), 255], k))
    if curated is not None:
        (root / "curated" / "train2017").mkdir(parents=True)
        (root / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("\n".join(curated) + "\n")


def test_cocostuff_tree(tmp_path):
    ids = ["000000000009", "000000000025", "000000000030"]
    build_coco(tmp_path, ids, curated=ids[1:])
    ds = eval_item("cocostuff", tmp_path, "train")
    assert len(ds) == 2 and ds.class_names == COCO_COARSE_NAMES
    item = ds[0]
    check_item(item, 27)
    assert item["name"] == ids[1]
    table = {**dict(enumerate(COCO_FINE_TO_COARSE)), 255: IGNORE}
    assert np.array_equal(item["label"].numpy(), centre(map_with(table, labels_from([*range(182), 255], 1))))


def test_cocostuff_without_curated_list(tmp_path):
    ids = ["000000000009", "000000000025", "000000000030"]
    build_coco(tmp_path, ids, curated=None)
    with pytest.warns(UserWarning, match="curated"):
        ds = eval_item("cocostuff", tmp_path, "train")
    assert len(ds) == 3


def test_potsdam_mat_tree(tmp_path):
    images = build_potsdam_mat(tmp_path)
    ds = eval_item("potsdam", tmp_path, "train")
    assert len(ds) == 2 and ds.n_classes == 3
    item = ds[1]
    check_item(item, 3)
    assert item["name"] == "1" and item["has_label"]
    assert np.allclose(item["image"].permute(1, 2, 0).numpy(), centre(images["1"][:, :, :3]), atol=1e-6)
    raw = labels_from([0, 1, 2, 3, 4, 5, 255], 1)
    assert np.array_equal(item["label"].numpy(), centre(map_with(POTSDAM_MAT, raw)))
    val = eval_item("potsdam", tmp_path, "val")
    assert [val[0]["name"]] == ["2"]
    unlabelled = eval_item("potsdam", tmp_path, "unlabelled_train")[0]
    assert not unlabelled["has_label"] and (unlabelled["label"] == IGNORE).all()


def test_potsdam_png_tree(tmp_path):
    for split in ("train", "val"):
        save(tmp_path / "img_dir" / split / "2_10_0_0.png", rgb(3))
        save(tmp_path / "ann_dir" / split / "2_10_0_0.png", labels_from(range(7), 3))
    item = eval_item("potsdam", tmp_path, "val")[0]
    check_item(item, 3)
    assert np.array_equal(item["label"].numpy(), centre(map_with(POTSDAM_PNG, labels_from(range(7), 3))))


def test_mastr1325_official_layout(tmp_path):
    stems = [f"{i:04d}" for i in range(1, 7)]
    for k, stem in enumerate(stems):
        save(tmp_path / "MaSTr1325_images_512x384" / f"{stem}.jpg", rgb(k))
        save(tmp_path / "MaSTr1325_masks_512x384" / f"{stem}m.png", labels_from([0, 1, 2, 4], k))
    train, val = eval_item("mastr1325", tmp_path, "train"), eval_item("mastr1325", tmp_path, "val")
    assert [s["name"] for s in val.samples] == ["0005"]  # hold-out: sorted index % 5 == 4
    assert len(train) == 5 and len(eval_item("mastr1325", tmp_path, "all")) == 6
    item = val[0]
    check_item(item, 3)
    expected = map_with({0: 0, 1: 1, 2: 2, 4: IGNORE}, labels_from([0, 1, 2, 4], 4))
    assert np.array_equal(item["label"].numpy(), centre(expected))
    (tmp_path / "val.txt").write_text("0002\n0003\n")  # an explicit list wins
    assert [s["name"] for s in eval_item("mastr1325", tmp_path, "val").samples] == ["0002", "0003"]


def test_mastr1325_folder_convention(tmp_path):
    save(tmp_path / "imgs" / "train" / "0001.jpg", rgb(0))
    save(tmp_path / "labels" / "train" / "0001m.png", labels_from([0, 1, 2, 4], 0))
    item = eval_item("mastr1325", tmp_path, "train")[0]
    assert item["has_label"] and set(np.unique(item["label"].numpy())) <= {IGNORE, 0, 1, 2}


def test_camvid_tree(tmp_path):
    build_camvid(tmp_path)
    ds = eval_item("camvid", tmp_path, "val")
    item = ds[1]
    check_item(item, 11)
    expected = map_with({**{i: i for i in range(11)}, 11: IGNORE}, labels_from(range(12), 1))
    assert np.array_equal(item["label"].numpy(), centre(expected))
    assert ds.class_names == CAMVID_NAMES


def test_folder_with_and_without_labels(tmp_path):
    save(tmp_path / "imgs" / "train" / "a.jpg", rgb(0))
    save(tmp_path / "imgs" / "train" / "b.png", rgb(1))
    save(tmp_path / "labels" / "train" / "a.png", labels_from([0, 1, 2, 3, 255], 0))
    save(tmp_path / "labels" / "train" / "b.png", labels_from([0, 1, 2, 3, 255], 1))
    save(tmp_path / "imgs" / "val" / "c.png", rgb(2))  # no labels/val: prediction only
    ds = eval_item("folder", tmp_path, "train", n_classes=4)
    assert ds.class_names == ["class 0", "class 1", "class 2", "class 3"]
    item = ds[1]
    check_item(item, 4)
    expected = map_with({0: 0, 1: 1, 2: 2, 3: 3, 255: IGNORE}, labels_from([0, 1, 2, 3, 255], 1))
    assert np.array_equal(item["label"].numpy(), centre(expected))
    assert ds.has_labels and not eval_item("folder", tmp_path, "val").has_labels
    assert build_dataset("synthetic", None, "val", "eval", crop_size=64, length=2).has_labels
    unlabelled = eval_item("folder", tmp_path, "val")[0]
    assert not unlabelled["has_label"] and (unlabelled["label"] == IGNORE).all()
    assert np.allclose(unlabelled["image"].permute(1, 2, 0).numpy(), centre(rgb(2)) / 255.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Real files in ../shared (skipped when absent)
# ------------------------------------------------------------------------------------------------

def test_real_cityscapes_frame():
    root = need_shared("data", "formats", "pseudo_cityscapes_dataset")
    item = build_dataset("cityscapes", root, "val", "eval", crop_size=128, resize=128)[0]
    check_item(item, 27, 128)
    stem = "frankfurt_000000_000294"
    raw = np.asarray(Image.open(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png"))
    image = np.asarray(Image.open(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png"))
    expected = np.where(raw >= 7, raw.astype(np.int64) - 7, IGNORE)[:, 64:192]  # 256x128 -> centre 128
    assert item["name"] == stem and np.array_equal(item["label"].numpy(), expected)
    assert np.allclose(item["image"].permute(1, 2, 0).numpy(), image[:, 64:192] / 255.0, atol=1e-6)
    # the eval protocol: short side 128 -> 320, centre crop 320
    big = build_dataset("cityscapes", root, "val", "eval", crop_size=320)[0]
    check_item(big, 27, 320)


def test_real_potsdam_png_tile():
    root = need_shared("data", "formats", "pseudo_potsdam_dataset")
    with pytest.warns(UserWarning, match="img_dir"):  # flat layout, no split subfolder
        ds = build_dataset("potsdam", root, "val", "eval", crop_size=512)
    item = ds[0]
    check_item(item, 3, 512)
    raw = np.asarray(Image.open(root / "ann_dir" / "2_10_0_0_512_512.png"))
    assert np.array_equal(item["label"].numpy(), map_with(POTSDAM_PNG, raw))


def test_real_camvid_frames():
    root = need_shared("data", "camvid")
    ds = build_dataset("camvid", root, "val", "eval", crop_size=352, resize=360, length=3)
    assert len(ds) == 3
    item = ds[0]
    check_item(item, 11, 352)
    raw = np.asarray(Image.open(ds.samples[0]["label"])).astype(np.int64)
    assert np.array_equal(item["label"].numpy(), np.where(raw == 11, IGNORE, raw)[4:356, 64:416])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 352, 352) and batch["label"].shape == (2, 352, 352)
    train = build_dataset("camvid", root, "train", "train", crop_size=224, length=2)
    check_item(train[1], 11, 224)


# ------------------------------------------------------------------------------------------------
# Bad input: one DataError line naming the file or folder
# ------------------------------------------------------------------------------------------------

def test_missing_root_split_and_empty(tmp_path):
    missing = tmp_path / "nowhere"
    message = raises_naming(missing, lambda: build_dataset("camvid", missing, "train"))
    assert "annot" in message  # says the expected layout
    build_camvid(tmp_path, splits=("train",))
    raises_naming(tmp_path / "val", lambda: build_dataset("camvid", tmp_path, "val"))
    (tmp_path / "test").mkdir()
    (tmp_path / "testannot").mkdir()
    assert "no images" in raises_naming(tmp_path / "test", lambda: build_dataset("camvid", tmp_path, "test"))
    raises_naming(tmp_path / "leftImg8bit", lambda: build_dataset("cityscapes", tmp_path, "train"))
    raises_naming(tmp_path, lambda: build_dataset("mastr1325", tmp_path, "train"))
    message = raises_naming("--data-root", lambda: build_dataset("folder", None, "train"))
    assert "imgs" in message  # a missing --data-root says so, with the layout it expects


def test_image_without_label(tmp_path):
    build_camvid(tmp_path, splits=("train",))
    save(tmp_path / "train" / "lonely.png", rgb(5))
    raises_naming("lonely.png", lambda: build_dataset("camvid", tmp_path, "train"))
    save(tmp_path / "c" / "leftImg8bit" / "val" / "ulm" / "ulm_1_leftImg8bit.png", rgb(0))
    (tmp_path / "c" / "gtFine" / "val" / "ulm").mkdir(parents=True)
    raises_naming("ulm_1_leftImg8bit.png", lambda: build_dataset("cityscapes", tmp_path / "c", "val"))
    build_potsdam_mat(tmp_path / "p")
    (tmp_path / "p" / "gt" / "1.mat").unlink()
    raises_naming("1.mat", lambda: build_dataset("potsdam", tmp_path / "p", "train"))


def test_label_of_another_size(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=1)
    save(tmp_path / "trainannot" / "0001TP_000.png", labels_from(range(11), 0, 40, 64))
    ds = eval_item("camvid", tmp_path, "train")
    raises_naming("0001TP_000.png", lambda: ds[0])


def test_corrupt_and_truncated_files(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=2)
    good = (tmp_path / "train" / "0001TP_000.png").read_bytes()
    (tmp_path / "train" / "0001TP_000.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "trainannot" / "0001TP_001.png").write_bytes(b"not an image at all")  # corrupt
    ds = eval_item("camvid", tmp_path, "train")
    assert "truncated" in raises_naming("0001TP_000.png", lambda: ds[0])
    raises_naming("0001TP_001.png", lambda: ds[1])
    build_potsdam_mat(tmp_path / "p")
    (tmp_path / "p" / "imgs" / "0.mat").write_bytes(b"garbage")
    scipy.io.savemat(tmp_path / "p" / "imgs" / "1.mat", {"image": np.zeros((H, W, 4))})  # wrong key
    ds = eval_item("potsdam", tmp_path / "p", "train")
    raises_naming("0.mat", lambda: ds[0])
    assert "'img'" in raises_naming("1.mat", lambda: ds[1])


def convertible_tree(root, images):
    for k, (stem, (array, mode)) in enumerate(images.items()):
        save(root / "imgs" / "train" / f"{stem}.png", array, mode)
        save(root / "labels" / "train" / f"{stem}.png", labels_from([0, 1], k))


def test_grayscale_rgba_palette_16bit_converted_and_said_once(tmp_path):
    gray = rgb(0)[:, :, 0]
    rgba = np.dstack([rgb(1), np.full((H, W), 7, np.uint8)])
    gray16 = (np.random.default_rng(2).integers(0, 65536, (H, W))).astype(np.uint16)
    convertible_tree(tmp_path, {"g1": (gray, "L"), "g2": (gray, "L"), "a": (rgba, "RGBA"), "s": (gray16, None)})
    palette = Image.fromarray(rgb(3)).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(tmp_path / "imgs" / "train" / "p.png")
    save(tmp_path / "labels" / "train" / "p.png", labels_from([0, 1], 9))
    ds = eval_item("folder", tmp_path, "train", n_classes=2)
    names = [s["name"] for s in ds.samples]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = {name: ds[i] for i, name in enumerate(names)}
        for i in range(len(ds)):  # a second pass says nothing new
            ds[i]
    # only this data set's notes (a ResourceWarning of some earlier test's garbage may land here too)
    said = [str(w.message) for w in caught if str(w.message).startswith("folder: ")]
    assert len(said) == 4, said
    for phrase in ("grayscale images converted", "RGBA images converted", "palette images converted",
                   "16-bit grayscale images scaled"):
        assert sum(m.startswith(f"folder: {phrase}") for m in said) == 1, phrase
    g = items["g1"]["image"]
    assert torch.equal(g[0], g[1]) and torch.allclose(g[0], torch.from_numpy(centre(gray) / 255.0).float())
    assert torch.allclose(items["a"]["image"].permute(1, 2, 0), torch.from_numpy(centre(rgb(1)) / 255.0).float())
    assert torch.allclose(items["s"]["image"][0], torch.from_numpy(centre(gray16) / 65535.0).float(), atol=1e-6)
    expected_p = np.asarray(palette.convert("RGB"))
    assert torch.allclose(items["p"]["image"].permute(1, 2, 0), torch.from_numpy(centre(expected_p) / 255.0).float())


def test_meaningless_images_and_labels_rejected(tmp_path):
    save(tmp_path / "imgs" / "train" / "f.tif", rgb(0)[:, :, 0].astype(np.float32) * 3.5, "F")
    save(tmp_path / "labels" / "train" / "f.png", labels_from([0, 1], 0))
    ds = eval_item("folder", tmp_path, "train", n_classes=2)
    raises_naming("f.tif", lambda: ds[0])
    save(tmp_path / "imgs" / "val" / "c.png", rgb(1))
    save(tmp_path / "labels" / "val" / "c.png", rgb(2))  # colour-coded label
    ds = eval_item("folder", tmp_path, "val", n_classes=2)
    assert "colour-coded" in raises_naming("c.png", lambda: ds[0])


def test_label_values_outside_the_classes(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=1)
    label = labels_from(range(11), 0)
    label[3, 3] = 12
    save(tmp_path / "trainannot" / "0001TP_000.png", label)
    ds = eval_item("camvid", tmp_path, "train")
    message = raises_naming("0001TP_000.png", lambda: ds[0])
    assert "[12]" in message
    save(tmp_path / "f" / "imgs" / "train" / "a.png", rgb(0))
    save(tmp_path / "f" / "labels" / "train" / "a.png", labels_from([0, 1, 2, 3], 0))
    ds = eval_item("folder", tmp_path / "f", "train", n_classes=3)
    assert "[3]" in raises_naming("a.png", lambda: ds[0])
    raises_naming(tmp_path / "f", lambda: build_dataset("folder", tmp_path / "f", "train"))  # needs n_classes


def test_crop_larger_than_image(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=1)
    ds = build_dataset("camvid", tmp_path, "train", "train", crop_size=56, resize=0)  # native 48x64
    raises_naming("0001TP_000.png", lambda: ds[0])
    raises_naming("resize", lambda: build_dataset("camvid", tmp_path, "train", crop_size=64, resize=48))
    # the CLI resizes the short side to the crop, so a huge crop would upsample instead: refused
    huge = build_dataset("camvid", tmp_path, "train", "eval", crop_size=400)  # short side 48 -> 400
    raises_naming("0001TP_000.png", lambda: huge[0])
    with pytest.raises(DataError, match=r"upsample it 8.3x \(more than 4x\)"):
        huge[0]
    assert build_dataset("camvid", tmp_path, "train", "eval", crop_size=192)[0]["image"].shape == (3, 192, 192)
    raises_naming("multiple of 8", lambda: build_dataset("camvid", tmp_path, "train", crop_size=50))
    raises_naming("unknown data set", lambda: build_dataset("imagenet", tmp_path, "train"))
    raises_naming("mode", lambda: build_dataset("camvid", tmp_path, "train", mode="test"))
    raises_naming("27 classes", lambda: build_dataset("cityscapes", tmp_path, "train", n_classes=19))


# ------------------------------------------------------------------------------------------------
# Synthetic scenes
# ------------------------------------------------------------------------------------------------

def test_synthetic_seeded_and_exact():
    small = {"crop_size": 64, "resize": 72, "length": 4, "synthetic_size": (96, 128)}
    a = build_dataset("synthetic", None, "train", "eval", **small)
    b = build_dataset("synthetic", None, "train", "eval", **small)
    c = build_dataset("synthetic", None, "train", "eval", seed=1, **small)
    v = build_dataset("synthetic", None, "val", "eval", **small)
    for i in range(4):
        check_item(a[i], 3, 64)
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
        assert not torch.equal(a[i]["image"], c[i]["image"])
        assert not torch.equal(a[i]["image"], v[i]["image"])
    assert len(build_dataset("synthetic", None, "train")) == 64
    assert len(build_dataset("synthetic", None, "val")) == 16
    # exact labels: sky at the top row, water at the bottom row, obstacles somewhere, colours differ by class
    image, label = data.draw_synthetic_scene(np.random.default_rng(3), 96, 128)
    assert image.shape == (96, 128, 3) and label.shape == (96, 128)
    assert set(np.unique(label)) <= {0, 1, 2}
    counts = np.zeros(3)
    for i in range(8):
        _, label = data.draw_synthetic_scene(np.random.default_rng([0, 0, i]))
        counts += np.bincount(label.ravel(), minlength=3)
        assert (label[0] != 1).all() and (label[-1] != 2).all()
    assert (counts > 0).all()
