"""Tests of evaluate.py: the PC-AVS protocol, the baselines (fusion.run_model) and the command line,
the attribute-transfer table's included (the metrics themselves: test_metrics.py; the motion probe
and the attribute-transfer pieces: test_attributes.py)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attributes
import data
import evaluate as ev
import fusion
import media
import procedural


@pytest.fixture(scope="module")
def syncnet_ckpt(tmp_path_factory):
    """Random-weight tiny expert in train.py's syncnet-stage checkpoint layout."""
    import audio
    path = tmp_path_factory.mktemp("sync") / "syncnet.pt"
    torch.manual_seed(1)
    net = audio.SyncNet(**audio.PRESETS["tiny"])
    torch.save({"stage": "syncnet", "cfg": {"model": "tiny"}, "syncnet": net.state_dict()}, path)
    return path


def _run(argv, capsys):
    rc = ev.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _results(d):
    return json.loads((Path(d) / "results.json").read_text())


def _psnr_np(a, b):
    """Oracle: numpy float64 PSNR of two uint8 HxWx3 frames."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _uint8(frames):
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (exact for rendered procedural frames)."""
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_untrained_model_renders_source_recon_and_chunking_is_exact():
    torch.manual_seed(0)
    model = fusion.FCTFG("tiny", canonical_skip=True, window=3).eval()
    with torch.no_grad():                      # E_m's last layers zeroed by hand: z_c->d = 0
        for mlp in model.fusion.E_m.mlps.values():
            mlp[-1].weight.zero_(), mlp[-1].bias.zero_()
    ds = data.SyntheticTalkingFaces("test", n_identities=1, clips_per_identity=1, n_frames=7,
                                    size=64)
    s = ds[0]
    x_s, x_d, mel = s["frames"][0], s["frames"], s["mel"]
    # residual E_can is the identity at init, z_c->d = 0 and the temporal conv the identity: every
    # frame is then G(E_inv(x_s)), the encoder reconstruction of the source.
    out = fusion.run_model(model, x_s, x_d, mel, "model", chunk=3)
    with torch.no_grad():
        recon = model.G.synthesis(model.E_inv(x_s[None]))
    torch.testing.assert_close(out["x_g"], recon.expand(7, -1, -1, -1), rtol=0, atol=1e-5)
    assert out["z_sc_spread"] == 0 and out["canon"] is None
    rec = fusion.run_model(model, x_s, x_s[None].expand(7, -1, -1, -1), mel,
                           "encoder_recon")["x_g"]
    torch.testing.assert_close(rec, out["x_g"], rtol=0, atol=1e-5)
    # Perturb the fusion so windows matter; chunks of whole windows must equal FCTFG.forward on the
    # whole clip: as one window (continuous, the default: each chunk carries its neighbours) or cut
    # into windows of 3 (the paper's mode; TemporalFusion cuts it into the same windows itself)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        refs = {}
        for continuous in (True, False):
            with model.fusion.temporal.one_window(continuous):
                refs[continuous] = model(x_s[None], x_d[None], mel[None])["x_g"][0]
    assert (refs[True] - refs[False]).abs().max() > 1e-3                # the borders do differ
    # and the deflicker (fusion.Deflicker), its state carried from chunk to chunk, as on the whole
    # clip
    for chunk in (3, 6, 100):
        for continuous, ref in refs.items():
            for tau in (0, fusion.DEFLICKER_TAU):
                torch.testing.assert_close(fusion.run_model(model, x_s, x_d, mel, "model",
                                                            chunk=chunk, continuous=continuous,
                                                            deflicker=tau)["x_g"],
                                           fusion.Deflicker(tau)(ref), rtol=0, atol=1e-5)
    copy = fusion.run_model(None, x_s, x_d, mel, "copy_source")  # no network
    assert torch.equal(copy["x_g"], x_s[None].expand(7, -1, -1, -1)) and copy["ws"] is None
    with pytest.raises(ValueError, match="method"):
        fusion.run_model(model, x_s, x_d, mel, "copy source")


def test_copy_source_static_clip_is_perfect():
    T = 6
    frame = torch.rand(3, 64, 64) * 2 - 1
    sample = dict(frames=frame[None].expand(T, -1, -1, -1).clone(), mel=torch.zeros(T, 1, 80, 16),
                  audio=torch.zeros(T * 640))
    rec, _ = ev.evaluate_clip(sample, "copy_source")
    assert rec["ssim"] == pytest.approx(1.0, abs=1e-6) and rec["psnr"] == math.inf
    assert rec["n_psnr_inf"] == T - 1 and rec["n_scored"] == T - 1 and rec["ms_ssim"] is None
    s = ev.summarize([dict(rec, clip=0)])
    assert s["psnr"] == math.inf and s["n_psnr_inf"] == T - 1
    assert json.loads(json.dumps(ev._strip_nonfinite(s)))["psnr"] == "inf"
    assert ev._restore_nonfinite(json.loads(json.dumps(ev._strip_nonfinite(s))))["psnr"] == math.inf


