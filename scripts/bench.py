"""Speed benchmarks of il2vseg (not tests): prints one table.

    python scripts/bench.py                 # on CUDA when present, else a reduced CPU set
    python scripts/bench.py --camvid DIR    # use a real 480x360 CamVid frame for the CRF rows

Rows: the ViT-S/8 forward (bf16 on CUDA; timm's ViT beside it when timm happens to be installed,
it is never a dependency), the low-level branch (FCM + colour affinity + A·P, eqs 1-12; both
readings of the affinity; on CUDA also under torch.compile as training runs it), one training step
split into backbone / low-level branch / head + losses + update, the dense CRF, and the cosine
k-means of the evaluation. The speed targets are printed beside each row.
"""
import argparse
import datetime
import importlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import cli  # noqa: E402
import crf  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import fcm  # noqa: E402
import il2vseg  # noqa: E402


def timed(fn, device, repeat=10, warmup=3):
    """Median wall time of fn() in milliseconds, synchronising CUDA around every call."""
    return timed_together([fn], device, repeat, warmup)[0][0]


def timed_together(fns, device, repeat=5, warmup=2):
    """Median wall times (ms) of several functions measured round by round (one call of each per
    round), plus the median over rounds of first - sum(others): a paired difference, steadier than a
    difference of medians when the machine's speed drifts."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    rounds = []
    for _ in range(repeat):
        times = []
        for fn in fns:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        rounds.append(times)
    median = lambda values: sorted(values)[len(values) // 2]
    return [median([r[i] for r in rounds]) for i in range(len(fns))], median([r[0] - sum(r[1:]) for r in rounds])


def profile_step(step, device, top=15):
    """torch.profiler over one training step (after the timed ones): how many kernels it launches and
    which take the time."""
    from torch.profiler import ProfilerActivity, profile  # only for this option
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"\nprofile of one training step: {len(on_device)} kernels and copies on the GPU, "
          f"{sum(e.device_time_total for e in on_device) / 1000:.2f} ms of GPU time" if cuda else
          f"\nprofile of one training step: {len(prof.events())} operator calls on the CPU")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def training_config(args):
    cfg = cli.parse_args(["--data", "cityscapes", "--weights", "random", "--batch-size", str(args.batch)])
    return cli.resolve_defaults(cfg, torch.device("cpu"))  # fills the loss constants


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32 on CUDA, 4 on the CPU)")
    parser.add_argument("--camvid", default=None, help="folder with CamVid frames for the CRF rows")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the ViT, and time the training step as --compile runs it")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one training step: kernel launches and the top kernels (torch.profiler)")
    args = parser.parse_args()
    device = cli.pick_device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (32 if cuda else 4)
    torch.manual_seed(0)
    rows = []  # (what, milliseconds, per, target)

    def add(name, ms, per, target=""):
        rows.append((name, ms, per, target))
        print(f"  {name:<52} {ms:10.2f} ms  {per:<12} {target}", flush=True)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"il2vseg bench, {datetime.date.today()}, {name}, torch {torch.__version__}, batch {args.batch}")

    # ---- backbone forward
    backbone = backbones.build_backbone("vits8").to(device).eval().requires_grad_(False)
    images224 = torch.rand(args.batch, 3, 224, 224, device=device)
    add("ViT-S/8 forward 224x224 (ours, bf16 on CUDA)",
        timed(lambda: backbones.features(backbone, images224), device), f"batch {args.batch}",
        "<= timm (7.5 ms on H100, batch 32)" if cuda else "")
    if args.compile:
        compiled = torch.compile(backbone)
        add("ViT-S/8 forward 224x224 (ours, torch.compile)",
            timed(lambda: backbones.features(compiled, images224), device), f"batch {args.batch}")
    try:
        timm = importlib.import_module("timm")  # optional, only for comparison: never a dependency
        reference = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).to(device).eval()

        def timm_forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                return reference.forward_features(backbones.normalize(images224))
        add("ViT-S/8 forward 224x224 (timm, same precision)", timed(timm_forward, device), f"batch {args.batch}")
    except ImportError:
        pass

    # ---- low-level branch, eqs (1)-(12)
    images320 = torch.rand(args.batch, 3, 320, 320, device=device)
    cfg = training_config(args)
    for affinity in ("global", "local"):
        ms = timed(lambda: fcm.low_level_cue(images320, 27, affinity=affinity, radius=cfg.radius), device, repeat=5)
        add(f"low-level branch 320x320 (40x40 grid), K=27, {affinity}", ms, f"batch {args.batch}",
            "< 5 ms on H100" if cuda else f"< 50 ms/img: {ms / args.batch:.1f} ms/img")
    if cuda:  # as training runs it: torch.compile(mode="reduce-overhead")
        notes = []
        compiled = il2vseg.compiled_with_fallback(il2vseg.low_level_branch(cfg, 27, 8), log=notes.append)
        ms = timed(lambda: compiled(images320), device)
        add(f"low-level branch 320x320, K=27, torch.compile{' FAILED: eager' if notes else ''}", ms,
            f"batch {args.batch}", "< 5 ms on H100")

    # ---- one training step, split
    n_classes = 27
    model = il2vseg.build_model(cfg, backbone, n_classes, device)
    optimiser = il2vseg.make_optimiser(model, cfg)
    generator = torch.Generator(device=device).manual_seed(0)
    low_level = il2vseg.low_level_branch(cfg, n_classes, backbone.stride)  # as training runs it (eager unless --compile)
    if cuda and args.compile:
        low_level = il2vseg.compiled_with_fallback(low_level)

    def step():
        total, _, _ = il2vseg.loss_terms(backbone, model, images224, cfg, generator, low_level)
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        il2vseg.ema_update(model.global_centres, model.local_centres, cfg.ema)

    both = torch.cat([images224, images224])
    (t_step, t_backbone, t_low), t_rest = timed_together(
        [step, lambda: backbones.features(backbone, both), lambda: low_level(images224)], device)
    add("train step 224x224: backbone (image + jittered copy)", t_backbone, f"batch {args.batch}")
    add(f"train step 224x224: low-level branch ({cfg.affinity})", t_low, f"batch {args.batch}",
        f"< 10% of a step: {100 * t_low / t_step:.0f}%")
    add("train step 224x224: head + losses + update (the rest)", t_rest, f"batch {args.batch}")
    add("train step 224x224: total", t_step, f"batch {args.batch}",
        f"{t_step / t_backbone:.2f}x the step's backbone forward (target <= 2x)")
    if args.profile:
        profile_step(step, device)

    # ---- dense CRF
    frame = None
    if args.camvid:
        paths = sorted(Path(args.camvid).glob("*.png"))
        if paths:
            array, _ = data.read_rgb(paths[0])  # (360, 480, 3) uint8
            frame = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255  # (3, 360, 480) in [0, 1]
    if frame is None:
        frame = torch.rand(3, 360, 480)
    for (h, w), k in (((360, 480), 11), ((320, 320), 27)):
        image = (frame[:, :h, :w] * 255).round().to(torch.uint8)[None].to(device)
        probs = torch.softmax(torch.randn(1, k, h // 8, w // 8, device=device) * 3, dim=1)
        probs = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        ms = timed(lambda: crf.dense_crf(image, probs), device, repeat=3, warmup=1)
        add(f"dense CRF {w}x{h}, K={k}, 10 iterations", ms, "image",
            "< 20 ms on H100" if cuda else "<= 1000 ms (C++ reference, 1 core)")

    # ---- k-means over 500 images' codes
    n_images = 500 if cuda else 50
    codes = torch.randn(n_images * 40 * 40, 64, device=device)
    ms = timed(lambda: evaluate.kmeans_cosine(codes, 27, seed=0), device, repeat=3, warmup=1)
    add(f"cosine k-means, {n_images} images x 40x40 codes, K=27, one run", ms, "all",
        "< 2000 ms on GPU" if cuda else "")

    print()
    print(f"| what | time | per | target |  ({datetime.date.today()}, {name}, {platform.python_version()})")
    print("|---|---:|---|---|")
    for what, ms, per, target in rows:
        print(f"| {what} | {ms:.2f} ms | {per} | {target} |")


if __name__ == "__main__":
    main()
