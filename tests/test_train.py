"""Training never loses work: short CPU runs, atomic checkpoints, exact resume, NaN stops, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import checkpoints
import cli
import data
import il2vseg
import losses

REPO = Path(__file__).resolve().parents[1]


def tiny_backbone():
    """A small randomly initialised ViT with the DINO structure (patch 8), fast on 2 CPU cores."""
    torch.manual_seed(123)
    return backbones.VisionTransformer(patch=8, dim=32, depth=1, heads=2, pretrain_size=32).eval().requires_grad_(False)


def config(tmp_path, **changes):
    argv = ["--weights", "random", "--out", str(tmp_path), "--crop", "32", "--batch-size", "4", "--dim", "8",
            "--steps", "6", "--save-every", "3", "--log-every", "100", "--fcm-iters", "5"]
    cfg = cli.parse_args(argv)
    cli.resolve_defaults(cfg, torch.device("cpu"))
    vars(cfg).update(changes)
    return cfg


def run(tmp_path, backbone, device="cpu", **changes):
    cfg = config(tmp_path, **changes)
    model = il2vseg.build_model(cfg, backbone, 3, device)
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, seed=0, length=8)
    history = il2vseg.train(backbone.to(device), model, dataset, cfg, torch.device(device), log=lambda *a: None)
    return model, [values["total"] for values in history]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def test_short_training_run_decreases_the_loss_and_writes_a_checkpoint(tmp_path):
    model, history = run(tmp_path, tiny_backbone(), steps=30, lr_head=2e-3, lr_centres=5e-3, save_every=100)
    assert len(history) == 30 and all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    state = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 30
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_global_centres_follow_the_local_ones_during_training(tmp_path):
    model, _ = run(tmp_path, tiny_backbone(), steps=3)
    # after training the EMA copy differs from the local centres, but is closer to them than at start
    assert not torch.equal(model.global_centres, model.local_centres.detach())


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.filterwarnings("error")           # on CUDA: the CUDA graph must not fall back to eager
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, device):
    # On CUDA (bf16 autocast, the low-level branch from a CUDA graph, fused Adam) the backward of
    # grid_sample adds with atomics in any order, so two runs agree to rounding, not bit for bit.
    same = torch.equal if device == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    backbone = tiny_backbone()
    full, full_history = run(tmp_path / "full", backbone, device, steps=6)
    run(tmp_path / "split", backbone, device, steps=3)
    resumed, resumed_history = run(tmp_path / "split", backbone, device, steps=6, resume=True)
    assert same(torch.tensor(resumed_history, dtype=torch.float64),
                torch.tensor(full_history[3:], dtype=torch.float64))
    for key, value in full.state_dict().items():
        assert same(resumed.state_dict()[key], value), key
    a = checkpoints.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = checkpoints.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for group_a, group_b in zip(a["optimiser"]["state"].values(), b["optimiser"]["state"].values()):
        assert same(group_a["exp_avg"], group_b["exp_avg"])


def test_resume_keeps_this_devices_adam_implementation(tmp_path):
    # A checkpoint written on CUDA carries fused=True in Adam's param groups; load_state_dict would
    # carry it over to a CPU run. The resumed run must use this run's Adam and stay bit-identical.
    backbone = tiny_backbone()
    full, _ = run(tmp_path / "full", backbone, steps=6)
    run(tmp_path / "split", backbone, steps=3)
    path = tmp_path / "split" / "checkpoint.pt"
    state = checkpoints.load_checkpoint(path)
    for group in state["optimiser"]["param_groups"]:
        group["fused"], group["foreach"] = True, False
    checkpoints.save_checkpoint(state, path)
    resumed, _ = run(tmp_path / "split", backbone, steps=6, resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    groups = checkpoints.load_checkpoint(path)["optimiser"]["param_groups"]
    assert all(group["fused"] is None and group["foreach"] is None for group in groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_checkpoint_resumes_on_cuda_with_fused_adam(tmp_path):
    backbone = tiny_backbone()
    run(tmp_path, backbone, "cpu", steps=3)
    model, history = run(tmp_path, backbone, "cuda", steps=5, resume=True)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    state = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(group["fused"] is True for group in state["optimiser"]["param_groups"])
    assert state["step"] == 5


def test_a_run_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    backbone = tiny_backbone()
    run(tmp_path, backbone, steps=3)
    real_fsync = checkpoints.os.fsync

    def dying_fsync(fd):  # the process dies after writing the new file, before renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, backbone, steps=6, resume=True)
    monkeypatch.setattr(checkpoints.os, "fsync", real_fsync)
    state = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file went with it


def test_nan_in_a_loss_stops_training_naming_the_term(tmp_path, monkeypatch):
    backbone = tiny_backbone()
    real = losses.feature_similarity_losses

    def broken(*args, **kwargs):
        fs, reg = real(*args, **kwargs)
        return fs * float("nan"), reg

    monkeypatch.setattr(losses, "feature_similarity_losses", broken)
    with pytest.raises(FloatingPointError) as info:
        run(tmp_path, backbone, steps=2)
    message = str(info.value)
    assert "step 1" in message and "fs" in message and "nan" in message and "\n" not in message


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint.pt: cannot be read as an il2vseg checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(checkpoints.CheckpointError, match="no such checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "none.pt")


def test_batches_depend_only_on_seed_and_step():
    whole = list(il2vseg.Batches(10, 3, seed=1, start=0, n_steps=7))
    tail = list(il2vseg.Batches(10, 3, seed=1, start=4, n_steps=7))
    assert len(il2vseg.Batches(10, 3, seed=1, start=4, n_steps=10**9)) == 10**9 - 4  # lazy: no list of batches
    assert whole[4:] == tail
    first_epoch = [i for _, _, i in sum(whole[:3], [])]
    assert len(set(first_epoch)) == 9  # no image twice within an epoch


@pytest.mark.parametrize("argv", [["--alpha", "1.5"], ["--data", "nope"], ["--data", "folder"]])
@pytest.mark.filterwarnings("error")  # a warning would be a second line on a real command's stderr
def test_bad_settings_are_one_clear_line(argv, tmp_path, capsys):
    assert il2vseg.main(["--train", "--weights", "random", "--out", str(tmp_path)] + argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_missing_dataset_folder_is_one_clear_line(tmp_path):
    """As a command, in its own process: stderr holds the one line and nothing else, the exit code is 1."""
    result = subprocess.run([sys.executable, str(REPO / "il2vseg.py"), "--train", "--weights", "random",
                             "--data", "cityscapes", "--data-root", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_train_eval_predict_resume_end_to_end(tmp_path, capsys):
    """The README's main command in miniature: train (as a command, in its own process), then resume,
    evaluate and predict (through main, in this process), each taking the weights, crops and training
    settings from the checkpoint."""
    out = tmp_path / "run"
    common = ["--out", str(out), "--eval-images", "4", "--probe-images", "8", "--save-images", "2", "--fcm-iters", "5"]
    trained = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0", "--shifts", "published"]
    result = subprocess.run([sys.executable, str(REPO / "il2vseg.py")] + common + trained + ["--train", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stdout and "mIoU" in result.stdout
    lines = result.stdout.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("mIoU"))
    assert any("random weights" in line for line in lines[table_end:])  # said again beside the table
    assert f"wrote {out / 'metrics.json'}" in result.stdout and "checkpoint: " in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for probe in ("kmeans", "centres"):
        entry = metrics["probes"][probe]
        assert 0 <= entry["before_crf"]["acc"] <= 1 and 0 <= entry["after_crf"]["miou"] <= 1
    assert metrics["settings"]["kmeans_fit"] == "train" and metrics["settings"]["n_fit_images"] == 8
    made = metrics["provenance"]
    assert "random" in metrics["warning"] and made["weights"] == "random" and made["step"] == 2
    assert made["settings"]["crop"] == 32 and made["settings"]["alpha"] == 0.5 and made["arch"] == "vits8"
    assert len(list((out / "side_by_side").glob("*.png"))) == 2
    assert json.loads((out / "side_by_side" / "provenance.json").read_text())["weights"] == "random"
    assert checkpoints.load_checkpoint(out / "checkpoint.pt")["step"] == 2

    # --resume without --weights, --crop or --batch-size: the checkpoint's
    assert il2vseg.main(common + ["--train", "--resume", "--steps", "3", "--no-crf"]) == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and checkpoints.load_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert "weights random" in printed and "batch-size 4" in printed

    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (50, 37), (200, 30, 30)).save(folder / "red.png")
    assert il2vseg.main(common + ["--eval", "--predict", str(folder)]) == 0
    assert "the command line did not give them): weights random, eval-crop 32" in capsys.readouterr().out
    assert (out / "predictions" / "red_mask.png").is_file() and (out / "predictions" / "red_overlay.png").is_file()
    ids = Image.open(out / "predictions" / "red_ids.png")
    assert ids.size == (50, 37) and ids.mode == "L"  # the input's own size, one class id per pixel
    made = json.loads((out / "predictions" / "provenance.json").read_text())
    assert made["step"] == 3 and "centres" in made["prediction"] and "with the dense CRF" in made["prediction"]
    assert json.loads((out / "metrics.json").read_text())["provenance"]["step"] == 3


def test_ablation_commands_print_their_tables(tmp_path, capsys):
    common = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0", "--shifts", "published", "--steps", "1",
              "--eval-images", "4", "--probe-images", "4", "--save-images", "0", "--no-crf", "--fcm-iters", "3"]
    # the README's two commands, into the same --out: each ablation has its own folders
    assert il2vseg.main(["--ablation", "loss", "--out", str(tmp_path)] + common) == 0
    table = (tmp_path / "ablation_loss.txt").read_text()
    assert "Table 4" in table and "(4) L_smo + L_fs + L_corr" in table
    assert sum(line.startswith("(") for line in table.splitlines()) == 4 and "weights random" in table
    assert (tmp_path / "ablation_4_L_smo_L_fs_L_corr" / "metrics.json").is_file()
    assert il2vseg.main(["--ablation", "alpha", "--out", str(tmp_path)] + common) == 0
    table = (tmp_path / "ablation_alpha.txt").read_text()
    assert "Figure 5" in table and all(f"alpha = {a}" in table for a in (0.0, 0.25, 0.5, 0.75, 1.0))
    assert "Figure 5" in capsys.readouterr().out
    row = [line for line in table.splitlines() if line.startswith("alpha = 0.5")][0]
    assert row.split()[-1] == "off" and row.count("off") == 2  # --no-crf: the after-CRF columns say so
    assert (tmp_path / "ablation_alpha_0.25").is_dir()


def test_checkpoint_of_another_configuration_is_one_clear_line(tmp_path, capsys):
    common = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0", "--shifts", "published", "--probe-images", "4",
              "--eval-images", "4", "--save-images", "0", "--no-crf", "--fcm-iters", "3", "--out", str(tmp_path)]
    assert il2vseg.main(["--train", "--steps", "1", "--dim", "16"] + common) == 0
    # evaluation takes the head's shape from the checkpoint, whatever --dim says
    assert il2vseg.main(["--eval"] + common) == 0
    # resuming into a head of another shape cannot work: one line naming the file
    cfg = config(tmp_path, resume=True, steps=2, dim=16, fcm_iters=3, knn=0, shifts="published")
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, length=64)
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint.pt does not fit this Segmenter"):
        il2vseg.train(tiny_backbone(), il2vseg.Segmenter(5, in_dim=32, dim=16), dataset, cfg,
                      torch.device("cpu"), log=lambda *a: None)
    # nor another backbone file
    cfg = config(tmp_path, resume=True, steps=2, dim=16, fcm_iters=3, weights="/data/other.pth", knn=0, shifts="published")
    with pytest.raises(checkpoints.CheckpointError, match="trained with --weights random, this run asks for /data/other.pth"):
        il2vseg.train(tiny_backbone(), il2vseg.Segmenter(3, in_dim=32, dim=16), dataset, cfg,
                      torch.device("cpu"), log=lambda *a: None)
    # a resumed run must see the same data stream: another batch size is refused up front
    cfg = config(tmp_path, resume=True, steps=2, dim=16, fcm_iters=3, batch_size=2, knn=0, shifts="published")
    with pytest.raises(checkpoints.CheckpointError, match=r"trained with --batch-size 4, this run asks for 2"):
        il2vseg.train(tiny_backbone(), il2vseg.Segmenter(3, in_dim=32, dim=16), dataset, cfg,
                      torch.device("cpu"), log=lambda *a: None)


def test_eval_takes_the_head_and_the_low_level_settings_from_the_checkpoint(tmp_path, monkeypatch):
    common = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0", "--shifts", "published", "--probe-images", "4",
              "--eval-images", "4", "--save-images", "0", "--no-crf", "--out", str(tmp_path)]
    trained = ["--dim", "16", "--fcm-iters", "3", "--fcm-m", "1.5", "--fcm-sigma", "0.2", "--affinity", "global",
               "--radius", "1", "--align", "hard"]
    assert il2vseg.main(["--train", "--steps", "1"] + trained + common) == 0
    seen = []
    monkeypatch.setattr(il2vseg, "run_evaluation", lambda backbone, model, cfg, *a, **k: seen.append(cfg))
    assert il2vseg.main(["--eval", "--eval-alpha", "0.5"] + common) == 0  # the command line's defaults differ
    cfg = seen[0]
    assert (cfg.dim, cfg.fcm_iters, cfg.fcm_m, cfg.fcm_sigma) == (16, 3, 1.5, 0.2)
    assert (cfg.affinity, cfg.radius, cfg.eval_alpha) == ("global", 1, 0.5)
    assert cfg.eval_align == "likelihood"  # an evaluation setting: the command line's, not training's --align
    # what the command line gives wins, also when it is the parser's default
    assert il2vseg.main(["--eval", "--eval-alpha", "0.5", "--radius", "3", "--affinity", "local", "--dim", "64"]
                        + common) == 0
    assert (seen[1].affinity, seen[1].radius, seen[1].fcm_sigma) == ("local", 3, 0.2)
    assert seen[1].dim == 16  # a shape, not a choice: the checkpoint's whatever --dim says


def test_checkpoints_from_before_a_setting_existed_and_bad_stored_settings():
    cfg = cli.resolve_defaults(cli.parse_args(["--radius", "2"]), torch.device("cpu"))
    cli.take_from_checkpoint(cfg, {"dim": 16}, "old.pt")  # written before --affinity existed
    assert (cfg.dim, cfg.radius, cfg.affinity, cfg.fcm_sigma) == (16, 2, "global", 0.1)
    for stored, message in [({"radius": 0}, r"--radius must lie in \[1, 64\], got 0"),
                            ({"fcm_sigma": "wide"}, "--fcm-sigma must be a finite number > 0"),
                            ({"affinity": "sideways"}, "--affinity sideways")]:
        cfg = cli.resolve_defaults(cli.parse_args([]), torch.device("cpu"))
        with pytest.raises(ValueError, match="forged.pt: its settings: " + message):
            cli.take_from_checkpoint(cfg, stored, "forged.pt")
    cfg = cli.resolve_defaults(cli.parse_args([]), torch.device("cpu"))
    cfg.eval_align = "sideways"  # a configuration built in code, past argparse's choices
    with pytest.raises(ValueError, match="--eval-align sideways: not one of likelihood, soft, hard"):
        cli.check_numbers(cfg)


@pytest.mark.parametrize("argv, fit_images", [([], 64), (["--train-split", "val"], 16), (["--probe-images", "10"], 10)])
def test_synthetic_kmeans_fit_uses_the_training_splits_own_scenes(argv, fit_images):
    cfg = cli.resolve_defaults(cli.parse_args(["--train"] + argv), torch.device("cpu"))
    (train_set, _, fit_set), _ = cli.build_datasets(cfg)
    assert len(fit_set) == fit_images
    assert [s["rng_seed"] for s in fit_set.samples] == [s["rng_seed"] for s in train_set.samples][:fit_images]


def test_gradient_reaches_only_what_each_term_should_train(tmp_path):
    """Eq (2)/(15) wiring: the head learns through the global branch, the local centres only through
    the data term, the global centres never by gradient (they follow by EMA)."""
    backbone = tiny_backbone()
    cfg = config(tmp_path)
    torch.manual_seed(0)
    model = il2vseg.Segmenter(3, in_dim=backbone.dim, dim=8)
    images = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, length=4)
    images = torch.stack([images[i]["image"] for i in range(4)])
    _, terms, _ = il2vseg.loss_terms(backbone, model, images, cfg, torch.Generator().manual_seed(0))
    assert set(terms) == {"data", "smo", "corr", "fs", "reg"}
    for name, value in terms.items():
        model.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        head_grad = sum(p.grad.abs().sum() for p in model.head.parameters() if p.grad is not None)
        local_grad = model.local_centres.grad
        if name == "data":
            assert head_grad == 0 and local_grad is not None and local_grad.abs().sum() > 0, name
        else:
            assert head_grad > 0 and (local_grad is None or local_grad.abs().sum() == 0), name
        assert model.global_centres.grad is None


@pytest.mark.parametrize("argv,fragment", [
    (["--batch-size", "0"], "--batch-size must lie in [1, "), (["--steps", "-2"], "--steps must lie in [1, "),
    (["--save-every", "0"], "--save-every must lie in [1, "), (["--ema", "1.5"], "--ema must lie in [0, 1)"),
    (["--ema", "nan"], "--ema must lie in [0, 1)"), (["--lr-head", "-1"], "--lr-head must be a finite number > 0"),
    (["--lr-head", "inf"], "--lr-head must be a finite number > 0"), (["--beta", "nan"], "--beta must lie in"),
    (["--gamma", "inf"], "--gamma must lie in"), (["--alpha", "nan"], "--alpha must lie in [0.0, 1.0]"),
    (["--crop", "30"], "must be a multiple of the vits8 stride 8"), (["--crop", "40", "--arch", "dinov2-vits14"], "stride 14"),
    (["--device", "tpu"], "--device tpu: not a device name"), (["--device", "meta"], "--device meta: not a device"),
    (["--fcm-m", "1"], "--fcm-m must lie in (1, 100]"), (["--fcm-sigma", "0"], "--fcm-sigma must be a finite number > 0"),
    (["--eval-images", "0"], "--eval-images must lie in [1, "), (["--dim", "100000000"], "--dim must lie in [1, 4096]"),
    (["--data", "folder", "--n-classes", "1000000"], "--n-classes must lie in [1, 255]"),
    (["--radius", "0"], "--radius must lie in [1, "), (["--kmeans-restarts", "0"], "--kmeans-restarts must lie")])
def test_bad_numbers_are_refused_before_any_work(argv, fragment, capsys):
    assert il2vseg.main(["--train", "--weights", "random"] + argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_folder_without_labels_trains_without_a_val_split_and_predicts(tmp_path, capsys):
    """Your own images: a folder of unlabelled training images, no val split; then --predict with neither
    --data nor --n-classes (the checkpoint's)."""
    from PIL import Image
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 100, 200 - 40 * i)).save(tmp_path / "imgs" / "train" / f"{i}.png")
    out = str(tmp_path / "run")
    assert il2vseg.main(["--train", "--weights", "random", "--data", "folder", "--data-root", str(tmp_path),
                         "--n-classes", "2", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0",
                         "--steps", "1", "--fcm-iters", "3", "--out", out]) == 0
    assert "evaluation skipped: no val split" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert il2vseg.main(["--predict", str(tmp_path / "imgs" / "train"), "--out", out, "--no-crf"]) == 0
    printed = capsys.readouterr().out
    assert "data folder" in printed and "n-classes 2" in printed and "CRF off" in printed
    ids = np.asarray(Image.open(tmp_path / "run" / "predictions" / "0_ids.png"))
    assert ids.shape == (40, 40) and ids.max() <= 1


