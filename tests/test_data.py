"""Tests for data.py: the procedural set is checked against geometry and physics it must obey
(regions a motion parameter may touch, hand-derived pixel positions, formant peaks, energy/mouth
coupling), I/O by round trips, preparation on a generated video with a known face position."""
import json
import os

import numpy as np
import pytest
import torch

import data
import procedural

K = {k: i for i, k in enumerate(procedural.MOTION_KEYS)}
SIZE = 64


def _changed(a, b, thr=3):
    """Pixels whose colour differs by more than thr in any channel.  -> bool [H, W]."""
    return (np.abs(a.astype(int) - b.astype(int)) > thr).any(-1)


def _px_per_unit(ident):
    """Pixels per face-space unit of u near the face centre at yaw 0: u * a half-images."""
    return ident.head[0] * SIZE / 2


# ---------------------------------------------------------------------------------------------------
# determinism, seeds, splits
# ---------------------------------------------------------------------------------------------------
def test_identity_and_motion_are_deterministic_and_seed_dependent():
    assert procedural.make_identity(7) == procedural.make_identity(7)
    assert procedural.make_identity(7) != procedural.make_identity(8)
    m1, a1 = procedural.make_motion(3, 20)
    m2, a2 = procedural.make_motion(3, 20)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(a1, a2)
    m3, a3 = procedural.make_motion(4, 20)
    assert not np.allclose(m1, m3) and not np.allclose(a1, a3)
    ident = procedural.make_identity(7)
    np.testing.assert_array_equal(procedural.render(ident, m1[5]), procedural.render(ident, m2[5]))


def test_train_and_test_splits_are_disjoint():
    assert set(procedural.TRAIN_IDS).isdisjoint(procedural.TEST_IDS)
    tr = data.SyntheticTalkingFaces("train", n_identities=5, clips_per_identity=3, n_frames=4)
    te = data.SyntheticTalkingFaces("test", n_identities=5, clips_per_identity=3, n_frames=4)
    assert set(tr.identity_seeds).isdisjoint(te.identity_seeds)
    assert {tr.motion_seed(i) for i in range(len(tr))}.isdisjoint({te.motion_seed(i) for i in range(len(te))})
    assert tr.identity(0) != te.identity(0)
    assert [tr.identity(i).seed for i in range(6)] == [0, 0, 0, 1, 1, 1]  # clips_per_identity grouping


# ---------------------------------------------------------------------------------------------------
# motion parameters change the right pixels (geometric checks independent of the masks)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3, 11, 20])
def test_blink_touches_only_its_own_eye_and_closes_it(seed):
    ident = procedural.make_identity(seed)
    for key, sign in (("blink_l", -1), ("blink_r", 1)):
        for pose in ({}, {"yaw": 0.25, "pitch": -0.1}):
            img0 = procedural.render(ident, pose, SIZE)
            img1 = procedural.render(ident, {**pose, key: 1.0}, SIZE)
            ch = _changed(img0, img1)
            rows, cols = np.nonzero(ch)
            assert len(rows) >= 4, "a blink must change some pixels"
            xy, vis = procedural.landmarks(ident, pose, SIZE)
            ex, ey = xy[procedural.LANDMARK_NAMES.index("eye_" + key[-1])]
            half_w = ident.eye_rx * _px_per_unit(ident) + 1.5   # eye half-width in px + AA margin
            half_h = ident.eye_ry * ident.head[1] * SIZE / 2 + 1.5
            assert np.all(np.abs(cols + 0.5 - ex) <= half_w), "blink changed pixels outside the eye"
            assert np.all(np.abs(rows + 0.5 - ey) <= half_h), "blink changed pixels outside the eye"
            if not pose:  # frontal: the eye is on its own half of the image, above the nose
                assert np.all(np.sign(cols + 0.5 - SIZE / 2) == sign)
                assert rows.max() < xy[procedural.LANDMARK_NAMES.index("nose"), 1]
    # closed eye: no white sclera pixels left in the box of either eye
    shut = procedural.render(ident, {"blink_l": 1, "blink_r": 1}, SIZE, ss=4)
    open_ = procedural.render(ident, {}, SIZE, ss=4)
    xy, _ = procedural.landmarks(ident, {}, SIZE)
    for name in ("eye_l", "eye_r"):
        x, y = xy[procedural.LANDMARK_NAMES.index(name)].astype(int)
        white = lambda im: (im[y - 2:y + 3, x - 3:x + 4].min(-1) > 170).sum()
        assert white(open_) > 0 and white(shut) == 0


