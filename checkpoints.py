"""Training never loses work: checkpoints, the run's output folder and its lock.

Nothing of the paper is here; il2vseg.py calls these so that its training loop stays readable.

- `save_checkpoint` writes atomically: the whole file is serialised in memory, written to a temporary
  file with a unique name in the same folder, fsync'ed, then renamed over the checkpoint. A run killed
  at any moment leaves the previous checkpoint or the new one, never a half-written file, and two runs
  never share a temporary file. Weights or optimiser state that are not finite are never written.
  A full disk is one line ("no space left on device while writing PATH") and the temporary file is
  removed.
- `load_checkpoint` refuses anything that is not a complete il2vseg checkpoint with one line naming
  the file and the missing or broken entry (empty, truncated, foreign files, missing keys, a negative
  step, an empty config). Before torch.load it checks every CRC-32 of the zip (`damaged_entry`): torch
  does not, so bytes changed on the disk would otherwise load as other weights.
- Temporary files are named NAME.PID.HEX.tmp; a later run in the same folder removes those a killed
  save left behind (`remove_stale_temporaries`).
- `OutputLock` keeps two runs out of one output folder (an OS file lock: released when the process
  ends, even by kill -9).
- `check_output_folder` finds a read-only folder or a full disk before any work is done.
- The random state and the Adam implementation of a resumed run (`rng_state`, `set_rng_state`,
  `use_own_implementation`), so that a resumed run is bit-identical to an uninterrupted one on the CPU.
"""
import errno
import io
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import torch

try:  # file locks: fcntl on Linux and macOS, msvcrt on Windows
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

# entry -> type every checkpoint must hold
REQUIRED = {"step": int, "model": dict, "optimiser": dict, "rng": dict, "n_clusters": int, "config": dict}


class CheckpointError(RuntimeError):
    """A checkpoint or output folder is missing, unreadable, in use or from another configuration
    (one-line message)."""


def one_line(error, named=True):
    """One line for a failure: "TypeName: first line of its message" (named=False: the message alone).

    Used for every error of the project: wrapping a foreign one (torch, PIL, the OS) into ours, and the
    final "error: ..." line. Two foreign messages are reduced to what says why: a DataLoader worker's
    wrapped traceback (its last line) and torch.load's weights-only refusal (its first lines are about
    torch's defaults)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        kind, _, text = lines[-1].partition(": ")
        name, lines = kind.split(".")[-1], [text or lines[-1]]
    elif lines and lines[0].startswith("Weights only load failed"):
        reasons = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines[1:]
                   if not line.startswith(("(1)", "(2)", "Please file", "Check the"))]
        lines = [reason for reason in reasons if reason][:1] or lines
    if not named:
        return " ".join(lines) or name
    return f"{name}: {lines[0][:200]}" if lines else name


# --------------------------------------------------------------------------------------------
# Writing and reading checkpoints
# --------------------------------------------------------------------------------------------

def non_finite_entries(state):
    """Names of the floating-point tensors in a (nested) state that hold NaN or inf."""
    bad = []

    def visit(value, name):
        if torch.is_tensor(value):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}[{index}]")

    visit({"model": state.get("model", {}), "optimiser": state.get("optimiser", {})}, "")
    return bad


def write_atomic(path, payload):
    """Write bytes to `path` atomically: a uniquely named temporary file in the same folder, fsync'ed,
    then renamed over `path`. A run killed at any moment leaves the old file or the new one; a full disk
    is one CheckpointError line naming the file, and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on device while writing {path}") from None
        raise CheckpointError(f"cannot write {path}: {error.strerror or one_line(error)}") from None
    finally:  # whatever stopped the write (a full disk, Ctrl-C), no temporary file stays behind
        tmp.unlink(missing_ok=True)
    return len(payload)


