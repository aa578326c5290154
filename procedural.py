"""procedural.py: the procedural talking-head world used to train and test FC-TFG without a dataset
(our addition; the paper trains on VoxCeleb2, Sec. 4.1.1). No real set has cross-identity ground
truth (person A performing person B's motion), so this one is generated: every pixel follows from an
identity seed and a motion seed, and any identity can be rendered with any motion.

    identity parameters  -> make_identity    motion + speech track -> make_motion, speech_track
    audio from the track -> synth_audio      picture               -> render, render_clip, landmarks
    scripted one-attribute clips (Table "attribute transfer")      -> attribute_motion, demo_motion
    speed -> bench_render (`python data.py bench`);
    a clip as mp4 -> `python data.py preview OUT.mp4`

Plain numpy code: the torch dataset over this world is data.SyntheticTalkingFaces. Time base:
audio.py's 25 fps / 16 kHz (frame k <-> audio samples [640k, 640k + 640)). Why the eyes, brows and
mouth are as large as they are at 64 px: RESULTS.md, section 2.
Not here: the torch dataset, the sample format, real-video preparation (data.py), video I/O
(media.py)."""
import dataclasses
import functools
import math
import time

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, sosfilt

from audio import FPS, SAMPLE_RATE as SR, SAMPLES_PER_FRAME as SPF  # the project's time base

MOTION_KEYS = (               # columns of a motion array [T, 12]; 0 everywhere = neutral frontal
                              # face
    "yaw", "pitch", "roll",   # head rotation in radians; +yaw turns the face to image right,
                              # +pitch up, +roll counter-clockwise on screen
    "tx", "ty",               # head translation in half-image units (+x right, +y up)
    "blink_l", "blink_r",     # eyelid closure 0 open .. 1 shut; _l is the eye on the IMAGE left
    "gaze_x", "gaze_y",       # pupil offset in -1..1 of its travel (+x image right, +y up)
    "brow",                   # brow raise 0..1
    "mouth_open",             # jaw/lip opening 0..1 (driven by the speech track)
    "mouth_width",            # -1 rounded (/u/, /o/) .. +1 spread (/i/, /e/) (driven by the speech
                              # track)
)
TRAIN_IDS = range(0, 1_000_000)            # identity seeds of the training split
TEST_IDS = range(1_000_000, 1_100_000)     # disjoint identity seeds of the test split
_COL = {k: i for i, k in enumerate(MOTION_KEYS)}  # column of each motion key
MOTION_BASE = {"train": 0, "test": 1 << 40}  # motion seeds are disjoint as well
# one RNG stream per purpose
_TAG_IDENTITY, _TAG_MOTION, _TAG_SPEECH, _TAG_ATTRIBUTE = 101, 202, 303, 404
BLINK_RATE = 1.0              # blinks per second in make_motion


# ==== 1. Identity: everything fixed for one synthetic person ======================================
@dataclasses.dataclass(frozen=True)
class Identity:
    """One person. The face is designed for a 64 px decoder (RESULTS.md, "the tiny world"):
    every feature a motion parameter moves is large and high-contrast (eyes ~10 x 7 px with a dark
    iris that travels ~5 px, brows ~2 px thick that rise ~3 px, a wide mouth), and the nuisance
    factors a tiny decoder would spend its capacity on are gone (no glasses, beards, long hair or
    patterned backgrounds). Identity lives in colours, head shape and feature layout."""
    seed: int
    head: tuple        # ellipsoid semi-axes (a, b, c) in half-image units: width, height, depth
    skin: tuple        # RGB in 0..1
    hair: tuple        # RGB (also the brows, darkened)
    hairline: float    # v (face-space height) where the scalp starts; higher = more forehead
    parting: float     # -1..1 asymmetry of the hairline
    iris: tuple        # RGB of the iris (always dark: the iris must stand out against the sclera)
    eye_dx: float      # half eye spacing (face-space u)
    eye_y: float       # eye height (face-space v)
    eye_rx: float      # eye opening half-width (u)
    eye_ry: float      # eye opening half-height (v)
    nose: tuple        # (half-width, half-height) of the nose shading
    mouth_w: float     # mouth half-width at rest
    mouth_y: float     # mouth height (face-space v, negative = below centre)
    lips: tuple        # RGB
    shirt: tuple       # RGB
    bg: tuple          # two RGB colours of a soft vertical background gradient (top, bottom)


