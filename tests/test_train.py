"""Tests for train.py: every stage runs and chains, checkpoints load safely, kill-and-resume equals
an uninterrupted run, NaN stops cleanly, and the DDP arithmetic (torchrun, gloo) matches one
process."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import files
import losses
import stages
import stylegan2
import media
import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--n_identities", "2", "--clips_per_identity", "2",
         "--clip_frames", "8", "--frame_pool", "8", "--batch", "4", "--log_every", "1",
         "--sample_every", "2", "--ckpt_every", "2",
         # the plain stages these tests were written for, not the tiny recipe's aids (those are
         # run by reproduce.sh's smoke test): every term on every step, a constant lr, Eq. (3) as
         # the paper column has it, nothing frozen
         "--gan_every", "1", "--pl_every", "4", "--feature_weight", "0", "--lr_rampdown", "0",
         "--latent_weight", "0", "--lr_fctfg", "1e-4", "--ortho", "hadamard_abs",
         "--no-freeze_pretrained"]


def run(stage, out, steps, *extra):
    rc = train.train(["--stage", stage, "--out", str(out), "--max_steps", str(steps), *SMALL,
                      *extra])
    assert rc == 0
    return torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stylegan2_stage_writes_log_samples_and_a_rosinality_loadable_checkpoint(tmp_path):
    ck = run("stylegan2", tmp_path, 3)
    assert ck["stage"] == "stylegan2" and ck["step"] == 3 and ck["cfg"]["model"] == "tiny"
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert all(l["loss_d"] > 0 and l["img_per_s"] > 0 for l in lines)
    assert "r1" in lines[0] and "pl" in lines[0]            # lazy regularisers ran at step 0
    assert (tmp_path / "samples" / "0000002.png").is_file()
    G, D, _ = stylegan2.load_stylegan2(tmp_path / "last.pt")  # same keys as rosinality's g/d/g_ema
    assert G.size == 64 and D is not None


def test_ema_half_life_and_buffers():
    G = stylegan2.Generator(8, style_dim=4, n_mlp=1, channels={4: 2, 8: 2})
    ema = stylegan2.Generator(8, style_dim=4, n_mlp=1, channels={4: 2, 8: 2})
    before = [p.clone() for p in ema.parameters()]
    stages.accumulate_ema(ema, G, 0.75)
    for pe, pm, pb in zip(ema.parameters(), G.parameters(), before):
        torch.testing.assert_close(pe, 0.75 * pb + 0.25 * pm)
    for be, bm in zip(ema.buffers(), G.buffers()):
        assert torch.equal(be, bm)


def test_recon_weight_trains_an_encoder_that_the_inversion_stage_starts_from(tmp_path):
    ck = run("stylegan2", tmp_path / "sg", 2)
    log = [json.loads(l) for l in (tmp_path / "sg" / "log.jsonl").read_text().splitlines()]
    assert "e_inv" in ck and "opt_e" in ck and all(l["recon_l1"] > 0 for l in log)
    args, cfg = train.parse_args(["--stage", "inversion", "--init",
                                  str(tmp_path / "sg" / "last.pt")])
    st = stages.InversionStage(cfg, torch.device("cpu"), args)
    assert_same_state(st.e_inv.state_dict(), ck["e_inv"])
    plain = run("stylegan2", tmp_path / "plain", 1, "--recon_weight", "0")   # the paper's plain GAN
    assert "e_inv" not in plain and "opt_e" not in plain


def test_gan_every_runs_d_only_on_gan_steps(tmp_path):
    # steps 0, 1, 2 with gan_every 4: only step 0 trains D (and G's adversarial term); 1 and 2 are
    # reconstruction steps, so D after 3 steps equals D after 1 step while G and E keep moving
    one = run("stylegan2", tmp_path / "a", 1, "--gan_every", "4", "--pl_every", "0")
    three = run("stylegan2", tmp_path / "b", 3, "--gan_every", "4", "--pl_every", "0")
    assert_same_state(one["d"], three["d"])
    assert any(not torch.equal(one["g"][k], three["g"][k]) for k in one["g"])
    log = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert "loss_d" in log[0] and "r1" in log[0] and not any("loss_d" in l for l in log[1:])
    assert all(l["recon_l1"] > 0 for l in log)
    # without the reconstruction term there is nothing else to train G with: --gan_every would do
    # nothing, so it is refused (one line), and the plain GAN has a D step on every step
    with pytest.raises(SystemExit, match="needs --recon_weight"):
        run("stylegan2", tmp_path / "c", 2, "--gan_every", "4", "--recon_weight", "0",
            "--pl_every", "0")
    plain = run("stylegan2", tmp_path / "c", 2, "--recon_weight", "0", "--pl_every", "0")
    log = [json.loads(l) for l in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert all("loss_d" in l for l in log) and "e_inv" not in plain


def test_frame_pool_feature_weight_marks_eyes_brows_and_mouth(tmp_path):
    import procedural
    ds = data.SyntheticTalkingFaces("train", n_identities=2, clips_per_identity=2, n_frames=8)
    plain, weighted = data.FramePool(ds, 4, 0), data.FramePool(ds, 4, 0, feature_weight=10.0)
    assert set(plain[0]) == {"image"} and torch.equal(plain[2]["image"], weighted[2]["image"])
    # the same frame re-rendered with its masks: weight 11 exactly on the grown eye/brow/mouth masks
    g = np.random.default_rng((0, 2))
    i = int(g.integers(len(ds)))
    motion, _ = procedural.make_motion(ds.motion_seed(i), ds.n_frames)
    _, masks = procedural.render(ds.identity(i), motion[int(g.integers(len(motion)))], 64,
                                 return_masks=True)
    feat = masks["eye_l"] | masks["eye_r"] | masks["brow_l"] | masks["brow_r"] | masks["mouth"]
    grown = feat.copy()
    for dy in (-1, 0, 1):                    # a 3x3 dilation written out with numpy, not max_pool2d
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(np.pad(feat, 1), dy, 0), dx, 1)[1:-1, 1:-1]
    w = weighted[2]["weight"][0].numpy()
    assert w.shape == (64, 64) and set(np.unique(w)) == {1.0, 11.0}
    assert np.array_equal(w == 11.0, grown) and 0 < grown.mean() < 0.25
    # the stage takes it
    run("stylegan2", tmp_path, 1, "--feature_weight", "10", "--gan_every", "4")
    with pytest.raises(SystemExit, match="needs --recon_weight"):                  # no silent no-op
        train.train(["--stage", "stylegan2", "--out", str(tmp_path / "x"), *SMALL, "--gan_every",
                     "4", "--recon_weight", "0"])


def test_clip_windows_feature_weight_marks_each_frames_features(tmp_path):
    """FC-TFG stage --feature_weight: every frame of a window gets 1 + w on ITS OWN grown
    eye/brow/mouth masks (the renderer's, frame by frame), and the stage trains with it."""
    import procedural
    ds = data.SyntheticTalkingFaces("train", n_identities=2, clips_per_identity=2, n_frames=8)
    win = data.ClipWindows(ds, 5, source=True, feature_weight=10.0)
    item = win[2 * win.n_starts + 1]                                       # clip 2, frames 1..5
    motion, _ = procedural.make_motion(ds.motion_seed(2), 8)
    for t in range(5):
        _, m = procedural.render(ds.identity(2), motion[1 + t], 64, return_masks=True)
        feat = m["eye_l"] | m["eye_r"] | m["brow_l"] | m["brow_r"] | m["mouth"]
        grown = feat.copy()
        for dy in (-1, 0, 1):                    # a 3x3 dilation written out with numpy
            for dx in (-1, 0, 1):
                grown |= np.roll(np.roll(np.pad(feat, 1), dy, 0), dx, 1)[1:-1, 1:-1]
        np.testing.assert_array_equal(item["weight"][t, 0].numpy(), np.where(grown, 11.0, 1.0))
    assert "weight" not in data.ClipWindows(ds, 5, source=True)[0]
    run("fctfg", tmp_path, 1, "--hyper_steps", "0", "--feature_weight", "10")


class _NumberedClips:
    """Clip c = 4 frames whose pixels all equal c / 100: a source frame says which clip it came
    from."""
    clips_per_identity = 3
    n_frames = 4

    def __len__(self):
        return 12

    def __getitem__(self, c):
        return {"frames": torch.full((4, 3, 2, 2), c / 100), "mel": torch.zeros(4, 1, 80, 16),
                "identity": c // 3}


def test_clip_windows_source_from_the_same_clip_or_the_same_person():
    clips = _NumberedClips()
    for mode in ("clip", "identity"):
        ds = data.ClipWindows(clips, 2, seed=0, source=True, source_from=mode)
        src = [round(float(ds[j]["source"][0, 0, 0]) * 100) for j in range(len(ds))]
        own = [j // ds.n_starts for j in range(len(ds))]
        assert all(s // 3 == c // 3 for s, c in zip(src, own))          # always the same person
        if mode == "clip":
            assert src == own
        else:                                                          # and not only the same clip
            assert sum(s != c for s, c in zip(src, own)) > len(ds) // 3
    with pytest.raises(ValueError, match="source_from"):
        data.ClipWindows(clips, 2, source=True, source_from="video")


def test_clip_windows_drive_colour_recolours_the_driving_input_only():
    """--drive_colour a: x_d = clamp(gain * x + offset) with one gain in [1-a, 1+a] and one offset
    in [-a, a] per channel for the whole window (checked per pixel against the clean window),
    targets untouched."""
    clips = _NumberedClips()
    plain, jit = data.ClipWindows(clips, 2, seed=3), data.ClipWindows(clips, 2, seed=3,
                                                                      drive_colour=0.3)
    for j in (0, 5, 17):
        a, b = plain[j], jit[j]
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["drive"], a["frames"])
        x, y = a["drive"].flatten(2), b["drive"].flatten(2)                   # [T, 3, pixels]
        # one transform for the window
        assert not torch.equal(x, y) and torch.all(y.std((0, 2)) == 0)
        # a constant clip cannot reveal gain and offset apart: check the window's values stay within
        # reach
        lo, hi = (0.7 * x - 0.3).clamp(-1, 1), (1.3 * x + 0.3).clamp(-1, 1)
        assert torch.all((y >= torch.minimum(lo, hi) - 1e-6) & (y <= torch.maximum(lo, hi) + 1e-6))
    # real contrast: gain = slope, offset = intercept
    ramp = torch.linspace(-0.9, 0.9, 4 * 3 * 4).view(4, 3, 2, 2)
    ds = data.ClipWindows([{"frames": ramp, "mel": torch.zeros(4, 1, 80, 16), "identity": 0}], 4,
                          seed=1, drive_colour=0.3)
    d = ds[0]["drive"]
    for c in range(3):
        u, v = ramp[:, c].flatten(), d[:, c].flatten()
        inside = (v > -1) & (v < 1)
        k = torch.linalg.lstsq(torch.stack([u[inside], torch.ones(int(inside.sum()))], 1),
                               v[inside, None]).solution
        assert 0.7 - 1e-5 <= float(k[0]) <= 1.3 + 1e-5 and -0.3 - 1e-5 <= float(k[1]) <= 0.3 + 1e-5


def test_fctfg_stage_logs_motion_and_the_latent_term(tmp_path, capsys):
    flags = ("--hyper_steps", "0", "--latent_weight", "1", "--freeze_pretrained", "--ortho",
             "hadamard_abs")
    ck = run("fctfg", tmp_path, 2, *flags)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(l["latent"] > 0 and l["dw"] >= 0 and l["dw_drv"] > 0 and l["z_cd"] > 0 for l in log)
    # --freeze_pretrained keeps G, E_inv, HyperStyle (what --init gives) but trains E_a, which has
    # no pre-training stage here: between step 1 and step 2 only the trained networks move
    one = run("fctfg", tmp_path / "one", 1, *flags)
    moved = {k.split(".")[0] for k in ck["fctfg"]
             if not torch.equal(ck["fctfg"][k], one["fctfg"][k])}
    assert "E_a" in moved and "fusion" in moved and not moved & {"G", "E_inv", "H"}
    log_r = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    # --ortho_weight scales λ_ortho of Eq. (9) only: same ortho value, total lower by 0.9 x ortho
    run("fctfg", tmp_path / "w", 1, *flags, "--ortho_weight", "0.1")
    log_w = json.loads((tmp_path / "w" / "log.jsonl").read_text().splitlines()[0])
    assert log_w["ortho"] == pytest.approx(log_r["ortho"])
    # the totals are float32 sums of ~6 terms, each rounded to within eps32 * |total|
    # (eps32 = 2^-23), so their difference is known to within a few eps32 * |total|, not to a
    # relative 1e-4 of itself
    tol = 8 * 2.0 ** -23 * max(abs(log_r["total"]), abs(log_w["total"]))
    assert log_r["total"] - log_w["total"] == pytest.approx(0.9 * log_r["ortho"], rel=1e-6, abs=tol)
    with pytest.raises(SystemExit):
        train.train(["--stage", "fctfg", "--canonical", "deep", "--out", str(tmp_path / "x"),
                     *SMALL])
    assert "--canonical: invalid choice: 'deep'" in capsys.readouterr().err


def test_fctfg_audio_encoder_flag_loads_wav2lip_weights_into_E_a(tmp_path):
    """--audio_encoder: E_a starts from a Wav2Lip generator checkpoint's audio_encoder.* (random
    weights in that key layout, module. prefix and all), and the checkpoint records the flag."""
    import audio
    torch.manual_seed(3)
    enc = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS["tiny"])
    sd = {"module.audio_encoder." + k: v for k, v in enc.state_dict().items()}
    # the rest of the generator: ignored
    sd["module.output_block.1.weight"] = torch.randn(3, 32, 1, 1)
    torch.save({"state_dict": sd, "optimizer": None, "global_step": 0}, tmp_path / "wav2lip.pth")
    args, cfg = train.parse_args(["--stage", "fctfg", "--audio_encoder",
                                  str(tmp_path / "wav2lip.pth"), *SMALL])
    stage = stages.FCTFGStage(cfg, torch.device("cpu"), args)
    assert_same_state(stage.fctfg.E_a.state_dict(), enc.state_dict())
    ck = run("fctfg", tmp_path / "f", 1, "--hyper_steps", "0", "--audio_encoder",
             str(tmp_path / "wav2lip.pth"))
    assert ck["run"]["audio_encoder"] == str(tmp_path / "wav2lip.pth")
    with pytest.raises(ValueError, match="audio_encoder"):
        torch.save({"state_dict": {"x.weight": torch.zeros(1)}}, tmp_path / "other.pth")
        stages.FCTFGStage(cfg, torch.device("cpu"), train.parse_args(
            ["--stage", "fctfg", "--audio_encoder", str(tmp_path / "other.pth"), *SMALL])[0])


def test_the_tiny_aids_are_fenced_in_their_own_subclass():
    """The paper preset builds the paper's FC-TFG stage; the tiny recipe builds
    TinyRecipeFCTFGStage, whose L_rec is Eq. (6)'s L1 under the batch's feature-weight map and
    whose total is Eq. (9)'s weighted sum of its terms plus w x the latent term."""
    paper = train.parse_args(["--preset", "paper", "--stage", "fctfg"])[1]
    assert stages.stage_class("fctfg", paper) is stages.FCTFGStage
    assert stages.stage_class("fctfg", train.parse_args(["--stage", "fctfg"])[1]) \
        is stages.TinyRecipeFCTFGStage
    args, cfg = train.parse_args(["--stage", "fctfg", *SMALL, "--hyper_steps", "0",
                                  "--feature_weight", "10", "--latent_weight", "2"])
    torch.manual_seed(0)
    stage = stages.stage_class("fctfg", cfg)(cfg, torch.device("cpu"), args)
    mb = data.Batches(stage.dataset(data.make_clip_dataset(cfg, "synthetic")), 4, 0, 1, 0).get(0)
    assert mb["weight"].max() == 11.0                 # 1 + w on the features, 1 elsewhere
    with torch.no_grad():
        out = stage.fctfg(mb["source"], mb["drive"], mb["mel"], hyper_steps=0)
        ours = stage.loss_terms(mb, out)
        paper_terms = {**ours, "rec": stages.FCTFGStage.l_rec(stage, out["x_g"], mb["frames"], mb)}
        err = (out["x_g"] - mb["frames"]).abs()
        assert torch.allclose(ours["rec"], (err * mb["weight"]).mean(), rtol=1e-6)
        assert torch.allclose(paper_terms["rec"], err.mean(), rtol=1e-6)
        assert not torch.allclose(ours["rec"], paper_terms["rec"])
        total, parts = stage.eq9(mb, out)
        lam = {**losses.LAMBDA, "ortho": cfg["ortho_weight"], "sync": cfg["sync_weight"]}
        expect = sum(lam[k] * v for k, v in ours.items() if v is not None) + 2 * parts["latent"]
        assert parts["latent"] > 0 and torch.allclose(total, expect, rtol=1e-5)


def test_impossible_batch_settings_get_one_line_or_a_valid_default(tmp_path, capsys):
    """syncnet at batch 1: one clear error (BatchNorm needs two samples); FC-TFG at batch 1: the
    image D sees 5 frames, which --mbstd_group 4 does not divide, so the largest divisor (1) is used
    and said."""
    with pytest.raises(SystemExit, match="batch >= 2"):
        train.train(["--stage", "syncnet", "--out", str(tmp_path / "s"), *SMALL, "--batch", "1"])
    run("fctfg", tmp_path / "f", 1, "--hyper_steps", "0", "--batch", "1")
    assert "minibatch-stddev group: 1" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["nce", "bce"])
def test_syncnet_stage_losses_log_pair_auc(tmp_path, loss, capsys):
    run("syncnet", tmp_path, 2, "--expert_loss", loss, "--batch", "8")
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(l["loss_sync_expert"] > 0 and (0 <= l["auc"] <= 1 or l["auc"] != l["auc"])
               for l in log)
    with pytest.raises(SystemExit):
        train.train(["--stage", "syncnet", "--expert_loss", "hinge", "--out", str(tmp_path / "x"),
                     *SMALL])
    assert "--expert_loss: invalid choice: 'hinge'" in capsys.readouterr().err


def test_pair_auc_hand_values():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert float(stages.pair_auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), y)) == 1.0
    # only 0.8 > 0.2 of 4 pairs
    assert float(stages.pair_auc(torch.tensor([0.1, 0.9, 0.8, 0.2]), y)) == 0.25
    assert torch.isnan(stages.pair_auc(torch.tensor([0.3, 0.4]), torch.ones(2)))


