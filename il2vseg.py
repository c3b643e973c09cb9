"""IL2Vseg: the model, one training step, training, and the command line's main.

The paper's "Preliminary", "Visual Characteristics of the Fused", "Loss Function" and "Implementation
Details", in that order:

  F^p   = f_theta(I)                 frozen self-supervised backbone (backbones.py)     (B, C1, h, w)
  F^c   = h_theta(F^p)               projection head: 1x1 conv + 2-layer MLP with SiLU   (B, C2, h, w)
  F^seg = S_theta(F^c)               cosine similarity to the K cluster centres         eq (2)
  F^l   = f_gamma(bilinear(I))       low-level cue: spatial FCM + colour affinity       eqs (1), (3)-(12), fcm.py
  F^f   = (1 - a) F^seg + a F^l      fusion, F^l's clusters aligned to F^seg's first     eq (13)
  L     = b L_reg + g L_fs + L_smo + L_corr                                             eqs (14)-(15), losses.py

h, w = H/s, W/s for a backbone of stride s (8 for ViT-S/8). Local centres are trained by Adam, global
centres follow them by an exponential moving average (as in SmooSeg). The evaluation protocol is
evaluate.py; the flags are cli.py; checkpoints and the output folder are checkpoints.py.
"""
import copy
import functools
import importlib.util
import signal
import sys
import time
from pathlib import Path

REQUIREMENTS = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "scipy": "scipy"}  # module: its pip package
if __name__ == "__main__" and (missing := [p for m, p in REQUIREMENTS.items() if not importlib.util.find_spec(m)]):
    sys.exit(f"error: {', '.join(missing)} not installed for {sys.executable}: pip install -r requirements.txt first (README)")

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
import pairs
import pictures
import results

# --------------------------------------------------------------------------------------------
# The trainable part: the projection head h_theta and the cluster centres of eq (2)
# --------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """h_theta: F^c = conv1x1(drop(F^p)) + conv1x1(SiLU(conv1x1(drop(F^p)))).

    "a linear convolution and two MLP nonlinear layers with SiLUs"; the sum of a linear and a nonlinear
    branch and Dropout2d(0.2), a mask of its own for each branch, follow SmooSeg, on which IL2Vseg builds.
    """

    def __init__(self, in_dim=384, dim=64, dropout=0.2):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.SiLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, feats):  # F^p (B, C1, h, w) -> F^c (B, C2, h, w)
        return self.linear(self.dropout(feats)) + self.nonlinear(self.dropout(feats))


def cosine_to_centres(codes, centres):
    """S_theta of eq (2): the cosine of every code (B, D, h, w) to every centre (K, D) -> (B, K, h, w)."""
    codes = F.normalize(codes, dim=1)
    centres = F.normalize(centres, dim=1)
    return torch.einsum("bdhw,kd->bkhw", codes, centres)  # eq (2)


@torch.no_grad()
def ema_update(global_centres, local_centres, momentum=0.998):
    """Global centres follow the local ones: g <- momentum g + (1 - momentum) l, in place (SmooSeg)."""
    return global_centres.mul_(momentum).add_(local_centres, alpha=1.0 - momentum)


class Segmenter(nn.Module):
    """What IL2Vseg trains: the head and the local / global cluster centres (K, D).

    Both centre sets start as the same xavier-normal unit rows; the local ones learn by Adam, the global
    ones are their EMA (a buffer). The frozen backbone stays outside, so checkpoints hold what is trained.
    """

    def __init__(self, n_clusters, in_dim=384, dim=64, dropout=0.2):
        super().__init__()
        self.head = ProjectionHead(in_dim, dim, dropout)
        local = F.normalize(nn.init.xavier_normal_(torch.empty(n_clusters, dim)), dim=1)
        self.local_centres = nn.Parameter(local)  # (K, D)
        self.register_buffer("global_centres", local.clone())  # (K, D)

    def forward(self, feats):  # F^p (B, C1, h, w) -> F^c (B, D, h, w)
        return self.head(feats)


def build_model(cfg, backbone, n_clusters, device):
    """A Segmenter for `backbone` (its width C1 is backbone.dim), drawn from --seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Segmenter(n_clusters, in_dim=backbone.dim, dim=cfg.dim, dropout=cfg.dropout).to(device)


