"""The whole IL2Vseg pipeline on real CamVid frames with a frozen stand-in backbone (no download).

DINO weights cannot be downloaded everywhere, yet the low-level cue F^l (paper eqs 1-12) and its fusion
(eq 13) can only be judged next to a high-level feature map. This script trains the project's model
(il2vseg.train: head, centres, every loss of eq 15) on CamVid train and evaluates it on CamVid val with the
project's protocol pieces (evaluate.py: flip TTA, cosine k-means fit on TRAIN codes, global centres,
softmax(2 cos), dense CRF, Hungarian matching), on top of a frozen, label-free stand-in backbone:

  handcrafted  per 8x8 cell (stride 8, as ViT-S/8): mean colour in RGB, opponent and hue/saturation
               coordinates, the spread of luminance and opponent colour, oriented gradient energies
               at two scales, Laplacian energy, row/column position; the same (without position)
               averaged over 3x3 and 9x9 cells for context. Standardised with fixed statistics of 32
               train frames (no labels), then a FIXED seeded random projection to 384 channels + GELU.
  lda          (optional, LABEL LEAKAGE) the same features plus a 10-d LDA projection fitted on the
               TRAIN labels of the cells: a stand-in whose features know CamVid's classes.

What it prints (markdown) and writes (--out JSON):
  1. raw-feature baseline: k-means on the stand-in's features, no training;
  2. the alpha sweep of Figure 5 (training alpha 0 .. 1, per affinity reading of eqs 9-12), mean +- std
     over training seeds and k-means seeds, before / after the CRF, for both probes (k-means, centres);
  3. eq (13) at evaluation (--eval-alpha): il2vseg's ("keep-scale") beside the fusion as printed
     and other candidates, with soft, likelihood or hard cluster alignment, the sharpness of the unary fed to the CRF
     and how much the CRF changes.
Expensive parts are shared: frames are decoded once, the stand-in's eval features and F^l are cached,
one code pass feeds every probe, and one CRF lattice per batch of frames serves every probe and candidate unary.

    python scripts/camvid_pipeline.py [--root ../shared/data/camvid] [--out /tmp/camvid_pipeline.json]
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import backbones  # noqa: E402
import cli  # noqa: E402
import crf  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import fcm  # noqa: E402
import il2vseg  # noqa: E402
import pairs  # noqa: E402

K = 11  # CamVid's classes (void = id 11 is ignored by data.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data/camvid", help="CamVid (SegNet layout); relative to the repo root")
    p.add_argument("--out", default="/tmp/camvid_pipeline.json", help="raw numbers as JSON")
    p.add_argument("--standin", choices=["handcrafted", "lda"], default="handcrafted",
                   help="frozen stand-in backbone; lda fits on TRAIN labels (label leakage)")
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=160, help="training crop and evaluation centre crop (multiple of 8)")
    p.add_argument("--train-frames", type=int, default=367, help="CamVid train frames (evenly spaced)")
    p.add_argument("--fit-frames", type=int, default=60, help="train frames whose codes fit k-means (evenly spaced)")
    p.add_argument("--val-frames", type=int, default=48, help="CamVid val frames evaluated (evenly spaced)")
    p.add_argument("--eval-split", choices=["val", "train"], default="val",
                   help="where the scores come from: val, or (to CHOOSE an option without looking at val) --val-frames "
                        "train frames evenly spaced over those not in the k-means fit set (the head trains on all "
                        "train frames, without labels)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds")
    p.add_argument("--kmeans-seeds", type=int, default=3)
    p.add_argument("--kmeans-restarts", type=int, default=3, help="k-means runs per seed (lowest loss kept)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="training alphas of eq (13)")
    p.add_argument("--affinities", default="global,local", help="readings of eqs 9-12: global, local, none")
    p.add_argument("--radius", type=int, default=1, help="window radius of --affinity local, grid cells (1 at crop 160: a 3x3 "
                   "window of the 20x20 grid, eq (5)'s neighbourhood; il2vseg's default is 3 on its 40x40 grid)")
    p.add_argument("--fcm-sigma", type=float, default=0.1, help="sigma of eq (10)")
    p.add_argument("--fusion-in", choices=["fs", "all"], default="fs", help="where F^f is used in training (il2vseg's "
                   "--fusion-in)")
    p.add_argument("--fl-scale", choices=["printed", "range"], default="printed",
                   help="F^l in eq (13) as printed ([0, 1]) or mapped onto the cosines' range (2 F^l - 1)")
    p.add_argument("--align", choices=["hard", "soft"], default="soft",
                   help="eq (13)'s cluster correspondence in TRAINING (il2vseg's --align): soft many-to-one map or "
                        "Hungarian permutation")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA momentum of the global centres (default 0.998 ** (3000 / steps): the paper's total decay)")
    p.add_argument("--eval-alpha", type=float, default=0.5, help="alpha of the eval-time fusion study")
    p.add_argument("--study-alphas", default="", help="training alphas whose models get the eval-time fusion study")
    p.add_argument("--candidates", default="printed+hard,printed+soft,keep-scale+hard,keep-scale+soft,poe+soft",
                   help="eval-time fusions compared, KIND+ALIGN: printed (softmax(2 F^f), the fusion as printed), "
                        "keep-scale (il2vseg.fuse keep_scale), poe, mix, crf-first; ALIGN soft, likelihood or hard "
                        "(il2vseg.align_clusters); a suffix @A gives the candidate its own eval alpha (default --eval-alpha)")
    p.add_argument("--knn", type=int, default=7, help="il2vseg's --knn (STEGO's nearest-neighbour term; 0: off)")
    p.add_argument("--no-aug", action="store_true", help="il2vseg's --no-aug (no I, I~ term)")
    p.add_argument("--shifts", choices=["auto", "published", "calibrate"], default="auto",
                   help="il2vseg's --shifts; the calibration is measured once, on seed 0's training set")
    p.add_argument("--fs-reading", choices=["laplacian", "correlation"], default="laplacian", help="il2vseg's --fs-reading")
    p.add_argument("--five-crop", action=argparse.BooleanOptionalAction, default=True, help="il2vseg's --five-crop")
    p.add_argument("--train-crop", choices=["centre", "random"], default="centre", help="il2vseg's --train-crop")
    p.add_argument("--resize", choices=["nearest", "bilinear"], default="nearest", help="il2vseg's --resize")
    p.add_argument("--beta", type=float, default=0.05, help="il2vseg's --beta")
    for term in ("smo", "fs", "reg", "corr"):
        p.add_argument(f"--no-{term}", dest=f"use_{term}", action="store_false", help=f"il2vseg's --no-{term}")
    p.add_argument("--lr-head", type=float, default=1e-4, help="il2vseg's --lr-head")
    p.add_argument("--lr-centres", type=float, default=5e-4, help="il2vseg's --lr-centres")
    p.add_argument("--gamma", type=float, default=0.1, help="il2vseg's --gamma")
    p.add_argument("--grad-every", type=int, default=20, help="record each term's gradient on the head every N steps")
    p.add_argument("--calibrate-images", type=int, default=256, help="il2vseg's --calibrate-images")
    p.add_argument("--no-crf", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="training runs in parallel (forked processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: no thread thrashing "
                   "when the cores are shared)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The stand-in backbone: hand-crafted colour / texture / position features at stride 8
# ----------------------------------------------------------------------------------------------

def cell_features(rgb, cell=8):
    """rgb (B, 3, H, W) in [0, 1] -> raw hand-crafted features (B, 62, H/cell, W/cell)."""
    B, _, H, W = rgb.shape
    r, g, b = rgb.unbind(1)
    lum = 0.299 * r + 0.587 * g + 0.114 * b  # (B, H, W)
    o1, o2 = (r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6)  # opponent colours
    hue, sat, val = data.rgb_to_hsv(rgb).unbind(1)
    hs = [sat * torch.cos(2 * math.pi * hue), sat * torch.sin(2 * math.pi * hue), val]  # hue as a vector
    colour = torch.stack([r, g, b, o1, o2, lum] + hs, 1)  # (B, 9, H, W)
    pool = lambda x: F.avg_pool2d(x, cell)  # noqa: E731
    means = pool(colour)  # (B, 9, h, w)
    spread = (pool(torch.stack([lum, o1, o2], 1) ** 2) - means[:, [5, 3, 4]] ** 2).clamp_min(0).sqrt()  # (B, 3, h, w)

    def oriented(x, c):  # mean |gradient| along 0, 90, 45, 135 degrees and |Laplacian| per cell of c pixels
        x = x[:, None]
        sobel = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]) / 8
        gx = F.conv2d(F.pad(x, (1,) * 4, mode="replicate"), sobel.view(1, 1, 3, 3))
        gy = F.conv2d(F.pad(x, (1,) * 4, mode="replicate"), sobel.t().reshape(1, 1, 3, 3))
        lap = x - F.avg_pool2d(F.pad(x, (1,) * 4, mode="replicate"), 3, 1)
        e = torch.cat([gx.abs(), gy.abs(), (gx + gy).abs() / math.sqrt(2), (gx - gy).abs() / math.sqrt(2), lap.abs()], 1)
        return F.avg_pool2d(e, c)
    texture = torch.cat([oriented(lum, cell), oriented(F.avg_pool2d(lum[:, None], 2)[:, 0], cell // 2)], 1)  # (B, 10, h, w)
    local = torch.cat([means, spread, texture], 1)  # (B, 22, h, w)
    h, w = local.shape[2:]
    rows = torch.linspace(0, 1, h).view(1, 1, h, 1).expand(B, 1, h, w)
    cols = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(B, 1, h, w)
    context = [F.avg_pool2d(local, k, 1, k // 2, count_include_pad=False) for k in (3, 9)]  # 3x3 and 9x9 cells
    return torch.cat([local, rows, cols] + context, 1)  # (B, 22 + 2 + 44 = 68, h, w)


class StandIn(nn.Module):
    """A frozen backbone in backbones.py's sense (.dim, .stride, forward(ImageNet-normalised images)).

    features = GELU(W [standardised cell features (, LDA projection)] + b), W and b fixed, seeded."""

    def __init__(self, fit_images, dim=384, seed=0, lda=None):
        super().__init__()
        self.dim, self.stride = dim, 8
        raw = cell_features(fit_images)  # (N, F, h, w) of label-free train frames
        self.register_buffer("mean", raw.mean(dim=(0, 2, 3)).view(1, -1, 1, 1))
        self.register_buffer("std", raw.std(dim=(0, 2, 3)).clamp_min(1e-6).view(1, -1, 1, 1))
        self.register_buffer("lda", torch.zeros(raw.shape[1], 0) if lda is None else lda)  # (F, L)
        n_in = raw.shape[1] + self.lda.shape[1]
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(dim, n_in, generator=g) / math.sqrt(n_in))  # fixed projection
        self.register_buffer("bias", 0.5 * torch.randn(dim, generator=g))

    def standardised(self, rgb):
        return (cell_features(rgb) - self.mean) / self.std  # (B, F, h, w)

    def forward(self, images):  # ImageNet-normalised (B, 3, H, W) -> (B, dim, H/8, W/8)
        mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
        f = self.standardised((images * std + mean).clamp(0, 1))
        if self.lda.shape[1]:
            f = torch.cat([f, torch.einsum("bfhw,fl->blhw", f, self.lda)], 1)
        return F.gelu(torch.einsum("bfhw,df->bdhw", f, self.weight) + self.bias.view(1, -1, 1, 1))


def fit_lda(standin, images, labels, gain=2.0):
    """LABEL LEAKAGE: LDA (K - 1 directions) of the standardised cell features, from train labels.
    Cells whose 8x8 block is >= 75% one class count. Returns (F, K - 1), each direction of unit variance x gain."""
    f = standin.standardised(images).permute(0, 2, 3, 1).reshape(-1, standin.mean.shape[1]).double()
    onehot = F.one_hot(labels.clamp_min(0), K).permute(0, 3, 1, 2).float() * (labels >= 0)[:, None]
    frac, cls = F.avg_pool2d(onehot, 8).max(dim=1)
    keep = (frac.flatten() >= 0.75)
    f, y = f[keep], cls.flatten()[keep]
    mu = f.mean(0)
    sw, sb = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64), torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
    for c in y.unique():
        fc = f[y == c]
        sw += (fc - fc.mean(0)).T @ (fc - fc.mean(0))
        sb += len(fc) * torch.outer(fc.mean(0) - mu, fc.mean(0) - mu)
    sw += 1e-3 * torch.trace(sw) / len(sw) * torch.eye(len(sw), dtype=torch.float64)
    _, vectors = scipy.linalg.eigh(sb.numpy(), sw.numpy())  # ascending generalised eigenvalues
    v = torch.from_numpy(vectors[:, ::-1][:, :K - 1].copy())
    return (gain * v / (f @ v).std(0)).float()


# ----------------------------------------------------------------------------------------------
# Data: frames decoded and resized once
# ----------------------------------------------------------------------------------------------

def eval_frames(root, split, crop, length, exclude=(), interpolation="nearest"):
    """The project's eval geometry (short side -> crop, centre crop): images (N, 3, c, c), labels (N, c, c) of
    `length` frames evenly spaced over the split's frames whose names are not in `exclude`."""
    ds = data.build_dataset("camvid", root, split, mode="eval", crop_size=crop, interpolation=interpolation)
    ds.samples = data.evenly_spaced([s for s in ds.samples if s["name"] not in set(exclude)], length)
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
            [s["name"] for s in ds.samples])


