"""Data for IL2Vseg: the data sets of the paper, CamVid, your own folder, a synthetic default, and Ĩ.

Paper parts covered
- Section "Experiments / Datasets": COCO-Stuff-27, Cityscapes (27 classes), Potsdam-3 and MaSTr1325,
  loaded in their official layouts with the label mappings the peers (STEGO, SmooSeg, HP, EAGLE) use.
- Section "Method", first paragraph: the colour- and luminosity-invariant copy Ĩ_b of a batch I_b
  (`photometric_augment`), which the correspondence loss compares with I_b.
- Plus CamVid (SegNet layout), any `<root>/{imgs,labels}/{split}/` folder, and `synthetic`: maritime
  scenes drawn by the code with exact labels, so the whole pipeline runs and scores out of the box.

Conventions (shared by the whole project)
- An item is a dict: "image" float32 (3, H, W) RGB in [0, 1] (NOT ImageNet-normalised; `normalize` does
  that), "label" int64 (H, W) with class ids 0..n_classes-1 and IGNORE = -1 for void (all -1 when the
  image has no label), "has_label" bool, "name" str.
- Geometry (peers' protocol): mode "eval" resizes the short side to `resize` (default crop_size) and
  takes the centre crop_size x crop_size crop (STEGO/SmooSeg eval: Resize(320) + CenterCrop(320));
  mode "train" resizes the short side to `resize` (default crop_size, as SmooSeg trains at 224) and takes
  a random crop_size crop plus a random horizontal flip. Images are resized bilinearly (antialiased),
  labels with nearest neighbour, so labels stay class ids.
- `five_crop=True` is STEGO's pre-cropping: every source image gives 5 crops (top-left, top-right,
  bottom-left, bottom-right, centre) of five_crop_ratio (0.5) of its height and width, taken BEFORE
  the resize/crop above; the data set is then 5x longer (item i = crop i % 5 of image i // 5).
- Randomness: the random crop and flip of item `index` come from
  numpy.random.default_rng([seed, epoch, index]): the same (seed, epoch, index) always gives the same
  crop, whichever worker loads it. Call `dataset.set_epoch(e)` to get fresh crops each epoch.
- Bad input raises DataError (a ValueError) with ONE line that names the file or folder.
  Convertible images (grayscale, RGBA, palette, 16-bit, CMYK) are converted and said once per data set
  with warnings.warn.

Label mappings (raw value in the file -> class id; any raw value not listed is a DataError)
- cityscapes: gtFine labelIds 7..33 -> 0..26, 0..6 -> IGNORE (STEGO's "labelId - 7").
- cocostuff: stuffthingmaps fine ids 0..181 -> 27 coarse classes (`COCO_COARSE_GROUPS`), 255 -> IGNORE.
- potsdam (.mat release, 6 fine ids): {0, 4} -> 0 roads+cars, {1, 5} -> 1 buildings+clutter,
  {2, 3} -> 2 vegetation+trees, 255 -> IGNORE.
  potsdam (ISPRS/mmsegmentation PNG tiles: 0 boundary, 1 impervious, 2 building, 3 low vegetation,
  4 tree, 5 car, 6 clutter): the same 3 classes, {1, 5} -> 0, {2, 6} -> 1, {3, 4} -> 2, {0, 255} -> IGNORE.
- mastr1325: 0 obstacle, 1 water, 2 sky, 4 unknown -> IGNORE.
- camvid: 0..10 as they are, 11 (Unlabelled) -> IGNORE.
- folder: 0..n_classes-1 as they are, 255 -> IGNORE.
"""

import warnings
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

IGNORE = -1  # label value of void pixels everywhere in the project
INVALID = -2  # internal marker in label tables: a raw value that must not occur (-> DataError)

MAX_UPSCALE = 4  # a crop that needs an image upsampled more than this is refused (DataError)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class DataError(ValueError):
    """Bad data or bad data arguments; the message is one line naming the file or folder."""


def normalize(images):
    """ImageNet normalisation of (B, 3, H, W) or (3, H, W) RGB images in [0, 1]."""
    if not torch.is_tensor(images) or images.dim() not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"normalize: expected a (B, 3, H, W) or (3, H, W) tensor, got {shape}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------
# Registry: classes and raw-label mappings of every data set
# ----------------------------------------------------------------------------------------------

# Cityscapes labelIds 7..33 in order (the 27 classes of STEGO / SmooSeg "cityscapes").
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]

# COCO-Stuff-27: coarse class -> fine stuffthingmap ids (things 0..90, stuff 91..181).
COCO_COARSE_GROUPS = [
    ("electronic", [*range(71, 77)]),
    ("appliance", [*range(77, 83)]),
    ("food-things", [*range(51, 61)]),
    ("furniture-things", [*range(61, 71)]),
    ("indoor", [*range(83, 91)]),
    ("kitchen", [*range(43, 51)]),
    ("accessory", [*range(25, 33)]),
    ("animal", [*range(15, 25)]),
    ("outdoor", [*range(9, 15)]),
    ("person", [0]),
    ("sports", [*range(33, 43)]),
    ("vehicle", [*range(1, 9)]),
    ("ceiling", [101, 102]),
    ("floor", [100, *range(113, 118)]),
    ("food-stuff", [120, 121, 152, 169]),
    ("furniture-stuff", [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164]),
    ("raw-material", [99, 131, 138, 142]),
    ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]),
    ("wall", [*range(170, 177)]),
    ("window", [179, 180]),
    ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]),
    ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]),
    ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
]

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                  "pedestrian", "bicyclist"]