@pytest.mark.parametrize("argv,fragment", [
    (["--train", "--predict", "/nonexistent/photos"], "/nonexistent/photos"),
    (["--eval", "--checkpoint", "/nonexistent/checkpoint.pt"], "no such checkpoint"),
    (["--ablation", "alpha", "--eval"], "--ablation trains and evaluates every setting itself"),
    (["--train", "--no-smo", "--no-fs", "--no-reg", "--no-corr"], "every loss term is switched off")])
def test_mistakes_stop_before_the_weights_load_and_before_training(argv, fragment, capsys):
    assert il2vseg.main(argv + ["--weights", "random"]) == 1
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" not in captured.out  # the backbone was never built
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_eval_results_go_beside_the_checkpoint_by_default(tmp_path):
    common = ["--weights", "random", "--crop", "32", "--eval-crop", "32", "--batch-size", "4", "--knn", "0", "--shifts", "published", "--probe-images", "4",
              "--eval-images", "4", "--save-images", "0", "--no-crf", "--fcm-iters", "3"]
    assert il2vseg.main(["--train", "--steps", "1", "--out", str(tmp_path / "exp")] + common) == 0
    (tmp_path / "exp" / "metrics.json").unlink()
    assert il2vseg.main(["--eval", "--checkpoint", str(tmp_path / "exp" / "checkpoint.pt")] + common) == 0
    assert (tmp_path / "exp" / "metrics.json").is_file()


