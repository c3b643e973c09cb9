"""Writing results: the per-class table, metrics.json, side-by-side pictures, colour masks and overlays.

Nothing of the paper is here: evaluate.py scores, this file shows the scores and the predictions.
Colours: class (or cluster) i is entry i of a fixed PASCAL-VOC-style palette; black is reserved for
void pixels and unmatched clusters.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pictures


def palette(n):
    """Fixed colour palette uint8 (n, 3): colour of class i = entry i + 1 of the PASCAL VOC colour map
    (bit-interleaved, deterministic, all distinct, none black). n <= 255."""
    if not 0 <= n <= 255:
        raise ValueError(f"palette: supports 0..255 colours, got {n}")
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        code, r, g, b = i + 1, 0, 0, 0
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        colours[i] = (r, g, b)
    return colours


def colourise(label_map):
    """label_map (H, W) ints (tensor or array) -> uint8 (H, W, 3) in `palette` colours; negative ids (void,
    unmatched clusters) and ids >= 255 are black."""
    label_map = np.asarray(label_map.cpu() if isinstance(label_map, torch.Tensor) else label_map).astype(np.int64)
    colours = np.concatenate([np.zeros((1, 3), np.uint8), palette(255)])  # (256, 3), row 0 = black
    return colours[np.where((label_map >= 0) & (label_map < 255), label_map + 1, 0)]  # (H, W, 3)


def image_to_uint8(image):
    """(3, H, W) float in [0, 1] -> uint8 (H, W, 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def safe_stem(name):
    """A file-name stem from an item name (path separators replaced)."""
    return Path(str(name).replace("/", "_").replace("\\", "_")).stem


def save_side_by_side(path, image, label, preds, captions=None, class_names=None):
    """PNG of image | ground truth | each prediction in `preds` (class ids (H, W), -1 black), a caption over
    each panel (`captions` for the predictions) and a legend of the class colours (pictures.grid)."""
    n_classes = len(class_names) if class_names is not None else int(max([label.max()] + [p.max() for p in preds])) + 1
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n_classes)]
    captions = list(captions) if captions is not None else [f"prediction {i + 1}" for i in range(len(preds))]
    panels = [(image_to_uint8(image), "image"), (colourise(label), "ground truth")]
    panels += [(colourise(p), caption) for p, caption in zip(preds, captions)]
    entries = pictures.legend_entries(names, palette(n_classes), void="void / unmatched")
    return pictures.save_png(path, pictures.grid(panels, entries=entries))


def save_mask_and_overlay(out_dir, name, image, pred, opacity=0.5, caption="prediction", what="cluster"):
    """OUT_DIR/NAME_mask.png (colours of pred (H, W)) and OUT_DIR/NAME_overlay.png: captioned panels of the
    image and the image blended with the mask (-1 pixels show the plain image), a legend of the ids
    present (named `what` N). image (3, H, W) in [0, 1]. Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_stem(name)
    mask = colourise(pred)  # (H, W, 3)
    picture = image_to_uint8(image).astype(np.float32)  # (H, W, 3)
    labelled = (np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred) >= 0)[..., None]
    blended = np.where(labelled, (1 - opacity) * picture + opacity * mask, picture)
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    Image.fromarray(mask).save(mask_path)
    ids = np.unique(np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred))
    ids = ids[(ids >= 0) & (ids < 255)]
    entries = pictures.legend_entries([f"{what} {i}" for i in ids], colourise(ids[None])[0])
    panels = [(image_to_uint8(image), "image"), (blended.round().astype(np.uint8), caption)]
    pictures.save_png(overlay_path, pictures.grid(panels, entries=entries))
    return mask_path, overlay_path


def percent(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def format_table(result, class_names=None):
    """Per-class IoU, Acc and mIoU in percent, one column per probe before and after the CRF (a '-'
    column when the CRF was off). result: evaluate.evaluate's dict (its "probes")."""
    probes = result["probes"]
    columns = []  # (header, scores or None)
    for name, entry in probes.items():
        columns += [(name, entry["before_crf"]), (f"{name}+CRF", entry["after_crf"])]
    n_classes = len(next(iter(probes.values()))["before_crf"]["iou"])
    class_names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n_classes)]
    width = max([len(name) for name in class_names] + [5])
    widths = [max(len(header), 6) for header, _ in columns]
    header = f"{'class':<{width}}" + "".join(f"  {h:>{w}}" for (h, _), w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    rows = [(class_names[c], [None if s is None else s["iou"][c] for _, s in columns]) for c in range(n_classes)]
    rows += [("Acc", [None if s is None else s["acc"] for _, s in columns]),
             ("mIoU", [None if s is None else s["miou"] for _, s in columns])]
    for index, (name, values) in enumerate(rows):
        if index == n_classes:
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}" + "".join(f"  {percent(v):>{w}}" for v, w in zip(values, widths)))
    used = [str(entry["clusters_used"]) if "clusters_used" in entry else "-" for entry in probes.values()]
    lines.append(f"{'clusters':<{width}}" + "".join(f"  {u:>{w}}  {'':>{w2}}" for u, w, w2 in
                                                   zip(used, widths[::2], widths[1::2])))
    return "\n".join(lines)


