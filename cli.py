"""The command line of il2vseg.py: its flags, defaults and checks, the data it needs, and its one-line errors.

Nothing of the paper is here beyond its default numbers (alpha 0.5, beta 0.05, gamma 0.1, Adam 1e-4 and
5e-4, EMA 0.998). This is the boundary where every input is checked once, before any work:
- `parse_args` defines every flag; `settle` fills what depends on the device, the data set and the
  backbone (`resolve_defaults`) and refuses any number out of range with one line (`check_numbers`);
- `build_datasets` builds the data sets a command needs and checks every file before any weights load;
- `trained_checkpoint` reads and checks the checkpoint of --eval / --predict and takes its settings;
- `output_folder` makes sure --out is writable, locks it, and refuses to replace another run's work;
- `report` turns a failure of the input into one line and an exit code (a bug keeps its traceback).
"""
import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import torch

import backbones
import checkpoints
import data
import losses


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every flag with a real default; the others say theirs in their help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An unknown flag or a value of the wrong type is one line too (argparse prints its usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


EVALUATE_PY = "--as-evaluate.py"  # evaluate.py's marker: the first argument is then its CHECKPOINT


def pixel_position(text):
    """--explain-pixel ROW,COL -> (row, col), both integers >= 0."""
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROW,COL (two integers)") from None
    if row < 0 or col < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: ROW and COL must be >= 0")
    return row, col


def parse_args(argv=None):
    """The flags of il2vseg.py (and of evaluate.py: `python evaluate.py CHECKPOINT [flags]` = --eval
    --checkpoint CHECKPOINT). cfg.typed lists the flags as typed, for `check_conflicts`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_evaluate = bool(argv) and argv[0] == EVALUATE_PY
    if as_evaluate:
        argv = ["--eval", *argv[1:]]
    p = Parser(prog="evaluate.py" if as_evaluate else None, formatter_class=DefaultsFormatter,
               description="IL2Vseg: unsupervised semantic segmentation with low-level visual cues.")
    if as_evaluate:
        p.add_argument("checkpoint_file", metavar="CHECKPOINT", help="the checkpoint to evaluate")
    a = p.add_argument_group("what to do")
    a.add_argument("--train", action="store_true", help="train the head and centres, then evaluate")
    a.add_argument("--eval", action="store_true", help="evaluate --checkpoint (or OUT/checkpoint.pt) on the val split")
    a.add_argument("--predict", metavar="FOLDER", default=None, help="write a colour mask and overlay for every image in FOLDER")
    a.add_argument("--explain", metavar="FOLDER", default=None,
                   help="write OUT/explain/NAME.png for every image in FOLDER: each stage of the method, captioned")
    a.add_argument("--explain-pixel", metavar="ROW,COL", type=pixel_position, default=None,
                   help="the pixel whose row of the colour affinity A --explain shows (default: the image centre)")
    a.add_argument("--ablation", choices=["alpha", "loss"], default=None,
                   help="train + evaluate once per setting of Figure 5 (alpha) or Table 4 (loss) and print the table")
    a.add_argument("--calibrate", action="store_true",
                   help="measure the loss shifts from the backbone on training images, write OUT/calibration.json "
                        "and .png, and stop (pairs.py)")
    a.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue training from OUT/checkpoint.pt (or PATH) with its optimiser, EMA and RNG state")
    a.add_argument("--overwrite", action="store_true",
                   help="let this run replace what an earlier run wrote in --out (its checkpoint.pt, metrics.json, "
                        "pictures, predictions); without it, --train refuses and --eval / --predict write beside them")
    a.add_argument("--checkpoint", default=None, help="checkpoint for --eval / --predict (default: OUT/checkpoint.pt)")
    a.add_argument("--out", default=None, help="folder for checkpoint.pt, metrics.json and images (default: runs/DATA)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)} (synthetic is built in; "
                   f"--eval, --predict, --explain and --resume take the checkpoint's)")
    d.add_argument("--data-root", default=None, help="root folder of the data set (not needed for synthetic)")
    d.add_argument("--n-classes", type=int, default=None, help="number of classes K (needed for --data folder)")
    d.add_argument("--train-split", default="train", help="split used for training")
    d.add_argument("--val-split", default="val", help="split used for evaluation (--data folder without labels: "
                   "optional, no evaluation without it)")
    d.add_argument("--crop", type=int, default=None,
                   help="training crop (default: 224; 128 for synthetic on the CPU; the multiple of the stride nearest it)")
    d.add_argument("--eval-crop", type=int, default=None,
                   help="evaluation centre crop (default: 320, 322 for /14 backbones; 192 for synthetic on the CPU)")
    d.add_argument("--five-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the five half-size crops (corners + centre) of every image, as STEGO and SmooSeg do "
                        "(default: on, except for potsdam and synthetic)")
    d.add_argument("--train-crop", choices=["centre", "random"], default="centre",
                   help="training crop after resizing: the centre, as the peers do, or a random crop with a random flip")
    d.add_argument("--resize", choices=["nearest", "bilinear"], default="nearest",
                   help="how images are resized (training, evaluation, prediction): PIL's nearest neighbour as the peers "
                        "do, or antialiased bilinear; labels always nearest")
    d.add_argument("--eval-images", type=int, default=None, help="evaluate on this many val images, evenly spaced (default: all)")
    d.add_argument("--num-workers", type=int, default=None, help="data loader worker processes (default: up to 16 on CUDA, 0 on the CPU)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="vits8", choices=list(backbones.ARCHS), help="frozen backbone (the paper: vits8)")
    m.add_argument("--weights", default=None, help="backbone weights: a file, 'random' (smoke tests), or unset for torch.hub")
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
    for term, what in (("smo", "L_smo (and the data term)"), ("fs", "L_fs"), ("reg", "L_reg"), ("corr", "L_corr")):
        t.add_argument(f"--no-{term}", dest=f"use_{term}", action="store_false", help=f"switch off {what}")
    t.add_argument("--smooth-temperature", type=float, default=0.1, help="P = softmax(F_seg / T) in L_smo")
    t.add_argument("--knn", type=int, default=7, help="STEGO's nearest-neighbour term of L_corr: pair each image "
                   "with one of its K nearest training images (0: off)")
    t.add_argument("--no-aug", dest="use_aug", action="store_false",
                   help="switch off the paper's L_corr term between an image and its jittered copy")
    t.add_argument("--shifts", choices=["auto", "published", "calibrate"], default="auto",
                   help="the shifts of L_smo and L_corr: the peers' where they tuned this data set and backbone, "
                        "measured from the backbone elsewhere (auto); the peers' table always; or measured always")
    t.add_argument("--calibrate-images", type=int, default=256, help="training images the shifts are measured on")
    t.add_argument("--fcm-m", type=float, default=2.0, help="FCM fuzzification index m, eqs (3)-(7)")
    t.add_argument("--fcm-sigma", type=float, default=0.1, help="sigma of the colour affinity, eq (10), RGB in [0, 1]")
    t.add_argument("--fcm-iters", type=int, default=20, help="FCM iteration cap")
    t.add_argument("--fs-reading", choices=["laplacian", "correlation"], default="laplacian",
                   help="eq (14)'s L_fs: a normalised graph Laplacian of F^f over W, or W against F^f's Gram matrix "
                        "as STEGO's loss is built (losses.py)")
    t.add_argument("--verbose", action="store_true",
                   help="also print, every --log-every steps, the gradient each weighted term of eq (15) sends to the head")
    t.add_argument("--fusion-in", choices=["fs", "all"], default="fs",
                   help="F^f of eq (13) feeds eq (14) only (fs), or also L_smo and the data term (all)")
    t.add_argument("--align", choices=["soft", "hard"], default="soft",
                   help="eq (13)'s cluster correspondence: each FCM cluster to where its pixels are, or a permutation")
    t.add_argument("--affinity", choices=["global", "local", "none"], default="local",
                   help="eqs (9)-(11) over a window of neighbours (the paper's words), all pixel pairs (as printed), or off")
    t.add_argument("--radius", type=int, default=3, help="window radius of --affinity local, in grid cells")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--save-every", type=int, default=100, help="write OUT/checkpoint.pt every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    t.add_argument("--compile", action="store_true", help="on CUDA, run the low-level branch under torch.compile "
                   "(reduce-overhead); compiling took 64 s on an H200, its speed-up is not measured yet")
    e = p.add_argument_group("evaluation")
    e.add_argument("--probe", choices=["kmeans", "centres", "both"], default="both",
                   help="cosine k-means on the codes (paper, STEGO), the trained global centres (SmooSeg), or both")
    e.add_argument("--kmeans-fit", choices=["train", "val"], default="train",
                   help="fit k-means on codes of training images (the peers) or of the evaluated split (transductive)")
    e.add_argument("--probe-images", type=int, default=500, help="at most this many training images (evenly spaced) for k-means")
    e.add_argument("--kmeans-restarts", type=int, default=5, help="k-means runs per seed; the lowest k-means loss is kept")
    e.add_argument("--kmeans-seeds", type=int, default=1, help="> 1: also report mean and std over this many k-means seeds")
    e.add_argument("--eval-alpha", type=float, default=0.0, help="also fuse F^l into the evaluated prediction, eq (13) "
                   "(below 1: the prediction keeps F^seg's scale)")
    e.add_argument("--eval-align", choices=["likelihood", "soft", "hard"], default="likelihood",
                   help="--eval-alpha's cluster correspondence: F^l by how typical a colour is of each cluster "
                        "(with --eval-alpha 0.25 the CRF still gained after fusion on CamVid, docs/results-camvid.md), as --align "
                        "soft, or a permutation")
    e.add_argument("--eval-batch-size", type=int, default=8, help="images per evaluation batch")
    e.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    e.add_argument("--no-flip-tta", dest="flip_tta", action="store_false", help="do not average the codes of the mirrored image")
    e.add_argument("--save-images", type=int, default=8, help="side-by-side PNGs for the first N images")
    cfg = p.parse_args(argv)
    asked = tuple(dict.fromkeys(FROM_CHECKPOINT + CARRIED + checkpoints.RESUME_MUST_MATCH))
    p.set_defaults(**dict.fromkeys(asked))  # parsed again without defaults: which were typed
    given = p.parse_args(argv)
    cfg.explicit = tuple(key for key in asked if getattr(given, key) is not None)
    cfg.typed, positional = typed_flags(p, argv)
    if as_evaluate:  # CHECKPOINT is --checkpoint; both at once is a conflict (check_conflicts)
        cfg.checkpoint_given = (cfg.checkpoint_file, cfg.checkpoint)
        cfg.checkpoint_index = positional - 1  # in evaluate.py's own arguments (without the --eval above)
        cfg.checkpoint = cfg.checkpoint if cfg.checkpoint is not None else cfg.checkpoint_file
        del cfg.checkpoint_file
    return cfg


def flag_of(parser, token):
    """The action a command-line token names as argparse resolves it (abbreviations included), or None."""
    name = token.split("=", 1)[0]
    if not name.startswith("--"):
        return None
    options = parser._option_string_actions
    matches = [name] if name in options else [flag for flag in options if flag.startswith(name)]
    return options[matches[0]] if len(matches) == 1 else None


def typed_flags(parser, argv):
    """The long flags that take a value in argv (as argparse resolves them), in order, repeats kept; and
    the index of the first token that is no flag's value (evaluate.py's CHECKPOINT), or None."""
    typed, expect, positional = [], False, None
    for index, token in enumerate(argv):
        if token == "--":
            break
        action = flag_of(parser, token)
        if action is not None and action.nargs != 0:
            typed.append(max(action.option_strings, key=len))
            expect = "=" not in token
        elif not expect and positional is None and not token.startswith("-"):
            positional = index
        else:
            expect = False
    return tuple(typed), positional


# the trained model's settings that --eval / --predict take from its checkpoint unless the command line gives
# them: the head's width, and F^l (for --eval-alpha) as in training
FROM_CHECKPOINT = ("dim", "fcm_m", "fcm_sigma", "fcm_iters", "affinity", "radius")
# what --eval, --predict, --explain and --resume take from the checkpoint they read when the command line is silent
CARRIED = ("weights", "arch", "data", "data_root", "n_classes", "crop", "eval_crop")
# what a checkpoint written before a setting existed was trained with
LEGACY = {"affinity": "global"}


def take_from_checkpoint(cfg, trained, path):
    """--eval / --predict: FROM_CHECKPOINT settings from the checkpoint's config `trained`, except those
    given on the command line (--dim excepted); checked like the command line's numbers."""
    for key in FROM_CHECKPOINT:
        if key == "dim" or key not in cfg.explicit:  # the head's width is a shape: always the checkpoint's
            setattr(cfg, key, trained.get(key, LEGACY.get(key, getattr(cfg, key))))
    try:
        check_numbers(cfg)
    except ValueError as error:
        raise ValueError(f"{path}: its settings: {error}") from None
    return cfg


