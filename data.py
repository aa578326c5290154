"""data.py: training/evaluation data for FC-TFG: a procedural talking-head set with ground truth,
video+audio I/O, and the real-video preparation for VoxCeleb2 / MEAD (Sec. 4.1.1, Sec. 4.2.3).

Sec. 4.1.1 "VoxCeleb2 ... pre-processing procedure proposed in [51]" (FOMM crop) -> prepare, fomm_enlarge
Sec. 4.1.1 MEAD frontal views, 5 speakers x 8 emotions x 5 clips             -> mead_clip_list
Sec. 4.2.3 "first frame of each test video ... reference identity" (PC-AVS)    -> split_reference
Sec. 4.1.2 "downsample the audio to 16kHz", mel windows per frame              -> audio.py (imported lazily)
Procedural talking faces (our addition; no real set has cross-identity ground truth):
    identity parameters  -> make_identity        motion + speech track -> make_motion, speech_track
    audio from the track -> synth_audio          picture                -> render, landmarks
    torch dataset        -> SyntheticTalkingFaces; speed -> bench_render (`python data.py bench`)
Real clips: read_video / write_video (PyAV, optional), read_wav / write_wav (soundfile),
    `python data.py prepare SRC DST`, VideoFolderDataset.

Time base everywhere: 25 fps and 16 kHz mono float32, so frame k <-> samples [640k, 640k + 640).
Deviations from FOMM's crop_vox.py (say so when comparing numbers): dlib HOG instead of S3FD; one box
per clip instead of IoU-based chunking (the clip's min IoU to its first box is recorded in the JSON);
by default a box leaving the frame is shifted/padded instead of rejected (--strict restores FOMM's rule).
Not here: the mel spectrogram itself and its window convention (audio.py), face landmarks for LMD
(evaluate.py), augmentation and batching policy (train.py).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, sosfilt

from stylegan2 import write_atomic  # the project's one atomic writer

FPS = 25                      # video frame rate of every clip (Wav2Lip / PC-AVS convention)
SR = 16000                    # audio sample rate (Sec. 4.1.2)
SPF = SR // FPS               # 640 audio samples per video frame
MOTION_KEYS = (               # columns of a motion array [T, 12]; 0 everywhere = neutral frontal face
    "yaw", "pitch", "roll",   # head rotation in radians; +yaw turns the face to image right, +pitch up,
                              # +roll counter-clockwise on screen
    "tx", "ty",               # head translation in half-image units (+x right, +y up)
    "blink_l", "blink_r",     # eyelid closure 0 open .. 1 shut; _l is the eye on the IMAGE left
    "gaze_x", "gaze_y",       # pupil offset in -1..1 of its travel (+x image right, +y up)
    "brow",                   # brow raise 0..1
    "mouth_open",             # jaw/lip opening 0..1 (driven by the speech track)
    "mouth_width",            # -1 rounded (/u/, /o/) .. +1 spread (/i/, /e/) (driven by the speech track)
)
TRAIN_IDS = range(0, 1_000_000)            # identity seeds of the training split
TEST_IDS = range(1_000_000, 1_100_000)     # disjoint identity seeds of the test split
_MOTION_BASE = {"train": 0, "test": 1 << 40}  # motion seeds are disjoint as well
_TAG_IDENTITY, _TAG_MOTION, _TAG_SPEECH = 101, 202, 303  # separate RNG streams per purpose
BLINK_RATE = 1.0              # blinks per second in make_motion
_TAG_ATTRIBUTE = 404          # RNG stream of the scripted attribute clips


# ===================================================================================================
# 1. Identity: everything fixed for one synthetic person
# ===================================================================================================
@dataclasses.dataclass(frozen=True)
class Identity:
    """One person. The face is designed for a 64 px decoder (issue 18, RESULTS.md "the tiny world"):
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
    hair = np.array([u(0.05, 0.6), 0, 0]); hair[1] = hair[0] * u(0.55, 0.9); hair[2] = hair[1] * u(0.4, 0.9)
    if r.random() < 0.12:
        hair = np.full(3, u(0.55, 0.85))  # grey/white hair
    # Head size: a tight, face-filling crop (tighter than FOMM's, Sec. 4.1.1): the face spans ~80 % of
    # the width, so at 64 px an eye is ~13 px wide and every feature is a low-frequency blob that a
    # small decoder learns early (measured: RESULTS.md, "the tiny world").
    a = u(0.74, 0.82)
    iris = np.array(r.choice([[0.35, 0.2, 0.08], [0.15, 0.3, 0.5], [0.2, 0.35, 0.15], [0.15, 0.1, 0.05]]))
    return Identity(
        seed=int(seed), head=(a, u(0.88, 0.96), 0.9 * a), skin=tuple(np.clip(skin, 0, 1)),
        hair=tuple(hair), hairline=u(0.62, 0.74), parting=u(-1, 1), iris=tuple(iris * u(0.7, 1.0)),
        eye_dx=u(0.36, 0.42), eye_y=u(0.08, 0.14), eye_rx=u(0.22, 0.26), eye_ry=u(0.15, 0.18),
        nose=(u(0.07, 0.1), u(0.09, 0.14)), mouth_w=u(0.28, 0.34), mouth_y=u(-0.5, -0.42),
        lips=tuple(np.clip(skin * np.array([0.9, 0.5, 0.5]) + [0.08, 0, 0], 0, 1)),
        shirt=tuple(u(0.05, 0.95, 3)), bg=(tuple(u(0.1, 0.9, 3)), tuple(u(0.1, 0.9, 3))))


