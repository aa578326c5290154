"""Tests for infer.py (its decoder, writer and face tracker are media.py's, tested in test_data.py).
Oracles: one-shot FCTFG calls over the whole clip (streamed windows must give the same codes and
frames), audio.mel_windows, hand-listed index sequences and layer groups, decoded output files
(frame count, audio length, metadata), and the exit status / stderr / absence of files on bad
input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import audio
import data
import media
import procedural
import fusion
import infer

REPO = Path(__file__).resolve().parents[1]
S = 64            # tiny model size
T_DRIVE = 12      # frames of the procedural driving clip (shorter than the audio: exercises
                  # --extend)
K_AUDIO = 20      # output frames expected from the speech file


def _run(argv, capsys):
    rc = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Procedural test-split inputs written as real files: a 128 px source png, a 64 px driving mp4
    with its audio, a second driving mp4 without audio, and a speech wav of 20.3 frames."""
    d = tmp_path_factory.mktemp("infer_inputs")
    src, frames, wav = infer.procedural_inputs(S, T_DRIVE / data.FPS)
    Image.fromarray(src).save(d / "src.png")
    media.write_video(d / "drive.mp4", np.stack(list(frames)), data.FPS, wav)
    ident = procedural.make_identity(procedural.TEST_IDS[5])
    motion, speech = procedural.make_motion(procedural.TEST_IDS[5], K_AUDIO)
    media.write_video(d / "drive_silent.mp4", procedural.render_clip(ident, motion[:T_DRIVE], S),
                      data.FPS)
    # 20 frames + 200 samples
    media.write_wav(d / "speech.wav", np.concatenate([speech, speech[:200]]))
    return d


def _decode(path):
    import av
    frames, fps, wav, sr = media.read_video(path)
    with av.open(str(path)) as c:
        meta = dict(c.metadata)
    return frames, fps, wav, sr, meta


# --------------------------------------------------------------------------------------------------
# pure helpers against hand-derived values
# --------------------------------------------------------------------------------------------------
def test_driving_index_hand_values():
    seq = lambda T, mode, n: [infer.driving_index(k, T, mode) for k in range(n)]
    assert seq(3, "bounce", 9) == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert seq(3, "loop", 7) == [0, 1, 2, 0, 1, 2, 0]
    assert seq(3, "hold", 5) == [0, 1, 2, 2, 2]
    assert seq(1, "bounce", 3) == [0, 0, 0]
    assert seq(2, "bounce", 5) == [0, 1, 0, 1, 0]


def test_routing_groups_hand_values():
    paper = infer.routing_groups(256, fusion.paper_layers(256)[0])
    assert paper == dict(pose=(1, 2), expression=(3, 4, 7, 8), eyes=(9, 10))
    tiny = infer.routing_groups(64, fusion.PRESETS["tiny"]["layers"])
    assert tiny == dict(pose=(0, 1, 2), expression=(3, 4), eyes=(5, 6))
    # the groups partition the manipulated layers
    assert sorted(sum(paper.values(), ())) == sorted(fusion.paper_layers(256)[0])


def test_feather_mask_and_paste_back():
    m = infer.feather_mask(40, 0.2)
    assert m[20, 20] == 1 and m[0, 0] < 1e-3 and m[0, 20] < 0.05
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(m, m[::-1, ::-1])
    assert np.all(np.diff(m[20, :20]) >= 0)                 # rises monotonically towards the centre
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    face = np.full((8, 8, 3), 77, np.uint8)
    for box in [(10, 5, 50, 45), (-10, 20, 30, 60)]:        # inside; sticking out left and bottom
        out = infer.PasteBack(frame, box, 0.2)(face)
        inside = np.zeros(frame.shape[:2], bool)
        inside[max(box[1], 0):box[3], max(box[0], 0):box[2]] = True
        # nothing outside the box changes
        np.testing.assert_array_equal(out[~inside], frame[~inside])
        cy, cx = (box[1] + box[3]) // 2, (box[0] + box[2]) // 2
        assert np.all(out[cy, cx] == 77)                          # the centre is the face itself


