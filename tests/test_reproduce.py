"""Tests for the reproduction recipe: reproduce.sh end to end in its SMOKE mode (every stage,
export, every evaluation, figures and tables), and the pieces it relies on (export, tables; the loss
plot is files.plot_losses, tested in test_stylegan2.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusion
import procedural
import reproduce

ROOT = Path(__file__).resolve().parents[1]


def test_tables_with_no_results_are_headers_only(tmp_path):
    md = reproduce.tables(tmp_path)
    assert "Table 1" in md and "FC-TFG (ours)" not in md   # no row without a results.json
    # no ablation list: no ablation tables
    assert "Attribute transfer" not in md and "Table 3" not in md


def test_ablation_rows_read_their_evaluations(tmp_path):
    """A row of the ablation list lands in every table it names, with the attribute correlations of
    its attribute evaluation and the cross-protocol numbers of its cross evaluation."""
    (tmp_path / "ablations.tsv").write_text("lstm_video\t3,4\tLSTM, video D\t--temporal lstm\n"
                                            "no_latent\tdev\tno latent target\t--latent_weight 0\n")
    d = tmp_path / "eval" / "abl_lstm_video"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"summary": {
        "ssim": 0.5, "psnr": 20.0, "lmd_vs_renderer": 3.456, "lse_c_ours": 0.1,
        "flicker_px_border": 3.0, "flicker_px_inside": 2.0, "canon_pose_std": 1.234}}))
    d = tmp_path / "eval" / "abl_lstm_video_attr"
    d.mkdir(parents=True)
    attrs = {a: {"corr": 0.1 * i, "psnr": 20.0, "err": None}
             for i, a in enumerate(procedural.ATTRIBUTE_CLIPS)}
    (d / "results.json").write_text(json.dumps({"attributes": {"model": attrs}}))
    md = reproduce.tables(tmp_path)
    row = ("| LSTM, video D | 0.00 | 0.10 | 0.20 | 0.30 | 0.40 | 0.50 | 0.500 | 20.00 | 3.46 | "
           "0.100 | 1.500 | 1.23 |")
    assert md.count(row) == 2                                # in Table 3 and in Table 4
    # not evaluated yet
    assert "| no latent target | - | - | - | - | - | - | - | - | - | - | - | - |" in md
    assert "Tiny-scale deviations" in md


def test_trend_plots_each_attribute_in_step_order(tmp_path, capsys):
    """trend: the correlations of each STEP=FOLDER evaluation, sorted by step, into a PNG (one panel
    per attribute) and its .jsonl; a point without a step is refused in one line, nothing
    written."""
    points = []
    for step in (200, 50):
        d = tmp_path / f"s{step}"
        d.mkdir()
        attrs = {a: {"corr": step / 1000 + i / 100}
                 for i, a in enumerate(procedural.ATTRIBUTE_CLIPS)}
        (d / "results.json").write_text(json.dumps({"attributes": {"model": attrs}}))
        points.append(f"{step}={d}")
    png = tmp_path / "trend.png"
    assert reproduce.main(["trend", str(png)] + points) == 0 and png.is_file()
    rows = [json.loads(line) for line in png.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 200] and rows[1]["lips"] == pytest.approx(0.2 + 0.05)
    assert reproduce.main(["trend", str(tmp_path / "bad.png"), str(tmp_path / "s50")]) == 2
    assert "STEP=FOLDER" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


def test_the_recipe_is_the_tiny_preset():
    """reproduce.sh's training lines set no setting of train.SETTINGS: outside its smoke mode (whose
    sizes and step counts sit in $SYNC ... $ABL) they run `train.py --stage S --preset tiny` with
    paths, the seed and --resume only, so the tiny preset (with train.STAGE_PRESETS) is the
    recipe."""
    import re
    import train
    sh = (ROOT / "reproduce.sh").read_text()
    common = re.findall(r'^COMMON="(.*)"$', sh, re.M)
    run_flags = ("--preset", "--device", "--seed", "--resume", "--cache_dir", "$COMMON")
    assert common and all(f in run_flags for c in common
                          for f in re.findall(r"(?:^|\s)(--\w+|\$COMMON)(?=\s|$)", c))
    assert 'SYNC=""; SG2=""; INV=""; FCTFG=""; ABL=""' in sh      # the full recipe: no overrides
    lines = re.findall(r"^\s*python train\.py --stage (\w+)(.*?)(?<!\\)$",
                       sh.replace("\\\n", " "), re.M)
    stages = {st for st, _ in lines}
    assert {"syncnet", "stylegan2", "inversion", "fctfg"} <= stages
    for st, rest in lines:
        flags = set(re.findall(r"--(\w[\w-]*)", rest))
        assert flags <= {"out", "init", "syncnet", "seed"}, (st, flags)
    for stage, over in train.STAGE_PRESETS["tiny"].items():   # each value has its column's type
        assert stage in train.STAGES
        for k, v in over.items():
            ref = False if k == "freeze_pretrained" else train.PRESETS["tiny"][k]
            assert type(v) is type(ref), (stage, k)


def test_export_rejects_other_stages(tmp_path, capsys):
    torch.save({"stage": "syncnet", "step": 1}, tmp_path / "s.pt")
    assert reproduce.main(["export", str(tmp_path / "s.pt"), str(tmp_path / "o.pt")]) == 2
    assert "needs an fctfg one" in capsys.readouterr().err and not (tmp_path / "o.pt").exists()


@pytest.mark.slow
def test_smoke_recipe_end_to_end(tmp_path):
    """SMOKE=1 bash reproduce.sh: a few steps per stage, then every evaluation; the exported
    checkpoint is what infer.py and evaluate.py accept."""
    out, export = tmp_path / "run", tmp_path / "ckpt" / "fctfg_tiny.pt"
    env = dict(os.environ, SMOKE="1", EXPORT=str(export), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "reproduce.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("syncnet", "stylegan2", "inversion", "fctfg"):
        assert ((out / stage / "loss.png").is_file()
                and list((out / stage / "samples").glob("*.png"))), stage
    full = torch.load(out / "fctfg" / "last.pt", map_location="cpu", weights_only=True)
    slim = torch.load(export, map_location="cpu", weights_only=True)
    assert (set(slim) == {"stage", "step", "cfg", "run", "fctfg"}
            and slim["fctfg"].keys() == full["fctfg"].keys())
    assert slim["run"]["data"] == "synthetic" and slim["run"]["freeze_pretrained"]
    assert all(v.dtype == torch.float16 for v in slim["fctfg"].values() if v.is_floating_point())
    assert export.stat().st_size < 0.6 * (out / "fctfg" / "last.pt").stat().st_size
    model, _ = fusion.FCTFG.load(export, "cpu")          # loads, casts back to float32
    assert next(model.parameters()).dtype == torch.float32
    for name in ("cross_model", "cross_copy_source", "cross_encoder_recon", "pcavs_model",
                 "abl_lstm_video", "abl_residual_ecan", "abl_finetune"):
        s = json.loads((out / "eval" / name / "results.json").read_text())["summary"]
        assert s["n_clips"] == 2 and 0 < s["ssim"] <= 1, name
    for name in ["attributes_model"] + [f"abl_{n}_attr" for n in ("lstm_video", "residual_ecan",
                                                                    "no_latent", "finetune")]:
        a = json.loads((out / "eval" / name / "results.json").read_text())["attributes"]
        assert a["copy_source"]["blink"]["corr"] == 0, name
    # the fine-tuning row trains G too; every other row keeps it frozen
    fine = torch.load(out / "abl_finetune" / "last.pt", map_location="cpu", weights_only=True)
    frozen = torch.load(out / "abl_no_latent" / "last.pt", map_location="cpu", weights_only=True)
    assert not fine["run"]["freeze_pretrained"] and frozen["run"]["freeze_pretrained"]
    tables = (out / "tables.md").read_text()
    assert ("| cross | FC-TFG (ours) |" in tables and "| LSTM, video D |" in tables
            and "blink corr" in tables)
    row = [line for line in tables.splitlines()
           if line.startswith("| recipe (conv, image D, cosine, plain E_can)")]
    # the main run's row, in Tables 3 and 4
    assert len(row) == 2 and " - |" not in row[0].split("|", 2)[2][:8]
    assert ((out / "figures" / "demo.mp4").is_file()
            and (out / "figures" / "demo_sheet.png").is_file())
    for fig in ("fig5_canonical_space.png", "fig5b_one_video_canonical.png",
                "fig4_cross_identity.png", "fig_window_seam.png"):
        assert (out / "figures" / fig).is_file()
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(export),
                        "--seconds", "0.4", "--out", str(tmp_path / "o.mp4")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "o.mp4").is_file(), r.stderr
    assert "UNTRAINED" not in r.stdout


@pytest.mark.slow
def test_step_flops_are_per_sample():
    """The cost estimate's FLOPs are per training sample: the same at batch 2 and 4 (the only
    batch-size-independent work is tiny, < 2 %), for an image stage and a window stage."""
    for stage in ("syncnet", "inversion"):
        f2, _ = reproduce.step_flops(stage, "tiny", batch=2)
        f4, _ = reproduce.step_flops(stage, "tiny", batch=4)
        assert f2 > 1e6 and abs(f2 / f4 - 1) < 0.02, stage


def test_grouped_conv_backward_flops_match_torch_where_torch_is_right():
    """Without groups (batch 1) our convolution_backward formula equals torch's own; with the batch
    as groups (batch 4) ours stays at the per-sample value while torch's grows with the batch."""
    from torch.utils.flop_counter import FlopCounterMode
    import stylegan2
    torch.manual_seed(0)
    G = stylegan2.Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 8, 16: 4})

    def count(B, custom):
        ws = torch.randn(B, G.n_latent, G.style_dim, requires_grad=True)
        mapping = ({torch.ops.aten.convolution_backward: reproduce._conv_backward_flops}
                   if custom else {})
        c = FlopCounterMode(display=False, custom_mapping=mapping)
        with c:
            G.synthesis(ws, noise_mode="const").sum().backward()
        return c.get_flop_counts()["Global"][torch.ops.aten.convolution_backward] / B

    assert count(1, True) == count(1, False) > 0
    assert count(4, True) == count(1, True) < count(4, False)


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of reproduce.py's command line has help text (issue 20)."""
    missing = [a.option_strings or a.dest for a in cli_actions(reproduce.main, ["tables", "x"])
               if not a.help]
    assert not missing, missing
