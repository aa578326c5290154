"""audio.py: 16 kHz audio, the Wav2Lip mel-spectrogram, the audio encoder E_a and the lip-sync
expert (Sec. 3.3.2, Sec. 4.1.2, Eq. 4).

Sec. 4.1.2 "downsample the audio to 16kHz"                      -> load_audio
Sec. 4.1.2 "FFT window 800, hop 200, 80 Mel filter banks"        -> mel_filterbank, melspectrogram,
                                                                    melspectrogram_torch
                                                                    (batched, GPU)
audio <-> video frame alignment (Wav2Lip, 80 mel columns/s)      -> mel_windows
Sec. 4.1.2 "pre-trained audio encoder introduced in [7]" (E_a)   -> AudioEncoder, load_audio_encoder
Sec. 3.3.2 / Eq. (4) SyncNet f_a, f_v for L_sync = 1 - cos(.,.)  -> SyncNet, load_expert,
                                                                    expert_window
Training the expert itself (Wav2Lip's BCE on the cosine)         -> loss_expert_bce

Which SyncNet? The paper uses "a modified SyncNet introduced in [22]" (StyleTalker). StyleTalker has
no public code or weights, so we use the closest published network with the same role: the Wav2Lip
lip-sync expert (`SyncNet_color`, ref. [7], the same paper the audio encoder comes from). Its two
encoders end in ReLU and are L2-normalised, so cos(f_v, f_a) lies in [0, 1] and Eq. (4) is bounded
in [0, 1].

Every number of the mel recipe and of the networks is Wav2Lip's (hparams.py, models/), taken from
its published code as numbers only; the code here is written from those numbers and the maths.

Not here: the sync loss Eq. (4) itself and its weight (losses.py), LSE-C/LSE-D with syncnet_python's
SyncNet v2 (metrics), dataset windows of frames (data.py), face detection/cropping and wav / video
files (media.py).
"""
import functools
import math
import os
import warnings

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.signal import resample_poly

from files import load_checkpoint, load_strict  # the project's one safe reader and strict loader

# --------------------------------------------------------------------------------------------------
# Constants of the mel recipe (Wav2Lip hparams.py; Sec. 4.1.2 names the first four).
SAMPLE_RATE = 16000     # Hz; Sec. 4.1.2 "downsample the audio to 16kHz"
N_FFT = 800             # FFT size = window length (50 ms); Sec. 4.1.2
HOP = 200               # hop length (12.5 ms) -> 80 mel columns per second; Sec. 4.1.2
WIN = 800               # periodic Hann window length
N_MELS = 80             # mel bands M; Sec. 4.1.2
FMIN, FMAX = 55.0, 7600.0  # Hz, filterbank range (Wav2Lip hparams, not in the paper)
PREEMPHASIS = 0.97      # y[n] = x[n] - 0.97 x[n-1]: boosts high frequencies before the STFT
MIN_LEVEL_DB = -100.0   # dB floor of the normalisation; 20*log10(1e-5) = -100
REF_LEVEL_DB = 20.0     # subtracted from the dB value before normalising
MAX_ABS_VALUE = 4.0     # symmetric normalisation target range [-4, 4]
AMP_FLOOR = 1e-5        # magnitudes below this are clipped before log10 (= MIN_LEVEL_DB)
FPS = 25                # video frame rate the Wav2Lip alignment was designed for
# 640: frame k <-> samples [640k, 640k + 640) (the project's time base)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
MEL_STEP = 16           # mel columns per audio window = 16 / 80 s = 200 ms = 5 frames at 25 fps
MELS_PER_SECOND = SAMPLE_RATE / HOP  # 80.0 columns per second of audio
SILENCE = -MAX_ABS_VALUE  # the normalised value of a silent column (used for padding windows)

