"""Writing results: the per-class table, metrics.json, side-by-side pictures, colour masks and overlays.

Nothing of the paper is here: evaluate.py scores, this file shows the scores and the predictions.
Colours: class (or cluster) i is entry i of a fixed PASCAL-VOC-style palette; black is reserved for
void pixels and unmatched clusters.
"""
import datetime
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import checkpoints
import pictures
from layouts import IMAGE_SUFFIXES


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
    """A file-name stem from an item name: path separators replaced, an image suffix dropped (one.png ->
    one), every other dot kept (photo.v1 and photo.v2 are two images: data.output_names)."""
    flat = Path(str(name).replace("/", "_").replace("\\", "_"))
    return flat.stem if flat.suffix.lower() in IMAGE_SUFFIXES else flat.name


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


def save_class_ids(path, pred):
    """pred (H, W) ints -> a single-channel PNG of the class (cluster) ids, uint8 when every id fits (K <=
    256), else uint16; a program reads it back with np.asarray(Image.open(path))."""
    ids = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64)
    dtype = np.uint8 if ids.max(initial=0) <= 255 else np.uint16
    pictures.save_png(path, ids.astype(dtype))  # atomic, as every file written
    return Path(path)


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
    pictures.save_png(mask_path, mask)
    ids = np.unique(np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred))
    ids = ids[(ids >= 0) & (ids < 255)]
    entries = pictures.legend_entries([f"{what} {i}" for i in ids], colourise(ids[None])[0])
    panels = [(image_to_uint8(image), "image"), (blended.round().astype(np.uint8), caption)]
    pictures.save_png(overlay_path, pictures.grid(panels, entries=entries))
    return mask_path, overlay_path


NO_PIXELS, CRF_OFF = "n/a", "off"  # one meaning per symbol in the tables


def percent(value):
    """A fraction in percent; NO_PIXELS where it is undefined (nan: no labelled pixel)."""
    return NO_PIXELS if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def aligned(rows, left=1):
    """Rows of cells (strings) as lines, every column as wide as its widest cell; the first `left`
    columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


PROBES = {"kmeans": "cosine k-means on the codes, Hungarian-matched to the classes",
          "centres": "argmax over the trained global centres, Hungarian-matched to the classes"}


def probe_lines(probes):
    """One line per probe of `probes` (names) saying what it is."""
    return [f"{name}: {PROBES[name]}" for name in PROBES if name in probes]


def table_notes(probes, eval_alpha=0.0):
    """The lines under a result table: units, symbols, what each probe is and whether eq (13) was fused in."""
    lines = [f"IoU per class, pixel accuracy (Acc) and mIoU, in %; {NO_PIXELS}: no labelled pixel; "
             f"{CRF_OFF}: CRF not run (--no-crf); +CRF: after the dense CRF"]
    lines += probe_lines(probes)
    lines.append(f"--eval-alpha {eval_alpha}: " + ("F^l fused into the prediction, eq (13)" if eval_alpha > 0
                                                   else "no low-level cue in the prediction"))
    return lines


def format_table(result, class_names=None):
    """Per-class IoU, Acc and mIoU in percent, one column per probe before and after the CRF (CRF_OFF
    cells when the CRF was off). result: evaluate.evaluate's dict (its "probes")."""
    probes = result["probes"]
    columns = []  # (header, scores or None)
    for name, entry in probes.items():
        columns += [(name, entry["before_crf"]), (f"{name}+CRF", entry["after_crf"])]
    n_classes = len(next(iter(probes.values()))["before_crf"]["iou"])
    class_names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n_classes)]
    cell = lambda s, pick: CRF_OFF if s is None else percent(pick(s))
    body = [[class_names[c]] + [cell(s, lambda s: s["iou"][c]) for _, s in columns] for c in range(n_classes)]
    body += [["Acc"] + [cell(s, lambda s: s["acc"]) for _, s in columns],
             ["mIoU"] + [cell(s, lambda s: s["miou"]) for _, s in columns]]
    used = [["clusters"] + sum([[str(entry.get("clusters_used", NO_PIXELS)), ""] for entry in probes.values()], [])]
    lines = aligned([["class"] + [h for h, _ in columns]] + body + used)
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule] + lines[1:1 + n_classes] + [rule] + lines[1 + n_classes:])


