"""Nothing lost, nothing silently wrong: the command line under hostile but realistic use.

Each test is one class of failure: data loss (an existing checkpoint, two runs in one folder, colliding
prediction names), poisoned checkpoints (NaN weights), tracebacks where one line is promised, and late
errors (a bad file found after training). Every failure must be one line on stderr, exit code 1, and
leave what was there before untouched.
"""
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import checkpoints
import cli
import il2vseg

REPO = Path(__file__).resolve().parents[1]
TINY = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--probe-images", "4",
        "--eval-images", "4", "--save-images", "0", "--no-crf", "--fcm-iters", "3", "--dim", "8",
        "--knn", "0", "--shifts", "published"]  # no calibration, no neighbours: seconds, not minutes


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0], captured.out


def trained_folder(tmp_path, steps=1):
    out = tmp_path / "run"
    assert il2vseg.main(["--train", "--steps", str(steps), "--out", str(out)] + TINY) == 0
    return out


# -------------------------------------------------------------------------------- data loss

def test_train_refuses_a_folder_that_holds_a_checkpoint(tmp_path, capsys):
    out = trained_folder(tmp_path)
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    assert il2vseg.main(["--train", "--steps", "1", "--dim", "16", "--out", str(out)] + TINY[:-6] + TINY[-4:]) == 1
    line, printed = one_error_line(capsys)
    assert "already holds checkpoint.pt" in line and "--resume" in line and "--overwrite" in line
    assert "RANDOMLY INITIALISED" not in printed  # refused before the weights load
    assert (out / "checkpoint.pt").read_bytes() == before
    assert il2vseg.main(["--train", "--steps", "1", "--overwrite", "--out", str(out)] + TINY) == 0
    assert (out / "checkpoint.pt").read_bytes() != before


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with checkpoints.OutputLock(out):  # another run holds the folder
        assert il2vseg.main(["--train", "--steps", "1", "--out", str(out)] + TINY) == 1
        line, _ = one_error_line(capsys)
        assert f"pid {os.getpid()}" in line and "in use by another il2vseg run" in line
    assert not (out / "checkpoint.pt").exists()
    assert il2vseg.main(["--train", "--steps", "1", "--out", str(out)] + TINY) == 0  # released: free again


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    script = f"import checkpoints, time\nwith checkpoints.OutputLock({str(tmp_path)!r}):\n    print('locked', flush=True)\n" \
             f"    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(checkpoints.CheckpointError, match="in use"):
        checkpoints.OutputLock(tmp_path).__enter__()
    holder.kill()
    holder.wait()
    with checkpoints.OutputLock(tmp_path):
        pass