@pytest.mark.slow
def test_all_stages_chain(tmp_path):
    """stylegan2 -> inversion -> fctfg (with the syncnet stage's expert), each a few steps."""
    run("stylegan2", tmp_path / "sg", 2)
    ck = run("inversion", tmp_path / "inv", 2, "--init", str(tmp_path / "sg" / "last.pt"))
    assert {"e_inv", "hyper", "g_ema", "d"} <= ck.keys()
    sg = torch.load(tmp_path / "sg" / "last.pt", weights_only=True)
    assert_same_state(ck["g_ema"], sg["g_ema"])              # the frozen decoder is carried forward
    ck = run("syncnet", tmp_path / "sync", 2)
    assert "syncnet" in ck
    ck = run("fctfg", tmp_path / "f", 2, "--init", str(tmp_path / "inv" / "last.pt"),
             "--syncnet", str(tmp_path / "sync" / "last.pt"), "--hyper_steps", "1")
    log = [json.loads(l) for l in (tmp_path / "f" / "log.jsonl").read_text().splitlines()]
    assert {"ortho", "sync", "rec", "gan", "total", "loss_d"} <= log[-1].keys()
    import fusion
    model, cfg = fusion.FCTFG.load(tmp_path / "f" / "last.pt")
    assert cfg["temporal"] == "conv"
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 5, 3, 64, 64),
                    torch.zeros(1, 5, 1, 80, 16))
    assert out["x_g"].shape == (1, 5, 3, 64, 64)


