"""The frozen backbones of IL2Vseg: the paper's F^p = f_theta(I), for every `--arch`.

The paper ("Preliminary") feeds an image I through a frozen self-supervised network f_theta and takes
its dense feature map F^p (B, C1, H/s, W/s), s the network's stride. The default is DINO ViT-S/8, the
paper's Table 1 also has a MoCo v2 ResNet-50 row; this file adds the other backbones people ask for.

  --arch              network                   C1    stride  official weight file
  vits8 (default)     DINO ViT-S/8               384     8    dino_deitsmall8_pretrain.pth
  vits16              DINO ViT-S/16              384    16    dino_deitsmall16_pretrain.pth
  vitb8               DINO ViT-B/8               768     8    dino_vitbase8_pretrain.pth
  dinov2-vits14       DINOv2 ViT-S/14            384    14    dinov2_vits14_pretrain.pth
  dinov2-vitb14       DINOv2 ViT-B/14            768    14    dinov2_vitb14_pretrain.pth
  dinov2-vits14-reg   DINOv2 ViT-S/14 + 4 reg.   384    14    dinov2_vits14_reg4_pretrain.pth
  dinov2-vitb14-reg   DINOv2 ViT-B/14 + 4 reg.   768    14    dinov2_vitb14_reg4_pretrain.pth
  resnet50-mocov2     MoCo v2 ResNet-50 (800ep) 2048    32    moco_v2_800ep_pretrain.pth.tar

Everything is plain PyTorch with the official parameter names, so the official files load strictly
(no torchvision, no timm). A ViT's F^p is its last block's output after the final LayerNorm with the
CLS (and register) tokens dropped; the ResNet's F^p is its layer4 output.

Public API: ARCHS, WeightsError, build_backbone(arch), load_backbone(arch, weights, log),
offline_hint(arch), IMAGENET_MEAN, IMAGENET_STD, normalize(images), features(backbone, images).
"""
import argparse
import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import one_line

# ----------------------------------------------------------------------------------------------
# F^p = f_theta(I): ImageNet normalisation, then the frozen network
# ----------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every backbone here was trained on images normalised so
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """ImageNet normalisation (x - mean) / std of (B, 3, H, W) or (3, H, W) float RGB images in [0, 1]."""
    if not torch.is_tensor(images) or images.dim() not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"normalize: expected a (B, 3, H, W) or (3, H, W) tensor, got {shape}")
    if not images.is_floating_point():  # uint8 0..255 would be normalised silently wrong
        raise ValueError(f"normalize: expected float images in [0, 1], got {images.dtype}")
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return (images - mean) / std


def features(backbone, images):
    """F^p = f_theta(I): images (B, 3, H, W) in [0, 1] -> frozen features (B, C1, H/s, W/s) float32.

    The backbone (any of this file, s = backbone.stride) runs on the ImageNet-normalised images
    without gradient, in bfloat16 autocast on CUDA (full float32 elsewhere).
    needs: normalize
    """
    on_cuda = images.device.type == "cuda"
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_cuda):
        feats = backbone(normalize(images))  # (B, C1, H/s, W/s)
    return feats.float()


# ----------------------------------------------------------------------------------------------
# The backbones: facts of each --arch
# ----------------------------------------------------------------------------------------------
# kind "vit": patch = stride, width dim, depth blocks, heads; pretrain_size is the image side the
# position embedding was trained at (its grid is pretrain_size / patch); DINOv2 adds LayerScale,
# a mask token (used only in its training) and, for "-reg", 4 register tokens. interpolate_offset and
# interpolate_antialias say how the position embedding is resized (see position_embedding).
# kind "resnet": blocks per stage and the stem width (64 = the standard ResNet-50).
# size_bytes: the official file's size where known (None: not established here).

DINO_VIT = dict(kind="vit", depth=12, pretrain_size=224, layer_scale=False, registers=0,
                mask_token=False, interpolate_offset=0.1, interpolate_antialias=False)