class Precomputed(torch.utils.data.Dataset):
    """A training set whose items do not depend on the epoch (five-crop + resize + centre crop, the peers'
    recipe), built once and served from memory: what data.py gives, without decoding every frame again."""

    def __init__(self, dataset):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.n_classes, self.class_names, self.random_crop = dataset.n_classes, dataset.class_names, False
        self.samples = dataset.samples  # the file list (data.files_fingerprint)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return dict(self.items[index])

    def set_epoch(self, epoch):
        pass


def cached_train_set(args, seed):
    """data.py's training set in il2vseg's geometry flags. --train-crop centre: every item precomputed once
    (shared between seeds); random: frames decoded and resized once, the random crop + flip drawn per
    (seed, epoch, index) by data.py."""
    ds = data.build_dataset("camvid", args.root, "train", mode="train", crop_size=args.crop, length=args.train_frames,
                            seed=seed, five_crop=args.five_crop, train_crop=args.train_crop, interpolation=args.resize)
    cache = cached_train_set.cache
    if args.train_crop == "centre":
        if "centre" not in cache:
            cache["centre"] = Precomputed(ds)
        return cache["centre"]
    if args.five_crop:
        raise SystemExit("--train-crop random is cached here without --five-crop only: add --no-five-crop")
    for s in ds.samples:
        if (s["name"], args.crop) not in cache:
            cache[(s["name"], args.crop)] = data.resize_short_side(*ds.load(s), args.crop, args.resize)
    ds.load = lambda sample: cache[(sample["name"], args.crop)]
    ds.resize = 0  # already resized
    return ds