def save_atomic(value, path):
    """torch.save(value) to `path` through write_atomic."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return write_atomic(path, buffer.getbuffer())


def write_text_atomic(path, text):
    """A text file (metrics.json, a table) through write_atomic."""
    return write_atomic(path, text.encode())


def save_checkpoint(state, path):
    """Write `state` to `path` atomically (see the module docstring). Returns the number of bytes."""
    path = Path(path)
    bad = non_finite_entries(state)
    if bad:
        diverged = f"step {state['step']}: the weights diverged; " if "step" in state else ""
        raise FloatingPointError(f"{diverged}not writing {path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})")
    return save_atomic(state, path)


def load_checkpoint(path):
    """The checkpoint at `path` as a dict, checked entry by entry (CheckpointError, one line)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (train first, or point --checkpoint at one)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    damaged = damaged_entry(path)
    if damaged:
        raise CheckpointError(f"{path}: damaged: {damaged} (the file changed after it was written; "
                              f"use another copy or train again)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, not a torch file, or a pickle of arbitrary objects
        raise CheckpointError(f"{path}: cannot be read as an il2vseg checkpoint ({one_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an il2vseg checkpoint (it holds a {type(state).__name__})")
    for key, kind in REQUIRED.items():
        if key not in state:
            raise CheckpointError(f"{path}: not a complete il2vseg checkpoint (no '{key}' entry)")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: entry '{key}' is a {type(state[key]).__name__}, "
                                  f"expected a {kind.__name__}")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: entry 'step' is {state['step']}, expected a step >= 0")
    if not state["config"]:
        raise CheckpointError(f"{path}: entry 'config' is empty: the settings it was trained with are unknown")
    for key in ("local_centres", "global_centres"):
        if key not in state["model"]:
            raise CheckpointError(f"{path}: not a complete il2vseg checkpoint (no model entry '{key}')")
    if state["model"]["global_centres"].shape[0] != state["n_clusters"] or state["n_clusters"] < 1:
        raise CheckpointError(f"{path}: n_clusters {state['n_clusters']} does not match its centres "
                              f"{tuple(state['model']['global_centres'].shape)}")
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); "
                              f"the run that wrote it diverged")
    return state


def damaged_entry(path):
    """Why the zip at `path` is damaged ("entry NAME fails its CRC-32 check", ...), or None when every
    entry's CRC-32 matches (or the file is not a zip: torch.load then says what it is)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every entry and compares its CRC-32
    except Exception as error:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, OSError of a damaged file
        return f"not a readable zip ({one_line(error)})"
    return f"entry {bad} fails its CRC-32 check" if bad else None


def restore(module, state, path):
    """module.load_state_dict(state) with a one-line error for a checkpoint of another configuration."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = lines[-1][:200] if lines else type(error).__name__
        raise CheckpointError(f"{path} does not fit this {type(module).__name__} (another --data, --n-classes, "
                              f"--dim or --arch?): {detail}") from None


def check_resume(state, cfg, path, keys, log=print):
    """A resumed run must share `keys` (settings that decide data, order, shapes, losses) with the run
    that wrote the checkpoint; the first difference is one line. Keys the checkpoint does not record
    (written before the setting existed) are named in one note."""
    trained = state["config"]
    for key in keys:
        if key in trained and trained[key] != getattr(cfg, key, None):
            if key == "train_files":  # not a flag: the files of the training split (data.files_fingerprint)
                raise CheckpointError(f"{path} was trained on {trained[key]} of --train-split {cfg.train_split}, "
                                      f"this run finds {cfg.train_files} (files added, removed or renamed in "
                                      f"--data-root): resume needs the same files; train anew into another --out")
            raise CheckpointError(f"{path} was trained with --{key.replace('_', '-')} {trained[key]}, this run "
                                  f"asks for {getattr(cfg, key, None)}: resume with the same setting")
    unknown = [key for key in keys if key not in trained]
    if unknown:
        log(f"note: {path} does not record {', '.join(unknown)} (written before they were saved): "
            f"this run assumes they match")


# settings a resumed run must share with its checkpoint (data, order, shapes, losses)
RESUME_MUST_MATCH = ("data", "data_root", "train_split", "arch", "weights", "dim", "dropout", "batch_size", "crop",
                     "seed", "five_crop", "train_crop", "resize", "alpha", "beta", "gamma", "use_smo", "use_fs", "use_reg", "use_corr",
                     "lr_head", "lr_centres", "ema", "fcm_m", "fcm_sigma", "fcm_iters", "affinity", "radius",
                     "fusion_in", "align", "smooth_temperature", "knn", "use_aug", "shifts", "fs_reading",
                     "train_files")


def training_state(model, optimiser, step, generator, cfg):
    """What a checkpoint holds: the step, the model, Adam, every random state and the run's settings."""
    return {"step": step, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
            "rng": rng_state(generator), "n_clusters": model.local_centres.shape[0],
            "config": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))},
            "shifts": {"close": cfg.shift_close, "far": cfg.shift_far, "corr": dict(cfg.corr_shifts),
                       "corr_weights": dict(cfg.corr_weights)}}


def fresh_start(cfg):
    """A new run: the global RNG (dropout) from --seed; training starts at step 0."""
    torch.manual_seed(cfg.seed)
    return 0


def resumed_path(cfg):
    """The checkpoint --resume continues: --resume PATH, or OUT/checkpoint.pt (None without --resume)."""
    if not cfg.resume:
        return None
    return Path(cfg.resume) if isinstance(cfg.resume, str) else Path(cfg.out) / "checkpoint.pt"


