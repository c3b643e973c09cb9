"""IL2Vseg: the model, its training loop and the command line.

Covers the paper's "Preliminary" and "Visual Characteristics of the Fused" sections and its
"Implementation Details":

  F^p   = f_theta(I)                 frozen DINO ViT-S/8 features, (B, 384, H/8, W/8)
  F^c   = h_theta(F^p)               projection head: 1x1 conv + 2-layer MLP with SiLU
  F^seg = S_theta(F^c)               cosine similarity to K cluster centres            eq (2)
  F^l   = f_gamma(bilinear(I))       low-level cue, see fcm.py                         eqs (1), (3)-(12)
  F^f   = (1 - a) F^seg + a F^l      fusion, after aligning the FCM clusters to the head's  eq (13)
  L     = b L_reg + g L_fs + L_smo + L_corr                                             eq (15), see losses.py

Local centres are trained by Adam, global centres follow them by an exponential moving average
(as in SmooSeg). The backbone is a plain-PyTorch ViT that loads the official DINO state dict through
`torch.hub.load_state_dict_from_url` (so a file already in $TORCH_HOME/hub/checkpoints is used
offline) or from `--weights PATH`.

Run `python il2vseg.py --help` for the command line; README.md has the walk-through.
"""
import argparse
import functools
import math
import os
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# --------------------------------------------------------------------------------------------
# The frozen backbone: DINO ViT (Caron et al. 2021) in plain PyTorch
# --------------------------------------------------------------------------------------------