# ===================================================================================================
# 2. The hidden speech track: one source for both the audio and the mouth (spec data.md Sec. 6)
# ===================================================================================================
# Formants F1/F2/F3 in Hz, Peterson & Barney 1952 (men, women). F1 grows with jaw opening and F2 with
# lip spreading, so the mouth can be read off the audio: the only reason lip sync is learnable here.
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
    """Random 'speech' at the 200 Hz control rate: phrases of syllables, each an optional lip closure
    then a vowel nucleus with attack/decay; pauses between phrases (data.md Sec. 6).

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
    now = r.uniform(0.0, 0.4)                        # leading silence
    while now < dur:
        phrase_start = now
        for _ in range(int(r.integers(5, 13))):      # 5-12 syllables per phrase
            length = r.uniform(0.15, 0.30)           # non-periodic syllable durations (3-6 Hz rate)
            closure = r.uniform(0.04, 0.08) if r.random() < 0.5 else 0.0  # lips shut, silent
            on, off = now + closure, now + length
            att, dec = r.uniform(0.03, 0.06), r.uniform(0.03, 0.06)
            peak = r.uniform(0.5, 1.0)               # stress: some syllables louder (and wider open)
            trap = np.clip(np.minimum((t - on) / att, (off - t) / dec), 0, 1) * peak
            env = np.maximum(env, trap)
            if closure and r.random() < 0.6:         # plosive release: short noise burst
                burst = np.maximum(burst, np.clip(1 - np.abs(t - on - 0.01) / 0.01, 0, 1))
            vowel = "aieou"[int(r.integers(5))]
            centres.append(0.5 * (on + off)); targets.append(table[vowel])
            now = off
        decl[(t >= phrase_start) & (t < now)] = np.linspace(1.0, 0.9, int(((t >= phrase_start) & (t < now)).sum()))
        now += r.uniform(0.2, 1.0) if r.random() < 0.8 else r.uniform(0.05, 0.2)  # pause
    if not centres:
        centres, targets = [0.0], [table["e"]]
    targets = np.array(targets, dtype=np.float64)
    F = np.empty((n, 5))
    for j in range(3):
        F[:, j] = np.interp(t, centres, targets[:, j])  # glides between nuclei, flat at the ends
    F[:, 3:] = UPPER_FORMANTS[voice]
    f0 = r.uniform(*F0_RANGE[voice]) * decl * (1 + 0.01 * r.standard_normal(n))  # declination, ~1 % jitter
    f1 = [v[0] for v in table.values()]
    f2 = [v[1] for v in table.values()]
    return dict(t=t, env=env, F=F, f0=f0, burst=burst, voice=voice,
                f1_range=(min(f1), max(f1)), f2_range=(min(f2), max(f2)))


def mouth_from_track(track, n_frames):
    """Mouth parameters at frame centres (k + 0.5) / 25, lag 0 (so the true A/V offset is 0).

    open  = env * (0.1 + 0.9 * (F1 - F1min) / (F1max - F1min))   /a/ open, /i/ /u/ nearly closed
    width = env * clip((F2 - F2mid) / (half F2 range), -1, 1)     /i/ /e/ spread, /u/ /o/ rounded
    The 0.1 floor (our choice) keeps lips parted a little in every voiced sound; silence gives exactly 0.
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

    Additive source-filter synthesis: harmonic h of the glottal pitch f0 gets amplitude
    (1/h) [source -12 dB/oct + radiation +6 dB/oct] times the magnitude of the cascade of 5 Klatt
    resonators at h*f0. Equivalent in spectrum to filtering a pulse train through the resonators, but
    with no recursion, so it is vectorised and formants glide without filter-state glitches. Each
    control step is normalised to RMS = env * (0.55 + 0.45 F1-openness), so audio energy follows the
    same envelope as the mouth (and open vowels are louder, as in real speech).
    Plus aspiration noise ~30 dB down and 2-8 kHz bursts at plosive releases.
    """
    N = n_frames * SPF
    ts = np.arange(N) / SR
    t, env, F, f0 = track["t"], track["env"], track["F"], track["f0"]
    n_h = int(7800 // f0.min())                                   # harmonics below Nyquist at lowest pitch
    h = np.arange(1, n_h + 1)
    fh = f0[:, None] * h                                          # [n_ctrl, H] harmonic frequencies
    gain = np.prod(_resonator_gain(fh[..., None], F[:, None, :], BANDWIDTHS), axis=-1) / h
    gain *= np.clip((7800 - fh) / 800, 0, 1)                      # fade out before Nyquist: no aliasing
    # Intrinsic vowel intensity: open vowels are louder (/a/ ~5 dB above /i/, /u/), as in real speech.
    lo, hi = track["f1_range"]
    loud = env * (0.55 + 0.45 * np.clip((F[:, 0] - lo) / (hi - lo), 0, 1))
    gain *= loud[:, None] / np.sqrt(0.5 * (gain ** 2).sum(1, keepdims=True))  # RMS of the voiced sum = loud
    phase = 2 * np.pi * np.cumsum(np.interp(ts, t, f0)) / SR       # continuous phase of the fundamental
    out = np.zeros(N)
    for k in range(n_h):
        out += np.interp(ts, t, gain[:, k]) * np.sin((k + 1) * phase)
    r = np.random.default_rng((_TAG_SPEECH, 7, int(seed)))
    env_s = np.interp(ts, t, env)
    out += 0.03 * env_s * r.standard_normal(N)                    # aspiration, ~30 dB below the voice
    sos = butter(4, [2000, 7900], btype="band", fs=SR, output="sos")
    out += 0.4 * np.interp(ts, t, track["burst"]) * sosfilt(sos, r.standard_normal(N))
    return np.clip(0.3 * out, -1, 1).astype(np.float32)          # env 1 -> RMS 0.3


def _smooth_noise(r, T, sigma, scale):
    """Smooth random trajectory: white noise low-passed by a Gaussian (sigma frames), std `scale`.

    Normalised by the filter's stationary std, 1 / sqrt(2 sqrt(pi) sigma), not by the clip's own std:
    a clip shorter than the correlation length has a tiny sample std, and dividing by it blew a
    0.25 rad yaw up to several radians (heads seen from behind)."""
    x = gaussian_filter1d(r.standard_normal(T + 6 * int(sigma)), sigma, mode="nearest")[3 * int(sigma):][:T]
    return scale * x * math.sqrt(2 * math.sqrt(math.pi) * sigma)


def make_motion(seed, n_frames):
    """One clip's motion and audio.  -> (motion float32 [T, 12] in MOTION_KEYS order, audio float32 [640 T]).

    Pose, blink, gaze and brow are smooth random trajectories independent of the audio; mouth_open and
    mouth_width come from the same speech track as the audio (mouth_from_track, synth_audio).
    """
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"motion seed must be a non-negative int, got {seed!r}")
    T = int(n_frames)
    r = np.random.default_rng((_TAG_MOTION, int(seed)))
    m = np.zeros((T, len(MOTION_KEYS)), dtype=np.float64)
    col = {k: i for i, k in enumerate(MOTION_KEYS)}
    for key, sigma, scale in [("yaw", 10, 0.25), ("pitch", 10, 0.12), ("roll", 12, 0.08),
                              ("tx", 14, 0.04), ("ty", 14, 0.03)]:
        m[:, col[key]] = _smooth_noise(r, T, sigma, scale)
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
    m[:, col["blink_l"]], m[:, col["blink_r"]] = blink[:, 0], blink[:, 1]
    # Gaze: fixations held 0.3-1.2 s, joined by fast (2-frame) saccades over most of the eye.
    gz = np.zeros((T, 2)); k = 0
    while k < T:
        gz[k:] = r.uniform(-0.9, 0.9, 2); k += int(r.integers(8, 30))
    m[:, col["gaze_x"]] = gaussian_filter1d(gz[:, 0], 1.0, mode="nearest")
    m[:, col["gaze_y"]] = gaussian_filter1d(gz[:, 1], 1.0, mode="nearest") * 0.8
    # Brows: a slow raise/lower over the whole 0..1 range
    m[:, col["brow"]] = np.clip(0.4 + _smooth_noise(r, T, 8, 0.35), 0, 1)
    track = speech_track(seed, T)
    m[:, col["mouth_open"]], m[:, col["mouth_width"]] = mouth_from_track(track, T)
    return m.astype(np.float32), synth_audio(track, T, seed)


# Scripted clips that move ONE attribute each (evaluate.py's attribute-transfer table, infer.py's demo)
ATTRIBUTE_CLIPS = ("yaw", "pitch", "blink", "gaze", "brow", "lips")
ATTRIBUTE_SPLITS = {"tune": 0, "report": 50_000}  # offsets into TEST_IDS and the attribute motion seeds:
                                                  # settings are chosen on "tune", RESULTS.md reports "report"


def attribute_motion(attr, seed, T=32):
    """One attribute clip. -> (drive [T, 12], full [T, 12], audio float32 [640 T]): `drive` is what the
    driving frames show, `full` what the ground truth shows; they differ only for "lips", whose
    driving frames keep a closed mouth while the audio (and the ground truth) speak. Everything else
    stays at the neutral 0 of MOTION_KEYS; amplitudes match make_motion's ranges. Used by evaluate.py's
    attribute-transfer table and by demo_motion (infer.py's default clip)."""
    if attr not in ATTRIBUTE_CLIPS:
        raise ValueError(f"attribute must be one of {ATTRIBUTE_CLIPS}, got {attr!r}")
    r = np.random.default_rng((_TAG_ATTRIBUTE, ATTRIBUTE_CLIPS.index(attr), int(seed)))
    col = {k: i for i, k in enumerate(MOTION_KEYS)}
    t = np.arange(T) / T
    full = np.zeros((T, len(MOTION_KEYS)))
    audio = np.zeros(T * SPF, np.float32)                               # silence
    phase = r.uniform(0, 2 * np.pi)
    if attr in ("yaw", "pitch"):                                        # head turns / nods back and forth
        full[:, col[attr]] = (0.3 if attr == "yaw" else 0.15) * np.sin(2 * np.pi * 1.5 * t + phase)
    elif attr == "blink":                                               # 3 blinks of both eyes (fewer
        L = min(6, T)                                                   # in a short clip)
        starts = np.arange(T - L + 1)[1::7][:4] if T > L else np.zeros(1, int)
        for start in r.choice(starts, min(3, len(starts)), replace=False):
            prof = np.sin(np.pi * (np.arange(L) + 0.5) / L) ** 0.7
            full[start:start + L, col["blink_l"]] = full[start:start + L, col["blink_r"]] = prof
    elif attr == "gaze":                                                # saccades between fixations
        k = 0
        while k < T:
            full[k:, col["gaze_x"]], full[k:, col["gaze_y"]] = r.uniform(-0.9, 0.9), r.uniform(-0.7, 0.7)
            k += int(r.integers(6, 11))
    elif attr == "brow":                                                # a full raise and back
        full[:, col["brow"]] = 0.5 - 0.5 * np.cos(2 * np.pi * t * r.choice([1.0, 1.5]) + r.uniform(-0.3, 0.3))
    else:                                                               # lips: speech from the audio only
        track = speech_track(int(seed), T)
        full[:, col["mouth_open"]], full[:, col["mouth_width"]] = mouth_from_track(track, T)
        audio = synth_audio(track, T, int(seed))
    drive = full.copy()
    if attr == "lips":
        drive[:, [col["mouth_open"], col["mouth_width"]]] = 0.0
    return drive.astype(np.float32), full.astype(np.float32), audio


def demo_motion(n_frames, seed=0):
    """infer.py's default driving clip: every controllable attribute in turn (head turn, nod, blinks,
    gaze, brow raise; one attribute_motion clip each, n_frames / 5 frames long), while one speech track
    drives the mouth and the audio the whole time.  -> (motion float32 [T, 12], audio float32 [640 T])."""
    T = int(n_frames)
    if T < 10:
        raise ValueError(f"demo_motion needs at least 10 frames, got {T}")
    bounds = np.linspace(0, T, 6).round().astype(int)
    motion = np.zeros((T, len(MOTION_KEYS)), np.float32)
    for k, attr in enumerate(ATTRIBUTE_CLIPS[:5]):
        seg = slice(bounds[k], bounds[k + 1])
        _, full, _ = attribute_motion(attr, seed, seg.stop - seg.start)
        motion[seg] = full
    track = speech_track(int(seed), T)
    cols = [MOTION_KEYS.index("mouth_open"), MOTION_KEYS.index("mouth_width")]
    motion[:, cols[0]], motion[:, cols[1]] = mouth_from_track(track, T)
    return motion, synth_audio(track, T, int(seed))


# ===================================================================================================
# 3. The renderer: a shaded ellipsoid head with features painted in face space, ray-cast per pixel
# ===================================================================================================
@functools.lru_cache(maxsize=8)
def _grid(S):
    """Pixel-centre coordinates of an S x S canvas in [-1, 1], y pointing up.  -> (X, Y) float32 [S, S]."""
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
    s = (0.5 + 0.5 * Y)[..., None]                                       # 1 at the top, 0 at the bottom
    out = c1 * s + c2 * (1 - s)
    out.setflags(write=False)
    return out


def _rotation(yaw, pitch, roll):
    """World-from-head rotation R = Rz(roll) Ry(yaw) Rx(-pitch); head space: +z out of the face."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
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
OPEN_INNER_H = 0.17  # inner (dark) half-height at full opening (< LIP_H + OPEN_LIP_H: lips stay visible)
JAW_DROP = 0.15     # the mouth centre moves down by this much at full opening; = OPEN_LIP_H, so the
                    # upper lip stays put and only the lower lip and jaw move, as in real speech


# Eyes and brows (face units). Large on purpose (issue 18): at 64 px the eye is ~10 x 7 px, the iris
# ~5 px across and travels ~+-2.5 px with the gaze, a brow is ~2 px thick and rises ~3 px.
GAZE_U = 0.5        # iris centre travel at gaze_x = +-1, in eye half-widths
GAZE_V = 0.3        # ... at gaze_y = +-1, in eye half-heights
IRIS_R = 0.72       # iris radius in eye half-heights (the pupil has half of it)
BROW_GAP = 0.06     # brow centre above the top of the eye at brow = 0 (v units)
BROW_RAISE = 0.14   # extra height at brow = 1
BROW_H = 0.045      # brow half-thickness


def _mouth_geom(ident, m):
    """Mouth shape for one frame: centre height, outer half-width/height, inner half-width/height."""
    mw = ident.mouth_w * (1 + 0.2 * m["mouth_width"])
    # sqrt: typical speech openings are 0.1-0.4; the square root makes them 0.3-0.6 of the full
    # opening, i.e. a few pixels at 64 px instead of one (monotone, 0 and 1 unchanged)
    op = float(np.sqrt(np.clip(m["mouth_open"], 0, 1)))
    my = ident.mouth_y - JAW_DROP * op          # the jaw drops: the mouth centre moves down as it opens
    return my, mw, LIP_H + OPEN_LIP_H * op, 0.8 * mw, OPEN_INNER_H * op


def _ray_head(ident, m, dx, dy):
    """Orthographic rays (one per pixel of the head's window, offsets dx, dy from the head centre) against
    the ellipsoid head rotated by (yaw, pitch, roll). -> (rotation [3, 3], hit mask, u, v, w): the hit
    nearest the viewer mapped back to the unit sphere (face space: u right, v up, w out of the face)."""
    a, b, c = ident.head
    # Q = R^T (P - centre), P = (x, y, t), t -> viewer
    Rm = _rotation(m["yaw"], m["pitch"], m["roll"])
    R = Rm.tolist()                                                     # python floats keep arrays float32
    d = [R[2][i] / s_i for i, s_i in enumerate((a, b, c))]              # ray direction (R^T e_z) / s
    q = [(R[0][i] * dx + R[1][i] * dy) / s_i for i, s_i in enumerate((a, b, c))]  # ray origin at t=0, / s
    A = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    Bq = 2 * (q[0] * d[0] + q[1] * d[1] + q[2] * d[2])
    Cq = q[0] ** 2 + q[1] ** 2 + q[2] ** 2 - 1
    disc = Bq * Bq - 4 * A * Cq
    head = disc >= 0
    tt = (-Bq + np.sqrt(np.maximum(disc, 0))) / (2 * A)                 # the hit nearest the viewer
    u, v, w = q[0] + tt * d[0], q[1] + tt * d[1], q[2] + tt * d[2]      # hit point on the unit sphere
    return Rm, head, u, v, w


def _paint_face(ident, m, f, u, v, put):
    """Paint nose, mouth, eyes (lid, sclera, iris travelling with the gaze, pupil, lash) and brows as
    labels where `f` (front of the face, not hair) holds; put(mask, label). -> masks of the lips, eyes
    and brows. Label numbers: the palette order in render()."""
    NOSE, NOSTRIL, LIPS, LIPLINE, INNER, TEETH, SCLERA, IRIS, PUPIL, LID, LASH, BROW = range(2, 14)
    nw, nh = ident.nose
    nose_y = 0.5 * (ident.eye_y + ident.mouth_y) - 0.02
    put(f & ((u / nw) ** 2 + ((v - nose_y) / nh) ** 2 < 1), NOSE)
    for side in (-1, 1):
        put(f & (((u - side * 0.45 * nw) / (0.22 * nw)) ** 2 + ((v - nose_y + 0.7 * nh) / (0.18 * nh)) ** 2 < 1), NOSTRIL)
    my, mw, mry, iw, iry = _mouth_geom(ident, m)
    lips = f & ((u / mw) ** 2 + ((v - my) / mry) ** 2 < 1)
    put(lips, LIPS)
    put(f & (np.abs(v - my) < 0.012) & (np.abs(u) < iw), LIPLINE)       # where the lips meet
    if iry > 1e-4:
        inner = f & ((u / iw) ** 2 + ((v - my) / iry) ** 2 < 1)
        put(inner, INNER)
        put(inner & (v > my + 0.45 * iry), TEETH)                        # upper teeth
    masks = {}
    for side, key in ((-1, "l"), (1, "r")):
        ex = side * ident.eye_dx
        eu, ev = (u - ex) / ident.eye_rx, (v - ident.eye_y) / ident.eye_ry
        eye = f & (eu * eu + ev * ev < 1)
        lid = 1 - 2 * float(np.clip(m["blink_" + key], 0, 1))          # lid edge in ev units (1 open, -1 shut)
        seen = eye & (ev < lid)
        put(eye, LID)                                                   # the closed part: a darker lid
        put(seen, SCLERA)
        gu = ex + GAZE_U * ident.eye_rx * m["gaze_x"]                   # the iris travels with the gaze
        gv = ident.eye_y + GAZE_V * ident.eye_ry * m["gaze_y"]
        rr = ((u - gu) ** 2 + (v - gv) ** 2) * (1 / (IRIS_R * ident.eye_ry) ** 2)
        put(seen & (rr < 1), IRIS)
        put(seen & (rr < 0.25), PUPIL)
        put(eye & (np.abs(ev - lid) < 0.2), LASH)                       # lash line at the lid edge
        by = ident.eye_y + ident.eye_ry + BROW_GAP + BROW_RAISE * m["brow"]
        brow = f & (np.abs(v - by - 0.03 * (1 - eu * eu)) < BROW_H) & (np.abs(eu) < 1.15)
        put(brow, BROW)
        masks["eye_" + key], masks["brow_" + key] = eye, brow
    masks["mouth"] = lips
    return masks


def render(ident, motion, size=64, ss=None, return_masks=False):
    """Render one frame of `ident` with one frame of `motion` (dict or [12] vector).  -> uint8 [H, W, 3].

    How: each pixel casts an orthographic ray at an ellipsoid head rotated by (yaw, pitch, roll); the
    hit point, mapped back to the unit sphere, gives face-space coordinates (u, v) where eyes, brows,
    nose, mouth and hair are simple implicit shapes. Pose therefore foreshortens features and
    moves the silhouette like a 3-D head. Rendering happens at size*ss and is box-averaged down
    (supersampled anti-aliasing). return_masks=True also returns bool [H, W] masks
    {head, face, hair, eye_l, eye_r, brow_l, brow_r, mouth} (coverage > 1/2) for tests and region losses.
    Speed: head pixels get a small integer label per layer (painter's order) and one palette lookup at
    the end, which is ~3x cheaper in numpy than assigning RGB triples layer by layer.
    """
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    m = _motion_dict(motion)
    ss = ss or (3 if size <= 96 else 2)
    S = size * ss
    X, Y = _grid(S)
    img = _background(ident, S).copy()                                  # [S, S, 3]
    a, b, c = ident.head
    cx, cy = m["tx"], m["ty"] + HEAD_Y
    skin_c, hair_c = np.array(ident.skin, np.float32), np.array(ident.hair, np.float32)
    # ---- neck and torso: image-plane shapes that follow tx / ty
    img[(np.abs(X - 0.8 * cx) < 0.42 * a) & (Y < cy - 0.5 * b)] = 0.75 * skin_c           # neck
    img[((X - 0.5 * cx) / 0.9) ** 2 + ((Y + 1.3) / 0.5) ** 2 < 1] = ident.shirt            # shoulders
    # ---- everything below lives inside the head's bounding square (radius = largest semi-axis):
    # a window view of the canvas, so the work scales with the head's area, not the image's
    dx, dy = X - np.float32(cx), Y - np.float32(cy)
    rad = max(a, b, c) * 1.02
    r0, r1 = np.searchsorted(-Y[:, 0], [-(cy + rad), -(cy - rad)])
    c0, c1 = np.searchsorted(X[0], [cx - rad, cx + rad])
    win = (slice(r0, r1), slice(c0, c1))
    dx, dy = dx[win], dy[win]
    Rm, head, u, v, w = _ray_head(ident, m, dx, dy)
    # ---- face-space shapes (u right, v up, w out of the face), painted as labels in painter's order
    pal = [skin_c, hair_c, 0.88 * skin_c, 0.45 * skin_c, ident.lips, (0.25, 0.08, 0.08),
           (0.2, 0.04, 0.05), (0.92, 0.9, 0.85), (0.97, 0.97, 0.95), ident.iris, (0.02, 0.02, 0.02),
           0.78 * skin_c, (0.08, 0.05, 0.05), 0.35 * hair_c + 0.02]
    SKIN, HAIR = 0, 1                                                   # the rest: _paint_face
    lab = np.zeros(head.shape, np.uint8)                                # SKIN everywhere to start
    put = lambda mask, k: np.copyto(lab, k, where=mask)
    front = head & (w > 0)
    hair = head & ((v > ident.hairline + 0.15 * u * u - 0.06 * ident.parting * u) | (w < -0.2 + 0.4 * v))
    put(hair, HAIR)
    f = front & ~hair                                                   # where features may appear
    masks = _paint_face(ident, m, f, u, v, put)
    # ---- Lambert shading; the ellipsoid normal is grad sum (Q_i / s_i)^2 ~ (u / a, v / b, w / c)
    Ll = (Rm.T @ LIGHT).tolist()                                        # light direction in head space
    un, vn, wn = u[head] * (1 / a), v[head] * (1 / b), w[head] * (1 / c)
    lam = np.clip((un * Ll[0] + vn * Ll[1] + wn * Ll[2]) / np.sqrt(un * un + vn * vn + wn * wn), 0, 1)
    pal = np.array(pal, dtype=np.float32)
    img[win][head] = np.take(pal, lab[head], axis=0) * (0.55 + 0.5 * lam)[:, None]
    out = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))          # supersampled anti-aliasing
    out = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    if not return_masks:
        return out
    masks.update(head=head, face=f, hair=hair)
    full = {}
    for k, mk in masks.items():                                         # window -> full canvas
        full[k] = np.zeros((S, S), bool)
        full[k][win] = mk
    return out, {k: mk.reshape(size, ss, size, ss).mean(axis=(1, 3)) > 0.5 for k, mk in full.items()}


LANDMARK_NAMES = ("eye_l", "eye_r", "eye_l_top", "eye_r_top", "eye_l_bottom", "eye_r_bottom",
                  "brow_l", "brow_r", "nose", "mouth_l", "mouth_r", "mouth_top", "mouth_bottom", "chin")


def landmarks(ident, motion, size=64):
    """Forward-project named face-space points to pixels (the renderer's ground-truth landmarks).

    -> (xy float32 [14, 2] in pixel units, x right / y down, pixel centres at i + 0.5, and
        visible bool [14]: the surface faces the camera). Order: LANDMARK_NAMES. Eye 'top' is the
    current lid edge, mouth top/bottom the inner lip edges (they meet when the mouth is closed).
    """
    m = _motion_dict(motion)
    my, mw, _, _, iry = _mouth_geom(ident, m)
    brow_v = ident.eye_y + ident.eye_ry + BROW_GAP + BROW_RAISE * m["brow"] + 0.03  # arch top, as in render
    lid = lambda k: ident.eye_y + ident.eye_ry * (1 - 2 * float(np.clip(m["blink_" + k], 0, 1)))
    dx = ident.eye_dx
    uv = np.array([(-dx, ident.eye_y), (dx, ident.eye_y), (-dx, lid("l")), (dx, lid("r")),
                   (-dx, ident.eye_y - ident.eye_ry), (dx, ident.eye_y - ident.eye_ry),
                   (-dx, brow_v), (dx, brow_v), (0, 0.5 * (ident.eye_y + ident.mouth_y) - 0.02),
                   (-mw, my), (mw, my), (0, my + iry), (0, my - iry), (0, -0.92)])
    w = np.sqrt(np.clip(1 - (uv ** 2).sum(1), 0, None))
    Q = np.stack([uv[:, 0], uv[:, 1], w], 1) * np.array(ident.head)    # on the ellipsoid, head space
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


def bench_render(sizes=(64, 256), n=20):
    """Print and return rendering speed {size: frames per second} for one random identity and motion."""
    ident = make_identity(0)
    motion, _ = make_motion(0, n)
    out = {}
    for size in sizes:
        render(ident, motion[0], size)                                   # warm caches (grid, background)
        t0 = time.perf_counter()
        for mk in motion:
            render(ident, mk, size)
        out[size] = n / (time.perf_counter() - t0)
        print(f"render {size}x{size}: {out[size]:.1f} frames/s (1 thread, supersampling x{3 if size <= 96 else 2})")
    t0 = time.perf_counter()
    make_motion(1, 50)
    print(f"motion + audio for a 2 s clip: {1000 * (time.perf_counter() - t0):.1f} ms")
    return out


# ===================================================================================================
# 4. Torch datasets (one sample format for procedural and real clips)
# ===================================================================================================
def clip_sample(frames, audio, identity=0, extra=None):
    """Shared sample format from uint8 frames [T, H, W, 3] and audio float32 [640 T]: frames float32
    [T, 3, H, W] in [-1, 1] (G's range), audio, mel float32 [T, 1, 80, 16] (audio.mel_windows of the
    whole clip), identity int, plus the entries of `extra`."""
    import audio as audio_mod  # lazy: audio.py pulls in its networks; only samples need the mel
    T = len(frames)
    if len(audio) != T * SPF:
        raise ValueError(f"{T} frames need {T * SPF} audio samples, got {len(audio)}")
    mel = audio_mod.mel_windows(audio_mod.melspectrogram(audio), T, fps=FPS)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = dict(frames=x, audio=torch.from_numpy(np.asarray(audio, dtype=np.float32)),
               mel=torch.from_numpy(np.asarray(mel, dtype=np.float32)), identity=int(identity))
    out.update(extra or {})
    return out


class SyntheticTalkingFaces(torch.utils.data.Dataset):
    """Procedural talking heads. Clip i = identity (i // clips_per_identity) of the split, speaking
    with motion seed (split base + i). Deterministic: the same arguments give the same pixels.

    sample = dict(frames [T,3,H,W] in [-1,1], audio [640T], mel [T,1,80,16], identity int (index in the
    split), identity_seed, motion_seed, motion float32 [T,12] (MOTION_KEYS)). cross(i, j) gives the
    ground truth for identity of clip i driven by clip j's motion and audio.
    """

    def __init__(self,
                 split="train",          # "train" | "test": disjoint identity AND motion seed ranges
                 n_identities=100,       # people in this split
                 clips_per_identity=10,  # motion clips per person
                 n_frames=32,            # clip length T at 25 fps
                 size=64,                # output resolution (64 = tiny preset, 256 = paper)
                 ss=None,                # supersampling factor; None = 3 at <= 96 px, else 2
                 cache_dir=None):        # folder for rendered clips (npz); None = render every time
        if split not in _MOTION_BASE:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        ids = TRAIN_IDS if split == "train" else TEST_IDS
        if not 1 <= n_identities <= len(ids):
            raise ValueError(f"n_identities must be in 1..{len(ids)}, got {n_identities}")
        if clips_per_identity < 1 or n_frames < 1:
            raise ValueError("clips_per_identity and n_frames must be >= 1")
        self.split, self.n_identities, self.clips_per_identity = split, n_identities, clips_per_identity
        self.n_frames, self.size, self.ss = int(n_frames), int(size), ss
        self.identity_seeds = [ids[k] for k in range(n_identities)]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __len__(self):
        return self.n_identities * self.clips_per_identity

    def _check(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        return i % len(self)

    def motion_seed(self, i):
        return _MOTION_BASE[self.split] + self._check(i)

    def identity(self, i):
        return make_identity(self.identity_seeds[self._check(i) // self.clips_per_identity])

    def __getitem__(self, i):
        return self.cross(i, i)

    def cross(self, i, j):
        """Identity of clip i, motion + audio of clip j: cross-identity reenactment ground truth."""
        ident, ms = self.identity(i), self.motion_seed(j)

        def make():
            motion, audio = make_motion(ms, self.n_frames)
            return dict(frames=render_clip(ident, motion, self.size, self.ss), motion=motion, audio=audio)

        z = self._cached(f"id{ident.seed}_m{ms}", make)
        return clip_sample(z["frames"], z["audio"], self._check(i) // self.clips_per_identity,
                           dict(identity_seed=ident.seed, motion_seed=ms, motion=torch.from_numpy(z["motion"])))

    def mouth_of(self, i, j):
        """Frames of clip i with the mouth (mouth_open, mouth_width) of clip j's motion, or closed when
        j is None: uint8 [T, H, W, 3] (train.py's --drive_mouth swap / closed: driving frames whose
        mouth says nothing about the audio)."""
        ident, ms = self.identity(i), self.motion_seed(i)
        donor = None if j is None else self.motion_seed(j)

        def make():
            own = make_motion(ms, self.n_frames)[0]
            motion = mouth_swapped(own, np.zeros_like(own) if donor is None else make_motion(donor, self.n_frames)[0])
            return dict(frames=render_clip(ident, motion, self.size, self.ss))

        return self._cached(f"id{ident.seed}_m{ms}_mouth{'closed' if donor is None else donor}", make)["frames"]

    def feature_masks(self, i):
        """Where clip i's eyes, brows and mouth are, frame by frame: bool [T, H, W] (render's masks;
        the per-pixel weight of train.py's --feature_weight)."""
        ident, ms = self.identity(i), self.motion_seed(i)

        def make():
            motion = make_motion(ms, self.n_frames)[0]
            masks = [render(ident, mk, self.size, self.ss, return_masks=True)[1] for mk in motion]
            keys = ("eye_l", "eye_r", "brow_l", "brow_r", "mouth")
            return dict(masks=np.stack([np.logical_or.reduce([m[k] for k in keys]) for m in masks]))

        return self._cached(f"id{ident.seed}_m{ms}_features", make)["masks"]

    def _cached(self, stem, make):
        """make() -> dict of arrays, stored once as cache_dir/<stem>_T.._s..npz (the key holds everything
        the pixels depend on) and read back on later calls; without a cache_dir make() every time."""
        if self.cache_dir is None:
            return make()
        path = self.cache_dir / f"{stem}_T{self.n_frames}_s{self.size}x{self.ss or 0}.npz"
        if path.exists():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        out = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: np.savez(tmp, **out))
        return out


def mouth_swapped(motion, donor):
    """motion [T, 12] with mouth_open / mouth_width taken from `donor` [T, 12] (the FC-TFG stage's
    driving frames under --drive_mouth swap: their mouth says nothing about the audio)."""
    out = np.array(motion, dtype=np.float32, copy=True)
    cols = [MOTION_KEYS.index("mouth_open"), MOTION_KEYS.index("mouth_width")]
    out[:, cols] = np.asarray(donor, dtype=np.float32)[:, cols]
    return out


def split_reference(sample):
    """PC-AVS protocol (Sec. 4.2.3): the first frame is the identity reference x_s; all frames drive
    (pose/expression x_d) and are the ground truth; the clip's own audio drives the lips (x_a = mel)."""
    return dict(x_s=sample["frames"][0], x_d=sample["frames"], x_a=sample["mel"], x_gt=sample["frames"])


# ===================================================================================================
# 5. Video / audio I/O (PyAV optional, soundfile required)
# ===================================================================================================
def require_av():
    try:
        import av  # optional: decoding/encoding mp4 needs FFmpeg through PyAV
    except ImportError:
        raise ImportError("reading/writing video needs PyAV: `pip install av`") from None
    return av


def write_wav(path, audio, sr=SR):
    """Write mono float audio as 16-bit PCM wav, atomically (temporary name, then rename)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or not np.all(np.isfinite(audio)):
        raise ValueError(f"audio must be a finite 1-D array, got shape {audio.shape}")
    write_atomic(path, lambda tmp: sf.write(tmp, audio, int(sr), subtype="PCM_16", format="WAV"))


def read_wav(path):
    """-> (float32 mono [N], sr). Stereo is averaged."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        raise ValueError(f"cannot read audio {path}: {e}") from None
    return x.mean(1), int(sr)


def write_video(path, frames, fps=FPS, audio=None, sr=SR, crf=18):
    """Write uint8 frames [T, H, W, 3] (+ optional mono float audio) as H.264 yuv420p + AAC mp4, atomically.

    H and W must be even (yuv420p halves the chroma planes). Audio is encoded in 1024-sample AAC frames
    interleaved with the video so long clips need no muxer buffering.
    """
    av = require_av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {H}x{W}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or not np.all(np.isfinite(audio)):
            raise ValueError(f"audio must be a finite 1-D array, got shape {audio.shape}")
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as out:
            vs = out.add_stream("libx264", rate=rate)
            vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
            vs.options = {"crf": str(crf)}
            if audio is not None:
                ast = out.add_stream("aac", rate=int(sr), layout="mono")
            apos = 0
            for k in range(T):
                vf = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
                vf.pts = k
                vf.time_base = 1 / rate
                out.mux(vs.encode(vf))
                if audio is not None:  # audio up to the end of this frame, whole 1024-sample AAC frames
                    end = len(audio) if k == T - 1 else min(len(audio), int((k + 1) / rate * sr))
                    while apos < end and (end - apos >= 1024 or k == T - 1):
                        chunk = audio[apos:apos + 1024]
                        af = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
                        af.sample_rate, af.pts, af.time_base = int(sr), apos, Fraction(1, int(sr))
                        out.mux(ast.encode(af))
                        apos += len(chunk)
            out.mux(vs.encode(None))
            if audio is not None:
                out.mux(ast.encode(None))
    write_atomic(path, write)


def nearest_frame_indices(times, fps, duration):
    """Constant-rate resampling by timestamps: output frame k = source frame nearest to k / fps,
    K = floor(duration * fps) (never index * average_rate, which drifts on VFR video).  -> int [K]."""
    times = np.asarray(times, dtype=np.float64)
    K = int(math.floor(duration * fps + 1e-6))
    tk = np.arange(K) / fps
    j = np.clip(np.searchsorted(times, tk), 1, len(times) - 1) if len(times) > 1 else np.zeros(K, int)
    if len(times) > 1:
        j = np.where(np.abs(times[j - 1] - tk) <= np.abs(times[j] - tk), j - 1, j)
    return j.astype(np.int64)


def read_video(path, fps=None, sr=None, need_audio=False):
    """Decode a video file with PyAV.  -> (frames uint8 [T, H, W, 3], fps, audio float32 [N] or None, sr).

    fps=None keeps every decoded frame (fps = the stream's average rate); fps=25 resamples by timestamps
    (nearest frame to k/25). sr=None keeps the audio's own rate, else resamples to mono at `sr`. Audio is
    placed on the video clock (t=0 at the first video frame, samples before it dropped); when fps is
    given it is padded/trimmed to exactly T * sr / fps samples. Encoder priming of AAC is handled by the
    mp4 edit list, which FFmpeg honours.
    """
    av = require_av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    imgs, times, chunks, a_start, rate = [], [], [], None, None
    try:
        with av.open(str(path)) as cont:
            if not cont.streams.video:
                raise ValueError(f"{path} has no video stream")
            vs = cont.streams.video[0]
            vs.thread_type = "AUTO"
            streams = [vs]
            ast = cont.streams.audio[0] if cont.streams.audio else None
            if ast is not None:
                streams.append(ast)
                resampler = None
            for frame in cont.decode(*streams):
                if isinstance(frame, av.VideoFrame):
                    img = frame.to_ndarray(format="rgb24")
                    rot = int(round(getattr(frame, "rotation", 0) or 0)) // 90  # phone video (unverified sign)
                    imgs.append(np.rot90(img, k=rot) if rot else img)
                    times.append(frame.time if frame.time is not None else len(times) / float(vs.average_rate or FPS))
                else:
                    if resampler is None:
                        rate = int(sr or frame.sample_rate)
                        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
                        a_start = frame.time or 0.0
                    chunks += [f.to_ndarray()[0] for f in resampler.resample(frame)]
            if ast is not None and resampler is not None:
                chunks += [f.to_ndarray()[0] for f in resampler.resample(None)]
            avg = float(vs.average_rate) if vs.average_rate else None
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None
    if not imgs:
        raise ValueError(f"{path} contains no video frames")
    if need_audio and not chunks:
        raise ValueError(f"{path} has no audio track, but audio is required")
    v0 = times[0]
    times = np.asarray(times) - v0                                      # t = 0 at the first video frame
    src_fps = avg or (len(times) - 1) / max(times[-1], 1e-6)
    if fps is not None:
        idx = nearest_frame_indices(times, fps, times[-1] + 1.0 / src_fps)
        frames, out_fps = np.stack([imgs[j] for j in idx]), float(fps)
    else:
        frames, out_fps = np.stack(imgs), src_fps
    audio = None
    if chunks:
        audio = np.concatenate(chunks).astype(np.float32)
        off = int(round((a_start - v0) * rate))                         # audio start on the video clock
        audio = np.concatenate([np.zeros(max(off, 0), np.float32), audio[max(-off, 0):]])
        if fps is not None:
            n = int(round(len(frames) * rate / fps))
            audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]
    return frames, out_fps, audio, rate


# ===================================================================================================
# 6. Real videos: FOMM-style preparation (Sec. 4.1.1 "pre-processing procedure proposed in [51]")
# ===================================================================================================
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DLIB_BOX_SCALE = 1.3  # dlib boxes (brows to chin) are tighter than FOMM's S3FD boxes; our uncalibrated guess


def dlib_detector(upsample=0):
    """dlib's frontal HOG face detector as `detect(rgb uint8 [H, W, 3]) -> list of (l, t, r, b)`, largest
    first. It finds faces of roughly >= 80 px; pass upsample=1 for smaller ones (4x slower)."""
    try:
        import dlib  # optional: `pip install dlib-bin` (prebuilt wheels)
    except ImportError:
        raise ImportError("face detection needs dlib: `pip install dlib-bin`, or pass detector=...") from None
    det = dlib.get_frontal_face_detector()

    def detect(rgb):
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in det(gray, upsample)]
        boxes = [_scale_box(bx, DLIB_BOX_SCALE) for bx in boxes]
        return sorted(boxes, key=lambda bx: -(bx[2] - bx[0]) * (bx[3] - bx[1]))
    return detect


def _scale_box(box, k):
    l, t, r, b = box
    cx, cy, hw, hh = (l + r) / 2, (t + b) / 2, k * (r - l) / 2, k * (b - t) / 2
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def iou(a, b):
    """Intersection over union of two (l, t, r, b) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def fomm_enlarge(box, increase=0.1):
    """FOMM crop enlargement (video-preprocessing util.py, spec data.md Sec. 2): with i = increase,
    wi = max(i, ((1+2i)h - w) / 2w), hi = max(i, ((1+2i)w - h) / 2h); each side grows by wi*w and hi*h.
    The result is a square of side (1 + 2i) max(w, h) around the box centre."""
    l, t, r, b = box
    w, h = r - l, b - t
    if w <= 0 or h <= 0:
        raise ValueError(f"degenerate box {box}")
    wi = max(increase, ((1 + 2 * increase) * h - w) / (2 * w))
    hi = max(increase, ((1 + 2 * increase) * w - h) / (2 * h))
    return (l - wi * w, t - hi * h, r + wi * w, b + hi * h)


def crop_square(frames, box, size, strict=False):
    """Crop one square box from every frame and resize to size x size (PIL LANCZOS, anti-aliased).

    strict=True is FOMM parity: a box leaving the frame -> ValueError. Otherwise the box is shifted
    inside the frame, and if it is larger than the frame the frame is edge-padded.
    -> (uint8 [T, size, size, 3], integer box used (l, t, r, b) in source pixels, padded flag).
    """
    _, H, W, _ = frames.shape
    l, t, r, b = box
    side = int(round(max(r - l, b - t)))
    l, t = int(round((l + r - side) / 2)), int(round((t + b - side) / 2))
    out_of_frame = l < 0 or t < 0 or l + side > W or t + side > H
    if strict and out_of_frame:
        raise ValueError("enlarged face box leaves the frame (FOMM rejects such clips)")
    padded = side > W or side > H
    if padded:
        p = (side - min(H, W) + 1) // 2 + 1
        frames = np.pad(frames, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        l, t, H, W = l + p, t + p, H + 2 * p, W + 2 * p
    l, t = min(max(l, 0), W - side), min(max(t, 0), H - side)      # shift inside the frame
    out = np.stack([np.asarray(Image.fromarray(f[t:t + side, l:l + side]).resize((size, size), Image.LANCZOS))
                    for f in frames])
    p = p if padded else 0
    return out, (l - p, t - p, l - p + side, t - p + side), padded


def face_track(frames, detector, every=5, max_missing=0.25):
    """Detect on every `every`-th frame (every frame for clips under 2 s), on copies downscaled to a long
    side <= 640; keep per frame the box with max IoU to the previous pick (the largest at first).
    -> boxes float [n_detected, 4] of the frames where a face was found, in source pixels.
    Raises ValueError when more than `max_missing` of the probed frames have no face."""
    T, H, W, _ = frames.shape
    every = 1 if T < 2 * FPS else every
    k = min(1.0, 640 / max(H, W))
    boxes, probed, prev = [], 0, None
    for i in range(0, T, every):
        img = frames[i] if k == 1 else np.asarray(Image.fromarray(frames[i]).resize((round(W * k), round(H * k)), Image.BILINEAR))
        found = [tuple(c / k for c in bx) for bx in detector(img)]
        probed += 1
        if found:
            prev = found[0] if prev is None else max(found, key=lambda bx: iou(bx, prev))
            boxes.append(prev)
    missing = 1 - len(boxes) / probed
    if not boxes or missing > max_missing:
        raise ValueError(f"no face in {100 * missing:.0f}% of the probed frames")
    return np.array(boxes, dtype=np.float64)


def path_info(rel):
    """Identity (and MEAD emotion/level/view) from a path relative to the source root.
    VoxCeleb2 .../idNNNNN/<yt id>/NNNNN.mp4 -> idNNNNN; MEAD <actor>/video/<view>/<emotion>/level_n/NNN.mp4
    -> actor M0xx/W0xx; anything else -> its first folder (or the file stem)."""
    parts = Path(rel).parts
    info = dict(identity=parts[0] if len(parts) > 1 else Path(rel).stem)
    for i, part in enumerate(parts[:-1]):
        if (part.startswith("id") and part[2:].isdigit()) or (len(part) == 4 and part[0] in "MW" and part[1:].isdigit()):
            info["identity"] = part
            if parts[i + 1:i + 2] == ("video",) and len(parts) >= i + 6:   # MEAD layout
                info.update(view=parts[i + 2], emotion=parts[i + 3], level=parts[i + 4])
            break
    return info


def mead_audio_path(src):
    """MEAD keeps audio apart: <actor>/audio/<emotion>/level_n/NNN.m4a for <actor>/video/<view>/... ."""
    p = Path(src).parts
    if len(p) >= 6 and p[-5] == "video":
        return Path(*p[:-5], "audio", p[-3], p[-2], Path(p[-1]).with_suffix(".m4a").name)
    return None


def prepare_one(src, dst_stem, size=256, detector=None, min_frames=64, min_face=64, strict=False):
    """Prepare one video: 25 fps, 16 kHz mono, one FOMM box per clip (union of the detections, enlarged,
    square), resized; writes dst_stem.mp4 (+AAC), dst_stem.wav (the master audio) and dst_stem.json.
    A video without an audio track uses MEAD's separate audio file when there is one (both assumed to
    start at t = 0). Raises ValueError with the reason when the clip must be skipped. -> the JSON record."""
    side_audio = mead_audio_path(src)
    side_audio = side_audio if side_audio is not None and side_audio.is_file() else None
    frames, _, audio, _ = read_video(src, fps=FPS, sr=SR, need_audio=side_audio is None)
    K = len(frames)
    if audio is None and side_audio is not None:
        import audio as audio_mod  # lazy: only MEAD needs it (m4a via PyAV, 48 kHz stereo -> 16 kHz mono)
        audio = audio_mod.load_audio(side_audio, SR)
        if abs(len(audio) / SR - K / FPS) > 1 / FPS + 0.5:  # sanity: the two files belong together
            raise ValueError(f"audio {side_audio} lasts {len(audio) / SR:.2f} s, video {K / FPS:.2f} s")
        audio = np.pad(audio, (0, max(0, K * SPF - len(audio))))[:K * SPF]
    if K < min_frames:
        raise ValueError(f"too short: {K} frames < {min_frames}")
    boxes = face_track(frames, detector or dlib_detector())
    union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())  # tube box
    if max(union[2] - union[0], union[3] - union[1]) < min_face:
        raise ValueError(f"face too small: {union[2] - union[0]:.0f} px < {min_face}")
    crop, box, padded = crop_square(frames, fomm_enlarge(union), size, strict=strict)
    dst_stem = Path(dst_stem)
    dst_stem.parent.mkdir(parents=True, exist_ok=True)
    write_video(dst_stem.with_suffix(".mp4"), crop, FPS, audio, SR)
    write_wav(dst_stem.with_suffix(".wav"), audio, SR)
    return dict(status="ok", source=str(src), n_frames=K, n_samples=len(audio), fps=FPS, sr=SR,
                size=size, box_ltrb=[int(c) for c in box], source_size=[frames.shape[2], frames.shape[1]],
                padded=padded, min_iou_to_first=float(min(iou(boxes[0], bx) for bx in boxes)),
                audio_source=str(side_audio or src), detector=getattr(detector, "__name__", "dlib"))


def _write_json(path, record):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def prepare(src_dir, dst_dir, size=256, detector=None, min_frames=64, min_face=64, strict=False, log=print,
            glob="**/*"):
    """Prepare every video under src_dir into dst_dir, mirroring the folder layout (so VoxCeleb2's
    idNNNNN/<yt id>/NNNNN.mp4 and MEAD's <actor>/video/front/<emotion>/level_n/NNN.mp4 keep their
    identity in the path). Every file gets a JSON record, ok or skipped with the reason; files that
    already have one are skipped, so an interrupted run resumes. One bad file never aborts the run.
    `glob` selects files, e.g. "*/video/front/**/*.mp4" for MEAD's frontal views. -> (n_ok, n_skipped)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source folder not found: {src_dir}")
    files = sorted(p for p in src_dir.glob(glob) if p.suffix.lower() in VIDEO_EXTS and not p.name.startswith("."))
    n_ok = n_skip = 0
    for i, src in enumerate(files):
        stem = dst_dir / src.relative_to(src_dir).with_suffix("")
        rec_path = stem.with_suffix(".json")
        if rec_path.exists():
            log(f"[{i + 1}/{len(files)}] {src}: done before"); continue
        t0 = time.time()
        try:
            rec = prepare_one(src, stem, size, detector, min_frames, min_face, strict)
            rec.update(path_info(src.relative_to(src_dir)))
            n_ok += 1
            log(f"[{i + 1}/{len(files)}] {src}: ok, {rec['n_frames']} frames ({time.time() - t0:.1f} s)")
        except (ValueError, OSError) as e:  # unreadable, no audio, no face, too short, ...
            rec = dict(status="skipped", source=str(src), reason=str(e))
            n_skip += 1
            log(f"[{i + 1}/{len(files)}] {src}: SKIPPED ({e})")
        stem.parent.mkdir(parents=True, exist_ok=True)
        _write_json(rec_path, rec)
    log(f"prepare: {n_ok} ok, {n_skip} skipped, {len(files) - n_ok - n_skip} done before")
    return n_ok, n_skip


MEAD_EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised")


def mead_clip_list(root, n_speakers=5, n_clips=5, seed=0):
    """The paper's MEAD test set (Sec. 4.1.1): 5 random speakers x 8 emotions x 5 frontal clips.
    Intensity is unspecified in the paper; we use level_3 (neutral only has level_1). Store the seed.
    -> sorted list of video paths."""
    root = Path(root)
    actors = sorted(p.name for p in root.iterdir() if (p / "video" / "front").is_dir()) if root.is_dir() else []
    if len(actors) < n_speakers:
        raise ValueError(f"need {n_speakers} MEAD actors with video/front under {root}, found {len(actors)}")
    r = np.random.default_rng(seed)
    out = []
    for actor in sorted(r.choice(actors, n_speakers, replace=False)):
        for emo in MEAD_EMOTIONS:
            d = root / actor / "video" / "front" / emo / ("level_1" if emo == "neutral" else "level_3")
            clips = sorted(d.glob("*.mp4"))
            if len(clips) < n_clips:
                raise ValueError(f"{d}: need {n_clips} clips, found {len(clips)}")
            out += [clips[j] for j in sorted(r.choice(len(clips), n_clips, replace=False))]
    return out


class VideoFolderDataset(torch.utils.data.Dataset):
    """Clips written by `prepare` (JSON status ok + mp4 + wav), in the procedural set's sample format
    (frames, audio, mel, identity; no `motion`: real clips have no motion ground truth).
    n_frames=None returns whole clips; an int returns a window of that length (a start drawn once per
    clip from `seed` when random_window, else the first frames). Identity = index of the JSON's `identity` in sorted order.
    only: the clips to keep (paths with or without suffix, e.g. mead_clip_list(root) for the paper's
    MEAD test set); every one must be prepared."""

    def __init__(self, root, n_frames=None, random_window=True, only=None, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"prepared data folder not found: {root}")
        keep = None if only is None else {Path(p).with_suffix("") for p in only}   # e.g. mead_clip_list(root)
        self.items = []
        for p in sorted(root.rglob("*.json")):
            rec = json.loads(p.read_text())
            if keep is not None and p.with_suffix("") not in keep:
                continue
            if rec.get("status") == "ok" and (n_frames is None or rec["n_frames"] >= n_frames):
                self.items.append((p.with_suffix(""), rec))
        if keep is not None and len(self.items) != len(keep):
            raise ValueError(f"{len(keep) - len(self.items)} of the {len(keep)} listed clips are not prepared "
                             f"(status 'ok') under {root}")
        if not self.items:
            raise ValueError(f"no prepared clips (JSON with status 'ok') under {root}")
        self.identities = sorted({rec["identity"] for _, rec in self.items})
        self.n_frames, self.random_window, self.seed = n_frames, random_window, int(seed)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        stem, rec = self.items[i]
        frames, _, _, _ = read_video(stem.with_suffix(".mp4"))
        audio, sr = read_wav(stem.with_suffix(".wav"))
        if sr != SR:
            raise ValueError(f"{stem}.wav is {sr} Hz, expected {SR}")
        K = min(len(frames), len(audio) // SPF)   # H.264 keeps all frames; guard anyway
        T = self.n_frames or K
        # the window of clip i is drawn once from (seed, i), not from a global RNG: item i is a pure
        # function of i, so a resumed run, prefetching threads and train.ClipWindows' cache all see
        # the same frames (exact resume)
        s = int(np.random.default_rng((self.seed, i)).integers(0, K - T + 1)) if self.random_window else 0
        return clip_sample(frames[s:s + T], audio[s * SPF:(s + T) * SPF],
                       self.identities.index(rec["identity"]), dict(path=str(stem), start=s))


# ===================================================================================================
# 7. Command line
# ===================================================================================================
def main(argv=None):
    ap = argparse.ArgumentParser(description="FC-TFG data: prepare real videos, benchmark or preview the procedural set")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="crop/resample a folder of videos (FOMM-style)")
    p.add_argument("src", help="folder of source videos (VoxCeleb2 / MEAD layout, Sec. 4.1.1)")
    p.add_argument("dst", help="output folder: mp4 + wav + JSON per clip, mirroring the source paths")
    p.add_argument("--size", type=int, default=256, help="output side in pixels (the paper's 256)")
    p.add_argument("--min-frames", type=int, default=64, help="skip clips shorter than this (25 fps frames)")
    p.add_argument("--min-face", type=int, default=64, help="minimum tube box side in source pixels")
    p.add_argument("--strict", action="store_true", help="FOMM parity: reject boxes leaving the frame")
    p.add_argument("--glob", default="**/*", help='files to take, e.g. "*/video/front/**/*.mp4" (MEAD)')
    b = sub.add_parser("bench", help="rendering speed in frames/s")
    b.add_argument("--frames", type=int, default=20, help="frames to render per size")
    v = sub.add_parser("preview", help="write one procedural clip as mp4")
    v.add_argument("out", help="mp4 to write")
    v.add_argument("--identity", type=int, default=0, help="identity seed (data.TRAIN_IDS / TEST_IDS)")
    v.add_argument("--motion", type=int, default=0, help="motion seed")
    v.add_argument("--size", type=int, default=256, help="side in pixels")
    v.add_argument("--frames", type=int, default=100, help="clip length (25 fps)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.src, a.dst, a.size, None, a.min_frames, a.min_face, a.strict, glob=a.glob)
    elif a.cmd == "bench":
        bench_render(n=a.frames)
    else:
        motion, audio = make_motion(a.motion, a.frames)
        write_video(a.out, render_clip(make_identity(a.identity), motion, a.size), FPS, audio, SR)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
