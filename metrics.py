"""metrics.py: the five metrics of Table 1 (Sec. 4.2.1), hand-written in torch, and the measures of
fidelity and steadiness over time that the protocols report beside them.

Sec. 4.2.1 names five metrics and states none of their conventions; published talking-face code
disagrees on almost every one, so each function below says exactly which convention it follows and
which reference implementation it reproduces (the tests compare with those as oracles).

SSIM    [56] Wang et al. 2004, 11x11 Gaussian, valid region  -> ssim
MS-SSIM [57] Wang et al. 2003, 5 scales                      -> ms_ssim
PSNR    10 log10(L^2 / MSE), per frame, float64             -> psnr
Fidelity (ours): sharpness, background / skin error, PSNR   -> fidelity, laplacian_energy
          on procedural frames, masks from the renderer
Flicker (Table 3, Sec. 4.4.2) at temporal-window borders    -> flicker
Steadiness (ours): jitter and seam vs the ground truth      -> steadiness
Frames as a saved video holds them (uint8 grid)             -> to_255
LMD     [11] mouth landmarks 48-67 (dlib 68 points)          -> lmd, lmd_from_landmarks,
                                                                mouth_landmarks
          the same distance for any point set                -> lmd_points
LSE-D / LSE-C [42] SyncNet v2 of syncnet_python              -> lse, sync_scores,
                                                                lse_from_embeddings
          its MFCC front-end (python_speech_features)        -> mfcc
          its network and published weights                 -> SyncNetV2, load_syncnet_v2

Conventions in one place (details next to the code):
- Images are [B, C, H, W] RGB tensors, either uint8 or float in 0..data_range; a video is just B=T.
- Metric values are per image ([B]); averaging over frames / videos is the protocols' job
  (evaluate.py, attributes.py).
- All maths runs on the input's device and dtype (float64 inputs give oracle-level agreement).
Not here: the protocols and tables (evaluate.py, attributes.py), the motion probe that reads
landmarks and attributes from procedural frames, where dlib finds no face (attributes.py), the
throughput of these metrics vs the test oracles (bench.py --metrics), the Wav2Lip mel front-end
and the SyncNet_color expert used for training (audio.py)."""
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import files

# ==== SSIM / MS-SSIM / PSNR (Sec. 4.2.1, refs [56], [57]) =========================================
SSIM_WIN = 11          # Gaussian window side (Wang et al. 2004)
SSIM_SIGMA = 1.5       # its standard deviation in pixels
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers: C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest -> coarsest
# 160: image sides must exceed it for one window at the 5th scale
MS_SSIM_MIN_SIDE = (SSIM_WIN - 1) * 2 ** 4
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B (used when color="luma")


def _check_images(x, y, data_range, min_side):
    """Shared input check of the image metrics: same-shaped [B, C, H, W] tensors, big enough."""
    for name, t in (("x", x), ("y", y)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0 (255 for uint8-range images, 1 for [0,1]); "
                         f"got {data_range}")
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"images are {tuple(x.shape[-2:])} but this metric needs both sides "
                         f">= {min_side}")


def _check_frames(frames):
    """The video metrics' input check: one [T, 3, H, W] RGB tensor."""
    if not torch.is_tensor(frames) or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"frames must be a [T, 3, H, W] RGB tensor, got "
            f"{tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__}")


def _prepare(x, y, color):
    """uint8 -> float32 (exact: every uint8 is a float32), float inputs keep their dtype (float64
    inputs give float64 results). color="mean": every channel scored separately and the scores
    averaged, as scikit-image (channel_axis) and pytorch-msssim do; color="luma": one grey channel
    0.299 R + 0.587 G + 0.114 B (unrounded; inputs must be RGB, not OpenCV's BGR)."""
    if color not in ("mean", "luma"):
        raise ValueError(f"color must be 'mean' or 'luma', got {color!r}")
    x, y = (t if t.is_floating_point() else t.to(torch.float32) for t in (x, y))
    if color == "luma":
        if x.shape[1] != 3:
            raise ValueError(f"color='luma' needs 3 RGB channels, got {x.shape[1]}")
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x, y = (x * w).sum(1, keepdim=True), (y * w).sum(1, keepdim=True)  # [B, 1, H, W]
    return x, y


