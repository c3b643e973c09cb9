"""IL2Vseg: the model, its training and the command line.

The paper's "Preliminary", "Visual Characteristics of the Fused", "Loss Function" and "Implementation
Details" sections, in that order:

  F^p   = f_theta(I)                 frozen self-supervised backbone (backbones.py)     (B, C1, H/8, W/8)
  F^c   = h_theta(F^p)               projection head: 1x1 conv + 2-layer MLP with SiLU   (B, C2, H/8, W/8)
  F^seg = S_theta(F^c)               cosine similarity to K cluster centres             eq (2)
  F^l   = f_gamma(bilinear(I))       low-level cue: spatial FCM + colour affinity       eqs (1), (3)-(12), fcm.py
  F^f   = (1 - a) F^seg + a F^l      fusion, after aligning F^l's clusters to F^seg's    eq (13)
  L     = b L_reg + g L_fs + L_smo + L_corr                                             eqs (14)-(15), losses.py

Local centres are trained by Adam, global centres follow them by an exponential moving average (as in
SmooSeg). Evaluation is evaluate.py; checkpoints and the output folder are checkpoints.py.
Run `python il2vseg.py --help` for the command line; README.md has the walk-through.
"""
import copy
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import backbones
import checkpoints
import cli
import data
import evaluate
import fcm
import losses
import results

# --------------------------------------------------------------------------------------------
# The trainable part: projection head h_theta and the cluster centres, eq (2)
# --------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """h_theta: F^c = conv1x1(drop(F^p)) + conv1x1(SiLU(conv1x1(drop(F^p)))).

    "a linear convolution and two MLP nonlinear layers with SiLUs" (Implementation Details); the
    linear + nonlinear sum and Dropout2d(0.2) follow SmooSeg, on which IL2Vseg builds.
    """

    def __init__(self, in_dim=384, dim=64, dropout=0.2):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.SiLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, feats):  # (B, in_dim, h, w) -> (B, dim, h, w)
        feats = self.dropout(feats)
        return self.linear(feats) + self.nonlinear(feats)


def cosine_to_centres(codes, centres):
    """S_theta, eq (2): cosine similarity of every code to every centre.
    codes (B, D, h, w), centres (K, D) -> (B, K, h, w) in [-1, 1]."""
    codes = F.normalize(codes, dim=1)
    centres = F.normalize(centres, dim=1)
    return torch.einsum("bdhw,kd->bkhw", codes, centres)  # eq (2)


@torch.no_grad()
def ema_update(global_centres, local_centres, momentum=0.998):
    """Global centres follow the local ones: g <- momentum * g + (1 - momentum) * l (in place)."""
    global_centres.mul_(momentum).add_(local_centres.detach(), alpha=1.0 - momentum)
    return global_centres


class Segmenter(nn.Module):
    """Everything IL2Vseg trains: the projection head and the local / global cluster centres (K, D).

    The frozen backbone stays outside, so checkpoints hold only what is trained. Local centres are
    learned by Adam; global centres are an EMA copy (a buffer, never a gradient target). Both are
    L2-normalised wherever they are used; both start as the same xavier-normal unit rows.
    """

    def __init__(self, n_clusters, in_dim=384, dim=64, dropout=0.2):
        super().__init__()
        self.head = ProjectionHead(in_dim, dim, dropout)
        local = F.normalize(nn.init.xavier_normal_(torch.empty(n_clusters, dim)), dim=1)
        self.local_centres = nn.Parameter(local)  # (K, D)
        self.register_buffer("global_centres", local.clone())  # (K, D)

    def forward(self, feats):  # F^p (B, in_dim, h, w) -> F^c (B, D, h, w)
        return self.head(feats)


def build_model(cfg, backbone, n_clusters, device):
    """A Segmenter for `backbone` (every backbones.py model has `.dim`, its feature width C1), with
    --dim and --dropout, initialised from --seed alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Segmenter(n_clusters, in_dim=backbone.dim, dim=cfg.dim, dropout=cfg.dropout).to(device)