DATASETS = {
    "cityscapes": {
        "n_classes": 27,
        "class_names": CITYSCAPES_CLASSES,
        "label_map": {**{i: IGNORE for i in range(7)}, **{i: i - 7 for i in range(7, 34)}},
        "layout": "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                  "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png",
    },
    "cocostuff": {
        "n_classes": 27,
        "class_names": [name for name, _ in COCO_COARSE_GROUPS],
        "label_map": {**{fine: coarse for coarse, (_, fines) in enumerate(COCO_COARSE_GROUPS)
                         for fine in fines}, 255: IGNORE},
        "layout": "<root>/images/<split>2017/<id>.jpg, <root>/annotations/<split>2017/<id>.png "
                  "(stuffthingmaps) and <root>/curated/<split>2017/Coco164kFull_Stuff_Coarse[_7].txt",
    },
    "potsdam": {
        "n_classes": 3,
        "class_names": ["roads and cars", "buildings and clutter", "vegetation and trees"],
        "label_map": {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: IGNORE},  # STEGO .mat release
        "label_map_png": {1: 0, 5: 0, 2: 1, 6: 1, 3: 2, 4: 2, 0: IGNORE, 255: IGNORE},  # ISPRS PNG tiles
        "layout": "<root>/imgs/<id>.mat (key img), <root>/gt/<id>.mat (key gt) and <root>/labelled_train.txt, "
                  "unlabelled_train.txt, labelled_test.txt; or <root>/img_dir/[<split>/]*.png and "
                  "<root>/ann_dir/[<split>/]*.png",
    },
    "mastr1325": {
        "n_classes": 3,
        "class_names": ["obstacle", "water", "sky"],
        "label_map": {0: 0, 1: 1, 2: 2, 4: IGNORE},
        "layout": "<root>/MaSTr1325_images_512x384/<id>.jpg and <root>/MaSTr1325_masks_512x384/<id>m.png "
                  "(or images/ + masks/), or <root>/{imgs,labels}/<split>/",
    },
    "camvid": {
        "n_classes": 11,
        "class_names": CAMVID_CLASSES,
        "label_map": {**{i: i for i in range(11)}, 11: IGNORE},
        "layout": "<root>/<split>/*.png and <root>/<split>annot/*.png (SegNet layout)",
    },
    "folder": {
        "n_classes": None,  # given by the user
        "class_names": None,  # "class 0", "class 1", ... unless given
        "label_map": None,  # 0..n_classes-1 as they are, 255 -> IGNORE
        "layout": "<root>/imgs/<split>/*.{png,jpg} and optionally <root>/labels/<split>/<same stem>.png",
    },
    "synthetic": {
        "n_classes": 3,
        "class_names": ["obstacle", "water", "sky"],
        "label_map": None,  # drawn scenes carry class ids already
        "layout": "none: scenes are drawn by the code (root is ignored)",
    },
}


def label_table(label_map):
    """Lookup table raw value -> class id for raw values 0..max; unlisted values -> INVALID."""
    table = np.full(max(label_map) + 1, INVALID, dtype=np.int64)
    for raw, cls in label_map.items():
        table[raw] = cls
    return table


def folder_label_map(n_classes):
    """`folder` convention: ids 0..n_classes-1 as they are, 255 = void."""
    return {**{i: i for i in range(n_classes)}, 255: IGNORE}


def map_labels(raw, table, path):
    """Map a raw label array (H, W) with `table`; a value outside the table -> DataError naming it."""
    raw = raw.astype(np.int64)
    bad = (raw < 0) | (raw >= len(table))
    if not bad.any():
        mapped = table[raw]
        bad = mapped == INVALID
        if not bad.any():
            return mapped
    values = np.unique(raw[bad])
    raise DataError(f"{path}: label value(s) {values[:10].tolist()} outside the classes of this data set "
                    f"(valid raw values: {ranges_text(np.flatnonzero(table != INVALID))})")


def ranges_text(values):
    """[0, 1, 2, 3, 7, 255] -> '0-3, 7, 255' (short, one line)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Reading files: every problem becomes one DataError line naming the file
# ----------------------------------------------------------------------------------------------

def one_line(error):
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def open_image_file(path):
    """Open and fully decode an image file with PIL (so truncation is found here)."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:  # UnidentifiedImageError, truncated data, bad chunks, ...
        raise DataError(f"{path}: corrupt, truncated or unreadable image ({one_line(error)})") from None


def read_rgb(path):
    """Read an image file -> (array (H, W, 3) uint8 or float32 in [0, 1], note or None).

    RGB-like inputs are converted and the conversion is returned as a note (said once by the data set):
    grayscale / bilevel (channel repeated), RGBA / LA (alpha dropped), palette, CMYK, YCbCr,
    16-bit grayscale (scaled by 1/65535). Float ('F') images carry no defined range and are rejected.
    """
    image = open_image_file(path)
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image), None
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit integer) grayscale
        values = np.asarray(image).astype(np.float32)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: {mode} image with values outside 0..65535 cannot be read as RGB")
        gray = values / 65535.0
        return np.repeat(gray[:, :, None], 3, axis=2), f"16-bit grayscale images scaled to [0, 1] and " \
                                                       f"repeated to RGB (e.g. {path})"
    if mode == "F":
        raise DataError(f"{path}: 32-bit float image (mode F) has no defined colour range; save it as 8-bit RGB")
    notes = {
        "L": "grayscale images converted to RGB by repeating the channel",
        "1": "1-bit images converted to RGB",
        "LA": "grayscale+alpha images converted to RGB (alpha dropped)",
        "RGBA": "RGBA images converted to RGB (alpha dropped)",
        "RGBa": "RGBA images converted to RGB (alpha dropped)",
        "P": "palette images converted to RGB through their palette",
        "PA": "palette images converted to RGB through their palette",
        "CMYK": "CMYK images converted to RGB",
        "YCbCr": "YCbCr images converted to RGB",
    }
    try:
        rgb = image.convert("RGB")
    except Exception as error:
        raise DataError(f"{path}: image mode {mode} cannot be converted to RGB ({one_line(error)})") from None
    return np.asarray(rgb), f"{notes.get(mode, f'{mode} images converted to RGB')} (e.g. {path})"