def _gaussian_window(dtype, device):
    """1-D Gaussian of SSIM_WIN taps, sigma SSIM_SIGMA, normalised to sum 1. The 2-D window of
    Wang et al. is its outer product, so filtering rows then columns is the same and 5x cheaper."""
    r = torch.arange(SSIM_WIN, dtype=dtype, device=device) - (SSIM_WIN - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def _band_matrix(n, g):
    """[n-K+1, n] matrix whose row i holds the K taps of g in columns i..i+K-1: multiplying by it
    is a 'valid' 1-D correlation with g (no padding)."""
    K = g.numel()
    idx = torch.arange(n - K + 1, device=g.device)[:, None] + torch.arange(K, device=g.device)[None]
    return torch.zeros(n - K + 1, n, dtype=g.dtype, device=g.device).scatter_(
        1, idx, g.expand(n - K + 1, K))


def _blur_valid(x):
    """Gaussian filtering with the 11x11 SSIM window, valid region only: [..., H, W] ->
    [..., H-10, W-10].
    The obvious version is two depthwise F.conv2d calls (rows, then columns; tests compare with it).
    Written as two matrix products with banded matrices instead, A_H x A_W^T: more arithmetic but
    a single well-tuned matmul, ~4x faster than depthwise conv on CPU and just as fast on GPU."""
    g = _gaussian_window(x.dtype, x.device)
    H, W = x.shape[-2:]
    return _band_matrix(H, g) @ x @ _band_matrix(W, g).T


def _ssim_terms(x, y, data_range):
    """Per-channel SSIM and contrast-structure term cs, each [B, C] (Wang et al. 2004).

    Local statistics under the Gaussian window w:  mu = w*x, sigma_x^2 = w*x^2 - mu_x^2 (biased,
    i.e. weights sum to 1, not N/(N-1): scikit-image's use_sample_covariance=False), likewise
    sigma_xy.
      l  = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)            luminance
      cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)        contrast x structure (C3 = C2/2)
      SSIM map = l * cs, averaged over the *valid* region only (no padding: the border pixels
      whose window leaves the image are not scored, as in Wang's code, scikit-image and
      pytorch-msssim)."""
    B = x.shape[0]
    # The five local means of all channels in one go: [5B, C, H, W] -> [5B, C, H-10, W-10].
    stack = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.split(B, dim=0)  # each [B, C, H-10, W-10]
    s_xx, s_yy, s_xy = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    cs_map = (2 * s_xy + c2) / (s_xx + s_yy + c2)
    l_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (l_map * cs_map).mean((-2, -1)), cs_map.mean((-2, -1))


def ssim(x, y, data_range=255.0, color="mean"):
    """SSIM [56] per image: [B, C, H, W] x2 -> [B].

    data_range = L, the span of the pixel values (255 for 0..255 / uint8, 1.0 for [0, 1]); it only
    sets C1, C2. Equals scikit-image structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L, channel_axis=...) and pytorch_msssim.ssim.
    Differentiable (usable as a loss)."""
    _check_images(x, y, data_range, SSIM_WIN)
    x, y = _prepare(x, y, color)
    s, _ = _ssim_terms(x, y, data_range)
    return s.mean(1)  # [B]: mean over channels (one channel for luma)


def _halve(x):
    """2x2 average then keep every 2nd pixel. An odd side is first extended by repeating its last
    row/column, which is what Wang's MATLAB reference does (imfilter 'symmetric' + 1:2:end), so the
    side becomes ceil(side/2). pytorch-msssim pads odd sides with zeros instead (darkening that
    edge); both agree on even sides, i.e. every size where H and W are divisible by 16 (224,
    256)."""
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        x = F.pad(x, (0, W % 2, 0, H % 2), mode="replicate")
    return F.avg_pool2d(x, 2)


def ms_ssim(x, y, data_range=255.0, color="mean"):
    """MS-SSIM [57] per image: [B, C, H, W] x2 -> [B].

    MS-SSIM = prod_{j=1..4} cs_j^{w_j} * SSIM_5^{w_5}, scale j+1 = _halve(scale j), weights
    MS_SSIM_WEIGHTS. Only the coarsest scale contributes luminance. As in pytorch-msssim, each term
    is clipped at 0 before the fractional power (a negative base would give NaN), the product is
    formed per channel, then channels are averaged. The coarsest scale is ceil(side/16) pixels and
    must hold one 11x11 window, so both sides must be > 160 (224 and 256 are fine, 128 is not)."""
    _check_images(x, y, data_range, 1)
    if min(x.shape[-2:]) <= MS_SSIM_MIN_SIDE:
        raise ValueError(f"ms_ssim needs both image sides > {MS_SSIM_MIN_SIDE} for 5 scales "
                         f"of an {SSIM_WIN}x{SSIM_WIN} window; got {tuple(x.shape[-2:])} "
                         f"(use ssim instead)")
    x, y = _prepare(x, y, color)
    w = torch.tensor(MS_SSIM_WEIGHTS, dtype=x.dtype, device=x.device)
    terms = []
    for j in range(len(MS_SSIM_WEIGHTS)):
        s, cs = _ssim_terms(x, y, data_range)  # [B, C] each
        if j < len(MS_SSIM_WEIGHTS) - 1:
            terms.append(cs.clamp_min(0))  # scales 1..4: contrast-structure only
            x, y = _halve(x), _halve(y)
        else:
            terms.append(s.clamp_min(0))   # scale 5: full SSIM (luminance enters once, here)
    ms = (torch.stack(terms, dim=-1) ** w).prod(-1)  # [B, C]
    return ms.mean(1)


def psnr(x, y, data_range=255.0):
    """PSNR per image: [B, C, H, W] x2 -> [B] float64, 10 log10(L^2 / MSE), MSE over C, H, W.

    Both inputs are cast to float64 *before* subtracting: uint8 - uint8 wraps modulo 256 (the
    ATVGnet psnr_f bug, which turns a difference of -240 into 16). Identical images have MSE 0; they
    get +inf explicitly (no division-by-zero warning, never NaN), so a caller averaging over frames
    sees the inf and must decide (the protocol reports the count of such frames)."""
    _check_images(x, y, data_range, 1)
    x, y = x.to(torch.float64), y.to(torch.float64)
    mse = (x - y).pow(2).flatten(1).mean(1)  # [B]
    val = 10 * torch.log10(data_range ** 2 / mse.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(mse > 0, val, torch.full_like(val, math.inf))


# ==== Fidelity on procedural frames (ours): sharp, and the source's own colours where they belong
# Table 1's SSIM / PSNR average over the whole frame; these four say WHERE a generated face departs
# from its ground truth: a blurred head (the smoothing Eq. 7 is there to fight), a background or
# skin taken from the driver instead of the source (the identity Eq. 5 is there to keep). Masks:
# procedural.region_masks.
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))  # the 5-point discrete Laplacian


