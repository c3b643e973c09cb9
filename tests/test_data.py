"""Tests of data.py: the photometric augmentation Ĩ (against slow per-pixel references), the transforms,
the pre-flight check `check_files` and the prediction folder (the layouts are tests/test_layouts.py)."""

import colorsys
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, build_dataset
from pasting import paste_alone
from trees import H, W, build_camvid, build_potsdam_mat, check_item, labels_from, need_shared, raises_naming, rgb, save


# ------------------------------------------------------------------------------------------------
# Ĩ: photometric augmentation, against slow per-pixel references
# ------------------------------------------------------------------------------------------------

def tricky_pixels():
    """Random pixels plus greys, black, white, primaries and ties between channels."""
    rng = np.random.default_rng(0)
    special = [[0, 0, 0], [1, 1, 1], [.5, .5, .5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
               [1, 0, 1], [.2, .7, .7], [.7, .2, .7], [.7, .7, .2], [.3, .3, .9]]
    pixels = np.concatenate([np.array(special), rng.random((3 * 5 * 6 - len(special), 3))])
    return torch.from_numpy(pixels.T.reshape(1, 3, 9, 10))  # (1, 3, 9, 10) float64


def test_rgb_hsv_against_colorsys():
    images = tricky_pixels()
    hsv = data.rgb_to_hsv(images)
    back = data.hsv_to_rgb(hsv)
    for i in range(9):
        for j in range(10):
            r, g, b = images[0, :, i, j].tolist()
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            assert np.allclose(hsv[0, :, i, j].numpy(), [h, s, v], atol=1e-12)
            assert np.allclose(data.hsv_to_rgb(hsv[:, :, i:i + 1, j:j + 1])[0, :, 0, 0].numpy(),
                               colorsys.hsv_to_rgb(h, s, v), atol=1e-12)
    assert torch.allclose(back, images, atol=1e-12)  # round trip is the identity


def test_adjustments_against_references():
    images = tricky_pixels().repeat(2, 1, 1, 1)  # (2, 3, 9, 10) float64
    images[1] = images[1].flip(-1) * 0.8
    factors = torch.tensor([0.7, 1.3], dtype=torch.float64)
    shifts = torch.tensor([0.1, -0.37], dtype=torch.float64)
    bright = data.adjust_brightness(images, factors)
    contrast = data.adjust_contrast(images, factors)
    satur = data.adjust_saturation(images, factors)
    hue = data.adjust_hue(images, shifts)
    for n in range(2):
        f = factors[n].item()
        lumas = [0.299 * images[n, 0, i, j].item() + 0.587 * images[n, 1, i, j].item()
                 + 0.114 * images[n, 2, i, j].item() for i in range(9) for j in range(10)]
        mean = sum(lumas) / len(lumas)
        for i in range(9):
            for j in range(10):
                pixel = images[n, :, i, j].tolist()
                luma = lumas[i * 10 + j]
                clamp = lambda t: min(max(t, 0.0), 1.0)
                assert np.allclose(bright[n, :, i, j], [clamp(f * p) for p in pixel], atol=1e-12)
                assert np.allclose(contrast[n, :, i, j], [clamp(f * p + (1 - f) * mean) for p in pixel], atol=1e-12)
                assert np.allclose(satur[n, :, i, j], [clamp(f * p + (1 - f) * luma) for p in pixel], atol=1e-12)
                h, s, v = colorsys.rgb_to_hsv(*pixel)
                expected = colorsys.hsv_to_rgb((h + shifts[n].item()) % 1.0, s, v)
                assert np.allclose(hue[n, :, i, j], expected, atol=1e-9)
    assert torch.allclose(data.adjust_hue(images, torch.zeros(2, dtype=torch.float64)), images, atol=1e-12)


def test_photometric_augment_properties():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = data.photometric_augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().amax(dim=(1, 2, 3)).gt(1e-3).sum() >= 4  # colours change
    again = data.photometric_augment(images, torch.Generator().manual_seed(1))
    other = data.photometric_augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # no jitter, no grayscale, no blur -> identity
    same = data.photometric_augment(images, None, 0, 0, 0, 0, grayscale_p=0.0, blur_p=0.0)
    assert torch.allclose(same, images, atol=1e-6)
    # grayscale only -> all channels equal to the luma
    gray = data.photometric_augment(images, None, 0, 0, 0, 0, grayscale_p=1.0, blur_p=0.0)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(gray, luma[:, None].expand_as(images), atol=1e-6)
    # brightness only: a per-image scalar, pixel (i, j) stays at (i, j) (identity correspondence)
    dim = images * 0.5
    bright = data.photometric_augment(dim, torch.Generator().manual_seed(3), 0.4, 0, 0, 0, 0.0, blur_p=0.0)
    ratio = bright / dim
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-4)
    assert not torch.allclose(ratio[:, 0, 0, 0], torch.ones(6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_photometric_augment_cuda_matches_cpu():
    images = torch.rand(4, 3, 16, 16)
    cpu = data.photometric_augment(images, torch.Generator().manual_seed(5))
    gpu = data.photometric_augment(images.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)

def luma_of(pixel):
    return 0.299 * pixel[0] + 0.587 * pixel[1] + 0.114 * pixel[2]


def blur_reference(pixels, height, width, sigma, size=5):
    """A size x size Gaussian of std sigma, normalised, reflected borders, as a double loop (one image)."""
    weights = [math.exp(-0.5 * ((k - size // 2) / sigma) ** 2) for k in range(size)]
    weights = [w / sum(weights) for w in weights]
    reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    out = {}
    for i in range(height):
        for j in range(width):
            out[i, j] = [sum(weights[a] * weights[b] * pixels[reflect(i + a - size // 2, height),
                                                              reflect(j + b - size // 2, width)][c]
                             for a in range(size) for b in range(size)) for c in range(3)]
    return out


def photometric_reference(images, seed, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                          grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)):
    """Ĩ pixel by pixel in float64 with colorsys, drawing the same numbers in the documented order."""
    batch, _, height, width = images.shape
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.rand(batch, generator=generator, dtype=torch.float32).tolist() for _ in range(7)]
    b, c, s, h, gray_u, blur_u, sigma_u = draws
    clamp = lambda t: min(max(t, 0.0), 1.0)
    out = np.zeros((batch, 3, height, width))
    for n in range(batch):
        pixels = {(i, j): images[n, :, i, j].tolist() for i in range(height) for j in range(width)}
        f_b = (1 - brightness) + 2 * brightness * b[n]
        pixels = {k: [clamp(f_b * v) for v in p] for k, p in pixels.items()}
        f_c = (1 - contrast) + 2 * contrast * c[n]
        mean = sum(luma_of(p) for p in pixels.values()) / len(pixels)
        pixels = {k: [clamp(f_c * v + (1 - f_c) * mean) for v in p] for k, p in pixels.items()}
        f_s = (1 - saturation) + 2 * saturation * s[n]
        pixels = {k: [clamp(f_s * v + (1 - f_s) * luma_of(p)) for v in p] for k, p in pixels.items()}
        shift = -hue + 2 * hue * h[n]
        for k, p in pixels.items():
            hh, ss, vv = colorsys.rgb_to_hsv(*p)
            pixels[k] = [clamp(v) for v in colorsys.hsv_to_rgb((hh + shift) % 1.0, ss, vv)]
        if gray_u[n] < grayscale_p:
            pixels = {k: [luma_of(p)] * 3 for k, p in pixels.items()}
        if blur_u[n] < blur_p:
            sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * sigma_u[n]
            pixels = blur_reference(pixels, height, width, sigma)
        for (i, j), p in pixels.items():
            out[n, :, i, j] = [clamp(v) for v in p]
    return torch.from_numpy(out)


def test_photometric_augment_against_reference_and_pasted_alone():
    images = torch.rand(8, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for seed in range(3):  # 24 images: both branches of grayscale and of blur occur
        out = data.photometric_augment(images, torch.Generator().manual_seed(seed))
        assert torch.allclose(out, photometric_reference(images, seed), atol=1e-6)
    pasted = paste_alone("data", "photometric_augment")  # no module constant, helpers on its needs: line
    assert torch.equal(pasted(images, torch.Generator().manual_seed(4)),
                       data.photometric_augment(images, torch.Generator().manual_seed(4)))


# ------------------------------------------------------------------------------------------------
# Transforms: train crops/flips keep image and label aligned, are reproducible, five-crop
# ------------------------------------------------------------------------------------------------

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def colour_coded_folder(root, n=6):
    """Images whose colour is the label (8x8 blocks), so any misalignment shows."""
    for k in range(n):
        blocks = np.random.default_rng(k).integers(0, 4, (H // 8, W // 8))
        label = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
        save(root / "imgs" / "train" / f"{k}.png", PALETTE[label])
        save(root / "labels" / "train" / f"{k}.png", label)


def test_train_crop_flip_aligned_and_reproducible(tmp_path):
    colour_coded_folder(tmp_path)
    ds = build_dataset("folder", tmp_path, "train", "train", crop_size=32, resize=0, n_classes=4, train_crop="random")
    first = [ds[i] for i in range(len(ds))]
    for item in first:
        check_item(item, 4, 32)
        expected = torch.from_numpy(PALETTE[item["label"].numpy()] / 255.0).float().permute(2, 0, 1)
        assert torch.equal(item["image"], expected)
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first, again))
    ds.set_epoch(1)
    assert any(not torch.equal(x["image"], ds[i]["image"]) for i, x in enumerate(first))
    # flips happen (each item is flipped or not; across items and epochs both occur)
    flat = build_dataset("folder", tmp_path, "train", "train", crop_size=48, resize=0, n_classes=4, train_crop="random")
    seen = set()
    for epoch in range(4):
        flat.set_epoch(epoch)
        item = flat[0]
        original = np.asarray(Image.open(tmp_path / "labels" / "train" / "0.png"))
        window = [original[:, left:left + 48] for left in range(17)]
        seen |= {("plain" if any(np.array_equal(item["label"].numpy(), w) for w in window) else "flipped")}
    assert seen == {"plain", "flipped"}
    # the peers' training geometry (the default): the centre crop, the same in every epoch, never flipped
    peers = build_dataset("folder", tmp_path, "train", "train", crop_size=32, resize=0, n_classes=4)
    centre = build_dataset("folder", tmp_path, "train", "eval", crop_size=32, resize=0, n_classes=4)
    for epoch in range(3):
        peers.set_epoch(epoch)
        assert all(torch.equal(peers[i]["image"], centre[i]["image"]) for i in range(len(peers)))


def test_eval_resize_and_centre_crop_against_reference(tmp_path):
    save(tmp_path / "imgs" / "train" / "a.png", rgb(0))
    save(tmp_path / "labels" / "train" / "a.png", labels_from(range(5), 0))
    item = build_dataset("folder", tmp_path, "train", "eval", crop_size=64, resize=80, n_classes=5)[0]
    # short side 48 -> 80: 80 x int(80 * 64 / 48) = 80 x 106, centre crop 64 at (8, 21);
    # labels: nearest neighbour through pixel centres (PIL NEAREST)
    raw = labels_from(range(5), 0)
    expected = np.asarray(Image.fromarray(raw.astype(np.uint8)).resize((106, 80), Image.NEAREST))[8:72, 21:85]
    assert np.array_equal(item["label"].numpy(), expected)
    # image: PIL NEAREST by default (as the peers' Resize), or bilinear, close to PIL's resize of the image
    pil = np.asarray(Image.fromarray(rgb(0)).resize((106, 80), Image.NEAREST))[8:72, 21:85]
    assert np.array_equal((item["image"].permute(1, 2, 0).numpy() * 255).round(), pil)
    item = build_dataset("folder", tmp_path, "train", "eval", crop_size=64, resize=80, n_classes=5,
                         interpolation="bilinear")[0]
    pil = np.asarray(Image.fromarray(rgb(0)).resize((106, 80), Image.BILINEAR))[8:72, 21:85] / 255.0
    assert np.abs(item["image"].permute(1, 2, 0).numpy() - pil).mean() < 0.02


def test_five_crop(tmp_path):
    colour_coded_folder(tmp_path, n=2)
    ds = build_dataset("folder", tmp_path, "train", "eval", crop_size=24, resize=0, n_classes=4, five_crop=True)
    assert len(ds) == 10
    original = np.asarray(Image.open(tmp_path / "labels" / "train" / "1.png")).astype(np.int64)
    # crops are 24x32 (ratio .5 of 48x64), then the eval centre crop 24x24 takes columns 4..28 of each
    corners = {0: (0, 0), 1: (0, 32), 2: (24, 0), 3: (24, 32), 4: (12, 16)}
    for which, (top, left) in corners.items():
        item = ds[5 + which]
        assert item["name"].startswith("1_")
        assert np.array_equal(item["label"].numpy(), original[top:top + 24, left + 4:left + 28])

def test_nearest_resizing_is_pils_pixel_for_pixel():
    generator = np.random.default_rng(0)
    for _ in range(40):
        h, w, out_h, out_w = (int(v) for v in generator.integers(2, 300, 4))
        image = generator.integers(0, 255, (h, w), dtype=np.uint8)
        pil = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.NEAREST))
        assert np.array_equal(data.resize_image(torch.from_numpy(image), (out_h, out_w)).numpy(), pil)


def test_protocol_steps_pasted_alone(tmp_path):
    image, label = torch.rand(3, 30, 50), torch.randint(0, 5, (30, 50))
    for which in range(5):
        pasted = paste_alone("data", "five_crop_one")(image, label, which, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(pasted, data.five_crop_one(image, label, which, 0.5)))
    for how in ("nearest", "bilinear"):
        pasted = paste_alone("data", "resize_short_side")(image, label, 40, how)
        assert all(torch.equal(a, b) for a, b in zip(pasted, data.resize_short_side(image, label, 40, how)))
    assert pasted[0].shape == (3, 40, 66) and pasted[1].shape == (40, 66)  # int(40 * 50 / 30) = 66
    assert paste_alone("data", "predict_size")(300, 451, 320, 14) == data.predict_size(300, 451, 320, 14)
    assert paste_alone("data", "evenly_spaced")(list(range(9)), 4) == data.evenly_spaced(list(range(9)), 4)


def test_crop_follows_the_backbone_stride(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=1)
    for stride, crop in ((8, 48), (14, 56), (32, 64)):  # DINO ViT, DINOv2, ResNet-50
        item = build_dataset("camvid", tmp_path, "train", "eval", crop_size=crop, stride=stride)[0]
        assert item["image"].shape == (3, crop, crop)
    raises_naming("multiple of 14", lambda: build_dataset("camvid", tmp_path, "train", crop_size=48, stride=14))
    raises_naming("multiple of 32", lambda: build_dataset("camvid", tmp_path, "train", crop_size=56, stride=32))
    raises_naming("stride", lambda: build_dataset("camvid", tmp_path, "train", crop_size=48, stride=0))


def test_length_keeps_an_evenly_spaced_subset(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=10)  # 0001TP_000 .. 0001TP_009, sorted
    names = lambda length: [s["name"] for s in build_dataset("camvid", tmp_path, "train", length=length).samples]
    assert names(4) == ["0001TP_000", "0001TP_003", "0001TP_006", "0001TP_009"]  # not the first 4 frames
    assert names(2) == ["0001TP_000", "0001TP_009"] and names(1) == ["0001TP_000"]
    assert names(10) == names(50) == names(None) and names(3) == names(3)
    raises_naming("length", lambda: names(0))
    # every (n, length): distinct, sorted, first and last kept, gaps differ by at most one
    for n in range(1, 30):
        for length in range(2, n + 1):
            picked = data.evenly_spaced(list(range(n)), length)
            gaps = np.diff(picked)
            assert len(picked) == length and picked[0] == 0 and picked[-1] == n - 1 and (gaps >= 1).all()
            assert gaps.max() - gaps.min() <= 1, (n, length, picked)


# ------------------------------------------------------------------------------------------------
# Batches of a DataLoader
# ------------------------------------------------------------------------------------------------

def test_items_collate_into_batches():
    ds = build_dataset("synthetic", None, "train", "train", crop_size=32, resize=32, length=12,
                       synthetic_size=(48, 64))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["has_label"].dtype == torch.bool and batch["has_label"].all()


# ------------------------------------------------------------------------------------------------
# Pre-flight check: every bad file found at once, one line, the same rules as the loader
# ------------------------------------------------------------------------------------------------

def preflight_error(dataset):
    with pytest.raises(DataError) as info:
        data.check_files(dataset)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def save_jpeg(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=90)
    return path


@pytest.mark.parametrize("problem", ["garbage", "zero-byte", "truncated png", "truncated jpeg", "corrupt label",
                                     "label size", "label value", "too small", "too small for five-crop"])
def test_preflight_finds_each_kind_of_bad_file(tmp_path, problem):
    save(tmp_path / "imgs" / "train" / "good.png", rgb(0))
    save(tmp_path / "labels" / "train" / "good.png", labels_from([0, 1, 2], 0))
    image, label = tmp_path / "imgs" / "train" / "bad.png", tmp_path / "labels" / "train" / "bad.png"
    save(image, rgb(1))
    save(label, labels_from([0, 1, 2], 1))
    kw = {"crop_size": 48, "resize": 48}
    if problem == "garbage":
        image.write_bytes(b"not an image at all")
    elif problem == "zero-byte":
        image.write_bytes(b"")
    elif problem == "truncated png":
        image.write_bytes(image.read_bytes()[:-40])  # the last chunks (IDAT end, IEND) are missing
    elif problem == "truncated jpeg":
        image.unlink()
        image = save_jpeg(tmp_path / "imgs" / "train" / "bad.jpg", rgb(1))
        image.write_bytes(image.read_bytes()[: len(image.read_bytes()) * 2 // 3])
    elif problem == "corrupt label":
        label.write_bytes(label.read_bytes()[:100])
    elif problem == "label size":
        save(label, labels_from([0, 1, 2], 1, H, W - 8))
    elif problem == "label value":
        save(label, labels_from([0, 1, 2, 7], 1))
    elif problem == "too small":
        save(image, rgb(1, 10, 12))
        save(label, labels_from([0, 1, 2], 1, 10, 12))
    elif problem == "too small for five-crop":
        save(image, rgb(1, 20, 28))  # fine alone (48 / 20 = 2.4x), but five-crop makes it 10x14: 4.8x
        save(label, labels_from([0, 1, 2], 1, 20, 28))
        kw["five_crop"] = True
    ds = build_dataset("folder", tmp_path, "train", "eval", n_classes=3, **kw)
    message = preflight_error(ds)
    assert message.startswith("1 of 2 images of folder cannot be used: ") and str(image.name if "label" not in
                                                                                   problem else label) in message
    assert "good.png" not in message
    expected = {"garbage": "corrupt", "zero-byte": "empty file", "truncated png": "truncated",
                "truncated jpeg": "truncated", "corrupt label": "truncated", "label size": "but its image",
                "label value": "[7]", "too small": "upsample", "too small for five-crop": "upsample"}[problem]
    assert expected in message, message
    bad = [i for i in range(len(ds)) if "bad" in ds.samples[i // (5 if ds.five_crop else 1)]["name"]]
    with pytest.raises(DataError):  # the loader agrees: the same file fails when read
        [ds[i] for i in bad]


def test_preflight_reports_every_bad_file_in_one_line(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=8)
    for k in (1, 2, 4, 6, 7):  # five bad images, in sorted order
        (tmp_path / "train" / f"0001TP_00{k}.png").write_bytes(b"")
    message = preflight_error(build_dataset("camvid", tmp_path, "train", "eval", crop_size=48))
    assert message.startswith("5 of 8 images of camvid cannot be used: ") and message.endswith("; and 2 more")
    assert [f"0001TP_00{k}.png" in message for k in range(8)] == [False, True, True, False, True, False, False, False]
    assert message.count("empty file") == 3


def test_preflight_passes_good_sets_and_mat_files(tmp_path):
    build_camvid(tmp_path, splits=("train",), n=3)
    assert data.check_files(build_dataset("camvid", tmp_path, "train", "train", crop_size=48)) == 3
    synthetic = build_dataset("synthetic", None, "train", length=1000)
    start = time.perf_counter()
    assert data.check_files(synthetic) == 0 and time.perf_counter() - start < 0.05  # nothing to read or draw
    build_potsdam_mat(tmp_path / "p")
    assert data.check_files(build_dataset("potsdam", tmp_path / "p", "train", crop_size=48)) == 2
    (tmp_path / "p" / "gt" / "1.mat").write_bytes(b"garbage")
    assert "1.mat" in preflight_error(build_dataset("potsdam", tmp_path / "p", "train", crop_size=48))


def test_real_camvid_preflight_is_fast():
    root = need_shared("data", "camvid")
    for split, count in (("train", 367), ("val", 101)):
        ds = build_dataset("camvid", root, split, "train" if split == "train" else "eval",
                           crop_size=224 if split == "train" else 320)
        start = time.perf_counter()
        assert data.check_files(ds) == count
        assert time.perf_counter() - start < 10  # about 0.5 s (train) and 0.15 s (val) on 2 cores


# ------------------------------------------------------------------------------------------------
# Prediction folder: names never collide, sizes follow the stride, too small / elongated refused
# ------------------------------------------------------------------------------------------------

def test_predict_folder_names_and_sizes(tmp_path):
    save(tmp_path / "photo.png", rgb(0))
    save_jpeg(tmp_path / "photo.jpg", rgb(1))
    save(tmp_path / "other.png", rgb(2, 50, 40))
    save(tmp_path / "gray.png", rgb(3)[:, :, 0])
    (tmp_path / "notes.txt").write_text("not an image")
    folder = data.PredictFolder(tmp_path, short_side=64, stride=14)
    assert data.check_files(folder) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = {item["name"]: item for item in folder}
    assert sorted(items) == ["gray", "other", "photo_jpg", "photo_png"]
    assert sum("grayscale" in str(w.message) for w in caught) == 1
    for name, (height, width) in {"photo_png": (48, 64), "other": (50, 40)}.items():
        scale = 64 / min(height, width)
        expected = tuple(max(14, round(side * scale / 14) * 14) for side in (height, width))
        assert items[name]["image"].shape == (3, *expected)  # (70, 84) and (84, 70)
        assert 0 <= items[name]["image"].min() and items[name]["image"].max() <= 1
    raises_naming(tmp_path / "missing", lambda: data.PredictFolder(tmp_path / "missing"))


def test_output_names_never_collide():
    paths = [Path(p) for p in ["a/photo.png", "a/photo.jpg", "a/photo_png.bmp", "a/Photo.tif", "a/x.png", "a/X.jpg",
                               "a/solo.png"]]
    names = data.output_names(paths)
    assert len({n.lower() for n in names}) == len(names), names
    assert names[-1] == "solo" and names[0].startswith("photo") and names[2] == "photo_png"


def test_predict_folder_refuses_tiny_and_elongated_images(tmp_path):
    save(tmp_path / "ok.png", rgb(0, 48, 144))  # 3:1 -> 64 x 192: fine
    save(tmp_path / "tiny.png", rgb(1, 12, 16))  # short side 12 -> 64: 5.3x upsampling
    save(tmp_path / "strip.png", rgb(2, 20, 200))  # 10:1
    folder = data.PredictFolder(tmp_path, short_side=64, stride=8)
    message = preflight_error(folder)
    assert message.startswith("2 of 3 images") and "tiny.png" in message and "strip.png" in message
    assert "ok.png" not in message and "elongated" in message and "upsampled 5.3x" in message
    names = [s["name"] for s in folder.samples]
    assert folder[names.index("ok")]["image"].shape == (3, 64, 192)
    raises_naming("strip.png", lambda: folder[names.index("strip")])


def test_synthetic_scenes_are_drawn_once_and_handed_out_as_copies():
    ds = data.build_dataset("synthetic", None, split="train", mode="eval", crop_size=64, length=2)
    first = ds[1]["image"]
    first.mul_(0)  # a caller that writes into its batch must not change the kept scene
    fresh = data.build_dataset("synthetic", None, split="train", mode="eval", crop_size=64, length=2)
    assert torch.equal(ds[1]["image"], fresh[1]["image"]) and len(ds.drawn) == 1
