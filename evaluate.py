"""Unsupervised evaluation of IL2Vseg (paper, "Evaluation Metrics" and "Implementation Details").

The paper: "we use minibatch K-means based on cosine similarity for cluster segmentation ... we optimize
the matching relationship between the predictions and the real semantic graph using the Hungarian
matching algorithm ... we apply Conditional Random Fields (CRF) to post-process the predicted results".
Its Implementation Details also predict with "the highest similarity at the global clustering centre".
The default protocol, each choice with the peer it follows:

1. Codes F^c of every evaluated image, averaged with the codes of its mirror image flipped back
   (`flip_tta`; STEGO's evaluation does this).
2. Two cluster probes, both reported (`probes`):
   - "kmeans": cosine mini-batch k-means, K = number of classes, FIT ON CODES OF TRAINING IMAGES and
     applied to the evaluated split. STEGO / HP / EAGLE train their cluster probe on training batches
     and only apply it to val; none fits it on the val codes. One k-means seed can move the scores by
     several points on the same codes, so k-means is restarted `n_init` times and the run with the
     lowest k-means loss is kept (label-free, as scikit-learn's n_init); the caller may also fit
     several seeds and report their spread (`spread`). Fitting on the evaluated split's own codes
     (transductive) is an option of the caller.
   - "centres": argmax over the trained global centres (SmooSeg; the paper's Implementation Details).
3. Per pixel: softmax(2 cos(code upsampled to the label size, centre)), SmooSeg's scale 2
   (`cluster_log_probs`), optionally fused with the low-level cue F^l by eq (13) (`fused_probs`);
   argmax -> confusion matrix; the dense CRF (crf.py) on these probabilities -> a second confusion.
4. Hungarian matching of clusters to classes over the WHOLE split, per confusion matrix
   (`hungarian_match`), pixel accuracy, per-class IoU and mIoU (`scores`).

Conventions: confusion matrices are (n_classes, n_pred) with ROWS = ground-truth class; scores are
fractions in [0, 1]; mIoU is the mean over classes whose union is non-empty (STEGO's
`iou[~isnan(iou)].mean()`). Writing tables, metrics.json and PNGs is results.py's job.

`python evaluate.py CHECKPOINT [options]` runs `python il2vseg.py --eval --checkpoint CHECKPOINT [options]`
(in a new process: evaluation never imports the training script).
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import crf
import results


# ----------------------------------------------------------------------------------------------------
# Cosine (spherical) mini-batch k-means
# ----------------------------------------------------------------------------------------------------

def kmeans_plus_plus(x, k, generator, n_trials=None):
    """Greedy k-means++ seeding on unit vectors x (M, D) -> (k, D). For unit vectors
    ||a - b||^2 = 2 (1 - cos), so drawing the next centre with probability proportional to the cosine
    distance to the nearest centre so far IS k-means++ (Arthur & Vassilvitskii 2007). Greedy variant (as
    scikit-learn): draw n_trials (default 2 + int(ln k)) candidates per step, keep the one that lowers the
    summed distance most. No host sync."""
    n_trials = n_trials or 2 + int(math.log(k))
    first = torch.randint(x.shape[0], (1,), device=x.device, generator=generator)  # (1,)
    centres = [x[first]]  # list of (1, D)
    nearest = (1.0 - x @ centres[0].T).squeeze(1).clamp_min(0.0)  # (M,) distance to the nearest centre
    for _ in range(k - 1):
        # the tiny floor keeps the distribution valid when fewer than k distinct points exist
        candidates = torch.multinomial(nearest + 1e-12, n_trials, replacement=True, generator=generator)  # (T,)
        distance = (1.0 - x @ x[candidates].T).clamp_min(0.0)  # (M, T)
        new_nearest = torch.minimum(nearest[:, None], distance)  # (M, T)
        best = new_nearest.sum(dim=0).argmin()  # () the best candidate
        centres.append(x[candidates[best]][None])  # (1, D)
        nearest = new_nearest[:, best]  # (M,)
    return torch.cat(centres, dim=0)  # (k, D)


def kmeans_cosine(x, k, n_iter=10, batch_size=8192, seed=0, n_init=1, init="k-means++", init_sample=65536,
                  chunk_size=262144, verbose=False):
    """Cosine (spherical) mini-batch k-means (Sculley 2010, on the unit sphere), restarted n_init times.

    x (N, D) on any device (rows are L2-normalised here); k clusters; n_iter passes over the shuffled
    data in mini-batches of batch_size. One seeded generator drives every random choice (same seed and
    device -> same result); run r of the n_init restarts continues its stream, so n_init=1 is run 0.
    init: "k-means++" (greedy, on a random subsample of init_sample points) or "random" (k distinct points).
    Update per mini-batch, for centre c with n_c points of the batch, sum s_c and running count v_c:
    c <- c + (n_c / v_c) (s_c / n_c - c), then c <- c / ||c|| (Sculley's learning rate 1/count, batched);
    the counts restart every pass (each pass ends near the normalised mean of its points, an online
    Lloyd step). A centre that got no point in a pass is re-seeded at a random point (not after the last).
    The loss of a run is mean(1 - cos) of every point to its nearest centre after the last pass; the run
    with the lowest loss is returned (no labels involved). verbose prints each run's loss.
    Returns (centres (k, D) float32 unit rows, assignments (N,) long: nearest centre of every point,
    loss: float).
    needs: kmeans_plus_plus
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"kmeans_cosine: x must be a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    if k < 1 or x.shape[0] < k:
        raise ValueError(f"kmeans_cosine: need k >= 1 and at least k={k} points, got N={x.shape[0]}")
    if init not in ("k-means++", "random") or n_iter < 0 or batch_size < 1 or n_init < 1:
        raise ValueError(f"kmeans_cosine: need init 'k-means++' or 'random', n_iter >= 0, batch_size >= 1, "
                         f"n_init >= 1; got {init!r}, {n_iter}, {batch_size}, {n_init}")
    n_points, device = x.shape[0], x.device
    x = F.normalize(x.float(), dim=1)  # (N, D) unit rows
    generator = torch.Generator(device=device).manual_seed(seed)
    cluster_ids = torch.arange(k, device=device)  # (k,)
    best = None
    for run in range(n_init):
        if init == "random":
            centres = x[torch.randperm(n_points, device=device, generator=generator)[:k]]  # (k, D)
        else:
            sample = x[torch.randperm(n_points, device=device, generator=generator)[:max(min(init_sample, n_points), k)]]
            centres = F.normalize(kmeans_plus_plus(sample, k, generator), dim=1)  # (k, D)
        for pass_index in range(n_iter):
            order = torch.randperm(n_points, device=device, generator=generator)  # (N,)
            counts = torch.zeros(k, device=device)  # (k,) running count v_c of this pass
            for start in range(0, n_points, batch_size):
                batch = x[order[start:start + batch_size]]  # (b, D)
                assignment = (batch @ centres.T).argmax(dim=1)  # (b,)
                one_hot = (assignment[:, None] == cluster_ids[None, :]).float()  # (b, k): deterministic, no sync
                batch_counts = one_hot.sum(dim=0)  # (k,) n_c
                counts = counts + batch_counts
                rate = (batch_counts / counts.clamp_min(1.0))[:, None]  # (k, 1) n_c / v_c
                batch_means = (one_hot.T @ batch) / batch_counts.clamp_min(1.0)[:, None]  # (k, D) s_c / n_c
                centres = F.normalize(centres + rate * (batch_means - centres), dim=1)
            if pass_index < n_iter - 1:  # re-seed centres that got no point during this pass
                replacement = x[torch.randint(n_points, (k,), device=device, generator=generator)]  # (k, D)
                centres = torch.where((counts == 0)[:, None], replacement, centres)
        best_cos, assignments = [], []
        for start in range(0, n_points, chunk_size):  # final assignment, in chunks
            value, index = (x[start:start + chunk_size] @ centres.T).max(dim=1)
            best_cos.append(value)
            assignments.append(index)
        loss = float((1.0 - torch.cat(best_cos)).mean())
        if verbose:
            print(f"kmeans run {run + 1}/{n_init} (seed {seed}): loss (mean 1 - cos) {loss:.5f}")
        if best is None or loss < best[2]:
            best = (centres, torch.cat(assignments), loss)
    return best


# ----------------------------------------------------------------------------------------------------
# Confusion matrix, Hungarian matching, metrics
# ----------------------------------------------------------------------------------------------------

def confusion_matrix(pred, label, n_pred, n_classes):
    """Pixel confusion matrix (n_classes, n_pred) int64: ROWS = ground-truth class, COLUMNS = predicted
    cluster. pred and label: integer tensors of the same shape; only pixels with 0 <= label < n_classes
    count (void -1, 255 or any other id is left out); predicted ids must lie in [0, n_pred) there."""
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape or pred.is_floating_point() or label.is_floating_point():
        raise ValueError(f"confusion_matrix: need integer pred and label of one shape, got {pred.dtype} "
                         f"{tuple(pred.shape)} and {label.dtype} {tuple(label.shape)}")
    valid = (label >= 0) & (label < n_classes)
    label_valid, pred_valid = label[valid].long(), pred[valid].long()  # (P,), (P,)
    if pred_valid.numel() > 0 and (pred_valid.min() < 0 or pred_valid.max() >= n_pred):
        raise ValueError(f"confusion_matrix: predicted ids must lie in [0, {n_pred}) on labelled pixels, "
                         f"got range [{pred_valid.min().item()}, {pred_valid.max().item()}]")
    counts = torch.bincount(label_valid * n_pred + pred_valid, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred)  # (n_classes, n_pred)


def hungarian_match(confusion):
    """One-to-one matching of clusters to classes maximising the matched pixels
    (`linear_sum_assignment(confusion, maximize=True)`). confusion (n_classes, n_pred), rows = classes.
    Returns numpy int64 (n_pred,): the class of every cluster, -1 for a cluster left unmatched (only when
    n_pred > n_classes; its pixels then count as errors)."""
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
    if confusion.ndim != 2:
        raise ValueError(f"hungarian_match: confusion must be 2-D (n_classes, n_pred), got shape {confusion.shape}")
    class_index, cluster_index = linear_sum_assignment(confusion, maximize=True)
    matching = np.full(confusion.shape[1], -1, dtype=np.int64)  # (n_pred,)
    matching[cluster_index] = class_index
    return matching


def scores(confusion):
    """Pixel accuracy, per-class IoU and mIoU after Hungarian matching over the whole confusion matrix.

    confusion (n_classes, n_pred), rows = ground-truth class. Returns plain Python values (fractions):
      acc       matched true positives / labelled pixels (nan without pixels);
      iou       (n_classes,) tp / (gt + predicted - tp); nan where that union is 0; a class absent from
                the labels but predicted gets 0;
      miou      mean of the non-nan IoUs (the peers' convention);
      matching  (n_pred,) class of every cluster (-1 unmatched);
      confusion (n_classes, n_classes) after matching; n_pixels: labelled pixels.
    needs: hungarian_match
    """
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion).astype(np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"scores: confusion must be 2-D (n_classes, n_pred), got shape {confusion.shape}")
    n_classes = confusion.shape[0]
    matching = hungarian_match(confusion)  # (n_pred,)
    matched = np.zeros((n_classes, n_classes), dtype=np.int64)  # [c, c'] = class c predicted as c'
    for cluster, class_id in enumerate(matching):
        if class_id >= 0:
            matched[:, class_id] += confusion[:, cluster]
    true_positive = np.diag(matched).astype(np.float64)  # (n_classes,)
    ground_truth = confusion.sum(axis=1).astype(np.float64)  # (n_classes,)
    predicted = matched.sum(axis=0).astype(np.float64)  # (n_classes,)
    union = ground_truth + predicted - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    n_pixels = int(confusion.sum())
    present = ~np.isnan(iou)
    return {
        "acc": float(true_positive.sum() / n_pixels) if n_pixels > 0 else float("nan"),
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "iou": [float(v) for v in iou],
        "matching": [int(v) for v in matching],
        "confusion": matched.tolist(),
        "n_pixels": n_pixels,
    }