# every number the command line takes: flag -> (lowest, highest, what is allowed)
LIMITS = {"steps": (1, 10**8), "batch_size": (1, 4096), "crop": (1, 8192), "eval_crop": (1, 8192),
          "save_every": (1, 10**8), "log_every": (1, 10**8), "dim": (1, 4096), "eval_batch_size": (1, 4096),
          "fcm_iters": (1, 10000), "num_workers": (0, 256), "save_images": (0, 10**6), "n_classes": (1, 255),
          "eval_images": (1, 10**8), "probe_images": (1, 10**8), "kmeans_restarts": (1, 1000),
          "kmeans_seeds": (1, 1000), "radius": (1, 64), "knn": (0, 1000), "calibrate_images": (2, 10**6), "seed": (0, 2**31 - 1), "alpha": (0.0, 1.0),
          "eval_alpha": (0.0, 0.99), "dropout": (0.0, 1.0), "beta": (0.0, 1e6), "gamma": (0.0, 1e6)}
POSITIVE = ("lr_head", "lr_centres", "smooth_temperature", "fcm_sigma")  # finite and > 0, float32 numbers
FLOAT32 = torch.finfo(torch.float32)  # training and evaluation compute in float32


def checkpoint_to_read(cfg):
    """The checkpoint --resume (PATH, or OUT/checkpoint.pt) or --eval / --predict (--checkpoint, or
    OUT/checkpoint.pt) reads, before --out has its default."""
    if isinstance(cfg.resume, str):
        return Path(cfg.resume)
    if cfg.checkpoint and not cfg.resume:
        return Path(cfg.checkpoint)
    out = cfg.out or (str(Path(cfg.checkpoint).parent) if cfg.checkpoint else str(Path("runs") / cfg.data))
    return Path(out) / "checkpoint.pt"


