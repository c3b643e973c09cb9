"""backbones.py: every --arch against slow references, the official file layouts, loading and its errors."""
import argparse
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import backbones
import checkpoints
from pasting import paste_alone

# Parameter counts of the official networks (their papers / model cards; without heads).
KNOWN_SIZES = {"vits8": 21.7e6, "vits16": 21.7e6, "vitb8": 85.8e6, "dinov2-vits14": 22.1e6,
               "dinov2-vitb14": 86.6e6, "dinov2-vits14-reg": 22.1e6, "dinov2-vitb14-reg": 86.6e6,
               "resnet50-mocov2": 23.5e6}


# ---------------------------------------------------------------- normalisation and F^p

def test_normalize():
    images = torch.rand(2, 3, 4, 5)
    out = backbones.normalize(images)
    for c in range(3):
        expected = (images[:, c] - backbones.IMAGENET_MEAN[c]) / backbones.IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], expected)
    torch.testing.assert_close(backbones.normalize(images[0]), out[0])
    with pytest.raises(ValueError, match=r"normalize: expected a \(B, 3, H, W\)"):
        backbones.normalize(torch.rand(2, 4, 4, 5))
    with pytest.raises(ValueError, match="float images"):
        backbones.normalize(torch.zeros(3, 4, 4, dtype=torch.uint8))
    # the literal defaults are the module's constants
    pasted = paste_alone("backbones", "normalize")
    torch.testing.assert_close(pasted(images), out)


def test_features_normalises_runs_without_grad_and_returns_float32():
    torch.manual_seed(0)
    model = backbones.VisionTransformer(patch=4, dim=8, depth=1, heads=2, pretrain_size=16)
    images = torch.rand(2, 3, 8, 12)
    feats = backbones.features(model, images)
    assert feats.shape == (2, 8, 2, 3) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats, model(backbones.normalize(images)))
    torch.testing.assert_close(paste_alone("backbones", "features")(model, images), feats)


# ---------------------------------------------------------------- bicubic position embedding