def read_label_png(path):
    """Read a label map -> (raw ids (H, W) integer array, note or None).

    Single-channel files (L, P: the palette index is the id, I;16, 1) are read as they are. A 3-channel
    file whose channels are equal is read from its first channel (said once); a colour-coded label
    (channels differ) has no class ids and is rejected.
    """
    image = open_image_file(path)
    if image.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        return np.asarray(image).astype(np.int64), None
    if image.mode in ("RGB", "RGBA", "LA"):
        array = np.asarray(image)
        channels = array[:, :, :3] if image.mode != "LA" else array[:, :, :1]
        if (channels == channels[:, :, :1]).all():
            return channels[:, :, 0].astype(np.int64), f"{image.mode} label maps with equal channels read " \
                                                       f"from their first channel (e.g. {path})"
        raise DataError(f"{path}: colour-coded {image.mode} label map; expected class ids in a "
                        f"single-channel (L or P) PNG")
    raise DataError(f"{path}: label map of mode {image.mode} is not a map of integer class ids")


def load_mat(path, key):
    """One array from a MATLAB .mat file; a missing file/key or broken file -> DataError."""
    try:
        content = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:
        raise DataError(f"{path}: corrupt or unreadable .mat file ({one_line(error)})") from None
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: .mat file has no key '{key}' (keys: {keys})")
    return np.asarray(content[key])


def read_rgb_mat(path):
    """Potsdam .mat image: key 'img', (H, W, C>=3) (first 3 channels kept, as STEGO does: IR dropped).

    uint8 -> /255, uint16 -> /65535, float in [0, 1] as it is, float in (1, 255] -> /255 (said once).
    """
    array = load_mat(path, "img")
    note = None
    if array.ndim == 3 and array.shape[2] < 3 and array.shape[0] in (3, 4):  # channels first
        array, note = np.transpose(array, (1, 2, 0)), f"channels-first .mat images transposed (e.g. {path})"
    if array.ndim != 3 or array.shape[2] < 3:
        raise DataError(f"{path}: key 'img' has shape {array.shape}; expected (H, W, C) with C >= 3")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return array, note
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0, f"16-bit .mat images scaled by 1/65535 (e.g. {path})"
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise DataError(f"{path}: key 'img' holds non-numeric or non-finite values")
    array = array.astype(np.float32)
    if array.min() >= 0 and array.max() <= 1:
        return array, note
    if array.min() >= 0 and array.max() <= 255:
        return array / 255.0, f".mat images with values in 0..255 scaled by 1/255 (e.g. {path})"
    raise DataError(f"{path}: key 'img' has values in [{array.min():g}, {array.max():g}]; expected [0, 1] or 0..255")


def read_label_mat(path):
    """Potsdam .mat label: key 'gt', (H, W) or (H, W, 1) of integer ids."""
    array = np.squeeze(load_mat(path, "gt"))
    if array.ndim != 2:
        raise DataError(f"{path}: key 'gt' has shape {array.shape}; expected (H, W)")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all() \
            or (array != np.round(array)).any():
        raise DataError(f"{path}: key 'gt' does not hold integer class ids")
    return array.astype(np.int64), None


READERS = {  # format -> (image reader, label reader)
    "png": (read_rgb, read_label_png),
    "mat": (read_rgb_mat, read_label_mat),
}


# ----------------------------------------------------------------------------------------------
# Synthetic maritime scenes (MaSTr1325-like): sky gradient, wavy horizon, textured sea, obstacles
# ----------------------------------------------------------------------------------------------

SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}


