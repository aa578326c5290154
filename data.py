"""data.py: the data layer of FC-TFG, by section: 1. one sample format (clip_sample) and the
procedural set as a dataset (SyntheticTalkingFaces: cross-identity ground truth, mouth swaps,
feature masks); 2. the one video decoder and writer (VideoFrames + read_video, VideoWriter +
write_video; PyAV optional; infer.py uses them too), wav I/O; 3. real clips: the one face tracker
(face_track), `python data.py prepare SRC DST`, VideoFolderDataset; 4. the batches train.py's stages
see, step-indexed for exact resume: Batches, FramePool, IdentityFrames, ClipWindows, Prefetch;
5. CLI.

Sec. 4.1.1 "VoxCeleb2 ... pre-processing procedure proposed in
    [51]" (FOMM crop)                                              -> prepare, fomm_enlarge
Sec. 4.1.1 MEAD frontal views, 5 speakers x 8 emotions x 5 clips   -> mead_clip_list
Sec. 4.2.3 "first frame of each test video ... reference
    identity" (PC-AVS)                                             -> split_reference
Sec. 4.1.2 "downsample the audio to 16kHz", mel windows per frame  -> audio.py (clip_sample uses it)

Time base everywhere: 25 fps and 16 kHz mono float32, so frame k <-> samples [640k, 640k + 640).
Deviations from FOMM's crop_vox.py (say so when comparing numbers): dlib HOG, not S3FD; one box per
clip, not IoU-based chunks (its min IoU to the first box is in the JSON); a box leaving the frame is
shifted inside it, and shrunk to the frame when larger (already-cropped clips), not rejected
(--strict: FOMM's rule).
Not here: the mel spectrogram and its window convention (audio.py), face landmarks for LMD
(metrics.py), the procedural world (procedural.py), the stages that consume batches (train.py).
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

import audio as audio_mod  # as audio_mod: `audio` names a sample array throughout this file
import procedural
# 25 fps, 16 kHz, 640 samples per frame
from audio import FPS, SAMPLE_RATE as SR, SAMPLES_PER_FRAME as SPF
from files import (ArgumentParser, remove_temporaries, temp_path,  # CLI; the one atomic writer, its
                   terminate_as_interrupt, write_atomic, write_text)  # temporary name and their
                                                                      # clean-up


# ==== 1. The sample format (procedural and real clips) and the PC-AVS split =======================
# uint8 pixel tensor -> float32 in [-1, 1] (G's range); ClipWindows.clip inverts it exactly
def to_unit(u8):
    return u8.float() / 127.5 - 1


def clip_sample(frames, audio, identity=0, extra=None):
    """Shared sample format from uint8 frames [T, H, W, 3] and audio float32 [640 T]: frames float32
    [T, 3, H, W] in [-1, 1], audio, mel float32 [T, 1, 80, 16] (audio.mel_windows of the whole
    clip), identity int, + `extra`."""
    T = len(frames)
    if len(audio) != T * SPF:
        raise ValueError(f"{T} frames need {T * SPF} audio samples, got {len(audio)}")
    mel = audio_mod.mel_windows(audio_mod.melspectrogram(audio), T, fps=FPS)
    return {"frames": to_unit(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)),
            "audio": torch.from_numpy(np.asarray(audio, dtype=np.float32)),
            "mel": torch.from_numpy(np.asarray(mel, dtype=np.float32)), "identity": int(identity),
            **(extra or {})}


class SyntheticTalkingFaces(torch.utils.data.Dataset):
    """Procedural talking heads. Clip i = identity (i // clips_per_identity) of the split, speaking
    with motion seed (split base + i). Deterministic: the same arguments give the same pixels.
    sample = clip_sample's dict (identity: the index in the split) + identity_seed, motion_seed,
    motion float32 [T, 12] (MOTION_KEYS)."""

    def __init__(self,
                 split="train",          # "train" | "test": disjoint identity AND motion seed
                                         # ranges
                 n_identities=100,       # people in this split
                 clips_per_identity=10,  # motion clips per person
                 n_frames=32,            # clip length T at 25 fps
                 size=64,                # output resolution (64 = tiny preset, 256 = paper)
                 ss=None,                # supersampling factor; None = 3 at <= 96 px, else 2
                 cache_dir=None,         # folder for rendered clips (npz); None = render every time
                 first=0):               # skip this many people and motion seeds of the split (the
                                         # evaluation's tune | report people:
                                         # procedural.ATTRIBUTE_SPLITS)
        if split not in procedural.MOTION_BASE:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        ids = procedural.TRAIN_IDS if split == "train" else procedural.TEST_IDS
        if not 1 <= n_identities <= len(ids) - first or first < 0:
            raise ValueError(f"n_identities must be in 1..{len(ids) - first}, got {n_identities}")
        if clips_per_identity < 1 or n_frames < 1:
            raise ValueError("clips_per_identity and n_frames must be >= 1")
        self.split, self.n_identities, self.clips_per_identity = (split, n_identities,
                                                                  clips_per_identity)
        self.n_frames, self.size, self.ss = int(n_frames), int(size), ss
        self.identity_seeds, self.first = [ids[first + k] for k in range(n_identities)], int(first)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __len__(self):
        return self.n_identities * self.clips_per_identity

    def _check(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        return i % len(self)

    def motion_seed(self, i):
        return procedural.MOTION_BASE[self.split] + self.first + self._check(i)

    def identity(self, i):
        return procedural.make_identity(
            self.identity_seeds[self._check(i) // self.clips_per_identity])

    def __getitem__(self, i):
        return self.cross(i, i)

    def cross(self, i, j):
        """Identity of clip i, motion + audio of clip j: cross-identity reenactment ground truth."""
        person, ms = self._check(i) // self.clips_per_identity, self.motion_seed(j)
        z = self._cached(i, ms, "", lambda ident, motion, audio: dict(
            frames=procedural.render_clip(ident, motion, self.size, self.ss), motion=motion,
            audio=audio))
        return clip_sample(z["frames"], z["audio"], person, dict(
            identity_seed=self.identity_seeds[person], motion_seed=ms,
            motion=torch.from_numpy(z["motion"])))

    def mouth_of(self, i, j):
        """Frames of clip i with the mouth (mouth_open, mouth_width) of clip j's motion, or closed
        when j is None: uint8 [T, H, W, 3] (--drive_mouth swap / closed: driving frames whose mouth
        says nothing about the audio)."""
        def make(ident, own, _):
            mouth = np.zeros_like(own) if j is None else \
                procedural.make_motion(self.motion_seed(j), self.n_frames, audio=False)[0]
            return dict(frames=procedural.render_clip(ident, mouth_swapped(own, mouth), self.size,
                                                      self.ss))
        tag = "_mouthclosed" if j is None else f"_mouth{self.motion_seed(j)}"
        return self._cached(i, self.motion_seed(i), tag, make)["frames"]

    def feature_masks(self, i):
        """Where clip i's eyes, brows and mouth are, frame by frame: bool [T, H, W] (for
        --feature_weight)."""
        def make(ident, motion, _):
            masks = [procedural.render(ident, mk, self.size, self.ss, return_masks=True)[1]
                     for mk in motion]
            return dict(masks=np.stack([_features(m) for m in masks]))
        return self._cached(i, self.motion_seed(i), "_features", make)["masks"]

    def _cached(self, i, ms, tag, make):
        """make(identity of clip i, motion [T, 12], audio of seed ms) -> arrays, stored
        once as cache_dir/
        id<seed>_m<ms><tag>_T.._s..npz (the key: all the pixels depend on), read back later; else
        made per call."""
        ident = self.identity(i)
        path = None if self.cache_dir is None else \
            self.cache_dir / (f"id{ident.seed}_m{ms}{tag}_T{self.n_frames}"
                              f"_s{self.size}x{self.ss or 0}.npz")
        if path is not None and path.exists():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        out = make(ident, *procedural.make_motion(ms, self.n_frames))
        # written once, not read back: the arrays in hand are what the file holds
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: np.savez(tmp, **out))
        return out


# the renderer's per-part masks -> bool [H, W]: eyes, brows, mouth (--feature_weight)
def _features(masks):
    return np.logical_or.reduce([masks[k] for k in ("eye_l", "eye_r", "brow_l", "brow_r", "mouth")])


def mouth_swapped(motion, donor):
    """motion [T, 12] with mouth_open / mouth_width taken from `donor` [T, 12]
    (SyntheticTalkingFaces.mouth_of)."""
    out = np.array(motion, dtype=np.float32, copy=True)
    cols = [procedural.MOTION_KEYS.index("mouth_open"), procedural.MOTION_KEYS.index("mouth_width")]
    out[:, cols] = np.asarray(donor, dtype=np.float32)[:, cols]
    return out


def split_reference(sample):
    """PC-AVS protocol (Sec. 4.2.3): the first frame is the identity reference x_s; all frames drive
    (pose/expression x_d) and are the ground truth; the clip's own audio drives the lips
    (x_a = mel)."""
    return dict(x_s=sample["frames"][0], x_d=sample["frames"], x_a=sample["mel"],
                x_gt=sample["frames"])


# ==== 2. Video / audio I/O (PyAV optional, soundfile required): the one video decoder and writer
# ====
def require_av():
    try:
        import av  # optional: decoding/encoding mp4 needs FFmpeg through PyAV
    except ImportError:
        raise ImportError("reading/writing video needs PyAV: `pip install av`") from None
    return av


def _mono(audio):  # write_wav / VideoWriter accept finite 1-D audio only -> float32 [N]
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or not np.all(np.isfinite(audio)):
        raise ValueError(f"audio must be a finite 1-D array, got shape {audio.shape}")
    return audio


def write_wav(path, audio, sr=SR):
    """Write mono float audio as 16-bit PCM wav, atomically (temporary name, then rename)."""
    audio = _mono(audio)
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


class VideoFrames:
    """A video file decoded lazily, one RGB frame at a time (PyAV): the project's one video decoder
    (read_video and infer.py read through it) and the one place phone video is turned upright.
    frames(fps) resamples by timestamps (frame k = the source frame nearest to k / fps,
    K = floor(duration x fps); index x average_rate drifts on variable-rate video); frames() yields
    every decoded frame. Opening decodes the first frame, so a bad file fails before anything is
    written. Then: src_fps (average rate or None), fps (src_fps or 25), duration (s, header, or
    None), shape (of a frame), t0 (first frame's time: the clock's zero), still (image)."""

    # name: the flag the file came from, opening every error
    def __init__(self, path, name="--driving"):
        self.av, self.path, self.name, self.what = (require_av(), str(path), name,
                                                    f"{name}: " if name else "")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.what}file not found: {path}")
        with self._open() as c:
            if not c.streams.video:
                raise ValueError(f"{self.what}{path} has no video stream")
            vs = c.streams.video[0]
            self.src_fps = float(vs.average_rate) if vs.average_rate else None
            # seconds, from the header
            self.duration = (float(vs.duration * vs.time_base) if vs.duration and vs.time_base
                             else c.duration / 1e6 if c.duration else None)
            first = next(self._decode(c), None)
        if first is None:
            raise ValueError(f"{self.what}{path} contains no video frames")
        self.t0, self.shape, self.fps = first[0], first[1].shape, self.src_fps or FPS
        # png/jpg/...
        self.still = c.format.name.endswith("_pipe") or c.format.name.startswith("image2")

    @contextlib.contextmanager
    def _open(self):
        try:
            with self.av.open(self.path) as c:
                yield c
        except self.av.FFmpegError as e:
            raise ValueError(f"{self.what}cannot decode video {self.path} ({e})") from None

    def _decode(self, c):  # -> (time s, upright uint8 [H, W, 3]) per decoded frame
        c.streams.video[0].thread_type = "AUTO"
        for i, f in enumerate(c.decode(video=0)):
            img = f.to_ndarray(format="rgb24")
            # phone video; counter-clockwise, as np.rot90
            rot = int(round(getattr(f, "rotation", 0) or 0)) // 90
            t = f.time if f.time is not None else i / (self.src_fps or FPS)
            yield t, (np.ascontiguousarray(np.rot90(img, k=rot)) if rot else img)

    def frames(self, fps=None):
        """uint8 [H, W, 3] frames: every decoded one (fps=None), or `fps` per second (nearest; ties:
        the earlier)."""
        fps = None if fps is None else float(fps)
        step = 1 / (self.src_fps or fps or FPS)              # a source frame lasts this long
        # pending: output frames not yet emitted
        k, safe, pending, prev = 0, 0, [], None
        last = self.t0
        with self._open() as c:
            for t, img in self._decode(c):
                last = t
                if fps is None:
                    yield img
                    continue
                t -= self.t0
                while k / fps <= t + 1e-9:  # output times up to this frame: nearest of prev / this
                    near_prev = prev is not None and abs(prev[0] - k / fps) <= abs(t - k / fps)
                    pending.append(prev[1] if near_prev else img)
                    k += 1
                prev = (t, img)
                # only frames surely inside K: duration >= t + step
                safe = math.floor((t + step) * fps + 1e-6)
                while pending and k - len(pending) < safe:
                    yield pending.pop(0)
        # K = the last `safe`; times past the last frame: the last frame
        for _ in range(safe - k):
            yield prev[1]
        decoded = last - self.t0 + step
        # a cut-off download, a damaged file
        if self.duration and decoded < 0.95 * self.duration - step:
            print(f"warning: {self.what}{self.path}: decoding stopped at {decoded:.2f} s of the "
                  f"{self.duration:.2f} s "
                  f"its header states (truncated or damaged file?); using the frames before that",
                  file=sys.stderr)


def read_video(path, fps=None, sr=None, need_audio=False):
    """Decode a video file (frames through VideoFrames). -> (frames uint8 [T, H, W, 3], fps, audio
    float32 [N] or None, sr). fps=None keeps every decoded frame (fps = the stream's average rate);
    fps=25 resamples by timestamps (VideoFrames.frames). sr=None keeps the audio's own rate, else
    resamples to mono at `sr`. Audio is placed on the video clock (t=0 at the first video frame,
    samples before it dropped); when fps is given it is padded / trimmed to exactly T * sr / fps
    samples. The mp4 edit list, which FFmpeg honours, removes AAC priming."""
    v, chunks, rate = VideoFrames(path, name=None), [], None
    with v._open() as c:
        # the first audio stream
        decoded = list(c.decode(c.streams.audio[0])) if c.streams.audio else []
        if decoded:
            rate, a_start = int(sr or decoded[0].sample_rate), decoded[0].time or 0.0
            resample = v.av.AudioResampler(format="fltp", layout="mono", rate=rate).resample
            # None: the flush
            chunks = [f.to_ndarray()[0] for frame in decoded + [None] for f in resample(frame)]
    if need_audio and not chunks:
        raise ValueError(f"{path} has no audio track, but audio is required")
    frames, audio = np.stack(list(v.frames(fps))), None
    if chunks:
        # audio start on the video clock: pad or drop up to t = 0
        off = int(round((a_start - v.t0) * rate))
        audio = np.concatenate([np.zeros(max(off, 0), np.float32), *chunks],
                               dtype=np.float32)[max(-off, 0):]
        if fps is not None:
            n = int(round(len(frames) * rate / fps))
            audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]
    return frames, v.fps if fps is None else float(fps), audio, rate


# `with VideoWriter(...) as w`: w is the writer
class VideoWriter(contextlib.AbstractContextManager):
    """H.264 yuv420p + AAC mp4, frame by frame (memory bounded): the project's one video writer.
    Audio goes in 1024-sample AAC frames interleaved with the video, so long clips need no muxer
    buffering. Written under a temporary name beside `path`: close() renames it (atomic), abort()
    deletes it, whichever comes first wins (infer.py closes inside `with` to time the flush); `with`
    closes on success and aborts on an exception."""

    def __init__(self, path, width, height, fps=FPS, audio=None, sr=SR, metadata=None, crf=18):
        # audio: mono float [N] or None (no audio track); metadata: mp4 tags, e.g. dict(comment=...)
        if height % 2 or width % 2:  # yuv420p halves the chroma planes
            raise ValueError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
        self.av, self.audio = (require_av(),
                               np.zeros(0, np.float32) if audio is None else _mono(audio))
        self.path, self.tmp, self.done = Path(path), temp_path(path), False
        self.rate, self.sr, self.k, self.apos = Fraction(fps).limit_denominator(1001), int(sr), 0, 0
        self.out = self.av.open(str(self.tmp), mode="w", format="mp4")
        try:
            self.out.metadata.update(metadata or {})
            self.vs = vs = self.out.add_stream("libx264", rate=self.rate)
            vs.width, vs.height, vs.pix_fmt, vs.options = (width, height, "yuv420p",
                                                           {"crf": str(crf)})
            self.ast = None if audio is None else self.out.add_stream("aac", rate=self.sr,
                                                                      layout="mono")
        except BaseException:
            self.abort()
            raise

    def write(self, frame):
        """Append one uint8 [H, W, 3] frame and the audio up to its end."""
        vf = self.av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts, vf.time_base = self.k, 1 / self.rate
        self.out.mux(self.vs.encode(vf))
        self.k += 1
        self._mux_audio(min(len(self.audio), int(self.k / self.rate * self.sr)))

    # whole AAC frames up to sample `end`; rest: the shorter last one too
    def _mux_audio(self, end, rest=False):
        while self.apos < end and (end - self.apos >= 1024 or rest):
            chunk = np.ascontiguousarray(self.audio[self.apos:self.apos + 1024])
            af = self.av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            af.sample_rate, af.pts, af.time_base = self.sr, self.apos, Fraction(1, self.sr)
            self.out.mux(self.ast.encode(af))
            self.apos += len(chunk)

    def close(self):
        """Write the remaining audio, flush both encoders and rename the file onto `path` (once)."""
        if not self.done:
            self._mux_audio(len(self.audio), rest=True)
            for st in [s for s in (self.vs, self.ast) if s is not None]:
                self.out.mux(st.encode(None))
            self.out.close()
            os.replace(self.tmp, self.path)
            self.done = True

    def abort(self):
        self.done = True
        # the container may be half-open; the temp file goes anyway
        with contextlib.suppress(Exception):
            self.out.close()
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, error, *_):
        self.abort() if error else self.close()


def write_video(path, frames, fps=FPS, audio=None, sr=SR, crf=18):
    """Write uint8 frames [T, H, W, 3] (H, W even) + optional mono float audio at once: a loop over
    VideoWriter."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T > 0, got {frames.dtype} "
                         f"{frames.shape}")
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, audio, sr, crf=crf) as w:
        for f in frames:
            w.write(f)


