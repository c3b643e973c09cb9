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
3. Per pixel: softmax(2 F), SmooSeg's scale 2, where F are the model's scores for the probe's centres at
   the label size (il2vseg.make_score_fn: eq (2) on the upsampled codes, optionally fused with the
   low-level cue F^l by eq (13)); argmax -> confusion matrix; the dense CRF (crf.py) on these
   probabilities -> a second confusion matrix.
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
from fcm import initial_centres  # the project's one k-means++ (on unit vectors: cosine k-means++)


# ----------------------------------------------------------------------------------------------------
# Cosine (spherical) mini-batch k-means
# ----------------------------------------------------------------------------------------------------

def kmeans_cosine(x, k, n_iter=10, batch_size=8192, seed=0, n_init=1, init_sample=65536, chunk_size=262144,
                  verbose=False, tick=None):
    """Cosine (spherical) mini-batch k-means (Sculley 2010 on the unit sphere), restarted n_init times.

    x (N, D) on any device (rows are L2-normalised here), k clusters, n_iter shuffled passes in mini-batches.
    Seeding: greedy k-means++ with 2 + ln k trials, as scikit-learn (fcm.initial_centres; for unit vectors
    |a - b|^2 = 2 (1 - cos)), on a random subsample of init_sample points. Per mini-batch, centre c with n_c of its points, their mean m_c and running count
    v_c: c <- normalise(c + n_c / v_c (m_c - c)); counts restart every pass; an empty centre is re-seeded at
    a random point (not after the last pass). The run with the lowest loss, mean(1 - cos) to the nearest
    centre, is kept (label-free, as scikit-learn's n_init). One seeded generator drives every draw.
    tick() after every pass (progress). Returns (centres (k, D) float32 unit rows, assignments (N,) long, loss).
    needs: fcm.initial_centres
    """
    n_points, device = x.shape[0], x.device
    x = F.normalize(x.float(), dim=1)                                                    # (N, D) unit rows
    generator = torch.Generator(device=device).manual_seed(seed)
    cluster_ids = torch.arange(k, device=device)                                         # (k,)
    best = None
    for run in range(n_init):
        sample = x[torch.randperm(n_points, device=device, generator=generator)[:max(min(init_sample, n_points), k)]]
        draw_seed = int(torch.randint(2**31 - 1, (1,), device=device, generator=generator))
        centres = initial_centres(sample.T[None], k, seed=draw_seed, trials=2 + int(math.log(k)))[0]  # (k, D)
        for pass_index in range(n_iter):
            order = torch.randperm(n_points, device=device, generator=generator)        # (N,)
            counts = torch.zeros(k, device=device)                                      # v_c of this pass
            for start in range(0, n_points, batch_size):
                batch = x[order[start:start + batch_size]]                               # (b, D)
                one_hot = ((batch @ centres.T).argmax(dim=1)[:, None] == cluster_ids).float()  # (b, k)
                batch_counts = one_hot.sum(dim=0)                                        # n_c (k,)
                counts = counts + batch_counts
                rate = (batch_counts / counts.clamp_min(1.0))[:, None]                   # n_c / v_c (k, 1)
                means = (one_hot.T @ batch) / batch_counts.clamp_min(1.0)[:, None]       # m_c (k, D)
                centres = F.normalize(centres + rate * (means - centres), dim=1)
            if tick is not None:
                tick()
            if pass_index < n_iter - 1:                                                 # re-seed empty centres
                replacement = x[torch.randint(n_points, (k,), device=device, generator=generator)]
                centres = torch.where((counts == 0)[:, None], replacement, centres)
        best_cos, assignments = zip(*[(x[i:i + chunk_size] @ centres.T).max(dim=1)      # in chunks
                                      for i in range(0, n_points, chunk_size)])
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
    cluster. pred and label: integer tensors of one shape on one device; only pixels with
    0 <= label < n_classes count (void -1, 255 or any other id is left out); pred lies in [0, n_pred)."""
    valid = (label >= 0) & (label < n_classes)
    label_valid, pred_valid = label[valid].long(), pred[valid].long()  # (P,), (P,)
    counts = torch.bincount(label_valid * n_pred + pred_valid, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred)  # (n_classes, n_pred)


def hungarian_match(confusion):
    """One-to-one matching of clusters to classes maximising the matched pixels
    (`linear_sum_assignment(confusion, maximize=True)`). confusion (n_classes, n_pred), rows = classes.
    Returns numpy int64 (n_pred,): the class of every cluster, -1 for a cluster left unmatched (only when
    n_pred > n_classes; its pixels then count as errors)."""
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
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
# Per-pixel prediction: the model's scores (il2vseg.make_score_fn), flip TTA, the CRF
# ----------------------------------------------------------------------------------------------------

def cluster_probs(score_fn, images, codes, centres, size, scale=2.0):
    """softmax(scale F) (B, K, H, W) of the model's scores F = score_fn(images, codes, centres, size), in
    float32; scale 2 is SmooSeg's."""
    return torch.softmax(scale * score_fn(images, codes, centres.to(codes.device).float(), size).float(), dim=1)