cached_train_set.cache = {}


# ----------------------------------------------------------------------------------------------
# Training: il2vseg.train as it is (eq 13 optionally with F^l mapped onto the cosines' range)
# ----------------------------------------------------------------------------------------------

PROJECT_FUSE = il2vseg.fuse


def range_fuse(f_seg, f_low, alpha=0.5, keep_scale=False):
    """A study variant of eq (13), not an option of il2vseg: F^l (aligned) mapped from [0, 1] onto the
    cosines' [-1, 1], (1 - a) F^seg + a (2 F^l - 1)."""
    return PROJECT_FUSE(f_seg, 2 * f_low - 1, alpha, keep_scale)


def run_settings(args, seed, alpha, affinity, workdir):
    """il2vseg's settings for one run of this script (the peers' loss constants filled by resolve_defaults)."""
    cfg = cli.parse_args(["--data", "camvid", "--arch", "vits8"])
    cli.resolve_defaults(cfg, torch.device("cpu"))
    ema = args.ema if args.ema is not None else 0.998 ** (3000 / args.steps)  # as much decay as 3000 steps at 0.998
    vars(cfg).update(ema=ema, steps=args.steps, batch_size=args.batch_size, crop=args.crop, eval_crop=args.crop, seed=seed,
                     alpha=alpha, affinity=affinity, radius=args.radius, fcm_sigma=args.fcm_sigma,
                     fusion_in=args.fusion_in, align=args.align, out=str(workdir / f"run_{seed}_{affinity}_{alpha}"),
                     save_every=args.steps, log_every=args.grad_every, num_workers=0, resume=None, verbose=True,
                     knn=args.knn, use_aug=not args.no_aug, shifts=args.shifts, fs_reading=args.fs_reading,
                     five_crop=args.five_crop, train_crop=args.train_crop, resize=args.resize, beta=args.beta,
                     gamma=args.gamma, data_root=args.root, calibrate_images=args.calibrate_images,
                     use_smo=args.use_smo, use_fs=args.use_fs, use_reg=args.use_reg, use_corr=args.use_corr,
                     lr_head=args.lr_head, lr_centres=args.lr_centres)
    return cfg