# --------------------------------------------------------------------------------------------------
# Network sizes. `paper` = the published Wav2Lip networks (so published checkpoints load strictly);
# `tiny` = narrow versions that train on 2 CPU cores in minutes, for 64 px frames and style_dim 128.
PRESETS = {  # SyncNet(**PRESETS[name])
    "paper": dict(audio_channels=(32, 64, 128, 256, 512),  # Wav2Lip SyncNet_color audio encoder
                  audio_res=(2, 2, 2, 2),                  # two residual blocks at 256 (idx 10, 11)
                  face_hw=(48, 96),                        # lower half of a 96x96 face crop
                  face_channels=(32, 64, 128, 256, 512, 512),
                  face_res=(2, 3, 2, 2, 0)),
    "tiny": dict(audio_channels=(8, 16, 32, 64, 128),
                 audio_res=(1, 1, 1, 1),
                 face_hw=(32, 64),                         # lower half of a 64x64 face (tiny
                                                           # pipeline)
                 face_channels=(16, 32, 64, 128, 128),
                 face_res=(1, 1, 1, 0)),
}
AUDIO_ENCODER_PRESETS = {  # AudioEncoder(**AUDIO_ENCODER_PRESETS[name]); this is E_a of FC-TFG
    # Wav2Lip generator, -> 512
    "paper": dict(channels=(32, 64, 128, 256, 512), n_res=(2, 2, 2, 1)),
    "tiny": dict(channels=(16, 32, 64, 128, 128), n_res=(1, 1, 1, 1)),    # -> 128 = tiny style_dim
}


# ==== 1. Loading audio ============================================================================
def load_audio(path, sr=SAMPLE_RATE):
    """Read an audio file as float32 mono at `sr` Hz (Sec. 4.1.2: 16 kHz).  -> [N] numpy.

    wav/flac/ogg go through soundfile; anything soundfile cannot open (mp4, m4a, ...) through PyAV
    if it is installed. Stereo is averaged to mono; other sample rates are converted with
    scipy.signal.resample_poly (a polyphase FIR filter: exact rational ratio, no drift over long
    clips).
    Wav2Lip itself used librosa.load (resampy); the two differ only by their anti-alias filters.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"audio file is empty (0 bytes): {path}")
    try:
        # [N, channels], ints scaled to [-1,1)
        x, sr_in = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:  # unknown container or corrupt data
        x, sr_in = _read_with_pyav(path, err)
    if x.shape[0] == 0:
        raise ValueError(f"audio file contains no samples: {path}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"audio file contains NaN or Inf samples: {path}")
    x = x.mean(axis=1)  # stereo -> mono by channel mean (what librosa.load does)
    if int(sr_in) != sr_in or int(sr) != sr or sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got file {sr_in} Hz -> {sr} Hz")
    sr_in, sr = int(sr_in), int(sr)
    if sr_in != sr:
        g = math.gcd(sr_in, sr)  # e.g. 44100 -> 16000 is up 160, down 441
        x = resample_poly(x, sr // g, sr_in // g)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.any(x):
        warnings.warn(f"audio is completely silent: {path}; its mel spectrogram is constant "
                      f"{SILENCE}")
    return x


def _read_with_pyav(path, sf_error):
    """Decode the first audio stream with PyAV (FFmpeg).
    -> ([N, channels] float32, sample rate)."""
    try:
        import av  # optional dependency: only needed for video containers (mp4, m4a, mkv, ...)
    except ImportError:
        raise ValueError(f"soundfile cannot read {path} ({sf_error}); if it is an mp4/m4a, "
                         "install PyAV (`pip install av`) to decode it") from None
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            chunks, resampler, rate = [], None, None
            for frame in container.decode(stream):
                if resampler is None:  # convert to planar float32 only; the rate is kept as is
                    rate = frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name,
                                                  rate=rate)
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())  # [channels, n] for a planar format
            if resampler is not None:
                for f in resampler.resample(None):  # flush samples buffered inside the resampler
                    chunks.append(f.to_ndarray())
            # AAC decodes whole 1024-sample frames: past the stream's stated duration hang up to
            # 2112 samples of encoder padding (FFmpeg's 1024, Apple's 2112), one video frame's worth
            # and more. Cut them.
            seconds = (float(stream.duration * stream.time_base)
                       if stream.duration and stream.time_base
                       else container.duration / 1e6 if container.duration else None)
    except av.FFmpegError as err:
        raise ValueError(f"cannot decode audio {path}: soundfile said '{sf_error}', "
                         f"PyAV said '{err}'") from None
    if not chunks:
        raise ValueError(f"audio file contains no samples: {path}")
    x = np.concatenate(chunks, axis=1).T.astype(np.float32)
    n = round(seconds * rate) if seconds else len(x)
    return (x[:n] if 0 < len(x) - n <= 2112 else x), rate


# ==== 2. Mel spectrogram (Wav2Lip audio.py + hparams.py). numpy = the definition, torch = batched
# copy. ====
_F_SP = 200.0 / 3                 # Slaney scale: 66.67 Hz per mel in the linear part (1000 Hz ->
                                  # 15 mel)
_LOGSTEP = math.log(6.4) / 27.0   # and 27 mels per factor 6.4 in frequency above 1 kHz


def hz_to_mel(f):
    """Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / _LOGSTEP
    return np.where(f >= 1000.0, log, f / _F_SP)