# --------------------------------------------------------------------------------------------
# Eq (13): the fusion of the high- and low-level cues
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def align_clusters(f_low, f_seg, how="soft", temperature=0.1):
    """F^l (B, K, h, w) expressed in the head's clusters: channel k then speaks of head cluster k.

    FCM numbers its clusters arbitrarily and eq (13) adds them channel by channel; the paper does not
    say how they correspond. From the per-image overlap O[k, j] = sum_i softmax(F^seg_i / 0.1)[k] F^l_i[j]:
      soft        M[k, j] = O[k, j] / sum_k' O[k', j]       P(head k | colour j): many-to-one (training)
      likelihood  M[k, j] = O[k, j] / (sum_j' O[k, j'] + 1) ~ P(colour j | head k): + 1 grid cell (evaluation)
      hard        M = the permutation with the largest total overlap (Hungarian)
    and F^l'[k] = sum_j M[k, j] F^l[j]. Why each: docs/choices.md.
    """
    probs = torch.softmax(f_seg / temperature, dim=1)                          # (B, K, h, w)
    overlap = torch.einsum("bkhw,bjhw->bkj", probs, f_low)                     # O (B, K, K)
    if how == "soft":
        mapping = overlap / overlap.sum(dim=1, keepdim=True).clamp_min(1e-12)
    elif how == "likelihood":
        mapping = overlap / (overlap.sum(dim=2, keepdim=True) + 1.0)
    else:  # "hard"; a diverged head (NaN) is matched arbitrarily and named by the step's finiteness check
        mapping = torch.zeros_like(overlap)
        for b, one in enumerate(np.nan_to_num(overlap.cpu().numpy())):
            head_index, fcm_index = linear_sum_assignment(one, maximize=True)
            mapping[b, head_index, fcm_index] = 1.0
    return torch.einsum("bkj,bjhw->bkhw", mapping, f_low)                      # F^l' (B, K, h, w)


def fuse(f_seg, f_low, alpha=0.5, keep_scale=False):
    """Eq (13): F^f = (1 - alpha) F^seg + alpha F^l, with F^l already aligned (align_clusters).

    f_seg: cosines in [-1, 1]; f_low: the low-level cue on its [0, 1] scale, added as printed.
    keep_scale=True returns F^f / (1 - alpha) = F^seg + alpha / (1 - alpha) F^l (alpha < 1): the same
    argmax, with the high-level cue as sharp as without fusion, for the CRF's unary at evaluation.
    """
    f_fused = (1 - alpha) * f_seg + alpha * f_low                              # eq (13)
    return f_fused / (1 - alpha) if keep_scale else f_fused


# --------------------------------------------------------------------------------------------
# One training step: every term of eq (15)
# --------------------------------------------------------------------------------------------

def low_level_branch(cfg, n_clusters, stride):
    """F^l with the run's settings: images (B, 3, H, W) in [0, 1] -> (B, K, H/stride, W/stride)."""
    return functools.partial(fcm.low_level_cue, n_clusters=n_clusters, m=cfg.fcm_m, sigma=cfg.fcm_sigma,
                             patch=stride, affinity=cfg.affinity, radius=cfg.radius, max_iter=cfg.fcm_iters)