# --------------------------------------------------------------------------------------------
# Fusion of the high- and low-level cues, eq (13)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def align_clusters(low_level, seg_scores, temperature=0.1, how="soft"):
    """Express F^l in the head's clusters, so that channel k of F^l speaks of the head's cluster k.

    FCM numbers its clusters arbitrarily, while eq (13) adds F^l to F^seg channel by channel; the paper
    does not say how they correspond. Every way here starts from the per-image overlap
    O[k, j] = sum_pixels softmax(seg_scores / temperature)[k] * F^l[j]   (temperature 0.1 is SmooSeg's):
      "soft"        (training's default) each FCM cluster goes where its pixels are:
                    M[k, j] = O[k, j] / sum_k O[k, j] = P(head k | FCM j), F^l'[k] = sum_j M[k, j] F^l[j].
                    Many-to-one: no colour cluster is forced onto a class the image does not show.
                    F^l' sums to 1 over k; a head cluster that covers much of a colour takes most of it.
      "likelihood"  (evaluation's default) each head cluster by the colours of its pixels:
                    M[k, j] = O[k, j] / (sum_j O[k, j] + 1) ~ P(FCM j | head k), F^l'[k] = sum_j M[k, j] F^l[j],
                    how typical the pixel's colour is of cluster k, nearly whatever the cluster's size. The
                    + 1 (one grid cell of mass) lets a cluster the image does not show get no colour
                    evidence instead of the colours of the few pixels where it is least unlikely. F^l' is
                    in [0, 1] but does not sum to 1 over k. ("soft" weighs cluster k by its share of the
                    colour, so a large cluster gains wherever its colour is: the size prior that F^seg
                    already holds, counted again. Measured on CamVid, README "Numbers".)
      "hard"        the permutation of the K FCM clusters with the largest total overlap (Hungarian).
    low_level, seg_scores (B, K, h, w) -> (B, K, h, w).
    Scores that are not finite (a diverged head) raise FloatingPointError, before any matching.
    """
    if how not in ("soft", "likelihood", "hard"):
        raise ValueError(f"align_clusters: how must be soft, likelihood or hard, got {how!r}")
    dtype = torch.promote_types(low_level.dtype, torch.float32)  # at least float32 (bf16 under autocast)
    probs = torch.softmax(seg_scores.to(dtype) / temperature, dim=1)  # (B, K, h, w)
    overlap = torch.einsum("bkhw,bjhw->bkj", probs, low_level.to(dtype))  # O (B, K, K)
    if not bool(torch.isfinite(overlap).all()):
        raise FloatingPointError("F^seg or F^l is not finite (NaN or inf) when aligning the clusters of eq (13)")
    if how != "hard":
        if how == "soft":
            mapping = overlap / overlap.sum(dim=1, keepdim=True).clamp_min(1e-12)  # M[k, j] = P(head k | FCM j)
        else:
            mapping = overlap / (overlap.sum(dim=2, keepdim=True) + 1.0)  # M[k, j] ~ P(FCM j | head k), + 1 cell
        return torch.einsum("bkj,bjhw->bkhw", mapping, low_level.to(dtype)).to(low_level.dtype)  # (B, K, h, w)
    overlap = overlap.cpu().numpy()
    order = np.empty(overlap.shape[:2], dtype=np.int64)  # order[b, k] = FCM cluster for head cluster k
    for b in range(overlap.shape[0]):
        head_index, fcm_index = linear_sum_assignment(overlap[b], maximize=True)
        order[b, head_index] = fcm_index
    index = torch.from_numpy(order).to(low_level.device)[:, :, None, None].expand_as(low_level)  # (B, K, h, w)
    return torch.gather(low_level, 1, index)


