"""Tests for data.py and media.py: the sample format, I/O by round trips, preparation on a generated
video with a known face position, the datasets (cache, mouth swap) and the command line."""
import json
import os

import numpy as np
import pytest
from PIL import Image
import torch

import data
import media
import procedural

K = {k: i for i, k in enumerate(procedural.MOTION_KEYS)}
SIZE = 64


def test_sample_format_and_alignment():
    import audio
    ds = data.SyntheticTalkingFaces("train", n_identities=2, clips_per_identity=2, n_frames=10,
                                    size=32)
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


# --------------------------------------------------------------------------------------------------
# real-data helpers
# --------------------------------------------------------------------------------------------------
def _nearest_frame_indices(times, fps, duration):
    """Test oracle for VideoFrames.frames(fps), written as one batch over known timestamps: output
    frame k = the source frame nearest to k / fps (ties: the earlier), K = floor(duration * fps).
    -> int [K]."""
    times = np.asarray(times, dtype=np.float64)
    K = int(np.floor(duration * fps + 1e-6))
    if len(times) < 2:
        return np.zeros(K, np.int64)
    tk = np.arange(K) / fps
    j = np.clip(np.searchsorted(times, tk), 1, len(times) - 1)
    return np.where(np.abs(times[j - 1] - tk) <= np.abs(times[j] - tk), j - 1, j).astype(np.int64)


def test_nearest_frame_indices_oracle_matches_naive_loop():
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.02, 0.05, 90)) - 0.02       # jittered VFR clock starting near 0
    times -= times[0]
    idx = _nearest_frame_indices(times, 25, times[-1] + 0.033)
    naive = [int(np.argmin(np.abs(times - k / 25))) for k in range(int((times[-1] + 0.033) * 25))]
    assert idx.tolist() == naive


def test_fomm_enlarge_and_iou_hand_values():
    # w=100, h=50: wi = max(.1, (60-100)/200) = .1, hi = max(.1, (120-50)/100) = .7
    assert media.fomm_enlarge((0, 0, 100, 50)) == pytest.approx((-10, -35, 110, 85))
    assert media.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    with pytest.raises(ValueError):
        media.fomm_enlarge((5, 5, 5, 9))