# ----------------------------------------------------------------------------------------------------
# Per-pixel prediction
# ----------------------------------------------------------------------------------------------------

def cluster_log_probs(codes, centres, size=None, scale=2.0):
    """log_softmax(scale * cos(code, centre)) per pixel, as SmooSeg predicts (scale 2).

    codes (B, D, h, w), centres (K, D) (normalised here); size (H, W): upsample the codes first
    (bilinear, align_corners=False; None keeps h, w). float32. Returns (B, K, H, W) log-probabilities."""
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
    """Flip test-time augmentation: (code_fn(x) + flip(code_fn(flip(x)))) / 2, horizontal flip.
    images (B, 3, H, W) -> codes (B, D, h, w)."""
    codes = code_fn(images)  # (B, D, h, w)
    return (codes + code_fn(images.flip(-1)).flip(-1)) / 2


def fused_probs(codes, centres, size, low=None, alpha=0.0, scale=2.0):
    """Cluster probabilities (B, K, H, W) at `size`, fused with the low-level cue by eq (13) when alpha > 0.

    low: F^l (B, K, h', w') ALREADY ALIGNED to the K probe clusters (il2vseg: by --eval-align), any resolution
    (bilinearly resized to `size`); values in [0, 1], not necessarily summing to 1 over K.
    Eq (13) on the scores, as in training, F^f = (1 - alpha) cos + alpha F^l, decides the argmax.
    The probabilities are softmax(scale F^f / (1 - alpha)) = softmax(scale cos + alpha / (1 - alpha) scale F^l):
    the same argmax, but the high-level cue keeps the sharpness it has without fusion. (softmax(scale F^f)
    itself would shrink the high-level logits by (1 - alpha) and hand the CRF a flatter unary, which its
    fixed pairwise weights then overrule: on CamVid that made the CRF lose accuracy after fusion.)
    alpha = 1: F^l alone, divided by its sum over K (the argmax of F^l, as eq (13) at alpha 1).
    needs: cluster_log_probs
    """
    log_probs = cluster_log_probs(codes, centres, size=size, scale=scale)  # (B, K, H, W)
    if low is None or alpha <= 0:
        return log_probs.exp()
    low = low.to(device=log_probs.device, dtype=log_probs.dtype)
    if low.dim() != 4 or low.shape[:2] != log_probs.shape[:2]:
        raise ValueError(f"fused_probs: F_l must be (B, K, h, w) with (B, K) = {tuple(log_probs.shape[:2])}, "
                         f"got {tuple(low.shape)}")
    if low.shape[-2:] != log_probs.shape[-2:]:
        low = F.interpolate(low, size=log_probs.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
    if alpha >= 1:
        return low / low.sum(dim=1, keepdim=True).clamp_min(1e-12)  # the low-level cue alone
    return torch.softmax(log_probs + alpha / (1.0 - alpha) * scale * low, dim=1)  # eq (13), scale kept


# ----------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------

def collect_codes(code_fn, loader, device="cpu", flip=True):
    """Code vectors (N, D) float32 on the CPU of every pixel of every image of `loader` (the k-means
    training data); with flip TTA when `flip`."""
    vectors = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)  # (B, D, h, w)
            vectors.append(codes.float().permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).cpu())
    if not vectors:
        raise ValueError("collect_codes: the loader gave no images")
    return torch.cat(vectors)  # (N, D)