def carry_settings(cfg, log=print):
    """--eval, --predict, --explain, --resume: every CARRIED setting (--resume: also every one of RESUME_MUST_MATCH)
    the command line left unset comes from the checkpoint's config, said in one line; a typed --weights or
    --arch that cannot work with the checkpoint is one line naming the flag that fixes it. A missing
    checkpoint is left to its loader."""
    if not (cfg.resume or (not cfg.train and (cfg.eval or cfg.predict or cfg.explain))):
        return cfg
    path = checkpoint_to_read(cfg)
    if not path.is_file():
        return cfg
    state = checkpoints.load_checkpoint(path)
    trained = state["config"]
    was = trained.get("weights")
    if "weights" in cfg.explicit and cfg.weights != was and "random" in (cfg.weights, was):
        fix = "pass --weights random or omit --weights" if was == "random" else "omit --weights"
        raise checkpoints.CheckpointError(f"{path} was trained on --weights {was or '(torch.hub)'}, this run asks "
                                          f"for --weights {cfg.weights}: {fix}")
    if "arch" in cfg.explicit and "arch" in trained and trained["arch"] != cfg.arch:
        raise checkpoints.CheckpointError(f"{path} was trained on --arch {trained['arch']}, this run asks for "
                                          f"--arch {cfg.arch}: pass --arch {trained['arch']} or omit --arch")
    taken = []
    for key in dict.fromkeys(CARRIED + (checkpoints.RESUME_MUST_MATCH if cfg.resume else ())):
        if key in cfg.explicit or key not in trained or not hasattr(cfg, key):
            continue  # typed, not stored, or not a flag (train_files: what the run finds, check_resume compares it)
        if key == "data_root" and cfg.data != trained.get("data"):
            continue  # another data set: its own root
        if key == "n_classes" and trained[key] is None and cfg.data == "folder":
            trained = {**trained, "n_classes": state["n_clusters"]}
        if key == "crop" and not cfg.resume:
            continue  # only training uses the training crop
        if getattr(cfg, key) != trained[key]:
            setattr(cfg, key, trained[key])
            taken.append(f"{key.replace('_', '-')} {'(torch.hub)' if trained[key] is None else trained[key]}")
    if taken:
        log(f"settings from {path} (the command line did not give them): {', '.join(taken)}")
    return cfg


