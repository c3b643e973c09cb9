"""il2vseg.py: head, centres and EMA (eq 2), the fusion (eq 13), each against a slow reference; the CLI's help."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import il2vseg
from pasting import paste_alone

REPO = Path(__file__).resolve().parents[1]


def test_cli_missing_weight_file_is_one_clear_line(tmp_path):
    """As a command, in its own process: a failure where the weights load is one line on stderr, nothing else."""
    result = subprocess.run([sys.executable, str(REPO / "il2vseg.py"), "--train", "--weights",
                             str(tmp_path / "missing.pth"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.pth: no such file" in lines[0] and "hub/checkpoints" in lines[0]


def test_missing_requirements_are_one_line_for_the_command_and_for_pytest(tmp_path, monkeypatch):
    """`python il2vseg.py` and `pytest` in a Python without the requirements (-S: no site-packages)."""
    result = subprocess.run([sys.executable, "-S", str(REPO / "il2vseg.py"), "--train"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: torch, numpy, pillow, scipy not installed for {sys.executable}: "
                                     "pip install -r requirements.txt first (README)")
    import importlib.util

    import conftest
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    with pytest.raises(pytest.exit.Exception, match="pillow not installed for .*pip install -r requirements.txt"):
        conftest.pytest_configure(None)


def test_help_documents_every_flag_with_its_default():
    """`python il2vseg.py --help`, as a command in its own process."""
    result = subprocess.run([sys.executable, str(REPO / "il2vseg.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in ["--alpha ALPHA", "(default: 0.5)", "(default: 0.05)", "(default: 0.1)",
                     "(default: 0.0001)", "(default: 0.0005)", "(default: 0.998)", "--weights", "--resume",
                     "--predict", "--out", "--data-root"]:
        assert fragment in text, fragment


# ---------------------------------------------------------------- head, centres, EMA

def test_projection_head_is_linear_plus_silu_mlp():
    torch.manual_seed(0)
    head = il2vseg.ProjectionHead(in_dim=6, dim=4, dropout=0.0).eval()
    feats = torch.randn(2, 6, 3, 5)
    out = head(feats)
    assert out.shape == (2, 4, 3, 5)
    # the same at one pixel, by hand
    f = feats[1, :, 2, 4]
    lin = head.linear.weight[:, :, 0, 0] @ f + head.linear.bias
    hidden = head.nonlinear[0].weight[:, :, 0, 0] @ f + head.nonlinear[0].bias
    hidden = hidden * torch.sigmoid(hidden)  # SiLU
    mlp = head.nonlinear[2].weight[:, :, 0, 0] @ hidden + head.nonlinear[2].bias
    torch.testing.assert_close(out[1, :, 2, 4], lin + mlp)


def test_cosine_to_centres_eq2_matches_a_loop():
    torch.manual_seed(0)
    codes, centres = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    fast = il2vseg.cosine_to_centres(codes, centres)
    for b in range(2):
        for k in range(6):
            for i in range(3):
                for j in range(4):
                    z, c = codes[b, :, i, j], centres[k]
                    assert abs(fast[b, k, i, j] - (z @ c) / (z.norm() * c.norm())) < 1e-12


def test_ema_moves_global_centres_toward_local_by_exactly_the_momentum():
    torch.manual_seed(0)
    global_c, local_c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    before = global_c.clone()
    il2vseg.ema_update(global_c, local_c, momentum=0.998)
    torch.testing.assert_close(global_c, 0.998 * before + 0.002 * local_c)
    # the distance to the local centres shrinks by exactly the momentum factor
    torch.testing.assert_close((global_c - local_c).norm(), 0.998 * (before - local_c).norm())


def test_segmenter_starts_with_equal_local_and_global_centres():
    model = il2vseg.Segmenter(5, in_dim=8, dim=4)
    assert torch.equal(model.local_centres.detach(), model.global_centres)
    assert model.local_centres.requires_grad and not model.global_centres.requires_grad
    assert set(model.state_dict()) >= {"local_centres", "global_centres"}


# ---------------------------------------------------------------- fusion, eq (13)

def test_align_clusters_recovers_a_known_permutation():
    torch.manual_seed(0)
    seg = torch.softmax(torch.randn(3, 5, 6, 7) * 4, dim=1)
    perms = [torch.randperm(5) for _ in range(3)]
    shuffled = torch.stack([seg[b, perms[b]] for b in range(3)])
    torch.testing.assert_close(il2vseg.align_clusters(shuffled, seg.log(), how="hard"), seg)
    one_hot = torch.nn.functional.one_hot(seg.argmax(1), 5).permute(0, 3, 1, 2).double()  # hard maps: soft = permutation
    shuffled = torch.stack([one_hot[b, perms[b]] for b in range(3)])
    torch.testing.assert_close(il2vseg.align_clusters(shuffled, one_hot.log()), one_hot)


@pytest.mark.parametrize("how", ["soft", "likelihood"])
def test_soft_and_likelihood_alignment_match_a_loop_reference(how):
    """O[k, j] = sum_pixels softmax(scores / 0.1)[k] F_l[j]; soft: M[k, j] = O[k, j] / sum_k O[k, j] (each FCM
    cluster goes where its pixels are), likelihood: M[k, j] = O[k, j] / sum_j O[k, j] (each head cluster by
    the colours of its pixels); then F_l'[k] = sum_j M[k, j] F_l[j]."""
    torch.manual_seed(4)
    scores = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    low = torch.softmax(torch.randn(2, 4, 2, 3, dtype=torch.float64) * 2, dim=1)[:, :3]
    low = low / low.sum(1, keepdim=True)  # K = 3
    aligned = il2vseg.align_clusters(low, scores, how=how)
    for b in range(2):
        probs = torch.softmax(scores[b] / 0.1, dim=0)
        overlap = [[sum(float(probs[k, i, j] * low[b, c, i, j]) for i in range(2) for j in range(3))
                    for c in range(3)] for k in range(3)]
        for k in range(3):
            for i in range(2):
                for j in range(3):
                    if how == "soft":
                        weights = [overlap[k][c] / sum(overlap[q][c] for q in range(3)) for c in range(3)]
                    else:
                        weights = [overlap[k][c] / (sum(overlap[k][q] for q in range(3)) + 1) for c in range(3)]
                    expected = sum(weights[c] * float(low[b, c, i, j]) for c in range(3))
                    assert abs(float(aligned[b, k, i, j]) - expected) < 1e-12
    if how == "soft":
        torch.testing.assert_close(aligned.sum(1), torch.ones(2, 2, 3, dtype=torch.float64))