def test_concurrent_saves_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    errors = []

    def save(value):
        try:
            for _ in range(10):
                checkpoints.save_checkpoint({"value": torch.full((1000,), float(value))}, path)
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            errors.append(error)

    threads = [threading.Thread(target=save, args=(v,)) for v in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    value = torch.load(path, weights_only=True)["value"]
    assert value.unique().numel() == 1  # one whole checkpoint, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_predictions_of_files_with_the_same_stem_do_not_collide(tmp_path, capsys):
    out = trained_folder(tmp_path)
    capsys.readouterr()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(photos / "photo.png")
    Image.new("RGB", (48, 40), (30, 30, 200)).save(photos / "photo.jpg")
    Image.new("RGB", (48, 40), (30, 200, 30)).save(photos / "photo.v1.png")  # dots inside a name stay
    Image.new("RGB", (48, 40), (90, 90, 90)).save(photos / "photo.v2.png")
    assert il2vseg.main(["--predict", str(photos), "--out", str(out)] + TINY) == 0
    masks = sorted(p.name for p in (out / "predictions").glob("*_mask.png"))
    assert len(masks) == 4 and "photo.v1_mask.png" in masks and "photo.v2_mask.png" in masks
    assert len(list((out / "predictions").glob("*.png"))) == 12  # ids, mask, overlay each
    assert "wrote 12 files for 4 images" in capsys.readouterr().out


# -------------------------------------------------------------------------------- poisoned numbers

def test_non_finite_weights_are_never_written(tmp_path):
    state = {"model": {"w": torch.tensor([1.0, float("nan")])}, "optimiser": {}}
    with pytest.raises(FloatingPointError, match="not writing .*checkpoint.pt: 1 tensors hold NaN or inf"):
        checkpoints.save_checkpoint(state, tmp_path / "checkpoint.pt")
    assert not any(tmp_path.iterdir())


def test_a_diverging_run_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = trained_folder(tmp_path, steps=2)
    good = (out / "checkpoint.pt").read_bytes()
    real_step = torch.optim.Adam.step

    def poisoning_step(self, *args, **kwargs):  # an optimiser step that blows the head up
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    assert il2vseg.main(["--train", "--resume", "--steps", "4", "--save-every", "1", "--out", str(out)] + TINY) == 1
    line, _ = one_error_line(capsys)
    assert "step 3" in line and "NaN or inf" in line and "the checkpoint of step 2" in line and "is intact" in line
    assert (out / "checkpoint.pt").read_bytes() == good  # the NaN weights were not written
    assert checkpoints.load_checkpoint(out / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize("align", ["soft", "hard"])
def test_a_nan_head_is_named_as_the_first_loss_term_it_poisons(tmp_path, monkeypatch, align):
    import losses
    monkeypatch.setattr(losses, "data_loss", lambda inner_local, inner_global, *a, **k: inner_local.sum() * 0)
    out = tmp_path / "run"
    cfg = cli.resolve_defaults(cli.parse_args(["--out", str(out), "--align", align] + TINY + ["--knn", "2"]),
                               torch.device("cpu"))
    backbone = backbones.VisionTransformer(patch=8, dim=32, depth=1, heads=2, pretrain_size=32).eval()
    model = il2vseg.build_model(cfg, backbone, 3, "cpu")
    with torch.no_grad():
        model.head.linear.weight[0, 0] = float("nan")
    import data
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, length=4)
    with pytest.raises(FloatingPointError) as info:
        il2vseg.train(backbone, model, dataset, cfg, torch.device("cpu"), log=lambda *a: None)
    assert str(info.value).startswith("step 1: loss term smo is nan")  # the Hungarian matching did not stop it


# -------------------------------------------------------------------------------- one line, never a traceback

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00."])
def test_empty_truncated_or_foreign_checkpoint_is_one_line(tmp_path, capsys, content):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    assert il2vseg.main(["--eval", "--checkpoint", str(tmp_path / "checkpoint.pt")] + TINY) == 1
    line, _ = one_error_line(capsys)
    assert "checkpoint.pt" in line


@pytest.mark.parametrize("missing", ["n_clusters", "optimiser", "rng", "model"])
def test_a_checkpoint_missing_an_entry_names_it(tmp_path, capsys, missing):
    out = trained_folder(tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state[missing]
    torch.save(state, out / "checkpoint.pt")
    assert il2vseg.main(["--train", "--resume", "--steps", "2", "--out", str(out)] + TINY) == 1
    line, _ = one_error_line(capsys)
    assert f"no '{missing}' entry" in line


def test_empty_weight_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY[2:] + ["--weights", str(tmp_path / "empty.pth")]) == 1
    line, _ = one_error_line(capsys)
    assert "empty.pth" in line


def test_a_worker_error_is_unwrapped_to_its_own_line():
    import data

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise data.DataError("/data/x.png: corrupt, truncated or unreadable image (OSError: broken data stream)")

    loader = torch.utils.data.DataLoader(Broken(), batch_size=1, num_workers=1)
    with pytest.raises(data.DataError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # what torch gives
    line = checkpoints.one_line(info.value, named=False)
    assert line == "/data/x.png: corrupt, truncated or unreadable image (OSError: broken data stream)"


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, path, mode):
            self.handle = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, payload):
            self.handle.write(bytes(payload)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "open", FullDisk, raising=False)
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.save_checkpoint({"model": {}, "optimiser": {}}, tmp_path / "checkpoint.pt")
    assert str(info.value) == f"no space left on device while writing {tmp_path / 'checkpoint.pt'}"
    assert not any(tmp_path.iterdir())


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def huge(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA error: tried to allocate 372.53 GiB")  # the class, not the words

    monkeypatch.setattr(backbones, "load_backbone", huge)
    assert il2vseg.main(["--train", "--out", str(tmp_path)] + TINY) == 1
    line, _ = one_error_line(capsys)
    assert line.startswith("error: out of memory") and "--batch-size" in line


# -------------------------------------------------------------------------------- early, not late

def folder_data(root, n=4, size=40, labels=True):
    for split in ("train", "val"):
        (root / "imgs" / split).mkdir(parents=True)
        if labels:
            (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size, size), (60 * i, 100, 200 - 40 * i)).save(root / "imgs" / split / f"{i}.png")
            if labels:
                Image.fromarray(np.full((size, size), i % 2, np.uint8)).save(root / "labels" / split / f"{i}.png")
    return ["--data", "folder", "--data-root", str(root), "--n-classes", "2"]


