"""Data for IL2Vseg: the paper's Ĩ, the items the model sees, a pre-flight check and a prediction folder.

Paper parts covered
- Section "Method", first paragraph: from a batch I_b (B, 3, H, W) "according to the principles of
  color invariance and luminosity invariance, we obtain Ĩ_b" (`photometric_augment`); the
  correspondence loss compares the features of I_b and Ĩ_b.
- Section "Experiments / Datasets": COCO-Stuff-27, Cityscapes (27 classes), Potsdam-3 and MaSTr1325
  (plus CamVid, your own folder and drawn synthetic scenes). Their classes, label tables and file
  layouts live in layouts.py; this file gives every set the same geometry (the peers' protocol).

Contents, in order
1. Ĩ: colour- and luminosity-invariant copy of a batch (plain torch, batched, any device).
2. The geometric pipeline shared by all sets: `SegmentationDataset`; `list_samples` (which files of
   a split, `length` of them evenly spread), `build_dataset` (both together).
3. The pre-flight check `check_files`: every file of a set decoded (cheaply) and checked at once,
   before any weights load, so a bad file fails in one second instead of mid-training.
4. `PredictFolder`: every image of a folder, for --predict, with output names that never collide.

Conventions (shared by the whole project)
- An item is a dict: "image" float32 (3, H, W) RGB in [0, 1] (NOT ImageNet-normalised:
  backbones.normalize does that), "label" int64 (H, W) with class ids 0..n_classes-1 and IGNORE = -1
  for void (all -1 when the image has no label), "has_label" bool, "name" str.
- Geometry (the peers' protocol): the short side is resized to `resize` (default crop_size) and the
  centre crop_size x crop_size crop is taken: STEGO / SmooSeg evaluate with Resize(320) + CenterCrop(320)
  and train with Resize(224) + CenterCrop(224) of five-crops (below), without flips. mode "train" with
  train_crop="random" takes a random crop plus a random horizontal flip instead. Images are resized
  with nearest neighbour as the peers do (PIL NEAREST through torchvision's Resize), or bilinearly
  (antialiased) with interpolation="bilinear"; labels always with nearest neighbour, so they stay class
  ids. crop_size is a multiple of the backbone's stride.
- `five_crop=True` is STEGO's pre-cropping: every source image gives 5 crops (top-left, top-right,
  bottom-left, bottom-right, centre) of five_crop_ratio (0.5) of its height and width, taken BEFORE
  the resize/crop above; the data set is then 5x longer (item i = crop i % 5 of image i // 5).
- Randomness (train_crop="random"): the random crop and flip of item `index` come from
  numpy.random.default_rng([seed, epoch, index]): the same (seed, epoch, index) always gives the same
  crop, whichever worker loads it. Call `dataset.set_epoch(e)` to get fresh crops each epoch.
- Size limits: an image is never upsampled more than MAX_UPSCALE (4x) to reach a crop or a prediction
  size, and a prediction image is refused when its long side would be more than MAX_ASPECT (4x) its
  short side (a 320-pixel short side then gives at most 1280 pixels): such inputs would run for minutes
  and gigabytes. `check_files` finds them before the run; the loaders refuse them too.
- Bad input raises DataError (a ValueError) with ONE line that names the file or folder.
  Convertible images (grayscale, RGBA, palette, 16-bit, CMYK) are converted and said once per data set
  with warnings.warn.
"""

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# Re-exported: callers use data.DATASETS, data.DataError, data.IGNORE, data.read_rgb, data.list_images.
from checkpoints import one_line
from layouts import (DATASETS, IGNORE, READERS, SYNTHETIC_SPLITS, DataError, check_label_size,  # noqa: F401
                     IMAGE_SUFFIXES, draw_synthetic_scene, folder_label_map, label_table, list_images, map_labels,
                     probe_image, read_rgb, samples_camvid, samples_cityscapes, samples_cocostuff, samples_folder,
                     samples_mastr1325, samples_potsdam)

MAX_UPSCALE = 4  # an image is never upsampled more than this (crop or prediction size): DataError
MAX_ASPECT = 4  # a prediction image whose resized long side exceeds this times its short side: DataError