DINO_URLS = {
    # The torch.hub `dino_vits8` weights (ViT-S/8, 800 epochs): 86,728,949 bytes.
    "vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}

# name -> (patch size, embedding width, depth, heads)
VIT_CONFIGS = {
    "vits8": (8, 384, 12, 6),
    "vits16": (16, 384, 12, 6),
    "vitb8": (8, 768, 12, 12),
}

class WeightsError(RuntimeError):
    """Backbone weights are missing or do not fit the architecture (one-line message)."""


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, N, dim)
        B, N, dim = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, dim/heads)
        # softmax(q k^T / sqrt(d)) v, fused (flash / memory-efficient kernels where available)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, dim))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, dim)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT with the official parameter names, so the official state dict loads as is.

    forward(images) returns the last block's output after the final LayerNorm with the CLS token
    dropped, as a feature map (B, dim, H/patch, W/patch). `images` are ImageNet-normalised.
    """

    def __init__(self, patch=8, dim=384, depth=12, heads=6, mlp_ratio=4, pretrain_size=224):
        super().__init__()
        self.patch = patch
        self.dim = dim
        grid = pretrain_size // patch  # 28 for ViT-S/8: pos_embed (1, 1 + 28*28, dim)
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, h, w):
        """pos_embed for an h x w patch grid; the patch part is bicubically interpolated.

        Exactly as DINO's interpolate_pos_encoding: scale factors (h + 0.1) / side and
        (w + 0.1) / side (the 0.1 avoids floating-point rounding of the output size), so the
        features match those of DINO, STEGO and SmooSeg at every input size.
        """
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1,1,dim), (1,n,dim)
        side = int(math.sqrt(patch_pos.shape[1]))
        if (h, w) == (side, side):
            return self.pos_embed
        grid = patch_pos.reshape(1, side, side, self.dim).permute(0, 3, 1, 2)  # (1, dim, side, side)
        grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / side, (w + 0.1) / side),
                             mode="bicubic", align_corners=False)  # (1, dim, h, w)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, self.dim)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + h*w, dim)

    def forward(self, images):  # (B, 3, H, W)
        B, _, H, W = images.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {self.patch}")
        h, w = H // self.patch, W // self.patch
        x = self.patch_embed(images)  # (B, h*w, dim)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+h*w, dim)
        x = x + self.position_embedding(h, w).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]  # drop CLS: (B, h*w, dim)
        return x.transpose(1, 2).reshape(B, self.dim, h, w)  # (B, dim, h, w)


def build_vit(arch="vits8"):
    if arch not in VIT_CONFIGS:
        raise ValueError(f"unknown backbone '{arch}', choose one of {sorted(VIT_CONFIGS)}")
    patch, dim, depth, heads = VIT_CONFIGS[arch]
    return VisionTransformer(patch=patch, dim=dim, depth=depth, heads=heads)


def clean_state_dict(state):
    """Accept the official file and the common wrappers around it.

    The official DINO backbone file is a plain state dict. Full DINO training checkpoints hold
    {"teacher": {...}, "student": {...}} with "module." / "backbone." prefixes; the teacher is the
    one DINO evaluates. The projection "head." of such checkpoints is not part of the backbone.
    """
    if isinstance(state, dict):
        for key in ("teacher", "state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise WeightsError(f"the weight file holds a {type(state).__name__}, not a state dict")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("head."):
            continue
        cleaned[key] = value
    return cleaned


def load_backbone_state(model, state, source):
    """Strict key and shape check, then load. `source` names the file in error messages."""
    state = clean_state_dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise WeightsError(f"{source} does not fit this ViT: " + ", ".join(problems)
                           + " -- is it the right --arch?")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def offline_hint(arch):
    url = DINO_URLS[arch]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"download {url} on a machine with internet and put it into {folder}/ "
            f"(the folder $TORCH_HOME/hub/checkpoints), or pass --weights PATH "
            f"(--weights random runs an untrained backbone for smoke tests)")


def load_dino(arch="vits8", weights=None, log=print):
    """Frozen DINO backbone in eval mode.

    weights: None -> official file via torch.hub.load_state_dict_from_url (cached in
    $TORCH_HOME/hub/checkpoints, used offline when present); a path -> that file;
    "random" -> random initialisation (smoke tests only; its scores mean nothing).
    """
    model = build_vit(arch)
    if weights == "random":
        log("WARNING: --weights random: the backbone is RANDOMLY INITIALISED. Every score this run "
            "prints is meaningless; use it for smoke tests only.")
    elif weights is None:
        url = DINO_URLS[arch]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True,
                                                       weights_only=True)
        except (urllib.error.URLError, OSError, ConnectionError) as error:
            raise WeightsError(f"cannot get the DINO {arch} weights ({type(error).__name__}: "
                               f"{error}); {offline_hint(arch)}") from None
        except Exception as error:  # a corrupt or truncated file in the cache
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            raise WeightsError(f"{cached}: cannot be read as a torch file ({type(error).__name__}); delete it "
                               f"and download it again; {offline_hint(arch)}") from None
        load_backbone_state(model, state, Path(url).name)
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {path}: no such file; {offline_hint(arch)}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt, truncated or not a torch file
            raise WeightsError(f"--weights {path}: cannot be read as a torch file "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        load_backbone_state(model, state, str(path))
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# The trainable part: projection head h_theta and the cluster centres
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
    """S_theta: cosine similarity of every code vector to every centre, eq (2).

    codes (B, D, h, w), centres (K, D) -> (B, K, h, w), values in [-1, 1].
    """
    codes = F.normalize(codes, dim=1)
    centres = F.normalize(centres, dim=1)
    return torch.einsum("bdhw,kd->bkhw", codes, centres)  # eq (2)


@torch.no_grad()
def ema_update(global_centres, local_centres, momentum=0.998):
    """Global centres follow the local ones: g <- momentum * g + (1 - momentum) * l (in place)."""
    global_centres.mul_(momentum).add_(local_centres.detach(), alpha=1.0 - momentum)
    return global_centres


# --------------------------------------------------------------------------------------------
# Fusion of the high- and low-level cues, eq (13)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def align_clusters(low_level, seg_probs):
    """Permute the FCM clusters of each image so that cluster k of F^l means cluster k of the head.

    FCM numbers its clusters arbitrarily (by its initialisation), while eq (13) adds F^l to F^seg
    channel by channel; the paper does not say how the two are put in correspondence. We match
    them per image by their soft overlap O[k, j] = sum_pixels seg_probs[k] * low_level[j] with the
    Hungarian algorithm (maximum total overlap) and reorder F^l accordingly.

    low_level (B, K, h, w), seg_probs (B, K, h, w) -> low_level permuted, (B, K, h, w).
    Needs scipy (one small (K, K) assignment per image on the CPU).
    """
    overlap = torch.einsum("bkhw,bjhw->bkj", seg_probs.float(), low_level.float())  # (B, K, K)
    overlap = overlap.cpu().numpy()
    order = np.empty(overlap.shape[:2], dtype=np.int64)  # order[b, k] = FCM cluster for head cluster k
    for b in range(overlap.shape[0]):
        head_idx, fcm_idx = linear_sum_assignment(overlap[b], maximize=True)
        order[b, head_idx] = fcm_idx
    index = torch.from_numpy(order).to(low_level.device)[:, :, None, None]  # (B, K, 1, 1)
    return torch.gather(low_level, 1, index.expand_as(low_level))


def fuse(f_seg, f_low, alpha=0.5, temperature=0.1):
    """F^f = (1 - alpha) F^seg + alpha F^l, eq (13), after aligning F^l's clusters to F^seg's.

    f_seg (B, K, h, w) cosine similarities, f_low (B, K, h, w) low-level cluster probabilities.
    Both are added as printed; the alignment uses softmax(f_seg / temperature) as the head's soft
    assignment. alpha = 0 -> high-level cue only, alpha = 1 -> low-level cue only (Figure 5).
    """
    if f_seg.shape != f_low.shape:
        raise ValueError(f"F_seg {tuple(f_seg.shape)} and F_l {tuple(f_low.shape)} must have the same shape")
    if alpha > 0:
        f_low = align_clusters(f_low, torch.softmax(f_seg.detach() / temperature, dim=1))
    return (1 - alpha) * f_seg + alpha * f_low  # eq (13)


class Segmenter(nn.Module):
    """Everything IL2Vseg trains: the projection head and the local / global cluster centres.

    The frozen backbone is kept outside this module so that checkpoints hold only what is trained.
    Local centres (K, D) are learned by Adam; global centres are an EMA copy of them (a buffer,
    never a gradient target). Both are L2-normalised wherever they are used.
    """

    def __init__(self, n_clusters, in_dim=384, dim=64, dropout=0.2):
        super().__init__()
        self.head = ProjectionHead(in_dim, dim, dropout)
        local = torch.empty(n_clusters, dim)
        nn.init.xavier_normal_(local)
        local = F.normalize(local, dim=1)  # unit rows, as SmooSeg
        self.local_centres = nn.Parameter(local)  # (K, D)
        self.register_buffer("global_centres", local.clone())  # (K, D)

    def forward(self, feats):  # (B, in_dim, h, w) -> codes F^c (B, D, h, w)
        return self.head(feats)


def backbone_features(backbone, images):
    """F^p = f_theta(I): ImageNet-normalise images in [0, 1] and run the frozen ViT.

    images (B, 3, H, W) in [0, 1] -> (B, C1, H/8, W/8) float32. bf16 autocast on CUDA.
    """
    import data

    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                         enabled=images.device.type == "cuda"):
        feats = backbone(data.normalize(images))
    return feats.float()


# --------------------------------------------------------------------------------------------
# One training step: all terms of eq (15)
# --------------------------------------------------------------------------------------------

def low_level_branch(cfg, n_clusters, patch, cuda_graph=False):
    """The low-level cue F^l (eqs 1, 3-12) with cfg's FCM settings: a callable
    images (B, 3, H, W) in [0, 1] -> (B, K, H/patch, W/patch).

    cuda_graph=True (the training loop, unless --no-cuda-graph): on CUDA replayed from a CUDA graph
    captured once per batch shape (fcm.GraphedLowLevelCue; the same numbers, one launch per step).
    """
    import fcm
    settings = dict(m=cfg.fcm_m, sigma=cfg.fcm_sigma, patch=patch, max_iter=cfg.fcm_iters)
    if cuda_graph and not cfg.no_cuda_graph:
        return fcm.GraphedLowLevelCue(n_clusters, **settings)
    return functools.partial(fcm.low_level_cue, n_clusters=n_clusters, **settings)


def loss_terms(backbone, model, images, cfg, generator, low_level=None):
    """Compute every loss term for one batch; returns a dict name -> scalar tensor.

    images (B, 3, H, W) in [0, 1]. cfg is the argparse namespace (alpha, fcm settings, shifts, ...).
    low_level: the low-level branch (see low_level_branch; the eager one when not given).
    """
    import data
    import losses

    B = images.shape[0]
    n_clusters = model.local_centres.shape[0]
    if low_level is None:
        low_level = low_level_branch(cfg, n_clusters, backbone.patch)
    # eqs (1), (3)-(12): the low-level cue. Called first: it needs the images only, so its input
    # check (a host sync) does not wait for this step's backbone.
    f_low = low_level(images)  # (B, K, h, w)
    augmented = data.photometric_augment(images, generator=generator)  # I~: colour/luminosity jitter
    feats_both = backbone_features(backbone, torch.cat([images, augmented]))  # (2B, C1, h, w)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        codes_both = model(feats_both).float()  # (2B, D, h, w); the losses compute in float32
    feats, feats_aug = feats_both[:B], feats_both[B:]
    codes, codes_aug = codes_both[:B], codes_both[B:]

    # eq (2): F^seg against the global centres; the head learns through this branch only.
    f_seg = cosine_to_centres(codes, model.global_centres)  # (B, K, h, w)
    # local centres learn from detached codes (SmooSeg's data term)
    inner_local = cosine_to_centres(codes.detach(), model.local_centres)  # (B, K, h, w)

    terms = {}
    terms["data"] = losses.data_loss(inner_local, f_seg)
    perm = losses.derangement(B, generator=generator, device=images.device) if B > 1 else None
    probs = torch.softmax(f_seg / cfg.smooth_temperature, dim=1)
    terms["smo"] = losses.smoothness_loss(feats, probs, cfg.shift_close, cfg.shift_far, perm=perm)
    corr = losses.correspondence_terms(feats, codes, feats_aug, codes_aug, shifts=cfg.corr_shifts,
                                       weights=cfg.corr_weights, generator=generator)
    terms["corr"] = corr["corr"]

    # eq (13). Last of the forward pass: aligning F^l to F^seg waits for the GPU (a host sync for
    # the Hungarian matching on the CPU), so everything above is queued before it.
    f_fused = fuse(f_seg, f_low, cfg.alpha)  # (B, K, h, w)
    # colours for the pixel similarity: eq (1) as fcm.downsample, without its NaN check (a host sync;
    # low_level checked these images already)
    small = F.interpolate(images, size=f_low.shape[2:], mode="bilinear", align_corners=False)  # (B, 3, h, w)
    terms["fs"], terms["reg"] = losses.feature_similarity_losses(codes, f_fused, small)  # eq (14)
    return terms


# --------------------------------------------------------------------------------------------
# Checkpoints: written atomically, resumed exactly
# --------------------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or from another configuration (one-line message)."""