def flip_tta(code_fn, images):
    """Flip test-time augmentation: (code_fn(x) + flip(code_fn(flip(x)))) / 2, horizontal flip.
    images (B, 3, H, W) -> codes (B, D, h, w)."""
    codes = code_fn(images)  # (B, D, h, w)
    return (codes + code_fn(images.flip(-1)).flip(-1)) / 2


# ----------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------

def collect_codes(code_fn, loader, device="cpu", flip=True, tick=None):
    """Code vectors (N, D) float32 on the CPU of every pixel of every image of `loader` (the k-means
    training data); with flip TTA when `flip`; tick(n) after every batch of n images (progress)."""
    vectors = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()  # (B, 3, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)  # (B, D, h, w)
            vectors.append(codes.float().permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).cpu())
            if tick is not None:
                tick(images.shape[0])
    if not vectors:
        raise ValueError("collect_codes: the loader gave no images")
    return torch.cat(vectors)  # (N, D)


def evaluate(code_fn, score_fn, loader, n_classes, probes, device="cpu", use_crf=True, flip=True, scale=2.0,
             crf_kwargs=None, keep=0, tick=None):
    """Score every probe on one labelled split, before and after the dense CRF.

    code_fn(images (B, 3, H, W) in [0, 1]) -> codes (B, D, h, w); score_fn(images, codes, centres, size)
    -> the model's scores (B, K, H', W') (il2vseg.make_score_fn). loader: batches {"image", "label"
    (B, H, W), void -1, "name" (optional)}. probes: name -> centres (K, D). The codes of a batch are
    computed once (flip TTA when `flip`) and shared by all probes. keep: how many images to keep (CPU
    copies with each probe's predictions) for pictures. tick(n) after every batch of n images (progress).
    Returns {"probes": {name: {"before_crf": scores, "after_crf": scores or None, "raw_confusion_before",
    "raw_confusion_after"}}, "n_images": int, "kept": [(name, image, label, {probe: (pred, pred_crf)})]}.
    needs: flip_tta, cluster_probs, confusion_matrix, refine_with_crf, scores
    """
    confusion = {name: [torch.zeros(n_classes, c.shape[0], dtype=torch.int64, device=device) for _ in range(2)]
                 for name, c in probes.items()}
    kept, seen = [], 0
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()                                  # (B, 3, H, W)
            labels = batch["label"].to(device).long()                                   # (B, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)              # (B, D, h, w)
            outputs = {}
            for name, centres in probes.items():
                probs = cluster_probs(score_fn, images, codes, centres, labels.shape[-2:], scale)  # (B, K, H, W)
                pred = probs.argmax(dim=1)                                              # (B, H, W)
                confusion[name][0] += confusion_matrix(pred, labels, centres.shape[0], n_classes)
                pred_crf = None
                if use_crf:
                    pred_crf = refine_with_crf(images, probs, crf_kwargs).argmax(dim=1)  # (B, H, W)
                    confusion[name][1] += confusion_matrix(pred_crf, labels, centres.shape[0], n_classes)
                outputs[name] = (pred, pred_crf)
            names = batch.get("name") or [f"{seen + i:05d}" for i in range(images.shape[0])]
            for i in range(min(images.shape[0], keep - len(kept))):
                image = F.interpolate(images[i:i + 1], size=labels.shape[-2:], mode="bilinear", align_corners=False)[0]
                kept.append((str(names[i]), image.cpu(), labels[i].cpu(),
                             {n: (p[i].cpu(), None if c is None else c[i].cpu()) for n, (p, c) in outputs.items()}))
            seen += images.shape[0]
            if tick is not None:
                tick(images.shape[0])
    return {
        "probes": {name: {"before_crf": scores(before), "after_crf": scores(after) if use_crf else None,
                          "clusters_used": int((before.sum(dim=0) > 0).sum()),  # of K, on the labelled pixels
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


def run_protocol(code_fn, score_fn, global_centres, datasets, cfg, device="cpu", log=print, training=None):
    """The default protocol (module docstring) with the command line's settings; returns evaluate()'s
    result (None for a split without labels) and writes OUT/metrics.json and OUT/side_by_side/ (OUT:
    cfg.eval_out when cli.output_folder set it).

    code_fn, score_fn: see evaluate. datasets: (train, val, fit) as cli.build_datasets gives them: k-means is
    fit on the codes of `fit` (training images in evaluation geometry), or of `val` with --kmeans-fit val.
    cfg: probe, kmeans_fit, kmeans_restarts, kmeans_seeds, seed, flip_tta, no_crf, eval_batch_size,
    num_workers, save_images, out (and names for the log). --kmeans-seeds S > 1 adds probes
    "kmeans seed N" and their spread (in metrics.json; the table shows "kmeans" and "centres"). training: the
    training run's summary, kept in metrics.json."""
    _, val_set, fit_set = datasets
    if val_set is None or not val_set.has_labels:
        log(f"evaluation skipped: {'no' if val_set is None else 'the'} {cfg.val_split} split "
            f"{'' if val_set is None else 'has no labels '}(use --predict FOLDER to see the segmentation)")
        return None
    n_classes = val_set.n_classes

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False,
                                           num_workers=cfg.num_workers)

    probes = {}
    if cfg.probe in ("kmeans", "both"):
        fit_split = cfg.val_split if cfg.kmeans_fit == "val" else cfg.train_split
        fit_on = val_set if cfg.kmeans_fit == "val" else fit_set
        ticker = results.Ticker(f"evaluation: codes of the {fit_split} split for k-means", len(fit_on), log)
        vectors = collect_codes(code_fn, loader(fit_on), device, flip=cfg.flip_tta, tick=ticker.tick).to(device)  # (N, D)
        ticker = results.Ticker(f"evaluation: k-means on {len(vectors)} codes", 10 * cfg.kmeans_restarts
                                * cfg.kmeans_seeds, log, unit="passes")
        for s in range(cfg.kmeans_seeds):
            centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed + s, n_init=cfg.kmeans_restarts,
                                             tick=ticker.tick)
            probes["kmeans" if s == 0 else f"kmeans seed {cfg.seed + s}"] = centres
            log(f"k-means (seed {cfg.seed + s}, best of {cfg.kmeans_restarts}) on {len(vectors)} codes of the "
                f"{fit_split} split: loss {loss:.4f}")
        del vectors
    if cfg.probe in ("centres", "both"):
        probes["centres"] = global_centres
    ticker = results.Ticker(f"evaluation: {' and '.join(probes)} on the {cfg.val_split} split"
                            + ("" if cfg.no_crf else ", with the CRF"), len(val_set), log)
    result = evaluate(code_fn, score_fn, loader(val_set), n_classes, probes, device, use_crf=not cfg.no_crf,
                      flip=cfg.flip_tta, keep=cfg.save_images, tick=ticker.tick)
    seeds = [name for name in result["probes"] if name.startswith("kmeans")]
    if len(seeds) > 1:
        result["spread"] = spread(result, seeds)
        log(results.format_spread(result["spread"], len(seeds)))
    main_probes = ("kmeans", "centres")
    shown = {"probes": {k: v for k, v in result["probes"].items() if k in main_probes},
             "kept": [(name, image, label, {k: v for k, v in out.items() if k in main_probes})
                      for name, image, label, out in result["kept"]]}
    log(results.format_table(shown, val_set.class_names))
    for line in results.table_notes(shown["probes"], cfg.eval_alpha):
        log(line)
    settings = {key: getattr(cfg, key, None) for key in ("data", "arch", "val_split", "probe", "kmeans_fit",
                                                         "probe_images", "kmeans_restarts", "kmeans_seeds", "seed",
                                                         "eval_alpha", "eval_align", "flip_tta", "no_crf", "eval_crop")}
    settings["n_fit_images"] = len(val_set if cfg.kmeans_fit == "val" else fit_set) if "kmeans" in probes else 0
    out = getattr(cfg, "eval_out", None) or cfg.out  # cli.output_folder: beside an earlier run's results
    made = results.provenance(cfg, getattr(cfg, "checkpoint_step", None))
    path = results.write_metrics(out, {**result, "training": training} if training else result, settings, made)
    pictures = results.save_pictures(out, shown, val_set.class_names)
    if pictures:
        results.write_provenance(pictures[0].parent, made)
    if "warning" in made:
        log(made["warning"])
    log(f"wrote {path}" + (f" and {len(pictures)} pictures in {pictures[0].parent}" if pictures else ""))
    return result


def refine_with_crf(images, probs, crf_kwargs=None):
    """crf.dense_crf on images (B, 3, H, W) in [0, 1] (resized to the probabilities' size) -> refined
    probabilities (B, K, H, W)."""
    if images.shape[-2:] != probs.shape[-2:]:
        images = F.interpolate(images, size=probs.shape[-2:], mode="bilinear", align_corners=False)
    return crf.dense_crf(images.clamp(0, 1) * 255.0, probs, **(crf_kwargs or {}))  # (B, K, H, W)


def predict_folder(code_fn, score_fn, loader, centres, out_dir, device="cpu", matching=None, use_crf=True,
                   flip=True, scale=2.0, crf_kwargs=None, tick=None):
    """Segment images without labels (`--predict FOLDER`): NAME_mask.png (colours), NAME_overlay.png and
    NAME_ids.png (the cluster id of every pixel, uint8; uint16 above 255) per image, at the input's own size when the batch
    gives it ("size" (B, 2), as data.PredictFolder does); the scores are upsampled bilinearly to it.

    code_fn, score_fn: see evaluate. loader: batches {"image": (B, 3, H, W) in [0, 1], "name": unique output
    names}; centres (K, D), e.g. the global centres; matching (K,) cluster -> class for class colours (raw
    cluster ids otherwise). tick(n) after every batch of n images. Returns the written paths.
    needs: flip_tta, cluster_probs, refine_with_crf
    """
    lut = None if matching is None else torch.as_tensor(matching, dtype=torch.long)    # (K,)
    paths = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device).float()                                  # (B, 3, H, W)
            codes = flip_tta(code_fn, images) if flip else code_fn(images)              # (B, D, h, w)
            probs = cluster_probs(score_fn, images, codes, centres, images.shape[-2:], scale)  # (B, K, H, W)
            if use_crf:
                probs = refine_with_crf(images, probs, crf_kwargs)
            if "size" in batch:  # the input's own size (all images of a batch share it)
                size = tuple(int(v) for v in batch["size"][0])
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)  # (B, K, H0, W0)
                images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # (B, 3, H0, W0)
            pred = probs.argmax(dim=1).cpu()                                            # (B, H0, W0)
            if lut is not None:
                pred = lut[pred]
            for i in range(images.shape[0]):
                paths.extend(results.save_mask_and_overlay(out_dir, batch["name"][i], images[i].cpu(), pred[i],
                                                           caption="prediction (global centres" + (" + CRF)" if use_crf else ")"),
                                                           what="cluster" if lut is None else "class"))
                paths.append(results.save_class_ids(Path(out_dir) / f"{results.safe_stem(batch['name'][i])}_ids.png",
                                                    pred[i]))
            if tick is not None:
                tick(images.shape[0])
    return paths


def main(argv=None):
    """`python evaluate.py CHECKPOINT [il2vseg options]` = `python il2vseg.py --eval --checkpoint CHECKPOINT
    [il2vseg options]`, run in this process's place (os.execv). CHECKPOINT may stand anywhere among the
    options; a second checkpoint (--checkpoint) or a conflicting flag is one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__.strip() + "\nSee `python il2vseg.py --help` for the options.")
        return 0 if argv else 2
    import cli  # the command line's parser (not the training script): which argument is CHECKPOINT
    cfg = cli.parse_args([cli.EVALUATE_PY, *argv])
    try:
        cli.check_conflicts(cfg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    checkpoint, index = cfg.checkpoint_given[0], cfg.checkpoint_index
    if not Path(checkpoint).is_file():  # named as typed: il2vseg.py would speak of --checkpoint
        print(f"error: {checkpoint}: no such checkpoint (evaluate.py CHECKPOINT: train first, or give the "
              f"path of one)", file=sys.stderr)
        return 1
    script = Path(__file__).resolve().with_name("il2vseg.py")
    command = [sys.executable, str(script), "--eval", "--checkpoint", checkpoint, *argv[:index], *argv[index + 1:]]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