def fuse(f_seg, f_low, alpha=0.5, temperature=0.1, how="soft"):
    """F^f = (1 - alpha) F^seg + alpha F^l, eq (13), after aligning F^l's clusters to F^seg's (`how`:
    align_clusters' soft, likelihood or hard).

    f_seg (B, K, h, w) cosines, f_low (B, K, h, w) low-level cluster probabilities, added as printed.
    alpha = 0: the high-level cue only; alpha = 1: the low-level cue only (Figure 5).
    needs: align_clusters
    """
    if f_seg.shape != f_low.shape:
        raise ValueError(f"F_seg {tuple(f_seg.shape)} and F_l {tuple(f_low.shape)} must have the same shape")
    if alpha > 0:
        f_low = align_clusters(f_low, f_seg.detach(), temperature, how)
    return (1 - alpha) * f_seg + alpha * f_low  # eq (13)


# --------------------------------------------------------------------------------------------
# One training step: every term of eq (15)
# --------------------------------------------------------------------------------------------

def low_level_branch(cfg, n_clusters, stride, compiled=False, log=print):
    """F^l (eqs 1, 3-12) with the run's settings: images (B, 3, H, W) in [0, 1] -> (B, K, H/stride, W/stride).

    compiled=True (training on CUDA with --compile): the same function under
    torch.compile(mode="reduce-overhead"), which replays the branch's many small kernels from a CUDA
    graph. If it cannot compile, one line says so and the branch runs eagerly.
    """
    eager = functools.partial(fcm.low_level_cue, n_clusters=n_clusters, m=cfg.fcm_m, sigma=cfg.fcm_sigma,
                              patch=stride, affinity=cfg.affinity, radius=cfg.radius, max_iter=cfg.fcm_iters)
    if not compiled:
        return eager
    state = {"compiled": torch.compile(functools.partial(eager, early_exit=False), mode="reduce-overhead")}

    def branch(images):
        if state["compiled"] is not None:
            try:
                return state["compiled"](images).clone()  # the graph reuses its output buffer
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                log(f"note: torch.compile of the low-level branch failed ({checkpoints.first_line(error)}); "
                    f"it runs eagerly")
                state["compiled"] = None
        return eager(images)
    return branch


def loss_terms(backbone, model, images, cfg, generator, low_level=None):
    """Every loss term for one batch: a dict name -> scalar tensor (see losses.total_loss).

    images (B, 3, H, W) in [0, 1]; cfg the run's settings (alpha, shifts, weights, ...); generator draws
    I~, the negatives and the sampled points, in that order; low_level the branch (eager when None).
    """
    B = images.shape[0]
    n_clusters = model.local_centres.shape[0]
    low_level = low_level or low_level_branch(cfg, n_clusters, backbone.stride)
    f_low = low_level(images)  # eqs (1), (3)-(12): F^l (B, K, h, w)
    augmented = data.photometric_augment(images, generator=generator)  # I~: colour / luminosity jitter
    feats_both = backbones.features(backbone, torch.cat([images, augmented]))  # F^p of I and I~ (2B, C1, h, w)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        codes_both = model(feats_both).float()  # F^c (2B, D, h, w); the losses compute in float32
    feats, feats_aug = feats_both[:B], feats_both[B:]
    codes, codes_aug = codes_both[:B], codes_both[B:]

    f_seg = cosine_to_centres(codes, model.global_centres)  # eq (2), F^seg: the head learns through it
    f_fused = fuse(f_seg, f_low, cfg.alpha, how=cfg.align)  # eq (13), F^f (B, K, h, w)
    # --fusion-in all: F^f is "the segmentation feature vector" of SmooSeg's terms too (Figure 5's reading)
    scores = f_fused if cfg.fusion_in == "all" else f_seg
    inner_local = cosine_to_centres(codes.detach(), model.local_centres)  # local centres learn from here
    terms = {"data": losses.data_loss(inner_local, scores)}  # SmooSeg's data term (goes with L_smo)
    perm = losses.derangement(B, generator=generator, device=images.device) if B > 1 else None
    probs = torch.softmax(scores / cfg.smooth_temperature, dim=1)  # SmooSeg's P
    terms["smo"] = losses.smoothness_loss(feats, probs, cfg.shift_close, cfg.shift_far, perm=perm)
    corr = losses.correspondence_terms(feats, codes, feats_aug, codes_aug, shifts=cfg.corr_shifts,
                                       weights=cfg.corr_weights, generator=generator)  # I with itself, I~, others
    terms["corr"] = corr["corr"]
    small = F.interpolate(images, size=f_low.shape[2:], mode="bilinear", align_corners=False)  # colours on the grid
    terms["fs"], terms["reg"] = losses.feature_similarity_losses(codes, f_fused, small)  # eq (14)
    return terms


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def batches_for_steps(n_items, batch_size, seed, start_step, n_steps):
    """Index lists for steps start_step .. n_steps-1, a fresh seeded permutation each epoch: the order
    depends only on (seed, step), so a resumed run sees exactly the batches of an uninterrupted one."""
    per_epoch = n_items // batch_size
    for step in range(start_step, n_steps):
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        yield [(epoch, int(i)) for i in order[position * batch_size:(position + 1) * batch_size]]