def loss_terms(backbone, model, images, cfg, generator, low_level=None, partners=None):
    """Eq (15) for one batch -> (total, {term: scalar}, F^seg detached). images (B, 3, H, W) in [0, 1];
    partners (B, 3, H, W) each image's nearest-neighbour image (STEGO's positive; None: no such term).

    `generator` draws I~, then the negatives, then the sampled points; `low_level` computes F^l (default:
    low_level_branch). A term switched off (--no-smo, ...) is 0. SmooSeg's data term goes with L_smo: it is
    the only term that trains the local centres (the head learns through the global ones only).
    """
    B, K = images.shape[0], model.local_centres.shape[0]
    f_low = (low_level or low_level_branch(cfg, K, backbone.stride))(images)  # eqs (1), (3)-(12): F^l (B, K, h, w)
    augmented = data.photometric_augment(images, generator=generator)         # I~: colour / luminosity jitter
    views = [images, augmented] + ([partners] if partners is not None else [])
    feats_all = backbones.features(backbone, torch.cat(views))                 # F^p of I, I~ (and kNN) (nB, C1, h, w)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        codes_all = model(feats_all).float()                                   # F^c; the losses compute in float32
    (feats, feats_aug, *feats_knn), (codes, codes_aug, *codes_knn) = feats_all.split(B), codes_all.split(B)

    f_seg = cosine_to_centres(codes, model.global_centres)                     # eq (2): the head learns here
    if cfg.alpha > 0:
        f_low = align_clusters(f_low, f_seg.detach(), how=cfg.align)
    f_fused = fuse(f_seg, f_low, cfg.alpha)                                    # eq (13) (B, K, h, w)
    scores = f_fused if cfg.fusion_in == "all" else f_seg                      # --fusion-in: what SmooSeg's terms see
    inner_local = cosine_to_centres(codes.detach(), model.local_centres)       # the local centres learn here
    zero = codes.new_zeros(())
    perm = losses.derangement(B, generator=generator, device=images.device) if B > 1 else None

    smo = data_term = fs = reg = corr = zero
    if cfg.use_smo:
        probs = torch.softmax(scores / cfg.smooth_temperature, dim=1)          # SmooSeg's P
        signal = model.head.dropout(feats)                                     # SmooSeg's fd: after a dropout of its own
        smo = losses.smoothness_loss(signal, probs, cfg.shift_close, cfg.shift_far, perm=perm)
        data_term = losses.data_loss(inner_local, scores)                     # SmooSeg's data term
    if cfg.use_corr:
        pair = {"aug": (feats_aug, codes_aug)} if cfg.use_aug else {}          # the paper's I with I~
        if partners is not None:
            pair["knn"] = (feats_knn[0], codes_knn[0])                         # STEGO's I with a nearest neighbour
        corr = losses.correspondence_terms(feats, codes, pair, shifts=cfg.corr_shifts, weights=cfg.corr_weights,
                                           generator=generator)["corr"]        # + I with itself, with other images
    if cfg.use_fs or cfg.use_reg:
        small = fcm.downsample(images, size=tuple(f_low.shape[2:]))           # eq (1): colours on the grid
        eq14 = losses.feature_correlation_losses if cfg.fs_reading == "correlation" else losses.feature_similarity_losses
        fs, reg = eq14(codes, f_fused, small)                                 # eq (14)
        fs, reg = (fs if cfg.use_fs else zero), (reg if cfg.use_reg else zero)

    total = cfg.beta * reg + cfg.gamma * fs + smo + corr + data_term          # eq (15), + SmooSeg's data term
    return total, {"smo": smo, "data": data_term, "fs": fs, "reg": reg, "corr": corr}, f_seg.detach()


def loss_values(total, terms, step):
    """The terms as floats for the log (one device sync), or a one-line FloatingPointError naming the
    first term that is not finite."""
    names = [*terms, "total"]
    values = dict(zip(names, torch.stack([*terms.values(), total]).detach().float().tolist()))
    for name, value in values.items():
        if not np.isfinite(value):
            raise FloatingPointError(f"step {step}: loss term {name} is {value} (not finite); try a lower "
                                     f"learning rate, or check the batch")
    return values


def cluster_usage(f_seg):
    """How the batch's pixels spread over the K clusters of F^seg (B, K, h, w): the perplexity of their
    argmax shares (K when balanced, 1 when one cluster holds every pixel) and the largest share."""
    shares = torch.bincount(f_seg.argmax(dim=1).flatten(), minlength=f_seg.shape[1]).float() / f_seg[:, 0].numel()
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum()
    return {"perplexity": float(entropy.exp()), "largest": float(shares.max())}


def collapsed_batch(usage, k):
    """The collapse alarm's test: one cluster holds over 90 % of the batch's pixels, or the pixels spread
    over fewer than a fifth of the K clusters (perplexity below K / 5: a few clusters share everything)."""
    return usage["largest"] > 0.9 or usage["perplexity"] < k / 5


def head_gradients(model, total, terms, cfg):
    """--verbose: the norm of the gradient each weighted term of eq (15) sends to the head (the data term
    trains only the local centres, so it sends none)."""
    weighted = {"smo": terms["smo"], "data": terms["data"], "corr": terms["corr"],
                "fs": cfg.gamma * terms["fs"], "reg": cfg.beta * terms["reg"], "total": total}
    params = list(model.head.parameters())
    norms = {}
    for name, value in weighted.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True) if value.requires_grad else []
        norms[name] = sum(float(g.float().square().sum()) for g in grads if g is not None) ** 0.5
    return norms


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