# ----------------------------------------------------------------------------------------------
# 1. Ĩ: colour- and luminosity-invariant photometric augmentation (plain torch, any device, batched)
# ----------------------------------------------------------------------------------------------

def grayscale(images):
    """(B, 3, H, W) -> luma (B, 1, H, W), ITU-R 601 weights (as PIL's "L" conversion)."""
    r, g, b = images.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(images):
    """(..., 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue in [0, 1), as colorsys.rgb_to_hsv)."""
    r, g, b = images.unbind(-3)
    maxc = images.max(dim=-3).values  # (..., H, W): value
    minc = images.min(dim=-3).values
    delta = maxc - minc  # chroma
    saturation = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], dim=-3)


def hsv_to_rgb(hsv):
    """(..., 3, H, W) HSV in [0, 1] -> RGB in [0, 1]; channel n uses k = (n + 6h) mod 6 with n = 5, 3, 1."""
    hue, saturation, value = hsv.unbind(-3)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue * 6.0, 6.0)
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=-3)


def adjust_brightness(images, factor):
    """images (B, 3, H, W), factor (B,): f * x."""
    return (images * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(images, factor):
    """Blend with the mean luma of each image: f * x + (1 - f) * mean(luma).

    needs: grayscale
    """
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(images, factor):
    """Blend with the per-pixel luma: f * x + (1 - f) * luma.

    needs: grayscale
    """
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * grayscale(images)).clamp(0, 1)


def adjust_hue(images, shift):
    """Rotate the hue of each image by shift (B,) in turns (0.1 = 36 degrees) through HSV.

    needs: rgb_to_hsv, hsv_to_rgb
    """
    hsv = rgb_to_hsv(images)  # (B, 3, H, W)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


def gaussian_blur(images, sigma, size=5):
    """Blur each image (B, 3, H, W) with its own Gaussian of std sigma (B,) in pixels: a size x size kernel
    (separable), reflected borders, as torchvision's GaussianBlur."""
    B, C, H, W = images.shape
    offsets = torch.arange(size, device=images.device, dtype=images.dtype) - (size - 1) / 2  # (size,)
    taps = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)                               # (B, size)
    taps = (taps / taps.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)                 # (B C, size)
    x = F.pad(images.reshape(1, B * C, H, W), (size // 2,) * 4, mode="reflect")
    x = F.conv2d(x, taps.view(B * C, 1, 1, size), groups=B * C)                               # along the rows
    x = F.conv2d(x, taps.view(B * C, 1, size, 1), groups=B * C)                               # along the columns
    return x.view(B, C, H, W)


def photometric_augment(images, generator=None, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                        grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0)):
    """Ĩ of the paper: a colour- and luminosity-jittered copy of a batch I (B, 3, H, W) in [0, 1].

    STEGO's photometric recipe, per image: ColorJitter(0.3, 0.3, 0.3, 0.1) (factors uniform in [1 - b, 1 + b],
    ..., a hue shift in [-h, h] turns), then grayscale with probability 0.2, then a 5 x 5 Gaussian blur of
    std uniform in [0.1, 2] pixels with probability 0.5. One difference: the jitter's four parts come in a
    fixed order (torchvision draws the order at random). The geometry is unchanged, so pixel (i, j) of Ĩ is
    pixel (i, j) of I. Every random number comes from `generator`, drawn on its device, in this order:
    brightness, contrast, saturation, hue, grayscale, blur, blur std.
    needs: adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue, grayscale, gaussian_blur
    """
    batch = images.shape[0]
    draw_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low, high):  # (B,) on the images' device
        u = torch.rand(batch, generator=generator, device=draw_device)
        return (low + (high - low) * u).to(images.device, images.dtype)

    b, c, s, h = (uniform(1 - brightness, 1 + brightness), uniform(1 - contrast, 1 + contrast),
                  uniform(1 - saturation, 1 + saturation), uniform(-hue, hue))  # (B,) each
    gray, blur = uniform(0, 1) < grayscale_p, uniform(0, 1) < blur_p           # (B,) bool
    sigma = uniform(*blur_sigma)                                                # (B,)

    out = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(images, b), c), s), h)  # (B, 3, H, W)
    out = torch.where(gray.view(-1, 1, 1, 1), grayscale(out).expand_as(out), out)
    out = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(out, sigma), out)
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# 2. The geometric pipeline shared by all sets: five-crop, resize, crop, flip
# ----------------------------------------------------------------------------------------------