def test_crop_square_shift_pad_and_strict():
    fr = np.arange(2 * 40 * 60 * 3, dtype=np.uint8).reshape(2, 40, 60, 3)
    # crosses the left edge: shifted in
    out, box, padded = media.crop_square(fr, (-10, 5, 20, 35), 16)
    assert out.shape == (2, 16, 16, 3) and box == (0, 5, 30, 35) and not padded
    with pytest.raises(ValueError, match="leaves the frame"):
        media.crop_square(fr, (-10, 5, 20, 35), 16, strict=True)
    # larger than the frame: shrunk to fit
    out, box, shrunk = media.crop_square(fr, (0, -5, 50, 45), 16)
    # 40 px about the centre (25, 20)
    assert shrunk and out.shape == (2, 16, 16, 3) and box == (5, 0, 45, 40)
    side = np.asarray(Image.fromarray(fr[0, :, 5:45]).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(out[0], side)                # only filmed pixels, no edge padding


def test_wav_round_trip_is_atomic(tmp_path):
    x = (0.5 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    p = tmp_path / "a.wav"
    media.write_wav(p, x)
    y, sr = media.read_wav(p)
    assert sr == 16000 and np.abs(y - x).max() < 1e-4
    assert os.listdir(tmp_path) == ["a.wav"]                     # no temporary file left behind
    with pytest.raises(FileNotFoundError):
        media.read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError):
        media.write_wav(p, np.zeros((2, 3)))


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
    # a prepared folder mirrors the source paths (mp4 + wav + JSON): VideoFolderDataset(only=...)
    # keeps exactly the listed clips (evaluate.py --mead), and refuses a list with unprepared clips
    for c in tmp_path.rglob("*.mp4"):
        c.with_suffix(".json").write_text(json.dumps({"status": "ok", "n_frames": 50,
                                                      "identity": c.parts[-6]}))
    ds = data.VideoFolderDataset(tmp_path, only=clips)
    assert len(ds) == 200 and {stem for stem, _ in ds.items} == {c.with_suffix("") for c in clips}
    clips[0].with_suffix(".json").write_text(json.dumps({"status": "no face"}))
    with pytest.raises(ValueError, match="1 of the 200 listed clips are not prepared"):
        data.VideoFolderDataset(tmp_path, only=clips)


# --------------------------------------------------------------------------------------------------
# mp4 I/O and preparation (need PyAV)
# --------------------------------------------------------------------------------------------------
def _psnr(a, b):
    return 10 * np.log10(255 ** 2 / ((a.astype(np.float64) - b) ** 2).mean())


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    motion, audio = procedural.make_motion(2, 30)
    frames = procedural.render_clip(procedural.make_identity(4), motion, SIZE)
    p = tmp_path / "clip.mp4"
    media.write_video(p, frames, 25, audio)
    assert os.listdir(tmp_path) == ["clip.mp4"]
    got, fps, a, sr = media.read_video(p, fps=25, sr=16000)
    assert got.shape == frames.shape and fps == 25 and sr == 16000
    assert _psnr(got, frames) > 30
    assert len(a) == len(audio)
    lag = np.argmax(np.correlate(a[3200:9600], audio[3200:9600], "full")) - 6399
    assert lag == 0 and np.corrcoef(a, audio)[0, 1] > 0.95      # AAC priming handled: no offset
    raw, fps_raw, a_raw, _ = media.read_video(p)                # native mode: every frame, own rate
    assert len(raw) == 30 and fps_raw == pytest.approx(25) and abs(len(a_raw) - len(audio)) < 1024


def test_video_failure_paths(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(FileNotFoundError):
        media.read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        media.read_video(bad)
    silent = tmp_path / "silent.mp4"
    media.write_video(silent, np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no audio"):
        media.read_video(silent, need_audio=True)
    with pytest.raises(ValueError, match="even"):
        media.write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        media.write_video(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3)))
    assert sorted(os.listdir(tmp_path)) == ["bad.mp4", "silent.mp4"]


def _write_vfr(path, frames, rng, rotation=None):
    """An mp4 written with PyAV directly: jittered pts (1/1000 s units, 20-50 ms apart), optionally
    a display rotation (degrees counter-clockwise), no audio."""
    import av
    from fractions import Fraction
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            vs.set_display_rotation(rotation)
        t = np.cumsum(rng.uniform(20, 50, len(frames))).astype(int)
        for k, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(t[k] - t[0]), Fraction(1, 1000)
            c.mux(vs.encode(vf))
        c.mux(vs.encode(None))


def _pyav_frames(path):
    """Oracle decode: every frame as stored (no rotation), its time in s, and the stream's average
    rate."""
    import av
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        got = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return np.array([t for t, _ in got]), np.stack([f for _, f in got]), rate


def test_video_frames_stream_matches_timestamp_oracle(tmp_path):
    """VideoFrames.frames(fps) against the batch nearest-frame rule over timestamps PyAV reports, on
    a constant-rate file (write_video) and a variable-rate one; fps=None gives every decoded
    frame."""
    pytest.importorskip("av")
    motion, audio = procedural.make_motion(1, 40)
    frames = procedural.render_clip(procedural.make_identity(2), motion, 32)
    media.write_video(tmp_path / "cfr.mp4", frames, 25, audio)
    _write_vfr(tmp_path / "vfr.mp4", frames, np.random.default_rng(0))
    for name in ("cfr.mp4", "vfr.mp4"):
        times, raw, rate = _pyav_frames(tmp_path / name)
        v = media.VideoFrames(tmp_path / name)
        assert v.t0 == times[0] and v.shape == raw.shape[1:] and v.fps == pytest.approx(rate)
        for fps in (None, 10, 25, 40):
            idx = range(len(raw)) if fps is None else _nearest_frame_indices(
                times - times[0], fps, times[-1] - times[0] + 1 / rate)
            got = np.stack(list(v.frames(fps)))
            assert got.shape == raw[idx].shape, (name, fps)
            np.testing.assert_array_equal(got, raw[idx])
            # read_video's frames
            np.testing.assert_array_equal(media.read_video(tmp_path / name, fps=fps)[0], got)


def test_rotated_video_is_turned_upright_once(tmp_path):
    """A display rotation of 90 degrees (counter-clockwise, PyAV's convention) = np.rot90(stored,
    1), in the decoder that read_video and infer.py share."""
    av = pytest.importorskip("av")
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display rotation")
    frames = procedural.render_clip(procedural.make_identity(2), procedural.make_motion(1, 5)[0],
                                    32)[:, :16]
    _write_vfr(tmp_path / "rot.mp4", np.ascontiguousarray(frames), np.random.default_rng(1),
               rotation=90)
    _, raw, _ = _pyav_frames(tmp_path / "rot.mp4")
    want = np.rot90(raw, 1, axes=(1, 2))                  # [T, 32, 16, 3]: width and height swapped
    assert media.VideoFrames(tmp_path / "rot.mp4").shape == want.shape[1:]
    np.testing.assert_array_equal(np.stack(list(media.VideoFrames(tmp_path / "rot.mp4").frames())),
                                  want)
    np.testing.assert_array_equal(media.read_video(tmp_path / "rot.mp4")[0], want)


def test_video_writer_tags_audio_and_abort(tmp_path):
    """VideoWriter: metadata only when asked, no audio track without audio, abort() leaves
    nothing."""
    av = pytest.importorskip("av")
    with media.VideoWriter(tmp_path / "t.mp4", 16, 16, 25, metadata=dict(comment="hello")) as w:
        for _ in range(3):
            w.write(np.zeros((16, 16, 3), np.uint8))
    with av.open(str(tmp_path / "t.mp4")) as c:
        assert c.metadata.get("comment") == "hello" and not c.streams.audio and c.streams.video[
            0].frames == 3
    media.write_video(tmp_path / "u.mp4", np.zeros((2, 16, 16, 3), np.uint8), audio=np.zeros(1000))
    with av.open(str(tmp_path / "u.mp4")) as c:
        assert "comment" not in c.metadata and len(c.streams.audio) == 1
    w = media.VideoWriter(tmp_path / "x.mp4", 16, 16, 25, np.zeros(2000, np.float32))
    w.write(np.zeros((16, 16, 3), np.uint8))
    w.abort()
    with pytest.raises(RuntimeError):                        # an exception inside `with` aborts too
        with media.VideoWriter(tmp_path / "y.mp4", 16, 16) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["t.mp4", "u.mp4"]


def test_face_track_probe_rule_iou_chain_and_message():
    """Probes: every frame below 50, then every 5th, from a generator; the chain keeps the box that
    overlaps the previous pick, not the larger one; too many misses name the first faceless
    frame."""
    probed = []

    # frame i (pixel value i): a small face at x = i, and from frame 1 a big one listed first
    def detector(img):
        i = int(img[0, 0, 0])
        probed.append(i)
        small = (float(i), 0.0, i + 20.0, 20.0)
        return [small] if i == 0 else [(200.0, 0.0, 300.0, 100.0), small]

    boxes = media.face_track((np.full((8, 8, 3), i, np.uint8) for i in range(62)), detector)
    assert probed == list(range(50)) + [50, 55, 60]
    np.testing.assert_array_equal(boxes[:, 0], probed)         # the small face all along
    answers = iter([[(0, 0, 4, 4)]] * 3 + [[]] + [[(0, 0, 4, 4)]] * 2 + [[]] * 2)
    # 25 %: kept
    assert len(media.face_track(np.zeros((4, 8, 8, 3), np.uint8), lambda img: next(answers))) == 3
    with pytest.raises(ValueError, match=r"no face found in clip x: frame 2 \(no face in 2 of the "
                                         r"4 probed frames, 50%\)"):
        media.face_track(np.zeros((4, 8, 8, 3), np.uint8), lambda img: next(answers), "clip x")


def _pasted_face_video(T=40, H=128, W=160, fx=70, fy=30):
    """A procedural face (48 px) pasted with its corner at (fx, fy) on a uniform grey frame."""
    motion, audio = procedural.make_motion(5, T)
    video = np.full((T, H, W, 3), 90, np.uint8)
    video[:, fy:fy + 48, fx:fx + 48] = procedural.render_clip(procedural.make_identity(3), motion,
                                                              48)
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
    media.write_video(src / "00001.mp4", video, 25, audio)
    media.write_video(src / "00002.mp4", video)                   # no audio -> skipped
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
    crop, fps, a, sr = media.read_video(dst / "00001.mp4", fps=25, sr=16000)
    assert crop.shape == (T, 64, 64, 3)
    # centred: the non-grey region of each crop is centred within 3 px (the box is the union over
    # frames)
    ys, xs = np.nonzero(np.abs(crop[0].astype(int) - 90).max(-1) > 20)
    l, t, r, b = rec["box_ltrb"]
    assert abs((l + r) / 2 - (fx + 24)) <= 3 and abs((t + b) / 2 - (fy + 24)) <= 3
    assert abs((xs.min() + xs.max() + 1) / 2 - 32) <= 3 and abs(
        (ys.min() + ys.max() + 1) / 2 - 32) <= 3
    wav, sr = media.read_wav(dst / "00001.wav")
    assert len(wav) == T * 640 and np.corrcoef(wav, audio)[0, 1] > 0.99
    # resumable: a second run touches nothing
    assert data.prepare(tmp_path / "src", tmp_path / "dst", detector=detector,
                        log=logs.append) == (0, 0)
    ds = data.VideoFolderDataset(tmp_path / "dst", n_frames=16, random_window=False)
    s = ds[0]
    assert len(ds) == 1 and s["frames"].shape == (16, 3, 64, 64) and s["mel"].shape == (
        16, 1, 80, 16)
    assert s["identity"] == 0 and s["audio"].shape == (16 * 640,)
    with pytest.raises(ValueError, match="no prepared clips"):
        data.VideoFolderDataset(tmp_path / "src")


def test_dlib_detector_runs():
    pytest.importorskip("dlib")
    assert media.dlib_detector()(np.zeros((120, 160, 3), np.uint8)) == []


def test_prepare_mead_layout_uses_the_separate_audio(tmp_path):
    pytest.importorskip("av")
    sf = pytest.importorskip("soundfile")
    from scipy.signal import resample_poly
    video, audio = _pasted_face_video(30)
    vdir = tmp_path / "src" / "W011" / "video" / "front" / "happy" / "level_3"
    adir = tmp_path / "src" / "W011" / "audio" / "happy" / "level_3"
    vdir.mkdir(parents=True); adir.mkdir(parents=True)
    media.write_video(vdir / "001.mp4", video)                    # MEAD video: no audio track
    # not selected by glob
    media.write_video(tmp_path / "src" / "W011" / "video" / "left_30.mp4", video)
    a48 = resample_poly(audio.astype(np.float64), 3, 1)          # MEAD audio: 48 kHz stereo
    # WAV bytes; soundfile sniffs
    sf.write(adir / "001.m4a", np.stack([a48, a48], 1), 48000, format="WAV")
    logs = []
    assert data.prepare(tmp_path / "src", tmp_path / "dst", size=32, detector=_grey_detector,
                        min_frames=16, min_face=16, log=logs.append,
                        glob="*/video/front/**/*.mp4") == (1, 0)
    stem = tmp_path / "dst" / "W011" / "video" / "front" / "happy" / "level_3" / "001"
    rec = json.loads(stem.with_suffix(".json").read_text())
    assert (rec["identity"], rec["emotion"], rec["level"], rec["view"]) == ("W011", "happy",
                                                                            "level_3", "front")
    wav, _ = media.read_wav(stem.with_suffix(".wav"))
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


def _uint8(frames):
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_mouth_of_renders_another_clips_mouth_and_caches_it(tmp_path):
    kw = dict(n_identities=2, clips_per_identity=2, n_frames=24, size=32)
    ds = data.SyntheticTalkingFaces("train", **kw)
    own, donor = procedural.make_motion(ds.motion_seed(1), 24)[0], procedural.make_motion(
        ds.motion_seed(3), 24)[0]
    swapped = own.copy()
    swapped[:, [K["mouth_open"], K["mouth_width"]]] = donor[:, [K["mouth_open"], K["mouth_width"]]]
    np.testing.assert_array_equal(data.mouth_swapped(own, donor), swapped)
    want = procedural.render_clip(ds.identity(1), swapped, 32)
    np.testing.assert_array_equal(ds.mouth_of(1, 3), want)    # identity and motion of 1, mouth of 3
    assert not np.array_equal(want, _uint8(ds[1]["frames"]))              # the mouth really differs
    cached = data.SyntheticTalkingFaces("train", cache_dir=tmp_path, **kw)
    np.testing.assert_array_equal(cached.mouth_of(1, 3), want)
    np.testing.assert_array_equal(cached.mouth_of(1, 3), want)            # read back from the cache
    # no temporaries
    assert len(list(tmp_path.glob("*mouth*.npz"))) == 1 and not list(tmp_path.glob(".*"))
    closed = own.copy()                                                   # j = None: the mouth shut
    closed[:, [K["mouth_open"], K["mouth_width"]]] = 0
    np.testing.assert_array_equal(cached.mouth_of(1, None),
                                  procedural.render_clip(ds.identity(1), closed, 32))


def test_every_cli_flag_says_what_it_does(cli_actions):
    """Every option of data.py's command line has help text (issue 20); train, evaluate and infer
    have the same test in their own files."""
    assert all(a.help for a in cli_actions(data.main, ["bench"]))