def test_a_bad_val_label_is_found_before_the_weights_load_and_before_training(tmp_path, capsys):
    argv = folder_data(tmp_path / "d")
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "d" / "labels" / "val" / "2.png")
    (tmp_path / "d" / "imgs" / "train" / "3.png").write_bytes(b"")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY + argv) == 1
    line, printed = one_error_line(capsys)
    assert "RANDOMLY INITIALISED" not in printed and "step" not in printed
    assert "imgs/train/3.png" in line and "labels/val/2.png" in line  # every split's bad files at once


def test_a_read_only_or_impossible_out_is_found_first(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "file" / "run")] + TINY) == 1
    line, printed = one_error_line(capsys)
    assert "cannot write there" in line and "RANDOMLY INITIALISED" not in printed


def test_ablation_on_an_unlabelled_val_split_fails_before_training(tmp_path, capsys):
    argv = folder_data(tmp_path / "d", labels=False)
    assert il2vseg.main(["--ablation", "alpha", "--out", str(tmp_path / "run")] + TINY + argv) == 1
    line, printed = one_error_line(capsys)
    assert "--ablation needs labels" in line and "training on" not in printed


def test_ablation_refuses_a_folder_that_holds_earlier_ablation_runs(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "ablation_alpha_0.5").mkdir(parents=True)
    (out / "ablation_alpha_0.5" / "checkpoint.pt").write_bytes(b"earlier work")
    assert il2vseg.main(["--ablation", "alpha", "--out", str(out)] + TINY) == 1
    line, printed = one_error_line(capsys)
    assert "already holds runs of --ablation alpha (ablation_alpha_0.5)" in line and "--overwrite" in line
    assert "RANDOMLY INITIALISED" not in printed  # refused before the weights load
    assert (out / "ablation_alpha_0.5" / "checkpoint.pt").read_bytes() == b"earlier work"


def test_eval_refuses_random_weights_for_a_trained_backbone_and_the_reverse(tmp_path, capsys):
    out = trained_folder(tmp_path)  # trained on --weights random
    capsys.readouterr()
    other = [a for a in TINY if a not in ("--weights", "random")] + ["--weights", str(tmp_path / "dino.pth")]
    assert il2vseg.main(["--eval", "--out", str(out)] + other) == 1
    line, _ = one_error_line(capsys)
    assert "was trained on --weights random" in line and "pass --weights random or omit --weights" in line


def test_ctrl_c_before_the_first_save_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(il2vseg, "loss_terms", interrupted)
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY) == 130
    assert capsys.readouterr().err.strip() == "interrupted; no checkpoint was written by this run"


def test_resuming_from_another_data_root_is_refused(tmp_path, capsys):
    argv = folder_data(tmp_path / "d")
    out = tmp_path / "run"
    assert il2vseg.main(["--train", "--steps", "1", "--out", str(out)] + TINY + argv) == 0
    (tmp_path / "d").rename(tmp_path / "moved")
    argv[3] = str(tmp_path / "moved")
    assert il2vseg.main(["--train", "--resume", "--steps", "2", "--out", str(out)] + TINY + argv) == 1
    line, _ = one_error_line(capsys)
    assert "--data-root" in line and "moved" in line


def test_predict_refuses_extreme_aspect_ratios_up_front(tmp_path, capsys):
    out = trained_folder(tmp_path)
    capsys.readouterr()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (4000, 60), (10, 20, 30)).save(photos / "panorama.png")
    assert il2vseg.main(["--predict", str(photos), "--out", str(out)] + TINY) == 1
    line, printed = one_error_line(capsys)
    assert "panorama.png" in line and "RANDOMLY INITIALISED" not in printed


# -------------------------------------------------------------------------------- kill -9 at random moments

def saved_step(folder):
    """The step of folder/checkpoint.pt (0: none yet); the file is replaced whole, never seen half-written."""
    try:
        return checkpoints.load_checkpoint(folder / "checkpoint.pt")["step"]
    except checkpoints.CheckpointError:
        return 0


