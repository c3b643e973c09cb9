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
    assert il2vseg.main(["--predict", str(photos), "--out", str(out)] + TINY) == 0
    masks = sorted(p.name for p in (out / "predictions").glob("*_mask.png"))
    assert len(masks) == 2 and len(set(masks)) == 2
    assert "wrote 6 files for 2 images" in capsys.readouterr().out  # ids, mask, overlay each


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

def test_kill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    command = [sys.executable, str(REPO / "il2vseg.py"), "--train", "--steps", "8", "--save-every", "1",
               "--eval-images", "1", "--probe", "centres"] + TINY
    whole = tmp_path / "whole"
    subprocess.run(command + ["--out", str(whole)], check=True, capture_output=True, timeout=300)
    broken = tmp_path / "broken"
    rng = random.Random(0)
    for attempt in range(3):
        extra = ["--resume"] if (broken / "checkpoint.pt").exists() else []
        process = subprocess.Popen(command + ["--out", str(broken)] + extra, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.5, 4.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    extra = ["--resume"] if (broken / "checkpoint.pt").exists() else []
    subprocess.run(command + ["--out", str(broken)] + extra, check=True, capture_output=True, timeout=300)
    a = checkpoints.load_checkpoint(whole / "checkpoint.pt")
    b = checkpoints.load_checkpoint(broken / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