def draw_synthetic_scene(rng, height=384, width=512):
    """Draw one scene -> (image float32 (H, W, 3) in [0, 1], label int64 (H, W) 0 obstacle/1 water/2 sky).

    Vectorised numpy; obstacles are drawn inside their bounding boxes only. Labels are exact: they come
    from the same geometry as the pixels (sky above a wavy horizon, textured sea below it, an optional
    shore strip and 2-5 obstacles, all "obstacle", as MaSTr1325 labels land and objects), plus noise.
    """
    y = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height  # (H, 1) in (0, 1)
    x = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width  # (1, W) in (0, 1)

    # Horizon: base height + tilt + a slow swell, one value per column -> (1, W)
    horizon = (rng.uniform(0.3, 0.55) + rng.uniform(-0.06, 0.06) * (x - 0.5)
               + rng.uniform(0.003, 0.015) * np.sin(2 * np.pi * rng.uniform(1, 4) * x + rng.uniform(0, 2 * np.pi)))
    horizon = horizon.astype(np.float32)
    sky = y < horizon  # (H, W)
    label = np.where(sky, 2, 1).astype(np.int64)

    # Sky: vertical gradient from a zenith colour to a hazier horizon colour
    zenith = np.array([rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.0)], np.float32)
    haze = np.array([rng.uniform(0.6, 1.0), rng.uniform(0.6, 0.95), rng.uniform(0.6, 1.0)], np.float32)
    t_sky = np.minimum(y / horizon, 1)  # (H, W): 0 at the top, 1 at and below the horizon

    # Sea: colour gradient with depth, waves whose frequency grows towards the horizon (perspective)
    far = np.array([rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.5), rng.uniform(0.4, 0.6)], np.float32)
    near = np.array([rng.uniform(0.0, 0.15), rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.45)], np.float32)
    depth = np.maximum((y - horizon) / (1 - horizon), 0)  # (H, W): 0 at and above the horizon, 1 at the bottom
    root_depth = np.sqrt(depth + 0.01)
    waves = np.zeros((height, width), np.float32)
    for _ in range(3):
        fx, fy, phase = rng.uniform(2, 12), rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
        waves += np.sin(np.float32(2 * np.pi) * (np.float32(fx) * x + np.float32(fy) * root_depth) + np.float32(phase))
    ripple = 1 + 0.08 * waves * (0.3 + depth)  # (H, W) brightness texture of the sea

    # Blend per pixel: sky weight 1 above the horizon, 0 below -> (H, W, 3)
    w_sky = sky.astype(np.float32)[:, :, None]
    sky_rgb = zenith + (haze - zenith) * t_sky[:, :, None]
    sea_rgb = (far + (near - far) * depth[:, :, None]) * ripple[:, :, None]
    image = sea_rgb + w_sky * (sky_rgb - sea_rgb)

    # Optional shore strip above the horizon (MaSTr1325 labels land as "obstacles and environment")
    if rng.random() < 0.5:
        top = horizon - rng.uniform(0.03, 0.1) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 5) * x
                                                                   + rng.uniform(0, 2 * np.pi)))
        row0 = int(max(top.min(), 0) * height)
        shore = (y[row0:] >= top) & sky[row0:]  # rows from row0 down
        colour = np.array([rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.4), rng.uniform(0.05, 0.2)], np.float32)
        texture = 1 + 0.15 * rng.standard_normal(int(shore.sum()), dtype=np.float32)
        image[row0:][shore] = colour * texture[:, None]
        label[row0:][shore] = 0

    # Obstacles on the water: boats (hull + white cabin), buoys (upright ellipses), rocks (bumpy)
    palette = np.array([[0.85, 0.1, 0.1], [0.95, 0.8, 0.1], [0.95, 0.95, 0.95], [0.95, 0.5, 0.1],
                        [0.25, 0.25, 0.25], [0.45, 0.3, 0.15]], np.float32)
    for _ in range(rng.integers(2, 6)):
        cx = rng.uniform(0.05, 0.95)
        base_horizon = float(np.interp(cx, x[0], horizon[0]))
        base = rng.uniform(base_horizon + 0.03, 0.97)  # where the object touches the water
        scale = 0.04 + 0.2 * (base - base_horizon) / (1 - base_horizon)  # bigger when closer
        colour = np.clip(palette[rng.integers(len(palette))] + rng.uniform(-0.08, 0.08, 3), 0, 1).astype(np.float32)
        # bounding box (in [0, 1] units) -> pixel window, all geometry evaluated inside it
        r0, r1 = int(max(base - 2.5 * scale, 0) * height), min(int(base * height) + 1, height)
        c0, c1 = int(max(cx - 2 * scale, 0) * width), min(int((cx + 2 * scale) * width) + 1, width)
        ys, xs = y[r0:r1], x[:, c0:c1]
        kind = rng.integers(3)
        if kind == 0:  # boat: hull rectangle plus a narrower, taller cabin
            half_w, hull_h = scale * rng.uniform(0.8, 1.6), scale * rng.uniform(0.25, 0.4)
            mask = (np.abs(xs - cx) < half_w) & (ys > base - hull_h) & (ys < base)
            cabin = (np.abs(xs - cx - 0.2 * half_w) < 0.4 * half_w) & (ys > base - 2.2 * hull_h) & (ys <= base - hull_h)
            image[r0:r1, c0:c1][cabin] = 0.9
            label[r0:r1, c0:c1][cabin] = 0
        elif kind == 1:  # buoy: upright ellipse
            rx, ry = scale * 0.25, scale * rng.uniform(0.35, 0.6)
            mask = ((xs - cx) / rx) ** 2 + ((ys - (base - ry)) / ry) ** 2 < 1
        else:  # rock: wide ellipse with a bumpy outline, cut at the waterline
            rx, ry = scale * rng.uniform(0.6, 1.2), scale * rng.uniform(0.3, 0.6)
            bumps = 1 + 0.15 * np.sin(rng.integers(3, 8) * np.arctan2(ys - base, xs - cx) + rng.uniform(0, 2 * np.pi))
            mask = (((xs - cx) / rx) ** 2 + ((ys - base) / ry) ** 2 < bumps ** 2) & (ys < base)
        mask = np.broadcast_to(mask, (r1 - r0, c1 - c0))
        shade = np.broadcast_to(np.clip(1 - 0.3 * (ys - (base - scale)) / scale, 0.6, 1.2), mask.shape)  # top lit
        image[r0:r1, c0:c1][mask] = colour * shade[mask][:, None]
        label[r0:r1, c0:c1][mask] = 0

    # Sensor noise everywhere (uniform, standard deviation sigma)
    sigma = np.float32(rng.uniform(0.005, 0.03))
    image += (rng.random((height, width, 3), dtype=np.float32) - 0.5) * (sigma * np.float32(12 ** 0.5))
    return np.clip(image, 0, 1, out=image), label


# ----------------------------------------------------------------------------------------------
# The data set: a list of samples + one geometric pipeline shared by all formats
# ----------------------------------------------------------------------------------------------

FIVE_CROP_NAMES = ("tl", "tr", "bl", "br", "c")


