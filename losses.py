"""losses.py: every training objective of FC-TFG (Sec. 3.3, Eq. 3-9) and the VGG19 they need.

Paper map ("That's What I Said: Fully-Controllable Talking Face Generation", ACM MM 2023):
  Eq. (3) L_ortho = (1/N) Σ z_s->c ⊙ z_c->d         -> orthogonality_loss (modes: see its docstring)
  Eq. (4) L_sync  = 1 - cos(f_v(x_g), f_a(x_a))     -> sync_loss      (SyncNet from audio.py)
  Eq. (5) L_id    = 1 - cos(E_id(x_g), E_id(x_d))   -> identity_loss  (ArcFace from inversion.py)
  Eq. (6) L_rec   = ||x_g - x_d||_1                 -> reconstruction_loss
  Eq. (7) L_LPIPS = (1/N_f) Σ_i ||φ_i(x_g) - φ_i(x_d)||  -> perceptual_loss on VGG19Features
                                                            (φ = VGG19)
  Eq. (8) non-saturating GAN, both sides            -> gan_loss_g, gan_loss_d, gan_loss_d_backward,
                                                       lazy_r1
  Eq. (9) L_total = Σ λ_k L_k, λ = 1, .1, .5, 1, 1, .1 -> LAMBDA, total_loss

The networks (SyncNet, ArcFace, D, VGG) are ARGUMENTS of the losses, so each loss can be tested with
a small stand-in and train.py decides what is frozen. Images are [N, 3, H, W] or [B, T, 3, H, W],
RGB in [-1, 1]; every loss returns a scalar (the mean over everything the paper leaves unspecified;
each function says which mean).

Not here: the networks themselves (audio.py, inversion.py, stylegan2.py, fusion.py); the D step's
lazy-regularisation schedule and the optimiser (stages.py).
"""
import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from files import load_checkpoint, load_strict  # the project's one reader and strict loader
from stylegan2 import r1_penalty  # R1 of Eq. 8

# φ of Eq. (7) per preset: VGG19 itself (paper: torchvision's weights) or the same layout at a
# quarter width, trained by train.py's judges stage (tiny).
PRESETS = {"paper": dict(vgg=dict(base=64)), "tiny": dict(vgg=dict(base=16))}

# Eq. (9), Sec. 3.3.7: "λ1..λ6 are set to 1, 0.1, 0.5, 1, 1 and 0.1".
LAMBDA = dict(ortho=1.0, sync=0.1, id=0.5, rec=1.0, lpips=1.0, gan=0.1)

ORTHO_MODES = ("hadamard_abs", "signed", "squared", "cosine", None)  # None = Table 4's "×" row


# ==== Eq. (3): orthogonality between the canonical code and the motion code =======================