def test_mark_touches_only_its_corner_and_fits():
    for H, W in [(64, 64), (128, 128), (480, 640)]:
        ov = infer.mark_overlay(H, W)
        y0, x0, rgb, alpha = ov
        assert y0 >= 0 and x0 >= 0 and y0 + alpha.shape[0] <= H and x0 + alpha.shape[1] <= W
        f = infer.apply_mark(np.zeros((H, W, 3), np.uint8), ov)
        changed = f.any(-1)
        assert changed[y0:, x0:].any() and not changed[:y0].any() and not changed[:, :x0].any()
        assert f.max() >= 200                                  # white text was drawn
        m = max(1, H // 64)                                    # anchored in the bottom-right corner
        assert y0 + alpha.shape[0] == H - m and x0 + alpha.shape[1] == W - m and y0 > H / 2


def test_load_image_handles_rgba_grey_16bit_palette_huge_odd(tmp_path):
    # right half transparent
    rgba = np.zeros((30, 41, 4), np.uint8); rgba[..., 0] = 255; rgba[:, :20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = infer.load_image(tmp_path / "a.png")
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8
    # composited over white
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 30]) == (255, 255, 255)
    Image.fromarray(np.full((21, 22), 90, np.uint8), "L").save(tmp_path / "g.png")
    assert np.all(infer.load_image(tmp_path / "g.png") == 90)
    Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 50).save(
        tmp_path / "i16.png")
    i16 = infer.load_image(tmp_path / "i16.png")
    assert i16.shape == (24, 24, 3) and i16.min() == 0 and i16.max() == 255
    Image.new("P", (10, 12), 3).save(tmp_path / "p.gif")
    assert infer.load_image(tmp_path / "p.gif").shape == (12, 10, 3)
    Image.new("RGB", (4001, 3000), (10, 200, 30)).save(tmp_path / "huge.jpg", quality=90)
    h = infer.load_image(tmp_path / "huge.jpg")
    assert max(h.shape[:2]) <= infer.MAX_SIDE and h.shape[0] % 2 == 0 and h.shape[1] % 2 == 0
    assert abs(h.shape[1] / h.shape[0] - 4001 / 3000) < 0.01


# --------------------------------------------------------------------------------------------------
# the streaming generator against one-shot FCTFG calls, and the routing
# --------------------------------------------------------------------------------------------------
def _random_model():
    """Tiny FCTFG whose zero-initialised parts (E_m's last layers, temporal conv = identity) are
    made random, so that motion codes and window borders actually matter."""
    torch.manual_seed(0)
    m = fusion.FCTFG("tiny").eval()
    with torch.no_grad():
        for mlp in m.fusion.E_m.mlps.values():
            torch.nn.init.normal_(mlp[-1].weight, std=0.05)
        m.fusion.temporal.conv.weight.add_(0.02 * torch.randn_like(m.fusion.temporal.conv.weight))
    m.fusion.temporal.window = 5
    return m


def _clip(ident_seed, motion_seed, T):
    motion, wav = procedural.make_motion(motion_seed, T)
    return procedural.render_clip(procedural.make_identity(ident_seed), motion, S), wav


def _drivers(model, clips, extend="bounce"):
    made = {}
    return {g: made.setdefault(id(c), infer.Driver(iter(c), lambda f: f, model.E_inv, extend,
                                                   infer.Timer(), infer.contextlib.nullcontext))
            for g, c in clips.items()}


def _collect(model, z_s, deltas, drivers, mel, K, batch=10, **kw):
    faces, codes = [], []
    for _, f, c in infer.animate(model, z_s, deltas, drivers, mel, K, data.FPS, batch, **kw):
        faces.append(f)
        codes.append(c)
    cat = {k: torch.cat([c[k] for c in codes], 1) for k in codes[0]}
    return np.concatenate(faces), cat