def laplacian_energy(x255, mask):
    """Sum over frames and masked pixels of the squared Laplacian of luminance (BT.601, 0..255).
    x255 [T, 3, H, W], mask bool [T, H, W]; the outermost pixel ring (no full 3x3 stencil) is left
    out."""
    y = (x255.double() * x255.new_tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)).sum(
        1, keepdim=True)
    lap = F.conv2d(y, y.new_tensor(LAPLACIAN).view(1, 1, 3, 3))[:, 0]           # [T, H-2, W-2]
    return float((lap.pow(2) * torch.as_tensor(mask)[:, 1:-1, 1:-1].to(lap.device)).sum())


def fidelity(gen255, gt255, masks):
    """gen255, gt255 [T, 3, H, W] on 0..255; masks: dict head / background / skin of bool
    [T, H, W] (the ground truth's) -> dict of
      sharpness      laplacian_energy over the head, generated / ground truth (1 = as sharp,
                     < 1 blurred)
      background_err mean |gen - gt| in grey levels over the background pixels (all channels)
      skin_err       the same over the face skin
      psnr           PSNR of the whole frame, mean over frames (psnr above; identical frames:
                     inf)."""
    err = (gen255.double() - gt255.double()).abs().mean(1)                        # [T, H, W]

    def masked_mean(name):
        m = torch.as_tensor(masks[name]).to(err.device)
        return float(err[m].mean()) if m.any() else None
    ref = laplacian_energy(gt255, masks["head"])
    return dict(sharpness=laplacian_energy(gen255, masks["head"]) / ref if ref > 0 else None,
                background_err=masked_mean("background"), skin_err=masked_mean("skin"),
                psnr=float(psnr(gen255, gt255).mean()))