def test_kill_at_random_moments_then_resume_is_bit_identical(tmp_path, capsys):
    """kill -9 inside the training loop of a fresh run, then inside that of the resumed run (both real
    commands), then --resume to the end: the checkpoint equals an uninterrupted run's, bit for bit.

    The run saves every step. Each kill comes after the save of a drawn step, a drawn part of one step's
    time later (as this machine runs it, on the CPU), so it lands in the next step or in the middle of its
    save, on a quiet machine as on a loaded or a fast one. The draws come from a seeded RNG: the same
    schedule every time, the moments in wall time vary with the machine. (CUDA: test_train.py.)"""
    flags = ["--train", "--steps", "8", "--save-every", "1", "--probe", "centres", "--device", "cpu"] + TINY
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert il2vseg.main(flags + ["--out", str(whole)]) == 0  # the uninterrupted run, in this process
    capsys.readouterr()
    command = [sys.executable, str(REPO / "il2vseg.py")] + flags + ["--out", str(broken)]
    rng, saved, killed_after = random.Random(0), 0, []
    for attempt in range(2):  # a fresh run killed, then a resumed one
        target = min(rng.randint(saved + 1, saved + 3), 6)
        process = subprocess.Popen(command + (["--resume"] if saved else []), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        seen, step, step_seen_at, deadline = None, 0, {}, time.time() + 600
        while process.poll() is None and time.time() < deadline:
            stat = os.stat(broken / "checkpoint.pt") if (broken / "checkpoint.pt").exists() else None
            if stat and (stat.st_ino, stat.st_mtime_ns) != seen:
                seen, step = (stat.st_ino, stat.st_mtime_ns), saved_step(broken)
                step_seen_at[step] = time.time()
                if step >= target:
                    break
            time.sleep(0.005)
        one_step = step_seen_at[step] - step_seen_at[step - 1] if step - 1 in step_seen_at else 0.1
        time.sleep(rng.uniform(0.0, 0.8) * one_step)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, f"attempt {attempt} ended before the kill"  # alive until then
        saved = saved_step(broken)
        killed_after.append(saved)
        assert target <= saved < 8, (attempt, target, killed_after)  # killed inside the loop, after the save
    assert il2vseg.main(flags + ["--out", str(broken), "--resume"]) == 0  # the last run, to the end, in this process
    assert f"at step {killed_after[-1]}" in capsys.readouterr().out
    a = checkpoints.load_checkpoint(whole / "checkpoint.pt")
    b = checkpoints.load_checkpoint(broken / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


# -------------------------------------------------------------------------------- one rule for every file written

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run, copied by the tests that need one (training is the slow part)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert il2vseg.main(["--train", "--steps", "1", "--out", str(out)] + TINY) == 0
    return out


def copy_of(trained, folder):
    import shutil
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns(".il2vseg.lock"))
    return folder


def test_resume_into_a_folder_that_holds_another_runs_checkpoint_is_refused(trained, tmp_path, capsys):
    a, b = copy_of(trained, tmp_path / "A"), copy_of(trained, tmp_path / "B")
    before = {name: (b / name).read_bytes() for name in ("checkpoint.pt", "metrics.json")}
    capsys.readouterr()
    assert il2vseg.main(["--train", "--resume", str(a / "checkpoint.pt"), "--steps", "2", "--out", str(b)] + TINY) == 1
    line, printed = one_error_line(capsys)
    assert f"--out {b} holds another run's checkpoint.pt" in line and str(a / "checkpoint.pt") in line
    assert "RANDOMLY INITIALISED" not in printed
    assert all((b / name).read_bytes() == content for name, content in before.items())


def test_metrics_json_is_written_atomically_and_a_full_disk_names_it(tmp_path, monkeypatch):
    import results
    (tmp_path / "metrics.json").write_text('{"old": 1}')

    def full_disk(path, mode):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "open", full_disk, raising=False)
    with pytest.raises(checkpoints.CheckpointError) as info:
        results.write_metrics(tmp_path, {"probes": {}}, {})
    assert str(info.value) == f"no space left on device while writing {tmp_path / 'metrics.json'}"
    assert (tmp_path / "metrics.json").read_text() == '{"old": 1}'  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_full_standard_output_is_not_mistaken_for_a_full_out(tmp_path, capsys, monkeypatch):
    class FullConsole:
        def write(self, text=""):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.write()

    cfg = cli.parse_args(["--train", "--out", str(tmp_path)])
    monkeypatch.setattr(sys, "stdout", FullConsole())
    assert cli.report(OSError(errno.ENOSPC, "No space left on device"), cfg, {}) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: cannot write to standard output (No space left on device)"), line