def test_likelihood_alignment_hardly_favours_the_larger_cluster_and_ignores_an_absent_one():
    """Two head clusters of ONE colour, one covering 90 pixels and one 10, and a third the image does not
    show: soft hands the colour's membership to the first two by their share (0.9 / 0.1), likelihood gives
    each nearly all of it (90/91, 10/11: each is all that colour), and the absent cluster none."""
    scores = torch.full((1, 3, 1, 100), -10.0)
    scores[0, 0, 0, :90] = 10.0
    scores[0, 1, 0, 90:] = 10.0  # head cluster 0: 90 pixels, 1: 10 pixels, 2: none
    low = torch.zeros(1, 3, 1, 100)
    low[0, 0] = 1.0  # every pixel has FCM colour cluster 0
    soft = il2vseg.align_clusters(low, scores, how="soft")
    likelihood = il2vseg.align_clusters(low, scores, how="likelihood")
    torch.testing.assert_close(soft[0, :, 0, 0], torch.tensor([0.9, 0.1, 0.0]))
    torch.testing.assert_close(likelihood[0, :, 0, 0], torch.tensor([90 / 91, 10 / 11, 0.0]))


def test_align_clusters_matches_brute_force_over_all_permutations():
    """Reference: overlap O[k, j] = sum_pixels softmax(scores / 0.1)[k] F_l[j] by loops, then the
    permutation of the K = 4 FCM clusters with the largest total overlap among all 24."""
    import itertools
    torch.manual_seed(3)
    scores = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    low = torch.softmax(torch.randn(2, 4, 3, 5, dtype=torch.float64) * 2, dim=1)
    aligned = il2vseg.align_clusters(low, scores, how="hard")
    for b in range(2):
        probs = torch.softmax(scores[b] / 0.1, dim=0)
        overlap = [[sum(float(probs[k, i, j] * low[b, c, i, j]) for i in range(3) for j in range(5))
                    for c in range(4)] for k in range(4)]
        best = max(itertools.permutations(range(4)), key=lambda p: sum(overlap[k][p[k]] for k in range(4)))
        torch.testing.assert_close(aligned[b], low[b, list(best)])
    # a diverged head (NaN scores) does not stop the matching; F^seg itself carries the NaN to the step's check
    assert torch.isfinite(il2vseg.align_clusters(low, scores * float("nan"), how="hard")).all()