# ==== Frames as saved, and steadiness over time (Table 3's flicker, Sec. 4.4.2; jitter, seam: ours)
# The protocols (evaluate.py, attributes.py) score frames as a saved video would hold them (to_255);
# flicker and steadiness compare how a clip changes from frame to frame with its ground truth's.
def to_255(x):
    """Generator range [-1, 1] -> float32 0..255 on the uint8 grid (what a saved video holds)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def flicker(x, window):
    """Table 3's flicker measure: mean |x_{t+1} - x_t| over frame pairs that straddle a
    temporal-window border vs pairs inside one window. x [T, ...] (frames or W+ codes, any float
    range), window = the fusion window W: windows are [0, W), [W, 2W), ..., so the pair (t, t+1) is
    a border pair when (t + 1) % W == 0. -> dict(border, inside, ratio = border / inside) (None
    where a kind is absent). A model whose windows are fused independently jumps at borders
    (ratio > 1); for real frames the ratio is ~1, the reference."""
    T = x.shape[0]
    if window is None or T < 2:
        return dict(border=None, inside=None, ratio=None)
    step = (x[1:].double() - x[:-1].double()).abs().flatten(1).mean(1)           # [T-1]
    at_border = (torch.arange(1, T) % window) == 0
    b, i = (float(step[m].mean()) if m.any() else None for m in (at_border, ~at_border))
    return dict(border=b, inside=i, ratio=b / i if b is not None and i else None)


def steadiness(gen, truth, window):
    """How steady the generated clip is next to its ground truth: gen, truth [T, ...] (frames on
    0..255) -> dict(jitter = mean frame-to-frame change of gen / of truth (1 = moves as much as the
    truth; a still: 0), seam = gen's border / inside change ratio (flicker) over the truth's (1 = no
    seam at the temporal-window borders; the paper's non-overlapping windows, Sec. 4.4.2, show one
    above 1)); None where undefined."""
    step = lambda x: float((x[1:].double()
                            - x[:-1].double()).abs().mean()) if x.shape[0] > 1 else None
    g, t = step(gen), step(truth)
    fg, ft = flicker(gen, window), flicker(truth, window)
    ok = fg["ratio"] is not None and ft["ratio"]
    return dict(jitter=g / t if g is not None and t else None,
                seam=fg["ratio"] / ft["ratio"] if ok else None)


# ==== LSE-D / LSE-C (Sec. 4.2.1, ref [42]): SyncNet v2 of joonson/syncnet_python, rewritten =======
SYNC_SR = 16000        # Hz: syncnet_python resamples every clip to 16 kHz mono int16
SYNC_FPS = 25          # video frames per second it assumes
MFCC_PER_FRAME = 4     # 100 MFCC frames/s / 25 video frames/s
SYNC_FRAMES = 5        # one SyncNet window = 5 video frames = 20 MFCC frames = 0.2 s
SYNC_SIZE = 224        # SyncNet v2 input side in pixels
SYNC_VSHIFT = 15       # offsets searched: -15..+15 frames (the published evaluation setting)


def _mel_filterbank(n_filt, n_fft, sr, device):
    """Triangular filters [n_filt, n_fft//2+1] (float64) placed like python_speech_features:
    n_filt+2 edges evenly spaced on the HTK mel scale m = 2595 log10(1 + f/700) from 0 Hz to sr/2,
    each edge snapped *down* to an FFT bin b = floor((n_fft+1) f / sr); filter i rises linearly
    from edge i to edge i+1 and falls to edge i+2, peak 1 (no area normalisation)."""
    top_mel = 2595 * math.log10(1 + (sr / 2) / 700)
    mel = torch.linspace(0, top_mel, n_filt + 2, dtype=torch.float64, device=device)
    hz = 700 * (10 ** (mel / 2595) - 1)
    b = torch.floor((n_fft + 1) * hz / sr)  # [n_filt+2] bin index of every edge
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=device)[None]  # [1, K]
    lo, mid, hi = b[:-2, None], b[1:-1, None], b[2:, None]  # [n_filt, 1] each
    # clamp_min(1): when two edges share a bin the matching slope covers no bin, so the value is
    # unused.
    rise = torch.where((k >= lo) & (k < mid), (k - lo) / (mid - lo).clamp_min(1), 0.0)
    fall = torch.where((k >= mid) & (k < hi), (hi - k) / (hi - mid).clamp_min(1), 0.0)
    return rise + fall


def _dct2_ortho(n, device):
    """Orthonormal DCT-II matrix [n, n] (float64): row k = sqrt(2/n) cos(pi k (2i+1) / 2n),
    row 0 / sqrt(2) (scipy.fft.dct(type=2, norm='ortho') as a matrix)."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None]
    D = math.sqrt(2 / n) * torch.cos(math.pi * k * (2 * i + 1) / (2 * n))
    D[0] /= math.sqrt(2)
    return D


def mfcc(audio, sample_rate=SYNC_SR):
    """MFCCs exactly as python_speech_features.mfcc with its defaults (what syncnet_python uses):
    [N] samples -> [13, T] float64 (coefficient-major, as SyncNet consumes them).

    1. pre-emphasis y[n] = x[n] - 0.97 x[n-1] (y[0] = x[0]);
    2. frames of 25 ms (400 samples) every 10 ms (160), rectangular window (no Hamming!),
       T = 1 + ceil((N - 400) / 160) (1 if N <= 400), the tail zero-padded;
    3. power spectrum |FFT_512|^2 / 512 (the 400 samples zero-padded to 512);
    4. 26 mel filter energies, log (exact zeros replaced by float64 eps first);
    5. orthonormal DCT-II, keep 13, lifter c_n *= 1 + 11 sin(pi n / 22);
    6. c_0 replaced by log of the frame's total power (sum of the power spectrum).
    The values are used as given: syncnet_python feeds int16 sample *values* (-32768..32767), and
    because the log turns a scale s into + 2 ln s only c_0 depends on it (lse() does the
    scaling)."""
    x = torch.as_tensor(audio)
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"mfcc expects one non-empty mono signal [N], got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    win = int(math.floor(0.025 * sample_rate + 0.5))   # 400 at 16 kHz
    hop = int(math.floor(0.010 * sample_rate + 0.5))   # 160
    n_fft, n_filt, n_cep, lifter = 512, 26, 13, 22
    x = torch.cat([x[:1], x[1:] - 0.97 * x[:-1]])                            # 1. pre-emphasis
    T = 1 if x.numel() <= win else 1 + math.ceil((x.numel() - win) / hop)
    x = F.pad(x, (0, (T - 1) * hop + win - x.numel()))                       # 2. zero tail
    frames = x.unfold(0, win, hop)                                           # [T, 400]
    power = torch.fft.rfft(frames, n=n_fft).abs() ** 2 / n_fft               # 3. [T, 257]
    eps = torch.finfo(torch.float64).eps
    energy = power.sum(1)
    energy = torch.where(energy == 0, eps, energy)                           # [T]
    feat = power @ _mel_filterbank(n_filt, n_fft, sample_rate, x.device).T   # 4. [T, 26]
    feat = torch.log(torch.where(feat == 0, eps, feat))
    cep = feat @ _dct2_ortho(n_filt, x.device)[:n_cep].T                     # 5. [T, 13]
    n = torch.arange(n_cep, dtype=torch.float64, device=x.device)
    cep = cep * (1 + lifter / 2 * torch.sin(math.pi * n / lifter))
    cep[:, 0] = torch.log(energy)                                            # 6.
    return cep.T  # [13, T]


def _cbr(conv):
    """conv -> BatchNorm (2-D or 3-D, as the conv) -> ReLU: three Sequential entries, so state-dict
    indices match the published file (conv at i, BN at i+1; ReLU and max-pool have no parameters
    but take indices)."""
    bn = nn.BatchNorm3d if isinstance(conv, nn.Conv3d) else nn.BatchNorm2d
    return [conv, bn(conv.out_channels), nn.ReLU(inplace=True)]


def _fc_head():
    """Linear 512->512, BN1d, ReLU, Linear 512->1024 (keys 0, 1, 3)."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                         nn.Linear(512, 1024))


class SyncNetV2(nn.Module):
    """SyncNet v2 ("S" in syncnet_python), the network behind LSE-D / LSE-C [42].
    Two towers, no shared weights, trained so that in-sync audio/lip embeddings are close in L2:
      embed_audio: MFCC window [N, 1, 13, 20] -> [N, 1024]
      embed_lips:  5 BGR frames [N, 3, 5, 224, 224], 0..255 unnormalised -> [N, 1024]
    The Sequential indices are part of the weight file's key names (netcnnaud.18.weight, ...), so
    the layer order below must not change. 13,631,616 parameters, 102 state-dict entries."""

    def __init__(self):
        super().__init__()
        c2, c3, p3 = nn.Conv2d, nn.Conv3d, (0, 1, 1)
        self.netcnnaud = nn.Sequential(                                  # [N, 1, 13, 20]
            *_cbr(c2(1, 64, 3, padding=1)),                               # 0-2   13x20
            nn.MaxPool2d(1, 1),                                           # 3     a no-op kept for
                                                                          #       the key indices
            *_cbr(c2(64, 192, 3, padding=1)),                             # 4-6
            nn.MaxPool2d(3, stride=(1, 2)),                               # 7     11x9
            *_cbr(c2(192, 384, 3, padding=1)),                            # 8-10
            *_cbr(c2(384, 256, 3, padding=1)),                            # 11-13
            *_cbr(c2(256, 256, 3, padding=1)),                            # 14-16
            nn.MaxPool2d(3, stride=2),                                    # 17    5x4
            *_cbr(c2(256, 512, (5, 4))),                                  # 18-20 1x1
        )
        self.netfcaud = _fc_head()
        self.netcnnlip = nn.Sequential(                                  # [N, 3, 5, 224, 224]
            *_cbr(c3(3, 96, (5, 7, 7), stride=(1, 2, 2))),                # 0-2   T 5->1, 109^2
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),                    # 3     54^2
            *_cbr(c3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=p3)),  # 4-6   26^2
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=p3),        # 7     13^2
            *_cbr(c3(256, 256, (1, 3, 3), padding=p3)),                   # 8-10
            *_cbr(c3(256, 256, (1, 3, 3), padding=p3)),                   # 11-13
            *_cbr(c3(256, 256, (1, 3, 3), padding=p3)),                   # 14-16
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),                    # 17    6^2
            *_cbr(c3(256, 512, (1, 6, 6))),                               # 18-20 1^2
        )
        self.netfclip = _fc_head()

    def embed_audio(self, mfcc_win):
        """[N, 1, 13, 20] MFCC windows -> [N, 1024] (raw, not normalised)."""
        return self.netfcaud(self.netcnnaud(mfcc_win).flatten(1))  # conv output [N, 512, 1, 1]

    def embed_lips(self, clip):
        """[N, 3, 5, 224, 224] BGR 0..255 -> [N, 1024] (raw, not normalised)."""
        return self.netfclip(self.netcnnlip(clip).flatten(1))      # conv output [N, 512, 1, 1, 1]


def load_syncnet_v2(path, device="cpu"):
    """Load the published syncnet_v2.model: a plain state dict {'netcnnaud.0.weight': ...}, loaded
    key by key in syncnet_python. Every key must be known and every shape must match; only the
    BatchNorm num_batches_tracked counters may be absent (they do not affect eval-mode outputs).
    Returns the network in eval mode (BatchNorm uses the stored running statistics)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SyncNet v2 weights not found: {path}")
    sd = files.load_checkpoint(path, "SyncNet v2 checkpoint")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors (the syncnet_v2.model "
                         f"layout)")
    return files.load_strict(SyncNetV2(), sd, f"{path} (the SyncNet v2 layout)").to(device).eval()


def lse_from_embeddings(v, a, vshift=SYNC_VSHIFT):
    """Offset search and scores of syncnet_python, from per-window embeddings v, a: [n, D] each
    (window i = video frames i..i+4 and the audio of the same 0.2 s).

    d[i, j] = || v_i - a_{i+j-vshift} + 1e-6 ||_2 for j = 0..2 vshift, where audio windows outside
      0..n-1 are *zero vectors that still count* (syncnet_python zero-pads; 1e-6 is the eps of
      torch pairwise_distance, added to the difference);
    mdist[j] = mean_i d[i, j];  LSE-D = min_j mdist;  LSE-C = median_j mdist - LSE-D (median of the
    2 vshift + 1 = 31 values = the 16th smallest);  offset = vshift - argmin_j (frames; a lip window
    best matched by the audio k windows later gives offset -k).
    Returns dict(lse_d, lse_c, offset, mdist [2 vshift + 1])."""
    if v.ndim != 2 or v.shape != a.shape or v.shape[0] < 1:
        raise ValueError(f"v and a must be equal [n, D] with n >= 1, got {tuple(v.shape)} and "
                         f"{tuple(a.shape)}")
    n = v.shape[0]
    a_pad = F.pad(a, (0, 0, vshift, vshift))  # [n + 2 vshift, D], zero rows at both ends
    idx = torch.arange(n, device=v.device)[:, None] + torch.arange(2 * vshift + 1,
                                                                   device=v.device)[None]
    d = (v[:, None, :] - a_pad[idx] + 1e-6).norm(dim=-1)  # [n, 2 vshift + 1]
    mdist = d.mean(0)
    lse_d, j = mdist.min(0)
    lse_c = mdist.median() - lse_d  # torch.median = lower median; exact middle for an odd count
    return dict(lse_d=float(lse_d), lse_c=float(lse_c), offset=vshift - int(j), mdist=mdist)


def _audio_to_int16_scale(audio):
    """Audio as syncnet_python sees it: int16 sample values. Integer input is used as is; float
    input is taken as soundfile-style [-1, 1) samples (int16 / 32768) and scaled back by 32768.
    Only MFCC c_0 depends on this (+ 20.79 = ln 32768^2), but SyncNet was trained on int16
    values."""
    a = torch.as_tensor(audio)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono [N] (downmix stereo by the channel mean first), "
                         f"got {tuple(a.shape)}")
    return a.to(torch.float64) * (32768.0 if a.is_floating_point() else 1.0)