def test_grad_ckpt_trains_the_same_weights(tmp_path):
    """--grad_ckpt 1 (memory only) fine-tunes every network (G, E_inv, HyperStyle with BatchNorm,
    E_a, D with R1) to bit-identical weights and buffers: the recomputation repeats the same float32
    ops in the same order, and its BatchNorms do not update their statistics twice."""
    args = ("--hyper_steps", "1", "--r1_every", "1")
    plain = run("fctfg", tmp_path / "a", 2, *args)
    ckpt = run("fctfg", tmp_path / "b", 2, *args, "--grad_ckpt", "1")
    for net in ("fctfg", "d"):
        assert_same_state(plain[net], ckpt[net])
    one = run("fctfg", tmp_path / "c", 1, *args)["fctfg"]
    moved = {k.split(".")[0] for k, v in plain["fctfg"].items() if not torch.equal(v, one[k])}
    assert {"G", "E_inv", "H", "E_a", "fusion"} <= moved   # the 2nd step moved every network


@pytest.mark.slow
@pytest.mark.parametrize("variant",
                         [["--temporal", "lstm", "--disc", "video", "--ortho", "cosine"],
                          ["--temporal", "none", "--ortho", "none", "--freeze_pretrained"]])
def test_fctfg_ablation_flags_run(tmp_path, variant):
    ck = run("fctfg", tmp_path, 1, "--hyper_steps", "0", *variant)
    assert ck["cfg"]["temporal"] == variant[1]


