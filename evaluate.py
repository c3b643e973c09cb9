"""Unsupervised evaluation protocol of IL2Vseg (paper, "Evaluation Metrics"; Figure 5's fusion weight α).

The paper evaluates like STEGO / SmooSeg / HP / EAGLE:

1. codes of every image of the split -> cosine (spherical) mini-batch k-means with K = number of classes
   (`kmeans_cosine`);
2. per pixel: log_softmax(2 * cos(code upsampled to label size, centre)) (`cluster_log_probs`),
   optionally fused with the low-level visual cue, eq (13), and flip test-time augmentation (`flip_tta`);
3. confusion matrix over the labelled pixels (`confusion_matrix`), Hungarian matching of clusters to classes
   over the WHOLE split (`hungarian_match`), pixel accuracy, per-class IoU and mIoU (`scores`);
4. the same after the dense CRF (`crf.dense_crf`, imported lazily so this file imports without crf.py).

Conventions (see also the docstrings):
- confusion matrices are (n_classes, n_pred): ROWS = ground-truth class, COLUMNS = predicted cluster;
- `scores` returns fractions in [0, 1] (acc, miou, iou); `format_table` prints them as percentages;
- mIoU follows the peers (STEGO's `iou[~isnan(iou)].mean()`): the mean over the classes whose union
  (ground truth + matched prediction) is non-empty; a class with neither gets IoU nan and is left out.

`python evaluate.py CHECKPOINT ...` is a thin wrapper: it forwards to
`il2vseg.main(["--eval", "--checkpoint", CHECKPOINT, ...])` (il2vseg.py owns the model and the data).
This module never imports il2vseg.py at import time (il2vseg.py imports this module).
Dependencies: torch, numpy, scipy, pillow.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

IGNORE = -1  # void label id (same value as data.IGNORE; repeated here so this file stands alone)


# ----------------------------------------------------------------------------------------------------
# Cosine (spherical) mini-batch k-means
# ----------------------------------------------------------------------------------------------------

def _kmeans_plus_plus(x, k, generator, n_trials=None):
    """Greedy k-means++ seeding on unit vectors x (M, D). For unit vectors ||a - b||^2 = 2 (1 - cos), so drawing
    the next centre with probability proportional to the cosine distance to the nearest centre chosen so far
    IS k-means++ (Arthur & Vassilvitskii 2007). Greedy variant (as scikit-learn): draw `n_trials`
    (default 2 + int(ln k)) candidates per step and keep the one that lowers the summed distance most.
    Runs on x's device without host syncs. Returns (k, D)."""
    m = x.shape[0]
    n_trials = n_trials or 2 + int(math.log(k))
    first = torch.randint(m, (1,), device=x.device, generator=generator)  # (1,)
    centres = [x[first]]  # list of (1, D)
    nearest_distance = (1.0 - x @ centres[0].T).squeeze(1).clamp_min(0.0)  # (M,)
    for _ in range(k - 1):
        # The tiny floor keeps the distribution valid when fewer than k distinct points exist.
        weights = nearest_distance + 1e-12  # (M,)
        candidates = torch.multinomial(weights, n_trials, replacement=True, generator=generator)  # (T,)
        distance = (1.0 - x @ x[candidates].T).clamp_min(0.0)  # (M, T)
        new_nearest = torch.minimum(nearest_distance[:, None], distance)  # (M, T)
        best = new_nearest.sum(dim=0).argmin()  # () index of the best candidate
        centres.append(x[candidates[best]][None])  # (1, D)
        nearest_distance = new_nearest[:, best]  # (M,)
    return torch.cat(centres, dim=0)  # (k, D)


def _assign(x, centres, chunk_size):
    """Nearest centre by cosine for unit vectors x (N, D), in chunks: -> (assignments (N,), best cos (N,))."""
    assignments, best_cos = [], []
    for start in range(0, x.shape[0], chunk_size):
        cos = x[start:start + chunk_size] @ centres.T  # (n, k)
        value, index = cos.max(dim=1)
        assignments.append(index)
        best_cos.append(value)
    return torch.cat(assignments), torch.cat(best_cos)