@pytest.mark.parametrize("seed", [1, 4, 9])
def test_mouth_opening_touches_only_the_mouth_and_is_monotone(seed):
    ident = procedural.make_identity(seed)
    base = procedural.render(ident, {}, SIZE)
    xy, _ = procedural.landmarks(ident, {}, SIZE)
    nose_row = xy[procedural.LANDMARK_NAMES.index("nose")][1]
    dark = []
    for op in (0.0, 0.3, 0.6, 1.0):
        img, masks = procedural.render(ident, {"mouth_open": op}, SIZE, return_masks=True)
        rows, cols = np.nonzero(_changed(base, img))
        if op > 0:
            assert len(rows) > 0
            assert rows.min() > nose_row, "mouth opening changed pixels above the nose"
            # hand-derived band at yaw 0: face-space v maps to image y = HEAD_Y + v b (orthographic);
            # the lips span mouth_y - JAW_DROP op -/+ (LIP_H + OPEN_LIP_H op) (the jaw drops as it opens)
            o = np.sqrt(op)  # rendered opening
            v_lo = ident.mouth_y - procedural.JAW_DROP * o - (procedural.LIP_H + procedural.OPEN_LIP_H * o)
            v_hi = ident.mouth_y + procedural.LIP_H
            row = lambda vv: (1 - procedural.HEAD_Y - vv * ident.head[1]) * SIZE / 2
            assert rows.min() + 1.5 >= row(v_hi) and rows.max() + 0.5 <= row(v_lo) + 1.5
            # half-width of the widest lips (mouth_width 0) in px, plus an anti-aliasing margin
            assert np.all(np.abs(cols + 0.5 - SIZE / 2) <= ident.mouth_w * _px_per_unit(ident) + 1.5)
        dark.append(int((img[masks["mouth"]].max(-1) < 70).sum()))  # inner mouth is near black
    assert dark == sorted(dark) and dark[-1] > dark[0]


def test_mouth_width_and_gaze_and_brow_stay_in_their_regions():
    ident = procedural.make_identity(2)
    base = procedural.render(ident, {}, SIZE)
    xy, _ = procedural.landmarks(ident, {}, SIZE)
    eye_rows = xy[:2, 1]
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"gaze_x": 1.0, "gaze_y": -1.0}, SIZE)))
    assert len(rows) and np.all(np.abs(rows + 0.5 - eye_rows.mean()) < ident.eye_ry * ident.head[1] * SIZE / 2 + 1.5)
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"brow": 1.0}, SIZE)))
    assert len(rows) and rows.max() < eye_rows.mean()                      # brows are above the eyes
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"mouth_width": 1.0, "mouth_open": 0.2}, SIZE)))
    assert len(rows) and rows.min() > xy[procedural.LANDMARK_NAMES.index("nose"), 1]


@pytest.mark.parametrize("seed", [0, 5, 12])
def test_pose_geometry_is_identity_independent(seed):
    """Roll and translation measured on rendered masks equal the motion values for every identity."""
    ident = procedural.make_identity(seed)
    roll, tx, ty = 0.2, 0.1, -0.06   # small shifts: the face-filling head must stay inside the frame
    _, m0 = procedural.render(ident, {}, SIZE, ss=4, return_masks=True)
    _, m1 = procedural.render(ident, {"roll": roll, "tx": tx, "ty": ty}, SIZE, ss=4, return_masks=True)
    cen = lambda mk: np.array([np.nonzero(mk)[1].mean() + 0.5, np.nonzero(mk)[0].mean() + 0.5])
    # hand-derived: the head centre sits at (tx, ty + HEAD_Y) half-image units, y up
    expect = np.array([(1 + tx) * SIZE / 2, (1 - ty - procedural.HEAD_Y) * SIZE / 2])
    np.testing.assert_allclose(cen(m1["head"]), expect, atol=0.3)
    np.testing.assert_allclose(cen(m0["head"]), [SIZE / 2, (1 - procedural.HEAD_Y) * SIZE / 2], atol=0.3)
    el, er = cen(m1["eye_l"]), cen(m1["eye_r"])
    angle = np.arctan2(-(er[1] - el[1]), er[0] - el[0])  # image y is down; roll is counter-clockwise
    assert abs(angle - roll) < np.deg2rad(2)


