"""The data sets on disk: which classes each has, how its files are laid out and read, and drawn scenes.

data.py builds the items the model sees (the paper's Ĩ, resizing, crops, the pre-flight check) on top of
this file; this file never imports data.py. Read it when you bring a data set or debug a layout.

Contents, in order
1. The registry `DATASETS`: class names and the raw-label table of every set (the peers' mappings).
2. Readers: an image file -> RGB array, a label file -> raw ids, a .mat file -> arrays, and a cheap
   `probe_image` for the pre-flight check. Every problem becomes ONE DataError line naming the file.
3. Synthetic maritime scenes (MaSTr1325-like) drawn by the code with exact labels, so the whole
   pipeline runs and scores out of the box without any download.
4. Listing the files of each layout -> samples {"name", "format": "png"|"mat"|"synthetic", "image",
   "label" (None: no label)}; data.list_samples picks the lister of a set.

Label mappings: raw value in the file -> class id, written beside each set in `DATASETS` (the peers'
tables); a raw value a table does not list is a DataError naming the file and the value.
"""

import warnings
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageOps

from checkpoints import one_line

IGNORE = -1  # label value of void pixels everywhere in the project
INVALID = -2  # internal marker in label tables: a raw value that must not occur (-> DataError)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class DataError(ValueError):
    """Bad data or bad data arguments; the message is one line naming the file or folder."""


# ----------------------------------------------------------------------------------------------
# 1. Registry: classes and raw-label mappings of every data set
# ----------------------------------------------------------------------------------------------

# Cityscapes labelIds 7..33 in order (the 27 classes of STEGO / SmooSeg "cityscapes").
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]

# COCO-Stuff-27: coarse class -> fine stuffthingmap ids (things 0..90, stuff 91..181).
COCO_COARSE_GROUPS = [
    # things: ids 0..90
    ("electronic", [*range(71, 77)]), ("appliance", [*range(77, 83)]), ("food-things", [*range(51, 61)]),
    ("furniture-things", [*range(61, 71)]), ("indoor", [*range(83, 91)]), ("kitchen", [*range(43, 51)]),
    ("accessory", [*range(25, 33)]), ("animal", [*range(15, 25)]), ("outdoor", [*range(9, 15)]),
    ("person", [0]), ("sports", [*range(33, 43)]), ("vehicle", [*range(1, 9)]),
    # stuff: ids 91..181
    ("ceiling", [101, 102]), ("floor", [100, *range(113, 118)]), ("food-stuff", [120, 121, 152, 169]),
    ("furniture-stuff", [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164]),
    ("raw-material", [99, 131, 138, 142]),
    ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]),
    ("wall", [*range(170, 177)]), ("window", [179, 180]), ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]), ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]), ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
]

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                  "pedestrian", "bicyclist"]