def resolve_defaults(cfg, device):
    """Fill the device-dependent defaults and the peers' loss constants; check every number."""
    cuda = device.type == "cuda"
    quick = cfg.data == "synthetic" and not cuda  # the out-of-the-box CPU run must stay short
    stride = backbones.arch_facts(cfg.arch)["stride"]
    near = lambda side: stride * max(1, round(side / stride))  # crops are multiples of the stride (322 for /14)
    defaults = {"crop": near(128 if quick else 224), "eval_crop": near(192 if quick else 320),
                "batch_size": 32 if cuda else 8,
                "steps": 3000 if cfg.data != "synthetic" else (300 if cuda else 60),
                "num_workers": min(16, os.cpu_count() or 1) if cuda else 0,  # on the CPU workers compete for cores
                "five_crop": cfg.data not in ("potsdam", "synthetic"),  # the peers five-crop Cityscapes and COCO-Stuff
                "out": str(Path(cfg.checkpoint).parent) if cfg.checkpoint else str(Path("runs") / cfg.data)}
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.data not in data.DATASETS:
        raise ValueError(f"--data {cfg.data}: unknown data set, choose one of {', '.join(data.DATASETS)}")
    if not (cfg.use_smo or cfg.use_fs or cfg.use_reg or cfg.use_corr):
        raise ValueError("every loss term is switched off (--no-smo --no-fs --no-reg --no-corr): nothing to train")
    if cfg.data == "folder" and not cfg.n_classes:
        raise ValueError("--data folder needs --n-classes K")
    check_numbers(cfg)
    for key in ("crop", "eval_crop"):
        if getattr(cfg, key) % stride:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)} must be a multiple of the {cfg.arch} "
                             f"stride {stride}")
    if cfg.eval_crop < 2 * stride:  # a 1 x 1 grid of codes: nothing to segment, k-means fails after training
        raise ValueError(f"--eval-crop {cfg.eval_crop} gives a {cfg.eval_crop // stride}x{cfg.eval_crop // stride} "
                         f"grid of codes ({cfg.arch} stride {stride}): use at least {2 * stride}")
    if cfg.data_root is not None:
        cfg.data_root = str(Path(cfg.data_root).resolve())  # a resumed run must read the same folder
    if cfg.weights not in (None, "random"):
        cfg.weights = str(Path(cfg.weights).expanduser().resolve())  # the same file, however it is named
    constants = losses.loss_constants(cfg.data, cfg.arch)  # the peers' tuned shifts and weights
    cfg.shift_close, cfg.shift_far = constants["smooseg_shifts"]["close"], constants["smooseg_shifts"]["far"]
    cfg.corr_shifts, cfg.corr_weights = constants["stego_shifts"], constants["stego_weights"]
    return cfg