def test_motion_leaves_identity_appearance_alone():
    ident = procedural.make_identity(6)
    motion, _ = procedural.make_motion(1, 12)
    frames = procedural.render_clip(ident, motion, SIZE)
    corner = frames[:, :6, :6]                                  # static background far from the head
    assert np.all(corner == corner[:1])
    other = procedural.render(procedural.make_identity(16), motion[0], SIZE)
    assert np.abs(other[:6, :6].astype(int) - corner[0]).max() > 10


def test_landmarks_land_in_the_raycast_masks():
    """landmarks() forward-projects; render() ray-casts: two code paths that must agree."""
    for seed, pose in [(0, {}), (3, {"yaw": 0.3, "pitch": 0.15, "roll": -0.1}), (8, {"yaw": -0.3, "tx": 0.05})]:
        ident = procedural.make_identity(seed)
        _, masks = procedural.render(ident, pose, 128, return_masks=True)
        xy, vis = procedural.landmarks(ident, pose, 128)
        for name in ("eye_l", "eye_r"):
            x, y = xy[procedural.LANDMARK_NAMES.index(name)].astype(int)
            assert masks[name][y, x]
        x, y = xy[procedural.LANDMARK_NAMES.index("mouth_top")].astype(int)
        assert masks["mouth"][y, x]
        assert vis.all()