class SegmentationDataset(Dataset):
    """Samples (files or drawn scenes) -> dicts {"image", "label", "has_label", "name"}.

    samples: list of dicts {"name", "format": "png"|"mat"|"synthetic", "image": path, "label": path|None}
    (synthetic samples carry "rng_seed" and "size" instead of paths).
    """

    def __init__(self, samples, dataset_name, n_classes, class_names, label_map, mode, crop_size, resize,
                 seed, five_crop, five_crop_ratio, flip):
        self.samples = samples
        self.dataset_name = dataset_name
        self.n_classes = n_classes
        self.class_names = list(class_names)
        self.table = label_table(label_map) if label_map is not None else None
        self.mode = mode
        self.crop_size = crop_size
        self.resize = resize  # short side after resizing; 0 = keep the native size
        self.seed = seed
        self.five_crop = five_crop
        self.five_crop_ratio = five_crop_ratio
        self.flip = flip
        self.epoch = 0
        self.said = set()  # conversion notes already said by this data set (each said once)

    @property
    def has_labels(self):
        """True when any item has a label (synthetic scenes always do); False for image-only folders."""
        return any(sample["format"] == "synthetic" or sample.get("label") is not None for sample in self.samples)

    def set_epoch(self, epoch):
        """Choose the epoch that seeds the random crops/flips (see module docstring)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.samples) * (5 if self.five_crop else 1)

    def say_once(self, note):
        if note is not None and note.split(" (e.g.")[0] not in self.said:
            self.said.add(note.split(" (e.g.")[0])
            warnings.warn(f"{self.dataset_name}: {note}", stacklevel=3)

    def load(self, sample):
        """-> image float32 (3, H, W) in [0, 1], label int64 (H, W) or None."""
        if sample["format"] == "synthetic":
            rng = np.random.default_rng(sample["rng_seed"])
            image, label = draw_synthetic_scene(rng, *sample["size"])
            return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label)
        read_image, read_label = READERS[sample["format"]]
        array, note = read_image(sample["image"])
        self.say_once(note)
        array = array if array.flags.writeable and array.flags.c_contiguous else np.array(array)
        image = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if sample["label"] is None:
            return image, None
        raw, note = read_label(sample["label"])
        self.say_once(note)
        if raw.shape != tuple(image.shape[1:]):
            raise DataError(f"{sample['label']}: label is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                            f"{Path(sample['image']).name} is {image.shape[2]}x{image.shape[1]}")
        return image, torch.from_numpy(map_labels(raw, self.table, sample["label"]))

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        sample = self.samples[index // 5 if self.five_crop else index]
        source = sample.get("image") or sample["name"]
        image, label = self.load(sample)  # (3, H, W), (H, W) or None
        has_label = label is not None
        if label is None:
            label = torch.full(image.shape[1:], IGNORE, dtype=torch.int64)
        name = sample["name"]

        # 1. STEGO five-crop: corner/centre crop of ratio*H x ratio*W of the source image
        if self.five_crop:
            which = index % 5
            image, label = five_crop_one(image, label, which, self.five_crop_ratio, source)
            name = f"{name}_{FIVE_CROP_NAMES[which]}"

        # 2. resize the short side (bilinear for the image, nearest for the label)
        if self.resize:
            short = min(image.shape[1:])
            if self.resize > MAX_UPSCALE * short:  # e.g. --eval-crop 4000 on a 384-pixel image
                raise DataError(f"{source}: resizing its short side {short} to {self.resize} would upsample "
                                f"it {self.resize / short:.1f}x (more than {MAX_UPSCALE}x); use a smaller crop")
            image, label = resize_short_side(image, label, self.resize)

        # 3. crop (random in train, centre in eval) and random horizontal flip in train
        height, width = image.shape[1:]
        size = self.crop_size
        if size > height or size > width:
            raise DataError(f"{source}: crop {size}x{size} is larger than the image after resizing "
                            f"({width}x{height}, WxH); use resize >= crop_size")
        rng = np.random.default_rng([self.seed, self.epoch, index])  # per-item randomness
        if self.mode == "train":
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        else:
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = image[:, top:top + size, left:left + size]
        label = label[top:top + size, left:left + size]
        if self.mode == "train" and self.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image.clamp(0, 1).contiguous(), "label": label.contiguous(),
                "has_label": has_label, "name": name}


def five_crop_one(image, label, which, ratio, source):
    """Crop `which` (0 tl, 1 tr, 2 bl, 3 br, 4 centre) of size int(ratio*H) x int(ratio*W)."""
    height, width = image.shape[1:]
    crop_h, crop_w = int(height * ratio), int(width * ratio)
    if crop_h < 1 or crop_w < 1:
        raise DataError(f"{source}: image {width}x{height} is too small for five-crop ratio {ratio}")
    tops = [0, 0, height - crop_h, height - crop_h, int(round((height - crop_h) / 2.0))]
    lefts = [0, width - crop_w, 0, width - crop_w, int(round((width - crop_w) / 2.0))]
    top, left = tops[which], lefts[which]
    return image[:, top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]


def resize_short_side(image, label, short):
    """Resize so that min(H, W) == short (long side int(long * short / min), as torchvision's Resize)."""
    height, width = image.shape[1:]
    if min(height, width) == short:
        return image, label
    if height <= width:
        size = (short, int(short * width / height))
    else:
        size = (int(short * height / width), short)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    # nearest neighbour through pixel centres (PIL NEAREST / torch "nearest-exact"), as an index gather
    rows = ((torch.arange(size[0]) + 0.5) * (height / size[0])).long().clamp_(max=height - 1)
    cols = ((torch.arange(size[1]) + 0.5) * (width / size[1])).long().clamp_(max=width - 1)
    label = label.index_select(0, rows).index_select(1, cols)
    return image, label


# ----------------------------------------------------------------------------------------------
# Listing the files of each layout
# ----------------------------------------------------------------------------------------------

def need_dir(folder, what, layout):
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: {what} not found; expected layout {layout}")
    return Path(folder)


def list_images(folder, layout, pattern="*"):
    """Sorted image files (known suffixes) in `folder` matching `pattern`; none -> DataError."""
    files = sorted(p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images found (looked for {pattern} with suffix {'/'.join(IMAGE_SUFFIXES)}); "
                        f"expected layout {layout}")
    return files


def find_file(folder, stems):
    """First existing file folder/<stem><suffix> (.png first, then other image suffixes); None if none."""
    for stem in stems:
        for suffix in (".png", *IMAGE_SUFFIXES):
            candidate = Path(folder) / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def missing_label(image_path, expected):
    raise DataError(f"{image_path}: image has no label (expected {expected})")


def samples_cityscapes(root, split, layout):
    image_dir = need_dir(Path(root) / "leftImg8bit" / split, f"split folder leftImg8bit/{split}", layout)
    label_dir = need_dir(Path(root) / "gtFine" / split, f"split folder gtFine/{split}", layout)
    samples = []
    for image_path in list_images(image_dir, layout, "*/*_leftImg8bit.png"):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        label_path = label_dir / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label_path.is_file():
            missing_label(image_path, label_path)
        samples.append({"name": stem, "format": "png", "image": image_path, "label": label_path})
    return samples


def samples_cocostuff(root, split, layout):
    root = Path(root)
    split_dir = split if split.endswith("2017") else f"{split}2017"
    image_dir = next((d for d in (root / "images" / split_dir, root / split_dir) if d.is_dir()), None)
    if image_dir is None:
        need_dir(root / "images" / split_dir, f"split folder images/{split_dir}", layout)
    label_dir = next((d for d in (root / "annotations" / split_dir, root / "stuffthingmaps" / split_dir,
                                  root / "stuffthingmaps_trainval2017" / split_dir) if d.is_dir()), None)
    if label_dir is None:
        need_dir(root / "annotations" / split_dir, f"label folder annotations/{split_dir}", layout)
    # Curated lists (STEGO): train uses Coco164kFull_Stuff_Coarse.txt, val the _7 list.
    list_name = "Coco164kFull_Stuff_Coarse_7.txt" if split_dir == "val2017" else "Coco164kFull_Stuff_Coarse.txt"
    list_path = root / "curated" / split_dir / list_name
    if list_path.is_file():
        ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"{list_path}: curated list is empty")
        image_paths = []
        for image_id in ids:
            path = find_file(image_dir, [image_id])  # <id>.png / <id>.jpg / ...
            if path is None:
                raise DataError(f"{image_dir / (image_id + '.jpg')}: image listed in {list_path.name} not found")
            image_paths.append(path)
    else:
        warnings.warn(f"cocostuff: no curated list {list_path}; using every image of {image_dir} "
                      f"(the published COCO-Stuff-27 numbers use the curated lists)", stacklevel=3)
        image_paths = list_images(image_dir, layout)
    samples = []
    for image_path in image_paths:
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.is_file():
            missing_label(image_path, label_path)
        samples.append({"name": image_path.stem, "format": "png", "image": image_path, "label": label_path})
    return samples