def evaluate(code_fn, loader, n_classes, probes, device="cpu", use_crf=True, flip=True, low_level_fn=None,
             alpha=0.0, scale=2.0, crf_kwargs=None, keep=0):
    """Score every probe on one labelled split, before and after the dense CRF.

    code_fn(images (B, 3, H, W) in [0, 1]) -> codes (B, D, h, w) (called under no_grad, model in eval
    mode). loader: batches {"image", "label" (B, H, W) with void -1, "name" (optional)}.
    probes: dict name -> centres (K, D) (e.g. {"kmeans": fitted centres, "centres": global centres}).
    low_level_fn(images, codes, centres) -> F^l (B, K, h', w') aligned to the clusters of `centres`
    (used when alpha > 0).
    The codes of each batch are computed once (flip TTA when `flip`) and shared by all probes.
    keep: how many images to keep (CPU copies with each probe's cluster predictions) for pictures.
    Returns {"probes": {name: {"before_crf": scores, "after_crf": scores or None,
    "raw_confusion_before"/"raw_confusion_after": (n_classes, K) lists}}, "n_images": int,
    "kept": [(name, image, label, {probe: (pred, pred_crf or None)})]}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"evaluate: alpha must lie in [0, 1], got {alpha}")
    if not probes:
        raise ValueError("evaluate: no probe to evaluate")
    probes = {name: centres.to(device).float() for name, centres in probes.items()}
    confusion = {name: [torch.zeros(n_classes, c.shape[0], dtype=torch.int64, device=device) for _ in range(2)]
                 for name, c in probes.items()}
    kept, seen = [], 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            labels = batch["label"].to(device).long()  # (B, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)  # (B, D, h, w)
            outputs = {}
            for name, centres in probes.items():
                low = None
                if alpha > 0 and low_level_fn is not None:
                    low = low_level_fn(images, codes, centres)  # (B, K, h', w') aligned to this probe's clusters
                probs = fused_probs(codes, centres, labels.shape[-2:], low, alpha, scale)  # (B, K, H, W)
                pred = probs.argmax(dim=1)  # (B, H, W)
                confusion[name][0] += confusion_matrix(pred, labels, centres.shape[0], n_classes)
                pred_crf = None
                if use_crf:
                    pred_crf = refine_with_crf(images, probs, crf_kwargs).argmax(dim=1)  # (B, H, W)
                    confusion[name][1] += confusion_matrix(pred_crf, labels, centres.shape[0], n_classes)
                outputs[name] = (pred, pred_crf)
            names = batch.get("name") or [f"{seen + i:05d}" for i in range(images.shape[0])]
            for i in range(images.shape[0]):
                if len(kept) < keep:
                    image = images[i]
                    if image.shape[-2:] != labels.shape[-2:]:
                        image = F.interpolate(image[None], size=labels.shape[-2:], mode="bilinear",
                                              align_corners=False)[0]
                    kept.append((str(names[i]), image.cpu(), labels[i].cpu(),
                                 {n: (p[i].cpu(), None if c is None else c[i].cpu()) for n, (p, c) in outputs.items()}))
            seen += images.shape[0]
    if seen == 0:
        raise ValueError("evaluate: the loader gave no images")
    return {
        "probes": {name: {"before_crf": scores(before), "after_crf": scores(after) if use_crf else None,
                          "raw_confusion_before": before.cpu().tolist(),
                          "raw_confusion_after": after.cpu().tolist() if use_crf else None}
                   for name, (before, after) in confusion.items()},
        "n_images": seen,
        "kept": kept,
    }


def spread(result, names):
    """Mean and standard deviation (over the probes `names`, e.g. several k-means seeds) of Acc and mIoU,
    before and after the CRF: {"before_crf": {"acc": (mean, std), "miou": ...}, "after_crf": ... or None}."""
    summary = {}
    for stage in ("before_crf", "after_crf"):
        rows = [result["probes"][name][stage] for name in names]
        if any(row is None for row in rows):
            summary[stage] = None
            continue
        summary[stage] = {key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
                          for key in ("acc", "miou")}
    return summary


def run_protocol(code_fn, global_centres, datasets, cfg, device="cpu", low_level_fn=None, log=print):
    """The default protocol (module docstring) with the command line's settings; returns evaluate()'s
    result (None for a split without labels) and writes OUT/metrics.json and OUT/side_by_side/.

    datasets: (train, val, fit) as il2vseg.build_datasets gives them: k-means is fit on the codes of
    `fit` (training images in evaluation geometry), or of `val` with --kmeans-fit val. cfg: probe,
    kmeans_fit, kmeans_restarts, kmeans_seeds, seed, flip_tta, no_crf, eval_alpha (eval_align), eval_batch_size,
    num_workers, save_images, out (and names for the log). --kmeans-seeds S > 1 adds probes
    "kmeans seed N" and their spread (in metrics.json; the table shows "kmeans" and "centres")."""
    _, val_set, fit_set = datasets
    if not val_set.has_labels:
        log(f"evaluation skipped: the {cfg.val_split} split has no labels (use --predict FOLDER to see the segmentation)")
        return None
    n_classes = val_set.n_classes

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False,
                                           num_workers=cfg.num_workers)

    probes = {}
    if cfg.probe in ("kmeans", "both"):
        fit_split = cfg.val_split if cfg.kmeans_fit == "val" else cfg.train_split
        vectors = collect_codes(code_fn, loader(val_set if cfg.kmeans_fit == "val" else fit_set), device,
                                flip=cfg.flip_tta).to(device)  # (N, D)
        for s in range(cfg.kmeans_seeds):
            centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed + s, n_init=cfg.kmeans_restarts)
            probes["kmeans" if s == 0 else f"kmeans seed {cfg.seed + s}"] = centres
            log(f"k-means (seed {cfg.seed + s}, best of {cfg.kmeans_restarts}) on {len(vectors)} codes of the "
                f"{fit_split} split: loss {loss:.4f}")
        del vectors
    if cfg.probe in ("centres", "both"):
        probes["centres"] = global_centres
    result = evaluate(code_fn, loader(val_set), n_classes, probes, device, use_crf=not cfg.no_crf, flip=cfg.flip_tta,
                      low_level_fn=low_level_fn, alpha=cfg.eval_alpha, keep=cfg.save_images)
    seeds = [name for name in result["probes"] if name.startswith("kmeans")]
    if len(seeds) > 1:
        result["spread"] = spread(result, seeds)
        log(results.format_spread(result["spread"], len(seeds)))
    main_probes = ("kmeans", "centres")
    shown = {"probes": {k: v for k, v in result["probes"].items() if k in main_probes},
             "kept": [(name, image, label, {k: v for k, v in out.items() if k in main_probes})
                      for name, image, label, out in result["kept"]]}
    log(results.format_table(shown, val_set.class_names))
    settings = {key: getattr(cfg, key, None) for key in ("data", "arch", "val_split", "probe", "kmeans_fit",
                                                         "probe_images", "kmeans_restarts", "kmeans_seeds", "seed",
                                                         "eval_alpha", "eval_align", "flip_tta", "no_crf", "eval_crop")}
    settings["n_fit_images"] = len(val_set if cfg.kmeans_fit == "val" else fit_set) if "kmeans" in probes else 0
    results.write_metrics(cfg.out, result, settings)
    results.save_pictures(cfg.out, shown)
    return result


def refine_with_crf(images, probs, crf_kwargs=None):
    """crf.dense_crf on images (B, 3, H, W) in [0, 1] (resized to the probabilities' size) -> refined
    probabilities (B, K, H, W)."""
    if images.shape[-2:] != probs.shape[-2:]:
        images = F.interpolate(images, size=probs.shape[-2:], mode="bilinear", align_corners=False)
    return crf.dense_crf(images.clamp(0, 1) * 255.0, probs, **(crf_kwargs or {}))  # (B, K, H, W)


def predict_folder(code_fn, loader, centres, out_dir, device="cpu", matching=None, use_crf=True, flip=True,
                   low_level_fn=None, alpha=0.0, scale=2.0, crf_kwargs=None):
    """Segment images without labels (`--predict FOLDER`): NAME_mask.png and NAME_overlay.png per image.

    loader: batches {"image": (B, 3, H, W) in [0, 1], "name": unique output names}; centres (K, D), e.g.
    the global centres; matching (K,) cluster -> class for class colours (raw cluster ids otherwise).
    Returns the written paths."""
    centres = centres.to(device).float()
    lut = None if matching is None else torch.as_tensor(matching, dtype=torch.long)  # (K,)
    paths = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)  # (B, D, h, w)
            low = None
            if alpha > 0 and low_level_fn is not None:
                low = low_level_fn(images, codes, centres)
            probs = fused_probs(codes, centres, images.shape[-2:], low, alpha, scale)  # (B, K, H, W)
            if use_crf:
                probs = refine_with_crf(images, probs, crf_kwargs)
            pred = probs.argmax(dim=1).cpu()  # (B, H, W)
            if lut is not None:
                pred = lut[pred]
            for i in range(images.shape[0]):
                paths.extend(results.save_mask_and_overlay(out_dir, batch["name"][i], images[i].cpu(), pred[i]))
    return paths


def main(argv=None):
    """`python evaluate.py CHECKPOINT [il2vseg options]` = `python il2vseg.py --eval --checkpoint CHECKPOINT
    [il2vseg options]`, run in this process's place (os.execv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__.strip() + "\nSee `python il2vseg.py --help` for the options.")
        return 0 if argv else 2
    script = Path(__file__).resolve().with_name("il2vseg.py")
    command = [sys.executable, str(script), "--eval", "--checkpoint", argv[0], *argv[1:]]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
