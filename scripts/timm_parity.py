"""Do our backbones compute what timm's do? Same random weights, max abs difference of the features.

For every --arch of backbones.py: build ours, draw random weights (the default init, every parameter and
buffer then perturbed so that no LayerNorm is the identity and no bias is zero), convert that state dict
(the official layout) to timm's with timm's own converter, load it strictly into timm's model, and compare
the dense features F^p in float32 at the pretraining size and at another size (where the two interpolate
the position embedding differently: timm resizes to a size with antialiasing, DINO and plain DINOv2 use
a scale factor with a 0.1 offset). timm is only needed by this script, never by il2vseg.

    python scripts/timm_parity.py [--device cuda]
"""
import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import backbones  # noqa: E402

TIMM_NAMES = {"vits8": "vit_small_patch8_224", "vits16": "vit_small_patch16_224", "vitb8": "vit_base_patch8_224",
              "dinov2-vits14": "vit_small_patch14_dinov2", "dinov2-vitb14": "vit_base_patch14_dinov2",
              "dinov2-vits14-reg": "vit_small_patch14_reg4_dinov2", "dinov2-vitb14-reg": "vit_base_patch14_reg4_dinov2",
              "resnet50-mocov2": "resnet50"}


def random_weights(model, seed):
    """The default init, then every float tensor perturbed (BatchNorm variances kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.mul_(torch.exp(0.3 * noise))
            else:
                tensor.add_(0.02 * noise)
    return model


def timm_features(model, images, arch):
    """timm's dense features (B, C, h, w) of ImageNet-normalised images."""
    out = model.forward_features(images)
    if backbones.ARCHS[arch]["kind"] == "resnet":
        return out  # layer4 (B, 2048, h, w)
    tokens = out[:, model.num_prefix_tokens:]  # CLS (and registers) dropped: (B, h*w, C)
    stride = backbones.ARCHS[arch]["stride"]
    h, w = images.shape[-2] // stride, images.shape[-1] // stride
    return tokens.transpose(1, 2).reshape(out.shape[0], -1, h, w)


def compare(arch, timm, device, sizes):
    ours = random_weights(backbones.build_backbone(arch), seed=0).eval()
    facts = backbones.ARCHS[arch]
    if facts["kind"] == "resnet":
        reference = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0)
        missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{arch}: timm's keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
        reference = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, dynamic_img_size=True,
                                      img_size=facts["pretrain_size"])
        reference.load_state_dict(checkpoint_filter_fn(ours.state_dict(), reference), strict=True)
    ours, reference = ours.to(device), reference.to(device).eval()
    results = []
    generator = torch.Generator().manual_seed(1)
    for size in sizes:
        images = torch.rand(2, 3, size, size, generator=generator).to(device)
        x = backbones.normalize(images)
        with torch.no_grad():
            a, b = ours(x), timm_features(reference, x, arch)
        results.append((size, tuple(a.shape), float((a - b).abs().max()), float(a.abs().max())))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default=",".join(TIMM_NAMES))
    args = parser.parse_args()
    import timm  # only here: never a dependency of il2vseg
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on the GPU too
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"timm {timm.__version__}, torch {torch.__version__}, {where}, float32 (TF32 off)")
    print("| --arch | timm model | input | features | max abs difference | max abs feature |")
    print("|---|---|---|---|---:|---:|")
    for arch in args.archs.split(","):
        pretrain = backbones.ARCHS[arch].get("pretrain_size", 224)
        stride = backbones.ARCHS[arch]["stride"]
        other = stride * round(320 / stride)  # 320 (322 for /14, 320 for /32)
        try:
            for size, shape, diff, scale in compare(arch, timm, device, (pretrain, other)):
                print(f"| {arch} | {TIMM_NAMES[arch]} | {size}² | {shape} | {diff:.2e} | {scale:.2f} |", flush=True)
        except Exception as error:  # one architecture's failure must not hide the others' numbers
            print(f"| {arch} | {TIMM_NAMES[arch]} | FAILED: {type(error).__name__}: {str(error)[:200]} | | | |", flush=True)


if __name__ == "__main__":
    main()