def orthogonality_loss(z_sc, z_cd, mode="hadamard_abs", layers=None):
    """Eq. (3), Sec. 3.3.1. z_sc, z_cd [..., L, C] (e.g. [B, T, L, C]) -> scalar.

    The printed L = (1/N) Σ_c z_sc[c] z_cd[c] (N = C channels), taken literally ("signed"), is
    unbounded below: Eq. (1) fixes only the sum z_sd = z_sc + z_cd, so z_sc = 1 + s, z_cd = -s
    renders the same image at a loss of -(s + s^2)/N -> -inf, rewarding huge cancelling codes
    instead of the "channel-wise orthogonality" of Sec. 3.2 (identity and motion in different
    channels). Modes:
      "hadamard_abs" (default): (1/N) Σ_c |z_sc[c] z_cd[c]|. Zero iff no channel is used by both
                      codes; L1-type, so it pushes products to exactly 0 (a sparse channel split).
      "signed":       the literal formula, kept for Table 4 comparisons. Can go negative.
      "squared":      (1/N) Σ_c (z_sc[c] z_cd[c])^2, a smooth variant.
      "cosine":       |cos(z_sc, z_cd)| over the C channels: Table 4's "cosine loss".
                      Scale-invariant, and so blind to whether channels are shared.
      None:           no constraint (Table 4's "×" row); returns 0.
    Reduction (the paper is silent): mean over every leading axis (batch, frames) and over the w
    indices in `layers` (None = all L). Pass fusion's `layers`: untouched layers have z_cd = 0 and
    only dilute it. Raw codes, as printed: W codes are not centred (in our tiny encoder the mean
    code exceeds its spread), so with an E_can near the identity map the loss is mostly an L1 pull
    of z_cd towards 0; the paper's plain-MLP E_can (fusion.py) is free to leave channels at 0
    instead (RESULTS.md, Table 4).
    """
    if mode not in ORTHO_MODES:
        raise ValueError(f"orthogonality_loss: mode must be one of {ORTHO_MODES}, got {mode!r}")
    if z_sc.shape != z_cd.shape or z_sc.ndim < 2:
        raise ValueError(f"orthogonality_loss: z_sc and z_cd must have the same [..., L, C] shape, "
                         f"got {tuple(z_sc.shape)} and {tuple(z_cd.shape)}")
    if layers is not None:
        idx = torch.as_tensor(list(layers), device=z_sc.device, dtype=torch.long)
        z_sc, z_cd = z_sc.index_select(-2, idx), z_cd.index_select(-2, idx)
    N = z_sc.shape[-1]
    if mode is None:
        return z_sc.new_zeros(())
    if mode == "cosine":
        return F.cosine_similarity(z_sc, z_cd, dim=-1, eps=1e-8).abs().mean()
    prod = z_sc * z_cd                                           # [..., L, C], the Hadamard product
    if mode == "hadamard_abs":
        prod = prod.abs()
    elif mode == "squared":
        prod = prod.pow(2)
    return (prod.sum(-1) / N).mean()                             # Σ over C, / N, mean over the rest


# ==== Eq. (4): lip-sync loss with the expert SyncNet (audio.SyncNet) ==============================

def sync_loss(syncnet, x_g, mel, size=None, bgr=False):
    """Eq. (4), Sec. 3.3.2: L_sync = 1 - cos(f_v(x_g), f_a(x_a)).

    syncnet : audio.SyncNet (or anything with .n_frames and .cosine(mel, face) -> [B]); keep it
              frozen and in eval mode (the generator should move its lips, not the judge its
              opinion).
    x_g     : generated frames [B, T, 3, H, W] in [-1, 1], T a multiple of syncnet.n_frames (5).
    mel     : [B, 1, 80, 16], the audio window of the first frame when T == 5; or per-frame windows
              [B, T, 1, 80, 16] (audio.mel_windows): the clip is cut into non-overlapping chunks of
              5 frames and chunk k is paired with the window of its first frame, mel[:, 5k].
    size, bgr : passed to audio.expert_window (resize to the expert's face size, RGB -> BGR for the
              published Wav2Lip expert, which saw OpenCV images). The expert looks at the
              lower half.
    Returns 1 - cos averaged over the batch and the chunks.
    """
    # local import: audio.py pulls in soundfile/scipy, not needed elsewhere
    from audio import expert_window

    chunks, mels = _expert_windows(syncnet, x_g, mel)   # 5-frame chunks with their audio windows
    # Eq. (4): L_sync = 1 - cos(f_v(x_g), f_a(x_a)), on the lower half of each chunk's faces
    face = expert_window(chunks, size=size, bgr=bgr)                   # [B*K, 15, H/2, W]
    return (1 - syncnet.cosine(mels, face)).mean()