def test_copy_source_cli_matches_hand_computation(tmp_path, capsys):
    sk = pytest.importorskip("skimage.metrics")
    rc, out, _ = _run(["--baseline", "copy_source", "--n_clips", 1, "--clip_frames", 6,
                       "--out", tmp_path / "p", "--examples", 0], capsys)
    assert rc == 0 and "baseline: copy source frame" in out
    clip = _results(tmp_path / "p")["clips"][0]
    # the default
    f = _uint8(data.SyntheticTalkingFaces("test", n_identities=2, clips_per_identity=1, n_frames=6,
                                          size=64,
                                          first=procedural.ATTRIBUTE_SPLITS["report"])[0]["frames"])
    # PC-AVS protocol: frame 0 is the source, frames 1..5 are scored; per-frame values then the mean
    assert clip["psnr"] == pytest.approx(np.mean([_psnr_np(f[0], f[t]) for t in range(1, 6)]),
                                         abs=1e-9)
    want = np.mean([sk.structural_similarity(f[0], f[t], gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255,
                                             channel_axis=2) for t in range(1, 6)])
    assert clip["ssim"] == pytest.approx(want, abs=1e-5)
    # cross protocol: source = frame 0 of clip 0 (person A), ground truth = A with clip 1's motion,
    # all frames
    rc, out, _ = _run(["--baseline", "copy_source", "--protocol", "cross", "--n_clips", 1,
                       "--clip_frames", 6, "--out", tmp_path / "c", "--examples", 0], capsys)
    assert rc == 0
    clip = _results(tmp_path / "c")["clips"][0]
    # --split report, the default
    ds = data.SyntheticTalkingFaces("test", n_identities=2, clips_per_identity=1, n_frames=6,
                                    size=64, first=procedural.ATTRIBUTE_SPLITS["report"])
    src, gt = _uint8(ds[0]["frames"])[0], _uint8(ds.cross(0, 1)["frames"])
    assert clip["pair"] == [0, 1]
    assert clip["psnr"] == pytest.approx(np.mean([_psnr_np(src, g) for g in gt]), abs=1e-9)
    masks = procedural.region_masks(ds.identity(0), ds.cross(0, 1)["motion"].numpy())
    err = np.abs(src[None].astype(float) - gt.astype(float)).mean(-1)        # [T, H, W] grey levels
    assert clip["background_err"] == pytest.approx(err[masks["background"]].mean(), abs=1e-9)
    assert (clip["skin_err"] == pytest.approx(err[masks["skin"]].mean(), abs=1e-9)
            and clip["sharpness"] > 0)
    assert "background err" in out


def test_cli_end_to_end_untrained_tiny(tmp_path, capsys, probe_ckpt, syncnet_ckpt):
    d = tmp_path / "run"
    rc, out, err = _run(["--checkpoint", "untrained", "--n_clips", 2, "--clip_frames", 10,
                         "--out", d, "--syncnet", syncnet_ckpt, "--probe", probe_ckpt[0],
                         "--examples", 1], capsys)
    assert rc == 0, err
    assert ("| Method | SSIM" in out and "FC-TFG (untrained tiny)" in out and "frames/s" in out
            and "ETA" in out)
    res = _results(d)
    s = res["summary"]
    for k in ("ssim", "psnr", "lmd", "lse_c_ours", "lse_d_ours", "lse_c_ours_real", "canon_var",
              "drive_var"):
        assert isinstance(s[k], float) and math.isfinite(s[k]), (k, s[k])
    assert s["ms_ssim"] is None and s["n_clips"] == 2 and s["z_sc_spread"] == 0
    assert len(res["clips"]) == 2 and all(math.isfinite(v) for v in s["attr"].values())
    assert (any("NOT comparable" in n for n in res["notes"])
            and any("held-out error" in n for n in res["notes"]))
    md = (d / "results.md").read_text()
    assert "| FC-TFG (untrained tiny) |" in md and "MS-SSIM: '-'" in md
    assert not list(d.glob("*.tmp*"))  # atomic writes leave no temporaries
    if importlib.util.find_spec("av") is not None:
        frames, _, audio, _ = media.read_video(d / "examples" / "clip0000.mp4", need_audio=True)
        assert frames.shape == (10, 64, 3 * 64, 3)  # source | ground truth | generated
        assert not (d / "examples" / "clip0001.mp4").exists()