@pytest.mark.parametrize("continuous", [True, False])
def test_streamed_windows_equal_one_shot_forward(continuous):
    """13 frames in batches of 10 (two windows of 5, then 3) == FCTFG on the whole clip: fused as
    ONE window (continuous: every batch carries its neighbours, so no border is visible) or as
    windows of 5 (the paper's non-overlapping windows, Sec. 4.4.2)."""
    model = _random_model()
    frames, wav = _clip(procedural.TEST_IDS[1], 7, 13)
    x_s = infer.to_tensor(frames[:1], "cpu")
    mel = audio.melspectrogram(wav)
    with torch.no_grad():
        z_s, deltas = model.encode_source(x_s, 2)
        assert any(d is not None for d in deltas)
        drivers = _drivers(model, dict(pose=frames, expression=frames, eyes=frames))
        faces, codes = _collect(model, z_s, deltas, drivers, mel, 13, continuous=continuous)
        # one call on the whole clip
        x_a = torch.from_numpy(audio.mel_windows(mel, 13, data.FPS))[None]
        z_d = model.E_inv(infer.to_tensor(frames, "cpu"))[None]
        with model.fusion.temporal.one_window(continuous):
            ref = model.decode(z_s, deltas, z_d, x_a)
        z_a, x_g = ref["z_a"], ref["x_g"][0]
    torch.testing.assert_close(codes["z_d"], z_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codes["z_a"], z_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codes["z_sd"], ref["z_sd"], atol=1e-5, rtol=1e-5)
    assert (codes["z_cd"].abs() > 1e-3).any()  # motion codes are not all zero
    # state across batches
    diff = np.abs(faces.astype(int) - infer.to_uint8(fusion.Deflicker()(x_g)).astype(int))
    assert faces.shape == (13, S, S, 3) and diff.max() <= 1


def test_changing_only_the_eyes_source_changes_only_eye_layers():
    model = _random_model()
    a, wav = _clip(procedural.TEST_IDS[1], 11, 10)
    b, _ = _clip(procedural.TEST_IDS[2], 12, 10)
    mel = audio.melspectrogram(wav)
    groups = infer.routing_groups(S, model.fusion.layers)
    eyes = list(groups["eyes"])
    rest = [l for l in range(model.G.n_latent) if l not in eyes]
    with torch.no_grad():
        z_s, deltas = model.encode_source(infer.to_tensor(a[:1], "cpu"), 0)
        f1, c1 = _collect(model, z_s, deltas, _drivers(model, dict(pose=a, expression=a, eyes=a)),
                          mel, 10)
        f2, c2 = _collect(model, z_s, deltas, _drivers(model, dict(pose=a, expression=a, eyes=b)),
                          mel, 10)
        f3, c3 = _collect(model, z_s, deltas, _drivers(model, dict(pose=b, expression=b, eyes=b)),
                          mel, 10)
    for k in ("z_d", "z_cd", "z_sd"):
        # untouched by the eyes video
        assert torch.equal(c1[k][:, :, rest], c2[k][:, :, rest]), k
        # (rest: exactly equal)
        assert (c1[k][:, :, eyes] - c2[k][:, :, eyes]).abs().max() > 1e-5, k
        # = what video b alone gives there
        torch.testing.assert_close(c2[k][:, :, eyes], c3[k][:, :, eyes])
    assert not np.array_equal(f1, f2)


