"""Do the wiring tests notice a wrong call? One-line mistakes at call sites, each tried alone.

For every mutation below (a realistic one-line mistake: a constant swapped, a tensor passed to the
wrong call, a switch ignored) the script copies the repository's tracked files into a temporary
folder, applies the mistake, runs tests/test_wiring.py (then the whole suite if the wiring tests miss
it) and prints which test failed first. A mutation that no test notices is a hole in the tests. A test
that fails without any mutation (run once on an unmutated copy) never counts as a catch.

    python scripts/wiring_mutations.py            # all 41 (3.5 minutes on 2 idle CPU cores, 2026-12-02)
    python scripts/wiring_mutations.py --only 3   # one of them
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (file, the line as it is, the mistake)
MUTATIONS = [
    ("il2vseg.py", "f_fused = fuse(f_seg, f_low, cfg.alpha)", "f_fused = fuse(f_seg, f_low, 0.0)"),
    ("il2vseg.py", "augmented = data.photometric_augment(images, generator=generator)",
     "augmented = images + 0 * data.photometric_augment(images, generator=generator)"),
    ("il2vseg.py", "total = cfg.beta * reg + cfg.gamma * fs + smo + corr + data_term",
     "total = cfg.gamma * reg + cfg.beta * fs + smo + corr + data_term"),
    ("il2vseg.py", "total = cfg.beta * reg + cfg.gamma * fs + smo + corr + data_term",
     "total = cfg.beta * reg + cfg.gamma * fs + smo + corr"),
    ("il2vseg.py", "ema_update(model.global_centres, model.local_centres, cfg.ema)",
     "ema_update(model.global_centres, model.local_centres, 1 - cfg.ema)"),
    ("il2vseg.py", "losses.smoothness_loss(signal, probs, cfg.shift_close, cfg.shift_far, perm=perm)",
     "losses.smoothness_loss(signal, probs, cfg.shift_far, cfg.shift_close, perm=perm)"),
    ("cli.py", 'cfg.corr_shifts, cfg.corr_weights = constants["stego_shifts"], constants["stego_weights"]',
     'cfg.corr_shifts, cfg.corr_weights = constants["stego_weights"], constants["stego_shifts"]'),
    # the shifts a run uses are settled by pairs.settle_shifts (cli.resolve_defaults' are overwritten there)
    ("pairs.py", "constants = losses.loss_constants(cfg.data, cfg.arch)", "constants = losses.loss_constants(cfg.data)"),
    ("il2vseg.py", "probs = torch.softmax(scores / cfg.smooth_temperature, dim=1)", "probs = torch.softmax(scores, dim=1)"),
    ("il2vseg.py", "data_term = losses.data_loss(inner_local, scores)", "data_term = losses.data_loss(inner_local, inner_local)"),
    ("il2vseg.py", "inner_local = cosine_to_centres(codes.detach(), model.local_centres)",
     "inner_local = cosine_to_centres(codes.detach(), model.global_centres)"),
    ("il2vseg.py", "f_seg = cosine_to_centres(codes, model.global_centres)                     # eq (2): the head",
     "f_seg = cosine_to_centres(codes, model.local_centres.detach())                     # eq (2): the head"),
    ("il2vseg.py", "pair = {\"aug\": (feats_aug, codes_aug)} if cfg.use_aug else {}",
     "pair = {\"aug\": (feats, codes)} if cfg.use_aug else {}"),
    ("il2vseg.py", "pair[\"knn\"] = (feats_knn[0], codes_knn[0])", "pair[\"knn\"] = (feats_knn[0], codes[0])"),
    ("il2vseg.py", "item[\"partner\"] = self.dataset[pairs.partner_of(self.neighbours, self.seed, step, index)][\"image\"]",
     "item[\"partner\"] = self.dataset[pairs.partner_of(self.neighbours, self.seed, 0, index)][\"image\"]"),
    ("pairs.py", "close, far = measured[\"close\"], measured[\"far\"]", "close, far = measured[\"far\"], measured[\"close\"]"),
    ("pairs.py", "shifts[\"aug\"] = measured[\"aug\"]", "shifts[\"aug\"] = measured[\"pos_intra\"]"),
    ("il2vseg.py", "eq14 = losses.feature_correlation_losses if cfg.fs_reading == \"correlation\" else losses.feature_similarity_losses",
     "eq14 = losses.feature_similarity_losses"),
    ("il2vseg.py", "(feats, feats_aug, *feats_knn), (codes, codes_aug, *codes_knn) = feats_all.split(B), codes_all.split(B)",
     "(feats, feats_aug, *feats_knn), (codes_aug, codes, *codes_knn) = feats_all.split(B), codes_all.split(B)"),
    ("il2vseg.py", "small = fcm.downsample(images, size=tuple(f_low.shape[2:]))",
     "small = fcm.downsample(augmented, size=tuple(f_low.shape[2:]))"),
    ("il2vseg.py", "fs, reg = (fs if cfg.use_fs else zero), (reg if cfg.use_reg else zero)",
     "fs, reg = (fs if cfg.use_fs else zero), (reg if cfg.use_fs else zero)"),
    ("il2vseg.py", "scores = f_fused if cfg.fusion_in == \"all\" else f_seg", "scores = f_seg"),
    ("il2vseg.py", "{\"params\": [model.local_centres], \"lr\": cfg.lr_centres}]",
     "{\"params\": [model.local_centres], \"lr\": cfg.lr_head}]"),
    ("il2vseg.py", "patch=stride, affinity=cfg.affinity, radius=cfg.radius, max_iter=cfg.fcm_iters)",
     "patch=stride, affinity=cfg.affinity, radius=cfg.radius, max_iter=20)"),
    ("il2vseg.py", "n_clusters=n_clusters, m=cfg.fcm_m, sigma=cfg.fcm_sigma,", "n_clusters=n_clusters, m=cfg.fcm_m, sigma=0.1,"),
    ("il2vseg.py", "return evaluate.run_protocol(make_code_fn(backbone, model), score_fn, model.global_centres, datasets, cfg,",
     "return evaluate.run_protocol(make_code_fn(backbone, model), score_fn, model.local_centres.detach(), datasets, cfg,"),
    ("il2vseg.py", "return fuse(f_seg, upsample(f_low), cfg.eval_alpha, keep_scale=True)",
     "return fuse(f_seg, upsample(low_level(images)), cfg.eval_alpha, keep_scale=True)"),
    ("il2vseg.py", "return fuse(f_seg, upsample(f_low), cfg.eval_alpha, keep_scale=True)",
     "return fuse(f_seg, upsample(f_low), cfg.eval_alpha)"),
    ("il2vseg.py", "f_seg = cosine_to_centres(upsample(codes), centres)", "f_seg = upsample(cosine_to_centres(codes, centres))"),
    ("evaluate.py", "fit_on = val_set if cfg.kmeans_fit == \"val\" else fit_set",
     "fit_on = val_set"),
    ("evaluate.py", "centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed + s, n_init=cfg.kmeans_restarts",
     "centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed, n_init=cfg.kmeans_restarts"),
    ("evaluate.py", "centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed + s, n_init=cfg.kmeans_restarts",
     "centres, _, loss = kmeans_cosine(vectors, n_classes, seed=cfg.seed + s, n_init=1"),
    ("evaluate.py", "probes[\"kmeans\" if s == 0 else f\"kmeans seed {cfg.seed + s}\"] = centres",
     "probes[\"kmeans\" if s == 0 else f\"kmeans seed {cfg.seed + s}\"] = global_centres"),
    ("evaluate.py", "result = evaluate(code_fn, score_fn, loader(val_set), n_classes, probes, device, use_crf=not cfg.no_crf,\n"
     "                      flip=cfg.flip_tta, keep=cfg.save_images, tick=ticker.tick)",
     "result = evaluate(code_fn, score_fn, loader(val_set), n_classes, probes, device, use_crf=not cfg.no_crf,\n"
     "                      flip=True, keep=cfg.save_images, tick=ticker.tick)"),
    ("evaluate.py", "result = evaluate(code_fn, score_fn, loader(val_set), n_classes, probes, device, use_crf=not cfg.no_crf,",
     "result = evaluate(code_fn, score_fn, loader(val_set), n_classes, probes, device, use_crf=True,"),
    ("evaluate.py", "flip=cfg.flip_tta, tick=ticker.tick).to(device)  # (N, D)",
     "flip=False, tick=ticker.tick).to(device)  # (N, D)"),
    ("evaluate.py", "pred_crf = refine_with_crf(images, probs, crf_kwargs).argmax(dim=1)  # (B, H, W)",
     "pred_crf = refine_with_crf(images, cluster_probs(score_fn, images, codes, centres, labels.shape[-2:]), "
     "crf_kwargs).argmax(dim=1)"),
    ("il2vseg.py", "f_low = align_clusters(f_low, f_seg.detach(), how=cfg.align)",
     "f_low = align_clusters(f_low, f_low, how=cfg.align)"),
    ("il2vseg.py", "f_low = align_clusters(f_low, f_seg.detach(), how=cfg.align)",
     "f_low = align_clusters(f_low, f_seg.detach())"),
    ("il2vseg.py", "f_low = align_clusters(low_level(images), cosine_to_centres(codes, centres), how=cfg.eval_align)",
     "f_low = align_clusters(low_level(images), cosine_to_centres(codes, centres), how=cfg.align)"),
    ("il2vseg.py", "f_low = align_clusters(low_level(images), cosine_to_centres(codes, centres), how=cfg.eval_align)",
     "f_low = align_clusters(low_level(images), cosine_to_centres(codes, centres))"),
]


# fails in every mutated copy (the original line is gone there), so it would "catch" every mutation
SELF_CHECK = "tests/test_scripts.py::test_every_mutation_still_finds_its_line_exactly_once"


def copy_of_repository(folder, tracked):
    for path in tracked:
        (Path(folder) / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, Path(folder) / path)


def failing_tests(folder, tests, deselect=(), first_only=True):
    """The tests (names) that fail or error in `folder`; with first_only, pytest stops at the first."""
    options = ["-x"] if first_only else []
    for name in (SELF_CHECK, *deselect):
        options += ["--deselect", name]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *options, tests],
                            cwd=folder, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    if result.returncode not in (0, 1) and not failed:  # pytest itself failed (usage, collection, crash)
        failed = [f"pytest exit code {result.returncode}"]
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, default=None, help="run only mutation number N (1-based)")
    args = parser.parse_args()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    chosen = list(enumerate(MUTATIONS, 1))
    if args.only:
        chosen = [chosen[args.only - 1]]
    baseline = {}  # tests -> what fails without any mutation: never counted as a catch

    def failing_unmutated(tests):
        if tests not in baseline:
            with tempfile.TemporaryDirectory() as folder:
                copy_of_repository(folder, tracked)
                baseline[tests] = failing_tests(folder, tests, first_only=False)
            if baseline[tests]:
                print(f"without any mutation these fail, left out below: {', '.join(baseline[tests])}", flush=True)
        return baseline[tests]

    holes = 0
    for number, (name, old, new) in chosen:
        with tempfile.TemporaryDirectory() as folder:
            copy_of_repository(folder, tracked)
            source = (Path(folder) / name).read_text()
            if source.count(old) != 1:
                print(f"{number:2d} {name}: the line to mutate is not there exactly once: {old!r}")
                holes += 1
                continue
            (Path(folder) / name).write_text(source.replace(old, new))
            where, failed = "wiring", failing_tests(folder, "tests/test_wiring.py", failing_unmutated("tests/test_wiring.py"))
            if not failed:
                where, failed = "suite", failing_tests(folder, "tests", failing_unmutated("tests"))
        holes += not failed
        print(f"{number:2d} {name}: {new.strip()[:90]!r}\n   -> {'caught by ' + where + ': ' + failed[0] if failed else 'NOT CAUGHT'}",
              flush=True)
    print(f"{len(chosen) - holes} of {len(chosen)} mutations caught")
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