def train_model(args, backbone, seed, alpha, affinity, workdir):
    cfg = run_settings(args, seed, alpha, affinity, workdir)
    train_set = cached_train_set(args, seed)
    model = il2vseg.build_model(cfg, backbone, K, torch.device("cpu"))
    il2vseg.fuse = range_fuse if args.fl_scale == "range" else PROJECT_FUSE  # read by il2vseg.loss_terms
    try:
        history = il2vseg.train(backbone, model, train_set, cfg, torch.device("cpu"), log=lambda *a: None)
    finally:
        il2vseg.fuse = PROJECT_FUSE
    model.eval()
    grads = [h["grad"] for h in history if "grad" in h]
    return model, {"last": {k: v for k, v in history[-1].items() if k != "grad"}, "grads": grads,
                   "shifts": {"close": cfg.shift_close, "far": cfg.shift_far, **cfg.corr_shifts},
                   "collapsed_steps": sum(il2vseg.collapsed_batch(h, K) for h in history)}


# ----------------------------------------------------------------------------------------------
# Eval-time fusion (eq 13 on the prediction): the printed one and the candidate fixes
# ----------------------------------------------------------------------------------------------

def parse_candidate(candidate, alpha):
    """KIND+ALIGN[@ALPHA] -> (kind, align, eval alpha: ALPHA or `alpha`); a malformed one exits with one line."""
    kind, _, rest = candidate.partition("+")
    how, _, at = rest.partition("@")
    try:
        a = float(at) if at else alpha
    except ValueError:
        raise SystemExit(f"--candidates {candidate}: {at!r} is not a number") from None
    if kind not in ("printed", "keep-scale", "poe", "mix", "crf-first") or how not in ("soft", "likelihood", "hard"):
        raise SystemExit(f"--candidates {candidate}: not KIND+ALIGN[@ALPHA] with KIND printed, keep-scale, poe, mix "
                         f"or crf-first and ALIGN soft, likelihood or hard")
    if not (0 < a < 1 if kind in ("keep-scale", "crf-first") else 0 < a <= 1):
        raise SystemExit(f"--candidates {candidate}: eval alpha {a} must lie in (0, 1) for {kind}, in (0, 1] otherwise")
    return kind, how, a


def fused_unary(kind, codes, centres, size, low, alpha, scale=2.0):
    """Cluster probabilities (B, K, H, W) fed to the CRF. low = F^l aligned to the probe's clusters.
      none        softmax(2 cos)                                   no fusion (the protocol's default)
      printed     softmax(2 F^f) = softmax((1-a) 2cos + a 2 F^l)   eq (13) on the scores, softmax as printed
      keep-scale  il2vseg's: softmax(2 F^f / (1-a)) = softmax(2cos + a/(1-a) 2 F^l) (fuse keep_scale), the same
                  argmax as printed, but the high-level scores keep their scale (the CRF sees unfused sharpness)
      poe         softmax((1-a) log p + a log F^l): product of experts, geometric mean of the two maps
      mix         (1-a) p + a F^l: mixture of the two probability maps
      crf-first   before the CRF as keep-scale; after: the CRF refines softmax(2 cos) alone, then eq (13) adds F^l
                  to its log marginals with keep-scale's weight (the CRF never sees F^l)"""
    upsample = lambda t: F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False)  # noqa: E731
    cos = il2vseg.cosine_to_centres(upsample(codes), centres)  # eq (2) at the label size (B, K, H, W)
    if kind == "none":
        return torch.softmax(scale * cos, dim=1)
    low = upsample(low)
    if kind in ("keep-scale", "crf-first"):
        return torch.softmax(scale * il2vseg.fuse(cos, low, alpha, keep_scale=True), dim=1)
    log_p = torch.log_softmax(scale * cos, dim=1)  # (B, K, H, W)
    if kind == "printed":
        return torch.softmax((1 - alpha) * log_p + alpha * scale * low, dim=1)
    if kind == "poe":
        return torch.softmax((1 - alpha) * log_p + alpha * low.clamp_min(1e-6).log(), dim=1)
    if kind == "mix":
        mixed = (1 - alpha) * log_p.exp() + alpha * low
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-12)  # F^l need not sum to 1 (likelihood)
    raise ValueError(kind)