def test_resume_equals_uninterrupted(tmp_path):
    full = run("stylegan2", tmp_path / "a", 4)
    run("stylegan2", tmp_path / "b", 2)
    resumed = run("stylegan2", tmp_path / "b", 4, "--resume")
    assert resumed["step"] == 4
    for name in ("g", "d", "g_ema"):
        assert_same_state(full[name], resumed[name])
    assert torch.equal(full["extra"]["pl_mean"], resumed["extra"]["pl_mean"])


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory):
    """A --data PATH folder made by data.prepare from procedural mp4s: 2 people x 2 clips of 24
    frames (faces pasted on grey frames, found by a grey-background detector)."""
    pytest.importorskip("av")
    import data
    import procedural
    d = tmp_path_factory.mktemp("prepared")
    for p in range(2):
        for c in range(2):
            motion, audio = procedural.make_motion(10 * p + c, 24)
            video = np.full((24, 96, 96, 3), 90, np.uint8)
            video[:, 16:80, 16:80] = procedural.render_clip(procedural.make_identity(p), motion, 64)
            (d / "src" / f"id{p:05d}" / "yt").mkdir(parents=True, exist_ok=True)
            media.write_video(d / "src" / f"id{p:05d}" / "yt" / f"{c:05d}.mp4", video, 25, audio)

    def grey(rgb):
        ys, xs = np.nonzero(np.abs(rgb.astype(int) - 90).max(-1) > 12)
        return [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)] if len(xs) else []

    assert data.prepare(d / "src", d / "dst", size=64, detector=grey, min_frames=16, min_face=16,
                        log=lambda *a: None) == (4, 0)
    return d / "dst"