class EpochItems(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: the item as drawn in that epoch (data.py seeds its crop and flip by
    (seed, epoch, index)), also inside DataLoader worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


# settings a resumed run must share with the checkpoint (data, order, shapes, losses)
RESUME_MUST_MATCH = ("data", "data_root", "train_split", "arch", "weights", "dim", "dropout", "batch_size", "crop", "seed",
                     "five_crop", "alpha", "beta", "gamma", "use_smo", "use_fs", "use_reg", "use_corr", "lr_head",
                     "lr_centres", "ema", "fcm_m", "fcm_sigma", "fcm_iters", "affinity", "radius", "fusion_in", "align",
                     "smooth_temperature")


def last_intact(progress, checkpoint_path):
    """What a run that stops at a non-finite number says about its checkpoints."""
    if "saved" in progress:
        return f"the checkpoint of step {progress['saved']} in {checkpoint_path} is intact"
    return "no checkpoint was written by this run"


def make_optimiser(model, cfg):
    """Adam for the head (--lr-head) and the local centres (--lr-centres); fused on CUDA."""
    groups = [{"params": model.head.parameters(), "lr": cfg.lr_head},
              {"params": [model.local_centres], "lr": cfg.lr_centres}]
    return torch.optim.Adam(groups, fused=True) if model.local_centres.is_cuda else torch.optim.Adam(groups)


def checkpoint_state(model, optimiser, step, generator, cfg):
    return {"step": step, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
            "rng": checkpoints.rng_state(generator), "n_clusters": model.local_centres.shape[0],
            "config": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))}}