def test_cli_cross_protocol_controllability(tmp_path, capsys, probe_ckpt):
    rc, out, err = _run(["--checkpoint", "untrained", "--protocol", "cross", "--n_clips", 2,
                         "--clip_frames", 6, "--out", tmp_path, "--probe", probe_ckpt[0],
                         "--examples", 0], capsys)
    assert rc == 0, err
    assert ("yaw err (deg)" in out and "probe on ground truth (its floor)" in out
            and "Fig. 5b" in out)
    s = _results(tmp_path)["summary"]
    for group in ("attr", "attr_floor"):
        assert (set(s[group]) == set(attributes.ATTRIBUTES)
                and all(math.isfinite(v) for v in s[group].values()))
    for k in ("canon_var", "drive_var", "canon_pose_std", "drive_pose_std", "lmd",
              "lmd_vs_renderer"):
        assert math.isfinite(s[k]), k
    assert [c["pair"] for c in _results(tmp_path)["clips"]] == [[0, 1], [1, 0]]


def test_cli_resumes_over_clips(tmp_path, capsys):
    args = ["--baseline", "copy_source", "--clip_frames", 6, "--out", tmp_path, "--examples", 0]
    assert _run(args + ["--n_clips", 2], capsys)[0] == 0
    first = (tmp_path / "clips.jsonl").read_text().splitlines()
    rc, out, _ = _run(args + ["--n_clips", 3], capsys)
    assert rc == 0 and "2 of 3 clips already done" in out and out.count("] clip ") == 1
    lines = (tmp_path / "clips.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3  # done clips untouched, one new clip
    assert _results(tmp_path)["summary"]["n_clips"] == 3
    # a torn last line (killed mid-write) is ignored and that clip recomputed
    (tmp_path / "clips.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    rc, out, _ = _run(args + ["--n_clips", 3], capsys)
    assert rc == 0 and out.count("] clip ") == 1
    # a different evaluation in the same folder is refused
    rc, _, err = _run(args + ["--n_clips", 3, "--protocol", "cross"], capsys)
    assert rc == 2 and "different evaluation" in err


def test_cli_bad_checkpoint_one_line_error(tmp_path, capsys, syncnet_ckpt):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for ck, msg in [(garbage, "not a loadable checkpoint"), (tmp_path / "missing.pt", "not found"),
                    (syncnet_ckpt, "not an FC-TFG checkpoint")]:
        rc, out, err = _run(["--checkpoint", ck, "--out", tmp_path / "o", "--n_clips", 1], capsys)
        assert (rc == 2 and msg in err and err.startswith("error:")
                and len(err.strip().splitlines()) == 1), err
    # a flag that acts only with another one, given alone, is refused in one line, not silently
    # ignored
    for argv, msg in [(["--probe_steps", 5], "--probe_steps has no effect without --train-probe"),
                      (["--checkpoint", garbage, "--window", 3],
                       "--window has no effect without --checkpoint"),
                      (["--split", "tune", "--data", "/nonexistent"],
                       "--split has no effect without --data synthetic"),
                      (["--paper_table", "mead"],
                       "--paper_table has no effect without --data FOLDER"),
                      # the copied source frame is never rendered: nothing to deflicker
                      (["--baseline", "copy_source", "--deflicker", 0],
                       "--deflicker has no effect with --baseline copy_source")]:
        rc, out, err = _run([*argv, "--out", tmp_path / "o"], capsys)
        assert (rc == 2 and msg in err and len(err.strip().splitlines()) == 1
                and not (tmp_path / "o").exists()), err
    # "given" = a value other than the default, as for every flag above: the default passes
    ev.check_idle_flags(ev.parse_args(["--baseline", "copy_source",
                                       "--deflicker", str(fusion.DEFLICKER_TAU)]))
    # and as a real process: non-zero exit status, no traceback
    p = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(garbage),
                        "--out", str(tmp_path / "o")],
                       cwd=Path(ev.__file__).parent, capture_output=True, text=True, timeout=120)
    assert (p.returncode == 2 and "Traceback" not in p.stderr
            and p.stderr.startswith("error:")), p.stderr


