"""The pictures: captioned panels and legends, the stages of --explain (the model's own tensors), the chart."""
import numpy as np
import torch
from PIL import Image

import backbones
import checkpoints
import cli
import fcm
import il2vseg
import pictures
import results


def test_grid_has_one_captioned_cell_per_panel_and_a_legend():
    panels = [(np.full((20, 30, 3), 10 * i, np.uint8), f"panel {i}") for i in range(5)]
    entries = [("road", (128, 0, 0)), ("sky", (0, 128, 0))]
    picture = pictures.grid(panels, columns=3, entries=entries)
    legend = pictures.legend(entries, 3 * 30 + 2 * pictures.GAP)
    assert picture.shape == (2 * (pictures.CAPTION_H + 20) + pictures.GAP + legend.shape[0], 3 * 30 + 2 * pictures.GAP, 3)
    for index, (panel, _) in enumerate(panels):
        top, left = pictures.panel_origin(index, 20, 30, 3)
        assert np.array_equal(picture[top:top + 20, left:left + 30], panel)
    assert (picture[-legend.shape[0]:] == legend).all()
    assert ((legend == (128, 0, 0)).all(-1)).sum() >= pictures.SWATCH ** 2 - 4 * pictures.SWATCH  # the swatch


def test_captions_are_drawn_and_differ_from_an_uncaptioned_render():
    panel = np.full((8, 60, 3), 77, np.uint8)
    blank, named = pictures.captioned(panel, ""), pictures.captioned(panel, "argmax P")
    assert (blank[:pictures.CAPTION_H] == 255).all()
    assert (named[:pictures.CAPTION_H] < 128).any()  # black text on the white strip
    assert np.array_equal(named[pictures.CAPTION_H:], panel)
    assert pictures.captioned(panel, "a very long caption that cannot fit sixty pixels").shape == named.shape


def test_side_by_side_panels_are_the_colourised_maps_with_captions_and_class_legend(tmp_path):
    label = torch.randint(-1, 3, (24, 40))
    preds = [torch.randint(0, 3, (24, 40)) for _ in range(4)]
    path = results.save_side_by_side(tmp_path / "a.png", torch.rand(3, 24, 40), label, preds,
                                     ["kmeans probe", "kmeans probe + CRF", "centres probe", "centres probe + CRF"],
                                     ["road", "car", "sky"])
    picture = np.asarray(Image.open(path))
    assert picture.shape[1] == 6 * 40 + 5 * pictures.GAP
    for index, expected in enumerate([label] + preds, start=1):
        top, left = pictures.panel_origin(index, 24, 40, 6)
        assert np.array_equal(picture[top:top + 24, left:left + 40], results.colourise(expected))
        assert (picture[top - pictures.CAPTION_H:top, left:left + 40] < 128).any()  # its caption
    uncaptioned = np.concatenate([results.colourise(label)] * 2, axis=1)
    assert picture.shape[0] > uncaptioned.shape[0] + pictures.CAPTION_H  # caption strip and legend rows
    legend = picture[pictures.CAPTION_H + 24:]
    for colour in results.palette(3):
        assert (legend == colour).all(-1).any()  # every class has its swatch


def test_heat_map_runs_black_to_white():
    picture = pictures.heat(np.array([[0.0, 0.5, 1.0]]), 0, 1)
    assert picture[0, 0].tolist() == [0, 0, 0] and picture[0, 2].tolist() == [255, 255, 255]
    assert picture[0, 1, 0] == 255 and picture[0, 1, 2] == 0  # the middle is red-yellow


def probes(values):
    """evaluate's "probes" with these (kmeans, centres) mIoUs before the CRF and none after."""
    return {name: {"before_crf": {"miou": v, "acc": v}, "after_crf": None} for name, v in zip(("kmeans", "centres"), values)}