# ==== 3. Real videos: FOMM-style preparation (Sec. 4.1.1 "pre-processing procedure proposed in
# [51]") ====
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# dlib boxes (brows to chin) are tighter than FOMM's S3FD boxes; our uncalibrated guess
DLIB_BOX_SCALE = 1.3


def dlib_detector(upsample=0):
    """dlib's frontal HOG face detector as `detect(rgb uint8 [H, W, 3]) -> list of (l, t, r, b)`,
    largest first. It finds faces of roughly >= 80 px; pass upsample=1 for smaller ones (4x
    slower)."""
    try:
        import dlib  # optional: `pip install dlib-bin` (prebuilt wheels)
    except ImportError:
        raise ImportError("face detection needs dlib: `pip install dlib-bin`, "
                          "or pass detector=...") from None
    det = dlib.get_frontal_face_detector()

    def detect(rgb):
        gray, boxes, k = np.asarray(Image.fromarray(rgb).convert("L")), [], DLIB_BOX_SCALE
        for l, t, r, b in [(d.left(), d.top(), d.right(), d.bottom()) for d in det(gray, upsample)]:
            # k x larger, same centre
            cx, cy, hw, hh = (l + r) / 2, (t + b) / 2, k * (r - l) / 2, k * (b - t) / 2
            boxes.append((cx - hw, cy - hh, cx + hw, cy + hh))
        return sorted(boxes, key=lambda bx: -(bx[2] - bx[0]) * (bx[3] - bx[1]))
    return detect