def test_a_stale_temporary_file_of_a_killed_save_is_removed_by_the_next_run(tmp_path):
    stale = tmp_path / "checkpoint.pt.4242.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("the user's")  # not one of ours
    cfg = cli.parse_args(["--eval", "--out", str(tmp_path)])
    said = []
    with cli.output_folder(cfg, log=said.append):
        pass
    assert not stale.exists() and (tmp_path / "notes.tmp").exists()
    assert "removed 1 temporary file" in said[0]


def test_a_second_prediction_and_an_evaluation_never_replace_earlier_files(trained, tmp_path, capsys, monkeypatch):
    out = copy_of(trained, tmp_path / "run")
    photo = tmp_path / "photo.png"  # a file, not a folder: that one image
    Image.new("RGB", (48, 40), (200, 30, 30)).save(photo)
    assert il2vseg.main(["--predict", str(photo), "--out", str(out)] + TINY) == 0
    first = (out / "predictions" / "photo_mask.png").read_bytes()
    assert il2vseg.main(["--predict", str(photo), "--out", str(out)] + TINY) == 0
    assert f"these go to {out / 'predictions-2'}" in capsys.readouterr().out
    assert (out / "predictions" / "photo_mask.png").read_bytes() == first
    assert (out / "predictions-2" / "photo_mask.png").is_file()
    # --eval of the run's checkpoint: its training metrics.json stays, the evaluation goes to eval-2
    metrics = (out / "metrics.json").read_bytes()
    seen = []
    monkeypatch.setattr(il2vseg, "run_evaluation", lambda backbone, model, cfg, *a, **k: seen.append(cfg.eval_out))
    assert il2vseg.main(["--eval", "--checkpoint", str(out / "checkpoint.pt")] + TINY) == 0
    assert seen == [str(out / "eval-2")] and "this evaluation writes to" in capsys.readouterr().out
    assert il2vseg.main(["--eval", "--overwrite", "--checkpoint", str(out / "checkpoint.pt")] + TINY) == 0
    assert seen[1] == str(out) and (out / "metrics.json").read_bytes() == metrics


# -------------------------------------------------------------------------------- every checkpoint read is checked

def damage(path):
    """Zero 256 bytes inside the largest tensor of a checkpoint (its zip stays readable)."""
    import zipfile
    payload = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
        content = archive.read(entry)
    start = payload.find(content) + len(content) // 2
    payload[start:start + 256] = bytes(256)
    path.write_bytes(bytes(payload))
    return entry.filename


def test_a_damaged_checkpoint_is_refused_by_its_crc_on_eval_and_on_resume(trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path / "run")
    entry = damage(out / "checkpoint.pt")
    capsys.readouterr()
    for argv in (["--eval", "--checkpoint", str(out / "checkpoint.pt")], ["--train", "--resume", "--steps", "2",
                                                                          "--out", str(out)]):
        assert il2vseg.main(argv + TINY) == 1
        line, _ = one_error_line(capsys)
        assert f"{out / 'checkpoint.pt'}: damaged: entry {entry} fails its CRC-32 check" in line
        assert "intact" not in line


def test_a_damaged_checkpoint_is_never_called_intact(trained, tmp_path, capsys):
    out = copy_of(trained, tmp_path / "run")
    damage(out / "checkpoint.pt")
    cfg = cli.parse_args(["--train", "--out", str(out)])
    assert cli.report(FloatingPointError("step 3: loss term smo is nan"), cfg, {"saved": 1}) == 1
    line = capsys.readouterr().err
    assert "is damaged (entry" in line and "intact" not in line


@pytest.mark.parametrize("change, fragment", [({"step": -3}, "entry 'step' is -3, expected a step >= 0"),
                                              ({"config": {}}, "entry 'config' is empty")])