def _expert_windows(syncnet, x_g, mel):
    """sync_loss's inputs checked and cut into the expert's windows: x_g [B, T, 3, H, W] and mel
    [B, 1, 80, 16] (T == 5) or [B, T, 1, 80, 16] -> (chunks [B*K, 5, 3, H, W], mels
    [B*K, 1, 80, 16]), K = T / 5, chunk k with the audio window of its first frame."""
    if x_g.ndim != 5 or x_g.shape[2] != 3:
        raise ValueError(f"sync_loss: x_g must be [B, T, 3, H, W], got {tuple(x_g.shape)}")
    B, T = x_g.shape[:2]
    n = syncnet.n_frames
    if T % n:
        raise ValueError(f"sync_loss: T={T} frames is not a multiple of the expert's {n}-frame "
                         f"window")
    if mel.ndim == 4:
        if T != n:
            raise ValueError(f"sync_loss: one mel window [B, 1, 80, 16] needs T == {n}, got T={T}; "
                             "pass per-frame windows [B, T, 1, 80, 16] instead")
        mel = mel.unsqueeze(1)                                         # [B, 1, 1, 80, 16]
    elif mel.ndim != 5 or mel.shape[1] != T:
        raise ValueError(f"sync_loss: mel must be [B, 1, 80, 16] or [B, T={T}, 1, 80, 16], got "
                         f"{tuple(mel.shape)}")
    if mel.shape[0] != B:
        raise ValueError(f"sync_loss: batch mismatch, x_g has {B}, mel has {mel.shape[0]}")
    K = T // n
    chunks = x_g.reshape(B * K, n, *x_g.shape[2:])                     # [B*K, 5, 3, H, W]
    mels = mel[:, ::n].reshape(B * K, *mel.shape[2:])                  # [B*K, 1, 80, 16]
    return chunks, mels


def _frames(who, x_g, x_d):
    """Check two equal [N, 3, H, W] or [B, T, 3, H, W] batches; -> both as [N, 3, H, W]."""
    if x_g.shape != x_d.shape or x_g.ndim not in (4, 5):
        raise ValueError(f"{who}: x_g and x_d must have the same [N,3,H,W] or [B,T,3,H,W] shape, "
                         f"got {tuple(x_g.shape)} and {tuple(x_d.shape)}")
    return (x_g.flatten(0, 1), x_d.flatten(0, 1)) if x_g.ndim == 5 else (x_g, x_d)


# ==== Eq. (5): identity loss with a face-recognition network (inversion.IdentityEncoder = ArcFace
# IR-SE50) ====

def identity_loss(E_id, x_g, x_d):
    """Eq. (5), Sec. 3.3.3: L_id = 1 - cos(E_id(x_g), E_id(x_d)), mean over all frames.

    E_id : images [N, 3, H, W] -> embeddings [N, D] (ArcFace returns unit vectors; we still use a
           full cosine so un-normalised stand-ins work too). Keep it frozen and in eval mode.
    x_g, x_d : [N, 3, H, W] or [B, T, 3, H, W], same shape. The target embedding is computed without
           gradient (as pSp/HyperStyle do): x_d is data, only x_g should move.
    """
    x_g, x_d = _frames("identity_loss", x_g, x_d)
    with torch.no_grad():
        f_d = E_id(x_d)
    f_g = E_id(x_g)
    return (1 - F.cosine_similarity(f_g, f_d, dim=1, eps=1e-8)).mean()


# ==== Eq. (6): pixel L1 ===========================================================================

def reconstruction_loss(x_g, x_d, weight=None):
    """Eq. (6), Sec. 3.3.4: L_rec = ||x_g - x_d||_1, reduced as the MEAN absolute difference over
    every pixel, channel and frame (a sum would make λ4 depend on the resolution). weight
    (tiny-scale deviation, train.py --feature_weight): a per-pixel factor broadcast against x_g
    ([..., 1, H, W]), 1 + w on the eyes, brows and mouth of procedural frames, so those few pixels
    are not averaged away."""
    if x_g.shape != x_d.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, {tuple(x_g.shape)} vs "
                         f"{tuple(x_d.shape)}")
    err = (x_g - x_d).abs()
    return err.mean() if weight is None else (err * weight).mean()


def latent_reconstruction_loss(z_sd, z_d, layers):
    """NOT in the paper (a tiny-scale aid, train.py --latent_weight; 0 in the paper preset): in
    self-reenactment the driving frame's own code z_d = E_inv(x_d) is a target for z_s->d too, so
    mean |z_s->d - z_d| over the manipulated w indices `layers`. It hands E_m the motion signal
    directly, not through a decoder too blurry to show a few degrees of head turn, and does not
    teach E_m to copy the driver's identity: source and driver are one person, so with z = identity
    + motion the best E_m(z_d) is the driver's motion relative to the average pose. z_sd, z_d: [B,
    T, L, C]."""
    if z_sd.shape != z_d.shape or z_sd.ndim != 4:
        raise ValueError(f"latent_reconstruction_loss: want two equal [B, T, L, C] shapes, got "
                         f"{tuple(z_sd.shape)} and {tuple(z_d.shape)}")
    idx = torch.as_tensor(list(layers), device=z_sd.device)
    return (z_sd.index_select(2, idx) - z_d.index_select(2, idx)).abs().mean()