def train(backbone, model, dataset, cfg, device, log=print, progress=None):
    """Train the head and centres for cfg.steps steps; returns one dict of loss values per step.

    A fresh run seeds the global RNG (dropout) with --seed; --resume restores it from the checkpoint.
    progress (a dict, optional) is kept up to date with "saved" (the last checkpoint step written).
    """
    progress = {} if progress is None else progress
    checkpoint_path = Path(cfg.out) / "checkpoint.pt"
    optimiser = make_optimiser(model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start_step = 0
    if cfg.resume:
        resume_path = Path(cfg.resume) if isinstance(cfg.resume, str) else checkpoint_path
        state = checkpoints.load_checkpoint(resume_path)
        checkpoints.check_resume(state, cfg, resume_path, RESUME_MUST_MATCH)
        checkpoints.restore(model, state["model"], resume_path)
        checkpoints.restore(optimiser, state["optimiser"], resume_path)
        checkpoints.use_own_implementation(optimiser)
        checkpoints.set_rng_state(state["rng"], generator, log)
        start_step = progress["saved"] = state["step"]
        log(f"resumed from {resume_path} at step {start_step}")
        if start_step >= cfg.steps:
            log(f"nothing to train: the checkpoint is at step {start_step} >= --steps {cfg.steps}")
            return []
    else:
        torch.manual_seed(cfg.seed)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}")

    model.train()
    history, seen, started = [], 0, time.time()
    batches = list(batches_for_steps(len(dataset), cfg.batch_size, cfg.seed, start_step, cfg.steps))
    # the loader gets its own generator, so creating its iterator does not draw from the global RNG
    loader = torch.utils.data.DataLoader(EpochItems(dataset), batch_sampler=batches,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    compiled = device.type == "cuda" and cfg.compile
    low_level = low_level_branch(cfg, model.local_centres.shape[0], backbone.stride, compiled, log)
    for step, batch in zip(range(start_step, cfg.steps), loader):
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
        try:
            terms = loss_terms(backbone, model, images, cfg, generator, low_level)
            total, values = losses.total_loss(terms, beta=cfg.beta, gamma=cfg.gamma, use_smo=cfg.use_smo,
                                              use_data=cfg.use_smo, use_fs=cfg.use_fs, use_corr=cfg.use_corr,
                                              use_reg=cfg.use_reg)  # eq (15)
        except FloatingPointError as error:
            raise FloatingPointError(f"step {step + 1}: {error}; {last_intact(progress, checkpoint_path)}") from None
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        ema_update(model.global_centres, model.local_centres, cfg.ema)
        history.append(values)
        seen += images.shape[0]

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1:
            parts = " ".join(f"{k} {v:+.4f}" for k, v in values.items())
            log(f"step {done}/{cfg.steps} | {parts} | {seen / max(time.time() - started, 1e-9):.1f} img/s")
        if done % cfg.save_every == 0 or done == cfg.steps:
            try:
                checkpoints.save_checkpoint(checkpoint_state(model, optimiser, done, generator, cfg), checkpoint_path)
            except FloatingPointError as error:
                raise FloatingPointError(f"step {done}: the weights diverged; {error}; "
                                         f"{last_intact(progress, checkpoint_path)}") from None
            progress["saved"] = done
    log(f"checkpoint: {checkpoint_path}")
    return history


# --------------------------------------------------------------------------------------------
# Evaluation, prediction and the paper's ablations (the protocol itself is evaluate.py)
# --------------------------------------------------------------------------------------------

def make_code_fn(backbone, model):
    """images (B, 3, H, W) in [0, 1] -> codes F^c (B, D, h, w), eval mode, no grad."""
    def code_fn(images):
        model.eval()
        with torch.no_grad():
            return model(backbones.features(backbone, images))
    return code_fn


def make_low_level_fn(cfg, n_clusters, stride):
    """For --eval-alpha > 0: F^l aligned to the clusters of `centres` by --eval-align (align_clusters).
    needs the run's FCM settings; (images, codes, centres) -> (B, K, h, w)."""
    low_level = low_level_branch(cfg, n_clusters, stride)
    how = cfg.eval_align
    return lambda images, codes, centres: align_clusters(low_level(images), cosine_to_centres(codes, centres), how=how)


def run_evaluation(backbone, model, cfg, device, datasets, log=print):
    """evaluate.run_protocol for this model: codes from the backbone and head, the global centres as the
    "centres" probe, F^l aligned by --eval-align when --eval-alpha > 0."""
    low_level_fn = make_low_level_fn(cfg, model.global_centres.shape[0], backbone.stride) if cfg.eval_alpha > 0 else None
    return evaluate.run_protocol(make_code_fn(backbone, model), model.global_centres, datasets, cfg, device,
                                 low_level_fn, log)


def predict_folder(backbone, model, cfg, device, images, out_dir, log=print):
    """--predict FOLDER: a colour mask and an overlay per image from the global centres (the head's own
    clusters, no labels needed). images: data.py's prediction folder data set."""
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=cfg.num_workers)
    n_clusters = model.global_centres.shape[0]
    low_level_fn = make_low_level_fn(cfg, n_clusters, backbone.stride) if cfg.eval_alpha > 0 else None
    paths = evaluate.predict_folder(make_code_fn(backbone, model), loader, model.global_centres, out_dir,
                                    device=device, use_crf=not cfg.no_crf, flip=cfg.flip_tta,
                                    low_level_fn=low_level_fn, alpha=cfg.eval_alpha)
    log(f"wrote {len(paths)} files for {len(images)} images to {out_dir}")
    return paths