def test_a_crafted_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys, change, fragment):
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    state.update(change)
    torch.save(state, tmp_path / "crafted.pt")
    for argv in (["--eval", "--checkpoint", str(tmp_path / "crafted.pt")],
                 ["--train", "--resume", str(tmp_path / "crafted.pt"), "--out", str(tmp_path / "new")]):
        assert il2vseg.main(argv + TINY) == 1
        line, _ = one_error_line(capsys)
        assert f"{tmp_path / 'crafted.pt'}: {fragment}" in line


def test_resume_after_files_were_added_is_refused(tmp_path):
    import data
    argv = folder_data(tmp_path / "d")
    cfg = cli.parse_args(["--train", "--resume"] + argv)
    dataset = data.build_dataset("folder", str(tmp_path / "d"), "train", n_classes=2, crop_size=32)
    state = {"config": {"train_files": data.files_fingerprint(dataset), "seed": 0}}
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "imgs" / "train" / "9.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "d" / "labels" / "train" / "9.png")
    cfg.train_files = data.files_fingerprint(data.build_dataset("folder", str(tmp_path / "d"), "train", n_classes=2,
                                                                crop_size=32))
    with pytest.raises(checkpoints.CheckpointError, match=r"was trained on 4 files .* this run finds 5 files"):
        checkpoints.check_resume(state, cfg, "ck.pt", checkpoints.RESUME_MUST_MATCH, log=lambda *a: None)
    notes = []
    cfg.train_files = state["config"]["train_files"]
    checkpoints.check_resume(state, cfg, "ck.pt", ("seed", "dim", "train_files"), log=notes.append)
    assert notes == ["note: ck.pt does not record dim (written before they were saved): this run assumes they match"]


# -------------------------------------------------------------------------------- images as they are displayed

def portrait_photo(path, size=(64, 48)):
    """A landscape-stored image with EXIF orientation 6 (displayed turned by 90 degrees: portrait)."""
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))  # left half red as stored: the top when displayed
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_by_every_reader(tmp_path, suffix):
    import data
    from PIL import ImageOps
    path = portrait_photo(tmp_path / f"phone{suffix}")
    displayed = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    array, _ = data.read_rgb(path)
    assert array.shape == displayed.shape == (64, 48, 3) and np.array_equal(array, displayed)
    assert data.probe_image(path) == (64, 48)
    item = data.PredictFolder(path, short_side=48, stride=8)[0]
    assert item["image"].shape == (3, 64, 48)  # the mask comes back portrait


def test_a_label_drawn_on_the_displayed_photo_fits(tmp_path):
    import data
    argv = folder_data(tmp_path / "d", n=2, size=48)
    for i in range(2):
        portrait_photo(tmp_path / "d" / "imgs" / "train" / f"{i}.png")
        Image.fromarray(np.full((64, 48), i, np.uint8)).save(tmp_path / "d" / "labels" / "train" / f"{i}.png")
    dataset = data.build_dataset("folder", argv[3], "train", mode="eval", n_classes=2, crop_size=48)
    assert data.check_files(dataset) == 2
    assert dataset.load(dataset.samples[0])[0].shape == (3, 64, 48)


# -------------------------------------------------------------------------------- file names as users make them

def test_upper_case_suffixes_pair_with_their_labels(tmp_path):
    import data
    for split in ("train", "trainannot"):
        (tmp_path / split).mkdir()
    Image.new("RGB", (48, 48), (9, 9, 9)).save(tmp_path / "train" / "x.PNG")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "trainannot" / "x.PNG")
    dataset = data.build_dataset("camvid", str(tmp_path), "train", mode="eval", crop_size=48)
    assert [s["label"].name for s in dataset.samples] == ["x.PNG"] and data.check_files(dataset) == 1


def test_a_dangling_symlink_is_named_not_dropped(tmp_path, capsys):
    argv = folder_data(tmp_path / "d")
    for folder in ("imgs", "labels"):
        (tmp_path / "d" / folder / "val" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY + argv) == 1
    line, _ = one_error_line(capsys)
    assert "imgs/val/gone.png: dangling symbolic link" in line


def test_two_images_with_one_stem_in_a_split_are_refused(tmp_path, capsys):
    argv = folder_data(tmp_path / "d")
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "imgs" / "val" / "1.jpg")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY + argv) == 1
    line, _ = one_error_line(capsys)
    assert "share the name 1" in line and "1.jpg" in line