def test_cross_identity_ground_truth():
    ds = data.SyntheticTalkingFaces("test", n_identities=3, clips_per_identity=2, n_frames=6)
    s = ds.cross(0, 5)  # identity of clip 0, motion and audio of clip 5
    motion, audio = procedural.make_motion(ds.motion_seed(5), 6)
    gt = procedural.render_clip(ds.identity(0), motion, SIZE)
    np.testing.assert_array_equal(((s["frames"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), gt)
    np.testing.assert_array_equal(s["audio"].numpy(), audio)
    d = ds[5]
    torch.testing.assert_close(s["motion"], d["motion"])
    torch.testing.assert_close(s["mel"], d["mel"])
    assert s["identity"] == 0 and d["identity"] == 2 and s["identity_seed"] != d["identity_seed"]


# ---------------------------------------------------------------------------------------------------
# the speech track: audio and mouth from one source
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audio_energy_follows_mouth_opening(seed):
    T = 150
    motion, audio = procedural.make_motion(seed, T)
    rms = np.sqrt((audio.reshape(T, data.SPF).astype(np.float64) ** 2).mean(1))
    op = motion[:, K["mouth_open"]]
    assert np.corrcoef(rms, op)[0, 1] > 0.75
    r_rank = np.argsort(np.argsort(rms)); o_rank = np.argsort(np.argsort(op))
    assert np.corrcoef(r_rank, o_rank)[0, 1] > 0.85         # Spearman: monotone relation
    assert np.median(rms[op == 0]) < 0.1 * np.median(rms[op > 0.3])
    assert (op == 0).sum() > 5 and (op > 0.3).sum() > 5     # both silences and open vowels occur
    # no audio/video offset: energy and opening line up best at lag 0 (a SyncNet would find offset 0)
    z = lambda x: (x - x.mean()) / x.std()
    lags = range(-4, 5)
    score = [np.mean(z(rms)[max(0, L):T + min(0, L)] * z(op)[max(0, -L):T - max(0, L)]) for L in lags]
    assert lags[int(np.argmax(score))] == 0, score


def test_mouth_from_track_hand_values():
    """open = env (0.1 + 0.9 (F1 - F1min)/(F1max - F1min)); width from F2; monotone in env."""
    t = np.arange(0, 1.05, 0.005)
    F = np.tile([730.0, 2290.0, 2440, 3300, 3750], (len(t), 1))  # /a/'s F1, /i/'s F2 (male table)
    track = dict(t=t, env=t.copy(), F=F, f1_range=(270, 730), f2_range=(840, 2290))
    op, wd = procedural.mouth_from_track(track, 25)
    tc = (np.arange(25) + 0.5) / 25
    np.testing.assert_allclose(op, tc * 1.0, rtol=1e-5)            # F1 = F1max -> factor 1
    np.testing.assert_allclose(wd, tc * 1.0, rtol=1e-5)            # F2 = F2max -> +1 (spread)
    assert np.all(np.diff(op) > 0)


@pytest.mark.parametrize("vowel", ["a", "i", "u"])
def test_audio_spectrum_peaks_at_the_vowel_formant(vowel):
    """Physics check: the strongest harmonic below 1.2 kHz sits next to F1 of the vowel spoken."""
    F1, F2, F3 = procedural.VOWELS["male"][vowel]
    n = 200
    t = np.arange(n) / procedural.CTRL_RATE
    track = dict(t=t, env=np.ones(n), F=np.tile([F1, F2, F3, 3300, 3750], (n, 1)).astype(float),
                 f0=np.full(n, 100.0), burst=np.zeros(n), f1_range=(270, 730))
    x = procedural.synth_audio(track, 25)[4000:12000].astype(np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / data.SR)
    band = (freqs > 150) & (freqs < 1200)
    peak = freqs[band][np.argmax(spec[band])]
    assert abs(peak - F1) <= 100, (peak, F1)                        # within one harmonic (f0 = 100 Hz)


def test_sample_format_and_alignment():
    import audio
    ds = data.SyntheticTalkingFaces("train", n_identities=2, clips_per_identity=2, n_frames=10, size=32)
    s = ds[3]
    assert s["frames"].shape == (10, 3, 32, 32) and s["frames"].dtype == torch.float32
    assert -1 <= s["frames"].min() and s["frames"].max() <= 1
    assert s["audio"].shape == (10 * 640,) and s["audio"].dtype == torch.float32
    assert s["mel"].shape == (10, 1, 80, 16) and s["motion"].shape == (10, 12)
    assert s["identity"] == 1 and s["motion_seed"] == 3
    # frame k's window starts at mel column floor(3.2 k), i.e. at audio sample 200 floor(3.2 k)
    full = audio.melspectrogram(s["audio"].numpy())
    np.testing.assert_array_equal(s["mel"][3, 0].numpy(), full[:, 9:25])
    ref = data.split_reference(s)
    assert torch.equal(ref["x_s"], s["frames"][0]) and ref["x_a"] is s["mel"]


def test_bad_inputs_raise_clear_errors():
    ident = procedural.make_identity(0)
    with pytest.raises(ValueError, match="unknown motion keys"):
        procedural.render(ident, {"smile": 1})
    with pytest.raises(ValueError, match="vector of 12"):
        procedural.render(ident, np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        procedural.render(ident, np.full(12, np.nan))
    with pytest.raises(ValueError, match="size"):
        procedural.render(ident, {}, size=4)
    with pytest.raises(ValueError, match="identity seed"):
        procedural.make_identity(-1)
    with pytest.raises(ValueError, match="n_frames"):
        procedural.make_motion(0, 0)
    with pytest.raises(ValueError, match="split"):
        data.SyntheticTalkingFaces("val")
    with pytest.raises(IndexError):
        data.SyntheticTalkingFaces("train", 1, 1, 2)[1]
    with pytest.raises(ValueError, match=r"\[T, 12\]"):
        procedural.render_clip(ident, np.zeros((3, 4)))


def test_bench_render_reports_speed(capsys):
    fps = procedural.bench_render(sizes=(32,), n=2)
    assert fps[32] > 0 and "frames/s" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# real-data helpers
# ---------------------------------------------------------------------------------------------------
def test_nearest_frame_indices_matches_naive_loop():
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.02, 0.05, 90)) - 0.02       # jittered VFR clock starting near 0
    times -= times[0]
    idx = data.nearest_frame_indices(times, 25, times[-1] + 0.033)
    naive = [int(np.argmin(np.abs(times - k / 25))) for k in range(int((times[-1] + 0.033) * 25))]
    assert idx.tolist() == naive


def test_fomm_enlarge_and_iou_hand_values():
    # w=100, h=50: wi = max(.1, (60-100)/200) = .1, hi = max(.1, (120-50)/100) = .7
    assert data.fomm_enlarge((0, 0, 100, 50)) == pytest.approx((-10, -35, 110, 85))
    assert data.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    with pytest.raises(ValueError):
        data.fomm_enlarge((5, 5, 5, 9))


def test_crop_square_shift_pad_and_strict():
    fr = np.arange(2 * 40 * 60 * 3, dtype=np.uint8).reshape(2, 40, 60, 3)
    out, box, padded = data.crop_square(fr, (-10, 5, 20, 35), 16)   # crosses the left edge: shifted in
    assert out.shape == (2, 16, 16, 3) and box == (0, 5, 30, 35) and not padded
    with pytest.raises(ValueError, match="leaves the frame"):
        data.crop_square(fr, (-10, 5, 20, 35), 16, strict=True)
    out, box, padded = data.crop_square(fr, (0, -5, 50, 45), 16)    # larger than the frame: edge-padded
    assert padded and out.shape == (2, 16, 16, 3)


def test_wav_round_trip_is_atomic(tmp_path):
    x = (0.5 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    p = tmp_path / "a.wav"
    data.write_wav(p, x)
    y, sr = data.read_wav(p)
    assert sr == 16000 and np.abs(y - x).max() < 1e-4
    assert os.listdir(tmp_path) == ["a.wav"]                     # no temporary file left behind
    with pytest.raises(FileNotFoundError):
        data.read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError):
        data.write_wav(p, np.zeros((2, 3)))


def test_mead_clip_list_on_a_fake_tree(tmp_path):
    for actor in ["M003", "M005", "W009", "W011", "W014", "M012"]:
        for emo in data.MEAD_EMOTIONS:
            for lvl in (1, 3):
                d = tmp_path / actor / "video" / "front" / emo / f"level_{lvl}"
                d.mkdir(parents=True)
                for j in range(1, 8):
                    (d / f"{j:03d}.mp4").touch()
    clips = data.mead_clip_list(tmp_path)
    assert len(clips) == 200 and clips == data.mead_clip_list(tmp_path)
    assert len({c.parts[-6] for c in clips}) == 5
    assert all((c.parts[-2] == "level_1") == (c.parts[-3] == "neutral") for c in clips)
    # a prepared folder mirrors the source paths (mp4 + wav + JSON): VideoFolderDataset(only=...) keeps
    # exactly the listed clips (evaluate.py --mead), and refuses a list with unprepared clips
    for c in tmp_path.rglob("*.mp4"):
        c.with_suffix(".json").write_text(json.dumps({"status": "ok", "n_frames": 50, "identity": c.parts[-6]}))
    ds = data.VideoFolderDataset(tmp_path, only=clips)
    assert len(ds) == 200 and {stem for stem, _ in ds.items} == {c.with_suffix("") for c in clips}
    clips[0].with_suffix(".json").write_text(json.dumps({"status": "no face"}))
    with pytest.raises(ValueError, match="1 of the 200 listed clips are not prepared"):
        data.VideoFolderDataset(tmp_path, only=clips)


# ---------------------------------------------------------------------------------------------------
# mp4 I/O and preparation (need PyAV)
# ---------------------------------------------------------------------------------------------------
def _psnr(a, b):
    return 10 * np.log10(255 ** 2 / ((a.astype(np.float64) - b) ** 2).mean())


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    motion, audio = procedural.make_motion(2, 30)
    frames = procedural.render_clip(procedural.make_identity(4), motion, SIZE)
    p = tmp_path / "clip.mp4"
    data.write_video(p, frames, 25, audio)
    assert os.listdir(tmp_path) == ["clip.mp4"]
    got, fps, a, sr = data.read_video(p, fps=25, sr=16000)
    assert got.shape == frames.shape and fps == 25 and sr == 16000
    assert _psnr(got, frames) > 30
    assert len(a) == len(audio)
    lag = np.argmax(np.correlate(a[3200:9600], audio[3200:9600], "full")) - 6399
    assert lag == 0 and np.corrcoef(a, audio)[0, 1] > 0.95       # AAC priming handled: no offset
    raw, fps_raw, a_raw, _ = data.read_video(p)                  # native mode: every frame, own rate
    assert len(raw) == 30 and fps_raw == pytest.approx(25) and abs(len(a_raw) - len(audio)) < 1024


def test_video_failure_paths(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(FileNotFoundError):
        data.read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        data.read_video(bad)
    silent = tmp_path / "silent.mp4"
    data.write_video(silent, np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no audio"):
        data.read_video(silent, need_audio=True)
    with pytest.raises(ValueError, match="even"):
        data.write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        data.write_video(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3)))
    assert sorted(os.listdir(tmp_path)) == ["bad.mp4", "silent.mp4"]


def _pasted_face_video(T=40, H=128, W=160, fx=70, fy=30):
    """A procedural face (48 px) pasted with its corner at (fx, fy) on a uniform grey frame."""
    motion, audio = procedural.make_motion(5, T)
    video = np.full((T, H, W, 3), 90, np.uint8)
    video[:, fy:fy + 48, fx:fx + 48] = procedural.render_clip(procedural.make_identity(3), motion, 48)
    return video, audio


def _grey_detector(rgb):
    """Test oracle detector: the face is wherever the frame is not the uniform grey (90)."""
    ys, xs = np.nonzero(np.abs(rgb.astype(int) - 90).max(-1) > 12)
    return [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)] if len(xs) else []