def crf_kernels(images):
    """The CRF's two kernels (crf.dense_crf with the peers' constants) for images (B, 3, H, W) in [0, 1]: the
    lattice is built once per batch and reused for every probe and unary (crf.run_crf(probs, kernels, 10)
    then equals crf.dense_crf(images * 255, probs))."""
    images = images.clamp(0, 1) * 255
    return [(3.0, crf.separable_gaussian_filter(1.0)), (4.0, crf.lattice_filter(crf.pixel_features(images, 67.0, 3.0)))]


# ----------------------------------------------------------------------------------------------
# Evaluation: one code pass, every probe, every unary, one CRF pass
# ----------------------------------------------------------------------------------------------

def flip_codes(head, feats, feats_flip):
    """evaluate.flip_tta with the frozen features cached: (head(f(x)) + flip(head(f(flip x)))) / 2."""
    with torch.no_grad():
        return (head(feats) + head(feats_flip).flip(-1)) / 2


def evaluate_codes(codes, probes, images, labels, lows, unaries, alpha, use_crf, batch=8):
    """codes (N, D, h, w); probes {name: (K, D)}; lows {reading: F^l (N, K, h, w)} (unaligned);
    unaries: list of (tag, kind, reading). Returns {probe: {tag: {before, after, entropy, maxp, changed}}}:
    scores before / after the CRF, and the unary's mean entropy, mean max probability and the fraction of
    pixels whose argmax the CRF changes."""
    conf = {(n, t): [torch.zeros(K, K, dtype=torch.int64) for _ in range(2)] for n in probes for t, _, _ in unaries}
    diag = {(n, t): np.zeros(3) for n in probes for t, _, _ in unaries}
    for s in range(0, len(codes), batch):
        c, im, lab = codes[s:s + batch], images[s:s + batch], labels[s:s + batch]
        kernels = crf_kernels(im) if use_crf else None
        for name, centres in probes.items():
            scores = il2vseg.cosine_to_centres(c, centres)
            aligned = {}  # F^l's clusters matched to this probe's (il2vseg.align_clusters: soft, likelihood, hard)
            for tag, kind, reading in unaries:
                kind, how, a = parse_candidate(kind, alpha) if kind != "none" else ("none", None, alpha)
                if reading is not None and (reading, how) not in aligned:
                    aligned[reading, how] = il2vseg.align_clusters(lows[reading][s:s + batch], scores, how=how)
                p = fused_unary(kind, c, centres, lab.shape[-2:], aligned.get((reading, how)), a)  # (B, K, H, W)
                pred = p.argmax(1)
                conf[name, tag][0] += evaluate.confusion_matrix(pred, lab, K, K)
                entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
                changed = 0.0
                if use_crf and kind == "crf-first":  # the CRF refines the high-level map, then eq (13) adds F^l
                    refined = crf.run_crf(fused_unary("none", c, centres, lab.shape[-2:], None, a), kernels, 10)
                    low = F.interpolate(aligned[reading, how].float(), size=lab.shape[-2:], mode="bilinear",
                                        align_corners=False)
                    pred_crf = (refined.clamp_min(1e-12).log() + a / (1 - a) * 2.0 * low).argmax(1)
                    conf[name, tag][1] += evaluate.confusion_matrix(pred_crf, lab, K, K)
                    changed = float((pred_crf != pred).float().sum())
                elif use_crf:
                    pred_crf = crf.run_crf(p, kernels, 10).argmax(1)
                    conf[name, tag][1] += evaluate.confusion_matrix(pred_crf, lab, K, K)
                    changed = float((pred_crf != pred).float().sum())
                diag[name, tag] += [float(entropy.sum()), float(p.amax(1).sum()), changed]
    n_pix = labels[0].numel() * len(codes)
    return {n: {t: {"before": compact(evaluate.scores(conf[n, t][0])),
                    "after": compact(evaluate.scores(conf[n, t][1])) if use_crf else None,
                    "clusters_used": int((conf[n, t][0].sum(dim=0) > 0).sum()),
                    "entropy": diag[n, t][0] / n_pix, "maxp": diag[n, t][1] / n_pix, "changed": diag[n, t][2] / n_pix}
                for t, _, _ in unaries} for n in probes}


def compact(s):
    return {"acc": s["acc"], "miou": s["miou"], "iou": s["iou"], "confusion": s["confusion"]}  # matched (class, class)