def save_checkpoint(state, path):
    """torch.save to a temporary file in the same folder, fsync, then atomically rename.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    half-written file under the checkpoint's name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (train first, or point --checkpoint at one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not an il2vseg checkpoint (no model/step entries)")
    return state


def restore(module, state, path):
    """load_state_dict with a one-line error when the checkpoint is from another configuration."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(f"{path} does not fit this {type(module).__name__} (another --data, --dim "
                              f"or --arch?): {first[-1].strip()[:200] if first else error}") from None


def rng_state(generator):
    """Everything random in training: the global torch RNG (dropout) and the step generator
    (augmentation, sampled points, negatives). Python's and numpy's global RNGs are never used
    (data.py seeds its crops per item), so they need no saving."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "generator_device": generator.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator, log=print):
    torch.set_rng_state(state["torch"])
    if state.get("generator_device", "cpu") == generator.device.type:
        generator.set_state(state["generator"])
    else:  # CPU and CUDA generators have different states: the run goes on, but not bit-identically
        log(f"note: the checkpoint was trained on {state.get('generator_device')}, this run is on "
            f"{generator.device.type}: its random stream restarts from --seed (not bit-identical)")
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def batches_for_steps(n_items, batch_size, seed, start_step, n_steps):
    """Index lists for steps start_step .. n_steps-1, a fresh seeded permutation each epoch.

    The order depends only on (seed, step), so a resumed run sees exactly the batches an
    uninterrupted one would have seen.
    """
    per_epoch = n_items // batch_size
    for step in range(start_step, n_steps):
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        yield [(epoch, int(i)) for i in order[position * batch_size:(position + 1) * batch_size]]


class EpochItems(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: the item as drawn in that epoch (its random crop and flip are
    seeded by (seed, epoch, index) in data.py), also inside DataLoader worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


# settings a resumed run must share with the checkpoint (they decide data order and shapes)
RESUME_MUST_MATCH = ("data", "train_split", "arch", "dim", "dropout", "batch_size", "crop", "seed",
                     "five_crop", "alpha", "beta", "gamma", "use_smo", "use_fs", "use_reg", "use_corr",
                     "lr_head", "lr_centres", "ema", "fcm_m", "fcm_sigma", "fcm_iters", "smooth_temperature")


def make_optimiser(model, cfg):
    """Adam for the head (cfg.lr_head) and the local centres (cfg.lr_centres). On CUDA the fused
    implementation: one kernel for all parameters instead of a dozen per parameter tensor."""
    groups = [{"params": model.head.parameters(), "lr": cfg.lr_head},
              {"params": [model.local_centres], "lr": cfg.lr_centres}]
    if model.local_centres.is_cuda:
        return torch.optim.Adam(groups, fused=True)
    return torch.optim.Adam(groups)


def use_own_implementation(optimiser):
    """After load_state_dict: keep this run's Adam implementation (fused on CUDA, the default on the
    CPU). load_state_dict takes the flags of the run that wrote the checkpoint (maybe on another
    device) from its param groups; `step` counters go where this implementation keeps them (on the
    parameter's device when fused, on the CPU otherwise)."""
    for group in optimiser.param_groups:
        group["fused"] = optimiser.defaults.get("fused")
        group["foreach"] = optimiser.defaults.get("foreach")
        for param in group["params"]:
            state = optimiser.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device if group["fused"] else "cpu",
                                                  dtype=torch.float32)