def test_ablation_chart_has_one_bar_per_setting_and_probe_of_its_height():
    rows = [("alpha = 0.0", probes([0.25, 0.5])), ("alpha = 0.5", probes([0.75, float("nan")]))]
    picture = pictures.ablation_chart("Figure 5", rows)
    colours = pictures.SERIES_COLOURS
    for group, (_, entries) in enumerate(rows):
        for index, name in enumerate(("kmeans", "centres")):
            value = entries[name]["before_crf"]["miou"]
            x0, y, x1, y0 = pictures.bar_geometry(2, group, index, 100 * value if value == value else 0)
            inside = picture[y + 1:y0, x0:x1 + 1]
            if value != value:  # nan: no bar
                assert not (picture[:y0, x0:x1 + 1] == colours[index]).all(-1).any()
                continue
            assert (inside == colours[index]).all(), (group, index)
            assert not (picture[y - 3, x0 + 3:x1 - 2] == colours[index]).all(-1).any()  # no taller


def test_ablation_writes_its_chart(tmp_path, monkeypatch):
    cfg = cli.parse_args(["--ablation", "alpha", "--weights", "random", "--out", str(tmp_path)])
    cli.resolve_defaults(cfg, torch.device("cpu"))
    monkeypatch.setattr(il2vseg, "train_and_evaluate", lambda run_cfg, *a, **k: (None, {"probes": probes(
        [run_cfg.alpha / 2, run_cfg.alpha / 4])}))
    rows = il2vseg.run_ablation(cfg, None, "cpu", None, log=lambda *a: None)
    picture = np.asarray(Image.open(tmp_path / "ablation_alpha.png"))
    assert np.array_equal(picture, pictures.ablation_chart(picture_title(cfg), rows))
    x0, y, x1, y0 = pictures.bar_geometry(2, 4, 0, 50)  # alpha 1 -> kmeans mIoU 50 %
    assert (picture[y + 1:y0, x0:x1 + 1] == (70, 110, 190)).all()


def picture_title(cfg):
    return "Figure 5: low-level cue weight (training alpha): mIoU on synthetic val (--weights random: untrained backbone)"


