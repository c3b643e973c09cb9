"""Which pairs of images the correspondence loss compares, and at which shifts the pair losses act.

Two things the paper leaves to its bases, SmooSeg and STEGO, both measured from the frozen backbone:

1. STEGO's nearest-neighbour positive: every training image is paired with one of its k nearest
   training images by the cosine of their descriptors (the spatial mean of F^p, L2-normalised), drawn
   anew at every step. `image_descriptors`, `nearest_neighbours` (blocked: no N x N matrix), and
   `neighbours_for_run` (computed once, cached beside the run as OUT/neighbours.pt).
2. The shifts b of SmooSeg's smoothness loss and STEGO's correspondence terms. A pair (i, j) with
   feature similarity F_ij > b is pulled together, any other pushed apart, so b decides how many pairs
   attract. The peers tuned b by hand for DINO on their data sets; for any other backbone or data set
   `calibrate` measures F for every pairing and proposes b by ONE rule (label-free):

       b_t = the (1 - p_t) quantile of the similarities F_t of pairing t, where p_t is the share of
       pairs of that pairing whose frozen features fall into the same of K k-means clusters;

   i.e. a term pulls together as many of its pairs as the backbone's own clusters say belong together
   (STEGO's advice for new data sets: the pairs a term attracts should look like pairs with the same
   label). The pairings: SmooSeg's fd of an image with itself ("close") and with another image ("far");
   STEGO's F of an image with itself ("pos_intra"), its nearest neighbour ("pos_inter"), its jittered
   copy Ĩ ("aug") and other images ("neg_inter"). It writes OUT/calibration.json and a PNG of the six
   histograms with their quantiles, the proposal and the published shifts.
"""
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import backbones
import checkpoints
import data
import evaluate
import losses
import pictures
import results

# --------------------------------------------------------------------------------------------
# 1. STEGO's nearest-neighbour images
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def image_descriptors(backbone, loader, device, log=print):
    """STEGO's image descriptor, F^p averaged over the image and L2-normalised: (N, C1) on the CPU."""
    descriptors, seen, started, said = [], 0, time.time(), time.time()
    for batch in loader:
        feats = backbones.features(backbone, batch["image"].to(device))                  # (B, C1, h, w)
        descriptors.append(F.normalize(feats.mean(dim=(2, 3)), dim=1).cpu())             # (B, C1)
        seen += feats.shape[0]
        if time.time() - said > 10:
            rate = seen / (time.time() - started)
            log(f"nearest neighbours: {seen}/{len(loader.dataset)} image descriptors, "
                f"{(len(loader.dataset) - seen) / rate:.0f} s left")
            said = time.time()
    return torch.cat(descriptors)


def nearest_neighbours(descriptors, k, block=1024):
    """The k nearest other images of every image by cosine, (N, k) long, nearest first: one block of
    rows at a time (memory block x N, never N x N). descriptors (N, C) unit rows."""
    neighbours = []
    for start in range(0, descriptors.shape[0], block):
        similarity = descriptors[start:start + block] @ descriptors.T                    # (b, N)
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -math.inf                                       # not the image itself
        neighbours.append(similarity.topk(k, dim=1).indices)                             # (b, k)
    return torch.cat(neighbours)