def test_resume_on_real_data_equals_uninterrupted(tmp_path, prepared_folder):
    """Kill-and-resume on a prepared folder (--data PATH), FC-TFG with E_a and the temporal layers
    training and 2 prefetch threads: bit-identical weights. VideoFolderDataset draws each clip's
    window from (seed, clip), so ClipWindows' cache and the prefetching threads hold no state."""
    flags = ("--data", str(prepared_folder), "--clip_frames", "12", "--hyper_steps", "0",
             "--freeze_pretrained", "--drive_mouth", "own", "--workers", "2", "--batch", "2")
    full = run("fctfg", tmp_path / "a", 4, *flags)
    run("fctfg", tmp_path / "b", 2, *flags)
    resumed = run("fctfg", tmp_path / "b", 4, "--resume", *flags)
    for name in ("fctfg", "d"):
        assert_same_state(full[name], resumed[name])
    with pytest.raises(ValueError, match="procedural data only"):          # swap needs the renderer
        data.ClipWindows(data.make_clip_dataset(train.PRESETS["tiny"], str(prepared_folder)), 5,
                          source=True, drive_mouth="swap")


def test_resume_of_a_finished_stage_returns_before_building_its_data(tmp_path, monkeypatch, capsys):
    run("stylegan2", tmp_path, 2)
    def no_data(*a, **k):
        raise AssertionError("a finished stage built its dataset")
    monkeypatch.setattr(data, "make_clip_dataset", no_data)
    run("stylegan2", tmp_path, 2, "--resume")
    assert "nothing to do" in capsys.readouterr().out
    # a longer run does need the data
    with pytest.raises(AssertionError, match="built its dataset"):
        run("stylegan2", tmp_path, 3, "--resume")


def test_lr_factor_hand_values():
    f = train.lr_factor
    assert f(99, 100, 0) == 1.0                        # 0: constant lr
    assert f(59, 100, 40) == 1.0 and f(60, 100, 40) == 1.0  # ramp starts at max_steps - rampdown
    assert f(80, 100, 40) == pytest.approx(0.5)        # half-way down the half cosine
    assert f(90, 100, 40) == pytest.approx((1 + np.cos(np.pi * 0.75)) / 2)
    assert 0 < f(99, 100, 40) < 0.01                   # last step: almost 0