def test_prepare_crops_a_centred_face_and_skips_bad_files(tmp_path):
    pytest.importorskip("av")
    T, fx, fy = 40, 70, 30
    video, audio = _pasted_face_video(T, fx=fx, fy=fy)
    src = tmp_path / "src" / "id00017" / "yt1"
    src.mkdir(parents=True)
    data.write_video(src / "00001.mp4", video, 25, audio)
    data.write_video(src / "00002.mp4", video)                   # no audio -> skipped
    (src / "00003.mp4").write_bytes(b"garbage")                  # unreadable -> skipped

    detector = _grey_detector

    logs = []
    n_ok, n_skip = data.prepare(tmp_path / "src", tmp_path / "dst", size=64, detector=detector,
                                min_frames=16, min_face=16, log=logs.append)
    assert (n_ok, n_skip) == (1, 2)
    dst = tmp_path / "dst" / "id00017" / "yt1"
    rec = json.loads((dst / "00001.json").read_text())
    assert rec["status"] == "ok" and rec["identity"] == "id00017" and rec["n_frames"] == T
    assert json.loads((dst / "00002.json").read_text())["status"] == "skipped"
    assert "no audio" in json.loads((dst / "00002.json").read_text())["reason"]
    assert any("SKIPPED" in line for line in logs)
    crop, fps, a, sr = data.read_video(dst / "00001.mp4", fps=25, sr=16000)
    assert crop.shape == (T, 64, 64, 3)
    # centred: the non-grey region of each crop is centred within 3 px (the box is the union over frames)
    ys, xs = np.nonzero(np.abs(crop[0].astype(int) - 90).max(-1) > 20)
    l, t, r, b = rec["box_ltrb"]
    assert abs((l + r) / 2 - (fx + 24)) <= 3 and abs((t + b) / 2 - (fy + 24)) <= 3
    assert abs((xs.min() + xs.max() + 1) / 2 - 32) <= 3 and abs((ys.min() + ys.max() + 1) / 2 - 32) <= 3
    wav, sr = data.read_wav(dst / "00001.wav")
    assert len(wav) == T * 640 and np.corrcoef(wav, audio)[0, 1] > 0.99
    # resumable: a second run touches nothing
    assert data.prepare(tmp_path / "src", tmp_path / "dst", detector=detector, log=logs.append) == (0, 0)
    ds = data.VideoFolderDataset(tmp_path / "dst", n_frames=16, random_window=False)
    s = ds[0]
    assert len(ds) == 1 and s["frames"].shape == (16, 3, 64, 64) and s["mel"].shape == (16, 1, 80, 16)
    assert s["identity"] == 0 and s["audio"].shape == (16 * 640,)
    with pytest.raises(ValueError, match="no prepared clips"):
        data.VideoFolderDataset(tmp_path / "src")