# --------------------------------------------------------------------------------------------------
# attribute transfer (issue 18)
# --------------------------------------------------------------------------------------------------
def test_attribute_table_rows_and_cli(tmp_path, capsys, probe_ckpt):
    """Copy-source is exactly 0 on every attribute; the driver's own codes of an untrained model are
    rendered through the model, so their rows are finite; the CLI prints and saves the table."""
    rc, out, err = _run(["--checkpoint", "untrained", "--protocol", "attributes", "--n_clips", 1,
                         "--clip_frames", 12, "--split", "tune", "--out", tmp_path,
                         "--probe", probe_ckpt[0]],
                        capsys)
    assert rc == 0, err
    assert "blink corr" in out and "copy source" in out and "driver's own codes" in out
    res = _results(tmp_path)["attributes"]
    attrs = procedural.ATTRIBUTE_CLIPS
    assert (set(res) == {"model", "copy_source", "encoder_recon", "truth_recon"}
            and set(res["model"]) == set(attrs))
    assert all(res["copy_source"][a]["corr"] == 0 for a in attrs)
    for row in res.values():
        for a in attrs:
            assert (-1 <= row[a]["corr"] <= 1 and math.isfinite(row[a]["psnr"])
                    and math.isfinite(row[a]["err"]))
            assert (row[a]["sharpness"] > 0 and row[a]["background_err"] >= 0
                    and row[a]["skin_err"] >= 0)
    # A's still copied: its backdrop is A's own, so only pixels the moving head uncovers differ
    # (yaw, pitch)
    assert all(res["copy_source"][a]["background_err"] < 1.0
               for a in ("blink", "gaze", "brow", "lips"))
    assert "background err" in out and "decoder + inversion redrawing A" in out
    rc, _, err = _run(["--protocol", "attributes", "--baseline", "copy_source", "--out",
                       tmp_path / "b"], capsys)
    assert rc == 2 and err.startswith("error:")


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of evaluate.py's command line has help text (issue 20)."""
    missing = [a.option_strings or a.dest for a in cli_actions(ev.parse_args, []) if not a.help]
    assert not missing, missing


def test_judges_report_runs_on_a_judges_checkpoint(tmp_path, capsys):
    """evaluate.py --judges: E_id verification and φ rankings on unseen people, written to --out;
    --out needed."""
    import train
    assert train.train(["--stage", "judges", "--out", str(tmp_path / "j"), "--max_steps", "2",
                        "--batch", "4", "--n_identities", "4", "--frame_pool", "8",
                        "--log_every", "1", "--sample_every", "0"]) == 0
    rc, out, err = _run(["--judges", tmp_path / "j" / "last.pt", "--out", tmp_path / "q"], capsys)
    assert rc == 0, err
    q = _results(tmp_path / "q")
    assert (0 <= q["e_id"]["auc"] <= 1 and 0 <= q["e_id"]["accuracy"] <= 1
            and q["e_id"]["pairs"] == 400)
    assert set(q["phi"]) == {"phi", "phi_untrained", "l1"} and "verification AUC" in out
    rc, out, err = _run(["--judges", tmp_path / "j" / "last.pt"], capsys)
    assert rc == 2 and "--judges needs --out" in err


def test_stage_checkpoints_score_the_decoder_ceiling_only(tmp_path, capsys):
    """A decoder-stage checkpoint (G + its joint encoder) scores --baseline truth_recon:
    G(E_inv(truth)) with the stage's own weights; it has no FC-TFG to score the model row with,
    which is refused in one line."""
    import train
    assert train.train(["--stage", "stylegan2", "--out", str(tmp_path / "sg"), "--max_steps", "1",
                        "--batch", "4", "--n_identities", "2", "--frame_pool", "4",
                        "--sample_every", "0", "--log_every", "1"]) == 0
    ck = tmp_path / "sg" / "last.pt"
    model, cfg = ev.load_model(str(ck))
    state = torch.load(ck, weights_only=True)
    assert cfg["stage"] == "stylegan2" and cfg["hyper_steps"] == 0
    assert all(torch.equal(v, state["e_inv"][k]) for k, v in model.E_inv.state_dict().items())
    rc, out, err = _run(["--protocol", "cross", "--baseline", "truth_recon", "--checkpoint", ck,
                         "--n_clips", 1, "--clip_frames", 6, "--examples", 0,
                         "--out", tmp_path / "c"], capsys)
    assert rc == 0 and "decoder + inversion ceiling" in out, err
    rc, out, err = _run(["--protocol", "cross", "--checkpoint", ck, "--n_clips", 1,
                         "--out", tmp_path / "m"], capsys)
    assert rc == 2 and "truth_recon / encoder_recon only" in err