def checkpoint_state(model, optimiser, step, generator, cfg, n_clusters):
    return {"step": step, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
            "rng": rng_state(generator), "n_clusters": n_clusters,
            "config": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))}}


def train(backbone, model, dataset, cfg, device, log=print):
    """Train the head and centres for cfg.steps steps; returns the list of total losses per step."""
    import losses

    out = Path(cfg.out)
    checkpoint_path = out / "checkpoint.pt"
    optimiser = make_optimiser(model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start_step = 0
    if cfg.resume:
        resume_path = Path(cfg.resume) if isinstance(cfg.resume, str) else checkpoint_path
        state = load_checkpoint(resume_path)
        trained = state.get("config", {})
        for key in RESUME_MUST_MATCH:
            if key in trained and trained[key] != getattr(cfg, key):
                raise CheckpointError(f"{resume_path} was trained with --{key.replace('_', '-')} {trained[key]}, "
                                      f"this run asks for {getattr(cfg, key)}: resume with the same setting")
        restore(model, state["model"], resume_path)
        restore(optimiser, state["optimiser"], resume_path)
        use_own_implementation(optimiser)
        set_rng_state(state["rng"], generator, log)
        start_step = int(state["step"])
        log(f"resumed from {resume_path} at step {start_step}")
        if start_step >= cfg.steps:
            log(f"nothing to train: the checkpoint is at step {start_step} >= --steps {cfg.steps}")
            return []
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}")

    model.train()
    history = []
    seen, started = 0, time.time()
    batches = list(batches_for_steps(len(dataset), cfg.batch_size, cfg.seed, start_step, cfg.steps))
    # the loader gets its own generator: creating its iterator must not draw from the global RNG,
    # or a resumed run would see other dropout masks than an uninterrupted one
    loader = torch.utils.data.DataLoader(EpochItems(dataset), batch_sampler=batches,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    low_level = low_level_branch(cfg, model.local_centres.shape[0], backbone.patch, cuda_graph=True)
    for step, batch in zip(range(start_step, cfg.steps), loader):
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) in [0, 1]
        terms = loss_terms(backbone, model, images, cfg, generator, low_level)
        try:
            total, values = losses.total_loss(terms, beta=cfg.beta, gamma=cfg.gamma, use_smo=cfg.use_smo,
                                              use_data=cfg.use_smo, use_fs=cfg.use_fs, use_corr=cfg.use_corr,
                                              use_reg=cfg.use_reg)
        except FloatingPointError as error:
            raise FloatingPointError(f"step {step + 1}: {error} (last good checkpoint: {checkpoint_path})") from None
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        ema_update(model.global_centres, model.local_centres, cfg.ema)
        history.append(values["total"])
        seen += images.shape[0]

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1:
            rate = seen / max(time.time() - started, 1e-9)
            parts = " ".join(f"{k} {v:+.4f}" for k, v in values.items())
            log(f"step {done}/{cfg.steps} | {parts} | {rate:.1f} img/s")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(checkpoint_state(model, optimiser, done, generator, cfg, model.local_centres.shape[0]),
                            checkpoint_path)
    log(f"checkpoint: {checkpoint_path}")
    return history