def test_lr_rampdown_sets_every_optimiser_and_extends_a_finished_run(tmp_path):
    """The ramp only touches the last steps, so a finished constant-lr run extended by --resume with
    a ramp equals a run that had the ramp from the start; the saved lr is base x
    factor(last step)."""
    ramp = ("--lr_rampdown", "2")
    full = run("stylegan2", tmp_path / "a", 4, *ramp)
    run("stylegan2", tmp_path / "b", 2)                   # constant lr, like a finished earlier run
    extended = run("stylegan2", tmp_path / "b", 4, "--resume", *ramp)
    for name in ("g", "d", "g_ema", "e_inv"):
        assert_same_state(full[name], extended[name])
    plain = run("stylegan2", tmp_path / "c", 4)
    assert not torch.equal(plain["g"]["style.1.weight"], full["g"]["style.1.weight"])
    for opt in ("opt_g", "opt_d", "opt_e"):
        for g in full[opt]["param_groups"]:
            assert g["lr"] == pytest.approx(g["base_lr"] * train.lr_factor(3, 4, 2))
    cfg = train.PRESETS["tiny"]
    assert full["opt_e"]["param_groups"][0]["base_lr"] == pytest.approx(cfg["lr_inversion"])


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(tmp_path):
    """A process killed with SIGTERM saves at the step it finished; resuming it reaches exactly the
    weights of an uninterrupted run of the same length."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "stylegan2", "--out",
           str(tmp_path / "k"), "--max_steps", "1000", *SMALL, "--ckpt_every", "1000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=tmp_path)
    for line in p.stdout:
        if line.startswith("step       2"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    assert p.wait(timeout=300) == 0, rest
    assert "exiting" in rest
    k = torch.load(tmp_path / "k" / "last.pt", weights_only=True)["step"]
    assert k >= 2
    resumed = run("stylegan2", tmp_path / "k", k + 1, "--resume")
    full = run("stylegan2", tmp_path / "full", k + 1)
    for name in ("g", "d", "g_ema"):
        assert_same_state(full[name], resumed[name])


def test_nan_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, capsys):
    rc = train.train(["--stage", "stylegan2", "--out", str(tmp_path), "--max_steps", "10", *SMALL,
                      "--inject_nan", "2"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 2" in err
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 2                            # saved after step 2 (index 1), before the NaN
    assert not list(tmp_path.glob("*.tmp"))


def test_clear_errors(tmp_path, capsys):
    assert train.train(["--stage", "stylegan2", "--data", str(tmp_path / "missing"), "--out",
                        str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has no"):
        train.train(["--stage", "fctfg", "--out", str(tmp_path / "x"), *SMALL, "--init",
                     str(_save(tmp_path / "sg.pt", {"stage": "stylegan2", "g_ema": {}}))])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable"):
        files.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(SystemExit):
        train.parse_args(["--no_such_option", "1"])
    # a stage-specific run flag given to a stage that never reads it: refused, not silently ignored
    with pytest.raises(SystemExit,
                       match=r"stylegan2 stage does not use --syncnet \(read by fctfg\)"):
        train.parse_args(["--stage", "stylegan2", "--syncnet", "e.pt"])
    with pytest.raises(SystemExit, match=r"--init \(read by inversion / fctfg\), --freeze_audio"):
        train.parse_args(["--stage", "syncnet", "--init", "x.pt", "--freeze_audio"])
    assert train.parse_args(["--stage", "inversion", "--init", "x.pt", "--vgg",
                             "v.pt"])[0].vgg == "v.pt"


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_batches_shards_partition_the_global_batch():
    ds = list(range(40))
    one = data.Batches(ds, 8, 0, 1, seed=3)
    two = [data.Batches(ds, 4, r, 2, seed=3) for r in range(2)]
    for k in range(4):
        assert sorted(one.indices(k)) == sorted(two[0].indices(k) + two[1].indices(k))
        assert not set(two[0].indices(k)) & set(two[1].indices(k))


def test_checkpoint_rng_roundtrip(tmp_path):
    state = train.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    files.save_checkpoint(tmp_path / "r.pt", {"rng": state})
    train.set_rng_state(files.load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def _torchrun(args, cwd, timeout=600):
    """2 ranks on gloo. One retry when a rank was killed by SIGABRT with nothing of ours in its
    output: gloo's C++ threads rarely abort a rank ("terminate called without an active exception";
    seen once in ~40 runs of the same command on 2 busy cores, not reproducible). A rank that fails
    by itself (an error, exit 3) or aborts twice still fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(29500 + (os.getpid() + 7 * attempt) % 1000),
                            *args],
                           capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
        if (r.returncode == 0 or "Signal 6 (SIGABRT)" not in r.stderr or "error:" in r.stderr
                or attempt):
            return r
        print(f"torchrun: a rank aborted (SIGABRT), retrying once:\n{r.stderr[-1500:]}")


@pytest.mark.slow
def test_torchrun_gradient_average_equals_full_batch(tmp_path):
    r = _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "res")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = [json.loads((tmp_path / f"res.{k}").read_text()) for k in range(2)]
    assert [x["world"] for x in res] == [2, 2]
    assert all(x["max_err"] < 1e-12 for x in res), res