def tiny_setup(tmp_path, K=3):
    cfg = cli.parse_args(["--weights", "random", "--out", str(tmp_path), "--dim", "8", "--fcm-iters", "4",
                          "--eval-crop", "32"])
    cli.resolve_defaults(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    backbone = backbones.VisionTransformer(patch=8, dim=32, depth=1, heads=2, pretrain_size=32).eval()
    model = il2vseg.Segmenter(K, in_dim=32, dim=8).eval()
    return cfg, backbone.requires_grad_(False), model


def test_explain_stages_are_the_tensors_the_model_computes(tmp_path):
    cfg, backbone, model = tiny_setup(tmp_path)
    images = torch.rand(1, 3, 32, 48)
    s = il2vseg.explain_stages(backbone, model, cfg, images, 0.5, "soft", (17, 30))
    assert torch.equal(s["x"], torch.nn.functional.interpolate(images, size=(4, 6), mode="bilinear")[0])  # eq (1)
    P = fcm.low_level_cue(images, 3, m=cfg.fcm_m, patch=8, affinity="none", max_iter=cfg.fcm_iters)
    assert torch.equal(s["P"], P[0])
    f_low = il2vseg.low_level_branch(cfg, 3, 8)(images)
    assert torch.equal(s["f_low"], f_low[0])
    codes = model(backbones.features(backbone, images))
    f_seg = il2vseg.cosine_to_centres(codes, model.global_centres)
    assert torch.allclose(s["f_seg"], f_seg[0])
    fused = il2vseg.fuse(f_seg, il2vseg.align_clusters(f_low, f_seg, how="soft"), 0.5)
    assert torch.allclose(s["f_fused"], fused[0])
    # the row of A for cell (17 // 8, 30 // 8) = (2, 3), in the run's 7 x 7 window (all 4 x 6 cells here)
    x = s["x"]
    reference = torch.tensor([[float(torch.exp(-((x[:, 2, 3] - x[:, i, j]) ** 2).sum() / (2 * cfg.fcm_sigma ** 2)))
                               for j in range(6)] for i in range(4)])
    assert s["cell"] == (2, 3) and torch.allclose(s["affinity"], reference, atol=1e-6)
    cfg.radius = 1
    narrow = il2vseg.explain_stages(backbone, model, cfg, images, 0.5, "soft", (17, 30))["affinity"]
    assert (narrow[0] == 0).all() and torch.allclose(narrow[1:4, 2:5], reference[1:4, 2:5], atol=1e-6)


def test_explain_picture_panels_show_those_stages(tmp_path):
    cfg, backbone, model = tiny_setup(tmp_path)
    image = torch.rand(3, 32, 48)
    (path,) = il2vseg.explain_folder(backbone, model, cfg, "cpu", [{"image": image, "name": "dir/one.png"}],
                                     tmp_path / "explain", 0.5, "soft", log=lambda *a: None)
    assert path == tmp_path / "explain" / "dir_one.png"
    s = il2vseg.explain_stages(backbone, model, cfg, image[None], 0.5, "soft", (16, 24))
    picture = np.asarray(Image.open(path))
    assert picture.shape[1] == 5 * 48 + 4 * pictures.GAP
    expected = {0: results.image_to_uint8(image), 2: results.colourise(s["P"].argmax(0)),
                3: results.colourise(s["f_low"].argmax(0)), 6: results.colourise(s["f_seg"].argmax(0)),
                7: results.colourise(s["f_fused"].argmax(0)), 8: results.colourise(s["pred"]),
                9: results.colourise(s["pred_crf"])}
    for index, panel in expected.items():
        top, left = pictures.panel_origin(index, 32, 48, 5, title=True)
        shown = picture[top:top + 32, left:left + 48]
        assert np.array_equal(shown, pictures.enlarge(panel, 32, 48)), index
        assert (picture[top - pictures.CAPTION_H:top, left:left + 48] < 128).any()  # its caption


def test_explain_command_runs_end_to_end_on_a_random_checkpoint(tmp_path, capsys):
    cfg = cli.parse_args(["--weights", "random", "--out", str(tmp_path), "--dim", "8"])
    cli.resolve_defaults(cfg, torch.device("cpu"))
    backbone = backbones.load_backbone("vits8", "random", log=lambda *a: None)
    model = il2vseg.build_model(cfg, backbone, 3, "cpu")
    checkpoints.save_checkpoint(checkpoints.training_state(model, il2vseg.make_optimiser(model, cfg), 1,
                                                           torch.Generator(), cfg), tmp_path / "checkpoint.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(folder / "noise.png")
    common = ["--explain", str(folder), "--checkpoint", str(tmp_path / "checkpoint.pt"), "--eval-crop", "32",
              "--fcm-iters", "3"]  # no --weights: --explain takes the checkpoint's, as --eval and --predict do
    assert il2vseg.main(common) == 0
    picture = np.asarray(Image.open(tmp_path / "explain" / "noise.png"))
    assert picture.shape[1] == 5 * 48 + 4 * pictures.GAP  # 40 x 56 read at a short side of 32: 32 x 48 (stride 8)
    printed = capsys.readouterr().out
    assert "(the command line did not give them): weights random" in printed
    assert "wrote 1 pictures of the stages" in printed
    first = (tmp_path / "explain" / "noise.png").read_bytes()  # a second --explain never replaces it
    assert il2vseg.main(common + ["--explain-pixel", "0,0"]) == 0
    assert f"these go to {tmp_path / 'explain-2'}" in capsys.readouterr().out
    assert (tmp_path / "explain" / "noise.png").read_bytes() == first and (tmp_path / "explain-2" / "noise.png").is_file()
    assert il2vseg.main(common + ["--explain-pixel", "99,0"]) == 1
    assert "noise.png: --explain-pixel 99,0 lies outside the image" in capsys.readouterr().err