def test_dlib_detector_runs():
    pytest.importorskip("dlib")
    assert data.dlib_detector()(np.zeros((120, 160, 3), np.uint8)) == []


def test_prepare_mead_layout_uses_the_separate_audio(tmp_path):
    pytest.importorskip("av")
    sf = pytest.importorskip("soundfile")
    from scipy.signal import resample_poly
    video, audio = _pasted_face_video(30)
    vdir = tmp_path / "src" / "W011" / "video" / "front" / "happy" / "level_3"
    adir = tmp_path / "src" / "W011" / "audio" / "happy" / "level_3"
    vdir.mkdir(parents=True); adir.mkdir(parents=True)
    data.write_video(vdir / "001.mp4", video)                    # MEAD video: no audio track
    data.write_video(tmp_path / "src" / "W011" / "video" / "left_30.mp4", video)  # not selected by glob
    a48 = resample_poly(audio.astype(np.float64), 3, 1)          # MEAD audio: 48 kHz stereo
    sf.write(adir / "001.m4a", np.stack([a48, a48], 1), 48000, format="WAV")  # WAV bytes; soundfile sniffs
    logs = []
    assert data.prepare(tmp_path / "src", tmp_path / "dst", size=32, detector=_grey_detector, min_frames=16,
                        min_face=16, log=logs.append, glob="*/video/front/**/*.mp4") == (1, 0)
    stem = tmp_path / "dst" / "W011" / "video" / "front" / "happy" / "level_3" / "001"
    rec = json.loads(stem.with_suffix(".json").read_text())
    assert (rec["identity"], rec["emotion"], rec["level"], rec["view"]) == ("W011", "happy", "level_3", "front")
    wav, _ = data.read_wav(stem.with_suffix(".wav"))
    assert len(wav) == 30 * 640 and np.corrcoef(wav, audio)[0, 1] > 0.99