def format_ablation(title, rows):
    """The table of an ablation: one row per setting, Acc / mIoU of every probe before and after the CRF.
    rows: [(setting name, evaluate.evaluate's "probes")]."""
    probes = list(rows[0][1])
    lines = [title + " (Acc / mIoU in %; '-' = CRF off)",
             f"{'setting':<28}" + "".join(f" {p + ' ' + s:>20}" for p in probes for s in ("", "+CRF"))]
    for name, entries in rows:
        cells = [(entries[p][stage] or {}) for p in probes for stage in ("before_crf", "after_crf")]
        lines.append(f"{name:<28}" + "".join(f" {percent(c.get('acc')) + ' / ' + percent(c.get('miou')):>20}"
                                             for c in cells))
    return "\n".join(lines)


def format_spread(summary, n_seeds):
    """One line: mean +- std of Acc and mIoU over k-means seeds, before and after the CRF."""
    parts = []
    for stage, label in (("before_crf", ""), ("after_crf", " +CRF")):
        if summary.get(stage):
            for key in ("acc", "miou"):
                mean, std = summary[stage][key]
                parts.append(f"{'Acc' if key == 'acc' else 'mIoU'}{label} {100 * mean:.1f} +- {100 * std:.1f}")
    return f"k-means over {n_seeds} seeds: " + ", ".join(parts)


def json_ready(value):
    """nan -> None (valid JSON), numpy / tuples -> plain lists, tensors dropped to lists, recursively."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return json_ready(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_metrics(out_dir, result, settings):
    """OUT_DIR/metrics.json: every probe's scores and raw confusion matrices plus the settings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {key: value for key, value in result.items() if key != "kept"}
    metrics["settings"] = settings
    with open(out_dir / "metrics.json", "w") as file:
        json.dump(json_ready(metrics), file, indent=2)
    return out_dir / "metrics.json"


def save_pictures(out_dir, result, class_names=None):
    """OUT_DIR/side_by_side/NAME.png for every kept image: image | ground truth | each probe before and
    after the CRF, the predictions coloured through each probe's split-wide matching, captioned."""
    paths = []
    for name, image, label, outputs in result["kept"]:
        preds, captions = [], []
        for probe, (pred, pred_crf) in outputs.items():
            entry = result["probes"][probe]
            preds.append(torch.tensor(entry["before_crf"]["matching"])[pred])
            captions.append(f"{probe} probe")
            if pred_crf is not None:
                preds.append(torch.tensor(entry["after_crf"]["matching"])[pred_crf])
                captions.append(f"{probe} probe + CRF")
        path = Path(out_dir) / "side_by_side" / f"{safe_stem(name)}.png"
        save_side_by_side(path, image, label, preds, captions, class_names)
        paths.append(path)
    return paths