def test_each_bad_file_is_reported_once(tmp_path, capsys):
    argv = folder_data(tmp_path / "d")
    (tmp_path / "d" / "imgs" / "train" / "3.png").write_bytes(b"")
    assert il2vseg.main(["--train", "--out", str(tmp_path / "run")] + TINY + argv) == 1
    line, _ = one_error_line(capsys)
    assert line.count("imgs/train/3.png") == 1 and "1 files cannot be used" in line


# -------------------------------------------------------------------------------- conflicting flags, edges

@pytest.mark.parametrize("argv, fragment", [
    (["--train", "--eval", "--checkpoint", "X.pt"], "--checkpoint X.pt is for --eval / --predict without --train"),
    (["--resume", "--checkpoint", "X.pt"], "--checkpoint X.pt is for --eval / --predict without --train"),
    (["--eval", "--checkpoint", "A.pt", "--checkpoint", "B.pt"], "--checkpoint is given 2 times"),
    (["--train", "--out", "a", "--ou", "b"], "--out is given 2 times"),
    (["--calibrate", "--train"], "--calibrate measures the loss shifts and stops"),
    (["--ablation", "loss", "--checkpoint", "X.pt"], "--ablation trains and evaluates every setting itself"),
    (["--train", "--out", ""], "--out is empty"), (["--train", "--weights", ""], "--weights is empty"),
    (["--eval", "--data-root", ""], "--data-root is empty"), (["--predict", ""], "--predict is empty"),
    (["--train", "--fcm-sigma", "1e-300"], "--fcm-sigma 1e-300 is not a float32 number"),
    (["--train", "--fcm-sigma", "1e-25"], "--fcm-sigma 1e-25 is too small: eq (10)"),
    (["--train", "--smooth-temperature", "1e-300"], "--smooth-temperature 1e-300 is not a float32 number"),
    (["--train", "--eval-crop", "8"], "--eval-crop 8 gives a 1x1 grid of codes"),
    (["--train", "--steps", "1000000000"], "--steps must lie in [1, 100000000]"),
    (["--train", "--data", "camvid"], "--data camvid needs --data-root FOLDER")])
def test_conflicting_flags_and_edges_are_one_line_before_any_work(argv, fragment, capsys):
    assert il2vseg.main(argv + ["--weights", "random"] if "--weights" not in argv else argv) == 1
    line, printed = one_error_line(capsys)
    assert fragment in line and "RANDOMLY INITIALISED" not in printed


def test_evaluate_py_finds_its_checkpoint_among_the_flags(tmp_path, monkeypatch, capsys):
    import evaluate
    received = []
    monkeypatch.setattr(evaluate.os, "execv", lambda path, argv: received.append(argv[2:]))
    monkeypatch.chdir(tmp_path)
    Path("runs/x").mkdir(parents=True)
    Path("runs/x/checkpoint.pt").write_bytes(b"")
    evaluate.main(["--data", "camvid", "--out", "x", "runs/x/checkpoint.pt", "--no-crf"])
    assert received == [["--eval", "--checkpoint", "runs/x/checkpoint.pt", "--data", "camvid", "--out", "x", "--no-crf"]]
    assert evaluate.main(["--data", "camvid", "missing.pt"]) == 1
    assert capsys.readouterr().err.strip() == ("error: missing.pt: no such checkpoint (evaluate.py CHECKPOINT: "
                                               "train first, or give the path of one)")
    assert evaluate.main(["A.pt", "--checkpoint", "B.pt"]) == 1
    assert capsys.readouterr().err.strip() == ("error: evaluate.py got two checkpoints, CHECKPOINT A.pt and "
                                               "--checkpoint B.pt: give one")
    assert len(received) == 1


def test_a_billion_steps_start_at_once():
    batches = iter(il2vseg.Batches(10, 4, 0, 0, 10**8))
    started = time.perf_counter()
    assert len(next(batches)) == 4 and time.perf_counter() - started < 1.0


def test_sigterm_says_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    def terminated(cfg, progress):
        progress.update(saved=2, path=tmp_path / "checkpoint.pt")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    torch.save({"x": torch.zeros(3)}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(il2vseg, "run", terminated)
    assert il2vseg.main(["--train", "--out", str(tmp_path)]) == 143
    assert capsys.readouterr().err.strip() == (f"terminated (SIGTERM); the checkpoint of step 2 in "
                                               f"{tmp_path / 'checkpoint.pt'} is intact: continue with --resume")
    assert signal.getsignal(signal.SIGTERM) is not cli.terminate  # the handler is put back