def sync_scores(frames, audio, syncnet, sample_rate=SYNC_SR, vshift=SYNC_VSHIFT, batch_size=32):
    """LSE-D / LSE-C of one video, with the windowing of syncnet_python's SyncNetInstance.evaluate.

    frames: [T, 3, H, W] RGB at 25 fps, uint8 or float in 0..255 (generator output in [-1, 1] must
      be mapped with (x + 1) * 127.5 first). Whole frames are resized to 224x224 (bilinear), the
      variant of Wav2Lip's evaluation/scores_LSE (no face detection / crop; our frames are already
      aligned face crops) and the JPEG re-encoding of syncnet_python is skipped. RGB -> BGR flip,
      because SyncNet v2 was trained on OpenCV frames.
    audio: [N] mono 16 kHz (see _audio_to_int16_scale for the value range).
    Only L = min(T, floor(N / 640)) frames are used (640 samples = one 25 fps frame); windows start
    at frames i = 0..L-6 (syncnet_python's loop bound L-5 is exclusive), the audio window of i is
    MFCC columns 4i..4i+19. Runs on the device of syncnet; returns lse_from_embeddings(...) plus
    n_windows."""
    if sample_rate != SYNC_SR:
        raise ValueError(f"SyncNet v2 needs {SYNC_SR} Hz audio, got {sample_rate} Hz: resample "
                         "first (e.g. scipy.signal.resample_poly)")
    _check_frames(frames)
    if frames.is_floating_point() and float(frames.min()) < -1e-3:
        raise ValueError("frames contain negative values: SyncNet v2 expects 0..255 (map [-1,1] "
                         "with (x+1)*127.5)")
    audio = _audio_to_int16_scale(audio)
    L = min(frames.shape[0], audio.numel() // (SYNC_SR // SYNC_FPS))
    # syncnet_python's count (its last possible window, start L-5, is never used)
    n_win = L - SYNC_FRAMES
    if n_win < 1:
        raise ValueError(f"need at least {SYNC_FRAMES + 1} frames with their audio "
                         f"({(SYNC_FRAMES + 1) * SYNC_SR // SYNC_FPS} samples); "
                         f"got {frames.shape[0]} frames, {audio.numel()} samples")
    dev = next(syncnet.parameters()).device
    cc = mfcc(audio.to(dev)).to(torch.float32)  # [13, n_mfcc]
    v, a = [], []
    with torch.no_grad():
        for s in range(0, n_win, batch_size):
            e = min(n_win, s + batch_size)
            # frames s .. e+3 cover all windows starting in [s, e): resize once, then slice.
            chunk = frames[s:e + SYNC_FRAMES - 1].to(dev, torch.float32).flip(1)  # RGB -> BGR
            if chunk.shape[-2:] != (SYNC_SIZE, SYNC_SIZE):
                chunk = F.interpolate(chunk, size=(SYNC_SIZE, SYNC_SIZE), mode="bilinear",
                                      align_corners=False)
            # [n, 5, 3, 224, 224]
            clips = torch.stack([chunk[i:i + SYNC_FRAMES] for i in range(e - s)])
            v.append(syncnet.embed_lips(clips.permute(0, 2, 1, 3, 4)))         # [n, 3, 5, 224, 224]
            wins = torch.stack([cc[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i
                                   + MFCC_PER_FRAME * SYNC_FRAMES]
                                for i in range(s, e)])                          # [n, 13, 20]
            a.append(syncnet.embed_audio(wins[:, None]))                        # [n, 1, 13, 20]
    out = lse_from_embeddings(torch.cat(v), torch.cat(a), vshift)
    out["n_windows"] = n_win
    return out


def lse(frames, audio, syncnet, sample_rate=SYNC_SR, vshift=SYNC_VSHIFT):
    """(LSE-D, LSE-C) of one video; see sync_scores. Lower LSE-D and higher LSE-C are better.
    Table 1 reports LSE-C only; a dataset score is the plain mean over videos (Wav2Lip's
    scripts)."""
    s = sync_scores(frames, audio, syncnet, sample_rate, vshift)
    return s["lse_d"], s["lse_c"]


# ==== LMD (Sec. 4.2.1, ref [11]): mouth landmark distance =========================================
MOUTH = slice(48, 68)  # dlib / iBUG 68-point indices 48..67: outer lip 48-59, inner lip 60-67
LMD_SIZE = 224         # landmark coordinates are expressed in pixels of a 224x224 frame


def lmd_from_landmarks(lm_gen, lm_gt):
    """Per-frame mouth landmark distance: [T, 20 or 68, 2] x2 -> [T] (NaN where a frame lacks
    landmarks on either side, marked by NaN coordinates).

    Convention (RAD-NeRF's LMDMeter; the paper states none): subtract each frame's own mouth
    centroid from each set (removes head translation), Euclidean distance per point, *mean* over
    the 20 points. ATVGnet sums over the points instead, i.e. 20x our value. No face-size
    normalisation; units are pixels of whatever frame the landmarks come from (lmd uses 224)."""
    lm_gen, lm_gt = torch.as_tensor(lm_gen, dtype=torch.float64), torch.as_tensor(
        lm_gt, dtype=torch.float64)
    if lm_gen.shape != lm_gt.shape or lm_gen.ndim != 3 or lm_gen.shape[1:] not in ((20, 2),
                                                                                    (68, 2)):
        raise ValueError(f"landmarks must be equal [T, 20 or 68, 2], got {tuple(lm_gen.shape)} and "
                         f"{tuple(lm_gt.shape)}")
    mouth = MOUTH if lm_gen.shape[1] == 68 else slice(None)
    return lmd_points(lm_gen[:, mouth], lm_gt[:, mouth])


def lmd_points(lm_gen, lm_gt):
    """lmd_from_landmarks for any number of points P: [T, P, 2] x2 -> [T] (same convention: each
    set centred on its own centroid, per-point Euclidean distance, mean over the P points). The
    procedural renderer has 4 mouth points (corners, inner upper and lower lip), not dlib's 20."""
    lm_gen, lm_gt = torch.as_tensor(lm_gen, dtype=torch.float64), torch.as_tensor(
        lm_gt, dtype=torch.float64)
    if lm_gen.shape != lm_gt.shape or lm_gen.ndim != 3 or lm_gen.shape[-1] != 2:
        raise ValueError(f"landmarks must be equal [T, P, 2], got {tuple(lm_gen.shape)} and "
                         f"{tuple(lm_gt.shape)}")
    c_gen = lm_gen - lm_gen.mean(1, keepdim=True)  # [T, P, 2], each set centred on its own centroid
    c_gt = lm_gt - lm_gt.mean(1, keepdim=True)
    return (c_gen - c_gt).norm(dim=-1).mean(-1)   # [T]; NaN propagates from missing frames


class DlibLandmarker:
    """dlib HOG frontal face detector (1 upsampling, on the grey image, as ATVGnet) + the 68-point
    shape predictor. Called on a grey uint8 [H, W] array, returns [68, 2] (x, y) or None when no
    face is found; with several faces, the largest box is used."""

    def __init__(self, predictor_path=None):
        try:
            import dlib  # optional: only LMD needs it
        except ImportError as e:
            raise ImportError("LMD needs dlib: pip install dlib-bin face_recognition_models") from e
        if predictor_path is None:
            # face_recognition_models ships the 68-point predictor; locate it without importing
            # the package (its __init__ needs pkg_resources, gone from recent setuptools).
            spec = importlib.util.find_spec("face_recognition_models")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("LMD needs the 68-point predictor: pip install "
                                  "face_recognition_models (or pass "
                                  "predictor_path=shape_predictor_68_face_landmarks.dat)")
            predictor_path = os.path.join(spec.submodule_search_locations[0], "models",
                                          "shape_predictor_68_face_landmarks.dat")
        if not os.path.isfile(predictor_path):
            raise FileNotFoundError(f"dlib shape predictor not found: {predictor_path}")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(predictor_path)

    def __call__(self, gray):
        boxes = self.detector(gray, 1)
        if len(boxes) == 0:
            return None
        box = max(boxes, key=lambda r: r.width() * r.height())
        shape = self.predictor(gray, box)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


_LANDMARKER = None  # built on first use: loading the predictor takes ~1 s and 100 MB


def mouth_landmarks(frames, landmarker=None):
    """[T, 3, H, W] RGB (uint8 or float 0..255) -> [T, 20, 2] mouth points in pixels of the input
    frame, NaN rows where no face was detected. landmarker: callable(grey uint8 [H, W]) ->
    [68, 2] or None; default DlibLandmarker()."""
    global _LANDMARKER
    if landmarker is None:
        if _LANDMARKER is None:
            _LANDMARKER = DlibLandmarker()
        landmarker = _LANDMARKER
    _check_frames(frames)
    w = torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)
    gray = (frames.detach().cpu().to(torch.float64) * w).sum(1).round().clamp(0, 255).to(
        torch.uint8)
    out = np.full((frames.shape[0], 20, 2), np.nan)
    for t, g in enumerate(gray.numpy()):
        pts = landmarker(np.ascontiguousarray(g))
        if pts is not None:
            out[t] = np.asarray(pts, dtype=np.float64)[MOUTH]
    return torch.from_numpy(out)


