"""il2vseg.py: the ViT against a slow reference, weight loading, head, centres, EMA, fusion (eq 13)."""
import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import il2vseg

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- ViT vs. a slow reference

def reference_vit(model, images):
    """The ViT written out with loops over patches, tokens and heads, in float64."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, dim = model.patch, model.dim
    heads = model.blocks[0].attn.heads
    B, _, H, W = images.shape
    h, w = H // p, W // p

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    out = torch.zeros(B, dim, h, w, dtype=torch.float64)
    for b in range(B):
        tokens = [sd["cls_token"][0, 0]]
        for i in range(h):
            for j in range(w):
                patch = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].double()
                weight = sd["patch_embed.proj.weight"]  # (dim, 3, p, p)
                tokens.append((weight * patch).sum(dim=(1, 2, 3)) + sd["patch_embed.proj.bias"])
        x = torch.stack(tokens)  # (1 + h*w, dim)
        x = x + model.position_embedding(h, w).double()[0]
        for n in range(len(model.blocks)):
            pre = f"blocks.{n}."
            y = layer_norm(x, pre + "norm1")
            qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
            q, k, v = qkv.split(dim, dim=-1)
            d = dim // heads
            heads_out = []
            for head in range(heads):
                qh, kh, vh = (t[:, head * d:(head + 1) * d] for t in (q, k, v))
                rows = []
                for t in range(x.shape[0]):
                    scores = torch.stack([qh[t] @ kh[s] / math.sqrt(d) for s in range(x.shape[0])])
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    rows.append((weights[:, None] * vh).sum(0))
                heads_out.append(torch.stack(rows))
            attn = torch.cat(heads_out, dim=-1) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
            x = x + attn
            y = layer_norm(x, pre + "norm2")
            y = gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
            x = x + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        x = layer_norm(x, "norm")[1:]  # drop CLS
        out[b] = x.T.reshape(dim, h, w)
    return out


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])  # the pretraining grid and an interpolated one
def test_vit_matches_slow_reference(size):
    torch.manual_seed(0)
    model = il2vseg.VisionTransformer(patch=4, dim=8, depth=2, heads=2, pretrain_size=16).double().eval()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        fast = model(images)
    assert fast.shape == (2, 8, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(fast, reference_vit(model, images), rtol=1e-9, atol=1e-9)


def test_vit_rejects_size_not_divisible_by_patch():
    model = il2vseg.VisionTransformer(patch=4, dim=8, depth=1, heads=2, pretrain_size=16)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model(torch.zeros(1, 3, 15, 16))


def test_position_embedding_interpolation_keeps_the_pretraining_grid():
    model = il2vseg.VisionTransformer(patch=4, dim=8, depth=1, heads=2, pretrain_size=16)
    assert model.position_embedding(4, 4) is model.pos_embed
    stretched = model.position_embedding(6, 3)
    assert stretched.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(stretched[:, :1], model.pos_embed[:, :1])  # CLS position untouched


# ---------------------------------------------------------------- official weights

@pytest.fixture(scope="module")
def official_layout_file(tmp_path_factory):
    """A randomly initialised ViT-S/8 state dict in the official DINO layout, saved like the release."""
    torch.manual_seed(0)
    state = il2vseg.build_vit("vits8").state_dict()
    path = tmp_path_factory.mktemp("weights") / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)
    return path, state


def test_official_layout_shapes(official_layout_file):
    _, state = official_layout_file
    assert state["pos_embed"].shape == (1, 785, 384)
    assert state["patch_embed.proj.weight"].shape == (384, 3, 8, 8)
    assert len({k.split(".")[1] for k in state if k.startswith("blocks.")}) == 12
    assert abs(sum(v.numel() for v in state.values()) - 21.7e6) < 0.1e6


def test_weights_from_a_path_load_strictly_and_freeze(official_layout_file):
    path, state = official_layout_file
    model = il2vseg.load_dino("vits8", str(path))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_from_the_torch_hub_cache_work_offline(official_layout_file, tmp_path, monkeypatch):
    path, state = official_layout_file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / path.name).symlink_to(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = il2vseg.load_dino("vits8", None)  # the real torch.hub path, served from the cache
    assert torch.equal(model.state_dict()["pos_embed"], state["pos_embed"])


def test_training_checkpoint_wrappers_are_unwrapped(official_layout_file, tmp_path):
    _, state = official_layout_file
    wrapped = {"teacher": {"backbone." + k: v for k, v in state.items()}, "epoch": 3}
    wrapped["teacher"]["head.last_layer.weight"] = torch.zeros(2, 2)
    torch.save(wrapped, tmp_path / "full.pth")
    model = il2vseg.load_dino("vits8", str(tmp_path / "full.pth"))
    assert torch.equal(model.state_dict()["norm.weight"], state["norm.weight"])


def test_wrong_layout_fails_with_a_clear_message(tmp_path):
    torch.save(il2vseg.build_vit("vits16").state_dict(), tmp_path / "vits16.pth")
    with pytest.raises(il2vseg.WeightsError, match=r"vits16.pth does not fit this ViT: .*wrong shapes.*--arch"):
        il2vseg.load_dino("vits8", str(tmp_path / "vits16.pth"))
    state = il2vseg.build_vit("vits8").state_dict()
    del state["norm.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(il2vseg.WeightsError, match="1 missing keys"):
        il2vseg.load_dino("vits8", str(tmp_path / "partial.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(il2vseg.WeightsError, match="cannot be read as a torch file"):
        il2vseg.load_dino("vits8", str(tmp_path / "garbage.pth"))


def test_no_weights_and_no_internet_says_where_to_put_the_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(il2vseg.WeightsError) as info:
        il2vseg.load_dino("vits8", None)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "--weights PATH" in message


def test_cli_missing_weight_file_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "il2vseg.py"), "--train", "--weights",
                             str(tmp_path / "missing.pth"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.pth: no such file" in lines[0] and "hub/checkpoints" in lines[0]


def test_help_documents_every_flag_with_its_default():
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
    torch.testing.assert_close(il2vseg.align_clusters(shuffled, seg), seg)


def test_fused_result_does_not_depend_on_fcm_cluster_order():
    torch.manual_seed(1)
    f_seg = torch.randn(2, 4, 5, 5).tanh()
    f_low = torch.softmax(torch.randn(2, 4, 5, 5) * 3, dim=1)
    fused = il2vseg.fuse(f_seg, f_low, alpha=0.5)
    for _ in range(3):
        perm = torch.randperm(4)
        torch.testing.assert_close(il2vseg.fuse(f_seg, f_low[:, perm], alpha=0.5), fused)


def test_fuse_eq13_endpoints_and_weights():
    torch.manual_seed(2)
    f_seg = torch.randn(1, 3, 4, 4).tanh()
    f_low = torch.softmax(torch.randn(1, 3, 4, 4), dim=1)
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=0.0), f_seg)
    aligned = il2vseg.align_clusters(f_low, torch.softmax(f_seg / 0.1, dim=1))
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=1.0), aligned)
    torch.testing.assert_close(il2vseg.fuse(f_seg, f_low, alpha=0.25), 0.75 * f_seg + 0.25 * aligned)
    with pytest.raises(ValueError, match="same shape"):
        il2vseg.fuse(f_seg, f_low[:, :2], alpha=0.5)


def test_fuse_passes_gradient_to_the_head_branch_only():
    f_seg = torch.randn(1, 3, 4, 4, requires_grad=True)
    f_low = torch.softmax(torch.randn(1, 3, 4, 4), dim=1)
    il2vseg.fuse(f_seg, f_low, alpha=0.5).sum().backward()
    torch.testing.assert_close(f_seg.grad, torch.full_like(f_seg, 0.5))