def resume(cfg, model, optimiser, generator, log=print):
    """--resume: model, Adam, every random state and the loss shifts the run settled on (pairs.settle_shifts)
    from OUT/checkpoint.pt (or --resume PATH), after checking that the run's settings match; returns the
    step to continue from."""
    path = resumed_path(cfg)
    state = load_checkpoint(path)
    check_resume(state, cfg, path, RESUME_MUST_MATCH, log)
    restore(model, state["model"], path)
    restore(optimiser, state["optimiser"], path)
    use_own_implementation(optimiser)
    set_rng_state(state["rng"], generator, log)
    if "shifts" in state:  # checkpoints written before the shifts were settled per run keep the table's
        shifts = state["shifts"]
        cfg.shift_close, cfg.shift_far, cfg.corr_shifts, cfg.corr_weights = (
            shifts["close"], shifts["far"], dict(shifts["corr"]), dict(shifts["corr_weights"]))
    log(f"resumed from {path} at step {state['step']}")
    if state["step"] >= cfg.steps:
        log(f"nothing to train: the checkpoint is at step {state['step']} >= --steps {cfg.steps}")
    return state["step"]


# --------------------------------------------------------------------------------------------
# Random state and the optimiser of a resumed run
# --------------------------------------------------------------------------------------------

def rng_state(generator):
    """Everything random in training: the global torch RNG (dropout) and the step generator
    (augmentation, sampled points, negatives). The data order and crops are seeded per step and per
    item (il2vseg.batches_for_steps, data.py), so they need no saving."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "generator_device": generator.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator, log=print):
    try:
        torch.set_rng_state(state["torch"])
        if state.get("generator_device", "cpu") == generator.device.type:
            generator.set_state(state["generator"])
        else:  # CPU and CUDA generators have different states: the run goes on, not bit-identically
            log(f"note: the checkpoint was trained on {state.get('generator_device')}, this run is on "
                f"{generator.device.type}: its random stream restarts from --seed (not bit-identical)")
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"the checkpoint's random state is broken ({one_line(error)})") from None


def use_own_implementation(optimiser):
    """After load_state_dict: keep this run's Adam implementation (fused on CUDA, the default on the
    CPU). load_state_dict takes the flags of the run that wrote the checkpoint (maybe on another
    device); `step` counters go where this implementation keeps them."""
    for group in optimiser.param_groups:
        group["fused"] = optimiser.defaults.get("fused")
        group["foreach"] = optimiser.defaults.get("foreach")
        for param in group["params"]:
            state = optimiser.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device if group["fused"] else "cpu",
                                                  dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------

def check_output_folder(folder, need_bytes=16 * 2**20):
    """Create `folder` if needed and make sure a file can be written there and `need_bytes` fit."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".il2vseg-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"--out {folder}: cannot write there ({error.strerror or one_line(error)})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise CheckpointError(f"--out {folder}: only {free / 2**20:.1f} MiB free on its device, a checkpoint "
                              f"needs about {need_bytes / 2**20:.1f} MiB")


STALE = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp$")  # write_atomic's temporary names: NAME.PID.HEX.tmp


def remove_stale_temporaries(folder, log=print):
    """Remove the temporary files (write_atomic's NAME.PID.HEX.tmp) that a save killed by kill -9 left in
    `folder` and its subfolders. Call it holding the folder's OutputLock: no other run writes there."""
    stale = [path for path in Path(folder).rglob("*.tmp") if STALE.search(path.name) and path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"note: removed {len(stale)} temporary file(s) an interrupted save left in {folder} "
            f"(e.g. {stale[0].name})")
    return stale


def first_free(folder, names):
    """The smallest n >= 2 such that no NAME-n (stem-n.suffix) of `names` exists in `folder`."""
    n = 2
    while any((Path(folder) / f"{Path(name).stem}-{n}{Path(name).suffix}").exists() for name in names):
        n += 1
    return n


class OutputLock:
    """`with OutputLock(folder):` holds an exclusive lock on folder/.il2vseg.lock, or raises
    CheckpointError at once when another run holds it. The OS drops the lock when the process ends,
    however it ends, so a killed run never leaves a stale lock behind."""

    def __init__(self, folder):
        self.path = Path(folder) / ".il2vseg.lock"
        self.handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            if fcntl is not None:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                msvcrt.locking(self.handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise CheckpointError(f"--out {self.path.parent} is in use by another il2vseg run (pid {holder}); "
                                  f"wait for it to finish or choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        self.handle.close()  # closing the file releases the lock
        return False