def neighbours_for_run(cfg, backbone, dataset, device, log=print):
    """The --knn nearest neighbours of every item of the training set (its items in evaluation geometry:
    resize and centre crop), from OUT/neighbours.pt when that was made for the same data, backbone and
    geometry, else computed (with a progress line) and saved there atomically."""
    key = {name: getattr(cfg, name) for name in ("data", "data_root", "train_split", "arch", "weights", "seed",
                                                 "crop", "five_crop", "resize", "knn")}
    key["items"] = len(dataset)
    path = Path(cfg.out) / "neighbours.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                log(f"nearest neighbours: {path}")
                return cached["neighbours"]
        except Exception:  # noqa: BLE001 - a broken cache is computed again
            pass
    centred = copy.copy(dataset)
    centred.random_crop = False                                   # --train-crop random: the centre crop here
    loader = torch.utils.data.DataLoader(centred, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    log(f"nearest neighbours: the {cfg.knn} nearest of each of {len(dataset)} training images (STEGO's kNN positive)")
    neighbours = nearest_neighbours(image_descriptors(backbone, loader, device, log), cfg.knn)
    checkpoints.save_atomic({"key": key, "neighbours": neighbours}, path)
    return neighbours


def partner_of(neighbours, seed, step, index):
    """The nearest-neighbour image an item is paired with at a step: one of its k, drawn from (seed, step,
    index) alone (STEGO draws from its 7 nearest at every step), so a resumed run draws the same."""
    choice = np.random.default_rng([seed, step, index]).integers(neighbours.shape[1])
    return int(neighbours[index, choice])


# --------------------------------------------------------------------------------------------
# 2. Shifts measured from the backbone: the similarity of every pairing, and the rule
# --------------------------------------------------------------------------------------------

PAIRINGS = {  # pairing -> (loss, what it compares)
    "close": ("SmooSeg b_close", "an image with itself, all pairs"),
    "far": ("SmooSeg b_far", "an image with another image, all pairs"),
    "pos_intra": ("STEGO pos_intra", "an image with itself, 11 x 11 points"),
    "pos_inter": ("STEGO pos_inter", "an image with a nearest-neighbour image"),
    "aug": ("IL2Vseg aug", "an image with its jittered copy I~"),
    "neg_inter": ("STEGO neg_inter", "an image with other images"),
}


def proposed_shift(similarity, same_cluster):
    """The rule: the (1 - p) quantile of a pairing's similarities, p = the share of its pairs in the same
    k-means cluster. similarity, same_cluster: flat arrays over the same pairs."""
    return float(np.quantile(similarity, 1.0 - same_cluster.mean()))


@torch.no_grad()
def measure_pairings(backbone, dataset, neighbours, n_images, n_clusters, device, seed=0, batch_size=8,
                     n_points=11, per_image=4096, log=print):
    """Similarities and same-cluster indicators of every pairing (PAIRINGS) on n_images training images.

    SmooSeg's fd (all pairs of the grid, `per_image` of them drawn per image) and STEGO's F (n x n random
    points, as in training) come from losses.feature_affinity; the clusters are cosine k-means with K =
    n_clusters on the frozen features of the same images (no label). Returns {pairing: (F, same) arrays}.
    """
    generator = torch.Generator().manual_seed(seed)
    items = data.evenly_spaced(list(range(len(dataset))), n_images)
    feats_of = {}

    def features(indices):
        images = torch.stack([dataset[i]["image"] for i in indices]).to(device)
        return images, backbones.features(backbone, images)                               # (B, C1, h, w)

    batches = []
    ticker = results.Ticker("calibration: backbone features", len(items), log)
    for start in range(0, len(items), batch_size):
        indices = items[start:start + batch_size]
        images, feats = features(indices)
        augmented = data.photometric_augment(images, generator=generator)
        partners = [int(neighbours[i, torch.randint(neighbours.shape[1], (), generator=generator)])
                    for i in indices] if neighbours is not None else indices
        batches.append((feats.cpu(), backbones.features(backbone, augmented).cpu(), features(partners)[1].cpu()))
        feats_of.update(zip(indices, feats.cpu()))
        ticker.tick(len(indices))
    every = torch.cat([b[0] for b in batches])                                            # (N, C1, h, w)
    vectors = every.permute(0, 2, 3, 1).reshape(-1, every.shape[1])                       # (N h w, C1)
    centres, _, _ = evaluate.kmeans_cosine(vectors, n_clusters, seed=seed, n_init=3)
    cluster = lambda f: (F.normalize(f, dim=1).permute(0, 2, 3, 1) @ centres.T).argmax(-1).flatten(1)  # noqa: E731

    pairs = {name: ([], []) for name in PAIRINGS}

    def add(name, affinity, labels_a, labels_b, limit=None):
        values = affinity.flatten(1)                                                       # (B, Na Nb)
        same = (labels_a[:, :, None] == labels_b[:, None, :]).flatten(1)
        if limit is not None and values.shape[1] > limit:
            keep = torch.randint(values.shape[1], (limit,), generator=generator)
            values, same = values[:, keep], same[:, keep]
        pairs[name][0].append(values.flatten().numpy())
        pairs[name][1].append(same.flatten().numpy())

    for feats, feats_aug, feats_knn in batches:
        B = feats.shape[0]
        perm = losses.derangement(B, generator=generator) if B > 1 else torch.arange(B)
        labels = cluster(feats)                                                            # (B, h w)
        add("close", losses.feature_affinity(feats, feats), labels, labels, per_image)
        add("far", losses.feature_affinity(feats, feats[perm]), labels, labels[perm], per_image)
        coords1 = losses.random_coords(B, n_points, generator)
        coords2 = losses.random_coords(B, n_points, generator)
        points1 = losses.sample_points(feats, coords1)                                     # (B, C1, n, n)
        for name, other in (("pos_intra", None), ("pos_inter", feats_knn), ("aug", feats_aug), ("neg_inter", feats[perm])):
            points2 = points1 if other is None else losses.sample_points(other, coords2)
            add(name, losses.feature_affinity(points1, points2), cluster(points1), cluster(points2))
    return {name: (np.concatenate(values), np.concatenate(same)) for name, (values, same) in pairs.items()}


def calibrate(cfg, backbone, dataset, neighbours, device, log=print):
    """--calibrate (and --shifts auto): measure every pairing, propose every shift by the rule, write
    OUT/calibration.json and OUT/calibration.png, print the table; returns {pairing: proposed shift}."""
    n_images = min(cfg.calibrate_images, len(dataset))
    log(f"calibrating the shifts on {n_images} {cfg.train_split} images of {cfg.data} with {cfg.arch}")
    measured = measure_pairings(backbone, dataset, neighbours, n_images, dataset.n_classes, device, cfg.seed,
                                cfg.eval_batch_size, log=log)
    published = losses.loss_constants(cfg.data, cfg.arch)
    peers = {"close": published["smooseg_shifts"]["close"], "far": published["smooseg_shifts"]["far"],
             **{name: published["stego_shifts"][name] for name in ("pos_intra", "pos_inter", "aug", "neg_inter")}}
    exact = {name: published["published"]["smooseg" if name in ("close", "far") else "stego"] and name != "aug"
             for name in PAIRINGS}
    rows = {}
    for name, (values, same) in measured.items():
        quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
        rows[name] = {"loss": PAIRINGS[name][0], "pairs": PAIRINGS[name][1], "n": int(values.size),
                      "quantiles_5_25_50_75_95": [float(q) for q in quantiles], "same_cluster": float(same.mean()),
                      "proposed": proposed_shift(values, same), "peers": peers[name],
                      "peers_tuned_for_this": exact[name], "peers_attract": float((values > peers[name]).mean())}
    report = {"data": cfg.data, "arch": cfg.arch, "weights": cfg.weights or "torch.hub", "images": n_images,
              "clusters": dataset.n_classes, "rule": "b = quantile(F, 1 - share of pairs in the same k-means cluster)",
              "pairings": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints.write_text_atomic(out / "calibration.json", json.dumps(report, indent=2) + "\n")
    draw_histograms(measured, rows, out / "calibration.png", f"{cfg.data}, {cfg.arch}, {n_images} images")
    log(format_calibration(rows))
    log(f"calibration: {out / 'calibration.json'}, {out / 'calibration.png'}")
    return {name: row["proposed"] for name, row in rows.items()}


def format_calibration(rows):
    """The calibration as a table: the quantiles of each pairing's F, its same-cluster share, the
    proposed shift and the peers' one (with the share of pairs it would attract here)."""
    lines = [f"{'pairing':<10} {'loss':<16} {'5%':>6} {'25%':>6} {'50%':>6} {'75%':>6} {'95%':>6} "
             f"{'same':>6} {'proposed':>9} {'peers':>7} {'tuned here':>10} {'peers attract':>13}"]
    for name, row in rows.items():
        q = row["quantiles_5_25_50_75_95"]
        lines.append(f"{name:<10} {row['loss']:<16} " + " ".join(f"{v:+6.3f}" for v in q)
                     + f" {row['same_cluster']:6.1%} {row['proposed']:+9.3f} {row['peers']:+7.3f} "
                     f"{'yes' if row['peers_tuned_for_this'] else 'no':>10} {row['peers_attract']:13.1%}")
    return "\n".join(lines)


def draw_histograms(measured, rows, path, title, width=360, height=200):
    """One PNG: a histogram of every pairing's F over [-1, 1] (grey), its 5/25/50/75/95 % quantiles (ticks),
    the proposed shift (red) and the peers' shift (blue), each panel captioned."""
    font = ImageFont.load_default()
    columns, margin = 3, 28
    picture = Image.new("RGB", (columns * width, 30 + 2 * height), "white")
    pen = ImageDraw.Draw(picture)
    pen.text((8, 8), f"similarity F of each pairing ({title}); red: proposed shift, blue: the peers'", fill="black", font=font)
    x_of = lambda v, left: left + margin + (v + 1) / 2 * (width - 2 * margin)  # noqa: E731
    for n, (name, (values, _)) in enumerate(measured.items()):
        left, top = (n % columns) * width, 30 + (n // columns) * height
        counts, _ = np.histogram(values, bins=80, range=(-1, 1))
        base, scale = top + height - 30, (height - 60) / max(counts.max(), 1)
        for b, count in enumerate(counts):
            x0, x1 = x_of(-1 + b / 40, left), x_of(-1 + (b + 1) / 40, left)
            pen.rectangle([x0, base - count * scale, x1, base], fill=(170, 170, 170))
        pen.line([x_of(-1, left), base, x_of(1, left), base], fill="black")
        for tick in (-1, -0.5, 0, 0.5, 1):
            pen.text((x_of(tick, left) - 8, base + 4), f"{tick:g}", fill="black", font=font)
        for q in rows[name]["quantiles_5_25_50_75_95"]:
            pen.line([x_of(q, left), base, x_of(q, left), base - 8], fill="black", width=2)
        for value, colour in ((rows[name]["proposed"], (210, 30, 30)), (rows[name]["peers"], (30, 60, 210))):
            x = x_of(max(-1.0, min(1.0, value)), left)
            pen.line([x, top + 26, x, base], fill=colour, width=2)
        pen.text((left + margin, top + 6), f"{name}: {rows[name]['pairs']}", fill="black", font=font)
        pen.text((left + margin, top + 18), f"same cluster {rows[name]['same_cluster']:.1%}, proposed "
                 f"{rows[name]['proposed']:+.3f}, peers {rows[name]['peers']:+.3f}", fill="black", font=font)
    return pictures.save_png(path, np.asarray(picture))  # atomic, as every file written


def settle_shifts(cfg, backbone, dataset, neighbours, device, log=print):
    """The run's shifts by --shifts: "published" (the peers' table, loss_constants), "calibrate" (every
    shift by the rule), or "auto" (published where the peers tuned this data set and backbone, measured
    elsewhere; the jittered pair's shift is always measured). Sets cfg.shift_close, cfg.shift_far and
    cfg.corr_shifts; the checkpoint keeps them, so --resume reuses them."""
    constants = losses.loss_constants(cfg.data, cfg.arch)
    close, far = constants["smooseg_shifts"]["close"], constants["smooseg_shifts"]["far"]
    shifts = dict(constants["stego_shifts"])
    if cfg.shifts != "published":
        measured = calibrate(cfg, backbone, dataset, neighbours, device, log)
        if cfg.shifts == "calibrate" or not constants["published"]["smooseg"]:
            close, far = measured["close"], measured["far"]
        for name in ("pos_intra", "pos_inter", "neg_inter"):
            if cfg.shifts == "calibrate" or not constants["published"]["stego"]:
                shifts[name] = measured[name]
        shifts["aug"] = measured["aug"]
    cfg.shift_close, cfg.shift_far, cfg.corr_shifts = close, far, shifts
    log(f"shifts ({cfg.shifts}): SmooSeg close {close:+.3f} far {far:+.3f}; STEGO "
        + " ".join(f"{k} {v:+.3f}" for k, v in shifts.items()))