DINOV2_VIT = dict(kind="vit", depth=12, pretrain_size=518, layer_scale=True, registers=0,
                  mask_token=True, interpolate_offset=0.1, interpolate_antialias=False)
DINOV2_REG = dict(DINOV2_VIT, registers=4, interpolate_offset=0.0, interpolate_antialias=True)
FB = "https://dl.fbaipublicfiles.com"

ARCHS = {
    "vits8": dict(DINO_VIT, stride=8, dim=384, heads=6, name="DINO ViT-S/8 (the paper's default)",
                  file="dino_deitsmall8_pretrain.pth", size_bytes=86728949,
                  url=f"{FB}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "vits16": dict(DINO_VIT, stride=16, dim=384, heads=6, name="DINO ViT-S/16",
                   file="dino_deitsmall16_pretrain.pth", size_bytes=None,
                   url=f"{FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "vitb8": dict(DINO_VIT, stride=8, dim=768, heads=12, name="DINO ViT-B/8",
                  file="dino_vitbase8_pretrain.pth", size_bytes=None,
                  url=f"{FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dinov2-vits14": dict(DINOV2_VIT, stride=14, dim=384, heads=6, name="DINOv2 ViT-S/14",
                          file="dinov2_vits14_pretrain.pth", size_bytes=None,
                          url=f"{FB}/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"),
    "dinov2-vitb14": dict(DINOV2_VIT, stride=14, dim=768, heads=12, name="DINOv2 ViT-B/14",
                          file="dinov2_vitb14_pretrain.pth", size_bytes=None,
                          url=f"{FB}/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
    "dinov2-vits14-reg": dict(DINOV2_REG, stride=14, dim=384, heads=6,
                              name="DINOv2 ViT-S/14 with 4 registers",
                              file="dinov2_vits14_reg4_pretrain.pth", size_bytes=None,
                              url=f"{FB}/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"),
    "dinov2-vitb14-reg": dict(DINOV2_REG, stride=14, dim=768, heads=12,
                              name="DINOv2 ViT-B/14 with 4 registers",
                              file="dinov2_vitb14_reg4_pretrain.pth", size_bytes=None,
                              url=f"{FB}/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
    "resnet50-mocov2": dict(kind="resnet", stride=32, dim=2048, blocks=(3, 4, 6, 3), width=64,
                            name="MoCo v2 ResNet-50, 800 epochs (the paper's ResNet50 row)",
                            file="moco_v2_800ep_pretrain.pth.tar", size_bytes=None,
                            url=f"{FB}/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"),
}


# ----------------------------------------------------------------------------------------------
# Vision Transformer: DINO (Caron et al. 2021) and DINOv2 (Oquab et al. 2024; Darcet et al. 2024)
# ----------------------------------------------------------------------------------------------

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


class LayerScale(nn.Module):
    """DINOv2's per-channel scale of a residual branch: x * gamma (parameter name `gamma`)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # the official init value 1.0

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); ls = identity without LayerScale (DINO)."""

    def __init__(self, dim, heads, mlp_ratio=4, layer_scale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, dim)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's and DINOv2's ViT with the official parameter names, so the official state dicts load as is.

    forward(images) takes ImageNet-normalised (B, 3, H, W), H and W multiples of the patch size, and
    returns the last block's output after the final LayerNorm without the CLS and register tokens, as
    a feature map (B, dim, H/patch, W/patch).

    DINOv2 options: layer_scale (ls1.gamma, ls2.gamma in every block), mask_token (1, dim) (used by
    DINOv2's masked-image training only; kept so the official file loads strictly), registers: that
    many register tokens (1, R, dim), put right after CLS once the position embedding is added.
    """

    def __init__(self, patch=8, dim=384, depth=12, heads=6, mlp_ratio=4, pretrain_size=224,
                 layer_scale=False, registers=0, mask_token=False, interpolate_offset=0.1,
                 interpolate_antialias=False):
        super().__init__()
        self.patch = self.stride = patch
        self.dim = dim
        self.registers = registers
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = pretrain_size // patch  # 28 for ViT-S/8, 37 for DINOv2: pos_embed (1, 1 + grid^2, dim)
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, h, w):
        """pos_embed for an h x w patch grid: the patch part is resized bicubically, CLS's is kept.

        Exactly as the official code of each family, so the features match theirs at every size:
        - DINO and plain DINOv2 (interpolate_offset 0.1): scale factors (h + 0.1) / side and
          (w + 0.1) / side, no antialiasing (the 0.1 is DINO's guard against the output size
          rounding down; the scale factor, not size / side, then sets the sampling positions);
        - DINOv2 with registers (offset 0): output size (h, w) with antialiasing.
        """
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1,1,dim), (1,n,dim)
        side = int(math.sqrt(patch_pos.shape[1]))
        if (h, w) == (side, side):
            return self.pos_embed
        grid = patch_pos.reshape(1, side, side, self.dim).permute(0, 3, 1, 2)  # (1, dim, side, side)
        work = torch.promote_types(grid.dtype, torch.float32)  # half -> float32 (bicubic), double stays
        if self.interpolate_offset:
            size = dict(scale_factor=((h + self.interpolate_offset) / side,
                                      (w + self.interpolate_offset) / side))
        else:
            size = dict(size=(h, w))
        grid = F.interpolate(grid.to(work), mode="bicubic", align_corners=False,
                             antialias=self.interpolate_antialias, **size)  # (1, dim, h, w)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, self.dim)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + h*w, dim)

    def forward(self, images):  # (B, 3, H, W), ImageNet-normalised
        B, _, H, W = images.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch} "
                             f"of this ViT: crop or resize to multiples of {self.patch}")
        h, w = H // self.patch, W // self.patch
        x = self.patch_embed(images)  # (B, h*w, dim)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+h*w, dim)
        x = x + self.position_embedding(h, w).to(x.dtype)
        if self.registers:  # registers go in after the position embedding: they get none
            registers = self.register_tokens.expand(B, -1, -1).to(x.dtype)  # (B, R, dim)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)  # (B, 1+R+h*w, dim)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1 + self.registers:]  # drop CLS and registers: (B, h*w, dim)
        return x.transpose(1, 2).reshape(B, self.dim, h, w)  # (B, dim, h, w)


# ----------------------------------------------------------------------------------------------
# ResNet-50 (He et al. 2016) for MoCo v2 (Chen et al. 2020), torchvision's layout and key names
# ----------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv (carries the stride, "ResNet v1.5") -> 1x1 conv to 4x, plus the shortcut."""

    def __init__(self, in_ch, width, stride=1):
        super().__init__()
        out_ch = 4 * width
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None  # the first block of a stage projects the shortcut: conv 1x1 + BN
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):  # (B, in_ch, H, W) -> (B, 4 width, H/stride, W/stride)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet-50 up to layer4 (no avgpool, no fc): (B, 3, H, W) -> (B, 32 width, H/32, W/32).

    blocks (3, 4, 6, 3) and width 64 give the standard ResNet-50 (2048 channels); smaller values
    only serve the tests. A frozen backbone: .train() keeps it in eval mode, so BatchNorm always
    uses, and never updates, the running statistics of the weight file.
    """

    def __init__(self, blocks=(3, 4, 6, 3), width=64):
        super().__init__()
        self.stride = 32
        self.dim = 32 * width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)  # stem: H/2
        self.bn1 = nn.BatchNorm2d(width)  # eps 1e-5, as torchvision's (MoCo trained this network)
        in_ch = width
        for stage, (n_blocks, stride) in enumerate(zip(blocks, (1, 2, 2, 2)), start=1):
            stage_width = width * 2 ** (stage - 1)  # 64, 128, 256, 512 in ResNet-50
            layer = [Bottleneck(in_ch, stage_width, stride)]
            layer += [Bottleneck(4 * stage_width, stage_width) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*layer))  # layer1..layer4
            in_ch = 4 * stage_width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.eval()

    def train(self, mode=True):  # model.train() on a frozen ResNet would overwrite the BN statistics
        return super().train(False)

    def forward(self, images):  # (B, 3, H, W), ImageNet-normalised
        B, _, H, W = images.shape
        if H % self.stride or W % self.stride:
            raise ValueError(f"image size {H}x{W} is not a multiple of the ResNet's stride {self.stride}: "
                             f"crop or resize to multiples of {self.stride}")
        x = F.relu(self.bn1(self.conv1(images)))  # (B, width, H/2, W/2)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # (B, width, H/4, W/4)
        x = self.layer1(x)  # (B, 4 width, H/4, W/4)
        x = self.layer2(x)  # (B, 8 width, H/8, W/8)
        x = self.layer3(x)  # (B, 16 width, H/16, W/16)
        return self.layer4(x)  # F^p: (B, 32 width, H/32, W/32)


def arch_facts(arch):
    """ARCHS[arch], or a one-line ValueError naming the choices."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch '{arch}': choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def build_backbone(arch):
    """The network of `arch` (a key of ARCHS) with random weights; see load_backbone for the real ones."""
    facts = arch_facts(arch)
    if facts["kind"] == "resnet":
        return ResNet(blocks=facts["blocks"], width=facts["width"])
    return VisionTransformer(patch=facts["stride"], dim=facts["dim"], depth=facts["depth"],
                             heads=facts["heads"], pretrain_size=facts["pretrain_size"],
                             layer_scale=facts["layer_scale"], registers=facts["registers"],
                             mask_token=facts["mask_token"],
                             interpolate_offset=facts["interpolate_offset"],
                             interpolate_antialias=facts["interpolate_antialias"])


# ----------------------------------------------------------------------------------------------
# Loading the official weights, with one-line errors
# ----------------------------------------------------------------------------------------------

class WeightsError(RuntimeError):
    """Backbone weights are missing, unreadable or do not fit the architecture (one-line message)."""


def offline_hint(arch):
    """Where to put the weight file of `arch` on a machine without internet (one line)."""
    url = arch_facts(arch)["url"]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"download {url} on a machine with internet and put it into {folder}/ "
            f"(the folder $TORCH_HOME/hub/checkpoints), or pass --weights PATH "
            f"(--weights random runs an untrained backbone for smoke tests)")


def allow_namespace():
    """DINO's full training checkpoints keep their arguments as an argparse.Namespace: let the
    weights-only load accept that one class too (torch >= 2.5; older torch refuses such files)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow else contextlib.nullcontext()


def read_weights(arch, weights):
    """The raw contents of the weight file and its name for messages (weights: None or a path)."""
    if weights is None:  # the official file, through the torch hub cache
        url = ARCHS[arch]["url"]  # torch.hub keeps it as $TORCH_HOME/hub/checkpoints/<file>
        cached = Path(torch.hub.get_dir()) / "checkpoints" / ARCHS[arch]["file"]
        if cached.is_file() and cached.stat().st_size == 0:
            raise WeightsError(f"{cached}: the file is empty (an interrupted download?): delete it; "
                               f"{offline_hint(arch)}")
        try:
            with allow_namespace():
                return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True), cached
        except Exception as error:  # no network, or a corrupt / truncated file in the cache
            if cached.is_file():
                raise WeightsError(f"{cached}: cannot be read as a torch file ({one_line(error)}): "
                                   f"delete it and download it again; {offline_hint(arch)}") from None
            raise WeightsError(f"cannot download the {arch} weights ({one_line(error)}); "
                               f"{offline_hint(arch)}") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "no such file"
        raise WeightsError(f"--weights {path}: {problem}; {offline_hint(arch)}")
    if path.stat().st_size == 0:
        raise WeightsError(f"--weights {path}: the file is empty (an interrupted download?)")
    try:
        with allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True), f"--weights {path}"
    except Exception as error:  # corrupt, truncated, not a torch file, or pickled Python objects
        raise WeightsError(f"--weights {path}: cannot be read as a torch file ({one_line(error)}); "
                           f"is it truncated, or not a state dict?") from None


def clean_state_dict(state, source):
    """The backbone's state dict out of the official file or a common wrapper around one.

    - DINO / DINOv2 backbone files, torchvision-layout ResNet-50 files: plain state dicts.
    - DINO training checkpoints: {"teacher": {"module.backbone.*", "head.*"}, "student": ..., "args"}:
      the teacher is the network DINO evaluates; "module." / "backbone." prefixes are removed.
    - MoCo checkpoints: {"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue"},
      ...}: only the query encoder is kept, without its prefix (as MoCo's own linear evaluation does).
    - {"state_dict": ...} and {"model": ...} wrappers in general.
    The classifier / projection heads ("head.*", "fc.*") are not part of a backbone and are dropped.
    """
    if isinstance(state, dict):
        for key in ("teacher", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: holds a {type(state).__name__}, not a state dict")
    moco = "module.encoder_q."
    if any(str(key).startswith(moco) for key in state):
        state = {key[len(moco):]: value for key, value in state.items() if key.startswith(moco)}
    cleaned = {}
    for key, value in state.items():
        key = str(key)
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(("head.", "fc.")):
            cleaned[key] = value
    return cleaned


def key_problems(expected, state):
    """Differences between a model's state dict and a loaded one: ([missing], [unexpected], [wrong])."""
    optional = ".num_batches_tracked"  # BatchNorm's step counter: unused in eval, absent in old files
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
             f"(expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and not (torch.is_tensor(state[k]) and state[k].shape == v.shape)]
    return missing, unexpected, wrong


def fitting_arch(state):
    """The --arch whose keys and shapes match `state` exactly, or None (built on the meta device: free)."""
    for arch in ARCHS:
        with torch.device("meta"):
            expected = build_backbone(arch).state_dict()
        if not any(key_problems(expected, state)):
            return arch
    return None


def load_state(model, state, source, arch):
    """Strict key and shape check of a cleaned state dict, then load it. `source` names the file.

    The model may live on the meta device: the loaded tensors then become its parameters (assign).
    """
    expected = model.state_dict()
    missing, unexpected, wrong = key_problems(expected, state)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {'; '.join(wrong[:2])})")
    if problems:
        other = fitting_arch(state)
        guess = f" (it fits --arch {other})" if other else ""
        raise WeightsError(f"{source} does not fit --arch {arch}: " + ", ".join(problems)
                           + f" -- is it the right --arch?{guess}")
    # the model's dtypes (a float16 file gives a float32 model); a missing BN step counter reads 0
    full = {k: state[k].to(v.dtype) if k in state else torch.zeros((), dtype=v.dtype)
            for k, v in expected.items()}
    model.load_state_dict(full, strict=True, assign=True)


def load_backbone(arch="vits8", weights=None, log=print, seed=0):
    """The frozen backbone of `arch`: eval mode, requires_grad False, on the CPU.

    weights: None -> the official file through torch.hub.load_state_dict_from_url (downloaded once
    into $TORCH_HOME/hub/checkpoints and read from there offline); a path -> that file (the official
    file or a wrapper that clean_state_dict accepts); "random" -> random weights drawn from `seed`
    (the same in every process, so a resumed smoke test continues the same network; the global RNG
    is left as it was). Smoke tests only: every score is then meaningless. Every failure is a
    WeightsError with a one-line message.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_backbone(arch)
        log(f"WARNING: --weights random: the {arch} backbone is RANDOMLY INITIALISED. Every score this "
            f"run prints is meaningless; use it for smoke tests only.")
    else:
        arch_facts(arch)  # an unknown --arch fails before any download
        state, source = read_weights(arch, weights)
        with torch.device("meta"):  # shapes only: the file's tensors become the parameters
            model = build_backbone(arch)
        load_state(model, clean_state_dict(state, source), source, arch)
    model.eval()
    model.requires_grad_(False)
    return model