def lmd(frames_gen, frames_gt, landmarker=None):
    """LMD of one video pair: [T, 3, H, W] x2 (RGB, 0..255) -> dict.

    Landmarks are detected on each frame at its own resolution, then scaled to LMD_SIZE x LMD_SIZE
    pixels (224: the PC-AVS / VoxCeleb2 crop size) so numbers do not depend on the render size.
    lmd = mean of lmd_from_landmarks over the frames where *both* sides have a face; frames without
    one are not silently dropped but counted: n_missing_gen / n_missing_gt / n_used of n_frames
    (lmd is NaN when n_used is 0)."""
    if (not torch.is_tensor(frames_gen) or not torch.is_tensor(frames_gt)
            or frames_gen.shape != frames_gt.shape):
        raise ValueError("frames_gen and frames_gt must be tensors of the same [T, 3, H, W] shape")
    H, W = frames_gen.shape[-2:]
    scale = torch.tensor([LMD_SIZE / W, LMD_SIZE / H], dtype=torch.float64)  # (x, y)
    lm_gen = mouth_landmarks(frames_gen, landmarker) * scale
    lm_gt = mouth_landmarks(frames_gt, landmarker) * scale
    per_frame = lmd_from_landmarks(lm_gen, lm_gt)  # [T]
    ok = ~per_frame.isnan()
    return dict(lmd=float(per_frame[ok].mean()) if ok.any() else math.nan,
                n_frames=int(per_frame.numel()), n_used=int(ok.sum()),
                n_missing_gen=int(lm_gen[:, 0, 0].isnan().sum()),
                n_missing_gt=int(lm_gt[:, 0, 0].isnan().sum()),
                per_frame=per_frame)
