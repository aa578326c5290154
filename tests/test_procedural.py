"""Tests for procedural.py: the procedural world is checked against geometry and physics it must
obey (regions a motion parameter may touch, hand-derived pixel positions, formant peaks,
energy/mouth coupling) and its scripted one-attribute clips."""
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


# --------------------------------------------------------------------------------------------------
# determinism, seeds, splits
# --------------------------------------------------------------------------------------------------
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
    assert {tr.motion_seed(i) for i in range(len(tr))}.isdisjoint(
        {te.motion_seed(i) for i in range(len(te))})
    assert tr.identity(0) != te.identity(0)
    # clips_per_identity grouping
    assert [tr.identity(i).seed for i in range(6)] == [0, 0, 0, 1, 1, 1]
    # `first` skips people and motion seeds: the evaluation's report people are not its tune people
    rep = data.SyntheticTalkingFaces("test", n_identities=5, clips_per_identity=3, n_frames=4,
                                     first=50_000)
    assert rep.identity_seeds == [procedural.TEST_IDS[50_000 + k] for k in range(5)]
    assert rep.motion_seed(2) == te.motion_seed(2) + 50_000
    with pytest.raises(ValueError, match="n_identities"):
        data.SyntheticTalkingFaces("test", n_identities=5, first=len(procedural.TEST_IDS) - 2)


# --------------------------------------------------------------------------------------------------
# motion parameters change the right pixels (geometric checks independent of the masks)
# --------------------------------------------------------------------------------------------------
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
            # hand-derived band at yaw 0: face-space v maps to image y = HEAD_Y + v b
            # (orthographic); the lips span mouth_y - JAW_DROP op -/+ (LIP_H + OPEN_LIP_H op) (the
            # jaw drops as it opens)
            o = np.sqrt(op)  # rendered opening
            v_lo = ident.mouth_y - procedural.JAW_DROP * o - (procedural.LIP_H
                                                               + procedural.OPEN_LIP_H * o)
            v_hi = ident.mouth_y + procedural.LIP_H
            row = lambda vv: (1 - procedural.HEAD_Y - vv * ident.head[1]) * SIZE / 2
            assert rows.min() + 1.5 >= row(v_hi) and rows.max() + 0.5 <= row(v_lo) + 1.5
            # half-width of the widest lips (mouth_width 0) in px, plus an anti-aliasing margin
            assert np.all(np.abs(cols + 0.5 - SIZE / 2)
                          <= ident.mouth_w * _px_per_unit(ident) + 1.5)
        dark.append(int((img[masks["mouth"]].max(-1) < 70).sum()))  # inner mouth is near black
    assert dark == sorted(dark) and dark[-1] > dark[0]


def test_mouth_width_and_gaze_and_brow_stay_in_their_regions():
    ident = procedural.make_identity(2)
    base = procedural.render(ident, {}, SIZE)
    xy, _ = procedural.landmarks(ident, {}, SIZE)
    eye_rows = xy[:2, 1]
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"gaze_x": 1.0, "gaze_y": -1.0},
                                                          SIZE)))
    assert len(rows) and np.all(np.abs(rows + 0.5 - eye_rows.mean())
                                < ident.eye_ry * ident.head[1] * SIZE / 2 + 1.5)
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"brow": 1.0}, SIZE)))
    assert len(rows) and rows.max() < eye_rows.mean()                     # brows are above the eyes
    rows, _ = np.nonzero(_changed(base, procedural.render(ident, {"mouth_width": 1.0,
                                                                  "mouth_open": 0.2}, SIZE)))
    assert len(rows) and rows.min() > xy[procedural.LANDMARK_NAMES.index("nose"), 1]


@pytest.mark.parametrize("seed", [0, 5, 12])
def test_pose_geometry_is_identity_independent(seed):
    """Roll and translation measured on rendered masks equal the motion values for every
    identity."""
    ident = procedural.make_identity(seed)
    roll, tx, ty = 0.2, 0.1, -0.06  # small shifts: the face-filling head must stay inside the frame
    _, m0 = procedural.render(ident, {}, SIZE, ss=4, return_masks=True)
    _, m1 = procedural.render(ident, {"roll": roll, "tx": tx, "ty": ty}, SIZE, ss=4,
                              return_masks=True)
    cen = lambda mk: np.array([np.nonzero(mk)[1].mean() + 0.5, np.nonzero(mk)[0].mean() + 0.5])
    # hand-derived: the head centre sits at (tx, ty + HEAD_Y) half-image units, y up
    expect = np.array([(1 + tx) * SIZE / 2, (1 - ty - procedural.HEAD_Y) * SIZE / 2])
    np.testing.assert_allclose(cen(m1["head"]), expect, atol=0.3)
    np.testing.assert_allclose(cen(m0["head"]), [SIZE / 2, (1 - procedural.HEAD_Y) * SIZE / 2],
                               atol=0.3)
    el, er = cen(m1["eye_l"]), cen(m1["eye_r"])
    # image y is down; roll is counter-clockwise
    angle = np.arctan2(-(er[1] - el[1]), er[0] - el[0])
    assert abs(angle - roll) < np.deg2rad(2)


def test_motion_leaves_identity_appearance_alone():
    ident = procedural.make_identity(6)
    motion, _ = procedural.make_motion(1, 12)
    frames = procedural.render_clip(ident, motion, SIZE)
    corner = frames[:, :6, :6]                                 # static background far from the head
    assert np.all(corner == corner[:1])
    other = procedural.render(procedural.make_identity(16), motion[0], SIZE)
    assert np.abs(other[:6, :6].astype(int) - corner[0]).max() > 10