FIVE_CROP_NAMES = ("tl", "tr", "bl", "br", "c")


def five_crop_one(image, label, which, ratio=0.5):
    """STEGO five-crop: crop `which` (0 tl, 1 tr, 2 bl, 3 br, 4 centre) of int(ratio*H) x int(ratio*W).

    image (3, H, W), label (H, W) -> the same window of both.
    """
    height, width = image.shape[1:]
    crop_h, crop_w = int(height * ratio), int(width * ratio)
    tops = [0, 0, height - crop_h, height - crop_h, int(round((height - crop_h) / 2.0))]
    lefts = [0, width - crop_w, 0, width - crop_w, int(round((width - crop_w) / 2.0))]
    top, left = tops[which], lefts[which]
    return image[:, top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]


def resized_size(height, width, short):
    """(H, W) after resizing the short side to `short`: long side int(long * short / min) (torchvision)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def resize_image(image, size, interpolation="nearest"):
    """image (C, H, W) -> (C, size[0], size[1]): nearest neighbour through pixel centres (PIL NEAREST,
    torch's "nearest-exact"), or bilinear with antialiasing (interpolation="bilinear")."""
    if interpolation == "bilinear":
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    def source(n_in, n_out):  # the input pixel under each output pixel's centre, summed up as PIL does
        steps = np.full(n_out, n_in / n_out)
        steps[0] /= 2
        centres = np.add.accumulate(steps)                     # one addition after the other: PIL's rounding too
        return torch.from_numpy(np.minimum(centres.astype(np.int64), n_in - 1))
    height, width = image.shape[-2:]
    return image.index_select(-2, source(height, size[0])).index_select(-1, source(width, size[1]))


def resize_short_side(image, label, short, interpolation="nearest"):
    """Resize so that min(H, W) == short: image (3, H, W) by `interpolation`, label (H, W) nearest.

    needs: resized_size, resize_image
    """
    height, width = image.shape[1:]
    if min(height, width) == short:
        return image, label
    size = resized_size(height, width, short)
    return resize_image(image, size, interpolation), resize_image(label, size)


def say_once(said, dataset_name, note):
    """warnings.warn a conversion note once per kind (the part before " (e.g. path)")."""
    kind = (note or "").split(" (e.g.")[0]
    if note and kind not in said:
        said.add(kind)
        warnings.warn(f"{dataset_name}: {note}", stacklevel=3)


class SegmentationDataset(Dataset):
    """Samples (files or drawn scenes) -> dicts {"image", "label", "has_label", "name"}.

    samples: list of dicts {"name", "format": "png"|"mat"|"synthetic", "image": path, "label": path|None}
    (synthetic samples carry "rng_seed" and "size" instead of paths). See `build_dataset`.
    """

    def __init__(self, samples, dataset_name, n_classes, class_names, label_map, mode, crop_size, resize,
                 seed, five_crop, five_crop_ratio, train_crop="centre", interpolation="nearest"):
        self.samples = samples
        self.dataset_name = dataset_name
        self.n_classes = n_classes
        self.class_names = list(class_names)
        self.table = label_table(label_map) if label_map is not None else None  # raw value -> class id
        self.mode = mode
        self.crop_size = crop_size
        self.resize = resize  # short side after resizing; 0 = keep the native size
        self.seed = seed
        self.five_crop = five_crop
        self.five_crop_ratio = five_crop_ratio
        self.random_crop = mode == "train" and train_crop == "random"  # random crop and flip, else the centre
        self.interpolation = interpolation
        self.epoch = 0
        self.said = set()  # conversion notes already said by this data set (each said once)
        self.drawn = {}  # synthetic scenes kept (per process): a scene is drawn once, not every epoch

    @property
    def has_labels(self):
        """True when any item has a label (synthetic scenes always do); False for image-only folders."""
        return any(sample["format"] == "synthetic" or sample.get("label") is not None for sample in self.samples)

    def set_epoch(self, epoch):
        """Choose the epoch that seeds the random crops/flips (see module docstring)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.samples) * (5 if self.five_crop else 1)

    def size_problem(self, height, width):
        """Why a height x width source image cannot give this set's crops, or None when it can.

        The same rule for the loader and for `check_files`: five-crop first, then the short side is
        resized to `resize` (never upsampling more than MAX_UPSCALE), then the crop must fit.
        """
        if self.five_crop:
            height, width = int(height * self.five_crop_ratio), int(width * self.five_crop_ratio)
            if height < 1 or width < 1:
                return f"image is too small for five-crop ratio {self.five_crop_ratio}"
        if self.resize:
            short = min(height, width)
            if self.resize > MAX_UPSCALE * short:  # e.g. --eval-crop 4000 on a 384-pixel image
                return (f"resizing its short side {short} to {self.resize} would upsample it "
                        f"{self.resize / short:.1f}x (more than {MAX_UPSCALE}x); use a smaller crop")
            height, width = resized_size(height, width, self.resize)
        if self.crop_size > height or self.crop_size > width:
            return (f"crop {self.crop_size}x{self.crop_size} is larger than the image after resizing "
                    f"({width}x{height}, WxH); use resize >= crop_size")
        return None

    def load(self, sample):
        """-> image float32 (3, H, W) in [0, 1], label int64 (H, W) or None."""
        if sample["format"] == "synthetic":
            key = tuple(sample["rng_seed"])
            if key in self.drawn:
                image, label = self.drawn[key]
            else:
                image, label = draw_synthetic_scene(np.random.default_rng(sample["rng_seed"]), *sample["size"])
                image, label = torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)
                if len(self.drawn) < 128:  # at most 128 scenes (2.5 MB each) kept per process
                    self.drawn[key] = image, label
            return image.clone(), label.clone()  # the callers' tensors, never the kept ones
        read_image, read_label = READERS[sample["format"]]
        array, note = read_image(sample["image"])
        say_once(self.said, self.dataset_name, note)
        array = array if array.flags.writeable and array.flags.c_contiguous else np.array(array)
        image = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if sample["label"] is None:
            return image, None
        raw, note = read_label(sample["label"])
        say_once(self.said, self.dataset_name, note)
        check_label_size(raw.shape, image.shape[1:], sample["label"], sample["image"])
        return image, torch.from_numpy(map_labels(raw, self.table, sample["label"]))

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        sample = self.samples[index // 5 if self.five_crop else index]
        image, label = self.load(sample)  # (3, H, W), (H, W) or None
        problem = self.size_problem(*image.shape[1:])
        if problem:
            raise DataError(f"{sample.get('image') or sample['name']}: {problem}")
        has_label = label is not None
        if label is None:
            label = torch.full(image.shape[1:], IGNORE, dtype=torch.int64)
        name = sample["name"]

        # 1. STEGO five-crop: corner/centre crop of ratio*H x ratio*W of the source image
        if self.five_crop:
            image, label = five_crop_one(image, label, index % 5, self.five_crop_ratio)
            name = f"{name}_{FIVE_CROP_NAMES[index % 5]}"

        # 2. resize the short side (the image by self.interpolation, the label nearest)
        if self.resize:
            image, label = resize_short_side(image, label, self.resize, self.interpolation)

        # 3. the centre crop (the peers), or a random crop and a random horizontal flip
        height, width = image.shape[1:]
        size = self.crop_size
        rng = np.random.default_rng([self.seed, self.epoch, index])  # per-item randomness
        if self.random_crop:
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        else:
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = image[:, top:top + size, left:left + size]  # (3, size, size)
        label = label[top:top + size, left:left + size]  # (size, size)
        if self.random_crop and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image.clamp(0, 1).contiguous(), "label": label.contiguous(),
                "has_label": has_label, "name": name}


# Which files: a split's samples, classes and label table (the layouts themselves are in layouts.py)

def evenly_spaced(items, length):
    """`length` items spread evenly over the list (first and last kept when length >= 2; one -> the first).

    Index i of n picks round(i * (n - 1) / (length - 1)) with halves rounded up, in integers, so the
    picks are distinct and deterministic. On a video set (CamVid) this samples the whole sequence
    instead of one stretch of it.
    """
    n = len(items)
    if length >= n:
        return list(items)
    if length == 1:
        return [items[0]]
    return [items[(2 * i * (n - 1) + (length - 1)) // (2 * (length - 1))] for i in range(length)]


def list_samples(name, root=None, split="train", n_classes=None, class_names=None, length=None, seed=0,
                 synthetic_size=(384, 512)):
    """The samples of one split -> {"samples", "n_classes", "class_names", "label_map"}.

    name: one of DATASETS. split: as the layout names it (cocostuff: train/val -> train2017/val2017;
    potsdam .mat: train, unlabelled_train, val (= labelled_test), train+val; mastr1325: train/val/all,
    see `mastr_holdout`). n_classes: needed only by "folder" with labels. length: synthetic: number of
    scenes (default 64 for train, 16 otherwise); other sets: `evenly_spaced` files of the sorted list.
    seed and synthetic_size (H, W): the synthetic scenes.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; choose one of {sorted(DATASETS)}")
    if length is not None and (not isinstance(length, (int, np.integer)) or length < 1):
        raise DataError(f"length must be a positive integer (or None for all), got {length}")
    info = DATASETS[name]
    layout, label_map = info["layout"], info["label_map"]
    if name != "folder" and n_classes is not None and n_classes != info["n_classes"]:
        raise DataError(f"{name} has {info['n_classes']} classes, n_classes={n_classes} was given")

    if name == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise DataError(f"synthetic: unknown split '{split}'; choose one of {sorted(SYNTHETIC_SPLITS)}")
        count = length if length is not None else (64 if split == "train" else 16)
        samples = [{"name": f"synthetic_{split}_{i:05d}", "format": "synthetic", "size": tuple(synthetic_size),
                    "rng_seed": [seed, SYNTHETIC_SPLITS[split], i]} for i in range(count)]
    else:
        if root is None:
            raise DataError(f"--data {name} needs --data-root FOLDER, the folder that holds {layout}")
        if not Path(root).is_dir():
            raise DataError(f"{root}: data folder of {name} not found; expected layout {layout}")
        if name == "potsdam":
            samples, kind = samples_potsdam(root, split, layout)
            label_map = info["label_map_png"] if kind == "png" else info["label_map"]
        else:
            lister = {"cityscapes": samples_cityscapes, "cocostuff": samples_cocostuff, "camvid": samples_camvid,
                      "mastr1325": samples_mastr1325, "folder": samples_folder}[name]
            samples = lister(root, split, layout)
        samples = evenly_spaced(samples, length) if length is not None else samples

    if name == "folder":  # classes come from the user: n_classes or class_names
        labelled = any(s["label"] is not None for s in samples)
        n_classes = len(class_names) if n_classes is None and class_names else n_classes
        if labelled and n_classes is None:
            raise DataError(f"{Path(root) / 'labels' / split}: folder has labels; pass n_classes")
        if class_names and len(class_names) != n_classes:
            raise DataError(f"{root}: {len(class_names)} class_names for n_classes={n_classes}")
        label_map = folder_label_map(n_classes) if n_classes else {255: IGNORE}
        class_names = class_names or [f"class {i}" for i in range(n_classes or 0)]
    else:
        n_classes, class_names = info["n_classes"], class_names or info["class_names"]
    if not samples:
        raise DataError(f"{root}: no samples for split '{split}'")
    return {"samples": samples, "n_classes": n_classes, "class_names": list(class_names), "label_map": label_map}


def build_dataset(name, root=None, split="train", mode="train", crop_size=224, resize=None, n_classes=None,
                  seed=0, five_crop=False, length=None, five_crop_ratio=0.5, class_names=None,
                  synthetic_size=(384, 512), stride=8, train_crop="centre", interpolation="nearest"):
    """Build a data set -> SegmentationDataset (torch Dataset) of dicts image/label/has_label/name.

    name: one of DATASETS. root: data folder (ignored for synthetic). split: as the layout names it
    (see `list_samples`). mode: "train" or "eval": resize + centre crop in both (the peers), except
    train_crop="random" in train mode: resize + random crop + random flip. interpolation: "nearest" (the
    peers) or "bilinear" for the images (labels always nearest). crop_size: side of the square output, a positive multiple of `stride`, the backbone's
    stride (8 for the DINO ViTs, 14 for DINOv2, 32 for ResNet-50). resize: short side after resizing
    (None -> crop_size; 0 -> no resize). n_classes: only for "folder" (required when it has labels).
    length: synthetic: number of scenes (default 64 for train, 16 otherwise); other sets: `length` files
    evenly spread over the sorted list (first and last included). seed: seeds crops/flips and the
    synthetic scenes. five_crop: STEGO five-crop (5x items). synthetic_size: (H, W) of the drawn scenes.
    Files are read lazily; call `check_files` to check them all up front.
    """
    if mode not in ("train", "eval"):
        raise DataError(f"mode must be 'train' or 'eval', got '{mode}'")
    if not isinstance(stride, (int, np.integer)) or stride <= 0:
        raise DataError(f"stride must be a positive integer (the backbone's patch), got {stride}")
    if not isinstance(crop_size, (int, np.integer)) or crop_size <= 0 or crop_size % stride:
        raise DataError(f"crop_size must be a positive multiple of {stride} (the backbone's stride), got {crop_size}")
    resize = crop_size if resize is None else int(resize)
    if resize and resize < crop_size:
        raise DataError(f"resize {resize} is smaller than crop_size {crop_size}: the crop would not fit")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    if not 0 < five_crop_ratio <= 1:
        raise DataError(f"five_crop_ratio must be in (0, 1], got {five_crop_ratio}")
    found = list_samples(name, root, split, n_classes, class_names, length, seed, synthetic_size)
    return SegmentationDataset(found["samples"], name, found["n_classes"], found["class_names"],
                               found["label_map"], mode, crop_size, resize, seed, five_crop, five_crop_ratio,
                               train_crop, interpolation)


# ----------------------------------------------------------------------------------------------
# 3. Pre-flight check: every file of a set, fast, all problems in one line
# ----------------------------------------------------------------------------------------------

def files_fingerprint(dataset):
    """What a checkpoint records of its training files: their number and a hash of their names (a file
    added, removed or renamed changes it; the content of a file does not)."""
    names = "\n".join(str(sample.get("image") or sample["name"]) for sample in dataset.samples)
    return f"{len(dataset.samples)} files (names {hashlib.sha256(names.encode()).hexdigest()[:12]})"


def check_files(dataset, workers=8, shown=3):
    """Check every file of a SegmentationDataset or PredictFolder up front -> number of images checked.

    Per sample, in a thread pool (PIL decodes outside the GIL): the image decodes (`probe_image`: PNG
    chunk CRCs, JPEG at 1/8 scale, .mat loaded; zero-byte and truncated files fail); the label decodes
    in full, has the size of its image and holds only raw values of the set's own label table (the one
    the loader uses); the image is large enough for the crops (or, in a PredictFolder, not too small
    and not too elongated), by the rule the loader applies (`dataset.size_problem`).
    All problems are raised at once as ONE DataError line: the first `shown` with their problem, then
    "and N more". Synthetic scenes need no check (0 is returned at once).
    """
    samples = [sample for sample in dataset.samples if sample["format"] != "synthetic"]
    if not samples:
        return 0
    table = getattr(dataset, "table", None)

    def problem_of(sample):  # -> one line, or None when the sample is fine
        try:
            height, width = probe_image(sample["image"])
            if sample.get("label") is not None:
                raw, _ = READERS[sample["format"]][1](sample["label"])  # (H, W) raw ids
                check_label_size(raw.shape, (height, width), sample["label"], sample["image"])
                map_labels(raw, table, sample["label"])
            problem = dataset.size_problem(height, width)
            return f"{sample['image']}: {problem}" if problem else None
        except DataError as error:
            return str(error)
        except Exception as error:  # anything else a file can throw (permissions, memory, ...)
            return f"{sample['image']}: {one_line(error)}"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(samples)))) as pool:
        problems = [problem for problem in pool.map(problem_of, samples) if problem]
    dataset.problems = problems  # cli.build_datasets: each bad file once, over every set of the command
    if problems:
        more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
        raise DataError(f"{len(problems)} of {len(samples)} images of {dataset.dataset_name} cannot be used: "
                        + "; ".join(problems[:shown]) + more)
    return len(samples)