def check_numbers(cfg):
    """Every number in range and finite, one line for the first that is not."""
    for key, (low, high) in LIMITS.items():
        value = getattr(cfg, key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise ValueError(f"--{key.replace('_', '-')} must lie in [{low}, {high}], got {value}")
    for key in POSITIVE:
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number > 0, got {getattr(cfg, key)}")
        if not FLOAT32.tiny <= value <= FLOAT32.max:  # it would be 0 or inf in float32
            raise ValueError(f"--{key.replace('_', '-')} {value} is not a float32 number (0 or inf there): "
                             f"use a value in [{FLOAT32.tiny:.2g}, {FLOAT32.max:.2g}]")
    if cfg.fcm_sigma ** 2 == 0 or 0.5 / cfg.fcm_sigma ** 2 > FLOAT32.max:
        lowest = math.sqrt(0.5 / FLOAT32.max)
        raise ValueError(f"--fcm-sigma {cfg.fcm_sigma} is too small: eq (10) divides by 2 sigma^2, which "
                         f"underflows in float32; use --fcm-sigma >= {lowest * 1.01:.2g}")
    if not (0.0 <= cfg.ema < 1.0):
        raise ValueError(f"--ema must lie in [0, 1), got {cfg.ema}")
    if not (isinstance(cfg.fcm_m, (int, float)) and math.isfinite(cfg.fcm_m) and 1 < cfg.fcm_m <= 100):
        raise ValueError(f"--fcm-m must lie in (1, 100] (eq 4 divides by m - 1), got {cfg.fcm_m}")
    for key, allowed in (("affinity", ("global", "local", "none")), ("align", ("soft", "hard")),
                         ("eval_align", ("likelihood", "soft", "hard"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)}: not one of {', '.join(allowed)}")


class UsageError(ValueError):
    """The command line asks for nothing, or for something contradictory (exit code 2, as argparse)."""


def settle(cfg):
    """The run's device and every default that depends on it, the data set and the backbone; every flag
    checked (one line for the first that is wrong)."""
    check_conflicts(cfg)
    cfg.train = cfg.train or bool(cfg.resume)
    if not (cfg.train or cfg.eval or cfg.predict or cfg.ablation or cfg.calibrate or cfg.explain):
        raise UsageError("nothing to do: pass --train, --eval, --predict FOLDER, --explain FOLDER, --ablation or "
                         "--calibrate (see --help)")
    device = pick_device(cfg.device)
    carry_settings(cfg)
    resolve_defaults(cfg, device)
    return device


PATH_FLAGS = ("out", "checkpoint", "data_root", "weights", "predict", "resume")  # "" would mean the working folder


def check_conflicts(cfg):
    """The one check of flags that contradict each other (or would be ignored without a word), of flags
    given twice (argparse keeps the last), and of empty paths: one line (exit 1) before any work."""
    typed = getattr(cfg, "typed", ())
    twice = next((flag for flag in typed if typed.count(flag) > 1), None)
    given = getattr(cfg, "checkpoint_given", (None, None))
    if None not in given:
        raise ValueError(f"evaluate.py got two checkpoints, CHECKPOINT {given[0]} and --checkpoint {given[1]}: "
                         f"give one")
    if twice:
        raise ValueError(f"{twice} is given {typed.count(twice)} times (only the last would count): give it once")
    for key in PATH_FLAGS:
        if getattr(cfg, key) == "":
            raise ValueError(f"--{key.replace('_', '-')} is empty (\"\"): give a path")
    training = cfg.train or cfg.resume
    if cfg.ablation and (cfg.eval or cfg.predict or cfg.explain or cfg.resume or cfg.checkpoint or cfg.calibrate):
        raise ValueError("--ablation trains and evaluates every setting itself: use it without --eval, --predict, "
                         "--explain, --resume, --checkpoint and --calibrate")
    if cfg.calibrate and (training or cfg.eval or cfg.predict):
        raise ValueError("--calibrate measures the loss shifts and stops: run it alone, then --train")
    if training and cfg.checkpoint:
        raise ValueError(f"--checkpoint {cfg.checkpoint} is for --eval / --predict without --train: --train "
                         f"evaluates and predicts with the model it trains (continue a checkpoint with --resume PATH)")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def build_datasets(cfg):
    """((train, val, k-means fit set), --predict folder) for what the command does, None where it needs
    none; every file checked (data.check_files) before any weights load."""
    common = dict(n_classes=cfg.n_classes, seed=cfg.seed, stride=backbones.ARCHS[cfg.arch]["stride"],
                  interpolation=cfg.resize)
    train_set = val_set = fit_set = None
    if cfg.train or cfg.ablation or cfg.calibrate:
        train_set = data.build_dataset(cfg.data, cfg.data_root, split=cfg.train_split, mode="train",
                                       crop_size=cfg.crop, five_crop=cfg.five_crop, train_crop=cfg.train_crop, **common)
    if (cfg.train or cfg.eval or cfg.ablation) and not unlabelled_folder_without_val(cfg):
        val_set = data.build_dataset(cfg.data, cfg.data_root, split=cfg.val_split, mode="eval",
                                     crop_size=cfg.eval_crop, length=cfg.eval_images, **common)
        if cfg.probe != "centres" and cfg.kmeans_fit == "train":
            fit_length = cfg.probe_images
            if cfg.data == "synthetic":  # drawn scenes: the training split's own, not probe_images new ones
                fit_length = min(fit_length, len(data.list_samples("synthetic", split=cfg.train_split,
                                                                   seed=cfg.seed)["samples"]))
            fit_set = data.build_dataset(cfg.data, cfg.data_root, split=cfg.train_split, mode="eval",
                                         crop_size=cfg.eval_crop, length=fit_length, **common)
        codes = (len(fit_set) if fit_set is not None else len(val_set)) * (cfg.eval_crop // common["stride"]) ** 2
        if cfg.probe != "centres" and codes < val_set.n_classes:
            raise ValueError(f"k-means would fit {val_set.n_classes} clusters on {codes} codes: use a larger "
                             f"--eval-crop or --probe-images")
        if cfg.ablation and not val_set.has_labels:
            raise ValueError(f"--ablation needs labels in the {cfg.val_split} split")
    if train_set is not None and len(train_set) < cfg.batch_size:
        raise ValueError(f"the {cfg.train_split} split has {len(train_set)} images, fewer than --batch-size "
                         f"{cfg.batch_size}")
    if train_set is not None and cfg.knn >= len(train_set):
        raise ValueError(f"--knn {cfg.knn} needs more than {cfg.knn} training images, the {cfg.train_split} split "
                         f"has {len(train_set)}: use a smaller --knn (0 switches the term off)")
    predict_set = data.PredictFolder(cfg.predict, cfg.eval_crop, common["stride"], cfg.resize) if cfg.predict else None
    problems = []
    for dataset in (train_set, val_set, fit_set, predict_set):
        if dataset is not None:
            with contextlib.suppress(data.DataError):  # its problems are in dataset.problems
                data.check_files(dataset)
            problems += [p for p in getattr(dataset, "problems", []) if p not in problems]  # each bad file once
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise data.DataError(f"{len(problems)} files cannot be used: " + "; ".join(problems[:3]) + more)
    return (train_set, val_set, fit_set), predict_set


def unlabelled_folder_without_val(cfg):
    """--train --data folder on images without labels needs no val split (there is nothing to score)."""
    root = Path(cfg.data_root or ".")
    return (cfg.data == "folder" and cfg.train and not cfg.eval and not (root / "labels").is_dir()
            and not (root / "imgs" / cfg.val_split).is_dir())


def explain_images(cfg):
    """The images of --explain FOLDER (as --predict reads them), every file checked; None without it."""
    if not cfg.explain:
        return None
    images = data.PredictFolder(cfg.explain, cfg.eval_crop, backbones.ARCHS[cfg.arch]["stride"], cfg.resize)
    data.check_files(images)
    return images


def trained_checkpoint(cfg, datasets):
    """--eval / --predict / --explain: the checkpoint (--checkpoint, or OUT/checkpoint.pt), checked before any
    weights load: its clusters against the data set's classes (its --arch and random against real weights:
    carry_settings). Its head width and F^l's settings are taken (take_from_checkpoint); cfg.checkpoint is
    set to its path."""
    path = cfg.checkpoint = Path(cfg.checkpoint or Path(cfg.out) / "checkpoint.pt")
    state = checkpoints.load_checkpoint(path)
    trained = state["config"]
    take_from_checkpoint(cfg, trained, path)
    weights = trained.get("weights")
    if weights != cfg.weights:  # two real weight files (one random is refused by carry_settings)
        print(f"note: {path} was trained on the backbone weights {weights or '(torch.hub)'}; this run loads "
              f"{cfg.weights or '(torch.hub)'}")
    if cfg.eval and state["n_clusters"] != datasets[1].n_classes:
        raise checkpoints.CheckpointError(f"{path} has {state['n_clusters']} clusters, --data {cfg.data} "
                                          f"has {datasets[1].n_classes} classes")
    return state


@contextlib.contextmanager
def output_folder(cfg, predict_set=None, explain_set=None, log=print):
    """`with output_folder(cfg, predict_set, explain_set):` --out is writable with room for a checkpoint, no other il2vseg
    run uses it (a lock held for the block; temporary files a killed save left there are removed), and
    nothing an earlier run wrote is replaced without --overwrite: --train refuses a folder that holds
    another run's checkpoint (also with --resume of another file); an evaluation or prediction that would
    replace an earlier run's metrics.json, pictures, masks or --explain pictures goes to OUT/eval-N/,
    OUT/predictions-N/ or OUT/explain-N/ instead, said in one line. Sets cfg.eval_out, cfg.predict_out and
    cfg.explain_out, where they go."""
    checkpoints.check_output_folder(cfg.out)
    with checkpoints.OutputLock(cfg.out):
        checkpoints.remove_stale_temporaries(cfg.out, log)
        out = Path(cfg.out)
        checkpoint = out / "checkpoint.pt"
        resumed = checkpoints.resumed_path(cfg)
        own = resumed is not None and resumed.exists() and checkpoint.exists() and os.path.samefile(resumed, checkpoint)
        if cfg.train and checkpoint.exists() and not own and not cfg.overwrite:
            if resumed is None:
                raise checkpoints.CheckpointError(f"--out {cfg.out} already holds checkpoint.pt: continue it with "
                                                  f"--resume, replace it with --overwrite, or choose another --out")
            raise checkpoints.CheckpointError(f"--out {cfg.out} holds another run's checkpoint.pt and this run "
                                              f"continues {resumed}: choose another --out, or replace it with "
                                              f"--overwrite")
        if cfg.ablation and not cfg.overwrite:
            earlier = [folder.name for _, _, folder in ablation_runs(cfg) if (folder / "checkpoint.pt").exists()]
            if earlier:
                more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
                raise checkpoints.CheckpointError(f"--out {cfg.out} already holds runs of --ablation {cfg.ablation} "
                                                  f"({earlier[0]}{more}): replace them with --overwrite, or choose "
                                                  f"another --out")
        cfg.eval_out = str(out)
        earlier = (out / "metrics.json").exists() or any((out / "side_by_side").glob("*.png"))
        if (cfg.train or cfg.eval) and not cfg.ablation and earlier and not own and not cfg.overwrite:
            cfg.eval_out = str(out / f"eval-{checkpoints.first_free(out, ['eval'])}")
            log(f"note: {out} holds an earlier run's metrics.json or pictures: this evaluation writes to "
                f"{cfg.eval_out} (--overwrite replaces them instead)")
        cfg.predict_out = beside_earlier(out, "predictions", [f"{sample['name']}_{kind}.png" for sample in
                                         getattr(predict_set, "samples", []) for kind in ("ids", "mask", "overlay")],
                                         cfg.overwrite, log)
        cfg.explain_out = beside_earlier(out, "explain", [f"{sample['name']}.png" for sample in
                                         getattr(explain_set, "samples", [])], cfg.overwrite, log)
        yield


def beside_earlier(out, folder, names, overwrite, log=print):
    """OUT/FOLDER, or OUT/FOLDER-N (said in one line) when OUT/FOLDER holds a file of `names` that an earlier
    run wrote and --overwrite is not given."""
    if overwrite or not any((out / folder / name).exists() for name in names):
        return str(out / folder)
    free = str(out / f"{folder}-{checkpoints.first_free(out, [folder])}")
    log(f"note: {out / folder} holds files of the same names from an earlier run: these go to {free} "
        f"(--overwrite replaces them instead)")
    return free


def out_of_memory(error):
    """torch raises OutOfMemoryError on CUDA, but a plain RuntimeError naming its allocator on the CPU."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        type(error) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(error))


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit): stops the run as Ctrl-C does, with its own line."""


def terminate(signum, frame):
    raise Terminated()


def report(error, cfg, progress):
    """The one line on stderr for a failure of the input, and the exit code (1; 2 for usage; 130 after
    Ctrl-C, 143 after SIGTERM). Anything else is a bug in il2vseg: it is raised again, with its traceback."""
    path = Path(progress.get("path") or Path(cfg.out or ".") / "checkpoint.pt")
    damaged = checkpoints.damaged_entry(path) if "saved" in progress and path.is_file() else None
    saved = ("no checkpoint was written by this run" if "saved" not in progress else
             f"the checkpoint of step {progress['saved']} in {path} is intact" if not damaged else
             f"the checkpoint of step {progress['saved']} in {path} is damaged ({damaged})")
    if isinstance(error, KeyboardInterrupt):
        what = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"
        print(f"{what}; {saved}" + (": continue with --resume" if "saved" in progress and not damaged else "")
              if cfg.train else what, file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
    if out_of_memory(error):
        print(f"error: out of memory ({checkpoints.one_line(error)}): use a smaller --batch-size, --crop, "
              f"--eval-crop or --dim", file=sys.stderr)
        return 1
    known = (backbones.WeightsError, checkpoints.CheckpointError, data.DataError, ValueError, FloatingPointError,
             OSError)
    if not isinstance(error, known):
        raise error
    line = checkpoints.one_line(error, named=False)
    if isinstance(error, OSError) and error.filename is None and stdout_broken():
        line = (f"cannot write to standard output ({error.strerror or line}): the console log is lost, the run "
                f"stopped; its files in --out {cfg.out} are complete up to its last save")
    print(f"error: {line}" + (f"; {saved}" if isinstance(error, FloatingPointError) else ""), file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


def stdout_broken():
    """True when standard output cannot be written (a full device, a closed pipe); it is then pointed at
    os.devnull so that Python's own flush at exit prints nothing more."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True


LOSS_ABLATION = [  # the rows of the paper's Table 4 (the data term always goes with L_smo)
    ("(1) L_smo", dict(use_smo=True, use_fs=False, use_reg=False, use_corr=False)),
    ("(2) L_smo + L_fs", dict(use_smo=True, use_fs=True, use_reg=True, use_corr=False)),
    ("(3) L_smo + L_corr", dict(use_smo=True, use_fs=False, use_reg=False, use_corr=True)),
    ("(4) L_smo + L_fs + L_corr", dict(use_smo=True, use_fs=True, use_reg=True, use_corr=True)),
]
ALPHA_ABLATION = [0.0, 0.25, 0.5, 0.75, 1.0]  # the paper's Figure 5 (training alpha)


def ablation_runs(cfg):
    """(row name, the settings it changes, its folder OUT/ablation_ROW) of --ablation alpha or loss."""
    settings = ([(f"alpha = {a}", {"alpha": a}) for a in ALPHA_ABLATION]
                if cfg.ablation == "alpha" else LOSS_ABLATION)
    return [(name, change, Path(cfg.out) / ("ablation_" + folder_name(name))) for name, change in settings]


def folder_name(setting):
    """A readable folder name for a row: 'alpha = 0.25' -> 'alpha_0.25', '(2) L_smo + L_fs' -> '2_L_smo_L_fs'."""
    return "_".join("".join(c if c.isalnum() or c in "._" else " " for c in setting).split()).strip("_")