def iou(a, b):
    """Intersection over union of two (l, t, r, b) boxes."""
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def fomm_enlarge(box, increase=0.1):
    """FOMM crop enlargement (AliaksandrSiarohin/video-preprocessing, util.py): with i = increase,
    wi = max(i, ((1+2i)h - w) / 2w), hi = max(i, ((1+2i)w - h) / 2h); each side grows by wi*w and
    hi*h.
    The result is a square of side (1 + 2i) max(w, h) around the box centre."""
    l, t, r, b = box
    w, h = r - l, b - t
    if w <= 0 or h <= 0:
        raise ValueError(f"degenerate box {box}")
    wi = max(increase, ((1 + 2 * increase) * h - w) / (2 * w))
    hi = max(increase, ((1 + 2 * increase) * w - h) / (2 * h))
    return (l - wi * w, t - hi * h, r + wi * w, b + hi * h)


def crop_square(frames, box, size, strict=False):
    """Crop one square box from every frame, resized to size x size (PIL LANCZOS, anti-aliased).
    strict=True is FOMM parity (a box leaving the frame -> ValueError); else it is shifted inside
    the frame, and a box larger than the frame (a clip that already is a face crop) is first shrunk
    to the frame's shorter side about its centre: a tighter crop, never pixels that were not filmed
    (edge padding smears into streaks). -> (uint8 [T, size, size, 3], integer box used (l, t, r, b)
    in source pixels, shrunk)."""
    _, H, W, _ = frames.shape
    l, t, r, b = box
    side = int(round(max(r - l, b - t)))
    if strict and (round((l + r - side) / 2) < 0 or round((t + b - side) / 2) < 0 or
                   round((l + r + side) / 2) > W or round((t + b + side) / 2) > H):
        raise ValueError("enlarged face box leaves the frame (FOMM rejects such clips)")
    shrunk, side = side > min(H, W), min(side, H, W)
    l, t = int(round((l + r - side) / 2)), int(round((t + b - side) / 2))
    l, t = min(max(l, 0), W - side), min(max(t, 0), H - side)      # shift inside the frame
    out = np.stack([np.asarray(Image.fromarray(f[t:t + side, l:l + side]).resize((size, size),
                                                                                 Image.LANCZOS))
                    for f in frames])
    return out, (l, t, l + side, t + side), shrunk