def format_ablation(title, rows, header_lines=()):
    """The table of an ablation: one row per setting, Acc / mIoU of every probe before and after the CRF,
    columns aligned. rows: [(setting name, evaluate.evaluate's "probes")]; header_lines: what made it."""
    probes = list(rows[0][1])
    table = [["setting"] + [p + stage for p in probes for stage in ("", "+CRF")]]
    for name, entries in rows:
        cells = [entries[p][stage] for p in probes for stage in ("before_crf", "after_crf")]
        table.append([name] + [CRF_OFF if c is None else f"{percent(c.get('acc'))} / {percent(c.get('miou'))}"
                               for c in cells])
    notes = [f"Acc / mIoU in %; {NO_PIXELS}: no labelled pixel; {CRF_OFF}: CRF not run"]
    notes += probe_lines(probes)
    return "\n".join([title, *header_lines, *notes, *aligned(table)])


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


RANDOM_WARNING = ("WARNING: the backbone has random weights (--weights random): a smoke test, these scores "
                  "say nothing about IL2Vseg")


def code_version():
    """`git describe --always --dirty` of the code's folder, or "unknown" (no git, not a clone)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def weights_entry(weights, arch=None):
    """"random", or {"file", "sha256" (its first 16 hex digits)} of a weights file, or torch.hub's file."""
    if weights == "random":
        return "random"
    if weights is None:
        return f"torch.hub: the published {arch} file" if arch else "torch.hub"
    digest = hashlib.sha256()
    try:
        with open(weights, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return {"file": str(weights), "sha256": "unreadable"}
    return {"file": str(weights), "sha256": digest.hexdigest()[:16]}


def provenance(cfg, step=None, **extra):
    """What made an output: weights, arch, data set and root, the checkpoint and its step, the date, the
    code version and every setting of the run (plain values of cfg); a warning for random weights."""
    settings = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None), list,
                                                                     tuple, dict))}
    made = {"weights": weights_entry(getattr(cfg, "weights", None), getattr(cfg, "arch", None)),
            "arch": getattr(cfg, "arch", None), "data": getattr(cfg, "data", None),
            "data_root": getattr(cfg, "data_root", None),
            "checkpoint": str(getattr(cfg, "checkpoint", None) or Path(getattr(cfg, "out", None) or ".") / "checkpoint.pt"),
            "step": step, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(), **extra, "settings": settings}
    if made["weights"] == "random":
        made = {"warning": RANDOM_WARNING, **made}
    return made


def provenance_lines(made):
    """A provenance dict as a few '# ' header lines for a text table."""
    weights = made["weights"]
    weights = weights if isinstance(weights, str) else f"{weights['file']} (sha256 {weights['sha256']})"
    lines = [f"# weights {weights}, arch {made['arch']}, data {made['data']} ({made['data_root'] or 'built in'})",
             f"# {made['date']}, code {made['code_version']}; every setting: metrics.json of each row"]
    return ([f"# {made['warning']}"] if "warning" in made else []) + lines


def write_provenance(out_dir, made):
    """OUT_DIR/provenance.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_text_atomic(out_dir / "provenance.json", json.dumps(json_ready(made), indent=2) + "\n")
    return out_dir / "provenance.json"


def format_duration(seconds):
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Ticker:
    """Progress of one stage: `tick(n)` after every n items done prints "STAGE: done/total UNIT, rate,
    ETA" when `every` seconds passed since the last line (time-based, however slow an item is), and a
    last line at the end if it printed any."""

    def __init__(self, stage, total, log=print, unit="images", every=10.0, clock=time.monotonic):
        self.stage, self.total, self.log, self.unit, self.every, self.clock = stage, total, log, unit, every, clock
        self.started = self.last = clock()
        self.done, self.printed = 0, False

    def tick(self, n=1):
        self.done += n
        now = self.clock()
        if now - self.last >= self.every or (self.printed and self.done >= self.total):
            elapsed = max(now - self.started, 1e-9)
            eta = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
            self.log(f"{self.stage}: {self.done}/{self.total} {self.unit}, {format_duration(elapsed)} so far, "
                     + ("done" if self.done >= self.total else f"ETA {format_duration(eta)}"))
            self.last, self.printed = now, True


def write_metrics(out_dir, result, settings, made=None):
    """OUT_DIR/metrics.json: every probe's scores and raw confusion matrices, the evaluation settings and
    what made them (provenance, with its warning first for random weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {key: value for key, value in result.items() if key != "kept"}
    if made is not None:
        metrics = {**({"warning": made["warning"]} if "warning" in made else {}), "provenance": made, **metrics}
    metrics["settings"] = settings
    checkpoints.write_text_atomic(out_dir / "metrics.json", json.dumps(json_ready(metrics), indent=2))  # whole or not
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