# --------------------------------------------------------------------------------------------
# Evaluation, prediction and the ablations
# --------------------------------------------------------------------------------------------

def make_code_fn(backbone, model):
    """images (B, 3, H, W) in [0, 1] -> codes F^c (B, D, H/8, W/8), eval mode, no grad."""
    def code_fn(images):
        model.eval()
        with torch.no_grad():
            return model(backbone_features(backbone, images))
    return code_fn


def make_low_level_fn(backbone, n_clusters, cfg):
    """For --eval-alpha > 0: F^l aligned to the given head probabilities (B, K, h, w)."""
    low_level = low_level_branch(cfg, n_clusters, backbone.patch)

    def low_level_fn(images, seg_probs):
        return align_clusters(low_level(images), seg_probs)
    return low_level_fn


def build_eval_dataset(cfg):
    import data
    return data.build_dataset(cfg.data, cfg.data_root, split=cfg.val_split, mode="eval", crop_size=cfg.eval_crop,
                              n_classes=cfg.n_classes, seed=cfg.seed, length=cfg.eval_images)


def run_evaluation(backbone, model, cfg, device, out_dir, log=print, dataset=None):
    import data
    import evaluate

    info = data.DATASETS[cfg.data]
    dataset = dataset if dataset is not None else build_eval_dataset(cfg)
    if not dataset.has_labels:
        log(f"evaluation skipped: the {cfg.val_split} split of {cfg.data_root} has no labels "
            f"(use --predict FOLDER to see the segmentation)")
        return None
    loader = data.make_loader(dataset, batch_size=cfg.eval_batch_size, shuffle=False,
                              num_workers=cfg.num_workers)
    n_classes = cfg.n_classes or info["n_classes"]
    class_names = info.get("class_names") or [f"class {i}" for i in range(n_classes)]
    centres = model.global_centres if cfg.probe == "centres" else None
    low_level_fn = make_low_level_fn(backbone, n_classes, cfg) if cfg.eval_alpha > 0 else None
    result = evaluate.evaluate(make_code_fn(backbone, model), loader, n_classes, class_names, device,
                               out_dir=out_dir, use_crf=not cfg.no_crf, n_images=cfg.save_images,
                               flip=cfg.flip_tta, low_level_fn=low_level_fn, alpha=cfg.eval_alpha,
                               centres=centres, seed=cfg.seed, verbose=True)
    log(evaluate.format_table(result, class_names))
    return result


class PredictImages(torch.utils.data.Dataset):
    """Every image of a folder, resized so that its short side is `short` and both sides are
    multiples of `patch` (the ViT needs that); items {"image": (3, H, W) in [0, 1], "name": stem}."""

    def __init__(self, folder, short, patch):
        import data
        self.paths = data.list_images(folder, "a folder of image files")
        self.short, self.patch = short, patch
        self.said = set()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import data
        array, note = data.read_rgb(self.paths[index])
        if note and note.split(" (e.g.")[0] not in self.said:  # each kind of conversion said once
            self.said.add(note.split(" (e.g.")[0])
            print(f"note: {note}")
        image = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # (3, H, W), a writable copy
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        height, width = image.shape[1:]
        scale = self.short / min(height, width)
        size = [max(self.patch, round(side * scale / self.patch) * self.patch) for side in (height, width)]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return {"image": image.clamp(0, 1), "name": self.paths[index].stem}