def kmeans_probes(fit_codes, args):
    """Cosine k-means on train codes (N, D, h, w), one probe per seed (best of --kmeans-restarts)."""
    vectors = fit_codes.permute(0, 2, 3, 1).reshape(-1, fit_codes.shape[1])
    return {f"kmeans{s}": evaluate.kmeans_cosine(vectors, K, seed=s, n_init=args.kmeans_restarts)[0]
            for s in range(args.kmeans_seeds)}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def cell(values):
    values = 100 * np.asarray(values, dtype=float)
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def per_seed(records, probe_prefix, stage, key, tag="none"):
    """Per training seed: the metric averaged over the probes starting with probe_prefix."""
    seeds = sorted({r["seed"] for r in records})
    return [np.mean([r["eval"][p][tag][stage][key] for r in records if r["seed"] == sd
                     for p in r["eval"] if p.startswith(probe_prefix)]) for sd in seeds]


def sweep_table(rows):
    lines = ["| F^l reading | train α | k-means Acc | k-means mIoU | k-means+CRF Acc | k-means+CRF mIoU | "
             "centres Acc | centres mIoU | centres+CRF Acc | centres+CRF mIoU | k-means seed std (mIoU / +CRF) |",
             "|---|---|" + "---:|" * 9]
    for label, alpha, records in rows:
        cells = [cell(per_seed(records, probe, stage, key)) for probe in ("kmeans", "centres")
                 for stage in ("before", "after") for key in ("acc", "miou")]
        ks = [np.std([r["eval"][p]["none"][st]["miou"] for p in r["eval"] if p.startswith("kmeans")]) * 100
              for st in ("before", "after") for r in records]
        half = len(ks) // 2
        lines.append(f"| {label} | {alpha} | " + " | ".join(cells) + f" | {np.mean(ks[:half]):.1f} / {np.mean(ks[half:]):.1f} |")
    return "\n".join(lines)


def training_table(rows):
    """Per variant, mean over training seeds: each weighted term's gradient norm on the head over the run
    (--grad-every), L_fs's and L_reg's share of L_smo's, the last step's cluster usage, the steps one
    cluster held > 90 % of the batch, and the clusters each probe uses on val (of K)."""
    terms = ("smo", "corr", "fs", "reg", "data")
    lines = ["| F^l reading | train α | " + " | ".join(f"‖∇ {t}‖" for t in terms) + " | fs / smo | reg / smo | "
             "perplexity (of 11) | largest | collapsed steps | clusters used: k-means / centres |",
             "|---|---|" + "---:|" * (len(terms) + 6)]
    for label, alpha, records in rows:
        grad = {t: np.mean([np.mean([g[t] for g in r["training"]["grads"]]) for r in records]) for t in terms}
        ratio = lambda t: np.mean([np.mean([g[t] / max(g["smo"], 1e-12) for g in r["training"]["grads"]]) for r in records])  # noqa: E731
        last = lambda k: np.mean([r["training"]["last"][k] for r in records])  # noqa: E731
        used = [np.mean([r["eval"][p]["none"]["clusters_used"] for r in records for p in r["eval"] if p.startswith(probe)])
                for probe in ("kmeans", "centres")]
        lines.append(f"| {label} | {alpha} | " + " | ".join(f"{grad[t]:.4f}" for t in terms)
                     + f" | {100 * ratio('fs'):.1f}% | {100 * ratio('reg'):.1f}% | {last('perplexity'):.1f} | "
                     f"{100 * last('largest'):.0f}% | {np.mean([r['training']['collapsed_steps'] for r in records]):.0f} | "
                     f"{used[0]:.1f} / {used[1]:.1f} |")
    return "\n".join(lines)