def test_path_info():
    assert data.path_info("dev/mp4/id00017/abc/00001.mp4")["identity"] == "id00017"
    assert data.path_info("M003/video/front/sad/level_2/004.mp4") == dict(
        identity="M003", view="front", emotion="sad", level="level_2")
    assert data.path_info("alice/talk.mp4") == dict(identity="alice")
    assert data.path_info("talk.mp4") == dict(identity="talk")


def test_disk_cache_returns_the_same_sample(tmp_path):
    kw = dict(n_identities=2, clips_per_identity=1, n_frames=3, size=16)
    plain = data.SyntheticTalkingFaces("train", **kw)[1]
    cached_ds = data.SyntheticTalkingFaces("train", cache_dir=tmp_path, **kw)
    first, second = cached_ds[1], cached_ds[1]
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for key in ("frames", "audio", "mel", "motion"):
        torch.testing.assert_close(first[key], plain[key], rtol=0, atol=0)
        torch.testing.assert_close(second[key], plain[key], rtol=0, atol=0)


def test_mouth_of_renders_another_clips_mouth_and_caches_it(tmp_path):
    kw = dict(n_identities=2, clips_per_identity=2, n_frames=24, size=32)
    ds = data.SyntheticTalkingFaces("train", **kw)
    own, donor = procedural.make_motion(ds.motion_seed(1), 24)[0], procedural.make_motion(ds.motion_seed(3), 24)[0]
    swapped = own.copy()
    swapped[:, [K["mouth_open"], K["mouth_width"]]] = donor[:, [K["mouth_open"], K["mouth_width"]]]
    np.testing.assert_array_equal(data.mouth_swapped(own, donor), swapped)
    want = procedural.render_clip(ds.identity(1), swapped, 32)
    np.testing.assert_array_equal(ds.mouth_of(1, 3), want)                 # identity and motion of 1, mouth of 3
    assert not np.array_equal(want, _uint8(ds[1]["frames"]))                # the mouth really differs
    cached = data.SyntheticTalkingFaces("train", cache_dir=tmp_path, **kw)
    np.testing.assert_array_equal(cached.mouth_of(1, 3), want)
    np.testing.assert_array_equal(cached.mouth_of(1, 3), want)             # read back from the cache
    assert len(list(tmp_path.glob("*mouth*.npz"))) == 1 and not list(tmp_path.glob(".*"))  # no temporaries
    closed = own.copy()                                                    # j = None: the mouth shut
    closed[:, [K["mouth_open"], K["mouth_width"]]] = 0
    np.testing.assert_array_equal(cached.mouth_of(1, None), procedural.render_clip(ds.identity(1), closed, 32))


