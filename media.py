"""media.py: the user's files and the face in them: the project's one video decoder and writer
(VideoFrames + read_video, VideoWriter + write_video; PyAV optional), wav I/O (soundfile), and the
one face tracker and crop (dlib_detector, face_track, fomm_enlarge, crop_square), by section:
1. audio / video I/O; 2. faces.

Sec. 4.1.1 "VoxCeleb2 ... pre-processing procedure proposed in [51]" (FOMM crop): find the face,
           enlarge, crop a square                             -> dlib_detector, face_track,
                                                                 fomm_enlarge, crop_square
Sec. 4.1.2 "downsample the audio to 16kHz", video at 25 fps   -> read_video(fps=25, sr=16000)

Time base: 25 fps and 16 kHz mono float32 (audio.py's FPS and SAMPLE_RATE), the writers' defaults.
Used by data.py (prepare reads, tracks, crops and writes; VideoFolderDataset reads), infer.py (the
driving videos decoded as a stream, their faces tracked and cropped, the result written) and
evaluate.py (example videos). It imports audio.py (the constants) and files.py (the atomic writer),
never data.py. Deviations from FOMM's crop_vox.py: data.py's opening says them.
Not here: loading other audio formats and the mel spectrogram (audio.py), the preparation of a
dataset folder and its records (data.py), face landmarks for LMD (metrics.py).
"""
import contextlib
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

# 25 fps, 16 kHz
from audio import FPS, SAMPLE_RATE as SR
from files import temp_path, write_atomic  # the one atomic writer and its temporary name


# ==== 1. Video / audio I/O (PyAV optional, soundfile required): the one video decoder and writer
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


# the file suffixes read as video (prepare's sources; infer.py's --source: its first frame)
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


# ==== 2. Faces: FOMM-style detection and crop (Sec. 4.1.1 "pre-processing procedure proposed in
# [51]") ====
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