@pytest.mark.parametrize("how", ["soft", "likelihood", "hard"])
def test_fused_result_does_not_depend_on_fcm_cluster_order(how):
    torch.manual_seed(1)
    f_seg = torch.randn(2, 4, 5, 5).tanh()
    f_low = torch.softmax(torch.randn(2, 4, 5, 5) * 3, dim=1)
    fused = il2vseg.fuse(f_seg, il2vseg.align_clusters(f_low, f_seg, how=how), alpha=0.5)
    for _ in range(3):
        perm = torch.randperm(4)
        aligned = il2vseg.align_clusters(f_low[:, perm], f_seg, how=how)
        torch.testing.assert_close(il2vseg.fuse(f_seg, aligned, alpha=0.5), fused)


def test_fuse_eq13_endpoints_and_weights():
    torch.manual_seed(2)
    f_seg = torch.randn(1, 3, 4, 4).tanh()
    f_low = torch.softmax(torch.randn(1, 3, 4, 4), dim=1)
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=0.0), f_seg)
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=1.0), f_low)
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=0.25), 0.75 * f_seg + 0.25 * f_low)
    # evaluation's keep_scale: the same argmax, F^seg at its own scale
    kept = il2vseg.fuse(f_seg, f_low, alpha=0.25, keep_scale=True)
    torch.testing.assert_close(kept, f_seg + f_low / 3)
    assert torch.equal(kept.argmax(1), il2vseg.fuse(f_seg, f_low, alpha=0.25).argmax(1))


def test_fuse_passes_gradient_to_the_head_branch_only():
    f_seg = torch.randn(1, 3, 4, 4, requires_grad=True)
    f_low = torch.softmax(torch.randn(1, 3, 4, 4), dim=1)
    il2vseg.fuse(f_seg, f_low, alpha=0.5).sum().backward()
    torch.testing.assert_close(f_seg.grad, torch.full_like(f_seg, 0.5))


def test_build_model_depends_on_the_seed_alone_and_leaves_the_global_rng_alone():
    class Backbone:
        dim = 12
    cfg = cli.parse_args(["--dim", "6", "--seed", "3"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = il2vseg.build_model(cfg, Backbone, 4, "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # the global stream moves on: the model does not change
    second = il2vseg.build_model(cfg, Backbone, 4, "cpu")
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert first.head.linear.in_channels == 12 and first.local_centres.shape == (4, 6)
    cfg.seed = 4
    assert not torch.equal(il2vseg.build_model(cfg, Backbone, 4, "cpu").local_centres, first.local_centres)


def test_functions_copy_alone():
    torch.manual_seed(0)
    codes, centres = torch.randn(2, 5, 3, 4), torch.randn(6, 5)
    assert torch.equal(paste_alone("il2vseg", "cosine_to_centres")(codes, centres),
                       il2vseg.cosine_to_centres(codes, centres))
    g1, g2, local = torch.randn(4, 3), None, torch.randn(4, 3)
    g2 = g1.clone()
    paste_alone("il2vseg", "ema_update")(g1, local, 0.9)
    il2vseg.ema_update(g2, local, 0.9)
    assert torch.equal(g1, g2)
    f_seg, f_low = torch.randn(2, 6, 3, 4).tanh(), torch.softmax(torch.randn(2, 6, 3, 4), dim=1)
    for how in ("soft", "likelihood", "hard"):
        assert torch.equal(paste_alone("il2vseg", "align_clusters")(f_low, f_seg, how=how),
                           il2vseg.align_clusters(f_low, f_seg, how=how))
    assert torch.equal(paste_alone("il2vseg", "fuse")(f_seg, f_low, 0.3), il2vseg.fuse(f_seg, f_low, 0.3))
    assert torch.equal(paste_alone("il2vseg", "fuse")(f_seg, f_low, 0.3, keep_scale=True),
                       il2vseg.fuse(f_seg, f_low, 0.3, keep_scale=True))