def test_landmarks_land_in_the_raycast_masks():
    """landmarks() forward-projects; render() ray-casts: two code paths that must agree."""
    for seed, pose in [(0, {}), (3, {"yaw": 0.3, "pitch": 0.15, "roll": -0.1}),
                       (8, {"yaw": -0.3, "tx": 0.05})]:
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
    np.testing.assert_array_equal(
        ((s["frames"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), gt)
    np.testing.assert_array_equal(s["audio"].numpy(), audio)
    d = ds[5]
    torch.testing.assert_close(s["motion"], d["motion"])
    torch.testing.assert_close(s["mel"], d["mel"])
    assert s["identity"] == 0 and d["identity"] == 2 and s["identity_seed"] != d["identity_seed"]


# --------------------------------------------------------------------------------------------------
# the speech track: audio and mouth from one source
# --------------------------------------------------------------------------------------------------
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
    # no audio/video offset: energy and opening line up best at lag 0 (a SyncNet would find offset
    # 0)
    z = lambda x: (x - x.mean()) / x.std()
    lags = range(-4, 5)
    score = [np.mean(z(rms)[max(0, L):T + min(0, L)] * z(op)[max(0, -L):T - max(0, L)])
             for L in lags]
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
    assert abs(peak - F1) <= 100, (peak, F1)                     # within one harmonic (f0 = 100 Hz)


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


def _uint8(frames):
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("attr", procedural.ATTRIBUTE_CLIPS)
def test_attribute_motion_moves_one_attribute(attr):
    own = {"yaw": ["yaw"], "pitch": ["pitch"], "blink": ["blink_l", "blink_r"],
           "gaze": ["gaze_x", "gaze_y"], "brow": ["brow"],
           "lips": ["mouth_open", "mouth_width"]}[attr]
    drive, full, audio = procedural.attribute_motion(attr, 3, 32)
    assert drive.shape == full.shape == (32, 12) and audio.shape == (32 * data.SPF,)
    others = [i for k, i in K.items() if k not in own]
    # everything else neutral (0)
    assert not np.any(full[:, others]) and not np.any(drive[:, others])
    assert all(np.ptp(full[:, K[k]]) > 0.25 for k in own[:1])           # the attribute really moves
    # the driving frames keep the mouth shut; the audio and the ground truth speak
    if attr == "lips":
        assert not np.any(drive) and np.abs(audio).max() > 0.1
        assert np.corrcoef(full[:, K["mouth_open"]],
                           np.abs(audio).reshape(32, -1).mean(1))[0, 1] > 0.5
    else:
        np.testing.assert_array_equal(drive, full)
        assert not np.any(audio)                                         # silent
    # deterministic
    np.testing.assert_array_equal(procedural.attribute_motion(attr, 3, 32)[1], full)
    assert not np.array_equal(procedural.attribute_motion(attr, 4, 32)[1], full)    # seed-dependent
    with pytest.raises(ValueError, match="attribute"):
        procedural.attribute_motion("smile", 0)


def test_demo_motion_performs_every_attribute_in_turn_while_speaking():
    motion, audio = procedural.demo_motion(100, seed=2)
    assert motion.shape == (100, 12) and audio.shape == (100 * data.SPF,)
    seg = lambda k: motion[20 * k:20 * (k + 1)]
    for k, cols in enumerate([["yaw"], ["pitch"], ["blink_l", "blink_r"], ["gaze_x", "gaze_y"],
                              ["brow"]]):
        own = [K[c] for c in cols]
        assert np.ptp(seg(k)[:, own[0]]) > 0.25, cols                 # moves in its own segment ...
        rest = np.delete(np.arange(100), np.arange(20 * k, 20 * (k + 1)))
        assert not np.any(motion[rest][:, own]), cols                       # ... and nowhere else
    # speech throughout
    assert np.ptp(motion[:, K["mouth_open"]]) > 0.3 and np.abs(audio).max() > 0.1
    with pytest.raises(ValueError, match="10 frames"):
        procedural.demo_motion(5)


def test_region_masks_partition_the_frame():
    """Backdrop, head and body never overlap; skin lies on the head and avoids eyes, brows and
    mouth; the head region is the renderer's head grown by one pixel."""
    ident = procedural.make_identity(procedural.TEST_IDS[7])
    motion = procedural.make_motion(procedural.MOTION_BASE["test"] + 7, 3)[0]
    r = procedural.region_masks(ident, motion)
    for t, mk in enumerate(motion):
        m = procedural.render(ident, mk, 64, return_masks=True)[1]
        assert not (r["background"][t] & (m["head"] | m["body"])).any()
        assert (r["background"][t] | m["head"] | m["body"]).all()
        assert (r["skin"][t] <= m["face"]).all() and r["skin"][t].sum() > 0.2 * m["face"].sum()
        for k in ("eye_l", "eye_r", "brow_l", "brow_r", "mouth"):
            assert not (r["skin"][t] & m[k]).any()
        assert (m["head"] <= r["head"][t]).all() and r["head"][t].sum() > m["head"].sum()


def test_make_motion_without_audio_is_the_same_motion():
    """audio=False skips only the synthesis: the mouth columns still follow the speech track."""
    for seed in (0, 7):
        (m, a), (m2, none) = procedural.make_motion(seed, 30), procedural.make_motion(seed, 30,
                                                                                      audio=False)
        np.testing.assert_array_equal(m, m2)
        assert none is None and len(a) == 30 * 640 and m[:, procedural.MOTION_KEYS.index(
            "mouth_open")].max() > 0.1