def detect_faces(img, detector):
    """Boxes (l, t, r, b) in source pixels, largest first, found by `detector` on a copy of uint8
    [H, W, 3] `img` downscaled to a long side <= 640 (as first-order-model's crop-video.py does)."""
    H, W = img.shape[:2]
    k = min(1.0, 640 / max(H, W))
    small = img if k == 1 else np.asarray(Image.fromarray(img).resize((round(W * k), round(H * k)),
                                                                      Image.BILINEAR))
    return [tuple(c / k for c in bx) for bx in detector(small)]


def face_track(frames, detector, where="the video", every=5, dense=2 * FPS, max_missing=0.25):
    """The one face tracker (prepare and infer.py). Through any iterable of uint8 [H, W, 3] frames
    (an array, VideoFrames.frames()) probe frame i when i < dense or i % every == 0 (detect_faces);
    keep per probe the box with max IoU to the previous pick (the largest at first). Every frame of
    the first 2 s, then every 5th: one pass, no length needed up front, enough probes in a short
    clip, a dense opening to seed the IoU chain (40 detections more than 1 in 5). -> boxes float
    [n_found, 4] in source pixels; ValueError naming `where` and its first faceless probe when more
    than `max_missing` of the probes found no face."""
    boxes, missing, prev = [], [], None
    for i, img in enumerate(frames):
        if i < dense or i % every == 0:
            found = detect_faces(img, detector)
            if found:
                prev = found[0] if prev is None else max(found, key=lambda bx: iou(bx, prev))
                boxes.append(prev)
            else:
                missing.append(i)
    n = len(boxes) + len(missing)
    if not boxes or len(missing) > max_missing * n:
        raise ValueError(f"no face found in {where}: frame {missing[0] if missing else '-'} (no "
                         f"face in {len(missing)} of the {n} probed frames, "
                         f"{100 * len(missing) / max(n, 1):.0f}%)")
    return np.array(boxes, dtype=np.float64)


def path_info(rel):
    """Identity (and MEAD emotion/level/view) from a path relative to the source root: VoxCeleb2
    .../idNNNNN/<yt id>/NNNNN.mp4 -> idNNNNN; MEAD <actor>/video/<view>/<emotion>/level_n/NNN.mp4 ->
    actor M0xx/W0xx; anything else -> its first folder (or the file stem)."""
    parts = Path(rel).parts
    info = dict(identity=parts[0] if len(parts) > 1 else Path(rel).stem)
    for i, part in enumerate(parts[:-1]):
        if (part[:2] == "id" and part[2:].isdigit()) or (len(part) == 4 and part[0] in "MW"
                                                          and part[1:].isdigit()):
            info["identity"] = part
            if parts[i + 1:i + 2] == ("video",) and len(parts) >= i + 6:   # MEAD layout
                info.update(view=parts[i + 2], emotion=parts[i + 3], level=parts[i + 4])
            break
    return info


def mead_audio_path(src):
    """MEAD keeps audio apart: <actor>/audio/<emotion>/level_n/NNN.m4a for
    <actor>/video/<view>/... ; that path if the file is there, else None."""
    p = Path(src).parts
    if len(p) >= 6 and p[-5] == "video":
        side = Path(*p[:-5], "audio", p[-3], p[-2], Path(p[-1]).with_suffix(".m4a").name)
        return side if side.is_file() else None
    return None