def mel_to_hz(m):
    """Inverse of hz_to_mel."""
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(_LOGSTEP * (m - 15.0)), _F_SP * m)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX):
    """Triangular Slaney-normalised mel filters.  -> [M, n_fft//2 + 1] float32 (read-only, cached).

    Filter i rises from edge e_i to e_{i+1} and falls to e_{i+2}; the edges are n_mels+2 points
    evenly spaced on the mel scale. Each triangle is scaled by 2/(e_{i+2}-e_i) so it has unit area
    in Hz ("Slaney" normalisation): wide high-frequency bands do not get more energy just for being
    wide.
    """
    if not (0 <= fmin < fmax <= sr / 2):
        raise ValueError(f"need 0 <= fmin < fmax <= sr/2, got fmin={fmin}, fmax={fmax}, sr={sr}")
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got {n_mels}, {n_fft}")
    # [K] bin centres, Hz
    freqs = np.arange(n_fft // 2 + 1) * (sr / n_fft)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # [M+2] Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]            # [M, 1] each
    rising = (freqs - lo) / (mid - lo)     # [M, K] 0 at e_i, 1 at e_{i+1}
    falling = (hi - freqs) / (hi - mid)    # [M, K] 1 at e_{i+1}, 0 at e_{i+2}
    tri = np.maximum(0.0, np.minimum(rising, falling))
    fb = (tri * (2.0 / (hi - lo))).astype(np.float32)  # stored in float32 like librosa/Wav2Lip
    fb.setflags(write=False)  # cached and shared: nobody may edit it in place
    return fb


def hann_window(n=WIN):
    """Periodic Hann window w[k] = 0.5 - 0.5 cos(2 pi k / n) (the DFT-even form used by librosa)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def reflect_indices(n, pad):
    """Sample indices of x padded by `pad` on each side in 'reflect' mode (mirror, edge not
    repeated).

    Written as a periodic mirror of period 2(n-1), so it also works when pad >= n (np.pad does the
    same by reflecting repeatedly; torch's reflect padding refuses that case).  -> [n + 2 pad] int64
    """
    if n < 2:
        raise ValueError(f"reflect padding needs at least 2 samples, got {n}")
    period = 2 * (n - 1)
    j = np.mod(np.arange(-pad, n + pad), period)
    return np.where(j >= n, period - j, j)


def n_mel_columns(n_samples):
    """Columns of melspectrogram for n_samples: T = 1 + floor(N / HOP) (centred frames)."""
    return 1 + n_samples // HOP


def _check_wave(wav, ndims):
    if wav.ndim not in ndims:
        raise ValueError(f"waveform must have {' or '.join(map(str, ndims))} dims, got shape "
                         f"{tuple(wav.shape)}")
    if wav.shape[-1] < 2:
        raise ValueError(f"waveform needs at least 2 samples, got shape {tuple(wav.shape)}")


def melspectrogram(wav):
    """Wav2Lip mel spectrogram of a mono 16 kHz waveform.  [N] float -> [M=80, T] float32,
    T = 1 + N//200.

    Computed in float64 and rounded once at the end, so it is the precise reference for the torch
    copy.
    Column c is centred on sample 200 c; values lie in [-4, 4], silence is exactly -4.
    """
    x = np.asarray(wav, dtype=np.float64)
    _check_wave(x, (1,))
    if not np.all(np.isfinite(x)):
        raise ValueError("waveform contains NaN or Inf")  # Wav2Lip inference also refuses these
    # 1. pre-emphasis: first-order high-pass, zero initial state (y[0] = x[0])
    y = np.concatenate([x[:1], x[1:] - PREEMPHASIS * x[:-1]])
    # 2. centred STFT: pad N_FFT/2 each side by reflection, cut frames every HOP samples
    padded = y[reflect_indices(len(y), N_FFT // 2)]                        # [N + 800]
    T = n_mel_columns(len(y))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # [T, 800] (a view)
    assert frames.shape[0] == T, (frames.shape, T)
    mag = np.abs(np.fft.rfft(frames * hann_window(), axis=-1))            # [T, 401] magnitude
    # 3. mel projection, 4. dB with floor, 5. symmetric normalisation
    mel = mel_filterbank().astype(np.float64) @ mag.T                       # [M, T]
    db = 20.0 * np.log10(np.maximum(AMP_FLOOR, mel)) - REF_LEVEL_DB
    return _normalize(db, np).astype(np.float32)


def _normalize(db, xp):
    """Map [MIN_LEVEL_DB, 0] dB linearly to [-4, 4] and clip (xp = np or torch)."""
    out = 2 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB) - MAX_ABS_VALUE
    return xp.clip(out, -MAX_ABS_VALUE, MAX_ABS_VALUE)


def melspectrogram_torch(wav):
    """Batched torch copy of `melspectrogram` (same steps), for the GPU inside training.

    [N] or [B, N] float tensor -> [M, T] or [B, M, T] in wav's dtype and device. Differentiable.
    float32 agrees with the float64 numpy reference to ~1e-3 in the worst column (bands near the dB
    floor amplify float32 rounding); pass float64 for bit-level agreement.
    """
    if not torch.is_tensor(wav) or not wav.is_floating_point():
        raise ValueError("melspectrogram_torch expects a floating-point torch tensor")
    _check_wave(wav, (1, 2))
    x = wav if wav.ndim == 2 else wav[None]                                  # [B, N]
    y = torch.cat([x[:, :1], x[:, 1:] - PREEMPHASIS * x[:, :-1]], dim=1)      # pre-emphasis
    idx = torch.from_numpy(reflect_indices(y.shape[1], N_FFT // 2)).to(y.device)
    frames = y[:, idx].unfold(-1, N_FFT, HOP)                               # [B, T, 800]
    window = torch.from_numpy(hann_window()).to(y)
    mag = torch.fft.rfft(frames * window, dim=-1).abs()                     # [B, T, 401]
    fb = torch.from_numpy(np.array(mel_filterbank())).to(y)                 # [M, 401]
    mel = torch.einsum("mk,btk->bmt", fb, mag)                              # [B, M, T]
    db = 20.0 * torch.log10(mel.clamp_min(AMP_FLOOR)) - REF_LEVEL_DB
    out = _normalize(db, torch)
    return out if wav.ndim == 2 else out[0]


# ==== 3. Audio <-> video alignment ================================================================
def window_starts(n_frames, fps=FPS):
    """First mel column of the window of each video frame: floor(80 k / fps).  -> [n_frames] int64.

    At 25 fps this is floor(3.2 k): 0, 3, 6, 9, 12, 16, ... (Wav2Lip). Other frame rates just change
    the ratio; windows still span 16 columns = 200 ms (5 frames at 25 fps, 6 at 30 fps).
    """
    if not (isinstance(n_frames, (int, np.integer)) and n_frames >= 1):
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps!r}")
    # k * 80 is an exact integer and float division rounds correctly, so integer ratios floor
    # exactly
    return np.array([math.floor(k * MELS_PER_SECOND / fps) for k in range(n_frames)],
                    dtype=np.int64)


def mel_windows(mel, n_frames, fps=FPS):
    """Cut one 16-column mel window per video frame.  [M, T] -> [n_frames, 1, M, 16] (numpy or torch
    in, same type out).

    Convention (used for training AND testing): frame k gets columns [floor(80k/fps), +16), i.e. the
    200 ms of audio starting at frame k. This is Wav2Lip's inference convention and exactly the
    window its lip-sync expert pairs with frames k..k+4, so the generator and L_sync (Eq. 4) see the
    same alignment. (Wav2Lip's generator training used frame k-1's window instead; we do not.)
    Edge handling: windows that run past the last column are padded at the end with SILENCE (-4, the
    value silent audio produces), as if the audio were padded with silence. Never an index error;
    frames beyond the audio get all-silence windows.
    """
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise ValueError(f"mel must be [{N_MELS}, T], got shape {tuple(mel.shape)}")
    starts = window_starts(n_frames, fps)                       # [n_frames]
    idx = starts[:, None] + np.arange(MEL_STEP)                 # [n_frames, 16] column indices
    need = int(idx.max()) + 1 - mel.shape[1]                    # columns missing at the end
    if torch.is_tensor(mel):
        if need > 0:
            mel = F.pad(mel, (0, need), value=SILENCE)
        out = mel[:, torch.from_numpy(idx).to(mel.device)]      # [M, n_frames, 16]
        return out.permute(1, 0, 2).unsqueeze(1).contiguous()   # [n_frames, 1, M, 16]
    mel = np.asarray(mel)
    if need > 0:
        mel = np.pad(mel, ((0, 0), (0, need)), constant_values=SILENCE)
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2)[:, None])


# ==== 4. Networks (Wav2Lip models/conv.py, the generator's audio encoder, models/syncnet.py) ======
class ConvBlock(nn.Module):
    """Conv2d (with bias) -> BatchNorm -> (+ input if residual) -> ReLU. Wav2Lip's basic block.

    The sub-module is named `conv_block` (a Sequential of conv, BN) so that the state-dict keys are
    Wav2Lip's `conv_block.0.weight`, `conv_block.1.running_mean`, ...
    """

    def __init__(self,
                 cin,              # input channels
                 cout,             # output channels
                 kernel,           # int or (kh, kw)
                 stride=1,         # int or (sh, sw)
                 padding=1,        # zero padding on each side
                 residual=False,   # add the input before the ReLU (needs cin == cout, stride 1)
                 ):
        super().__init__()
        if residual and (cin != cout or stride not in (1, (1, 1))):
            raise ValueError(f"a residual block needs cin == cout and stride 1, got {cin}->{cout}, "
                             f"stride {stride}")
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding),
                                        nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x):
        y = self.conv_block(x)
        if self.residual:
            y = y + x
        return F.relu(y)


def _res(c, n):
    return [ConvBlock(c, c, 3, 1, 1, residual=True) for _ in range(n)]


class AudioEncoder(nn.Sequential):
    """Wav2Lip audio encoder E_a (Sec. 4.1.2): one 200 ms mel window -> a C-dim feature.

    [B, 1, M=80, 16] -> [B, C] (C = channels[-1], 512 for the paper). Strides shrink the mel window
    80x16 -> 80x16 -> 27x16 -> 9x6 -> 3x3, then a 3x3 valid conv and a 1x1 conv give 1x1.
    A Sequential subclass so the blocks are children "0", "1", ...: the keys of a published
    checkpoint (`audio_encoder.<i>.conv_block...`) then load with strict=True and no renaming.
    """

    def __init__(self,
                 channels=(32, 64, 128, 256, 512),  # widths: stem, after each of 3 strided convs,
                                                    # output
                 n_res=(2, 2, 2, 1),                # residual blocks after the stem and each
                                                    # strided conv
                 ):
        if len(channels) != 5 or len(n_res) != 4:
            raise ValueError(f"need 5 channels and 4 residual counts, got {channels}, {n_res}")
        blocks, cin = [], 1
        # -> 80x16, 27x16, 9x6, 3x3
        for cout, stride, n in zip(channels, (1, (3, 1), 3, (3, 2)), n_res):
            blocks += [ConvBlock(cin, cout, 3, stride, 1)] + _res(cout, n)
            cin = cout
        c4 = channels[4]
        blocks += [ConvBlock(cin, c4, 3, 1, 0), ConvBlock(c4, c4, 1, 1, 0)]  # 3x3 valid, then 1x1
        super().__init__(*blocks)
        self.out_dim = c4

    def forward(self, mel):
        if mel.ndim != 4 or tuple(mel.shape[1:]) != (1, N_MELS, MEL_STEP):
            raise ValueError(f"AudioEncoder expects [B, 1, {N_MELS}, {MEL_STEP}], "
                             f"got {tuple(mel.shape)}")
        return super().forward(mel).flatten(1)  # [B, C, 1, 1] -> [B, C]


class FaceEncoder(nn.Sequential):
    """Wav2Lip lip-sync expert's visual encoder f_v: 5 stacked lower-half frames -> a C-dim feature.

    [B, 3*5, H, W] -> [B, C]. Paper preset: 48x96 -> 48x96 (7x7 stem) -> 46x47 (5x5, stride (1,2),
    halves the width so the map becomes square) -> 23x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1 (valid conv
    whose kernel equals the remaining size) -> 1x1 conv. The final kernel is computed from face_hw
    so other input sizes (the tiny 32x64) work; it is 3 for the paper size, as published.
    """

    def __init__(self,
                 face_hw=(48, 96),                           # (H, W) of the stacked input
                 channels=(32, 64, 128, 256, 512, 512),      # stem width, then width of each stage
                 n_res=(2, 3, 2, 2, 0),                      # residual blocks per stage
                 n_frames=5,                                 # frames stacked on channels (RGB each)
                 ):
        if len(channels) != len(n_res) + 1:
            raise ValueError(f"need one more channel entry than stages, got {channels}, {n_res}")
        h, w = face_hw
        blocks = [ConvBlock(3 * n_frames, channels[0], 7, 1, 3)]  # same size
        for s, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            # Wav2Lip's first stage: 5x5, stride (1, 2) (W ~ 2H becomes ~square); later ones halve
            # both sides
            k, st, p = (5, (1, 2), 1) if s == 0 else (3, (2, 2), 1)
            blocks.append(ConvBlock(cin, cout, k, st, p))
            h, w = (h + 2 * p - k) // st[0] + 1, (w + 2 * p - k) // st[1] + 1  # conv output size
            blocks += _res(cout, n_res[s])
        if h != w or h < 1:
            raise ValueError(f"face_hw={face_hw} with {len(n_res)} stages ends at {h}x{w}; need a "
                             f"square map (add/remove a stage or change the input size)")
        c = channels[-1]
        blocks += [ConvBlock(c, c, h, 1, 0), ConvBlock(c, c, 1, 1, 0)]  # h x h -> 1 x 1
        super().__init__(*blocks)
        self.face_hw, self.in_channels, self.out_dim = tuple(face_hw), 3 * n_frames, c

    def forward(self, face):
        if face.ndim != 4 or tuple(face.shape[1:]) != (self.in_channels, *self.face_hw):
            raise ValueError(f"FaceEncoder expects [B, {self.in_channels}, {self.face_hw[0]}, "
                             f"{self.face_hw[1]}], got {tuple(face.shape)}")
        return super().forward(face).flatten(1)  # [B, C]


class SyncNet(nn.Module):
    """Lip-sync expert (Wav2Lip SyncNet_color), standing in for the paper's modified SyncNet
    (Sec. 3.3.2).

    f_a = audio_encoder, f_v = face_encoder; both embeddings are L2-normalised, and because both
    encoders end in ReLU their cosine is in [0, 1], which Wav2Lip reads as P(in sync).
    Key layout `face_encoder.<i>.conv_block.*`, `audio_encoder.<i>.conv_block.*` = Wav2Lip's.
    """

    def __init__(self,
                 audio_channels=(32, 64, 128, 256, 512),      # AudioEncoder widths (last =
                                                              # embedding C)
                 audio_res=(2, 2, 2, 2),                      # AudioEncoder residual counts
                 face_hw=(48, 96),                            # lower-half crop size (H, W)
                 face_channels=(32, 64, 128, 256, 512, 512),  # FaceEncoder widths (last = C)
                 face_res=(2, 3, 2, 2, 0),                    # FaceEncoder residual counts
                 n_frames=5,                                  # frames per sample (200 ms at 25 fps)
                 ):
        super().__init__()
        if audio_channels[-1] != face_channels[-1]:
            raise ValueError(f"audio and face embeddings must have the same width, got "
                             f"{audio_channels[-1]} and {face_channels[-1]}")
        self.face_encoder = FaceEncoder(face_hw, face_channels, face_res, n_frames)
        self.audio_encoder = AudioEncoder(audio_channels, audio_res)
        self.n_frames, self.face_hw = n_frames, tuple(face_hw)

    def embed_audio(self, mel):
        """f_a: [B, 1, 80, 16] -> unit vectors [B, C]."""
        return F.normalize(self.audio_encoder(mel), p=2, dim=1)

    def embed_face(self, face):
        """f_v: [B, 3*5, H, W] -> unit vectors [B, C]."""
        return F.normalize(self.face_encoder(face), p=2, dim=1)

    def forward(self, mel, face):
        """-> (audio embedding, face embedding), each [B, C] and unit length (Wav2Lip's order)."""
        return self.embed_audio(mel), self.embed_face(face)

    def cosine(self, mel, face):
        """cos(f_v(face), f_a(mel)) per sample -> [B]; L_sync of Eq. (4) is 1 - this."""
        a, v = self(mel, face)
        return (a * v).sum(dim=1)

    def sync_probability(self, mel, face):
        """P(in sync) as Wav2Lip defines it: the cosine itself (in [0, 1], see class docstring)."""
        return self.cosine(mel, face).clamp(0.0, 1.0)  # clamp only guards float rounding


def loss_expert_bce(p, y, eps=1e-7):
    """Training loss of the expert (Wav2Lip): BCE(cos(a, v), y), y = 1 in sync, 0 for a shifted
    clip.

    [B], [B] -> scalar (mean over the batch). An all-zero ReLU output gives cos = 0 and log(0); p is
    clamped to [eps, 1-eps] (torch's BCELoss clamps the log at -100 instead; same purpose).
    """
    p = p.clamp(eps, 1 - eps)
    return F.binary_cross_entropy(p, y.to(p.dtype))


def loss_expert_nce(a, v, temperature=0.1):
    """Contrastive alternative to loss_expert_bce (the tiny recipe's; see stages.SyncNetStage).

    a, v: [N, C] unit embeddings of N in-sync (audio, face) pairs. Row i of a @ v.T / temperature
    holds pair i's cosine and its N-1 mismatches; cross-entropy picks the diagonal in both
    directions (audio -> face and face -> audio), as CLIP does. Needs N >= 2 (0 returned
    otherwise)."""
    if a.shape != v.shape or a.ndim != 2:
        raise ValueError(f"a and v must both be [N, C], got {tuple(a.shape)} and {tuple(v.shape)}")
    if a.shape[0] < 2:
        return (a * v).sum() * 0.0  # no negatives in this batch: a zero loss that keeps the graph
    logits = a @ v.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def expert_window(frames, size=None, bgr=False):
    """Turn 5 consecutive generated/real frames into the expert's input.

    frames [B, 5, 3, H, W] in [-1, 1] (our RGB convention) -> [B, 15, H'/2, W'] in [0, 1]:
    optional resize to size x size (96 for the paper preset; bilinear, antialiased), optional
    RGB->BGR (the published Wav2Lip expert was trained on OpenCV BGR images), keep the lower half of
    the rows (the mouth), stack frames on channels frame-major (f0 c0,c1,c2, f1 c0, ...).
    Differentiable, so L_sync's gradient reaches x_g.
    """
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
    B, T = frames.shape[:2]
    x = (frames.flatten(0, 1) + 1) / 2                                    # [B*T, 3, H, W] in [0, 1]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    if bgr:
        x = x.flip(1)
    H = x.shape[-2]
    if H % 2:
        raise ValueError(f"frame height must be even to take the lower half, got {H}")
    x = x[:, :, H // 2:]                                                  # [B*T, 3, H/2, W]
    return x.unflatten(0, (B, T)).flatten(1, 2)                           # [B, 3T, H/2, W]


# ==== 5. Loaders for the published checkpoint formats =============================================
def _read_state_dict(path):
    """torch.load (weights only) -> a plain state dict with DataParallel `module.` prefixes removed.

    Wav2Lip saves {'state_dict', 'optimizer', 'global_step', 'global_epoch'}; a bare state dict
    works too.
    """
    path = os.fspath(path)
    try:
        ckpt = load_checkpoint(path)  # FileNotFoundError passes through as it is
    # any unpickling failure: random bytes can raise IndexError, KeyError, ...
    except ValueError as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_audio_encoder(path, preset="paper"):
    """E_a from a Wav2Lip generator checkpoint (wav2lip.pth / wav2lip_gan.pth): only the keys
    `audio_encoder.*` are taken, everything else (face encoder, decoder) is ignored on purpose.
    Returned trainable: Sec. 4.1.2 fine-tunes the pre-trained models during training."""
    sd = _read_state_dict(path)
    prefix = "audio_encoder."
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"{path}: no '{prefix}*' keys; is this a Wav2Lip generator checkpoint? "
                         f"first keys: {list(sd)[:5]}")
    return load_strict(AudioEncoder(**AUDIO_ENCODER_PRESETS[preset]), sub,
                       f"load_audio_encoder({path})")


def load_expert(path, preset="paper", device="cpu"):
    """The frozen lip-sync expert of Eq. (4) and of LSE with our expert: a train.py syncnet-stage
    checkpoint ({'stage': 'syncnet', 'cfg', 'syncnet'}; its own preset) or a published Wav2Lip
    lipsync_expert.pth (`preset` sizes it). `input_bgr` says which colour order it was trained on:
    Wav2Lip's expert saw OpenCV BGR crops, ours RGB; expert_window(..., bgr=net.input_bgr) feeds it
    its own order (losses.sync_loss, evaluate.lse_expert)."""
    ck = load_checkpoint(path)
    if isinstance(ck, dict) and "syncnet" in ck:
        net = SyncNet(**PRESETS[ck["cfg"]["model"]])
        net.load_state_dict(ck["syncnet"])
        net.input_bgr = False
    else:
        net = load_syncnet(path, preset)
        net.input_bgr = True
    return net.to(device).eval().requires_grad_(False)


def load_syncnet(path, preset="paper"):
    """The lip-sync expert from a Wav2Lip expert checkpoint (lipsync_expert.pth). All keys must
    match. Returned frozen (eval mode, no gradients), as used for L_sync (Eq. 4): the loss then
    moves only the generator, never the judge."""
    model = load_strict(SyncNet(**PRESETS[preset]), _read_state_dict(path), f"load_syncnet({path})")
    return model.eval().requires_grad_(False)