def make_identity(seed):
    """Draw one person's fixed appearance from `seed` (any int; use TRAIN_IDS / TEST_IDS ranges)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"identity seed must be a non-negative int, got {seed!r}")
    r = np.random.default_rng((_TAG_IDENTITY, int(seed)))
    u = r.uniform
    tone = u(0.25, 1.0)  # one skin-tone axis from dark to light, plus a small hue jitter
    skin = np.array([0.35 + 0.6 * tone, 0.22 + 0.55 * tone, 0.15 + 0.45 * tone]) + u(-0.04, 0.04, 3)
    hair = np.array([u(0.05, 0.6), 0, 0])
    hair[1] = hair[0] * u(0.55, 0.9)
    hair[2] = hair[1] * u(0.4, 0.9)
    if r.random() < 0.12:
        hair = np.full(3, u(0.55, 0.85))  # grey/white hair
    # Head size: a tight, face-filling crop (tighter than FOMM's, Sec. 4.1.1): the face spans ~80 %
    # of the width, so at 64 px an eye is ~13 px wide and every feature is a low-frequency blob that
    # a small decoder learns early (measured: RESULTS.md, "the tiny world").
    a = u(0.74, 0.82)
    iris = np.array(r.choice([[0.35, 0.2, 0.08], [0.15, 0.3, 0.5], [0.2, 0.35, 0.15],
                              [0.15, 0.1, 0.05]]))
    return Identity(
        seed=int(seed), head=(a, u(0.88, 0.96), 0.9 * a), skin=tuple(np.clip(skin, 0, 1)),
        hair=tuple(hair), hairline=u(0.62, 0.74), parting=u(-1, 1), iris=tuple(iris * u(0.7, 1.0)),
        eye_dx=u(0.36, 0.42), eye_y=u(0.08, 0.14), eye_rx=u(0.22, 0.26), eye_ry=u(0.15, 0.18),
        nose=(u(0.07, 0.1), u(0.09, 0.14)), mouth_w=u(0.28, 0.34), mouth_y=u(-0.5, -0.42),
        lips=tuple(np.clip(skin * np.array([0.9, 0.5, 0.5]) + [0.08, 0, 0], 0, 1)),
        shirt=tuple(u(0.05, 0.95, 3)), bg=(tuple(u(0.1, 0.9, 3)), tuple(u(0.1, 0.9, 3))))


# ==== 2. The hidden speech track: one source for both the audio and the mouth (formant speech,
# Klatt 1980) ====
# Formants F1/F2/F3 in Hz, Peterson & Barney 1952 (men, women). F1 grows with jaw opening and F2
# with lip spreading, so the mouth can be read off the audio: the only reason lip sync is learnable
# here.
VOWELS = {
    "male":   {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240),
               "e": (530, 1840, 2480), "o": (570, 840, 2410)},
    "female": {"a": (850, 1220, 2810), "i": (310, 2790, 3310), "u": (370, 950, 2670),
               "e": (610, 2330, 2990), "o": (590, 920, 2710)},
}
UPPER_FORMANTS = {"male": (3300, 3750), "female": (3500, 4300)}  # F4, F5 (Hz), fixed per voice
BANDWIDTHS = np.array([60.0, 90.0, 140.0, 220.0, 240.0])          # B1..B5 in Hz (Klatt 1980 ranges)
F0_RANGE = {"male": (90, 150), "female": (170, 250)}              # per-clip pitch (Hz)
CTRL_RATE = 200               # control rate of the track: one parameter update every 5 ms


def speech_track(seed, n_frames):
    """Random 'speech' at the 200 Hz control rate: phrases of syllables, each an optional lip
    closure then a vowel nucleus with attack/decay; pauses between phrases (data.md Sec. 6).

    -> dict: t [n] seconds, env [n] amplitude 0..1, F [n, 5] formants Hz, f0 [n] Hz, burst [n] 0..1,
       voice 'male'|'female', f1_range / f2_range (min, max) of the voice's vowel table.
    Formants glide linearly from one vowel nucleus to the next (coarticulation, cheaply).
    """
    r = np.random.default_rng((_TAG_SPEECH, int(seed)))
    voice = "male" if r.random() < 0.5 else "female"
    table = VOWELS[voice]
    dur = n_frames / FPS
    n = int(math.ceil(dur * CTRL_RATE)) + 2
    t = np.arange(n) / CTRL_RATE
    env, burst, decl = np.zeros(n), np.zeros(n), np.ones(n)
    centres, targets = [], []
    now = r.uniform(0.0, 0.4)                    # leading silence
    while now < dur:
        phrase_start = now
        for _ in range(int(r.integers(5, 13))):  # 5-12 syllables per phrase
            length = r.uniform(0.15, 0.30)       # non-periodic syllable durations (3-6 Hz rate)
            closure = r.uniform(0.04, 0.08) if r.random() < 0.5 else 0.0  # lips shut, silent
            on, off = now + closure, now + length
            att, dec = r.uniform(0.03, 0.06), r.uniform(0.03, 0.06)
            peak = r.uniform(0.5, 1.0)           # stress: some syllables louder (and wider open)
            trap = np.clip(np.minimum((t - on) / att, (off - t) / dec), 0, 1) * peak
            env = np.maximum(env, trap)
            if closure and r.random() < 0.6:     # plosive release: short noise burst
                burst = np.maximum(burst, np.clip(1 - np.abs(t - on - 0.01) / 0.01, 0, 1))
            vowel = "aieou"[int(r.integers(5))]
            centres.append(0.5 * (on + off)); targets.append(table[vowel])
            now = off
        decl[(t >= phrase_start) & (t < now)] = np.linspace(
            1.0, 0.9, int(((t >= phrase_start) & (t < now)).sum()))
        now += r.uniform(0.2, 1.0) if r.random() < 0.8 else r.uniform(0.05, 0.2)  # pause
    if not centres:
        centres, targets = [0.0], [table["e"]]
    targets = np.array(targets, dtype=np.float64)
    F = np.empty((n, 5))
    for j in range(3):
        F[:, j] = np.interp(t, centres, targets[:, j])  # glides between nuclei, flat at the ends
    F[:, 3:] = UPPER_FORMANTS[voice]
    # declination, ~1 % jitter
    f0 = r.uniform(*F0_RANGE[voice]) * decl * (1 + 0.01 * r.standard_normal(n))
    f1, f2 = ([v[j] for v in table.values()] for j in (0, 1))
    return dict(t=t, env=env, F=F, f0=f0, burst=burst, voice=voice,
                f1_range=(min(f1), max(f1)), f2_range=(min(f2), max(f2)))


def mouth_from_track(track, n_frames):
    """Mouth parameters at frame centres (k + 0.5) / 25, lag 0 (so the true A/V offset is 0).

    open  = env * (0.1 + 0.9 * (F1 - F1min) / (F1max - F1min))   /a/ open, /i/ /u/ nearly closed
    width = env * clip((F2 - F2mid) / (half F2 range), -1, 1)     /i/ /e/ spread, /u/ /o/ rounded
    The 0.1 floor (our choice) keeps lips parted a little in every voiced sound; silence gives
    exactly 0.
    -> (open [T], width [T]) float32.
    """
    tc = (np.arange(n_frames) + 0.5) / FPS
    env = np.interp(tc, track["t"], track["env"])
    f1 = np.interp(tc, track["t"], track["F"][:, 0])
    f2 = np.interp(tc, track["t"], track["F"][:, 1])
    lo, hi = track["f1_range"]
    open_ = env * (0.1 + 0.9 * np.clip((f1 - lo) / (hi - lo), 0, 1))
    lo2, hi2 = track["f2_range"]
    width = env * np.clip((f2 - 0.5 * (lo2 + hi2)) / (0.5 * (hi2 - lo2)), -1, 1)
    return open_.astype(np.float32), width.astype(np.float32)


def _resonator_gain(f, F, B, sr=SR):
    """|H| of Klatt's digital resonator y[n] = A x[n] + B y[n-1] + C y[n-2] at frequency f (Hz).
    C = -exp(-2 pi Bw T), B = 2 exp(-pi Bw T) cos(2 pi F T), A = 1 - B - C (unit gain at DC)."""
    T = 1.0 / sr
    c = -np.exp(-2 * np.pi * B * T)
    b = 2 * np.exp(-np.pi * B * T) * np.cos(2 * np.pi * F * T)
    a = 1 - b - c
    z1 = np.exp(-2j * np.pi * f * T)
    return np.abs(a / (1 - b * z1 - c * z1 * z1))


def synth_audio(track, n_frames, seed=0):
    """Render the speech track as 16 kHz audio.  -> float32 [640 * n_frames].

    Additive source-filter synthesis: harmonic h of the glottal pitch f0 gets amplitude (1/h)
    [source -12 dB/oct + radiation +6 dB/oct] times the magnitude of the cascade of 5 Klatt
    resonators at h*f0. Equivalent in spectrum to filtering a pulse train through the resonators,
    but with no recursion, so it is vectorised and formants glide without filter-state glitches.
    Each control step is normalised to RMS = env * (0.55 + 0.45 F1-openness), so audio energy
    follows the same envelope as the mouth (and open vowels are louder, as in real speech).
    Plus aspiration noise ~30 dB down and 2-8 kHz bursts at plosive releases.
    """
    N = n_frames * SPF
    ts = np.arange(N) / SR
    t, env, F, f0 = track["t"], track["env"], track["F"], track["f0"]
    n_h = int(7800 // f0.min())                               # harmonics below Nyquist at lowest
                                                              # pitch
    h = np.arange(1, n_h + 1)
    fh = f0[:, None] * h                                      # [n_ctrl, H] harmonic frequencies
    gain = np.prod(_resonator_gain(fh[..., None], F[:, None, :], BANDWIDTHS), axis=-1) / h
    gain *= np.clip((7800 - fh) / 800, 0, 1)                  # fade out before Nyquist: no aliasing
    # Intrinsic vowel intensity: open vowels are louder (/a/ ~5 dB above /i/, /u/), as in real
    # speech.
    lo, hi = track["f1_range"]
    loud = env * (0.55 + 0.45 * np.clip((F[:, 0] - lo) / (hi - lo), 0, 1))
    # RMS of the voiced sum = loud
    gain *= loud[:, None] / np.sqrt(0.5 * (gain ** 2).sum(1, keepdims=True))
    phase = 2 * np.pi * np.cumsum(np.interp(ts, t, f0)) / SR  # continuous phase of the fundamental
    out = np.zeros(N)
    for k in range(n_h):
        out += np.interp(ts, t, gain[:, k]) * np.sin((k + 1) * phase)
    r = np.random.default_rng((_TAG_SPEECH, 7, int(seed)))
    env_s = np.interp(ts, t, env)
    out += 0.03 * env_s * r.standard_normal(N)                # aspiration, ~30 dB below the voice
    sos = butter(4, [2000, 7900], btype="band", fs=SR, output="sos")
    out += 0.4 * np.interp(ts, t, track["burst"]) * sosfilt(sos, r.standard_normal(N))
    return np.clip(0.3 * out, -1, 1).astype(np.float32)       # env 1 -> RMS 0.3


def _speak(motion, seed, audio=True):
    """Fill the mouth columns of `motion` [T, 12] in place from speech track `seed` -> its audio
    [640 T] (None with audio=False: the synthesis is most of a clip's cost, and image stages never
    hear it)."""
    T = len(motion)
    track = speech_track(int(seed), T)
    motion[:, _COL["mouth_open"]], motion[:, _COL["mouth_width"]] = mouth_from_track(track, T)
    return synth_audio(track, T, int(seed)) if audio else None


def _smooth_noise(r, T, sigma, scale):
    """Smooth random trajectory: white noise low-passed by a Gaussian (sigma frames), std `scale`.

    Normalised by the filter's stationary std, 1 / sqrt(2 sqrt(pi) sigma), not by the clip's own
    std: a clip shorter than the correlation length has a tiny sample std, and dividing by it blew a
    0.25 rad yaw up to several radians (heads seen from behind)."""
    x = gaussian_filter1d(r.standard_normal(T + 6 * int(sigma)), sigma,
                          mode="nearest")[3 * int(sigma):][:T]
    return scale * x * math.sqrt(2 * math.sqrt(math.pi) * sigma)


def make_motion(seed, n_frames, audio=True):
    """One clip's motion and audio.
    -> (motion float32 [T, 12] in MOTION_KEYS order, audio float32 [640 T], or None with
    audio=False: the same motion, for callers that only draw frames).

    Pose, blink, gaze and brow are smooth random trajectories independent of the audio; mouth_open
    and mouth_width come from the same speech track as the audio (mouth_from_track, synth_audio).
    """
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"motion seed must be a non-negative int, got {seed!r}")
    T = int(n_frames)
    r = np.random.default_rng((_TAG_MOTION, int(seed)))
    m = np.zeros((T, len(MOTION_KEYS)), dtype=np.float64)
    for key, sigma, scale in [("yaw", 10, 0.25), ("pitch", 10, 0.12), ("roll", 12, 0.08),
                              ("tx", 14, 0.04), ("ty", 14, 0.03)]:
        m[:, _COL[key]] = _smooth_noise(r, T, sigma, scale)
    # Blinks: Poisson events (~1 per second, more often than people blink: each attribute must be
    # seen often in 16-frame training clips), each a 5-7 frame close-open profile; 15 % are winks.
    blink = np.zeros((T, 2))
    for start in np.flatnonzero(r.random(T) < BLINK_RATE / FPS):
        L = int(r.integers(5, 8))
        prof = np.sin(np.pi * (np.arange(L) + 0.5) / L) ** 0.7 * r.uniform(0.7, 1.0)
        eyes = [int(r.integers(2))] if r.random() < 0.15 else [0, 1]
        seg = slice(start, min(T, start + L))
        for e in eyes:
            blink[seg, e] = np.maximum(blink[seg, e], prof[: seg.stop - seg.start])
    m[:, _COL["blink_l"]], m[:, _COL["blink_r"]] = blink[:, 0], blink[:, 1]
    # Gaze: fixations held 0.3-1.2 s, joined by fast (2-frame) saccades over most of the eye.
    gz = np.zeros((T, 2)); k = 0
    while k < T:
        gz[k:] = r.uniform(-0.9, 0.9, 2); k += int(r.integers(8, 30))
    m[:, _COL["gaze_x"]] = gaussian_filter1d(gz[:, 0], 1.0, mode="nearest")
    m[:, _COL["gaze_y"]] = gaussian_filter1d(gz[:, 1], 1.0, mode="nearest") * 0.8
    # Brows: a slow raise/lower over the whole 0..1 range
    m[:, _COL["brow"]] = np.clip(0.4 + _smooth_noise(r, T, 8, 0.35), 0, 1)
    audio = _speak(m, seed, audio)  # fills the mouth columns of m
    return m.astype(np.float32), audio


# Scripted clips that move ONE attribute each (attributes.py's attribute-transfer table, infer.py's
# demo)
ATTRIBUTE_CLIPS = ("yaw", "pitch", "blink", "gaze", "brow", "lips")
# offsets into TEST_IDS and the attribute motion seeds: settings are chosen on "tune", RESULTS.md
# reports "report"
ATTRIBUTE_SPLITS = {"tune": 0, "report": 50_000}


def attribute_motion(attr, seed, T=32):
    """One attribute clip. -> (drive [T, 12], full [T, 12], audio float32 [640 T]): `drive` is what
    the driving frames show, `full` what the ground truth shows; they differ only for "lips", whose
    driving frames keep a closed mouth while the audio (and the ground truth) speak. Everything else
    stays at the neutral 0 of MOTION_KEYS; amplitudes match make_motion's ranges. Used by
    attributes.py's attribute-transfer table and by demo_motion (infer.py's default clip)."""
    if attr not in ATTRIBUTE_CLIPS:
        raise ValueError(f"attribute must be one of {ATTRIBUTE_CLIPS}, got {attr!r}")
    r = np.random.default_rng((_TAG_ATTRIBUTE, ATTRIBUTE_CLIPS.index(attr), int(seed)))
    t = np.arange(T) / T
    full = np.zeros((T, len(MOTION_KEYS)))
    audio = np.zeros(T * SPF, np.float32)                       # silence
    phase = r.uniform(0, 2 * np.pi)
    if attr in ("yaw", "pitch"):                                # head turns / nods back and forth
        full[:, _COL[attr]] = (0.3 if attr == "yaw" else 0.15) * np.sin(2 * np.pi * 1.5 * t
                                                                         + phase)
    elif attr == "blink":                                       # 3 blinks of both eyes (fewer
        L = min(6, T)                                           # in a short clip)
        starts = np.arange(T - L + 1)[1::7][:4] if T > L else np.zeros(1, int)
        for start in r.choice(starts, min(3, len(starts)), replace=False):
            prof = np.sin(np.pi * (np.arange(L) + 0.5) / L) ** 0.7
            full[start:start + L, _COL["blink_l"]] = full[start:start + L, _COL["blink_r"]] = prof
    elif attr == "gaze":                                        # saccades between fixations
        k = 0
        while k < T:
            full[k:, _COL["gaze_x"]], full[k:, _COL["gaze_y"]] = r.uniform(-0.9, 0.9), r.uniform(
                -0.7, 0.7)
            k += int(r.integers(6, 11))
    elif attr == "brow":                                        # a full raise and back
        full[:, _COL["brow"]] = 0.5 - 0.5 * np.cos(2 * np.pi * t * r.choice([1.0, 1.5])
                                                   + r.uniform(-0.3, 0.3))
    else:                                                       # lips: speech from the audio only
        audio = _speak(full, seed)
    drive = full.copy()
    drive[:, [_COL["mouth_open"], _COL["mouth_width"]]] = 0.0   # lips: the driving mouth stays shut
    return drive.astype(np.float32), full.astype(np.float32), audio


def demo_motion(n_frames, seed=0):
    """infer.py's default driving clip: every controllable attribute in turn (head turn, nod,
    blinks, gaze, brow raise; one attribute_motion clip each, n_frames / 5 frames long), while one
    speech track drives the mouth and the audio the whole time.
    -> (motion float32 [T, 12], audio float32 [640 T])."""
    T = int(n_frames)
    if T < 10:
        raise ValueError(f"demo_motion needs at least 10 frames, got {T}")
    bounds = np.linspace(0, T, 6).round().astype(int)
    motion = np.zeros((T, len(MOTION_KEYS)), np.float32)
    for attr, a, b in zip(ATTRIBUTE_CLIPS[:5], bounds[:-1], bounds[1:]):
        motion[a:b] = attribute_motion(attr, seed, b - a)[1]
    return motion, _speak(motion, seed)


# ==== 3. The renderer: a shaded ellipsoid head with features painted in face space, ray-cast per
# pixel ====
@functools.lru_cache(maxsize=8)
def _grid(S):
    """Pixel-centre coordinates of an S x S canvas in [-1, 1], y pointing up.
    -> (X, Y) float32 [S, S]."""
    c = ((np.arange(S, dtype=np.float32) + 0.5) / S) * 2 - 1
    X, Y = np.meshgrid(c, -c)
    X.setflags(write=False); Y.setflags(write=False)
    return X, Y


@functools.lru_cache(maxsize=64)
def _background(ident, S):
    """Static background of an identity (it never moves, as in a tripod shot): a soft vertical
    gradient between its two colours.  -> float32 [S, S, 3]."""
    X, Y = _grid(S)
    c1, c2 = np.array(ident.bg, dtype=np.float32)
    s = (0.5 + 0.5 * Y)[..., None]  # 1 at the top, 0 at the bottom
    out = c1 * s + c2 * (1 - s)
    out.setflags(write=False)
    return out


def _rotation(yaw, pitch, roll):
    """World-from-head rotation R = Rz(roll) Ry(yaw) Rx(-pitch); head space: +z out of the face."""
    cy, sy, cp, sp, cr, sr = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # +pitch tilts the face up
    return Rz @ Ry @ Rx


def _motion_dict(motion):
    """Accept a mapping (missing keys = 0) or a length-12 vector in MOTION_KEYS order."""
    if isinstance(motion, dict):
        bad = set(motion) - set(MOTION_KEYS)
        if bad:
            raise ValueError(f"unknown motion keys {sorted(bad)}; known: {MOTION_KEYS}")
        return {k: float(motion.get(k, 0.0)) for k in MOTION_KEYS}
    v = np.asarray(motion, dtype=np.float64)
    if v.shape != (len(MOTION_KEYS),):
        raise ValueError(f"motion must be a dict or a vector of {len(MOTION_KEYS)} values "
                         f"{MOTION_KEYS}, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("motion contains NaN or Inf")
    return dict(zip(MOTION_KEYS, v.tolist()))


HEAD_Y = 0.05                 # head centre sits above the image centre, leaving room for the neck
LIGHT = np.array([-0.35, 0.45, 0.82]) / np.linalg.norm([-0.35, 0.45, 0.82])  # world light direction


# Mouth proportions in face units (face radius = 1). Deliberately larger than a real mouth: at 64 px
# the lips must span several pixels when open, or lip sync is invisible to the tiny SyncNet.
LIP_H = 0.04        # outer half-height of the closed lips
OPEN_LIP_H = 0.15   # extra outer half-height at full opening
OPEN_INNER_H = 0.17  # inner (dark) half-height at full opening (< LIP_H + OPEN_LIP_H: lips stay
                     # visible)
JAW_DROP = 0.15     # the mouth centre moves down by this much at full opening; = OPEN_LIP_H, so the
                    # upper lip stays put and only the lower lip and jaw move, as in real speech


# Eyes and brows (face units). Large on purpose (the attribute table must see them move): at 64 px
# the eye is ~10 x 7 px, the iris ~5 px across and travels ~+-2.5 px with the gaze, a brow is ~2 px
# thick and rises ~3 px.
GAZE_U = 0.5        # iris centre travel at gaze_x = +-1, in eye half-widths
GAZE_V = 0.3        # ... at gaze_y = +-1, in eye half-heights
IRIS_R = 0.72       # iris radius in eye half-heights (the pupil has half of it)
BROW_GAP = 0.06     # brow centre above the top of the eye at brow = 0 (v units)
BROW_RAISE = 0.14   # extra height at brow = 1
BROW_H = 0.045      # brow half-thickness


def _mouth_geom(ident, m):
    """Mouth shape for one frame: centre height, outer half-width/height, inner
    half-width/height."""
    mw = ident.mouth_w * (1 + 0.2 * m["mouth_width"])
    # sqrt: typical speech openings are 0.1-0.4; the square root makes them 0.3-0.6 of the full
    # opening, i.e. a few pixels at 64 px instead of one (monotone, 0 and 1 unchanged)
    op = float(np.sqrt(np.clip(m["mouth_open"], 0, 1)))
    my = ident.mouth_y - JAW_DROP * op  # the jaw drops: the mouth centre moves down as it opens
    return my, mw, LIP_H + OPEN_LIP_H * op, 0.8 * mw, OPEN_INNER_H * op


def _ray_head(ident, m, dx, dy):
    """Orthographic rays (one per pixel of the head's window, offsets dx, dy from the head centre)
    against the ellipsoid head rotated by (yaw, pitch, roll). -> (rotation [3, 3], hit mask,
    u, v, w): the hit nearest the viewer mapped back to the unit sphere (face space: u right, v up,
    w out of the face)."""
    a, b, c = ident.head
    # Q = R^T (P - centre), P = (x, y, t), t -> viewer
    Rm = _rotation(m["yaw"], m["pitch"], m["roll"])
    R = Rm.tolist()                                                 # python floats keep arrays
                                                                    # float32
    d = [R[2][i] / s_i for i, s_i in enumerate((a, b, c))]          # ray direction (R^T e_z) / s
    # ray origin at t=0, / s
    q = [(R[0][i] * dx + R[1][i] * dy) / s_i for i, s_i in enumerate((a, b, c))]
    A = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    Bq = 2 * (q[0] * d[0] + q[1] * d[1] + q[2] * d[2])
    Cq = q[0] ** 2 + q[1] ** 2 + q[2] ** 2 - 1
    disc = Bq * Bq - 4 * A * Cq
    head = disc >= 0
    tt = (-Bq + np.sqrt(np.maximum(disc, 0))) / (2 * A)             # the hit nearest the viewer
    u, v, w = q[0] + tt * d[0], q[1] + tt * d[1], q[2] + tt * d[2]  # hit point on the unit sphere
    return Rm, head, u, v, w


def _paint_face(ident, m, f, u, v, put):
    """Paint nose, mouth, eyes (lid, sclera, iris travelling with the gaze, pupil, lash) and brows
    as labels where `f` (front of the face, not hair) holds; put(mask, label). -> masks of the lips,
    eyes and brows. Label numbers: the palette order in render()."""
    NOSE, NOSTRIL, LIPS, LIPLINE, INNER, TEETH, SCLERA, IRIS, PUPIL, LID, LASH, BROW = range(2, 14)
    nw, nh = ident.nose
    nose_y = 0.5 * (ident.eye_y + ident.mouth_y) - 0.02
    put(f & ((u / nw) ** 2 + ((v - nose_y) / nh) ** 2 < 1), NOSE)
    for side in (-1, 1):
        nostril = ((u - side * 0.45 * nw) / (0.22 * nw)) ** 2 + ((v - nose_y + 0.7 * nh)
                                                                 / (0.18 * nh)) ** 2
        put(f & (nostril < 1), NOSTRIL)
    my, mw, mry, iw, iry = _mouth_geom(ident, m)
    lips = f & ((u / mw) ** 2 + ((v - my) / mry) ** 2 < 1)
    put(lips, LIPS)
    put(f & (np.abs(v - my) < 0.012) & (np.abs(u) < iw), LIPLINE)   # where the lips meet
    if iry > 1e-4:
        inner = f & ((u / iw) ** 2 + ((v - my) / iry) ** 2 < 1)
        put(inner, INNER)
        put(inner & (v > my + 0.45 * iry), TEETH)                   # upper teeth
    masks = {}
    for side, key in ((-1, "l"), (1, "r")):
        ex = side * ident.eye_dx
        eu, ev = (u - ex) / ident.eye_rx, (v - ident.eye_y) / ident.eye_ry
        eye = f & (eu * eu + ev * ev < 1)
        lid = 1 - 2 * float(np.clip(m["blink_" + key], 0, 1))       # lid edge in ev units (1 open,
                                                                    # -1 shut)
        seen = eye & (ev < lid)
        put(eye, LID)                                               # the closed part: a darker lid
        put(seen, SCLERA)
        gu = ex + GAZE_U * ident.eye_rx * m["gaze_x"]               # the iris travels with the gaze
        gv = ident.eye_y + GAZE_V * ident.eye_ry * m["gaze_y"]
        rr = ((u - gu) ** 2 + (v - gv) ** 2) * (1 / (IRIS_R * ident.eye_ry) ** 2)
        put(seen & (rr < 1), IRIS)
        put(seen & (rr < 0.25), PUPIL)
        put(eye & (np.abs(ev - lid) < 0.2), LASH)                   # lash line at the lid edge
        by = ident.eye_y + ident.eye_ry + BROW_GAP + BROW_RAISE * m["brow"]
        brow = f & (np.abs(v - by - 0.03 * (1 - eu * eu)) < BROW_H) & (np.abs(eu) < 1.15)
        put(brow, BROW)
        masks["eye_" + key], masks["brow_" + key] = eye, brow
    masks["mouth"] = lips
    return masks


def render(ident, motion, size=64, ss=None, return_masks=False):
    """Render one frame of `ident` with one frame of `motion` (dict or [12] vector).
    -> uint8 [H, W, 3].

    How: each pixel casts an orthographic ray at an ellipsoid head rotated by (yaw, pitch, roll);
    the hit point, mapped back to the unit sphere, gives face-space coordinates (u, v) where eyes,
    brows, nose, mouth and hair are simple implicit shapes. Pose therefore foreshortens features and
    moves the silhouette like a 3-D head. Rendering happens at size*ss and is box-averaged down
    (supersampled anti-aliasing). return_masks=True also returns bool [H, W] masks
    {head, face, hair, eye_l, eye_r, brow_l, brow_r, mouth, body (neck and shoulders)}
    (coverage > 1/2) for tests, region losses and the fidelity measures (region_masks).
    Speed: head pixels get a small integer label per layer (painter's order) and one palette lookup
    at the end, which is ~3x cheaper in numpy than assigning RGB triples layer by layer.
    """
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    m = _motion_dict(motion)
    ss = ss or (3 if size <= 96 else 2)
    S = size * ss
    X, Y = _grid(S)
    img = _background(ident, S).copy()                          # [S, S, 3]
    a, b, c = ident.head
    cx, cy = m["tx"], m["ty"] + HEAD_Y
    skin_c, hair_c = np.array(ident.skin, np.float32), np.array(ident.hair, np.float32)
    # ---- neck and torso: image-plane shapes that follow tx / ty
    neck = (np.abs(X - 0.8 * cx) < 0.42 * a) & (Y < cy - 0.5 * b)
    shoulders = ((X - 0.5 * cx) / 0.9) ** 2 + ((Y + 1.3) / 0.5) ** 2 < 1
    img[neck], img[shoulders] = 0.75 * skin_c, ident.shirt
    # ---- everything below lives inside the head's bounding square (radius = largest semi-axis):
    # a window view of the canvas, so the work scales with the head's area, not the image's
    dx, dy = X - np.float32(cx), Y - np.float32(cy)
    rad = max(a, b, c) * 1.02
    r0, r1 = np.searchsorted(-Y[:, 0], [-(cy + rad), -(cy - rad)])
    c0, c1 = np.searchsorted(X[0], [cx - rad, cx + rad])
    win = (slice(r0, r1), slice(c0, c1))
    dx, dy = dx[win], dy[win]
    Rm, head, u, v, w = _ray_head(ident, m, dx, dy)
    # ---- face-space shapes (u right, v up, w out of the face), painted as labels in painter's
    # order
    pal = [skin_c, hair_c, 0.88 * skin_c, 0.45 * skin_c, ident.lips, (0.25, 0.08, 0.08),
           (0.2, 0.04, 0.05), (0.92, 0.9, 0.85), (0.97, 0.97, 0.95), ident.iris, (0.02, 0.02, 0.02),
           0.78 * skin_c, (0.08, 0.05, 0.05), 0.35 * hair_c + 0.02]
    HAIR = 1                                                    # pal's index; the rest: _paint_face
    lab = np.zeros(head.shape, np.uint8)                        # pal[0], skin, everywhere to start
    put = lambda mask, k: np.copyto(lab, k, where=mask)
    front = head & (w > 0)
    hair = head & ((v > ident.hairline + 0.15 * u * u - 0.06 * ident.parting * u)
                   | (w < -0.2 + 0.4 * v))
    put(hair, HAIR)
    f = front & ~hair                                           # where features may appear
    masks = _paint_face(ident, m, f, u, v, put)
    # ---- Lambert shading; the ellipsoid normal is grad sum (Q_i / s_i)^2 ~ (u / a, v / b, w / c)
    Ll = (Rm.T @ LIGHT).tolist()                                # light direction in head space
    un, vn, wn = u[head] * (1 / a), v[head] * (1 / b), w[head] * (1 / c)
    lam = np.clip((un * Ll[0] + vn * Ll[1] + wn * Ll[2]) / np.sqrt(un * un + vn * vn + wn * wn),
                  0, 1)
    pal = np.array(pal, dtype=np.float32)
    img[win][head] = np.take(pal, lab[head], axis=0) * (0.55 + 0.5 * lam)[:, None]
    out = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))  # supersampled anti-aliasing
    out = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    if not return_masks:
        return out
    masks.update(head=head, face=f, hair=hair)
    full = np.zeros((len(masks) + 1, S, S), bool)               # window -> full canvas
    full[:-1, win[0], win[1]] = np.stack(list(masks.values()))
    full[-1] = neck | shoulders                                 # "body": canvas-wide already
    return out, dict(zip([*masks, "body"],
                         full.reshape(-1, size, ss, size, ss).mean(axis=(2, 4)) > 0.5))


LANDMARK_NAMES = ("eye_l", "eye_r", "eye_l_top", "eye_r_top", "eye_l_bottom", "eye_r_bottom",
                  "brow_l", "brow_r", "nose", "mouth_l", "mouth_r", "mouth_top", "mouth_bottom",
                  "chin")


def landmarks(ident, motion, size=64):
    """Forward-project named face-space points to pixels (the renderer's ground-truth landmarks).

    -> (xy float32 [14, 2] in pixel units, x right / y down, pixel centres at i + 0.5, and
        visible bool [14]: the surface faces the camera). Order: LANDMARK_NAMES. Eye 'top' is the
    current lid edge, mouth top/bottom the inner lip edges (they meet when the mouth is closed).
    """
    m = _motion_dict(motion)
    my, mw, _, _, iry = _mouth_geom(ident, m)
    # arch top, as in render
    brow_v = ident.eye_y + ident.eye_ry + BROW_GAP + BROW_RAISE * m["brow"] + 0.03
    lid = lambda k: ident.eye_y + ident.eye_ry * (1 - 2 * float(np.clip(m["blink_" + k], 0, 1)))
    dx = ident.eye_dx
    uv = np.array([(-dx, ident.eye_y), (dx, ident.eye_y), (-dx, lid("l")), (dx, lid("r")),
                   (-dx, ident.eye_y - ident.eye_ry), (dx, ident.eye_y - ident.eye_ry),
                   (-dx, brow_v), (dx, brow_v), (0, 0.5 * (ident.eye_y + ident.mouth_y) - 0.02),
                   (-mw, my), (mw, my), (0, my + iry), (0, my - iry), (0, -0.92)])
    w = np.sqrt(np.clip(1 - (uv ** 2).sum(1), 0, None))
    Q = np.stack([uv[:, 0], uv[:, 1], w], 1) * np.array(ident.head)  # on the ellipsoid, head space
    R = _rotation(m["yaw"], m["pitch"], m["roll"])
    P = Q @ R.T + np.array([m["tx"], m["ty"] + HEAD_Y, 0])
    normal_z = (np.stack([uv[:, 0], uv[:, 1], w], 1) / np.array(ident.head)) @ R.T[:, 2]
    xy = np.stack([(P[:, 0] + 1) / 2 * size, (1 - P[:, 1]) / 2 * size], 1)
    return xy.astype(np.float32), normal_z > 0


def render_clip(ident, motion, size=64, ss=None):
    """Render every frame.  motion [T, 12] -> uint8 [T, H, W, 3]."""
    motion = np.asarray(motion)
    if motion.ndim != 2 or motion.shape[1] != len(MOTION_KEYS):
        raise ValueError(f"motion must be [T, {len(MOTION_KEYS)}], got shape {motion.shape}")
    return np.stack([render(ident, mk, size, ss) for mk in motion])


def region_masks(ident, motion, size=64, ss=None):
    """The regions the fidelity measures score (metrics.fidelity), frame by frame: motion [T, 12] ->
    dict of bool [T, H, W]: head (the head, grown by one pixel so its outline counts), background
    (neither head nor neck nor shoulders: the person's own backdrop) and skin (the front of the face
    without eyes, brows and mouth, each grown by one pixel)."""
    def grow(m):  # 3x3 dilation of a bool [H, W] mask
        p = np.pad(m, 1)
        return np.logical_or.reduce([p[dy:dy + size, dx:dx + size]
                                     for dy in range(3) for dx in range(3)])
    out = {"head": [], "background": [], "skin": []}
    for mk in np.asarray(motion):
        m = render(ident, mk, size, ss, return_masks=True)[1]
        features = np.logical_or.reduce([m[k] for k in ("eye_l", "eye_r", "brow_l", "brow_r",
                                                        "mouth")])
        out["head"].append(grow(m["head"]))
        out["background"].append(~(m["head"] | m["body"]))
        out["skin"].append(m["face"] & ~grow(features))
    return {k: np.stack(v) for k, v in out.items()}


def bench_render(sizes=(64, 256), n=20):
    """Print and return rendering speed {size: frames per second} for one random identity and
    motion."""
    ident = make_identity(0)
    motion, _ = make_motion(0, n)
    out = {}
    for size in sizes:
        render(ident, motion[0], size)  # warm caches (grid, background)
        t0 = time.perf_counter()
        for mk in motion:
            render(ident, mk, size)
        out[size] = n / (time.perf_counter() - t0)
        print(f"render {size}x{size}: {out[size]:.1f} frames/s "
              f"(1 thread, supersampling x{3 if size <= 96 else 2})")
    t0 = time.perf_counter()
    make_motion(1, 50)
    print(f"motion + audio for a 2 s clip: {1000 * (time.perf_counter() - t0):.1f} ms")
    return out