def prepare_one(src, dst_stem, size=256, detector=None, min_frames=64, min_face=64, strict=False):
    """Prepare one video: 25 fps, 16 kHz mono, one FOMM box per clip (union of the detections,
    enlarged, square), resized; writes dst_stem.mp4 (+AAC) and dst_stem.wav (the master audio). A
    video without an audio track uses MEAD's separate audio file when there is one (both assumed to
    start at t = 0). ValueError with the reason when the clip must be skipped. -> the JSON record
    (prepare writes it as dst_stem.json)."""
    side_audio = mead_audio_path(src)
    frames, _, audio, _ = read_video(src, fps=FPS, sr=SR, need_audio=side_audio is None)
    K = len(frames)
    if audio is None and side_audio is not None:
        audio = audio_mod.load_audio(side_audio, SR)
        if abs(len(audio) / SR - K / FPS) > 1 / FPS + 0.5:  # sanity: the two files belong together
            raise ValueError(f"audio {side_audio} lasts {len(audio) / SR:.2f} s, "
                             f"video {K / FPS:.2f} s")
        audio = np.pad(audio, (0, max(0, K * SPF - len(audio))))[:K * SPF]
    if K < min_frames:
        raise ValueError(f"too short: {K} frames < {min_frames}")
    boxes = face_track(frames, detector or dlib_detector())
    union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())  # tube box
    if max(union[2] - union[0], union[3] - union[1]) < min_face:
        raise ValueError(f"face too small: {union[2] - union[0]:.0f} px < {min_face}")
    crop, box, shrunk = crop_square(frames, fomm_enlarge(union), size, strict=strict)
    dst_stem = Path(dst_stem)
    dst_stem.parent.mkdir(parents=True, exist_ok=True)
    # a run killed (-9) while it wrote this clip
    remove_temporaries(dst_stem.parent, dst_stem.name)
    write_video(dst_stem.with_suffix(".mp4"), crop, FPS, audio, SR)
    write_wav(dst_stem.with_suffix(".wav"), audio, SR)
    return dict(status="ok", source=str(src), n_frames=K, n_samples=len(audio), fps=FPS, sr=SR,
                size=size, box_ltrb=[int(c) for c in box],
                source_size=[frames.shape[2], frames.shape[1]],
                box_shrunk=shrunk, min_iou_to_first=float(min(iou(boxes[0], bx) for bx in boxes)),
                audio_source=str(side_audio or src), detector=getattr(detector, "__name__", "dlib"))


def prepare(src_dir, dst_dir, size=256, detector=None, min_frames=64, min_face=64, strict=False,
            log=print, glob="**/*"):
    """Prepare every video under src_dir into dst_dir, mirroring the folder layout (VoxCeleb2's and
    MEAD's keep their identity in the path: path_info). Every file gets a JSON record, ok or skipped
    with the reason; files that already have one are skipped, so an interrupted run resumes. One bad
    file never aborts the run. `glob` selects files, e.g. "*/video/front/**/*.mp4" for MEAD's
    frontal views. -> (n_ok, n_skipped)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source folder not found: {src_dir}")
    if (dst_dir.resolve() == src_dir.resolve()
            or dst_dir.resolve().is_relative_to(src_dir.resolve())):
        raise ValueError(f"DST {dst_dir} lies inside SRC {src_dir}: the prepared mp4s would be "
                         f"read back as sources; choose a folder outside it")
    # before the first file: a missing dlib is one line, not a skip each
    detector = detector or dlib_detector()
    files = sorted(p for p in src_dir.glob(glob)
                   if p.suffix.lower() in VIDEO_EXTS and not p.name.startswith("."))
    n = dict(ok=0, skipped=0)
    for i, src in enumerate(files):
        rel, head, t0 = src.relative_to(src_dir), f"[{i + 1}/{len(files)}] {src}", time.time()
        stem = dst_dir / rel.with_suffix("")
        if stem.with_suffix(".json").exists():
            log(f"{head}: done before"); continue
        try:
            rec = (prepare_one(src, stem, size, detector, min_frames, min_face, strict)
                   | path_info(rel))
            log(f"{head}: ok, {rec['n_frames']} frames ({time.time() - t0:.1f} s)")
        except (ValueError, OSError) as e:  # unreadable, no audio, no face, too short, ...
            rec = dict(status="skipped", source=str(src), reason=str(e))
            log(f"{head}: SKIPPED ({e})")
        n[rec["status"]] += 1
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_text(stem.with_suffix(".json"), json.dumps(rec, indent=1))
    log(f"prepare: {n['ok']} ok, {n['skipped']} skipped, "
        f"{len(files) - sum(n.values())} done before")
    return n["ok"], n["skipped"]


MEAD_EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised")


def mead_clip_list(root, n_speakers=5, n_clips=5, seed=0):
    """The paper's MEAD test set (Sec. 4.1.1): 5 random speakers x 8 emotions x 5 frontal clips, at
    level_3 (the paper leaves intensity unspecified; neutral only has level_1). Store the seed.
    -> sorted list of video paths."""
    root = Path(root)
    actors = sorted(p.name for p in root.iterdir()
                    if (p / "video" / "front").is_dir()) if root.is_dir() else []
    if len(actors) < n_speakers:
        raise ValueError(f"need {n_speakers} MEAD actors with video/front under {root}, "
                         f"found {len(actors)}")
    r, out = np.random.default_rng(seed), []
    for actor in sorted(r.choice(actors, n_speakers, replace=False)):
        for emo in MEAD_EMOTIONS:
            d = root / actor / "video" / "front" / emo / ("level_1" if emo == "neutral"
                                                          else "level_3")
            clips = sorted(d.glob("*.mp4"))
            if len(clips) < n_clips:
                raise ValueError(f"{d}: need {n_clips} clips, found {len(clips)}")
            out += [clips[j] for j in sorted(r.choice(len(clips), n_clips, replace=False))]
    return out


def _record(path):
    """One prepared clip's JSON record (data.py prepare wrote it) -> dict; ValueError naming the
    file if damaged."""
    try:
        rec = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a prepared clip's record ({e}); "
                         f"delete it or rerun data.py prepare") from None
    if not isinstance(rec, dict) or (rec.get("status") == "ok"
                                     and not {"n_frames", "identity"} <= set(rec)):
        raise ValueError(f"{path}: not a prepared clip's record (want a JSON object with status, "
                         f"n_frames and identity); delete it or rerun data.py prepare")
    return rec


class VideoFolderDataset(torch.utils.data.Dataset):
    """Clips written by `prepare` (JSON status ok + mp4 + wav) in clip_sample's format (identity =
    index of the JSON's `identity` in sorted order; no `motion`: real clips have no motion ground
    truth). n_frames=None: whole clips; an int: a window of that length, the first frames or
    (random_window) from a start drawn from (seed, i), not a global RNG: item i is a pure function
    of i, as a resumed run, prefetching threads and ClipWindows' cache need. only: the clips to
    keep, all prepared (paths with or without suffix, e.g. mead_clip_list(root)). size: frames of
    another side are resized to it (area filter), e.g. clips prepared at 256 px for the 64 px tiny
    preset."""

    def __init__(self, root, n_frames=None, random_window=True, only=None, seed=0, size=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"prepared data folder not found: {root}")
        # e.g. mead_clip_list(root)
        keep = None if only is None else {Path(p).with_suffix("") for p in only}
        recs = [(p.with_suffix(""), _record(p)) for p in sorted(root.rglob("*.json"))]
        self.items = [(stem, rec) for stem, rec in recs if (keep is None or stem in keep)
                      and rec.get("status") == "ok"
                      and (n_frames is None or rec["n_frames"] >= n_frames)]
        if keep is not None and len(self.items) != len(keep):
            raise ValueError(f"{len(keep) - len(self.items)} of the {len(keep)} listed clips are "
                             f"not prepared (status 'ok') under {root}")
        if not self.items:
            raise ValueError(f"no prepared clips (JSON with status 'ok') under {root}")
        self.identities = sorted({rec["identity"] for _, rec in self.items})
        self.n_frames, self.random_window, self.seed, self.size = (n_frames, random_window,
                                                                   int(seed), size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        stem, rec = self.items[i]
        frames = read_video(stem.with_suffix(".mp4"))[0]
        if self.size and frames.shape[1:3] != (self.size, self.size):
            frames = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
                                   size=(self.size,) * 2,
                                   mode="area").round().clamp(0, 255).byte().permute(
                                       0, 2, 3, 1).numpy()
        audio, sr = read_wav(stem.with_suffix(".wav"))
        if sr != SR:
            raise ValueError(f"{stem}.wav is {sr} Hz, expected {SR}")
        K = min(len(frames), len(audio) // SPF)   # H.264 keeps all frames; guard anyway
        T = self.n_frames or K
        s = (int(np.random.default_rng((self.seed, i)).integers(0, K - T + 1))
             if self.random_window else 0)
        return clip_sample(frames[s:s + T], audio[s * SPF:(s + T) * SPF],
                           self.identities.index(rec["identity"]), dict(path=str(stem), start=s))


# ==== 4. Training batches: what train.py's stages see (step-indexed: exact resume, disjoint rank
# shards) ====
class Batches:
    """Indices for (step, micro-batch) from DistributedSampler's permutation of the epoch: a resumed
    run sees exactly the batches an uninterrupted run would; one step's rank shards form the batch
    of one process with batch*world."""

    def __init__(self, dataset, batch, rank, world, seed):
        self.ds, self.batch, self.rank, self.world = dataset, batch, rank, world
        self.sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=seed,
                                                           drop_last=True)  # shuffled
        self.per_epoch = max(1, len(self.sampler) // batch)
        self._epoch, self._order = None, None

    def indices(self, k):
        """Dataset indices of this rank's k-th batch."""
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        idx = self._order[pos * self.batch:(pos + 1) * self.batch]
        return idx + self._order[:self.batch - len(idx)]  # dataset smaller than a batch: wrap

    def get(self, k):
        samples = [self.ds[i] for i in self.indices(k)]
        return {key: torch.stack([s[key] for s in samples]) if torch.is_tensor(samples[0][key])
                else [s[key] for s in samples] for key in samples[0]}