def predict_folder(backbone, model, cfg, device, folder, out_dir, log=print):
    """--predict FOLDER: a colour mask and an overlay per image; the clusters are the global
    centres (the head's own clusters, no labels needed), shown in the fixed palette."""
    import evaluate

    if not Path(folder).is_dir():
        raise ValueError(f"--predict {folder}: no such folder")
    images = PredictImages(folder, cfg.eval_crop, backbone.patch)
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=cfg.num_workers)
    n_clusters = model.global_centres.shape[0]
    low_level_fn = make_low_level_fn(backbone, n_clusters, cfg) if cfg.eval_alpha > 0 else None
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every flag with a real default; flags whose default depends on
    the device or data set (None) and on/off switches say theirs in their help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool)
                or "default" in text):
            return text
        return text + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="IL2Vseg: unsupervised semantic segmentation with low-level visual cues.",
        formatter_class=DefaultsFormatter)
    a = p.add_argument_group("what to do")
    a.add_argument("--train", action="store_true", help="train the head and centres, then evaluate")
    a.add_argument("--eval", action="store_true", help="evaluate --checkpoint (or OUT/checkpoint.pt) on the val split")
    a.add_argument("--predict", metavar="FOLDER", default=None, help="write a colour mask and overlay for every image in FOLDER")
    a.add_argument("--ablation", choices=["alpha", "loss"], default=None,
                   help="train + evaluate once per setting of Figure 5 (alpha) or Table 4 (loss) and print the table")
    a.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue training from OUT/checkpoint.pt (or PATH) with its optimiser, EMA and RNG state")
    a.add_argument("--checkpoint", default=None, help="checkpoint for --eval / --predict (default: OUT/checkpoint.pt)")
    a.add_argument("--out", default=None, help="folder for checkpoint.pt, metrics.json and images (default: runs/DATA)")

    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic",
                   help="cityscapes, cocostuff, potsdam, mastr1325, camvid, folder, or synthetic (built in)")
    d.add_argument("--data-root", default=None, help="root folder of the data set (not needed for synthetic)")
    d.add_argument("--n-classes", type=int, default=None, help="number of classes K (needed for --data folder)")
    d.add_argument("--train-split", default="train", help="split used for training")
    d.add_argument("--val-split", default="val", help="split used for evaluation")
    d.add_argument("--crop", type=int, default=None, help="training crop (default: 224; 128 for synthetic on the CPU)")
    d.add_argument("--eval-crop", type=int, default=None, help="evaluation centre crop (default: 320; 192 for synthetic on the CPU)")
    d.add_argument("--five-crop", action="store_true",
                   help="train on STEGO's five crops (corners + centre, half size) of every image")
    d.add_argument("--eval-images", type=int, default=None, help="evaluate on at most this many images (default: all)")
    d.add_argument("--num-workers", type=int, default=None,
                   help="data loader worker processes (default: up to 8 on CUDA, 0 on the CPU)")

    m = p.add_argument_group("model")
    m.add_argument("--arch", default="vits8", choices=sorted(VIT_CONFIGS), help="DINO backbone")
    m.add_argument("--weights", default=None,
                   help="DINO weights: a file, 'random' (smoke tests, scores meaningless), or unset for torch.hub")
    m.add_argument("--dim", type=int, default=64, help="code dimension C2 of the projection head")
    m.add_argument("--dropout", type=float, default=0.2, help="Dropout2d on the features before the head")

    t = p.add_argument_group("training (paper defaults)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: 3000; synthetic: 300 on CUDA, 60 on the CPU)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32 on CUDA, 8 on the CPU)")
    t.add_argument("--lr-head", type=float, default=1e-4, help="Adam learning rate of the projection head")
    t.add_argument("--lr-centres", type=float, default=5e-4, help="Adam learning rate of the local centres")
    t.add_argument("--ema", type=float, default=0.998, help="EMA momentum of the global centres")
    t.add_argument("--alpha", type=float, default=0.5, help="weight of the low-level cue in the fusion, eq (13)")
    t.add_argument("--beta", type=float, default=0.05, help="weight of L_reg, eq (15)")
    t.add_argument("--gamma", type=float, default=0.1, help="weight of L_fs, eq (15)")
    t.add_argument("--no-smo", dest="use_smo", action="store_false", help="switch off L_smo (and the data term)")
    t.add_argument("--no-fs", dest="use_fs", action="store_false", help="switch off L_fs")
    t.add_argument("--no-reg", dest="use_reg", action="store_false", help="switch off L_reg")
    t.add_argument("--no-corr", dest="use_corr", action="store_false", help="switch off L_corr")
    t.add_argument("--smooth-temperature", type=float, default=0.1, help="P = softmax(F_seg / T) in L_smo")
    t.add_argument("--fcm-m", type=float, default=2.0, help="FCM fuzzification index m, eqs (3)-(7)")
    t.add_argument("--fcm-sigma", type=float, default=None, help="sigma of the colour affinity, eq (10) (default: fcm.py's)")
    t.add_argument("--fcm-iters", type=int, default=None, help="FCM iteration cap (default: fcm.py's)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--save-every", type=int, default=100, help="write OUT/checkpoint.pt every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    t.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run the low-level branch eagerly instead of replaying it from a CUDA graph")

    e = p.add_argument_group("evaluation")
    e.add_argument("--probe", choices=["kmeans", "centres"], default="kmeans",
                   help="cosine mini-batch k-means on the codes (paper) or the trained global centres")
    e.add_argument("--eval-alpha", type=float, default=0.0,
                   help="also fuse F_l into the evaluated prediction with this weight (0: codes only)")
    e.add_argument("--eval-batch-size", type=int, default=8, help="images per evaluation batch")
    e.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    e.add_argument("--flip-tta", action="store_true", help="average codes of the image and its mirror")
    e.add_argument("--save-images", type=int, default=8, help="side-by-side PNGs for the first N images")
    return p.parse_args(argv)