class Batches:
    """Index lists of the steps start .. n_steps - 1 (a DataLoader batch_sampler), computed lazily.

    Each epoch is a fresh permutation seeded by (seed, epoch), so the order depends on (seed, step)
    alone and a resumed run sees exactly the batches of an uninterrupted one. Items are (epoch, step, index).
    """

    def __init__(self, n_items, batch_size, seed, start, n_steps):
        self.n_items, self.batch_size, self.seed, self.start, self.n_steps = n_items, batch_size, seed, start, n_steps

    def __len__(self):
        return max(0, self.n_steps - self.start)

    def __iter__(self):
        per_epoch, order = self.n_items // self.batch_size, None
        for step in range(self.start, self.n_steps):
            epoch, position = divmod(step, per_epoch)
            if position == 0 or order is None:
                order = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield [(epoch, step, int(i)) for i in order[position * self.batch_size:(position + 1) * self.batch_size]]


class EpochItems(torch.utils.data.Dataset):
    """dataset[(epoch, step, index)]: the item as drawn in that epoch (data.py seeds a random crop by (seed,
    epoch, index)), with "partner", the image of its nearest neighbour drawn for that step (pairs.py), when
    `neighbours` (N, k) is given. Works inside DataLoader worker processes too."""

    def __init__(self, dataset, neighbours=None, seed=0):
        self.dataset, self.neighbours, self.seed = dataset, neighbours, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, step, index = key
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        if self.neighbours is not None:
            item["partner"] = self.dataset[pairs.partner_of(self.neighbours, self.seed, step, index)]["image"]
        return item


def make_optimiser(model, cfg):
    """Adam for the head (--lr-head) and the local centres (--lr-centres); fused on CUDA."""
    groups = [{"params": model.head.parameters(), "lr": cfg.lr_head},
              {"params": [model.local_centres], "lr": cfg.lr_centres}]
    return torch.optim.Adam(groups, fused=True) if model.local_centres.is_cuda else torch.optim.Adam(groups)