def test_driver_extends_short_clip_by_bounce_hold_loop():
    model = _random_model()
    a, _ = _clip(procedural.TEST_IDS[1], 3, 4)
    with torch.no_grad():
        ref = model.E_inv(infer.to_tensor(a, "cpu"))
        for mode in infer.EXTEND_MODES:
            d = infer.Driver(iter(a), lambda f: f, model.E_inv, mode, infer.Timer(),
                             infer.contextlib.nullcontext)
            got = torch.cat([d.codes(list(range(k0, k0 + 3))) for k0 in range(0, 9, 3)])
            idx = [infer.driving_index(k, 4, mode) for k in range(9)]
            torch.testing.assert_close(got, ref[idx], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# the command line end to end
# --------------------------------------------------------------------------------------------------
def test_cli_end_to_end_procedural_files(files, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    rc, so, err = _run(["--source", files / "src.png", "--driving", files / "drive.mp4", "--audio",
                        files / "speech.wav", "--out", out, "--no-detect", "--batch", "10"], capsys)
    assert rc == 0, err
    assert "UNTRAINED" in so or "weights from" in so
    assert "fps" in err and "ETA" in err and f"{K_AUDIO}/{K_AUDIO}" in err     # progress line
    frames, fps, wav, sr, meta = _decode(out)
    assert fps == 25 and len(frames) == K_AUDIO                       # = audio s x fps (rounded)
    assert frames.shape[1:] == (128, 128, 3)                          # pasted into the source frame
    # AAC tail < 1 frame
    assert sr == data.SR and K_AUDIO * data.SPF <= len(wav) < K_AUDIO * data.SPF + 1024
    assert meta["comment"] == infer.METADATA["comment"]
    # --no-mark: same video except the corner; metadata kept
    out2 = tmp_path / "o2.mp4"
    assert _run(["--source", files / "src.png", "--driving", files / "drive.mp4", "--audio",
                 files / "speech.wav", "--out", out2, "--no-detect", "--no-mark", "--quiet"],
                capsys)[0] == 0
    frames2, _, _, _, meta2 = _decode(out2)
    assert meta2["comment"] == infer.METADATA["comment"]
    y0, x0, _, _ = infer.mark_overlay(128, 128)
    d = np.abs(frames.astype(int) - frames2.astype(int))
    assert d[:, y0:, x0:].mean() > 10 * max(d[:, : y0 - 16, : x0 - 16].mean(), 0.1)
    assert sorted(os.listdir(tmp_path)) == ["o.mp4", "o2.mp4"]                   # no temporary left


def test_contact_sheet_and_procedural_checkpoint_note(files, tmp_path, capsys):
    """--sheet: driving crops over generated faces at --sheet-frames frames (cells enlarged to
    128 px); a checkpoint whose run says it was trained on procedural data warns when given real
    files."""
    torch.manual_seed(0)
    model = fusion.FCTFG("tiny")
    cfg = dict(model="tiny", temporal="conv", window=5, canonical="plain", hyper_steps=0,
               layers="0,1,2,3,4,5,6", audio_layers="0,1,2,3,4,5,6")
    torch.save({"stage": "fctfg", "step": 1, "cfg": cfg, "run": {"data": "synthetic"},
                "fctfg": model.state_dict()}, tmp_path / "proc.pt")
    rc, so, err = _run(["--source", files / "src.png", "--driving", files / "drive.mp4",
                        "--no-detect", "--quiet",
                        "--checkpoint", tmp_path / "proc.pt", "--out", tmp_path / "o.mp4",
                        "--sheet", tmp_path / "s.png", "--sheet-frames", "4"], capsys)
    assert rc == 0, err
    assert "trained on procedural cartoon faces only" in err and "contact sheet, 4 frames" in so
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    assert sheet.shape == (2 * (128 + 14) + 4, 5 * (128 + 4) + 4, 3)
    # row 2, column 1 is the source (enlarged 2x nearest); row 1, column 1 stays blank
    src = np.asarray(Image.open(files / "src.png").resize((64, 64), Image.LANCZOS))
    cell = lambda r, c: sheet[r * 142 + 14: r * 142 + 142, 4 + c * 132: 4 + c * 132 + 128]
    assert (cell(0, 0) == 255).all() and np.abs(cell(1, 0)[::2, ::2].astype(int) - src).mean() < 3
    # the driving crops of the first and last sheet frame are the first and last frames of the clip
    first = media.read_video(files / "drive.mp4")[0][0]
    assert np.abs(cell(0, 1)[::2, ::2].astype(int) - first).mean() < 1e-9
    # a still image as --driving: used as a one-frame video, and said so
    rc, so, err = _run(["--source", files / "src.png", "--driving", files / "src.png",
                        "--audio", files / "speech.wav",
                        "--no-detect", "--quiet", "--out", tmp_path / "still.mp4"], capsys)
    assert rc == 0 and "is a still image: it is used as a one-frame video" in err
    assert len(media.read_video(tmp_path / "still.mp4")[0]) == K_AUDIO
    # the procedural default (no files) does not warn
    rc, so, err = _run(["--checkpoint", tmp_path / "proc.pt", "--out", tmp_path / "d.mp4",
                        "--seconds", "0.4", "--quiet"], capsys)
    assert rc == 0 and "procedural faces only" not in err


def test_cli_driving_audio_canonical_bf16_odd_la_source(files, tmp_path, capsys):
    la = np.zeros((97, 131, 2), np.uint8); la[..., 0] = 120; la[..., 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = tmp_path / "c.mp4"
    rc, _, err = _run(["--source", tmp_path / "la.png", "--driving", files / "drive.mp4",
                       "--out", out, "--no-detect", "--canonical", "--bf16", "--extend", "hold",
                       "--quiet"], capsys)
    assert rc == 0, err
    frames, fps, wav, _, _ = _decode(out)
    assert len(frames) == T_DRIVE and frames.shape[1:] == (S, S, 3)  # audio from the driving video
    out = tmp_path / "p.mp4"
    assert _run(["--source", tmp_path / "la.png", "--driving", files / "drive.mp4", "--audio",
                 files / "speech.wav", "--out", out, "--no-detect", "--quiet",
                 "--hyper-steps", "0"], capsys)[0] == 0
    frames, _, _, _, _ = _decode(out)
    assert frames.shape == (K_AUDIO, 96, 130, 3)                    # odd LA image -> even RGB frame


def test_cli_detects_real_face_and_routes_files(tmp_path, capsys, files):
    pytest.importorskip("dlib")
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()                                             # a real face, 512 px
    Image.fromarray(img).save(tmp_path / "face.jpg")
    shifted = np.stack([np.roll(img, (2 * k, 3 * k), (0, 1)) for k in range(8)])
    media.write_video(tmp_path / "drive.mp4", shifted, data.FPS)
    out = tmp_path / "o.mp4"
    rc, _, err = _run(["--source", tmp_path / "face.jpg", "--driving", tmp_path / "drive.mp4",
                       "--audio", files / "speech.wav", "--eyes-from", files / "drive_silent.mp4",
                       "--out", out, "--quiet", "--hyper-steps", "0"], capsys)
    # the eyes video is a cartoon dlib cannot see: the message names that input and a frame
    assert (rc == 2 and "no face found in --eyes-from" in err and "frame 0" in err
            and not out.exists())
    rc, _, err = _run(["--source", tmp_path / "face.jpg", "--driving", tmp_path / "drive.mp4",
                       "--audio", files / "speech.wav", "--out", out, "--quiet",
                       "--hyper-steps", "0"], capsys)
    assert rc == 0, err
    frames, _, _, _, _ = _decode(out)
    assert frames.shape == (K_AUDIO, 512, 512, 3)
    # background kept (paste)
    assert np.abs(frames[:, :40, :40].astype(int) - img[:40, :40]).mean() < 4


# --------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status != 0, nothing written
# --------------------------------------------------------------------------------------------------
def _bad_files(d, files):
    (d / "text.jpg").write_text("not an image")
    (d / "empty.mp4").write_bytes(b"")
    (d / "noise.wav").write_bytes(os.urandom(3000))
    import av
    # an mp4 with sound, no picture
    with av.open(str(d / "audio_only.mp4"), "w", format="mp4") as c:
        st = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt",
                                           layout="mono")
            f.sample_rate, f.pts = 16000, 1024 * i
            c.mux(st.encode(f))
        c.mux(st.encode(None))
    torch.save({"stage": "stylegan2", "cfg": {"model": "tiny"}, "G": {}}, d / "g.pt")
    (d / "junk.pt").write_bytes(b"junk")
    bad = np.zeros(16000, np.float32)
    bad[100], bad[200] = np.nan, np.inf
    import soundfile
    soundfile.write(d / "nan.wav", bad, 16000, subtype="FLOAT")  # float wav holding NaN/Inf
    src, drv = files / "src.png", files / "drive.mp4"
    return [  # (argv, expected message part)
        (["--source", d / "nope.jpg", "--driving", drv], "--source: file not found"),
        (["--source", d / "text.jpg", "--driving", drv], "cannot read image"),
        (["--source", src, "--driving", d / "audio_only.mp4"], "has no video stream"),
        (["--source", src, "--driving", d / "empty.mp4"], "cannot decode video"),
        (["--source", src, "--driving", drv, "--audio", d / "noise.wav"], "audio"),
        (["--source", src, "--driving", files / "drive_silent.mp4"], "no audio"),
        (["--source", src, "--driving", drv, "--checkpoint", d / "g.pt"],
         "not an FC-TFG checkpoint"),
        (["--source", src, "--driving", drv, "--checkpoint", d / "junk.pt"],
         "not a loadable checkpoint"),
        (["--source", src, "--driving", drv, "--checkpoint", d / "none.pt"],
         "--checkpoint: file not found"),
        (["--source", src, "--driving", drv, "--pose-from", d / "none.mp4"],
         "--pose-from: file not found"),
        (["--source", src, "--driving", drv, "--out", d], "is a folder"),
        (["--source", src, "--fps", "30"], "--fps resamples a driving video"),
        (["--source", src, "--driving", drv, "--sheet", d / "missing" / "s.png"], "--sheet"),
        (["--source", src, "--driving", drv, "--audio", d / "nan.wav"], "NaN or Inf"),
        (["--source", src, "--driving", drv, "--sheet", d / "s.png", "--sheet-frames", "0"],
         "--sheet-frames"),
        (["--source", src, "--driving", drv, "--sheet-frames", "4"],
         "--sheet-frames has no effect without --sheet"),
        (["--source", src, "--driving", drv, "--checkpoint", d / "g.pt", "--preset", "paper"],
         "--preset has no effect"),
    ]


def test_bad_inputs_fail_cleanly(files, tmp_path, capsys):
    cases = _bad_files(tmp_path, files)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv, msg in cases:
        rc, _, err = _run(["--out", out_dir / "o.mp4"] + argv + ["--no-detect", "--quiet"], capsys)
        assert rc != 0, (argv, err)
        assert msg in err, (msg, err)
        assert err.strip().count("\n") == 0 and err.startswith("error:"), err
        assert os.listdir(out_dir) == [], (argv, os.listdir(out_dir))
    rc, _, err = _run(["--out", tmp_path / "missing" / "o.mp4"], capsys)
    assert rc != 0 and "folder does not exist" in err and not (tmp_path / "missing").exists()


def test_no_face_in_source(files, tmp_path, capsys):
    pytest.importorskip("dlib")
    # a flat grey picture: no detector finds a face in it (procedural faces are now big enough that
    # dlib sometimes does, so they cannot serve as the face-less input)
    blank = files.parent / "blank_src.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(blank)
    rc, _, err = _run(["--source", blank, "--driving", files / "drive.mp4", "--out",
                       tmp_path / "o.mp4", "--quiet"], capsys)
    assert rc == 2 and "no face found in --source" in err and "frame 0" in err
    assert os.listdir(tmp_path) == []


def test_bench_reports_breakdown(capsys):
    st = infer.bench(seconds=0.4)
    assert st["frames"] == 10 and st["e2e_fps"] > 0
    assert {"decode", "encode", "generate", "write"} <= set(st["stages"])
    assert "fps end to end" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# real processes: `python infer.py` from a clean folder, and a bad input's exit status
# --------------------------------------------------------------------------------------------------
def test_default_run_in_clean_folder(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "infer.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # says which weights it used
    assert ("UNTRAINED" in r.stdout) != (infer.DEFAULT_CHECKPOINT.is_file())
    assert f"wrote {tmp_path / 'out.mp4'}" in r.stdout
    frames, fps, wav, _, meta = _decode(tmp_path / "out.mp4")
    # procedural.demo_motion, 6 s
    assert len(frames) == 150 and fps == 25 and meta["comment"].startswith("synthetic")
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--source", "missing.png"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (r.returncode == 2
            and r.stderr.strip() == "error: --source: file not found: missing.png")
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of infer.py's command line has help text (issue 20)."""
    missing = [a.option_strings or a.dest for a in cli_actions(infer.parse_args, []) if not a.help]
    assert not missing, missing