@pytest.mark.slow
def test_torchrun_training_keeps_ranks_identical(tmp_path):
    r = _torchrun([str(ROOT / "train.py"), "--stage", "stylegan2", "--out", str(tmp_path / "ddp"),
                   "--max_steps", "2", *SMALL, "--batch", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "2 ranks hold identical parameters" in r.stdout
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ck["world"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 2


def test_gradient_accumulation_consumes_accum_micro_batches(tmp_path, monkeypatch):
    """--accum K draws K distinct micro-batches per optimiser step
    (indices step*K .. step*K+K-1)."""
    seen = []
    orig = data.Batches.get
    monkeypatch.setattr(data.Batches, "get", lambda self, k: seen.append(k) or orig(self, k))
    ck = run("stylegan2", tmp_path, 2, "--accum", "2", "--batch", "2")
    assert ck["step"] == 2 and seen == [0, 1, 2, 3]


def test_background_workers_give_the_same_training(tmp_path):
    """Prefetching batches in threads changes when data is made, not what is trained on."""
    a = run("stylegan2", tmp_path / "a", 2)
    b = run("stylegan2", tmp_path / "b", 2, "--workers", "2")
    for name in ("g", "d", "g_ema"):
        assert_same_state(a[name], b[name])


@pytest.mark.slow
def test_torchrun_fctfg_equals_single_process_with_the_same_global_batch(tmp_path):
    """End to end: 2 ranks x batch 2 == 1 process x batch 4. Holds where no layer couples the
    samples of a batch: the frozen networks (E_a too, --freeze_audio) are in eval mode (no batch
    statistics) and D's minibatch-stddev group is 1; the trained parts (E_can, E_m, temporal conv,
    D) see identical data (each rank's DistributedSampler shard of the step) and the all-reduce
    averages their gradients."""
    flags = ["--stage", "fctfg", "--max_steps", "2", *SMALL, "--freeze_pretrained",
             "--freeze_audio", "--mbstd_group", "1", "--hyper_steps", "0", "--ckpt_every", "2"]
    r = _torchrun([str(ROOT / "train.py"), *flags, "--batch", "2", "--out", str(tmp_path / "ddp")],
                  tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert train.train([*flags, "--batch", "4", "--out", str(tmp_path / "one")]) == 0
    # a wrong global batch
    assert train.train([*flags, "--batch", "2", "--out", str(tmp_path / "half")]) == 0
    load = lambda name: torch.load(tmp_path / name / "last.pt", weights_only=True)
    one = load("one")

    # fraction of trained weights more than half an Adam step (lr 1e-4) away from `one`
    def off(other):
        d = torch.cat([(one[n][k].double() - other[n][k].double()).abs().flatten()
                       for n in ("fctfg", "d")
                       for k in one[n] if one[n][k].is_floating_point()])
        return float((d > 0.5e-4).double().mean())

    # Adam moves a weight by ~lr per step whatever the size of its gradient, so float32 summation
    # order (1 vs 2 processes) flips the step of weights whose gradient is ~0: measured 1e-6 of the
    # weights. The control, the same two steps on half the global batch, moves 0.96 % of them: a
    # wrong batch shows ~10^4 times more.
    ddp, wrong = off(load("ddp")), off(load("half"))
    assert ddp < 1e-4 and wrong > 30 * max(ddp, 1e-6), (ddp, wrong)
    # E_a trainable (the paper's fine-tuned configuration): its BatchNorm statistics are per-rank on
    # gloo, so they are averaged after every step; the checkpoint's cross-rank check covers buffers
    # too and stops the run if they differ (it does without the averaging)
    live = [f for f in flags if f != "--freeze_audio"]
    r = _torchrun([str(ROOT / "train.py"), *live, "--batch", "2", "--out",
                   str(tmp_path / "ddp_ea")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks hold identical parameters and buffers" in r.stdout
    means = [v for k, v in load("ddp_ea")["fctfg"].items()
             if k.startswith("E_a.") and k.endswith("running_mean")]
    # E_a trained in train mode: statistics moved
    assert means and any(m.abs().sum() > 0 for m in means)
    # --accum 2 x batch 2: the same global batch, each G step redoing its micro-batch's forward
    assert train.train([*flags, "--batch", "2", "--accum", "2", "--out",
                        str(tmp_path / "accum")]) == 0
    assert off(load("accum")) < 1e-4, off(load("accum"))


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of train.py's command line has help text (issue 20)."""
    missing = [a.option_strings or a.dest
               for a in cli_actions(train.parse_args, ["--stage", "fctfg"]) if not a.help]
    assert not missing, missing


@pytest.mark.slow
def test_paper_preset_one_step_of_every_stage(tmp_path):
    """Issue 19: one step of each stage at the paper preset (256 px, 14 codes, every network at its
    published size), the smallest batch each allows, in a subprocess (FC-TFG fine-tunes ~600 M
    parameters: ~11 GiB peak on a CPU with --grad_ckpt 1, BENCHMARKS.md): the loss is finite, the
    checkpoint loads and holds the paper's networks, and the log line reports peak memory."""
    small = ["--device", "cpu", "--max_steps", "1", "--workers", "0", "--log_every", "1",
             "--sample_every", "0", "--ckpt_every", "1", "--n_identities", "2",
             "--clips_per_identity", "1", "--clip_frames", "8", "--frame_pool", "4"]
    stages = [("stylegan2", ["--batch", "2"]), ("syncnet", ["--batch", "2"]),
              ("inversion", ["--batch", "1", "--init", str(tmp_path / "stylegan2" / "last.pt")]),
              ("fctfg", ["--batch", "1", "--hyper_steps", "1", "--init",
                         str(tmp_path / "inversion" / "last.pt")])]
    for stage, extra in stages:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", stage,
                            "--preset", "paper", "--out", str(tmp_path / stage), *small, *extra],
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, (stage, r.stderr[-3000:])
        log = [json.loads(l) for l in (tmp_path / stage / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 1 and log[-1]["peak_mem_gb"] > 0
        assert all(np.isfinite(v) for k, v in log[-1].items()
                   if isinstance(v, float)), (stage, log[-1])
        # mmap: the checkpoints hold ~600 M parameters with their Adam moments; read only what is
        # checked
        ck = torch.load(tmp_path / stage / "last.pt", weights_only=True, mmap=True)
        assert ck["stage"] == stage and ck["step"] == 1 and ck["cfg"]["model"] == "paper"
        assert "memory estimate" in r.stdout, r.stdout[-2000:]
    assert ck["cfg"]["grad_ckpt"] == 1 and ck["fctfg"]["G.input.input"].shape == (1, 512, 4, 4)
    # HyperStyle's shared hypernet: one storage
    unique = {v.untyped_storage().data_ptr(): v.numel() for k, v in ck["fctfg"].items()
              if k.startswith(("G.", "E_inv.", "H.")) and v.is_floating_point()}
    # G 30.0 M + E_inv 209.5 M + H 313.0 M
    assert 550e6 < sum(unique.values()) < 560e6, sum(unique.values())


# --------------------------------------------------------------------------------------------------
# the judges stage: E_id (ArcFace margin loss) and φ (VGG19 layout + identity classifier) from
# identity labels
# --------------------------------------------------------------------------------------------------
def test_judges_stage_trains_both_judges_that_the_later_stages_load(tmp_path):
    import inversion
    import losses
    ck = run("judges", tmp_path / "j", 3, "--frame_pool", "16")
    assert ck["stage"] == "judges" and set(ck) >= {"e_id", "centres", "vgg", "vgg_head", "opt"}
    log = [json.loads(l) for l in (tmp_path / "j" / "log.jsonl").read_text().splitlines()]
    assert all(l["loss_arcface"] > 0 and l["loss_vgg"] > 0 for l in log)
    # one centre per training person (--n_identities 2)
    assert ck["centres"]["weight"].shape == (2, 64)
    e_id, vgg = inversion.load_arcface(tmp_path / "j" / "last.pt"), losses.load_vgg19(
        str(tmp_path / "j" / "last.pt"))
    assert not e_id.training and not any(p.requires_grad for p in e_id.parameters())
    assert vgg.features[0].out_channels == losses.PRESETS["tiny"]["vgg"]["base"]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert e_id(x).shape == (2, 64) and len(vgg(x)) == 5
    # the inversion and FC-TFG stages take them as --arcface / --vgg: L_id and Eq. (7) switch on
    args, cfg = train.parse_args(["--stage", "inversion",
                                  "--arcface", str(tmp_path / "j" / "last.pt"),
                                  "--vgg", str(tmp_path / "j" / "last.pt")])
    st = stages.InversionStage(cfg, torch.device("cpu"), args)
    assert st.e_id is not None and st.perceptual is not None
    # real clips have no procedural identities to label: one clear line
    with pytest.raises(ValueError, match="judges stage trains on procedural people"):
        data.IdentityFrames(data.VideoFolderDataset.__new__(data.VideoFolderDataset), 2)


def test_identity_frames_label_people_not_backdrops():
    ds = data.SyntheticTalkingFaces("train", n_identities=3, clips_per_identity=2, n_frames=4)
    frames = data.IdentityFrames(ds, 12, seed=5)
    assert [int(frames[j]["label"]) for j in range(6)] == [0, 1, 2, 0, 1, 2]
    corner = lambda j: frames[j]["image"][:, 1, 1]             # top-left pixel: always backdrop
    people = {int(frames[j]["label"]) for j in range(12)}
    # the backdrop is drawn from a random person, so one person is seen before different backdrops
    assert len({tuple(corner(j).tolist()) for j in range(0, 12, 3)}) > 1 and people == {0, 1, 2}


def test_relight_ranges_and_mirror():
    x = torch.rand(400, 3, 4, 4) * 2 - 1
    y = data.relight(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    # a grey image stays near grey (tint within 7 %), mid-grey moves by gain and gamma only within
    # their ranges
    g = data.relight(torch.zeros(400, 3, 2, 2), torch.Generator().manual_seed(1))  # 0.5 in [0, 1]
    v = (g + 1) / 2
    assert (v.min() >= 0.5 ** 1.25 * 0.7 * 0.93 - 1e-6
            and v.max() <= min(1, 0.5 ** 0.8 * 1.3 * 1.07) + 1e-6)
    ramp = torch.linspace(-1, 1, 4).view(1, 1, 1, 4).expand(400, 3, 4, 4)
    r = data.relight(ramp, torch.Generator().manual_seed(2))
    mirrored = r[:, 0, 0, 0] > r[:, 0, 0, 3]
    assert 0.4 < float(mirrored.float().mean()) < 0.6        # half of them mirrored