def delta_table(rows, base):
    lines = ["| F^l reading | train α | Δ k-means mIoU | Δ k-means+CRF mIoU | Δ centres mIoU | Δ centres+CRF mIoU |",
             "|---|---|---:|---:|---:|---:|"]
    for label, alpha, records in rows:
        cells = [cell(np.subtract(per_seed(records, p, st, "miou"), per_seed(base, p, st, "miou")))
                 for p in ("kmeans", "centres") for st in ("before", "after")]
        lines.append(f"| {label} | {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fusion_table(groups, probe):
    lines = ["| model (train α, F^l reading) | eval unary | Acc | mIoU | +CRF Acc | +CRF mIoU | CRF gain mIoU | "
             "entropy (nats) | max p | pixels the CRF changes |", "|---|---|" + "---:|" * 8]
    for label, records, tags in groups:
        for tag in tags:
            get = lambda st, k: [r["eval"][p][tag][st][k] for r in records for p in r["eval"] if p.startswith(probe)]  # noqa: E731
            diag = lambda k: np.mean([r["eval"][p][tag][k] for r in records for p in r["eval"] if p.startswith(probe)])  # noqa: E731
            gain = np.subtract(get("after", "miou"), get("before", "miou"))
            lines.append(f"| {label} | {tag} | {cell(get('before', 'acc'))} | {cell(get('before', 'miou'))} | "
                         f"{cell(get('after', 'acc'))} | {cell(get('after', 'miou'))} | {cell(gain)} | "
                         f"{diag('entropy'):.2f} | {diag('maxp'):.2f} | {100 * diag('changed'):.1f}% |")
    return "\n".join(lines)


def class_table(records, probe, tags, class_names):
    head = "| class | " + " | ".join(f"{t} | {t}+CRF" for t in tags) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(tags))]
    for c, name in enumerate(class_names):
        vals = []
        for t in tags:
            for st in ("before", "after"):
                v = [r["eval"][p][t][st]["iou"][c] for r in records for p in r["eval"] if p.startswith(probe)]
                vals.append(f"{100 * np.nanmean(np.array(v, dtype=float)):.1f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

CTX = {}  # what every training run shares (filled by main before the worker processes fork)


def run_one(job):
    """Train one model (seed, reading, alpha), then evaluate every probe and unary on the cached val frames."""
    seed, label, alpha, affinity = job
    args, tic = CTX["args"], time.time()
    torch.set_num_threads(args.threads)
    val_f, val_ff, val_images, val_labels = CTX["val"]
    model, last = train_model(args, CTX["backbone"], seed, alpha, affinity, CTX["workdir"])
    codes = flip_codes(model.head, val_f, val_ff)
    probes = kmeans_probes(flip_codes(model.head, *CTX["fit"]), args)
    probes["centres"] = model.global_centres.detach().clone()
    unaries = [("none", "none", None)]
    study_alphas, candidates = CTX["study"]
    if alpha in study_alphas:  # the alpha-0 model is studied with every reading's F^l
        readings = CTX["affinities"] if alpha == 0 else [affinity]
        unaries += [(f"{kind} [{r}]", kind, r) for r in readings for kind in candidates]
    result = evaluate_codes(codes, probes, val_images, val_labels, CTX["lows"], unaries, args.eval_alpha,
                            not args.no_crf)
    return {"label": label, "alpha": alpha, "affinity": affinity, "seed": seed, "eval": result,
            "training": last, "seconds": time.time() - tic}


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.root)
    args.root = str(root if root.is_absolute() else (REPO_ROOT / root).resolve())
    torch.set_num_threads(args.threads)
    started = time.time()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    alphas = [float(a) for a in args.alphas.split(",")]
    affinities = args.affinities.split(",")
    study_alphas = [float(a) for a in args.study_alphas.split(",")] if args.study_alphas else []
    candidates = args.candidates.split(",") if args.candidates else []
    for c in candidates:  # checked before any work
        parse_candidate(c, args.eval_alpha)

    # frames, decoded once: val and the k-means fit set in eval geometry, train resized for random crops
    fit_images, fit_labels, fit_names = eval_frames(args.root, "train", args.crop, args.fit_frames, interpolation=args.resize)
    val_images, val_labels, _ = eval_frames(args.root, args.eval_split, args.crop, args.val_frames,
                                            exclude=fit_names if args.eval_split == "train" else (),
                                            interpolation=args.resize)
    stats_images = fit_images[torch.linspace(0, len(fit_images) - 1, min(32, len(fit_images))).long()]
    backbone = StandIn(stats_images)
    if args.standin == "lda":
        backbone.lda = fit_lda(backbone, fit_images, fit_labels)  # LABEL LEAKAGE (train labels)
        backbone = StandIn(stats_images, lda=backbone.lda)
    backbone.eval()
    feats = lambda x: backbones.features(backbone, x)  # noqa: E731
    val_f, val_ff = feats(val_images), feats(val_images.flip(-1))
    fit_f, fit_ff = feats(fit_images), feats(fit_images.flip(-1))
    low_cfg = dict(n_clusters=K, sigma=args.fcm_sigma, patch=8, radius=args.radius)
    # F^l of the val frames per reading (an image's F^l does not depend on its batch)
    lows = {a: torch.cat([fcm.low_level_cue(val_images[s:s + 8], affinity=a, **low_cfg)
                          for s in range(0, len(val_images), 8)]) for a in affinities}
    unit = F.normalize(val_f.flatten(2), dim=1)
    cos_in = float(torch.einsum("bdn,bdm->bnm", unit, unit).mean())
    cos_across = float(torch.einsum("bdn,bdm->bnm", unit, unit.roll(1, 0)).mean())
    say(f"stand-in '{args.standin}': {backbone.dim} channels at stride 8; mean feature cosine within an image "
        f"{cos_in:.2f}, across images {cos_across:.2f}; {len(val_images)} {args.eval_split} frames scored, {len(fit_images)} k-means fit "
        f"frames, crop {args.crop} ({time.time() - started:.0f} s)")

    # 1. raw-feature baseline: k-means on the stand-in's features, no training
    raw_codes = (val_f + val_ff.flip(-1)) / 2
    raw = evaluate_codes(raw_codes, kmeans_probes((fit_f + fit_ff.flip(-1)) / 2, args), val_images, val_labels,
                         {}, [("none", "none", None)], 0.0, not args.no_crf)
    say(f"raw-feature baseline done ({time.time() - started:.0f} s)")

    # 2. the sweep: alpha 0 is shared by every reading (F^l gets weight 0); 3. fusion study on some models
    variants = [("—", 0.0, affinities[0])] if 0.0 in alphas else []
    variants += [(a, alpha, a) for a in affinities for alpha in alphas if alpha > 0]
    jobs = [(seed, label, alpha, affinity) for seed in range(args.seeds) for label, alpha, affinity in variants]
    train_set = cached_train_set(args, 0)  # decode the train frames once, before forking
    # the same frames and backbone for every run: the neighbours and the measured shifts are computed once
    cfg = run_settings(args, 0, 0.0, affinities[0], Path(tempfile.mkdtemp(prefix="camvid_shared_")))
    neighbours = pairs.neighbours_for_run(cfg, backbone, train_set, torch.device("cpu"), say) if args.knn else None
    pairs.neighbours_for_run = lambda *a, **k: neighbours
    if args.shifts != "published":  # measured on seed 0's training set, reused by every run (pairs.calibrate)
        calibration = pairs.calibrate(cfg, backbone, train_set, neighbours, torch.device("cpu"), say)
        pairs.calibrate = lambda *a, **k: dict(calibration)
    CTX.update(args=args, backbone=backbone, val=(val_f, val_ff, val_images, val_labels), fit=(fit_f, fit_ff),
               lows=lows, workdir=Path(tempfile.mkdtemp(prefix="camvid_pipeline_")), study=(study_alphas, candidates),
               affinities=affinities)
    records = []

    def collect(record):
        records.append(record)
        km = np.mean([v["none"]["after" if not args.no_crf else "before"]["miou"] for p, v in record["eval"].items()
                      if p.startswith("kmeans")])
        say(f"seed {record['seed']} reading {record['label']} alpha {record['alpha']}: k-means mIoU {100 * km:.1f} "
            f"({record['seconds']:.0f} s, total {time.time() - started:.0f} s)")
    if args.workers > 1:  # forked workers inherit CTX (frames, features, F^l) without copying it
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for future in concurrent.futures.as_completed([pool.submit(run_one, job) for job in jobs]):
                collect(future.result())
    else:
        for job in jobs:
            collect(run_one(job))
    records.sort(key=lambda r: (r["seed"], r["affinity"], r["alpha"]))

    # tables
    class_names = data.DATASETS["camvid"]["class_names"]
    settings = {k: v for k, v in vars(args).items()}
    print(f"\n## CamVid pipeline, scored on {args.eval_split}, stand-in '{args.standin}' (fusion-in {args.fusion_in}, F^l scale {args.fl_scale}, "
          f"training alignment {args.align}, radius {args.radius}, sigma {args.fcm_sigma}, EMA "
          f"{args.ema if args.ema is not None else 0.998 ** (3000 / args.steps):.4f})\n")
    print(f"{args.steps} steps x batch {args.batch_size}, crop {args.crop} (training: {args.train_frames} frames"
          f"{', five-crop' if args.five_crop else ''}, resized ({args.resize}) to short side {args.crop}, {args.train_crop} crop; "
          f"eval centre crop), {len(val_images)} {args.eval_split} frames evenly spaced"
          f"{' (outside the k-means fit set)' if args.eval_split == 'train' else ''}, "
          f"k-means fit on {len(fit_images)} train frames, {args.seeds} training seeds x {args.kmeans_seeds} k-means "
          f"seeds; cells are mean ± std over training seeds (k-means: of the per-seed mean over k-means seeds); "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("Raw-feature baseline (k-means on the stand-in's features, no training):\n")
    base_vals = {f"{st} {k}": cell([raw[p]["none"][st][k] for p in raw]) for st in ("before", "after")
                 if not (args.no_crf and st == "after") for k in ("acc", "miou")}
    print("| " + " | ".join(base_vals) + " |\n|" + "---:|" * len(base_vals) + "\n| " + " | ".join(base_vals.values()) + " |\n")
    rows = [(lab, a, [r for r in records if r["label"] == lab and r["alpha"] == a]) for lab, a, _ in variants]
    if not args.no_crf:
        print("Alpha sweep (Figure 5), evaluated with the protocol (no eval-time fusion):\n")
        print(sweep_table(rows) + "\n")
        print("Training: the gradient each weighted term sends to the head, cluster usage, probes' clusters:\n")
        print(training_table(rows) + "\n")
        if records:
            print("Shifts used: " + ", ".join(f"{k} {v:+.3f}" for k, v in records[0]["training"]["shifts"].items())
                  + f" (--shifts {args.shifts})\n")
        if rows and rows[0][1] == 0.0:
            print("Paired difference to alpha 0 (same training seed), mIoU points:\n")
            print(delta_table(rows[1:], rows[0][2]) + "\n")
        groups = []
        for lab, a, recs in rows:
            tags = sorted({t for r in recs for p in r["eval"] for t in r["eval"][p]}, key=lambda t: (t != "none", t))
            if len(tags) > 1:
                groups.append((f"α {a}, {lab}", recs, tags))
        for probe in ("kmeans", "centres"):
            if groups:
                print(f"Eval-time fusion, eq (13) at eval alpha {args.eval_alpha} (a candidate's @A: alpha A), "
                      f"probe {probe}:\n")
                print(fusion_table(groups, probe) + "\n")
        if groups:
            print(f"Per-class IoU, probe k-means, {groups[0][0]}:\n")
            print(class_table(groups[0][1], "kmeans", [t for t in groups[0][2] if t.split(" ")[0].partition("@")[0] in
                                                       ("none", "printed+hard", "keep-scale+soft", "keep-scale+likelihood")],
                              class_names) + "\n")
    elapsed = time.time() - started
    print(f"wall time {elapsed:.0f} s")
    payload = {"settings": settings, "standin_cosine": {"within": cos_in, "across": cos_across},
               "baseline_raw_features": raw, "runs": records, "wall_seconds": elapsed,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps(payload, default=float, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