def _uint8(frames):
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("attr", procedural.ATTRIBUTE_CLIPS)
def test_attribute_motion_moves_one_attribute(attr):
    own = {"yaw": ["yaw"], "pitch": ["pitch"], "blink": ["blink_l", "blink_r"], "gaze": ["gaze_x", "gaze_y"],
           "brow": ["brow"], "lips": ["mouth_open", "mouth_width"]}[attr]
    drive, full, audio = procedural.attribute_motion(attr, 3, 32)
    assert drive.shape == full.shape == (32, 12) and audio.shape == (32 * data.SPF,)
    others = [i for k, i in K.items() if k not in own]
    assert not np.any(full[:, others]) and not np.any(drive[:, others])  # everything else neutral (0)
    assert all(np.ptp(full[:, K[k]]) > 0.25 for k in own[:1])            # the attribute really moves
    if attr == "lips":  # the driving frames keep the mouth shut; the audio and the ground truth speak
        assert not np.any(drive) and np.abs(audio).max() > 0.1
        assert np.corrcoef(full[:, K["mouth_open"]], np.abs(audio).reshape(32, -1).mean(1))[0, 1] > 0.5
    else:
        np.testing.assert_array_equal(drive, full)
        assert not np.any(audio)                                         # silent
    np.testing.assert_array_equal(procedural.attribute_motion(attr, 3, 32)[1], full)   # deterministic
    assert not np.array_equal(procedural.attribute_motion(attr, 4, 32)[1], full)       # seed-dependent
    with pytest.raises(ValueError, match="attribute"):
        procedural.attribute_motion("smile", 0)


def test_demo_motion_performs_every_attribute_in_turn_while_speaking():
    motion, audio = procedural.demo_motion(100, seed=2)
    assert motion.shape == (100, 12) and audio.shape == (100 * data.SPF,)
    seg = lambda k: motion[20 * k:20 * (k + 1)]
    for k, cols in enumerate([["yaw"], ["pitch"], ["blink_l", "blink_r"], ["gaze_x", "gaze_y"], ["brow"]]):
        own = [K[c] for c in cols]
        assert np.ptp(seg(k)[:, own[0]]) > 0.25, cols                      # moves in its own segment ...
        rest = np.delete(np.arange(100), np.arange(20 * k, 20 * (k + 1)))
        assert not np.any(motion[rest][:, own]), cols                       # ... and nowhere else
    assert np.ptp(motion[:, K["mouth_open"]]) > 0.3 and np.abs(audio).max() > 0.1   # speech throughout
    with pytest.raises(ValueError, match="10 frames"):
        procedural.demo_motion(5)


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of data.py's command line has help text (issue 20); train, evaluate and infer have
    the same test in their own files."""
    assert all(a.help for a in cli_actions(data.main, ["bench"]))
