"""The measurement scripts keep running: the README's numbers come from them.

scripts/camvid_pipeline.py and scripts/camvid_lowlevel.py are run on a few CamVid frames (skipped when
../shared/data/camvid is absent); scripts/wiring_mutations.py is checked for mutations whose line has
drifted away from the code (such a mutation would silently test nothing).
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from trees import need_shared

REPO = Path(__file__).resolve().parents[1]


def run_script(name, *argv):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_camvid_pipeline_trains_evaluates_and_prints_every_table(tmp_path):
    root = need_shared("data", "camvid")
    out = tmp_path / "pipeline.json"
    printed = run_script("camvid_pipeline.py", "--root", str(root), "--out", str(out), "--steps", "2",
                         "--batch-size", "2", "--seeds", "1", "--kmeans-seeds", "1", "--kmeans-restarts", "1",
                         "--val-frames", "3", "--fit-frames", "3", "--train-frames", "6", "--alphas", "0,0.5",
                         "--affinities", "local", "--crop", "64", "--workers", "1", "--quiet", "--study-alphas", "0",
                         "--knn", "2", "--calibrate-images", "4", "--grad-every", "1",
                         "--candidates", "keep-scale+soft,crf-first+likelihood,printed+hard,keep-scale+likelihood@0.25")
    for heading in ("Raw-feature baseline", "Alpha sweep", "Training: the gradient", "Shifts used", "Eval-time fusion",
                    "Per-class IoU"):
        assert heading in printed, heading
    for unary in ("keep-scale+soft [local]", "crf-first+likelihood [local]", "printed+hard [local]",
                  "keep-scale+likelihood@0.25 [local]"):
        assert f"| α 0.0, — | {unary} |" in printed, unary
    assert "| local | 0.5 |" in printed
    assert out.is_file() and json.loads(out.read_text())
    assert "scored on val" in printed


def test_camvid_pipeline_selection_split_is_train_frames_outside_the_kmeans_fit_set():
    root = need_shared("data", "camvid")
    spec = importlib.util.spec_from_file_location("camvid_pipeline", REPO / "scripts" / "camvid_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, _, fit_names = module.eval_frames(str(root), "train", 32, 5)
    images, labels, names = module.eval_frames(str(root), "train", 32, 4, exclude=fit_names)
    assert len(names) == 4 and not set(names) & set(fit_names)
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)


def test_camvid_lowlevel_scores_every_reading():
    root = need_shared("data", "camvid")
    printed = run_script("camvid_lowlevel.py", "--root", str(root), "--limit", "2", "--radii", "1,3")
    for row in ("global affinity", "local affinity r=1", "local affinity r=3", "plain FCM (P)", "k-means on colour"):
        assert row in printed, row


def test_every_mutation_still_finds_its_line_exactly_once():
    spec = importlib.util.spec_from_file_location("wiring_mutations", REPO / "scripts" / "wiring_mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.MUTATIONS) >= 30
    for number, (name, old, new) in enumerate(module.MUTATIONS, 1):
        assert (REPO / name).read_text().count(old) == 1, f"mutation {number}: {old!r} is not in {name} exactly once"
        assert old != new, number