POTSDAM_SPLIT_FILES = {
    "train": ["labelled_train.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "val": ["labelled_test.txt"],
    "test": ["labelled_test.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "all": ["all.txt"],
}


def samples_potsdam(root, split, layout):
    """.mat release when <root>/imgs exists, ISPRS PNG tiles when <root>/img_dir exists."""
    root = Path(root)
    if (root / "img_dir").is_dir():
        image_dir = root / "img_dir" / split if (root / "img_dir" / split).is_dir() else root / "img_dir"
        label_dir = root / "ann_dir" / split if (root / "ann_dir" / split).is_dir() else root / "ann_dir"
        if image_dir == root / "img_dir":
            warnings.warn(f"potsdam: no {root / 'img_dir' / split}; every tile of {image_dir} is used for "
                          f"split '{split}'", stacklevel=3)
        need_dir(label_dir, "label folder ann_dir", layout)
        samples = []
        for image_path in list_images(image_dir, layout):
            label_path = find_file(label_dir, [image_path.stem])
            if label_path is None:
                missing_label(image_path, label_dir / f"{image_path.stem}.png")
            samples.append({"name": image_path.stem, "format": "png", "image": image_path, "label": label_path})
        return samples, "png"
    need_dir(root / "imgs", "image folder imgs", layout)
    if split not in POTSDAM_SPLIT_FILES:
        raise DataError(f"{root}: unknown potsdam split '{split}'; choose one of {sorted(POTSDAM_SPLIT_FILES)}")
    ids = []
    for list_name in POTSDAM_SPLIT_FILES[split]:
        if not (root / list_name).is_file():
            raise DataError(f"{root / list_name}: split list not found; expected layout {layout}")
        ids += [line.strip() for line in (root / list_name).read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{root / POTSDAM_SPLIT_FILES[split][0]}: split list is empty")
    samples = []
    for image_id in ids:
        image_path, label_path = root / "imgs" / f"{image_id}.mat", root / "gt" / f"{image_id}.mat"
        if not image_path.is_file():
            raise DataError(f"{image_path}: image listed in the split list not found")
        if not label_path.is_file():
            if split != "unlabelled_train":
                missing_label(image_path, label_path)
            label_path = None  # unlabelled images: label all IGNORE, has_label False
        samples.append({"name": image_id, "format": "mat", "image": image_path, "label": label_path})
    return samples, "mat"


def mastr_holdout(stems, split):
    """MaSTr1325 has no official val split: val = every 5th frame (sorted index % 5 == 4), train = the rest."""
    if split == "all":
        return stems
    if split == "val":
        return [s for i, s in enumerate(stems) if i % 5 == 4]
    return [s for i, s in enumerate(stems) if i % 5 != 4]


def samples_mastr1325(root, split, layout):
    root = Path(root)
    if (root / "imgs").is_dir():  # folder convention
        return samples_folder(root, split, layout, label_stems=lambda stem: [f"{stem}m", stem], required=True)
    image_dirs = sorted(root.glob("MaSTr1325_images*")) + ([root / "images"] if (root / "images").is_dir() else [])
    mask_dirs = sorted(root.glob("MaSTr1325_masks*")) + ([root / "masks"] if (root / "masks").is_dir() else [])
    image_dirs, mask_dirs = [d for d in image_dirs if d.is_dir()], [d for d in mask_dirs if d.is_dir()]
    if not image_dirs or not mask_dirs:
        raise DataError(f"{root}: no MaSTr1325 image/mask folders found; expected layout {layout}")
    # prefer the 512x384 release when both resolutions are unpacked; pair images_X with masks_X
    image_dir = next((d for d in image_dirs if d.name.endswith("512x384")), image_dirs[0])
    suffix = image_dir.name.replace("MaSTr1325_images", "")
    mask_dir = next((d for d in mask_dirs if d.name.replace("MaSTr1325_masks", "") == suffix and d.name != "masks"),
                    None) or mask_dirs[0]
    if (root / f"{split}.txt").is_file():  # an explicit list of stems wins
        stems = [line.strip() for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]
    elif split in ("train", "val", "all"):
        stems = mastr_holdout([p.stem for p in list_images(image_dir, layout)], split)
    else:
        raise DataError(f"{root}: unknown mastr1325 split '{split}'; use train, val, all or add {split}.txt")
    samples = []
    for stem in stems:
        image_path = find_file(image_dir, [stem])
        if image_path is None:
            raise DataError(f"{image_dir / (stem + '.jpg')}: image not found")
        label_path = find_file(mask_dir, [f"{stem}m", stem])
        if label_path is None:
            missing_label(image_path, mask_dir / f"{stem}m.png")
        samples.append({"name": stem, "format": "png", "image": image_path, "label": label_path})
    return samples


def samples_camvid(root, split, layout):
    image_dir = need_dir(Path(root) / split, f"split folder {split}", layout)
    label_dir = need_dir(Path(root) / f"{split}annot", f"label folder {split}annot", layout)
    samples = []
    for image_path in list_images(image_dir, layout):
        label_path = find_file(label_dir, [image_path.stem])
        if label_path is None:
            missing_label(image_path, label_dir / image_path.name)
        samples.append({"name": image_path.stem, "format": "png", "image": image_path, "label": label_path})
    return samples


def samples_folder(root, split, layout, label_stems=lambda stem: [stem], required=False):
    """<root>/imgs/<split>/ and, if present, <root>/labels/<split>/ (prediction only without labels)."""
    image_dir = need_dir(Path(root) / "imgs" / split, f"split folder imgs/{split}", layout)
    label_dir = Path(root) / "labels" / split
    if required:
        need_dir(label_dir, f"label folder labels/{split}", layout)
    labelled = label_dir.is_dir()
    samples = []
    for image_path in list_images(image_dir, layout):
        label_path = find_file(label_dir, label_stems(image_path.stem)) if labelled else None
        if labelled and label_path is None:
            missing_label(image_path, label_dir / f"{label_stems(image_path.stem)[0]}.png")
        samples.append({"name": image_path.stem, "format": "png", "image": image_path, "label": label_path})
    return samples


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def build_dataset(name, root=None, split="train", mode="train", crop_size=224, resize=None, n_classes=None,
                  seed=0, five_crop=False, flip=True, length=None, five_crop_ratio=0.5, class_names=None,
                  synthetic_size=(384, 512)):
    """Build a data set -> SegmentationDataset (torch Dataset) of dicts image/label/has_label/name.

    name: one of DATASETS. root: data folder (ignored for synthetic). split: "train", "val", ... as the
    layout names them (cocostuff: train/val -> train2017/val2017; potsdam .mat: train, unlabelled_train,
    val (= labelled_test), train+val; mastr1325: train/val/all, see `mastr_holdout`).
    mode: "train" (resize + random crop + flip) or "eval" (resize + centre crop).
    crop_size: side of the square output (multiple of 8, the ViT patch). resize: short side after resizing
    (None -> crop_size; 0 -> no resize). n_classes: only for "folder" (required when it has labels).
    length: synthetic: number of scenes (default 64 for train, 16 otherwise); other sets: keep the first
    `length` files. seed: seeds crops/flips and the synthetic scenes. five_crop: STEGO five-crop (5x items).
    synthetic_size: (H, W) at which synthetic scenes are drawn (MaSTr1325's 384x512 by default).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; choose one of {sorted(DATASETS)}")
    if mode not in ("train", "eval"):
        raise DataError(f"mode must be 'train' or 'eval', got '{mode}'")
    if not isinstance(crop_size, int) or crop_size <= 0 or crop_size % 8:
        raise DataError(f"crop_size must be a positive multiple of 8 (ViT patch), got {crop_size}")
    resize = crop_size if resize is None else int(resize)
    if resize and resize < crop_size:
        raise DataError(f"resize {resize} is smaller than crop_size {crop_size}: the crop would not fit")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    if not 0 < five_crop_ratio <= 1:
        raise DataError(f"five_crop_ratio must be in (0, 1], got {five_crop_ratio}")
    info = DATASETS[name]
    layout = info["layout"]
    label_map = info["label_map"]
    if name != "folder" and n_classes is not None and n_classes != info["n_classes"]:
        raise DataError(f"{name} has {info['n_classes']} classes, n_classes={n_classes} was given")

    if name == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise DataError(f"synthetic: unknown split '{split}'; choose one of {sorted(SYNTHETIC_SPLITS)}")
        count = length if length is not None else (64 if split == "train" else 16)
        height, width = synthetic_size
        samples = [{"name": f"synthetic_{split}_{i:05d}", "format": "synthetic", "size": (height, width),
                    "rng_seed": [seed, SYNTHETIC_SPLITS[split], i]} for i in range(count)]
    else:
        if root is None or not Path(root).is_dir():
            raise DataError(f"{root}: data folder of {name} not found; expected layout {layout}")
        if name == "cityscapes":
            samples = samples_cityscapes(root, split, layout)
        elif name == "cocostuff":
            samples = samples_cocostuff(root, split, layout)
        elif name == "potsdam":
            samples, kind = samples_potsdam(root, split, layout)
            label_map = info["label_map_png"] if kind == "png" else info["label_map"]
        elif name == "mastr1325":
            samples = samples_mastr1325(root, split, layout)
        elif name == "camvid":
            samples = samples_camvid(root, split, layout)
        else:  # folder
            samples = samples_folder(root, split, layout)
        if length is not None:
            samples = samples[:length]

    if name == "folder":
        labelled = any(s["label"] is not None for s in samples)
        n_classes = len(class_names) if n_classes is None and class_names else n_classes
        if labelled and n_classes is None:
            raise DataError(f"{Path(root) / 'labels' / split}: folder has labels; pass n_classes")
        if class_names and len(class_names) != n_classes:
            raise DataError(f"{root}: {len(class_names)} class_names for n_classes={n_classes}")
        label_map = folder_label_map(n_classes) if n_classes else {255: IGNORE}
        names = class_names or [f"class {i}" for i in range(n_classes or 0)]
    else:
        n_classes, names = info["n_classes"], class_names or info["class_names"]
    if not samples:
        raise DataError(f"{root}: no samples for split '{split}' (length={length})")
    return SegmentationDataset(samples, name, n_classes, names, label_map, mode, crop_size, resize, seed,
                               five_crop, five_crop_ratio, flip)


def make_loader(dataset, batch_size, shuffle, seed=0, num_workers=0, drop_last=False, pin_memory=None):
    """DataLoader with a seeded generator (same order for the same seed); items collated to tensors."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and batch_size > len(dataset):
        raise DataError(f"batch_size {batch_size} > {len(dataset)} items with drop_last=True: no batch at all")
    generator = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, generator=generator, pin_memory=pin)


def to_device(batch, device):
    """Move every tensor of a (nested) batch to `device` (non_blocking); other values stay as they are."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


# ----------------------------------------------------------------------------------------------
# Ĩ: colour- and luminosity-invariant photometric augmentation (plain torch, any device, batched)
# ----------------------------------------------------------------------------------------------

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's "L" conversion


def grayscale(images):
    """(B, 3, H, W) -> luma (B, 1, H, W)."""
    r, g, b = images.unbind(-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def rgb_to_hsv(images):
    """(..., 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue in [0, 1), as colorsys.rgb_to_hsv)."""
    r, g, b = images.unbind(-3)
    maxc = images.max(dim=-3).values
    minc = images.min(dim=-3).values
    delta = maxc - minc
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
    """images (B, 3, H, W), factor (B,): x * f."""
    return (images * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(images, factor):
    """Blend with the mean luma of each image: f * x + (1 - f) * mean(luma)."""
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(images, factor):
    """Blend with the per-pixel luma: f * x + (1 - f) * luma."""
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * grayscale(images)).clamp(0, 1)


def adjust_hue(images, shift):
    """Rotate the hue of each image by shift (B,) in turns (0.1 = 36 degrees) through HSV."""
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


def photometric_augment(images, generator=None, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                        grayscale_p=0.2, jitter_p=0.8):
    """Ĩ_b of the paper: a colour- and luminosity-invariant copy of a batch I_b (B, 3, H, W) in [0, 1].

    Per image: with probability jitter_p a colour jitter with factors drawn uniformly from
    [1 - brightness, 1 + brightness], [1 - contrast, 1 + contrast], [1 - saturation, 1 + saturation] and a
    hue shift in [-hue, hue] (applied in that fixed order), then with probability grayscale_p the image is
    replaced by its luma on all 3 channels (the STEGO/DINO recipe: ColorJitter p=0.8, RandomGrayscale 0.2).
    Geometry is unchanged, so pixel (i, j) of Ĩ corresponds to pixel (i, j) of I (identity correspondence).
    All random numbers come from `generator` (drawn on its device, then moved), so a seeded generator
    gives the same result on any device. Output is clamped to [0, 1].
    """
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"photometric_augment: expected a float (B, 3, H, W) tensor, got {shape}")
    batch = images.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(low, high):  # (B,) on the images' device
        u = torch.rand(batch, generator=generator, device=gen_device)
        return (low + (high - low) * u).to(images.device, images.dtype)

    # draw every random number first, in a fixed order (reproducible)
    b = uniform(1 - brightness, 1 + brightness)
    c = uniform(1 - contrast, 1 + contrast)
    s = uniform(1 - saturation, 1 + saturation)
    h = uniform(-hue, hue)
    jitter = uniform(0, 1) < jitter_p  # (B,) bool
    gray = uniform(0, 1) < grayscale_p

    out = adjust_brightness(images.clamp(0, 1), b)
    out = adjust_contrast(out, c)
    out = adjust_saturation(out, s)
    if hue > 0:
        out = adjust_hue(out, h)
    out = torch.where(jitter.view(-1, 1, 1, 1), out, images.clamp(0, 1))
    out = torch.where(gray.view(-1, 1, 1, 1), grayscale(out).expand_as(out), out)
    return out.clamp(0, 1)