@pytest.mark.parametrize("usage, collapsed", [
    ({"largest": 0.95, "perplexity": 1.3}, True),    # one cluster holds almost everything
    ({"largest": 0.54, "perplexity": 2.0}, True),    # two of 11 share everything (the published shifts on CamVid)
    ({"largest": 0.26, "perplexity": 7.5}, False),   # a healthy CamVid batch
    ({"largest": 0.60, "perplexity": 2.3}, False)])  # 3 classes: perplexity 2.3 of 3 is no collapse
def test_the_collapse_alarm_counts_one_dominant_or_a_few_sharing_clusters(usage, collapsed):
    k = 3 if usage["perplexity"] == 2.3 else 11
    assert il2vseg.collapsed_batch(usage, k) is collapsed


def test_a_collapse_is_one_warning_line_after_20_steps_and_counted_in_the_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(il2vseg, "cluster_usage", lambda f_seg: {"perplexity": 1.0, "largest": 1.0})
    cfg = config(tmp_path, steps=21, save_every=100, knn=0, shifts="published")
    backbone, lines = tiny_backbone(), []
    model = il2vseg.build_model(cfg, backbone, 3, "cpu")
    dataset = data.build_dataset("synthetic", None, split="train", mode="train", crop_size=32, seed=0, length=8)
    history = il2vseg.train(backbone, model, dataset, cfg, torch.device("cpu"), log=lines.append)
    warnings = [line for line in lines if line.startswith("WARNING") and "collapse" in line]
    assert len(warnings) == 1 and "step 20" in warnings[0]
    assert il2vseg.training_summary(history, 3)["collapsed_steps"] == 21