def feature_weight_map(masks, weight):
    """bool feature masks [..., H, W] -> per-pixel L1 weight [..., 1, H, W]: 1 + weight on the masks
    grown by one pixel (3x3 dilation), 1 elsewhere (--feature_weight, a tiny-scale deviation)."""
    m = torch.as_tensor(masks).float()
    grown = F.max_pool2d(m.reshape(-1, 1, *m.shape[-2:]), 3, stride=1, padding=1)
    return (1 + weight * grown).reshape(*m.shape[:-2], 1, *m.shape[-2:])


class FramePool(torch.utils.data.Dataset):
    """Single frames for the image stages (StyleGAN2, inversion). Procedural data: item j is frame
    t_j of clip i_j, rendered on demand (that frame only) or, with pool > 0, from a pool rendered
    once (rendering is the tiny preset's CPU bottleneck); feature_weight > 0 adds the L1 weight [1,
    H, W] on the eyes, brows and mouth (feature_weight_map: at 64 px they are a few pixels, which an
    unweighted L1 erases). Real data: clip j's middle frame."""

    def __init__(self, clips, pool=0, seed=0, feature_weight=0.0):
        self.clips, self.synthetic, self.seed = (clips, isinstance(clips, SyntheticTalkingFaces),
                                                 seed)
        self.feature_weight = float(feature_weight) if self.synthetic else 0.0
        # the pool
        self.frames = [self._render(j) for j in range(pool)] if self.synthetic and pool else None

    def _render(self, j):
        g = np.random.default_rng((self.seed, j))
        i = int(g.integers(len(self.clips)))
        motion, _ = procedural.make_motion(self.clips.motion_seed(i), self.clips.n_frames,
                                           audio=False)
        # img [H, W, 3], or (img, masks)
        out = procedural.render(self.clips.identity(i), motion[int(g.integers(len(motion)))],
                                self.clips.size,
                                return_masks=bool(self.feature_weight))
        item = {"image": to_unit(
            torch.from_numpy(out[0] if self.feature_weight else out).permute(2, 0, 1))}
        if self.feature_weight:
            # [1, H, W]
            item["weight"] = feature_weight_map(_features(out[1]), self.feature_weight)
        return item

    def __len__(self):
        return len(self.frames) if self.frames is not None else len(self.clips)

    def __getitem__(self, j):
        if self.frames is not None:
            return self.frames[j]
        if self.synthetic:
            return self._render(j)
        frames = self.clips[j]["frames"]
        return {"image": frames[len(frames) // 2]}


class IdentityFrames(torch.utils.data.Dataset):
    """Frames labelled with who is in them and nothing else: the judges' data (train.py's judges
    stage; the paper's E_id and φ learned from identity and class labels). Item j: person j % n of
    the procedural `clips` (its label), a random frame of a random natural clip of theirs
    (make_motion: pose, blinks, gaze, brows, speech), drawn in front of another random person's
    backdrop and shirt: here each person owns a backdrop, and a judge that read identity off it
    would not look at the face. Rendered once into a pool of `pool` frames (0: len(clips))."""

    def __init__(self, clips, pool=0, seed=0):
        if not isinstance(clips, SyntheticTalkingFaces):
            raise ValueError("the judges stage trains on procedural people (--data synthetic); "
                             "at paper scale "
                             "pass the published ArcFace / VGG19 weights with --arcface / --vgg")
        self.clips, self.seed = clips, seed
        self.frames = [self._render(j) for j in range(pool or len(clips))]

    def _render(self, j):
        g = np.random.default_rng((self.seed, 11, j))
        person, other = j % self.clips.n_identities, int(g.integers(self.clips.n_identities))
        ident = dataclasses.replace(self.clips.identity(person * self.clips.clips_per_identity),
                                    **{k: getattr(self.clips.identity(
                                        other * self.clips.clips_per_identity), k)
                                       for k in ("bg", "shirt")})
        clip = (person * self.clips.clips_per_identity
                + int(g.integers(self.clips.clips_per_identity)))
        motion, _ = procedural.make_motion(self.clips.motion_seed(clip), self.clips.n_frames,
                                           audio=False)
        img = procedural.render(ident, motion[int(g.integers(len(motion)))], self.clips.size)
        return {"image": to_unit(torch.from_numpy(img).permute(2, 0, 1)),
                "label": torch.tensor(person)}

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, j):
        return self.frames[j]


def relight(x, g=None):
    """A new light for each image of x [B, 3, H, W] in [-1, 1] (torch RNG g, default the global one,
    which a checkpoint carries): gain 0.7-1.3, a tint of +-7 % per channel, gamma 0.8-1.25, mirrored
    half of the time."""
    B, dev = x.shape[0], x.device
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(B, *shape, 1, 1, generator=g).to(dev)
    y = ((x + 1) / 2).clamp(0, 1) ** u(0.8, 1.25, 1) * u(0.7, 1.3, 1) * u(0.93, 1.07, 3)
    flip = torch.rand(B, generator=g).to(dev) < 0.5
    return torch.where(flip.view(B, 1, 1, 1), y.flip(-1), y).clamp(0, 1) * 2 - 1


def make_clip_dataset(cfg, data_arg, split="train", cache_dir=None):
    if data_arg == "synthetic":
        return SyntheticTalkingFaces(split, cfg["n_identities"], cfg["clips_per_identity"],
                                     cfg["clip_frames"],
                                     cfg["size"], cache_dir=cache_dir)
    root = Path(data_arg)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data_arg}: no such folder "
                                f"(prepare one with `python data.py prepare`)")
    return VideoFolderDataset(root, n_frames=cfg["clip_frames"], seed=cfg["seed"], size=cfg["size"])