def cubic(x, a):
    """The cubic convolution kernel (Keys): a = -0.75 in PyTorch's bicubic, -0.5 with antialiasing."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return a * (x ** 3 - 5 * x ** 2 + 8 * x - 4)
    return 0.0


def resize_weights(n_in, n_out, scale_factor=None, antialias=False):
    """(n_out, n_in) float64 matrix of 1-D bicubic resampling, written out with loops."""
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = 1 / scale_factor if scale_factor else n_in / n_out  # input pixels per output pixel
    for i in range(n_out):
        if not antialias:  # 4 taps around the source position, indices clamped at the border
            real = scale * (i + 0.5) - 0.5
            left = math.floor(real)
            t = real - left
            for tap, distance in zip(range(left - 1, left + 3), (t + 1, t, 1 - t, 2 - t)):
                weights[i, min(max(tap, 0), n_in - 1)] += cubic(distance, -0.75)
        else:  # the kernel stretched by the scale when shrinking, renormalised (as PIL)
            support = 2 * scale if scale >= 1 else 2.0
            stretch = 1 / scale if scale >= 1 else 1.0
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            for j in range(lo, hi):
                weights[i, j] = cubic((j - centre + 0.5) * stretch, -0.5)
            weights[i] /= weights[i].sum()
    return weights


def reference_position_embedding(pos_embed, h, w, offset, antialias):
    """pos_embed (1, 1 + side^2, D) -> (1, 1 + h*w, D), as the official DINO / DINOv2 code resizes it."""
    pos = pos_embed.double()[0]
    side = math.isqrt(pos.shape[0] - 1)
    if (h, w) == (side, side):
        return pos[None]
    grid = pos[1:].reshape(side, side, -1)  # (side, side, D)
    rows = resize_weights(side, h, (h + offset) / side if offset else None, antialias)  # (h, side)
    cols = resize_weights(side, w, (w + offset) / side if offset else None, antialias)  # (w, side)
    out = torch.einsum("is,jt,std->ijd", rows, cols, grid).reshape(h * w, -1)
    return torch.cat([pos[:1], out])[None]


def tiny_vit(**kwargs):
    """A small ViT through the real class, with LayerScale gammas and registers made non-trivial."""
    model = backbones.VisionTransformer(patch=4, dim=8, depth=2, heads=2, pretrain_size=20, **kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma") or name == "register_tokens":
                parameter.copy_(torch.randn_like(parameter))
    return model.double().eval()


DINO = dict()
DINOV2 = dict(layer_scale=True, mask_token=True)
DINOV2_REG = dict(layer_scale=True, mask_token=True, registers=2, interpolate_offset=0.0,
                  interpolate_antialias=True)


@pytest.mark.parametrize("kind", [DINO, DINOV2_REG], ids=["offset", "antialias"])
@pytest.mark.parametrize("grid", [(3, 7), (6, 4), (5, 5)])  # shrink rows / grow columns, the reverse, same
def test_position_embedding_interpolation_matches_the_official_resampling(kind, grid):
    torch.manual_seed(0)
    model = tiny_vit(**kind)
    fast = model.position_embedding(*grid)
    assert fast.shape == (1, 1 + grid[0] * grid[1], 8)
    expected = reference_position_embedding(model.pos_embed, *grid, model.interpolate_offset,
                                            model.interpolate_antialias)
    torch.testing.assert_close(fast, expected, rtol=1e-9, atol=1e-9)
    if grid == (5, 5):  # the pretraining grid: used as it is
        assert fast is model.pos_embed


def test_the_two_interpolation_modes_differ():
    torch.manual_seed(0)
    pos = torch.randn(1, 26, 3, dtype=torch.float64)
    plain = reference_position_embedding(pos, 3, 7, 0.1, False)
    antialiased = reference_position_embedding(pos, 3, 7, 0.0, True)
    assert (plain - antialiased).abs().max() > 1e-2  # so the test above tells them apart


# ---------------------------------------------------------------- ViT vs. a slow reference

def reference_vit(model, images):
    """The ViT written out with loops over patches, tokens and heads, in float64."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, dim, n_reg = model.patch, model.dim, model.registers
    heads = model.blocks[0].attn.heads
    B, _, H, W = images.shape
    h, w = H // p, W // p
    pos = reference_position_embedding(sd["pos_embed"], h, w, model.interpolate_offset,
                                       model.interpolate_antialias)[0]  # (1 + h*w, dim)

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    out = torch.zeros(B, dim, h, w, dtype=torch.float64)
    for b in range(B):
        tokens = [sd["cls_token"][0, 0] + pos[0]]
        tokens += [sd["register_tokens"][0, r] for r in range(n_reg)]  # no position embedding
        for i in range(h):
            for j in range(w):
                patch = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].double()
                weight = sd["patch_embed.proj.weight"]  # (dim, 3, p, p)
                token = (weight * patch).sum(dim=(1, 2, 3)) + sd["patch_embed.proj.bias"]
                tokens.append(token + pos[1 + i * w + j])
        x = torch.stack(tokens)  # (1 + R + h*w, dim)
        for n in range(len(model.blocks)):
            pre = f"blocks.{n}."
            gamma1 = sd.get(pre + "ls1.gamma", torch.ones(dim, dtype=torch.float64))
            gamma2 = sd.get(pre + "ls2.gamma", torch.ones(dim, dtype=torch.float64))
            y = layer_norm(x, pre + "norm1")
            qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
            q, k, v = qkv.split(dim, dim=-1)
            d = dim // heads
            heads_out = []
            for head in range(heads):
                qh, kh, vh = (t[:, head * d:(head + 1) * d] for t in (q, k, v))
                rows = []
                for t in range(x.shape[0]):
                    scores = torch.stack([qh[t] @ kh[s] / math.sqrt(d) for s in range(x.shape[0])])
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    rows.append((weights[:, None] * vh).sum(0))
                heads_out.append(torch.stack(rows))
            attn = torch.cat(heads_out, dim=-1) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
            x = x + gamma1 * attn
            y = layer_norm(x, pre + "norm2")
            y = gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
            x = x + gamma2 * (y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"])
        x = layer_norm(x, "norm")[1 + n_reg:]  # drop CLS and the registers
        out[b] = x.T.reshape(dim, h, w)
    return out


@pytest.mark.parametrize("kind", [DINO, DINOV2, DINOV2_REG], ids=["dino", "dinov2", "dinov2-reg"])
@pytest.mark.parametrize("size", [(20, 20), (12, 28)])  # the pretraining grid and an interpolated one
def test_vit_matches_slow_reference(kind, size):
    torch.manual_seed(0)
    model = tiny_vit(**kind)
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        fast = model(images)
    assert fast.shape == (2, 8, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(fast, reference_vit(model, images), rtol=1e-9, atol=1e-9)


def test_registers_take_part_in_attention_but_not_in_the_output():
    torch.manual_seed(0)
    model = tiny_vit(**DINOV2_REG)
    images = torch.randn(1, 3, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        model.register_tokens.add_(torch.randn_like(model.register_tokens))  # (a constant: LayerNorm'd away)
        after = model(images)
    assert before.shape == after.shape == (1, 8, 3, 4)  # 2 registers + CLS dropped: 12 patch tokens
    assert (before - after).abs().max() > 1e-6  # they are there: the patch tokens attend to them


def test_mask_token_is_in_the_state_dict_and_unused():
    torch.manual_seed(0)
    model = tiny_vit(**DINOV2)
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        model.mask_token.add_(torch.randn_like(model.mask_token))
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    assert model.state_dict()["mask_token"].shape == (1, 8)


def test_vit_rejects_size_not_multiple_of_patch():
    model = backbones.VisionTransformer(patch=4, dim=8, depth=1, heads=2, pretrain_size=16)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.zeros(1, 3, 15, 16))


# ---------------------------------------------------------------- ResNet-50 vs. a slow reference

def conv_loops(x, weight, stride=1, padding=0):
    """Convolution as its sum, out[b, o, i, j] = sum_{c, u, v} x[b, c, i s + u, j s + v] w[o, c, u, v]
    (zero padding), with a loop over the kernel offsets (u, v), float64."""
    out_ch, _, k, _ = weight.shape
    x = F.pad(x, (padding,) * 4)
    B, _, H, W = x.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    out = torch.zeros(B, out_ch, Ho, Wo, dtype=torch.float64)
    for u in range(k):
        for v in range(k):
            window = x[:, :, u:u + stride * (Ho - 1) + 1:stride, v:v + stride * (Wo - 1) + 1:stride]
            out += torch.einsum("bcij,oc->boij", window, weight[:, :, u, v])  # window: (B, C, Ho, Wo)
    return out


def max_pool_loops(x):
    """3x3 max pooling, stride 2, padding 1 (padding never wins), as a maximum over the 9 offsets."""
    x = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    Ho, Wo = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    out = torch.full((x.shape[0], x.shape[1], Ho, Wo), -math.inf, dtype=torch.float64)
    for u in range(3):
        for v in range(3):
            out = torch.maximum(out, x[:, :, u:u + 2 * (Ho - 1) + 1:2, v:v + 2 * (Wo - 1) + 1:2])
    return out


def reference_resnet(sd, images, blocks):
    """ResNet v1.5 from a torchvision-layout state dict: convolutions by loops, BN by its formula."""
    sd = {k: v.double() for k, v in sd.items()}

    def bn(x, prefix):
        scale = sd[prefix + ".weight"] / torch.sqrt(sd[prefix + ".running_var"] + 1e-5)
        return (x - sd[prefix + ".running_mean"][:, None, None]) * scale[:, None, None] \
            + sd[prefix + ".bias"][:, None, None]

    x = torch.relu(bn(conv_loops(images.double(), sd["conv1.weight"], 2, 3), "bn1"))
    x = max_pool_loops(x)
    for stage, n_blocks in enumerate(blocks, start=1):
        for b in range(n_blocks):
            pre = f"layer{stage}.{b}."
            stride = 2 if stage > 1 and b == 0 else 1  # on the 3x3 conv and the shortcut
            out = torch.relu(bn(conv_loops(x, sd[pre + "conv1.weight"]), pre + "bn1"))
            out = torch.relu(bn(conv_loops(out, sd[pre + "conv2.weight"], stride, 1), pre + "bn2"))
            out = bn(conv_loops(out, sd[pre + "conv3.weight"]), pre + "bn3")
            if pre + "downsample.0.weight" in sd:
                x = bn(conv_loops(x, sd[pre + "downsample.0.weight"], stride), pre + "downsample.1")
            x = torch.relu(out + x)
    return x


def randomise_batch_norm(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)


def test_resnet_matches_slow_reference():
    torch.manual_seed(0)
    blocks = (2, 1, 1, 1)  # a second block in layer1 checks the identity shortcut
    model = backbones.ResNet(blocks=blocks, width=4).double()
    randomise_batch_norm(model)
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        fast = model(images)
    assert fast.shape == (2, 128, 2, 3) and model.dim == 128 and model.stride == 32
    torch.testing.assert_close(fast, reference_resnet(model.state_dict(), images, blocks),
                               rtol=1e-9, atol=1e-9)


def test_conv_loops_is_a_convolution():
    # the reference's own building blocks, checked against hand computations at single positions
    torch.manual_seed(0)
    x, weight = torch.randn(1, 2, 7, 7, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    out = conv_loops(x, weight, stride=2, padding=1)
    assert out.shape == (1, 3, 4, 4)
    by_hand = sum(x[0, c, u - 1, v - 1] * weight[1, c, u, v]  # output (0, 0) sees padding at u, v = 0
                  for c in range(2) for u in range(1, 3) for v in range(1, 3))
    torch.testing.assert_close(out[0, 1, 0, 0], by_hand)
    by_hand = sum(x[0, c, 2 * 2 - 1 + u, 2 * 1 - 1 + v] * weight[2, c, u, v]
                  for c in range(2) for u in range(3) for v in range(3))
    torch.testing.assert_close(out[0, 2, 2, 1], by_hand)
    pooled = max_pool_loops(x)
    assert pooled.shape == (1, 2, 4, 4)
    assert pooled[0, 1, 0, 0] == x[0, 1, :2, :2].max() and pooled[0, 0, 2, 3] == x[0, 0, 3:6, 5:7].max()


def test_resnet_stays_in_eval_mode_and_never_updates_its_statistics():
    model = backbones.ResNet(blocks=(1, 1, 1, 1), width=4)
    randomise_batch_norm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.training and not model.bn1.training
    model(torch.randn(2, 3, 32, 32))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resnet_rejects_size_not_multiple_of_32():
    with pytest.raises(ValueError, match="not a multiple of the ResNet's stride 32"):
        backbones.ResNet(blocks=(1, 1, 1, 1), width=4)(torch.zeros(1, 3, 48, 64))


def test_every_kind_runs_under_bfloat16_autocast():
    """features() runs the backbones in bfloat16 autocast on CUDA; the CPU autocast checks the dtypes."""
    torch.manual_seed(0)
    for model, size in [(tiny_vit(**DINO).float(), (12, 16)), (tiny_vit(**DINOV2_REG).float(), (12, 16)),
                        (backbones.ResNet(blocks=(1, 1, 1, 1), width=4), (32, 64))]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            exact = model(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(images).float()
        torch.testing.assert_close(low, exact, rtol=0.1, atol=0.1 * exact.abs().max().item())


# ---------------------------------------------------------------- the official file layouts

def official_vit_layout(dim, depth, patch, grid, dinov2=False, registers=0):
    """key -> shape of the official DINO / DINOv2 backbone files, written out independently."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    if dinov2:
        shapes["mask_token"] = (1, dim)
    shapes.update({"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)})
    for n in range(depth):
        pre = f"blocks.{n}."
        shapes.update({pre + "norm1.weight": (dim,), pre + "norm1.bias": (dim,),
                       pre + "attn.qkv.weight": (3 * dim, dim), pre + "attn.qkv.bias": (3 * dim,),
                       pre + "attn.proj.weight": (dim, dim), pre + "attn.proj.bias": (dim,),
                       pre + "norm2.weight": (dim,), pre + "norm2.bias": (dim,),
                       pre + "mlp.fc1.weight": (4 * dim, dim), pre + "mlp.fc1.bias": (4 * dim,),
                       pre + "mlp.fc2.weight": (dim, 4 * dim), pre + "mlp.fc2.bias": (dim,)})
        if dinov2:
            shapes.update({pre + "ls1.gamma": (dim,), pre + "ls2.gamma": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def official_resnet50_layout():
    """key -> shape of torchvision's ResNet-50 without fc (what MoCo's encoder_q holds)."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_ch = 64
    for stage, (n_blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(n_blocks):
            pre = f"layer{stage}.{b}."
            shapes[pre + "conv1.weight"] = (width, in_ch if b == 0 else 4 * width, 1, 1)
            bn(pre + "bn1", width)
            shapes[pre + "conv2.weight"] = (width, width, 3, 3)
            bn(pre + "bn2", width)
            shapes[pre + "conv3.weight"] = (4 * width, width, 1, 1)
            bn(pre + "bn3", 4 * width)
            if b == 0:
                shapes[pre + "downsample.0.weight"] = (4 * width, in_ch, 1, 1)
                bn(pre + "downsample.1", 4 * width)
        in_ch = 4 * width
    return shapes


MOCO_FC = {"fc.0.weight": (2048, 2048), "fc.0.bias": (2048,), "fc.2.weight": (128, 2048), "fc.2.bias": (128,)}

OFFICIAL_LAYOUTS = {
    "vits8": lambda: official_vit_layout(384, 12, 8, 28),
    "vits16": lambda: official_vit_layout(384, 12, 16, 14),
    "vitb8": lambda: official_vit_layout(768, 12, 8, 28),
    "dinov2-vits14": lambda: official_vit_layout(384, 12, 14, 37, dinov2=True),
    "dinov2-vitb14": lambda: official_vit_layout(768, 12, 14, 37, dinov2=True),
    "dinov2-vits14-reg": lambda: official_vit_layout(384, 12, 14, 37, dinov2=True, registers=4),
    "dinov2-vitb14-reg": lambda: official_vit_layout(768, 12, 14, 37, dinov2=True, registers=4),
    "resnet50-mocov2": official_resnet50_layout,
}


def moco_checkpoint(encoder_q):
    """A MoCo training checkpoint around a query encoder state dict (fc included), as the release."""
    state = {"module.encoder_q." + k: v for k, v in encoder_q.items()}
    state.update({"module.encoder_k." + k: v for k, v in encoder_q.items()})
    state.update({"module.queue": torch.zeros(128, 4), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 800, "arch": "resnet50", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0]}]}}


def random_state(shapes, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long, device=device)
        elif device == "meta":
            state[key] = torch.empty(shape, device="meta")
        else:
            state[key] = torch.randn(shape, generator=generator).abs_() if "running_var" in key \
                else torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("arch", list(backbones.ARCHS))
def test_official_layout_fits_strictly_and_has_the_known_size(arch):
    """Every arch on the meta device (no memory, no time): keys and shapes of the official file."""
    layout = OFFICIAL_LAYOUTS[arch]()
    facts = backbones.ARCHS[arch]
    if arch == "resnet50-mocov2":
        n_params = sum(math.prod(s) for k, s in layout.items() if "running" not in k and "num_batches" not in k)
        official = moco_checkpoint(random_state({**layout, **MOCO_FC}, device="meta"))
    else:
        n_params = sum(math.prod(s) for s in layout.values())
        official = random_state(layout, device="meta")
    assert abs(n_params - KNOWN_SIZES[arch]) < 0.1e6, n_params
    with torch.device("meta"):
        model = backbones.build_backbone(arch)
    assert model.dim == facts["dim"] and model.stride == facts["stride"]
    assert sum(p.numel() for p in model.parameters()) == n_params
    cleaned = backbones.clean_state_dict(official, facts["file"])
    assert backbones.key_problems(model.state_dict(), cleaned) == ([], [], [])
    assert backbones.fitting_arch(cleaned) == arch


def test_archs_facts_are_consistent():
    for arch, facts in backbones.ARCHS.items():
        assert facts["url"].endswith("/" + facts["file"]), arch
        assert facts["kind"] in ("vit", "resnet")
        assert isinstance(facts["name"], str) and facts["name"]
    with pytest.raises(ValueError, match="unknown --arch 'vit-huge': choose one of vits8, "):
        backbones.build_backbone("vit-huge")


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Random weights in the official layout, saved under the official names: ViT-S/8, DINOv2 ViT-S/14
    with registers and the MoCo v2 checkpoint (a training checkpoint with encoder_k, queue and fc)."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for seed, arch in enumerate(["vits8", "dinov2-vits14-reg"]):
        state = random_state(OFFICIAL_LAYOUTS[arch](), seed)
        files[arch] = (folder / backbones.ARCHS[arch]["file"], state)
        torch.save(state, files[arch][0])
    state = random_state(official_resnet50_layout(), 2)
    path = folder / backbones.ARCHS["resnet50-mocov2"]["file"]
    # saved in the pre-1.6 (non-zip) format, as the 2020 release was
    torch.save(moco_checkpoint({**state, **random_state(MOCO_FC, 3)}), path, _use_new_zipfile_serialization=False)
    files["resnet50-mocov2"] = (path, state)
    return files


@pytest.mark.parametrize("arch", ["vits8", "dinov2-vits14-reg", "resnet50-mocov2"])
def test_official_files_load_strictly_and_freeze(official_files, arch):
    path, state = official_files[arch]
    model = backbones.load_backbone(arch, str(path))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert all(value.device.type == "cpu" for value in loaded.values())  # nothing left on meta
    assert set(loaded) == set(state)  # MoCo: fc, encoder_k and the queue are gone, the prefix stripped
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_moco_features_are_layer4_with_2048_channels_at_stride_32(official_files):
    path, _ = official_files["resnet50-mocov2"]
    model = backbones.load_backbone("resnet50-mocov2", str(path))
    assert backbones.features(model, torch.rand(1, 3, 64, 96)).shape == (1, 2048, 2, 3)


def test_plain_torchvision_resnet50_files_load_with_or_without_fc(official_files, tmp_path):
    _, state = official_files["resnet50-mocov2"]
    with_fc = {**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-2018 files
    for name, content in [("fc.pth", with_fc), ("nofc.pth", state), ("old.pth", old)]:
        torch.save(content, tmp_path / name)
        model = backbones.load_backbone("resnet50-mocov2", str(tmp_path / name))
        assert torch.equal(model.state_dict()["layer4.2.bn3.running_var"], state["layer4.2.bn3.running_var"])


def test_training_checkpoint_wrappers_are_unwrapped(official_files, tmp_path):
    _, state = official_files["vits8"]
    teacher = {"module.backbone." + k: v for k, v in state.items()}
    teacher["module.head.last_layer.weight_g"] = torch.zeros(2, 2)
    wrappers = {"dino.pth": {"teacher": teacher, "student": {}, "epoch": 3},
                "state_dict.pth": {"state_dict": state}, "model.pth": {"model": state}}
    if hasattr(torch.serialization, "safe_globals"):  # DINO's real checkpoints hold their arguments
        wrappers["dino.pth"]["args"] = argparse.Namespace(arch="vit_small", patch_size=8)
    for name, content in wrappers.items():
        torch.save(content, tmp_path / name)
        model = backbones.load_backbone("vits8", str(tmp_path / name))
        assert torch.equal(model.state_dict()["norm.weight"], state["norm.weight"]), name


def test_moco_prefix_stripping_keeps_only_the_query_encoder():
    q, k = torch.ones(2), torch.zeros(2)
    state = {"module.encoder_q.conv1.weight": q, "module.encoder_k.conv1.weight": k,
             "module.encoder_q.fc.0.weight": q, "module.queue": k}
    assert backbones.clean_state_dict({"state_dict": state}, "x") == {"conv1.weight": q}


# ---------------------------------------------------------------- one-line errors

def one_line(info):
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_wrong_layout_fails_with_a_clear_message(official_files, tmp_path):
    path, state = official_files["vits8"]
    with pytest.raises(backbones.WeightsError) as info:
        backbones.load_backbone("vits16", str(path))
    message = one_line(info)
    assert f"{path} does not fit --arch vits16" in message and "2 wrong shapes" in message
    assert "is it the right --arch? (it fits --arch vits8)" in message
    partial = dict(state)
    del partial["norm.bias"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(backbones.WeightsError, match=r"partial.pth does not fit .*1 missing keys \(e.g. norm.bias\)"):
        backbones.load_backbone("vits8", str(tmp_path / "partial.pth"))
    dinov2_path, _ = official_files["dinov2-vits14-reg"]
    with pytest.raises(backbones.WeightsError) as info:
        backbones.load_backbone("dinov2-vits14", str(dinov2_path))  # registers in a file, none in the arch
    assert "1 unexpected keys (e.g. register_tokens)" in one_line(info)
    assert "(it fits --arch dinov2-vits14-reg)" in one_line(info)


def test_unreadable_files_fail_with_one_line(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"w": torch.randn(1000)}, tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:2000])
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a whole module: refused
    for name, expected in [("garbage.pth", "cannot be read as a torch file"), ("empty.pth", "the file is empty"),
                           ("truncated.pth", "cannot be read as a torch file (RuntimeError"),
                           ("tensor.pth", "holds a Tensor, not a state dict"),
                           ("pickled.pth", "Unsupported global"), ("missing.pth", "no such file"),
                           ("", "is a folder, not a file")]:
        with pytest.raises(backbones.WeightsError) as info:
            backbones.load_backbone("vits8", str(tmp_path / name))
        message = one_line(info)
        assert f"--weights {tmp_path / name}" in message and expected in message, message


def test_one_line_survives_empty_messages_and_unwraps_workers_and_torch_load():
    assert checkpoints.one_line(EOFError()) == "EOFError"
    assert checkpoints.one_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert checkpoints.one_line(ValueError("our own\nmessage"), named=False) == "our own message"
    worker = ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File x\nlayouts.DataError: /a/b.png: corrupt")
    assert checkpoints.one_line(worker) == "DataError: /a/b.png: corrupt"
    assert checkpoints.one_line(worker, named=False) == "/a/b.png: corrupt"
    refusal = RuntimeError("Weights only load failed. This file can still be loaded ...\n(1) In PyTorch 2.6 ...\n"
                           "WeightsUnpickler error: Unsupported global: GLOBAL os.system")
    assert checkpoints.one_line(refusal) == "RuntimeError: Unsupported global: GLOBAL os.system"


def test_weights_from_the_torch_hub_cache_work_offline(official_files, tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for arch in ["vits8", "resnet50-mocov2"]:
        path, state = official_files[arch]
        (cache / path.name).symlink_to(path)
        model = backbones.load_backbone(arch, None)  # the real torch.hub path, served from the cache
        key = "pos_embed" if arch == "vits8" else "conv1.weight"
        assert torch.equal(model.state_dict()[key], state[key])


def test_a_broken_file_in_the_hub_cache_says_to_delete_it(tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for content, expected in [(b"", "the file is empty"), (b"garbage", "cannot be read as a torch file")]:
        (cache / "dinov2_vits14_pretrain.pth").write_bytes(content)
        with pytest.raises(backbones.WeightsError) as info:
            backbones.load_backbone("dinov2-vits14", None)
        message = one_line(info)
        assert str(cache / "dinov2_vits14_pretrain.pth") in message and expected in message
        assert "delete it" in message


def test_no_weights_and_no_internet_says_where_to_put_the_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for arch in backbones.ARCHS:
        with pytest.raises(backbones.WeightsError) as info:
            backbones.load_backbone(arch, None)
        message = one_line(info)
        assert str(tmp_path / "hub" / "checkpoints") in message and "--weights PATH" in message
        assert backbones.ARCHS[arch]["url"] in message and "name resolution" in message
        assert message.endswith(backbones.offline_hint(arch))


def test_random_weights_warn_loudly():
    said = []
    model = backbones.load_backbone("vits16", "random", log=said.append)
    assert len(said) == 1 and "RANDOMLY INITIALISED" in said[0] and "meaningless" in said[0]
    assert not model.training and all(not p.requires_grad for p in model.parameters())