LOSS_ABLATION = [  # the rows of the paper's Table 4 (the data term always goes with L_smo)
    ("(1) L_smo", dict(use_smo=True, use_fs=False, use_reg=False, use_corr=False)),
    ("(2) L_smo + L_fs", dict(use_smo=True, use_fs=True, use_reg=True, use_corr=False)),
    ("(3) L_smo + L_corr", dict(use_smo=True, use_fs=False, use_reg=False, use_corr=True)),
    ("(4) L_smo + L_fs + L_corr", dict(use_smo=True, use_fs=True, use_reg=True, use_corr=True)),
]
ALPHA_ABLATION = [0.0, 0.25, 0.5, 0.75, 1.0]  # the paper's Figure 5


def train_and_evaluate(cfg, backbone, device, datasets, log=print, progress=None):
    """Train from --seed, then evaluate the last step (no checkpoint is selected on labelled data)."""
    model = build_model(cfg, backbone, datasets[0].n_classes, device)
    log(f"training on {len(datasets[0])} {cfg.data} images: {cfg.steps} steps, batch {cfg.batch_size}, crop "
        f"{cfg.crop}, alpha {cfg.alpha}, beta {cfg.beta}, gamma {cfg.gamma}, device {device}")
    train(backbone, model, datasets[0], cfg, device, log, progress)
    return model, run_evaluation(backbone, model, cfg, device, datasets, log)


def ablation_runs(cfg):
    """(row name, settings it changes, its folder OUT/ablation_ROW) of --ablation alpha or loss."""
    settings = ([(f"alpha = {a}", {"alpha": a, "eval_alpha": a}) for a in ALPHA_ABLATION]
                if cfg.ablation == "alpha" else LOSS_ABLATION)
    return [(name, change, Path(cfg.out) / ("ablation_" + "".join(c if c.isalnum() else "_" for c in name)))
            for name, change in settings]


def run_ablation(cfg, backbone, device, datasets, log=print):
    """Figure 5 (alpha in training and in the evaluated prediction; 1 = the low-level cue alone) or
    Table 4 (loss terms): one training + evaluation per row, then the table (OUT/ablation_NAME.txt)."""
    rows = []
    for name, change, folder in ablation_runs(cfg):
        run_cfg = copy.deepcopy(cfg)
        vars(run_cfg).update(change, resume=None)
        run_cfg.out = str(folder)
        log(f"=== ablation {name} -> {run_cfg.out}")
        _, result = train_and_evaluate(run_cfg, backbone, device, datasets, log)
        rows.append((name, result["probes"]))
    probes = list(rows[0][1])
    title = "Figure 5: low-level cue weight" if cfg.ablation == "alpha" else "Table 4: loss terms"
    lines = [title + " (Acc / mIoU in %; '-' = CRF off)",
             f"{'setting':<28}" + "".join(f" {p + ' ' + s:>20}" for p in probes for s in ("", "+CRF"))]
    for name, entries in rows:
        cells = [(entries[p][stage] or {}) for p in probes for stage in ("before_crf", "after_crf")]
        lines.append(f"{name:<28}" + "".join(f" {results.percent(c.get('acc')) + ' / ' + results.percent(c.get('miou')):>20}"
                                             for c in cells))
    table = "\n".join(lines)
    log(table)
    (Path(cfg.out) / f"ablation_{cfg.ablation}.txt").write_text(table + "\n")
    return rows


