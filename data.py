"""data.py: the data layer of FC-TFG, by section: 1. one sample format (clip_sample) and the
procedural set as a dataset (SyntheticTalkingFaces: cross-identity ground truth, mouth swaps,
feature masks); 2. real clips: `python data.py prepare SRC DST` (read, track the face, crop and
write with media.py), VideoFolderDataset; 3. the batches stages.py's stages see, step-indexed for
exact resume: Batches, FramePool, IdentityFrames, ClipWindows, Prefetch; 4. CLI.

Sec. 4.1.1 "VoxCeleb2 ... pre-processing procedure proposed in
    [51]" (FOMM crop)                                              -> prepare (its crop: media.py)
Sec. 4.1.1 MEAD frontal views, 5 speakers x 8 emotions x 5 clips   -> mead_clip_list
Sec. 4.2.3 "first frame of each test video ... reference
    identity" (PC-AVS)                                             -> split_reference
Sec. 4.1.2 "downsample the audio to 16kHz", mel windows per frame  -> audio.py (clip_sample uses it)

Time base everywhere: 25 fps and 16 kHz mono float32, so frame k <-> samples [640k, 640k + 640).
Deviations from FOMM's crop_vox.py (say so when comparing numbers): dlib HOG, not S3FD; one box per
clip, not IoU-based chunks (its min IoU to the first box is in the JSON); a box leaving the frame is
shifted inside it, and shrunk to the frame when larger (already-cropped clips), not rejected
(--strict: FOMM's rule).
Not here: video and wav files, the face tracker and crop (media.py), the mel spectrogram and its
window convention (audio.py), face landmarks for LMD (metrics.py), the procedural world
(procedural.py), the stages that consume batches (stages.py).
"""
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import audio as audio_mod  # as audio_mod: `audio` names a sample array throughout this file
import media  # video / wav files, the face tracker and crop
import procedural
# 25 fps, 16 kHz, 640 samples per frame
from audio import FPS, SAMPLE_RATE as SR, SAMPLES_PER_FRAME as SPF
from files import (ArgumentParser, remove_temporaries,  # CLI; the one atomic writer and the
                   run_command, write_atomic, write_text)  # clean-up of what it left


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


# ==== 2. Real videos: FOMM-style preparation (Sec. 4.1.1 "pre-processing procedure proposed in
# [51]") ====
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
    frames, _, audio, _ = media.read_video(src, fps=FPS, sr=SR, need_audio=side_audio is None)
    K = len(frames)
    if audio is None and side_audio is not None:
        audio = audio_mod.load_audio(side_audio, SR)
        if abs(len(audio) / SR - K / FPS) > 1 / FPS + 0.5:  # sanity: the two files belong together
            raise ValueError(f"audio {side_audio} lasts {len(audio) / SR:.2f} s, "
                             f"video {K / FPS:.2f} s")
        audio = np.pad(audio, (0, max(0, K * SPF - len(audio))))[:K * SPF]
    if K < min_frames:
        raise ValueError(f"too short: {K} frames < {min_frames}")
    boxes = media.face_track(frames, detector or media.dlib_detector())
    union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())  # tube box
    if max(union[2] - union[0], union[3] - union[1]) < min_face:
        raise ValueError(f"face too small: {union[2] - union[0]:.0f} px < {min_face}")
    crop, box, shrunk = media.crop_square(frames, media.fomm_enlarge(union), size, strict=strict)
    dst_stem = Path(dst_stem)
    dst_stem.parent.mkdir(parents=True, exist_ok=True)
    # a run killed (-9) while it wrote this clip
    remove_temporaries(dst_stem.parent, dst_stem.name)
    media.write_video(dst_stem.with_suffix(".mp4"), crop, FPS, audio, SR)
    media.write_wav(dst_stem.with_suffix(".wav"), audio, SR)
    return dict(status="ok", source=str(src), n_frames=K, n_samples=len(audio), fps=FPS, sr=SR,
                size=size, box_ltrb=[int(c) for c in box],
                source_size=[frames.shape[2], frames.shape[1]],
                box_shrunk=shrunk,
                min_iou_to_first=float(min(media.iou(boxes[0], bx) for bx in boxes)),
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
    detector = detector or media.dlib_detector()
    files = sorted(p for p in src_dir.glob(glob)
                   if p.suffix.lower() in media.VIDEO_EXTS and not p.name.startswith("."))
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
        frames = media.read_video(stem.with_suffix(".mp4"))[0]
        if self.size and frames.shape[1:3] != (self.size, self.size):
            frames = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
                                   size=(self.size,) * 2,
                                   mode="area").round().clamp(0, 255).byte().permute(
                                       0, 2, 3, 1).numpy()
        audio, sr = media.read_wav(stem.with_suffix(".wav"))
        if sr != SR:
            raise ValueError(f"{stem}.wav is {sr} Hz, expected {SR}")
        K = min(len(frames), len(audio) // SPF)   # H.264 keeps all frames; guard anyway
        T = self.n_frames or K
        s = (int(np.random.default_rng((self.seed, i)).integers(0, K - T + 1))
             if self.random_window else 0)
        return clip_sample(frames[s:s + T], audio[s * SPF:(s + T) * SPF],
                           self.identities.index(rec["identity"]), dict(path=str(stem), start=s))


# ==== 3. Training batches: what stages.py's stages see (step-indexed: exact resume, disjoint rank
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
    """Frames labelled with who is in them and nothing else: the judges' data (stages.py's judges
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


# ==== 4. Command line =============================================================================
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

    def body():
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")
        if a.cmd == "prepare":   # a killed prepare leaves no half-written clip (VideoWriter.abort)
            prepare(a.src, a.dst, a.size, None, a.min_frames, a.min_face, a.strict, glob=a.glob)
        elif a.cmd == "bench":
            procedural.bench_render(n=a.frames)
        else:
            motion, audio = procedural.make_motion(a.motion, a.frames)
            frames = procedural.render_clip(procedural.make_identity(a.identity), motion, a.size)
            media.write_video(a.out, frames, FPS, audio, SR)
            print(f"wrote {a.out}")
    # prepare resumes: every finished clip has its JSON, the one in progress none
    return run_command(body, "interrupted; rerun the same command to continue")

if __name__ == "__main__":
    sys.exit(main())