class ClipWindows(torch.utils.data.Dataset):
    """Item j = window of `window` consecutive frames of clip j // n_starts from frame j % n_starts
    (every window of every clip is an item), with each frame's mel window. With `off_sync`, half of
    the items (a seeded RNG per item: the same item always gets the same pairing) carry the audio of
    another window of the same clip: the lip-sync expert's negatives. Rendered clips are kept in
    memory as uint8 (`cache` clips at most)."""

    def __init__(self, clips, window, seed=0, off_sync=False, source=False, cache=4096,
                 source_from="clip",
                 drive_mouth="own", feature_weight=0.0, drive_colour=0.0):
        self.clips, self.window, self.seed, self.off_sync, self.source = (clips, window, seed,
                                                                          off_sync, source)
        synthetic = isinstance(clips, SyntheticTalkingFaces)
        if drive_mouth not in ("own", "swap", "closed"):
            raise ValueError(f"drive_mouth must be 'own', 'swap' or 'closed', got {drive_mouth!r}")
        if drive_mouth != "own" and not synthetic:
            raise ValueError("--drive_mouth swap re-renders the driving frames: procedural data "
                             "only (use --drive_mouth own with --data PATH)")
        if feature_weight and not synthetic:
            raise ValueError("--feature_weight needs the renderer's masks: procedural data only")
        self.drive_mouth, self.feature_weight, self.drive_colour = (drive_mouth,
                                                                    float(feature_weight),
                                                                    float(drive_colour))
        if source_from not in ("clip", "identity"):
            raise ValueError(f"source_from must be 'clip' or 'identity', got {source_from!r}")
        self.per_id = getattr(clips, "clips_per_identity", 1) if source_from == "identity" else 1
        n_frames = getattr(clips, "n_frames", None) or window
        self.n_starts = n_frames - window + 1
        if self.n_starts < 1:
            raise ValueError(f"clips of {n_frames} frames are shorter than the window of {window}")
        self._cache, self._cache_size = {}, cache

    def __len__(self):
        return len(self.clips) * self.n_starts

    def clip(self, c):
        if c in self._cache:
            return self._cache[c]
        s, n = self.clips[c], len(self.clips)
        # exact: frames are uint8-rendered
        item = {"frames": ((s["frames"] + 1) * 127.5).round().to(torch.uint8),
                "mel": s["mel"], "identity": s["identity"]}
        if self.drive_mouth != "own":
            # Tiny-scale deviation (RESULTS.md): the driving frames E_m sees get another clip's
            # mouth (seeded per clip), the targets keep their own. In self-reenactment x_d's mouth
            # always agrees with the audio and is far easier to read than the mel, so E_m would take
            # the lips from the video and ignore x_a; with unrelated mouths in x_d they can only
            # come from the audio, as Fig. 1 asks.
            donor = ((c + 1 + int(np.random.default_rng((self.seed, 7, c)).integers(n - 1))) % n
                     if n > 1 else c)
            donor = None if self.drive_mouth == "closed" else donor
            item["drive"] = torch.from_numpy(
                self.clips.mouth_of(c, donor)).permute(0, 3, 1, 2).contiguous()
        if self.feature_weight:
            item["features"] = torch.from_numpy(self.clips.feature_masks(c))     # bool [T, H, W]
        if len(self._cache) < self._cache_size:
            self._cache[c] = item
        return item

    def __getitem__(self, j):
        c, t = divmod(j, self.n_starts)
        s, W = self.clip(c), self.window
        out = {"frames": to_unit(s["frames"][t:t + W]),                # [W, 3, H, W] in [-1, 1]
               "drive": to_unit(s.get("drive", s["frames"])[t:t + W]),  # what E_m sees
               "mel": s["mel"][t:t + W],                              # [W, 1, 80, 16]: window
                                                                      # per frame
               "identity": torch.tensor(s["identity"])}
        if "features" in s:
            # [W, 1, H, W]
            out["weight"] = feature_weight_map(s["features"][t:t + W], self.feature_weight)
        g = np.random.default_rng((self.seed, j))
        if self.drive_colour:
            # Tiny-scale deviation (RESULTS.md): the driving frames E_m sees are recoloured, one
            # random gain and offset per channel for the whole window, the targets keep their
            # colours. In self-reenactment source and driver wear the same colours, so nothing says
            # which of them the output's colours should come from; with the driver's colours made
            # meaningless they can only come from the source (E_can).
            a = self.drive_colour
            gain, shift = (torch.from_numpy(g.uniform(lo, hi, (1, 3, 1, 1)).astype(np.float32))
                           for lo, hi in ((1 - a, 1 + a), (-a, a)))
            out["drive"] = (out["drive"] * gain + shift).clamp(-1, 1)
        if self.source:
            # x_s: a frame of the same person (self-reenactment, Sec. 4.1.1). The paper draws it
            # from the same VoxCeleb video, seconds away from x_d; a 16-frame procedural clip spans
            # 0.64 s, so its frames barely differ and "copy the source" is almost optimal
            # (RESULTS.md's motion collapse). source_from="identity" takes x_s from any clip of the
            # same person instead (clip c is person c // per_id, as SyntheticTalkingFaces numbers
            # them; real clips: per_id 1): same face, other pose, gaze, blink, mouth.
            src = s if self.per_id == 1 else self.clip(c - c % self.per_id
                                                       + int(g.integers(self.per_id)))
            out["source"] = to_unit(src["frames"][int(g.integers(len(src["frames"])))])
        if self.off_sync:
            # Negatives take audio from a window that does not overlap this one (|shift| >= W
            # frames) when the clip is long enough: overlapping windows share most of their sound,
            # and teach only that sync is undecidable.
            far = ([u for u in range(self.n_starts) if abs(u - t) >= W]
                   or [u for u in range(self.n_starts) if u != t])
            in_sync = not far or g.random() < 0.5
            t_audio = t if in_sync else far[int(g.integers(len(far)))]
            # [1, 80, 16]: Wav2Lip's one mel window per 5 frames
            out["mel_expert"] = s["mel"][t_audio]
            out["y"] = torch.tensor(1.0 if in_sync else 0.0)
        return out