def kmeans_cosine(x, k, n_iter=10, batch_size=8192, seed=0, verbose=False, init="k-means++",
                  init_sample=65536, chunk_size=262144):
    """Cosine (spherical) mini-batch k-means (Sculley 2010, on the unit sphere).

    x: (N, D) float tensor on any device (CPU or CUDA); rows are L2-normalised here.
    k: number of clusters. n_iter: number of passes (epochs) over the shuffled data.
    batch_size: points per mini-batch update. seed: seeds initialisation and shuffling (same seed, same
    device -> same result). init: "k-means++" (greedy, on a random subsample of `init_sample` points) or "random"
    (k distinct random points). chunk_size: rows per matmul of the final full assignment.
    verbose: print the loss of each pass = mean (1 - cos) of the pass's points to the centre they were
    assigned to in their mini-batch, and the loss of the final full assignment.

    Update per mini-batch, for centre c with n_c points of the batch, sum s_c, running count v_c += n_c:
    c <- (1 - n_c / v_c) c + s_c / v_c (Sculley's per-centre learning rate 1 / count, batched), then
    c <- c / ||c||. The counts restart at every pass, so each pass ends near the normalised mean of the
    points it assigned to c (an online Lloyd step); with counts carried over all passes the centres freeze
    after the first pass (measured 2-4 % higher final loss on random data). A centre that received no point
    during a pass is re-seeded at a random data point (except after the last pass). The loop has no host
    synchronisation (one `.item()` per pass when verbose).

    Returns (centres (k, D) float32 unit rows, assignments (N,) long: nearest centre by cosine of every
    point, computed after the last pass).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"kmeans_cosine: x must be a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    n_points, dim = x.shape
    if k < 1:
        raise ValueError(f"kmeans_cosine: k must be >= 1, got {k}")
    if n_points < k:
        raise ValueError(f"kmeans_cosine: need at least k={k} points, got N={n_points}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"kmeans_cosine: init must be 'k-means++' or 'random', got {init!r}")
    if n_iter < 0 or batch_size < 1:
        raise ValueError(f"kmeans_cosine: need n_iter >= 0 and batch_size >= 1, got {n_iter}, {batch_size}")
    device = x.device
    x = F.normalize(x.float(), dim=1)  # (N, D) unit rows
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    # --- initialisation ---
    if init == "random":
        centres = x[torch.randperm(n_points, device=device, generator=generator)[:k]]  # (k, D)
    else:
        sample_size = max(min(init_sample, n_points), k)
        sample = x[torch.randperm(n_points, device=device, generator=generator)[:sample_size]]  # (M, D)
        centres = _kmeans_plus_plus(sample, k, generator)  # (k, D)
    centres = F.normalize(centres, dim=1)

    cluster_ids = torch.arange(k, device=device)  # (k,)
    for pass_index in range(n_iter):
        order = torch.randperm(n_points, device=device, generator=generator)  # (N,)
        loss_sum = torch.zeros((), device=device)
        counts = torch.zeros(k, device=device)  # (k,) running count v_c of the points assigned this pass
        for start in range(0, n_points, batch_size):
            batch = x[order[start:start + batch_size]]  # (b, D)
            best_cos, assignment = (batch @ centres.T).max(dim=1)  # (b,), (b,)
            loss_sum = loss_sum + (1.0 - best_cos).sum()
            # One-hot matmul instead of index_add_: deterministic on CUDA and no host sync.
            one_hot = (assignment[:, None] == cluster_ids[None, :]).float()  # (b, k)
            batch_counts = one_hot.sum(dim=0)  # (k,) n_c
            batch_sums = one_hot.T @ batch  # (k, D) s_c
            counts = counts + batch_counts
            # c <- (1 - n_c / v_c) c + s_c / v_c  (no change where n_c = 0)
            rate = (batch_counts / counts.clamp_min(1.0))[:, None]  # (k, 1)
            batch_means = batch_sums / batch_counts.clamp_min(1.0)[:, None]  # (k, D)
            centres = F.normalize(centres + rate * (batch_means - centres), dim=1)
        if pass_index < n_iter - 1:
            # Re-seed dead centres (no point during this pass) at random data points.
            dead = (counts == 0)[:, None]  # (k, 1)
            replacement = x[torch.randint(n_points, (k,), device=device, generator=generator)]  # (k, D)
            centres = torch.where(dead, replacement, centres)
        if verbose:
            print(f"kmeans pass {pass_index + 1}/{n_iter}: loss (mean 1 - cos) {loss_sum.item() / n_points:.5f}")

    assignments, best_cos = _assign(x, centres, chunk_size)  # (N,), (N,)
    if verbose:
        print(f"kmeans final assignment: loss (mean 1 - cos) {(1.0 - best_cos).mean().item():.5f}")
    return centres, assignments


# ----------------------------------------------------------------------------------------------------
# Confusion matrix, Hungarian matching, metrics
# ----------------------------------------------------------------------------------------------------

def confusion_matrix(pred, label, n_pred, n_classes):
    """Pixel confusion matrix between predicted clusters and ground-truth classes.

    pred: long tensor (any shape) of cluster ids in [0, n_pred); label: long tensor of the same shape.
    Only pixels with 0 <= label < n_classes count (IGNORE = -1, 255 or any other id are left out).
    Returns int64 tensor (n_classes, n_pred) on pred's device: ROWS = ground-truth class,
    COLUMNS = predicted cluster; entry [c, j] = number of pixels of class c predicted as cluster j.
    """
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    if pred.is_floating_point() or label.is_floating_point():
        raise ValueError("confusion_matrix: pred and label must be integer tensors (class / cluster ids)")
    valid = (label >= 0) & (label < n_classes)
    label_valid = label[valid].long()  # (P,)
    pred_valid = pred[valid].long()  # (P,)
    if pred_valid.numel() > 0 and (pred_valid.min() < 0 or pred_valid.max() >= n_pred):
        raise ValueError(f"confusion_matrix: predicted ids must lie in [0, {n_pred}) on labelled pixels, "
                         f"got range [{pred_valid.min().item()}, {pred_valid.max().item()}]")
    flat = label_valid * n_pred + pred_valid  # (P,)
    counts = torch.bincount(flat, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred)  # (n_classes, n_pred)


def hungarian_match(confusion):
    """One-to-one matching of clusters to classes maximising the matched pixels
    (`scipy.optimize.linear_sum_assignment(confusion, maximize=True)`).

    confusion: (n_classes, n_pred) as returned by `confusion_matrix` (rows = classes).
    Returns numpy int64 (n_pred,): the class of every cluster, -1 for a cluster left unmatched
    (only when n_pred > n_classes; those clusters' pixels then count as errors).
    """
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
    if confusion.ndim != 2:
        raise ValueError(f"hungarian_match: confusion must be 2-D (n_classes, n_pred), got shape {confusion.shape}")
    class_index, cluster_index = linear_sum_assignment(confusion, maximize=True)
    matching = np.full(confusion.shape[1], -1, dtype=np.int64)  # (n_pred,)
    matching[cluster_index] = class_index
    return matching


def scores(confusion):
    """Pixel accuracy, per-class IoU and mIoU after Hungarian matching over the whole confusion matrix.

    confusion: (n_classes, n_pred) tensor or array, rows = ground-truth class, columns = cluster.
    Returns a dict of plain Python values (fractions in [0, 1], not percentages):
      acc:       sum of matched true positives / number of labelled pixels (nan if there are none);
      iou:       list (n_classes,) tp / (gt + predicted - tp); nan where that union is 0 (class neither
                 in the labels nor predicted); a class absent from the labels but predicted gets 0;
      miou:      mean of the non-nan IoUs (the peers' convention);
      matching:  list (n_pred,) class of every cluster (-1 = unmatched cluster);
      confusion: list of lists (n_classes, n_classes) after matching: [c, c'] = pixels of class c
                 predicted as the cluster matched to c' (pixels of unmatched clusters are left out);
      n_pixels:  number of labelled pixels.
    """
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion).astype(np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"scores: confusion must be 2-D (n_classes, n_pred), got shape {confusion.shape}")
    n_classes = confusion.shape[0]
    matching = hungarian_match(confusion)  # (n_pred,)

    matched = np.zeros((n_classes, n_classes), dtype=np.int64)  # (n_classes, n_classes)
    for cluster, class_id in enumerate(matching):
        if class_id >= 0:
            matched[:, class_id] += confusion[:, cluster]
    true_positive = np.diag(matched).astype(np.float64)  # (n_classes,)
    ground_truth = confusion.sum(axis=1).astype(np.float64)  # (n_classes,) all labelled pixels of class c
    predicted = matched.sum(axis=0).astype(np.float64)  # (n_classes,) labelled pixels predicted as c
    union = ground_truth + predicted - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    n_pixels = int(confusion.sum())
    acc = float(true_positive.sum() / n_pixels) if n_pixels > 0 else float("nan")
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return {
        "acc": acc,
        "miou": miou,
        "iou": [float(v) for v in iou],
        "matching": [int(v) for v in matching],
        "confusion": matched.tolist(),
        "n_pixels": n_pixels,
    }


# ----------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------

def cluster_log_probs(codes, centres, size=None, scale=2.0):
    """log_softmax(scale * cos(code, centre)) per pixel, as SmooSeg predicts.

    codes: (B, D, h, w); centres: (K, D) (normalised here). size: (H, W) to upsample the codes to first,
    bilinear, align_corners=False (None = keep h, w). Computed in float32.
    Returns (B, K, H, W) log-probabilities over the K clusters.
    """
    if codes.dim() != 4 or centres.dim() != 2 or codes.shape[1] != centres.shape[1]:
        raise ValueError(f"cluster_log_probs: need codes (B, D, h, w) and centres (K, D) with the same D, "
                         f"got {tuple(codes.shape)} and {tuple(centres.shape)}")
    codes = codes.float()
    if size is not None and tuple(size) != tuple(codes.shape[-2:]):
        codes = F.interpolate(codes, size=tuple(size), mode="bilinear", align_corners=False)  # (B, D, H, W)
    codes = F.normalize(codes, dim=1)
    centres = F.normalize(centres.to(device=codes.device, dtype=torch.float32), dim=1)  # (K, D)
    cos = torch.einsum("bdhw,kd->bkhw", codes, centres)  # (B, K, H, W)
    return F.log_softmax(scale * cos, dim=1)


def flip_tta(code_fn, images):
    """Flip test-time augmentation: (code_fn(x) + flip(code_fn(flip(x)))) / 2, flip = horizontal.
    images (B, 3, H, W) -> codes (B, D, h, w)."""
    codes = code_fn(images)  # (B, D, h, w)
    codes_flipped = code_fn(images.flip(-1)).flip(-1)  # (B, D, h, w)
    return (codes + codes_flipped) / 2


def _fused_probs(codes, images, centres, size, scale, low_level_fn, alpha):
    """Cluster probabilities at `size`, optionally fused with the low-level cue (eq 13).

    low_level_fn(images, probs_small) receives the images (B, 3, H, W) and the semantic probabilities at code
    resolution (B, K, h, w) and must return the low-level cue F_l ALREADY ALIGNED to the K clusters,
    (B, K, h', w') at any resolution (bilinearly resized to `size` here), rows summing to 1 over K.
    Returns (B, K, H, W) probabilities.

    Eq (13) is applied to the scores, as in training: F_f = (1 - alpha) cos + alpha F_l, and the
    probabilities are softmax(scale * F_f). Since log_softmax(scale * cos) = scale * cos - c(pixel)
    and a per-pixel constant cancels in the softmax, this is
    softmax((1 - alpha) log_probs + alpha * scale * F_l); alpha = 1 gives argmax F_l.
    """
    log_probs = cluster_log_probs(codes, centres, size=size, scale=scale)  # (B, K, H, W)
    probs = log_probs.exp()
    if low_level_fn is None or alpha <= 0:
        return probs
    probs_small = cluster_log_probs(codes, centres, size=None, scale=scale).exp()  # (B, K, h, w)
    low = low_level_fn(images, probs_small)  # (B, K, h', w')
    if not isinstance(low, torch.Tensor) or low.dim() != 4 or low.shape[:2] != probs.shape[:2]:
        raise ValueError(f"low_level_fn must return (B, K, h, w) = {tuple(probs.shape[:2])} + (h, w), "
                         f"got {getattr(low, 'shape', type(low))}")
    low = low.to(device=probs.device, dtype=probs.dtype)
    if low.shape[-2:] != probs.shape[-2:]:
        low = F.interpolate(low, size=probs.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
    return torch.softmax((1.0 - alpha) * log_probs + alpha * scale * low, dim=1)  # eq (13), at label resolution


def _refine_with_crf(images, probs, crf_kwargs):
    """crf.dense_crf on images (B, 3, H, W) in [0, 1] (resized to probs' size if needed) -> refined probs."""
    try:
        import crf  # lazy: evaluate.py must import without crf.py
    except ImportError as error:
        raise ImportError("evaluate: crf.py (dense CRF) is not importable; pass use_crf=False") from error
    if images.shape[-2:] != probs.shape[-2:]:
        images = F.interpolate(images, size=probs.shape[-2:], mode="bilinear", align_corners=False)
    return crf.dense_crf(images.clamp(0, 1) * 255.0, probs, **(crf_kwargs or {}))  # (B, K, H, W)


def _batch_names(batch, start):
    """The batch's image names, or running numbers when the loader gives none."""
    names = batch.get("name")
    if names is None:
        return [f"{start + i:05d}" for i in range(batch["image"].shape[0])]
    return [str(name) for name in names]


# ----------------------------------------------------------------------------------------------------
# Colours and images
# ----------------------------------------------------------------------------------------------------

def palette(n):
    """Fixed colour palette: uint8 numpy (n, 3), colour of class i = entry i + 1 of the PASCAL VOC colour map
    (bit-interleaved, deterministic, all distinct and none black). Black is reserved for IGNORE / unmatched.
    Works for n <= 255."""
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
    """label_map (H, W) ints (tensor or array) -> uint8 (H, W, 3) with `palette` colours;
    negative ids (IGNORE, unmatched clusters) and ids >= 255 are black."""
    label_map = np.asarray(label_map.cpu() if isinstance(label_map, torch.Tensor) else label_map).astype(np.int64)
    colours = np.concatenate([np.zeros((1, 3), np.uint8), palette(255)])  # (256, 3), row 0 = black
    index = np.where((label_map >= 0) & (label_map < 255), label_map + 1, 0)
    return colours[index]  # (H, W, 3)


def _image_to_uint8(image):
    """(3, H, W) float in [0, 1] -> uint8 numpy (H, W, 3)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_side_by_side(path, image, label, pred, pred_crf=None, gap=4):
    """PNG of image | ground truth | prediction [| prediction after CRF], white gaps of `gap` pixels.
    image (3, H, W) in [0, 1]; label, pred, pred_crf (H, W) class ids (predictions already matched to
    classes), -1 = black."""
    panels = [_image_to_uint8(image), colourise(label), colourise(pred)]
    if pred_crf is not None:
        panels.append(colourise(pred_crf))
    height = panels[0].shape[0]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [spacer, panel]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(row, axis=1)).save(path)


def save_mask_and_overlay(out_dir, name, image, pred, opacity=0.5):
    """Writes OUT_DIR/NAME_mask.png (colour mask of pred (H, W)) and OUT_DIR/NAME_overlay.png (image blended
    with the mask at `opacity`; black = -1 pixels show the plain image). image (3, H, W) in [0, 1].
    Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(str(name).replace("/", "_").replace("\\", "_")).stem
    mask = colourise(pred)  # (H, W, 3)
    picture = _image_to_uint8(image).astype(np.float32)  # (H, W, 3)
    labelled = (np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred) >= 0)[..., None]  # (H, W, 1)
    blended = np.where(labelled, (1 - opacity) * picture + opacity * mask, picture)
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    Image.fromarray(mask).save(mask_path)
    Image.fromarray(blended.round().astype(np.uint8)).save(overlay_path)
    return mask_path, overlay_path


def format_table(result, class_names=None):
    """Per-class IoU before / after CRF plus Acc and mIoU rows, in percent, as a string.
    result: dict returned by `evaluate` ("after_crf" may be None)."""
    before, after = result["before_crf"], result.get("after_crf")
    n_classes = len(before["iou"])
    class_names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n_classes)]

    def percent(value):
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"

    width = max([len(name) for name in class_names] + [5])
    header = f"{'class':<{width}}  {'before CRF':>10}" + (f"  {'after CRF':>10}" if after else "")
    lines = [header, "-" * len(header)]
    rows = [(class_names[c], before["iou"][c], after["iou"][c] if after else None) for c in range(n_classes)]
    rows += [("Acc", before["acc"], after["acc"] if after else None),
             ("mIoU", before["miou"], after["miou"] if after else None)]
    for index, (name, value_before, value_after) in enumerate(rows):
        if index == n_classes:
            lines.append("-" * len(header))
        line = f"{name:<{width}}  {percent(value_before):>10}"
        if after:
            line += f"  {percent(value_after):>10}"
        lines.append(line)
    return "\n".join(lines)


def _json_ready(value):
    """nan -> None (valid JSON), numpy / tuples -> plain lists, recursively."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------------
# The whole protocol
# ----------------------------------------------------------------------------------------------------

def evaluate(code_fn, loader, n_classes, class_names=None, device="cpu", out_dir=None, use_crf=True, n_images=8,
             flip=False, kmeans_kwargs=None, low_level_fn=None, alpha=0.0, centres=None, scale=2.0,
             crf_kwargs=None, seed=0, verbose=True):
    """Unsupervised evaluation of a segmentation code network on one labelled split.

    code_fn(images (B, 3, H, W) in [0, 1]) -> codes (B, D, h, w) (called under torch.no_grad; put the model in
    eval mode first). loader: re-iterable of dict batches {"image": (B, 3, H, W), "label": (B, H, W) with -1
    void, "name": list of str (optional)}, in a FIXED order (shuffle=False).
    Protocol:
      pass 1 (skipped when `centres` (K, D) is given): codes of all images (kept on the CPU, low resolution)
        -> kmeans_cosine over all code vectors, K = n_classes (kmeans_kwargs go to kmeans_cosine);
      pass 2: probabilities at label size = softmax(scale * cos) of the bilinearly upsampled codes (the codes
        of pass 1 are reused; the loader must give the same images in the same order), optional fusion
        with the low-level cue (eq 13: low_level_fn(images, probs_small) -> aligned (B, K, h', w'), used
        when alpha > 0, see `_fused_probs`), argmax -> confusion; dense CRF (crf.dense_crf on images * 255
        and the probabilities) -> argmax -> second confusion.
      Hungarian matching per confusion matrix over the whole split (`scores`).
    flip: flip test-time augmentation of the codes. n_images: how many side-by-side PNGs to write.
    seed: k-means seed. verbose: print the k-means loss per pass (the caller prints `format_table(result)`).
    out_dir: when given, writes metrics.json and side_by_side/NAME.png (image | ground truth | prediction
    | prediction after CRF) for the first n_images images, predictions coloured with the split's matching.
    Returns {"before_crf": scores, "after_crf": scores or None, "n_images": images evaluated,
    "n_clusters": K, "raw_confusion_before"/"raw_confusion_after": (n_classes, K) lists, "centres": (K, D)
    tensor on `device`}.
    """
    device = torch.device(device)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"evaluate: alpha must lie in [0, 1], got {alpha}")
    get_codes = (lambda images: flip_tta(code_fn, images)) if flip else code_fn

    with torch.no_grad():
        # --- pass 1: codes of the whole split and the k-means centres ---
        stored_codes, stored_names = [], []
        if centres is None:
            seen = 0
            for batch in loader:
                images = batch["image"].to(device).float()  # (B, 3, H, W)
                codes = get_codes(images)  # (B, D, h, w)
                stored_codes.append(codes.float().cpu())
                stored_names.append(_batch_names(batch, seen))
                seen += images.shape[0]
            if not stored_codes:
                raise ValueError("evaluate: the loader gave no images")
            vectors = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, c.shape[1]) for c in stored_codes])  # (N, D)
            options = {"seed": seed, "verbose": verbose}
            options.update(kmeans_kwargs or {})
            centres, _ = kmeans_cosine(vectors.to(device), n_classes, **options)  # (K, D)
            del vectors
        centres = centres.to(device).float()
        n_clusters = centres.shape[0]

        # --- pass 2: predictions, confusion matrices before / after CRF ---
        confusion_before = torch.zeros(n_classes, n_clusters, dtype=torch.int64, device=device)
        confusion_after = torch.zeros_like(confusion_before)
        kept = []  # first n_images: (name, image, label, cluster pred, cluster pred after CRF) on the CPU
        seen = 0
        for batch_index, batch in enumerate(loader):
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            labels = batch["label"].to(device).long()  # (B, H, W)
            names = _batch_names(batch, seen)
            if stored_codes:
                if batch_index >= len(stored_codes) or names != stored_names[batch_index]:
                    raise ValueError("evaluate: the loader changed its images between passes; use shuffle=False")
                codes = stored_codes[batch_index].to(device)  # (B, D, h, w)
            else:
                codes = get_codes(images)  # (B, D, h, w)
            probs = _fused_probs(codes, images, centres, labels.shape[-2:], scale, low_level_fn, alpha)  # (B, K, H, W)
            pred = probs.argmax(dim=1)  # (B, H, W)
            confusion_before += confusion_matrix(pred, labels, n_clusters, n_classes)
            pred_crf = None
            if use_crf:
                pred_crf = _refine_with_crf(images, probs, crf_kwargs).argmax(dim=1)  # (B, H, W)
                confusion_after += confusion_matrix(pred_crf, labels, n_clusters, n_classes)
            for i in range(images.shape[0]):
                if len(kept) < n_images:
                    image_i = images[i]
                    if image_i.shape[-2:] != labels.shape[-2:]:
                        image_i = F.interpolate(image_i[None], size=labels.shape[-2:], mode="bilinear",
                                                align_corners=False)[0]
                    kept.append((names[i], image_i.cpu(), labels[i].cpu(), pred[i].cpu(),
                                 None if pred_crf is None else pred_crf[i].cpu()))
            seen += images.shape[0]
        if stored_codes and seen != sum(c.shape[0] for c in stored_codes):
            raise ValueError("evaluate: the loader changed its images between passes; use shuffle=False")

    result = {
        "before_crf": scores(confusion_before),
        "after_crf": scores(confusion_after) if use_crf else None,
        "n_images": seen,
        "n_clusters": n_clusters,
        "raw_confusion_before": confusion_before.cpu().tolist(),
        "raw_confusion_after": confusion_after.cpu().tolist() if use_crf else None,
        "centres": centres,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {key: value for key, value in result.items() if key != "centres"}
        metrics.update({"class_names": list(class_names) if class_names is not None else None,
                        "alpha": alpha, "flip": flip, "use_crf": use_crf})
        with open(out_dir / "metrics.json", "w") as file:
            json.dump(_json_ready(metrics), file, indent=2)
        # Predictions shown in ground-truth colours through the split-wide matching (-1 unmatched = black).
        lut_before = torch.tensor(result["before_crf"]["matching"])  # (K,)
        lut_after = torch.tensor(result["after_crf"]["matching"]) if use_crf else None
        for name, image, label, pred, pred_crf in kept:
            stem = Path(name.replace("/", "_").replace("\\", "_")).stem
            save_side_by_side(out_dir / "side_by_side" / f"{stem}.png", image, label, lut_before[pred],
                              None if pred_crf is None else lut_after[pred_crf])
    return result


def predict_folder(code_fn, loader, centres, out_dir, device="cpu", matching=None, use_crf=True, flip=False,
                   scale=2.0, low_level_fn=None, alpha=0.0, crf_kwargs=None):
    """Segments images without labels (`--predict FOLDER`): writes NAME_mask.png and NAME_overlay.png per image.

    loader: iterable of dict batches {"image": (B, 3, H, W) in [0, 1], "name": list of str (optional)};
    centres: (K, D) cluster centres (e.g. `evaluate(...)["centres"]` or the model's global centres).
    matching: optional list (K,) cluster -> class (e.g. `evaluate(...)["before_crf"]["matching"]`) so the
    masks use the class colours; without it the raw cluster ids are coloured. Returns the written paths.
    """
    device = torch.device(device)
    centres = centres.to(device).float()
    get_codes = (lambda images: flip_tta(code_fn, images)) if flip else code_fn
    lut = None if matching is None else torch.as_tensor(matching, dtype=torch.long)  # (K,)
    paths, seen = [], 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            names = _batch_names(batch, seen)
            codes = get_codes(images)  # (B, D, h, w)
            probs = _fused_probs(codes, images, centres, images.shape[-2:], scale, low_level_fn, alpha)  # (B, K, H, W)
            if use_crf:
                probs = _refine_with_crf(images, probs, crf_kwargs)
            pred = probs.argmax(dim=1).cpu()  # (B, H, W)
            if lut is not None:
                pred = lut[pred]
            for i in range(images.shape[0]):
                paths.extend(save_mask_and_overlay(out_dir, names[i], images[i].cpu(), pred[i]))
            seen += images.shape[0]
    return paths


# ----------------------------------------------------------------------------------------------------
# Command line: a thin wrapper around il2vseg.py
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """`python evaluate.py CHECKPOINT [il2vseg options...]` == `python il2vseg.py --eval --checkpoint
    CHECKPOINT [il2vseg options...]` (e.g. --data NAME --data-root DIR --out DIR); see il2vseg.py --help."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a checkpoint (forwards to `il2vseg.py --eval --checkpoint CHECKPOINT ...`).")
    parser.add_argument("checkpoint", help="checkpoint file written by il2vseg.py")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="further il2vseg.py options (--data, --data-root, --out, ...)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint file not found: {args.checkpoint}")
    import il2vseg  # lazy: il2vseg.py imports this module
    return il2vseg.main(["--eval", "--checkpoint", args.checkpoint] + list(args.rest))


if __name__ == "__main__":
    sys.exit(main())
