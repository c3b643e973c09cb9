"""Tiny data trees for the data tests: random images and labels saved in the layouts the loaders read."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pytest
import scipy.io

from data import IGNORE, DataError, build_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared"

H, W = 48, 64  # tiny images: eval with crop 48 keeps them unresized, centre crop = columns 8..56


def rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def labels_from(values, seed, h=H, w=W):
    return np.random.default_rng(seed).choice(np.array(values, np.uint8), (h, w))


def eval_item(name, root, split="train", **kw):
    kw = {"crop_size": 48, "resize": 48, **kw}
    return build_dataset(name, root, split, "eval", **kw)


def check_item(item, n_classes, size=48):
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, size, size)
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].shape == (size, size)
    assert ((item["label"] == IGNORE) | ((item["label"] >= 0) & (item["label"] < n_classes))).all()
    assert isinstance(item["name"], str) and isinstance(item["has_label"], bool)


def centre(array):
    return array[:, 8:56]


def build_camvid(root, splits=("train", "val"), n=2):
    for split in splits:
        for k in range(n):
            save(root / split / f"0001TP_00{k}.png", rgb(k))
            save(root / f"{split}annot" / f"0001TP_00{k}.png", labels_from(range(12), k))


def build_potsdam_mat(root):
    rng = np.random.default_rng(0)
    images = {}
    for image_id in ["0", "1", "2", "3"]:
        images[image_id] = rng.random((H, W, 4))  # float in [0, 1], 4 channels (RGB + IR)
        (root / "imgs").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "imgs" / f"{image_id}.mat", {"img": images[image_id]})
    (root / "gt").mkdir()
    for image_id in ["0", "1", "2"]:  # "3" is unlabelled
        gt = labels_from([0, 1, 2, 3, 4, 5, 255], int(image_id))
        scipy.io.savemat(root / "gt" / f"{image_id}.mat", {"gt": gt})
    (root / "labelled_train.txt").write_text("0\n1\n")
    (root / "labelled_test.txt").write_text("2\n")
    (root / "unlabelled_train.txt").write_text("3\n")
    return images


def raises_naming(fragment, call):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and str(fragment) in message, message
    return message


def need_shared(*parts):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