# --------------------------------------------------------------------------------------------
# The command line (its flags, defaults and checks are cli.py)
# --------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = cli.parse_args(argv)
    cfg.train = cfg.train or bool(cfg.resume)
    if not (cfg.train or cfg.eval or cfg.predict or cfg.ablation):
        print("nothing to do: pass --train, --eval, --predict FOLDER or --ablation (see --help)", file=sys.stderr)
        return 2
    progress = {}
    try:
        device = cli.pick_device(cfg.device)
        cli.resolve_defaults(cfg, device)
        datasets = cli.build_datasets(cfg)  # the data first: a bad file must not wait for the weights or a training run
        predict_set = None
        if cfg.predict:
            predict_set = data.PredictFolder(cfg.predict, cfg.eval_crop, backbones.ARCHS[cfg.arch]["stride"])
            data.check_files(predict_set)
        state = None
        if not (cfg.train or cfg.ablation):  # --eval / --predict: the checkpoint before the weights
            path = Path(cfg.checkpoint or Path(cfg.out) / "checkpoint.pt")
            state = checkpoints.load_checkpoint(path)
            if state["config"].get("arch", cfg.arch) != cfg.arch:
                raise checkpoints.CheckpointError(f"{path} was trained on --arch {state['config']['arch']}, not {cfg.arch}")
            cli.take_from_checkpoint(cfg, state["config"], path)  # the head's width, F^l as in training
            trained_on = state["config"].get("weights")
            if trained_on != cfg.weights and "random" in (trained_on, cfg.weights):
                raise checkpoints.CheckpointError(f"{path} was trained on --weights {trained_on or '(torch.hub)'}, "
                                                  f"this run loads {cfg.weights or '(torch.hub)'}")
            if trained_on != cfg.weights:
                print(f"note: {path} was trained on the backbone weights {trained_on or '(torch.hub)'}; this run "
                      f"loads {cfg.weights or '(torch.hub)'}")
            if cfg.eval and state["n_clusters"] != datasets[1].n_classes:
                raise checkpoints.CheckpointError(f"{path} has {state['n_clusters']} clusters, --data {cfg.data} "
                                                  f"has {datasets[1].n_classes} classes")
        checkpoints.check_output_folder(cfg.out)
        with checkpoints.OutputLock(cfg.out):
            if (cfg.train and not cfg.resume and not cfg.overwrite
                    and (Path(cfg.out) / "checkpoint.pt").exists()):
                raise checkpoints.CheckpointError(f"--out {cfg.out} already holds checkpoint.pt: continue it with "
                                                  f"--resume, replace it with --overwrite, or choose another --out")
            earlier = [folder.name for _, _, folder in (ablation_runs(cfg) if cfg.ablation else [])
                       if (folder / "checkpoint.pt").exists()]
            if earlier and not cfg.overwrite:
                raise checkpoints.CheckpointError(f"--out {cfg.out} already holds runs of --ablation {cfg.ablation} "
                                                  f"({earlier[0]}{f' and {len(earlier) - 1} more' if len(earlier) > 1 else ''}"
                                                  f"): replace them with --overwrite, or choose another --out")
            backbone = backbones.load_backbone(cfg.arch, cfg.weights, seed=cfg.seed).to(device)
            if cfg.ablation:
                run_ablation(cfg, backbone, device, datasets)
                return 0
            if cfg.train:
                model, _ = train_and_evaluate(cfg, backbone, device, datasets, progress=progress)
            else:
                model = Segmenter(state["n_clusters"], in_dim=backbone.dim, dim=cfg.dim).to(device)
                checkpoints.restore(model, state["model"], path)
                if cfg.eval:
                    run_evaluation(backbone, model, cfg, device, datasets)
            if cfg.predict:
                predict_folder(backbone, model, cfg, device, predict_set, Path(cfg.out) / "predictions")
        return 0
    except (backbones.WeightsError, checkpoints.CheckpointError, data.DataError, ValueError,
            FloatingPointError, OSError) as error:
        print(f"error: {cli.one_line(error)}", file=sys.stderr)
        return 1
    except (MemoryError, torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) and "memory" not in str(error).lower():
            raise
        print(f"error: out of memory ({checkpoints.first_line(error)}): use a smaller --batch-size, --crop, "
              f"--eval-crop or --dim", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = (f"the checkpoint of step {progress['saved']} is intact: continue with --resume"
                 if "saved" in progress else "no checkpoint was written by this run")
        print(f"interrupted; {saved}" if cfg.train else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