DATASETS = {
    # gtFine labelIds 7..33 -> 0..26, 0..6 (unlabeled, ego vehicle, ..., ground) -> void: "labelId - 7"
    "cityscapes": {"n_classes": 27, "class_names": CITYSCAPES_CLASSES,
                   "label_map": {**{i: IGNORE for i in range(7)}, **{i: i - 7 for i in range(7, 34)}},
                   "layout": "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                             "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"},
    # stuffthingmaps fine ids 0..181 -> the 27 coarse classes of COCO_COARSE_GROUPS, 255 -> void
    "cocostuff": {"n_classes": 27, "class_names": [name for name, _ in COCO_COARSE_GROUPS],
                  "label_map": {**{fine: coarse for coarse, (_, fines) in enumerate(COCO_COARSE_GROUPS)
                                   for fine in fines}, 255: IGNORE},
                  "layout": "<root>/images/<split>2017/<id>.jpg, <root>/annotations/<split>2017/<id>.png "
                            "(stuffthingmaps) and <root>/curated/<split>2017/Coco164kFull_Stuff_Coarse[_7].txt"},
    # STEGO .mat release (6 fine ids): {0, 4} roads+cars, {1, 5} buildings+clutter, {2, 3} vegetation+trees;
    # ISPRS PNG tiles (0 boundary, 1 impervious, 2 building, 3 low vegetation, 4 tree, 5 car, 6 clutter)
    "potsdam": {"n_classes": 3, "class_names": ["roads and cars", "buildings and clutter", "vegetation and trees"],
                "label_map": {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: IGNORE},  # .mat release
                "label_map_png": {1: 0, 5: 0, 2: 1, 6: 1, 3: 2, 4: 2, 0: IGNORE, 255: IGNORE},  # PNG tiles
                "layout": "<root>/imgs/<id>.mat (key img), <root>/gt/<id>.mat (key gt) and <root>/labelled_train.txt, "
                          "unlabelled_train.txt, labelled_test.txt; or <root>/img_dir/[<split>/]*.png and "
                          "<root>/ann_dir/[<split>/]*.png"},
    # 0 obstacle, 1 water, 2 sky, 4 unknown -> void
    "mastr1325": {"n_classes": 3, "class_names": ["obstacle", "water", "sky"],
                  "label_map": {0: 0, 1: 1, 2: 2, 4: IGNORE},
                  "layout": "<root>/MaSTr1325_images_512x384/<id>.jpg and <root>/MaSTr1325_masks_512x384/<id>m.png "
                            "(or images/ + masks/), or <root>/{imgs,labels}/<split>/"},
    # SegNet's 11 classes as they are, 11 (Unlabelled) -> void
    "camvid": {"n_classes": 11, "class_names": CAMVID_CLASSES,
               "label_map": {**{i: i for i in range(11)}, 11: IGNORE},
               "layout": "<root>/<split>/*.png and <root>/<split>annot/*.png (SegNet layout)"},
    # your own data: n_classes (and class names) from the user; ids 0..n_classes-1 as they are, 255 -> void
    "folder": {"n_classes": None, "class_names": None, "label_map": None,
               "layout": "<root>/imgs/<split>/*.{png,jpg} and optionally <root>/labels/<split>/<same stem>.png"},
    # drawn scenes carry class ids already
    "synthetic": {"n_classes": 3, "class_names": ["obstacle", "water", "sky"], "label_map": None,
                  "layout": "none: scenes are drawn by the code (root is ignored)"},
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
# 2. Reading files: every problem becomes one DataError line naming the file
# ----------------------------------------------------------------------------------------------

def file_error(path, error, what="image"):
    """The one-line DataError for a file that could not be opened or decoded."""
    if Path(path).is_symlink() and not Path(path).exists():
        return DataError(f"{path}: dangling symbolic link (its target {Path(path).readlink()} does not exist)")
    if isinstance(error, FileNotFoundError):
        return DataError(f"{path}: file not found")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return DataError(f"{path}: empty file (0 bytes)")
    return DataError(f"{path}: corrupt, truncated or unreadable {what} ({one_line(error)})")


EXIF_ORIENTATION = 0x0112  # 5-8 turn the picture by 90 degrees: the displayed size is W x H swapped


def exif_orientation(image):
    """The EXIF orientation (1-8, 1 upright) of an opened image, read from its header (no pixel decoding)."""
    raw = image.info.get("exif") if image.format == "PNG" else None  # PNG: getexif() would decode the pixels
    if image.format == "PNG" and not raw:
        return 1
    exif = Image.Exif() if raw else image.getexif()
    if raw:
        exif.load(raw)
    return exif.get(EXIF_ORIENTATION, 1)


def open_image_file(path):
    """Open and fully decode an image file with PIL (so truncation is found here), turned upright as
    its EXIF orientation says (a phone's portrait photo is stored sideways): every reader of the project
    sees the picture as it is displayed, labels too."""
    try:
        image = Image.open(path)
        image.load()
        if exif_orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        return image
    except Exception as error:  # missing, UnidentifiedImageError, truncated data, bad chunks, ...
        raise file_error(path, error) from None


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
    notes = {"L": "grayscale images converted to RGB by repeating the channel",
             "1": "1-bit images converted to RGB",
             "LA": "grayscale+alpha images converted to RGB (alpha dropped)",
             "RGBA": "RGBA images converted to RGB (alpha dropped)",
             "RGBa": "RGBA images converted to RGB (alpha dropped)",
             "P": "palette images converted to RGB through their palette",
             "PA": "palette images converted to RGB through their palette"}  # others: "<mode> images converted"
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
    except Exception as error:
        raise file_error(path, error, ".mat file") from None
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


READERS = {"png": (read_rgb, read_label_png), "mat": (read_rgb_mat, read_label_mat)}  # format -> readers


def probe_image(path):
    """Check cheaply that an image file decodes -> (height, width); a problem -> DataError.

    PNG: `verify()` reads every chunk and checks its CRC up to IEND (finds truncated and corrupt files
    without decompressing). JPEG: decoded in draft mode at 1/8 scale (the whole stream is read, so a
    truncated file fails). Other formats, and modes the loader must range-check (I, I;16, F), are
    decoded in full by `read_rgb`, as the loader will. .mat files are loaded by `read_rgb_mat`.
    """
    if Path(path).suffix.lower() == ".mat":
        return read_rgb_mat(path)[0].shape[:2]
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in (5, 6, 7, 8):  # displayed turned: as open_image_file
                width, height = height, width
            cheap = image.format in ("PNG", "JPEG") and image.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK")
            if cheap and image.format == "PNG":
                image.verify()
            elif cheap:
                image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                image.load()
    except Exception as error:
        raise file_error(path, error) from None
    return (height, width) if cheap else read_rgb(path)[0].shape[:2]


def check_label_size(label_shape, image_shape, label_path, image_path):
    """A label map must have the (H, W) of its image; otherwise one DataError line naming both."""
    if tuple(label_shape) != tuple(image_shape):
        raise DataError(f"{label_path}: label is {label_shape[1]}x{label_shape[0]} (WxH) but its image "
                        f"{Path(image_path).name} is {image_shape[1]}x{image_shape[0]}")


# ----------------------------------------------------------------------------------------------
# 3. Synthetic maritime scenes (MaSTr1325-like): sky gradient, wavy horizon, textured sea, obstacles
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
# 4. Listing the files of each layout
# ----------------------------------------------------------------------------------------------

def need_dir(folder, what, layout):
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: {what} not found; expected layout {layout}")
    return Path(folder)


def list_images(folder, layout, pattern="*"):
    """Sorted image files (known suffixes, any case) in `folder` matching `pattern`; none -> DataError.
    A dangling symbolic link is listed too (not dropped): the pre-flight check names it."""
    files = sorted(p for p in Path(folder).glob(pattern)
                   if (p.is_file() or (p.is_symlink() and not p.exists())) and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images found (looked for {pattern} with suffix {'/'.join(IMAGE_SUFFIXES)}); "
                        f"expected layout {layout}")
    return files


def files_by_stem(folder):
    """{stem: [image files of `folder` with that stem]}, each list in IMAGE_SUFFIXES order (.png first),
    suffixes in any case (x.PNG, x.Jpg); dangling symbolic links included (the pre-flight check names them)."""
    found = {}
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or (path.is_symlink() and not path.exists())):
                found.setdefault(path.stem, []).append(path)
    return {stem: sorted(paths, key=lambda p: (IMAGE_SUFFIXES.index(p.suffix.lower()), p.name))
            for stem, paths in found.items()}


def find_file(folder, stems, index=None):
    """First file folder/<stem><suffix> (.png first, then other image suffixes, in any case); None if none.
    index: files_by_stem(folder), when the caller looks up many stems."""
    index = files_by_stem(folder) if index is None else index
    for stem in stems:
        if stem in index:
            return index[stem][0]
    return None


def read_list(path):
    """The non-empty lines of a split list (ids or stems); an empty list -> DataError."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: split list is empty")
    return lines


def pair_by_stem(image_paths, label_dir, label_stems=lambda stem: [stem], labelled=True):
    """Samples pairing each image with label_dir/<first of label_stems(stem) found>; a miss -> DataError.
    Two images with one stem (x.png and x.jpg) are refused: they would share a label and every output name."""
    image_paths = list(image_paths)
    check_unique_stems(image_paths)
    labels = files_by_stem(label_dir) if labelled else {}
    samples = []
    for image_path in image_paths:
        label_path = find_file(label_dir, label_stems(image_path.stem), labels) if labelled else None
        if labelled and label_path is None:
            expected = Path(label_dir) / f"{label_stems(image_path.stem)[0]}.png"
            raise DataError(f"{image_path}: image has no label (expected {expected})")
        samples.append({"name": image_path.stem, "format": "png", "image": image_path, "label": label_path})
    return samples


def check_unique_stems(paths):
    """One line naming two files of a split whose names differ only in suffix or case (x.png, x.JPG)."""
    seen = {}
    for path in paths:
        other = seen.setdefault(Path(path).stem.lower(), path)
        if other != path:
            raise DataError(f"{path} and {Path(other).name} share the name {Path(path).stem}: they would share "
                            f"their label and their output files; keep one of them in {Path(path).parent}")


def samples_cityscapes(root, split, layout):
    image_dir = need_dir(Path(root) / "leftImg8bit" / split, f"split folder leftImg8bit/{split}", layout)
    label_dir = need_dir(Path(root) / "gtFine" / split, f"split folder gtFine/{split}", layout)
    samples = []
    for image_path in list_images(image_dir, layout, "*/*_leftImg8bit.png"):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        label_path = label_dir / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label_path.is_file():
            raise DataError(f"{image_path}: image has no label (expected {label_path})")
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
        image_paths, index = [], files_by_stem(image_dir)
        for image_id in read_list(list_path):
            path = find_file(image_dir, [image_id], index)  # <id>.jpg / <id>.png / ...
            if path is None:
                raise DataError(f"{image_dir / (image_id + '.jpg')}: image listed in {list_path.name} not found")
            image_paths.append(path)
    else:
        warnings.warn(f"cocostuff: no curated list {list_path}; using every image of {image_dir} "
                      f"(the published COCO-Stuff-27 numbers use the curated lists)", stacklevel=4)
        image_paths = list_images(image_dir, layout)
    return pair_by_stem(image_paths, label_dir)


POTSDAM_SPLIT_FILES = {"train": ["labelled_train.txt"], "unlabelled_train": ["unlabelled_train.txt"],
                       "val": ["labelled_test.txt"], "test": ["labelled_test.txt"],
                       "train+val": ["labelled_train.txt", "labelled_test.txt"], "all": ["all.txt"]}


def samples_potsdam(root, split, layout):
    """.mat release when <root>/imgs exists, ISPRS PNG tiles when <root>/img_dir exists -> (samples, kind)."""
    root = Path(root)
    if (root / "img_dir").is_dir():
        image_dir = root / "img_dir" / split if (root / "img_dir" / split).is_dir() else root / "img_dir"
        label_dir = root / "ann_dir" / split if (root / "ann_dir" / split).is_dir() else root / "ann_dir"
        if image_dir == root / "img_dir":
            warnings.warn(f"potsdam: no {root / 'img_dir' / split}; every tile of {image_dir} is used for "
                          f"split '{split}'", stacklevel=4)
        need_dir(label_dir, "label folder ann_dir", layout)
        return pair_by_stem(list_images(image_dir, layout), label_dir), "png"
    need_dir(root / "imgs", "image folder imgs", layout)
    if split not in POTSDAM_SPLIT_FILES:
        raise DataError(f"{root}: unknown potsdam split '{split}'; choose one of {sorted(POTSDAM_SPLIT_FILES)}")
    samples = []
    for list_name in POTSDAM_SPLIT_FILES[split]:
        if not (root / list_name).is_file():
            raise DataError(f"{root / list_name}: split list not found; expected layout {layout}")
        for image_id in read_list(root / list_name):
            image_path, label_path = root / "imgs" / f"{image_id}.mat", root / "gt" / f"{image_id}.mat"
            if not image_path.is_file():
                raise DataError(f"{image_path}: image listed in {list_name} not found")
            if not label_path.is_file():
                if split != "unlabelled_train":
                    raise DataError(f"{image_path}: image has no label (expected {label_path})")
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
    if (root / "imgs").is_dir():  # folder convention, masks named <stem>m.png or <stem>.png
        return samples_folder(root, split, layout, label_stems=lambda stem: [f"{stem}m", stem], required=True)
    image_dirs = sorted(root.glob("MaSTr1325_images*")) + [root / "images"]
    mask_dirs = sorted(root.glob("MaSTr1325_masks*")) + [root / "masks"]
    image_dirs, mask_dirs = [d for d in image_dirs if d.is_dir()], [d for d in mask_dirs if d.is_dir()]
    if not image_dirs or not mask_dirs:
        raise DataError(f"{root}: no MaSTr1325 image/mask folders found; expected layout {layout}")
    # prefer the 512x384 release when both resolutions are unpacked; pair images_X with masks_X
    image_dir = next((d for d in image_dirs if d.name.endswith("512x384")), image_dirs[0])
    suffix = image_dir.name.replace("MaSTr1325_images", "")
    mask_dir = next((d for d in mask_dirs if d.name.replace("MaSTr1325_masks", "") == suffix and d.name != "masks"),
                    None) or mask_dirs[0]
    if (root / f"{split}.txt").is_file():  # an explicit list of stems wins
        stems = read_list(root / f"{split}.txt")
    elif split in ("train", "val", "all"):
        stems = mastr_holdout([p.stem for p in list_images(image_dir, layout)], split)
    else:
        raise DataError(f"{root}: unknown mastr1325 split '{split}'; use train, val, all or add {split}.txt")
    index = files_by_stem(image_dir)
    image_paths = [find_file(image_dir, [stem], index) for stem in stems]
    for stem, path in zip(stems, image_paths):
        if path is None:
            raise DataError(f"{image_dir / (stem + '.jpg')}: image not found")
    return pair_by_stem(image_paths, mask_dir, lambda stem: [f"{stem}m", stem])


def samples_camvid(root, split, layout):
    image_dir = need_dir(Path(root) / split, f"split folder {split}", layout)
    label_dir = need_dir(Path(root) / f"{split}annot", f"label folder {split}annot", layout)
    return pair_by_stem(list_images(image_dir, layout), label_dir)


def samples_folder(root, split, layout, label_stems=lambda stem: [stem], required=False):
    """<root>/imgs/<split>/ and, if present, <root>/labels/<split>/ (prediction only without labels)."""
    image_dir = need_dir(Path(root) / "imgs" / split, f"split folder imgs/{split}", layout)
    label_dir = Path(root) / "labels" / split
    if required:
        need_dir(label_dir, f"label folder labels/{split}", layout)
    return pair_by_stem(list_images(image_dir, layout), label_dir, label_stems, labelled=label_dir.is_dir())