class Prefetch:
    """prefetch(k) -> the micro-batches of step k. With workers > 0, threads assemble (render /
    decode) step k+1 while step k trains; a batch is a pure function of its index (Batches): threads
    change when, never what."""

    def __init__(self, data, accum, workers, max_steps):
        self.data, self.accum, self.max_steps = data, accum, max_steps
        self.pool, self.ahead = ThreadPoolExecutor(workers) if workers > 0 else None, {}

    def __call__(self, k):
        if self.pool is None:
            return [self.data.get(k * self.accum + a) for a in range(self.accum)]
        for j in (k, k + 1):
            if j not in self.ahead and j < self.max_steps:
                self.ahead[j] = [self.pool.submit(self.data.get, j * self.accum + a)
                                 for a in range(self.accum)]
        return [f.result() for f in self.ahead.pop(k)]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ==== 5. Command line =============================================================================
def main(argv=None):
    ap = ArgumentParser(description="FC-TFG data: prepare real videos (Sec. 4.1.1), benchmark or "
                                    "preview the procedural set")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="crop/resample a folder of videos (FOMM-style)")
    p.add_argument("src", help="folder of source videos (VoxCeleb2 / MEAD layout, Sec. 4.1.1)")
    p.add_argument("dst",
                   help="output folder: mp4 + wav + JSON per clip, mirroring the source paths")
    p.add_argument("--size", type=int, default=256, help="output side in pixels (the paper's 256)")
    p.add_argument("--min-frames", type=int, default=64,
                   help="skip clips shorter than this (25 fps frames)")
    p.add_argument("--min-face", type=int, default=64,
                   help="minimum tube box side in source pixels")
    p.add_argument("--strict", action="store_true",
                   help="FOMM parity: reject boxes leaving the frame")
    p.add_argument("--glob", default="**/*",
                   help='files to take, e.g. "*/video/front/**/*.mp4" (MEAD)')
    b = sub.add_parser("bench", help="procedural rendering speed in frames/s")
    b.add_argument("--frames", type=int, default=20, help="frames to render per size")
    v = sub.add_parser("preview", help="write one procedural clip as mp4")
    v.add_argument("out", help="mp4 to write")
    v.add_argument("--identity", type=int, default=0,
                   help="identity seed (procedural.TRAIN_IDS / TEST_IDS)")
    v.add_argument("--motion", type=int, default=0, help="motion seed")
    v.add_argument("--size", type=int, default=256, help="side in pixels")
    v.add_argument("--frames", type=int, default=100, help="clip length (25 fps)")
    a = ap.parse_args(argv)
    # every numeric flag of the three commands
    limits = dict(size=(16, 4096), min_frames=(1, 10 ** 6), min_face=(1, 10 ** 5),
                  frames=(1, 10 ** 5),
                  identity=(0, 2 ** 62), motion=(0, 2 ** 62))
    bad = [f"--{k.replace('_', '-')} {getattr(a, k)} (want {lo}..{hi})"
           for k, (lo, hi) in limits.items()
           if hasattr(a, k) and not lo <= getattr(a, k) <= hi]
    try:
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")
        # a killed prepare leaves no half-written clip (VideoWriter.abort)
        with terminate_as_interrupt():
            if a.cmd == "prepare":
                prepare(a.src, a.dst, a.size, None, a.min_frames, a.min_face, a.strict, glob=a.glob)
            elif a.cmd == "bench":
                procedural.bench_render(n=a.frames)
            else:
                motion, audio = procedural.make_motion(a.motion, a.frames)
                frames = procedural.render_clip(procedural.make_identity(a.identity), motion,
                                                a.size)
                write_video(a.out, frames, FPS, audio, SR)
                print(f"wrote {a.out}")
    except (ValueError, OSError, ImportError) as e:
        print(f"data.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    # prepare resumes: every finished clip has its JSON, the one in progress none
    except KeyboardInterrupt:
        print("data.py: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0

if __name__ == "__main__":
    sys.exit(main())