# ==== Eq. (7): perceptual loss on VGG19 ===========================================================
# torchvision's vgg19 (cfg "E"): 16 convs 3x3 pad 1, each followed by ReLU, max-pool after each
# block. Module indices inside torchvision's `features`: convs at 0,2 | 5,7 | 10,12,14,16 |
# 19,21,23,25 | 28,30,32,34; ReLU at conv+1; pools at 4, 9, 18, 27, 36. We build the same
# Sequential, so a torchvision state dict (`features.{i}.weight/bias`) loads with no renaming. No
# tap needs the last pool (36).
# x base channels (64)
VGG19_CFG = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8)

# Taps = indices of ReLU outputs inside `features`.
PERCEPTUAL_MODES = {
    # LPIPS-style (Zhang et al. 2018), uncalibrated: relu1_2, relu2_2, relu3_4, relu4_4, relu5_4;
    # ImageNet input.
    "lpips": dict(taps=(3, 8, 17, 26, 35), weights=(1.0, 1.0, 1.0, 1.0, 1.0)),
    # NVIDIA pix2pixHD's VGGLoss: relu1_1 .. relu5_1, L1 on raw features, weights 1/32 .. 1;
    # input as is.
    "pix2pixhd": dict(taps=(1, 6, 11, 20, 29), weights=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19Features(nn.Module):
    """φ of Eq. (7): the convolutional part of VGG19, returning the activations at `taps`.

    x [N, 3, H, W] (already normalised as the weights expect) -> list of [N, C_i, H_i, W_i].
    Frozen: the perceptual network is a fixed judge, gradients only flow THROUGH it."""

    def __init__(self,
                 base=64,                 # channels of block 1 (VGG19: 64, then 128, 256, 512, 512)
                 taps=(3, 8, 17, 26, 35)):      # `features` indices whose outputs are returned
        super().__init__()
        layers, c_in = [], 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                conv = nn.Conv2d(c_in, v * base, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU()]
                c_in = v * base
        self.features = nn.Sequential(*layers)                          # 36 modules, indices 0..35
        self.set_taps(taps)
        self.requires_grad_(False)

    def set_taps(self, taps):
        taps = tuple(sorted(int(t) for t in taps))
        if not taps or taps[0] < 0 or taps[-1] >= len(self.features):
            raise ValueError(f"VGG19Features: taps must be indices in [0, {len(self.features)}), "
                             f"got {taps}")
        self.taps = taps

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19Features: want [N, 3, H, W], got {tuple(x.shape)}")
        feats = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


def load_vgg19(path_or_sd, taps=(3, 8, 17, 26, 35)):
    """A torchvision-layout VGG19 state dict (file path or dict, e.g. torchvision's
    vgg19-dcbb9e9d.pth)
    -> frozen VGG19Features. Loads every `features.{i}.weight/bias` strictly; the classifier
    (`classifier.*`) is the one expected extra and is ignored. torch.load with weights_only=True
    (tensors only). The width is read from the first conv (64 for VGG19 itself); a checkpoint of
    train.py's judges stage holds the tiny φ under 'vgg' in the same layout."""
    sd = (load_checkpoint(path_or_sd, "VGG19 checkpoint")
          if isinstance(path_or_sd, (str, os.PathLike)) else path_or_sd)
    if isinstance(sd, dict) and sd.get("stage") == "judges":
        sd = sd["vgg"]
    if not isinstance(sd, dict):
        raise ValueError(f"load_vgg19: expected a state dict, got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    other = sorted(k for k in sd if not k.startswith("features.")
                   and not k.startswith("classifier."))
    if other:
        raise ValueError(f"load_vgg19: not a torchvision VGG19 state dict; unexpected keys "
                         f"{other[:5]}")
    # classifier.*: the one ignored part
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    first = feats.get("features.0.weight")
    # else: load_strict says
    base = int(first.shape[0]) if torch.is_tensor(first) and first.ndim == 4 else 64
    return load_strict(VGG19Features(base=base, taps=taps), feats,
                       "load_vgg19 (torchvision VGG19, cfg E)")


def imagenet_normalise(x):
    """[-1, 1] images -> [0, 1] -> (x - mean) / std with ImageNet's statistics: what VGG19's weights
    expect (and what the tiny φ is trained on, so both read images the same way)."""
    mean, std = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1,
                                                 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def perceptual_loss(vgg, x_g, x_d, mode="lpips"):
    """Eq. (7), Sec. 3.3.5: L = (1/N_f) Σ_i d(φ_i(x_g), φ_i(x_d)) over the N_f = 5 taps of `mode`.

    The paper calls this LPIPS with a pre-trained VGG19, but LPIPS's calibrated linear weights exist
    only for AlexNet, VGG16 and SqueezeNet, so what is computed is exactly:
      mode "lpips" (default; LPIPS-style): x in [-1,1] -> [0,1] -> ImageNet mean/std; taps relu1_2,
          relu2_2, relu3_4, relu4_4, relu5_4; each feature vector (over channels, per pixel) is
          divided by its L2 norm (+1e-10); d_i = Σ_c (f̂_g - f̂_d)^2, averaged over pixels; then the
          mean over the 5 taps (1/N_f of Eq. 7; LPIPS itself sums, i.e. 5x this) and over the batch.
          All channel weights are 1 (uncalibrated LPIPS). Identical images give exactly 0.
      mode "pix2pixhd" (pix2pixHD's VGGLoss): raw [-1,1] input, taps relu1_1 .. relu5_1,
          d_i = mean |φ_i(x_g) - φ_i(x_d)|, Σ_i w_i d_i with w = 1/32, 1/16, 1/8, 1/4, 1.
    The `vgg` taps are set to the mode's taps here. Shapes: [N, 3, H, W] or [B, T, 3, H, W]."""
    if mode not in PERCEPTUAL_MODES:
        raise ValueError(f"perceptual_loss: mode must be one of {sorted(PERCEPTUAL_MODES)}, got "
                         f"{mode!r}")
    x_g, x_d = _frames("perceptual_loss", x_g, x_d)
    cfg = PERCEPTUAL_MODES[mode]
    vgg.set_taps(cfg["taps"])
    x = torch.cat([x_g, x_d], 0)                                        # one pass for both
    if mode == "lpips":
        x = imagenet_normalise(x)
    total = 0.0
    for f, w in zip(vgg(x), cfg["weights"]):
        if mode == "lpips":                                            # unit vector per pixel first
            f_g, f_d = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2, 0)
            d = (f_g - f_d).pow(2).sum(1).mean()                        # Σ_c, mean over N, H_i, W_i
        else:
            f_g, f_d = f.chunk(2, 0)                                    # [N, C_i, H_i, W_i] each
            d = (f_g - f_d).abs().mean()
        total = total + w * d
    if mode == "lpips":
        total = total / len(cfg["taps"])                                # 1/N_f of Eq. (7)
    return total


# ==== Eq. (8): non-saturating adversarial loss ====================================================
# With D(x) = sigmoid(logit): log D = -softplus(-logit), log(1 - D) = -softplus(logit). softplus is
# the numerically safe form of both logs.

def gan_loss_d(real_logits, fake_logits):
    """D side of Eq. (8): maximise log D(x_d) + log(1 - D(G(z))), i.e. minimise
    softplus(-D(x_d)) + softplus(D(x_g)), each averaged over its logits. Pass x_g detached."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def stddev_groups(D, n):
    """D's minibatch-stddev groups in a batch of n -> (list of index slices, group size). The groups
    are strided (stylegan2.minibatch_stddev: group j = samples j, j + n/size, ...), so D on one
    group's samples gives exactly the logits those samples get in the whole batch: the D-side terms
    below can run their forward and backward group by group, holding one group's graph at a time
    (memory; the sums are the same, BENCHMARKS.md "Paper-preset memory")."""
    size = min(n, D.stddev_group)
    return [slice(j, None, n // size) for j in range(n // size)], size


def gan_loss_d_backward(D, real, fake, scale=1.0, autocast=contextlib.nullcontext):
    """The D step of Eq. (8) with its backward run HERE, one stddev group at a time: the batch's
    gan_loss_d(D(real), D(fake)) is the sum of the groups' size/n shares. fake: detached
    generations. D: a module with .stddev_group (image or video D). -> the loss (detached, for the
    log)."""
    n = real.shape[0]
    groups, size = stddev_groups(D, n)
    total = real.new_zeros(())
    for g in groups:
        with autocast():
            part = gan_loss_d(D(real[g]), D(fake[g])) * (size / n)
        (scale * part).backward()
        total = total + part.detach()
    return total


def lazy_r1(D, real, gamma, every, scale=1.0, per_sample=1):
    """The D step's R1 regulariser of Eq. (8), lazily every `every` D steps (StyleGAN2 Sec. 3.2),
    with its backward of scale * gamma / 2 * every * R1 run HERE, one stddev group at a time (R1 is
    a per-sample mean: the sum of the groups' size/n shares; in one piece, the paper preset's R1
    over a window's 5 frames needs GiBs more than a plain step, BENCHMARKS.md). -> R1 (detached, for
    the log). The interval multiplies the weight so the average pull is that of R1 on every step;
    the zero-weighted logits keep D's whole graph in each backward (every parameter gets a
    gradient).
    per_sample: images of `real` per training sample. R1 is a mean over samples of the squared
    gradient norm w.r.t. the whole sample, so for the FC-TFG stage's image D (a window of T frames
    passed as T images) the T frames' norms add up: T x StyleGAN2's per-image R1 (per_sample=T)."""
    n = real.shape[0]
    groups, size = stddev_groups(D, n)
    r1_total = real.new_zeros(())
    for g in groups:
        part = real[g].detach().requires_grad_(True)
        logits = D(part)                            # in full precision: R1 squares gradients
        r1 = r1_penalty(logits, part) * (size / n * per_sample)
        (scale * (gamma / 2 * every * r1 + 0 * logits.sum())).backward()
        r1_total = r1_total + r1.detach()
    return r1_total


def gan_loss_g(fake_logits):
    """G side of Eq. (8), non-saturating form (Goodfellow et al. 2014): instead of minimising
    log(1 - D(G(z))), whose gradient vanishes when D confidently rejects the fakes, maximise
    log D(G(z)), i.e. minimise softplus(-D(x_g)), mean over logits."""
    return F.softplus(-fake_logits).mean()


# ==== Eq. (9): weighted total =====================================================================

def total_loss(terms, weights=None):
    """Eq. (9): L_total = Σ_k λ_k L_k.  terms: {name: scalar tensor} with names from LAMBDA (ortho,
    sync, id, rec, lpips, gan); leave a term out (or None) to switch it off. weights: λ overrides
    (default LAMBDA). -> (total scalar tensor, {name: float value of the UNweighted term, ...,
    "total": float})."""
    lam = {**LAMBDA, **(weights or {})}
    for kind, names in (("weight", weights or {}), ("loss", terms)):
        unknown = sorted(set(names) - set(LAMBDA))
        if unknown:
            raise ValueError(f"total_loss: unknown {kind} names {unknown}; known: {sorted(LAMBDA)}")
    total, logs = None, {}
    for name, value in terms.items():
        if value is None:
            continue
        if not torch.is_tensor(value) or value.ndim != 0:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"total_loss: term {name!r} must be a scalar tensor, got {got}")
        total = lam[name] * value if total is None else total + lam[name] * value
        logs[name] = float(value.detach())
    if total is None:
        raise ValueError("total_loss: no loss terms given")
    logs["total"] = float(total.detach())
    return total, logs