# ----------------------------------------------------------------------------------------------
# 4. Prediction folder (--predict): every image, resized for the backbone, names that never collide
# ----------------------------------------------------------------------------------------------

def predict_size(height, width, short_side=320, stride=8):
    """(H', W') for prediction: both sides scaled by short_side / min(H, W), then rounded to multiples of
    `stride` (the short side is then exactly `short_side` when that is a multiple of `stride`)."""
    scale = short_side / min(height, width)
    return tuple(max(stride, round(side * scale / stride) * stride) for side in (height, width))


def output_names(paths):
    """One output name per image, never two alike (case-insensitively, for case-insensitive disks).

    The stem when it is unique in the folder; the stem plus the suffix when stems collide (photo.png,
    photo.jpg -> photo_png, photo_jpg); a "_2", "_3", ... when even that name is taken.
    """
    stems = [Path(path).stem for path in paths]
    counts = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    names, taken = [], {stem.lower() for stem in stems if counts[stem.lower()] == 1}
    for path, stem in zip(paths, stems):
        if counts[stem.lower()] == 1:
            names.append(stem)
            continue
        name = base = f"{stem}_{Path(path).suffix.lstrip('.')}"
        k = 2
        while name.lower() in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name.lower())
        names.append(name)
    return names


class PredictFolder(Dataset):
    """Every image of a folder, resized so its short side is about `short_side` and both sides are
    multiples of `stride` (the backbone needs that); items {"image": (3, H, W) in [0, 1], "name"}.

    Names come from `output_names` (never two alike). An image that would be upsampled more than
    MAX_UPSCALE, or whose resized long side would exceed MAX_ASPECT times its short side, is refused
    (by `check_files` before the run, and by the loader). Conversions (grayscale, RGBA...) said once.
    """

    def __init__(self, folder, short_side=320, stride=8, interpolation="nearest"):
        single = Path(folder).is_file()  # --predict photo.png: that one image
        if single and Path(folder).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{folder}: not an image file ({'/'.join(IMAGE_SUFFIXES)}) nor a folder of them")
        if not single and not Path(folder).is_dir():
            raise DataError(f"{folder}: prediction folder (or image file) not found")
        if not isinstance(stride, (int, np.integer)) or stride <= 0 or not isinstance(short_side, (int, np.integer)) \
                or short_side < stride:
            raise DataError(f"{folder}: short_side ({short_side}) and stride ({stride}) must be integers, "
                            f"short_side >= stride > 0")
        paths = [Path(folder)] if single else list_images(folder, "a folder of image files")
        self.samples = [{"name": name, "format": "png", "image": path, "label": None}
                        for name, path in zip(output_names(paths), paths)]
        self.dataset_name, self.short_side, self.stride = str(folder), short_side, stride
        self.interpolation = interpolation
        self.said = set()

    def __len__(self):
        return len(self.samples)

    def size_problem(self, height, width):
        """Why a height x width image cannot be predicted (too small or too elongated), or None."""
        if self.short_side > MAX_UPSCALE * min(height, width):
            return (f"image {width}x{height} (WxH) would be upsampled {self.short_side / min(height, width):.1f}x "
                    f"to a short side of {self.short_side} (more than {MAX_UPSCALE}x)")
        new_h, new_w = predict_size(height, width, self.short_side, self.stride)
        if max(new_h, new_w) > MAX_ASPECT * min(new_h, new_w):
            return (f"image {width}x{height} (WxH) is too elongated: resized to {new_w}x{new_h}, its long side "
                    f"would be more than {MAX_ASPECT}x its short side; crop it first")
        return None

    def __getitem__(self, index):
        sample = self.samples[index]
        array, note = read_rgb(sample["image"])
        say_once(self.said, "predict", note)
        image = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # (3, H, W), a writable copy
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        problem = self.size_problem(*image.shape[1:])
        if problem:
            raise DataError(f"{sample['image']}: {problem}")
        size = predict_size(*image.shape[1:], self.short_side, self.stride)
        return {"image": resize_image(image, size, self.interpolation).clamp(0, 1), "name": sample["name"],  # (3, H', W')
                "size": torch.tensor(image.shape[1:])}  # the input's own (H, W), for the class-id PNG