def resolve_defaults(cfg, device):
    """Fill the device-dependent defaults and the per-data-set loss constants; check every number."""
    import data
    import losses

    cuda = device.type == "cuda"
    quick = cfg.data == "synthetic" and not cuda  # the out-of-the-box CPU run must stay short
    defaults = {"crop": 128 if quick else 224, "eval_crop": 192 if quick else 320,
                "batch_size": 32 if cuda else 8,
                "steps": 3000 if cfg.data != "synthetic" else (300 if cuda else 60),
                # on the CPU, loader workers would compete with the model for the cores
                "num_workers": min(8, os.cpu_count() or 1) if cuda else 0,
                # results go beside the evaluated checkpoint, else to runs/DATA
                "out": str(Path(cfg.checkpoint).parent) if cfg.checkpoint else str(Path("runs") / cfg.data),
                "fcm_sigma": fcm_default("sigma"), "fcm_iters": fcm_default("max_iter")}
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)

    if cfg.data not in data.DATASETS:
        raise ValueError(f"--data {cfg.data}: unknown data set, choose one of {', '.join(sorted(data.DATASETS))}")
    if cfg.ablation and (cfg.eval or cfg.predict or cfg.resume):
        raise ValueError("--ablation trains and evaluates every setting itself: use it without --eval, "
                         "--predict and --resume")
    if not (cfg.use_smo or cfg.use_fs or cfg.use_reg or cfg.use_corr):
        raise ValueError("every loss term is switched off (--no-smo --no-fs --no-reg --no-corr): nothing to train")
    if cfg.data == "folder" and not cfg.n_classes:
        raise ValueError("--data folder needs --n-classes K")
    at_least = {"steps": 1, "batch_size": 1, "crop": 8, "eval_crop": 8, "save_every": 1, "log_every": 1,
                "dim": 1, "eval_batch_size": 1, "fcm_iters": 1, "num_workers": 0, "save_images": 0}
    for key, minimum in at_least.items():
        if getattr(cfg, key) < minimum:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {minimum}, got {getattr(cfg, key)}")
    for key in ("n_classes", "eval_images"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    for key in ("alpha", "eval_alpha", "dropout"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"--{key.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, key)}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema must lie in [0, 1), got {cfg.ema}")
    for key in ("lr_head", "lr_centres", "smooth_temperature", "fcm_sigma"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {getattr(cfg, key)}")
    if cfg.beta < 0 or cfg.gamma < 0:
        raise ValueError(f"--beta and --gamma must be >= 0, got {cfg.beta}, {cfg.gamma}")
    if not cfg.fcm_m > 1:
        raise ValueError(f"--fcm-m must be > 1 (eq 4 divides by m - 1), got {cfg.fcm_m}")
    patch = VIT_CONFIGS[cfg.arch][0]
    for key in ("crop", "eval_crop"):
        if getattr(cfg, key) % patch:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)} must be a multiple of the "
                             f"patch size {patch}")

    constants = losses.loss_constants(cfg.data)  # the peers' tuned shifts and weights
    cfg.shift_close = constants["smooseg_shifts"]["close"]
    cfg.shift_far = constants["smooseg_shifts"]["far"]
    cfg.corr_shifts, cfg.corr_weights = constants["stego_shifts"], constants["stego_weights"]
    return cfg


def fcm_default(name):
    import inspect
    import fcm
    return inspect.signature(fcm.low_level_cue).parameters[name].default


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None


def check_checkpoint(state, path, cfg):
    """--eval / --predict: the checkpoint must fit --arch and (for --eval) the data set's classes.
    The head's code dimension is taken from the checkpoint, whatever --dim says."""
    import data

    trained = state.get("config", {})
    if trained.get("arch", cfg.arch) != cfg.arch:
        raise CheckpointError(f"{path} was trained on --arch {trained['arch']}, not {cfg.arch}")
    cfg.dim = trained.get("dim", cfg.dim)
    n_classes = cfg.n_classes or data.DATASETS[cfg.data]["n_classes"]
    if cfg.eval and int(state["n_clusters"]) != n_classes:
        raise CheckpointError(f"{path} has {state['n_clusters']} clusters, --data {cfg.data} has {n_classes} classes")


def build_model(cfg, backbone, n_classes, device):
    return Segmenter(n_classes, in_dim=backbone.dim, dim=cfg.dim, dropout=cfg.dropout).to(device)