def train(backbone, model, dataset, cfg, device, log=print, progress=None):
    """Train the head and centres for --steps steps (continuing --resume); returns the logged values.

    `progress["saved"]` is kept at the last step written to OUT/checkpoint.pt, for the messages of a run
    that stops early.
    """
    progress = {} if progress is None else progress
    path = Path(cfg.out) / "checkpoint.pt"
    optimiser = make_optimiser(model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cfg.train_files = data.files_fingerprint(dataset)  # stored in the checkpoint: a resumed run must see the same files
    neighbours = pairs.neighbours_for_run(cfg, backbone, dataset, device, log) if cfg.knn and cfg.use_corr else None
    if cfg.resume:  # the run's shifts come back with the checkpoint
        start = checkpoints.resume(cfg, model, optimiser, generator, log)
    else:
        pairs.settle_shifts(cfg, backbone, dataset, neighbours, device, log)
        start = checkpoints.fresh_start(cfg)
    progress.update({"saved": start, "path": checkpoints.resumed_path(cfg)} if start else {})
    loader = torch.utils.data.DataLoader(EpochItems(dataset, neighbours, cfg.seed), num_workers=cfg.num_workers,
                                         batch_sampler=Batches(len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps),
                                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    low_level = low_level_branch(cfg, model.local_centres.shape[0], backbone.stride)
    if cfg.compile and device.type == "cuda":
        low_level = compiled_with_fallback(low_level, log)
    model.train()
    history, started, collapsed = [], time.time(), 0
    last_line = started
    log(loss_legend(cfg))
    for step, batch in enumerate(loader, start + 1):
        images = batch["image"].to(device, non_blocking=True)                   # (B, 3, H, W) in [0, 1]
        partners = batch["partner"].to(device, non_blocking=True) if "partner" in batch else None
        total, terms, f_seg = loss_terms(backbone, model, images, cfg, generator, low_level, partners)
        values = {**loss_values(total, terms, step), **cluster_usage(f_seg)}
        now = time.time()  # a line every --log-every steps, and at least every 10 s of work
        logged = step % cfg.log_every == 0 or step == cfg.steps or step == start + 1 or now - last_line >= 10
        if cfg.verbose and logged:
            values["grad"] = head_gradients(model, total, terms, cfg)
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        ema_update(model.global_centres, model.local_centres, cfg.ema)
        history.append(values)
        collapsed = collapsed + 1 if collapsed_batch(values, model.local_centres.shape[0]) else 0
        if collapsed == 20:  # once per collapse: 20 collapsed steps in a row
            log(f"WARNING: step {step}: the clusters collapse: for 20 steps in a row the largest of the "
                f"{model.local_centres.shape[0]} clusters held {values['largest']:.0%} of the batch's pixels "
                f"(perplexity {values['perplexity']:.1f}); the loss shifts may not fit this backbone: try --shifts calibrate")
        if logged:
            last_line, elapsed = time.time(), max(time.time() - started, 1e-9)
            eta = elapsed / (step - start) * (cfg.steps - step)
            log(f"step {step}/{cfg.steps} | {weighted_terms(values, cfg)}"
                + f" | clusters: perplexity {values['perplexity']:.1f}, largest {values['largest']:.0%}"
                + f" | {(step - start) * cfg.batch_size / elapsed:.1f} img/s, "
                + ("done" if step == cfg.steps else f"ETA {results.format_duration(eta)}"))
            if "grad" in values:
                log("  gradient norm on the head, weighted as in eq (15): " + " ".join(
                    f"{k} {v:.4f}" for k, v in values["grad"].items() if k != "data")
                    + " (SmooSeg's data term trains only the local centres)")
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoints.save_checkpoint(checkpoints.training_state(model, optimiser, step, generator, cfg), path)
            progress.update(saved=step, path=path)
    log(f"checkpoint: {path} (step {progress.get('saved', start)})")
    return history


def loss_legend(cfg):
    """The one line that says what the progress lines print."""
    return (f"progress: each term of eq (15) as it enters the total: smo = L_smo, data = SmooSeg's data term "
            f"(not in eq 15; it trains the local centres), corr = L_corr, gamma*fs = {cfg.gamma} L_fs, "
            f"beta*reg = {cfg.beta} L_reg; clusters: perplexity of the batch's argmax shares (K when balanced), "
            f"largest share")


def weighted_terms(values, cfg):
    """'smo +0.1 + data +0.2 + corr ... = total +0.3': the terms as weighted in eq (15)'s total."""
    weighted = {"smo": values["smo"], "data": values["data"], "corr": values["corr"],
                "gamma*fs": cfg.gamma * values["fs"], "beta*reg": cfg.beta * values["reg"]}
    return " + ".join(f"{k} {v:+.4f}" for k, v in weighted.items()) + f" = total {values['total']:+.4f}"


def compiled_with_fallback(low_level, log=print):
    """low_level under torch.compile(mode="reduce-overhead") (CUDA graphs replay the FCM's many small
    kernels; --compile); if it cannot compile, one line says so and it runs eagerly."""
    compiled = [torch.compile(functools.partial(low_level, early_exit=False), mode="reduce-overhead")]

    def branch(images):
        if compiled:
            try:
                return compiled[0](images).clone()  # the CUDA graph reuses its output buffer
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                log(f"note: torch.compile of the low-level branch failed ({checkpoints.one_line(error)}); "
                    f"it runs eagerly")
                compiled.clear()
        return low_level(images)
    return branch


# --------------------------------------------------------------------------------------------
# Evaluation and prediction: the model's side of evaluate.py's protocol
# --------------------------------------------------------------------------------------------

def make_code_fn(backbone, model):
    """images (B, 3, H, W) in [0, 1] -> codes F^c (B, D, h, w), eval mode, no gradient."""
    def code_fn(images):
        model.eval()
        with torch.no_grad():
            return model(backbones.features(backbone, images))
    return code_fn


def make_score_fn(cfg, n_clusters, stride):
    """The scores evaluate.py turns into the prediction, for one probe's centres (K, D):
    (images (B, 3, H, W), codes (B, D, h, w), centres, size (H', W')) -> (B, K, H', W').

    Eq (2) on the codes upsampled to the label size (as SmooSeg predicts); with --eval-alpha a > 0 also
    eq (13): F^l aligned to these centres by --eval-align on the feature grid, upsampled, fused with
    keep_scale (docs/choices.md).
    """
    low_level = low_level_branch(cfg, n_clusters, stride) if cfg.eval_alpha > 0 else None

    def score_fn(images, codes, centres, size):
        upsample = functools.partial(F.interpolate, size=size, mode="bilinear", align_corners=False)
        f_seg = cosine_to_centres(upsample(codes), centres)                    # eq (2) (B, K, H', W')
        if low_level is None:
            return f_seg
        f_low = align_clusters(low_level(images), cosine_to_centres(codes, centres), how=cfg.eval_align)
        return fuse(f_seg, upsample(f_low), cfg.eval_alpha, keep_scale=True)  # eq (13)
    return score_fn


def run_evaluation(backbone, model, cfg, device, datasets, log=print, training=None):
    """evaluate.run_protocol for this model: its codes, its global centres as the "centres" probe."""
    score_fn = make_score_fn(cfg, model.global_centres.shape[0], backbone.stride)
    return evaluate.run_protocol(make_code_fn(backbone, model), score_fn, model.global_centres, datasets, cfg,
                                 device, log, training)


def predict_folder(backbone, model, cfg, device, images, out_dir, log=print):
    """--predict: a colour mask and an overlay per image, from the global centres (no labels needed)."""
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=cfg.num_workers)
    score_fn = make_score_fn(cfg, model.global_centres.shape[0], backbone.stride)
    how = (f"centres probe ({results.PROBES['centres'].split(',')[0]}), "
           + ("CRF off" if cfg.no_crf else "with the dense CRF")
           + (f", --eval-alpha {cfg.eval_alpha} (F^l fused, eq 13)" if cfg.eval_alpha > 0 else ""))
    log(f"predicting {len(images)} images of {cfg.predict}: {how}")
    ticker = results.Ticker("prediction", len(images), log)
    paths = evaluate.predict_folder(make_code_fn(backbone, model), score_fn, loader, model.global_centres, out_dir,
                                    device=device, use_crf=not cfg.no_crf, flip=cfg.flip_tta, tick=ticker.tick)
    made = results.write_provenance(out_dir, results.provenance(
        cfg, getattr(cfg, "checkpoint_step", None), prediction=how,
        files="NAME_ids.png: cluster id per pixel (uint8), NAME_mask.png: its colours, NAME_overlay.png: over the "
              "image; all at the input's size"))
    log(f"wrote {len(paths)} files for {len(images)} images to {out_dir} (NAME_ids.png, NAME_mask.png, "
        f"NAME_overlay.png) and {made.name}")
    return paths


@torch.no_grad()
def explain_stages(backbone, model, cfg, images, alpha, align, pixel):
    """Every stage of the method for images (1, 3, H, W) in [0, 1], wired as loss_terms (training, eval
    mode, at `alpha` and `align`) and make_score_fn (the --predict prediction from the global centres).
    pixel (row, col) of the image. Returns {name: tensor} on the feature grid (h, w) unless said."""
    K, stride = model.global_centres.shape[0], backbone.stride
    code_fn = make_code_fn(backbone, model)
    codes = code_fn(images)                                                    # F^c (1, D, h, w)
    x = fcm.downsample(images, stride)                                         # eq (1)  (1, 3, h, w)
    P, _, _ = fcm.spatial_fcm(x, K, cfg.fcm_m, max_iter=cfg.fcm_iters)         # eqs (3)-(8)  (1, K, h, w)
    f_low = low_level_branch(cfg, K, stride)(images)                           # eq (12)  F^l (1, K, h, w)
    f_seg = cosine_to_centres(codes, model.global_centres)                     # eq (2)  (1, K, h, w)
    f_fused = fuse(f_seg, align_clusters(f_low, f_seg, how=align) if alpha > 0 else f_low, alpha)  # eq (13)
    predicted = evaluate.flip_tta(code_fn, images) if cfg.flip_tta else codes
    probs = evaluate.cluster_probs(make_score_fn(cfg, K, stride), images, predicted, model.global_centres,
                                   images.shape[-2:])                          # (1, K, H, W)
    h, w = x.shape[-2:]
    row, col = min(pixel[0] // stride, h - 1), min(pixel[1] // stride, w - 1)
    affinity = fcm.colour_affinity(x, cfg.fcm_sigma)[0, row * w + col].reshape(h, w)  # eqs (9)-(11): A's row
    if cfg.affinity != "global":  # "local": the (2r+1)^2 window the run uses; "none": F^l = P, A = I
        r = cfg.radius if cfg.affinity == "local" else 0
        rows, cols = torch.arange(h)[:, None], torch.arange(w)[None]
        affinity = affinity * (((rows - row).abs() <= r) & ((cols - col).abs() <= r)).to(affinity)
    return {"x": x[0], "P": P[0], "f_low": f_low[0], "f_seg": f_seg[0], "f_fused": f_fused[0],
            "pred": probs[0].argmax(0), "pred_crf": None if cfg.no_crf else
            evaluate.refine_with_crf(images, probs)[0].argmax(0), "affinity": affinity, "cell": (row, col)}


def explain_folder(backbone, model, cfg, device, images, out_dir, alpha, align, log=print):
    """--explain: OUT_DIR/NAME.png per image, the captioned stages of explain_stages in two rows."""
    K, paths = model.global_centres.shape[0], []
    for index, item in enumerate(images):
        image = item["image"][None].to(device)                                # (1, 3, H, W)
        where = images.samples[index]["image"] if hasattr(images, "samples") else item["name"]
        H, W = image.shape[-2:]
        pixel = cfg.explain_pixel or (H // 2, W // 2)
        if not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
            raise ValueError(f"{where}: --explain-pixel {pixel[0]},{pixel[1]} lies outside the image "
                             f"as the model sees it ({H} rows, {W} columns)")
        s = explain_stages(backbone, model, cfg, image, alpha, align, pixel)
        big = lambda panel: pictures.enlarge(panel, H, W)  # noqa: E731 - the feature grid at the image's size
        ids = lambda scores: big(results.colourise(scores.argmax(0)))  # noqa: E731
        heat = pictures.mark(big(pictures.heat(s["affinity"].cpu().numpy(), 0, 1)), *pixel)
        panels = [(results.image_to_uint8(image[0]), "image"), (big(results.image_to_uint8(s["x"])), "x, eq (1)"),
                  (ids(s["P"]), "argmax P, eq (8)"), (ids(s["f_low"]), "argmax F^l, eq (12)"),
                  (big(pictures.heat(s["f_low"].max(0).values.cpu().numpy(), 0, 1)), "max_k F^l (0..1)"),
                  (heat, f"row of A at {pixel[0]},{pixel[1]}, eqs 9-11"), (ids(s["f_seg"]), "argmax F^seg, eq (2)"),
                  (ids(s["f_fused"]), f"argmax F^f, eq (13), a={alpha:g}"),
                  (results.colourise(s["pred"]), "prediction")]
        panels += [(results.colourise(s["pred_crf"]), "prediction + CRF")] if s["pred_crf"] is not None else []
        names = [f"cluster {k}" for k in range(K)]
        title = (f"{item['name']}: {cfg.checkpoint or cfg.out}, K={K}, alpha={alpha:g}, align {align}; "
                 f"P and F^l number FCM's clusters, the others the head's")
        picture = pictures.grid(panels, columns=5, entries=pictures.legend_entries(names, results.palette(K)),
                                title=title)
        paths.append(pictures.save_png(Path(out_dir) / f"{results.safe_stem(item['name'])}.png", picture))
    log(f"wrote {len(paths)} pictures of the stages to {out_dir}")
    return paths


# --------------------------------------------------------------------------------------------
# Training and evaluating in one go, and the paper's ablations (Figure 5, Table 4; cli.ablation_runs)
# --------------------------------------------------------------------------------------------

def train_and_evaluate(cfg, backbone, device, datasets, log=print, progress=None):
    """Train from --seed, then evaluate the last step (no checkpoint is selected on labelled data)."""
    model = build_model(cfg, backbone, datasets[0].n_classes, device)
    log(f"training on {len(datasets[0])} {cfg.data} images: {cfg.steps} steps, batch {cfg.batch_size}, crop "
        f"{cfg.crop}, alpha {cfg.alpha}, beta {cfg.beta}, gamma {cfg.gamma}, device {device}")
    history = train(backbone, model, datasets[0], cfg, device, log, progress)
    cfg.checkpoint_step = cfg.steps
    return model, run_evaluation(backbone, model, cfg, device, datasets, log,
                                 training_summary(history, model.local_centres.shape[0]))


def training_summary(history, k):
    """metrics.json's "training": the last step's loss terms and cluster usage, and how many steps were
    collapsed (collapsed_batch)."""
    if not history:
        return None
    last = {k: v for k, v in history[-1].items() if k != "grad"}
    return {"steps_run": len(history), "last": last, "collapsed_steps": sum(collapsed_batch(v, k) for v in history)}


def run_ablation(cfg, backbone, device, datasets, log=print):
    """One training + evaluation per row of Figure 5 or Table 4, then their table (OUT/ablation_NAME.txt).
    Figure 5 varies the training alpha only ("(training)"); every row is evaluated by the same protocol."""
    rows = []
    for name, change, folder in cli.ablation_runs(cfg):
        run_cfg = copy.deepcopy(cfg)
        vars(run_cfg).update(change, resume=None, out=str(folder), eval_out=None)  # each row's results in its folder
        log(f"=== ablation {name} -> {run_cfg.out}")
        rows.append((name, train_and_evaluate(run_cfg, backbone, device, datasets, log)[1]["probes"]))
    title = "Figure 5: low-level cue weight (training alpha)" if cfg.ablation == "alpha" else "Table 4: loss terms"
    made = results.provenance(cfg, cfg.steps)
    table = results.format_ablation(title, rows, results.provenance_lines(made))
    log(table)
    path = Path(cfg.out) / f"ablation_{cfg.ablation}.txt"
    checkpoints.write_text_atomic(path, table + "\n")
    if "warning" in made:
        log(made["warning"])
    log(f"wrote {path} and, per row, checkpoint.pt and metrics.json in {Path(cfg.out) / 'ablation_*'}")
    random = " (--weights random: untrained backbone)" if cfg.weights == "random" else ""
    chart = pictures.save_png(Path(cfg.out) / f"ablation_{cfg.ablation}.png",
                              pictures.ablation_chart(f"{title}: mIoU on {cfg.data} {cfg.val_split}{random}", rows))
    log(f"chart: {chart}")
    return rows


# --------------------------------------------------------------------------------------------
# The command line (its flags, defaults and checks are cli.py)
# --------------------------------------------------------------------------------------------

def run(cfg, progress):
    """What `python il2vseg.py ...` does: data, backbone, train or load, evaluate, predict."""
    device = cli.settle(cfg)                                     # defaults and every flag checked
    datasets, predict_set = cli.build_datasets(cfg)              # every file checked before any weights load
    explain_set = cli.explain_images(cfg)
    trained = None if cfg.train or cfg.ablation or cfg.calibrate else cli.trained_checkpoint(cfg, datasets)
    with cli.output_folder(cfg, predict_set, explain_set):       # writable, locked, nothing overwritten
        backbone = backbones.load_backbone(cfg.arch, cfg.weights, seed=cfg.seed).to(device)
        if cfg.calibrate:
            neighbours = pairs.neighbours_for_run(cfg, backbone, datasets[0], device) if cfg.knn else None
            return pairs.calibrate(cfg, backbone, datasets[0], neighbours, device)
        if cfg.ablation:
            return run_ablation(cfg, backbone, device, datasets)
        if cfg.train:
            model, _ = train_and_evaluate(cfg, backbone, device, datasets, progress=progress)
        else:
            model = Segmenter(trained["n_clusters"], in_dim=backbone.dim, dim=cfg.dim).to(device)
            cfg.checkpoint_step = trained["step"]
            checkpoints.restore(model, trained["model"], cfg.checkpoint)
            if cfg.eval:
                run_evaluation(backbone, model, cfg, device, datasets)
        if cfg.predict:
            predict_folder(backbone, model, cfg, device, predict_set, Path(cfg.predict_out))
        if cfg.explain:
            trained_cfg = trained["config"] if trained else vars(cfg)
            explain_folder(backbone, model, cfg, device, explain_set, Path(cfg.explain_out),
                           trained_cfg.get("alpha", cfg.alpha), trained_cfg.get("align", cfg.align))


def main(argv=None):
    cfg, progress = cli.parse_args(argv), {}
    try:
        previous = signal.signal(signal.SIGTERM, cli.terminate)  # SIGTERM: one line saying where the checkpoint is
    except ValueError:  # not the main thread: SIGTERM keeps its default
        previous = None
    try:
        run(cfg, progress)
        return 0
    except BaseException as error:  # noqa: BLE001 - a failure of the input is one line (cli.report); a bug re-raises
        return cli.report(error, cfg, progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