def build_train_dataset(cfg):
    import data
    return data.build_dataset(cfg.data, cfg.data_root, split=cfg.train_split, mode="train", crop_size=cfg.crop,
                              n_classes=cfg.n_classes, seed=cfg.seed, five_crop=cfg.five_crop)


def train_and_evaluate(cfg, backbone, device, log=print, datasets=None):
    """Train, then evaluate the last step. datasets: (train, val), built here when not given."""
    import data

    n_classes = cfg.n_classes or data.DATASETS[cfg.data]["n_classes"]
    dataset, val_dataset = datasets or (build_train_dataset(cfg), build_eval_dataset(cfg))
    torch.manual_seed(cfg.seed)  # the head's initialisation depends on --seed alone
    model = build_model(cfg, backbone, n_classes, device)
    log(f"training on {len(dataset)} {cfg.data} images: {cfg.steps} steps, batch {cfg.batch_size}, "
        f"crop {cfg.crop}, alpha {cfg.alpha}, beta {cfg.beta}, gamma {cfg.gamma}, device {device}")
    train(backbone, model, dataset, cfg, device, log)
    result = run_evaluation(backbone, model, cfg, device, cfg.out, log, dataset=val_dataset)
    return model, result


def run_ablation(cfg, backbone, device, log=print, datasets=None):
    import copy

    rows = []
    # Figure 5: alpha in training and in the evaluated prediction (alpha = 1: the low-level cue alone)
    settings = ([(f"alpha = {a}", {"alpha": a, "eval_alpha": a}) for a in ALPHA_ABLATION]
                if cfg.ablation == "alpha" else LOSS_ABLATION)
    datasets = datasets or (build_train_dataset(cfg), build_eval_dataset(cfg))
    for name, change in settings:
        run_cfg = copy.deepcopy(cfg)
        vars(run_cfg).update(change)
        run_cfg.resume = None
        run_cfg.out = str(Path(cfg.out) / ("ablation_" + "".join(c if c.isalnum() else "_" for c in name)))
        log(f"=== ablation {name} -> {run_cfg.out}")
        _, result = train_and_evaluate(run_cfg, backbone, device, log, datasets)
        if result is None:
            raise ValueError(f"--ablation needs labels in the {cfg.val_split} split")
        rows.append((name, result))
    title = "Figure 5: low-level cue weight" if cfg.ablation == "alpha" else "Table 4: loss terms"
    lines = [title, f"{'setting':<28} {'Acc':>6} {'mIoU':>6} {'Acc+CRF':>8} {'mIoU+CRF':>9}"]
    for name, result in rows:
        before, after = result["before_crf"], result.get("after_crf") or result["before_crf"]
        lines.append(f"{name:<28} {100 * before['acc']:6.1f} {100 * before['miou']:6.1f} "
                     f"{100 * after['acc']:8.1f} {100 * after['miou']:9.1f}")
    table = "\n".join(lines)
    log(table)
    (Path(cfg.out) / f"ablation_{cfg.ablation}.txt").write_text(table + "\n")
    return rows


def main(argv=None):
    import fcm

    cfg = parse_args(argv)
    cfg.train = cfg.train or bool(cfg.resume)
    if not (cfg.train or cfg.eval or cfg.predict or cfg.ablation):
        print("nothing to do: pass --train, --eval, --predict FOLDER or --ablation (see --help)", file=sys.stderr)
        return 2
    try:
        device = pick_device(cfg.device)
        resolve_defaults(cfg, device)
        torch.manual_seed(cfg.seed)
        # the data first: a wrong folder should not wait for the weights (or a long training run)
        datasets = None
        if cfg.train or cfg.ablation:
            datasets = (build_train_dataset(cfg), build_eval_dataset(cfg))
        elif cfg.eval:
            datasets = (None, build_eval_dataset(cfg))
        if cfg.predict:
            import data
            data.list_images(cfg.predict, "a folder of image files")  # one line if missing or empty
        state = None
        if not cfg.train and not cfg.ablation:  # --eval / --predict: the checkpoint before the weights
            path = cfg.checkpoint or Path(cfg.out) / "checkpoint.pt"
            state = load_checkpoint(path)
            check_checkpoint(state, path, cfg)
        backbone = load_dino(cfg.arch, cfg.weights).to(device)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        if cfg.ablation:
            run_ablation(cfg, backbone, device, datasets=datasets)
            return 0
        if cfg.train:  # train, then evaluate the last step
            model, _ = train_and_evaluate(cfg, backbone, device, datasets=datasets)
        else:
            model = build_model(cfg, backbone, int(state["n_clusters"]), device)
            restore(model, state["model"], path)
            if cfg.eval:
                run_evaluation(backbone, model, cfg, device, cfg.out, dataset=datasets[1])
        if cfg.predict:
            predict_folder(backbone, model, cfg, device, cfg.predict, Path(cfg.out) / "predictions")
        return 0
    except (WeightsError, CheckpointError, ValueError, FloatingPointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except fcm.CudaGraphError as error:
        print(f"error: {error}: train with --no-cuda-graph", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted" + ("; the last checkpoint written is intact: continue with --resume" if cfg.train else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
