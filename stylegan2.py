"""stylegan2.py: the StyleGAN2 decoder G and image discriminator D of FC-TFG.

Paper map (FC-TFG, Jang et al., ACM MM 2023):
  Fig. 3 "decoder"        -> Generator.synthesis: renders the fused codes z_s->d (Eq. 1) as images
  Sec. 3.3.6, Eq. (8)     -> Discriminator: "the same as StyleGAN2 discriminator"
  Sec. 4.1.2              -> "We first train StyleGAN2 generator on VoxCeleb2": 256 px, 14 w codes
  Sec. 3 / HyperStyle     -> `weight_deltas`: per-sample W' = W * (1 + delta) on the styled convs

StyleGAN2 paper map (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"):
  Sec. 2   mapping network z -> w (8 layers, lr_mul 0.01)        -> Generator.style, .mapping
  Sec. 2.2 weight modulation / demodulation (Eq. 1-3)           -> ModulatedConv2d
  Sec. 4   skip generator (ToRGB at every scale), residual D     -> Generator, Discriminator
  App. B   noise inputs, constant input, style mixing, truncation -> NoiseInjection, ConstantInput, ...
  Sec. 3 / App. C  minibatch stddev, R1, path length        -> minibatch_stddev, r1_penalty, path_length_penalty

The key layout and parameter counts follow rosinality/stylegan2-pytorch so that its checkpoints (and
pSp/HyperStyle checkpoints built on it) load: G 30,034,338 and D 28,864,129 parameters at 256 px with
channel_multiplier 2. Every line here was written from the maths (StyleGAN2 paper and appendix).

Two low-level ops carry all the resampling and activations, upfirdn2d and bias_act (stylegan2_ops.py:
a pure-PyTorch reference path beside a fused CUDA kernel); activation checkpointing is there too.

Not here: training loops and EMA (train.py), the GAN/identity losses of Eq. 4-9 (losses.py),
inversion encoders (inversion.py).
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import stylegan2_ops as ops  # upfirdn2d, bias_act (reference + CUDA), activation checkpointing

# ----------------------------------------------------------------------------------------------------
# Presets: plain dicts of Generator kwargs. The Discriminator uses size/channel_multiplier/channels.
# `paper`: the FC-TFG decoder (Sec. 4.1.2): 256 px, 14 w vectors of 512, config-F widths.
# `tiny`:  our CPU preset: 64 px, 10 w vectors of 128, narrow channels (trains on 2 cores in minutes).
PRESETS = {
    "paper": dict(size=256, style_dim=512, n_mlp=8, channel_multiplier=2, channels=None),
    "tiny": dict(size=64, style_dim=128, n_mlp=2, channel_multiplier=2,
                 channels={4: 128, 8: 128, 16: 128, 32: 64, 64: 32}),
}


def default_channels(size, channel_multiplier=2):
    """Feature maps per resolution: min(512, 32768/res) for cm=2 (StyleGAN2 config-F; rosinality's table)."""
    cm = channel_multiplier
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm,
             512: 32 * cm, 1024: 16 * cm}
    return {r: c for r, c in table.items() if r <= size}


# ==== Equalized learning rate (StyleGAN2 App. B / ProGAN Sec. 4.1) ================================
# Weights are stored as N(0, 1) and scaled by 1/sqrt(fan_in) at run time, so Adam's per-parameter step
# size is the same for every layer regardless of its fan-in. lr_mul additionally slows a layer down
# (the mapping network uses 0.01): storing w/lr_mul and multiplying by lr_mul at run time divides its
# effective learning rate by 100 without touching the optimiser.

class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_dim), lr_mul, activation

    def forward(self, x):  # [B, in] -> [B, out]
        b = self.bias * self.lr_mul
        if self.activation:  # 'lrelu' (rosinality calls it fused_lrelu)
            return ops.bias_act(F.linear(x, self.weight * self.scale), b)
        return F.linear(x, self.weight * self.scale, b)


class EqualConv2d(nn.Module):
    """Without bias: in D the bias lives in the BiasLeakyReLU that follows (or, in the skip, nowhere)."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, None, self.stride, self.padding)


class BiasLeakyReLU(nn.Module):
    """Learned per-channel bias + lrelu(0.2)*sqrt(2) (rosinality's FusedLeakyReLU; key `bias`)."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return ops.bias_act(x, self.bias)


class Blur(nn.Module):
    """[1,3,3,1] low-pass filter (upfirdn2d, up=down=1), pad (p0, p1) on both axes. gain 4 after a x2 upsample."""

    def __init__(self, pad, gain=1.0):
        super().__init__()
        self.register_buffer("kernel", ops.make_kernel(gain=gain))
        self.pad = pad

    def forward(self, x):
        return ops.upfirdn2d(x, self.kernel, pad=(self.pad[0], self.pad[1], self.pad[0], self.pad[1]))


class Upsample(nn.Module):
    """x2 upsampling of the RGB skip path: zero insertion + blur with gain 4 (= 2^2); pads (2, 1) give
    2H + 3 - 4 + 1 = 2H outputs for the 4 taps, centred as in rosinality's Upsample."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", ops.make_kernel(gain=4))

    def forward(self, x):
        return ops.upfirdn2d(x, self.kernel, up=2, pad=(2, 1, 2, 1))


# ==== Mapping network (StyleGAN2 Sec. 2): z -> w ==================================================

class PixelNorm(nn.Module):
    """Normalise each z to unit RMS: the mapping network then sees points on a sphere."""

    def forward(self, z):
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


# ==== Synthesis network building blocks ===========================================================

class ModulatedConv2d(nn.Module):
    """StyleGAN2 Sec. 2.2, Eq. (1)-(3): the style scales the conv weights, not the activations.

      s = A(w)                                  affine A ("modulation"), bias initialised to 1
      W'[b,o,i,:,:] = W[o,i,:,:] * s[b,i]       Eq. (1) modulation (per sample b)
      d[b,o] = 1/sqrt(sum_{i,k} W'^2 + eps)     Eq. (3) demodulation: unit output variance for
      W''= W' * d[b,o]                                   unit-variance input (not in ToRGB)
    Per-sample weights are realised as ONE grouped convolution: the batch is folded into the channel
    axis ([1, B*I, H, W]) and each sample is its own group.

    HyperStyle (inversion.py) edits the *generator weights* per image: W -> W * (1 + delta), delta of
    shape [B or 1, O, I, k, k]; it enters before modulation, so demodulation still normalises it."""

    def __init__(self,
                 in_channel,            # I: input feature maps
                 out_channel,           # O: output feature maps
                 kernel_size,           # k: 3 for styled convs, 1 for ToRGB
                 style_dim,             # C: width of the w vector that drives this layer
                 demodulate=True,       # False only in ToRGB (colours should keep the style's scale)
                 upsample=False):       # x2: transposed conv (stride 2) + blur
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)  # equalized lr
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)  # s starts near 1
        if upsample:
            # conv_transpose2d(stride 2) maps H -> 2H+k-2 = 2H+1; the blur trims it back to 2H with
            # rosinality's pad rule p = (K - 2) - (k - 1), pads ((p+1)//2 + 1, p//2 + 1) for K blur taps.
            p = (len(ops.BLUR_KERNEL) - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), gain=4)

    def extra_repr(self):
        return (f"{self.in_channel}->{self.out_channel}, k={self.kernel_size}, "
                f"demodulate={self.demodulate}, upsample={self.upsample}")

    def styled_weight(self, style, delta=None):
        """Per-sample weights W'' [B, O, I, k, k] for styles [B, C] (Eq. 1 and 3). delta [D, O, I, k, k]
        with D = 1, B, or a divisor of B: one delta per group of B / D consecutive samples (FC-TFG: one
        source's deltas for all T frames of its window), broadcast, never copied per sample."""
        B = style.shape[0]
        s = self.modulation(style)                                   # [B, I]
        w = self.weight if delta is None else self.weight * (1 + delta)   # HyperStyle: W * (1 + delta)
        D = w.shape[0]
        if B % D:
            raise ValueError(f"weight delta batch {D} does not divide the input batch {B}")
        w = (self.scale * w[:, None] * s.view(D, B // D, 1, -1, 1, 1)).flatten(0, 1)   # [B, O, I, k, k]
        if self.demodulate:
            d = torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8)          # [B, O]
            w = w * d.view(B, self.out_channel, 1, 1, 1)
        return w

    def forward(self, x, style, delta=None):
        """x [B, I, H, W], style [B, C] -> [B, O, H', W'] with H' = 2H if upsample else H."""
        B, I, H, W = x.shape
        assert I == self.in_channel, (x.shape, self.in_channel)
        k, O = self.kernel_size, self.out_channel
        w = self.styled_weight(style, delta)
        if w.shape[0] != B:  # styles for another batch than x
            raise ValueError(f"style batch {w.shape[0]} does not match input batch {B}")
        x = x.reshape(1, B * I, H, W)  # fold the batch into channels: one group per sample
        if self.upsample:
            # conv_transpose2d wants weights [in, out/groups, k, k]: swap O and I within each sample.
            w = w.transpose(1, 2).reshape(B * I, O, k, k)
            out = F.conv_transpose2d(x, w, stride=2, groups=B)       # [1, B*O, 2H+1, 2W+1]
            return self.blur(out.view(B, O, *out.shape[2:]))         # [B, O, 2H, 2W]
        out = F.conv2d(x, w.reshape(B * O, I, k, k), padding=k // 2, groups=B)
        return out.view(B, O, H, W)


class NoiseInjection(nn.Module):
    """Per-pixel noise, shared by all channels, times one learned strength initialised to 0
    (so a freshly built G ignores noise entirely)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):  # x [B, C, H, W], noise [B or 1, 1, H, W] or None
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4x4 starting tensor of the synthesis network (StyleGAN Sec. 2)."""

    def __init__(self, channel):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, 4, 4))

    def forward(self, batch):
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated conv -> + noise -> + bias -> lrelu*sqrt(2). Noise comes before the bias."""

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasLeakyReLU(out_channel)

    def forward(self, x, style, noise=None, delta=None):
        return self.activate(self.noise(self.conv(x, style, delta), noise))


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation), added to the upsampled RGB of the previous scale
    (the 'skip' generator of StyleGAN2 Sec. 4)."""

    def __init__(self, in_channel, style_dim, upsample=True):
        super().__init__()
        self.upsample = Upsample() if upsample else None
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None, delta=None):
        out = self.conv(x, style, delta) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ==== Generator ===================================================================================

class Generator(nn.Module):
    """StyleGAN2 config-F generator. At 256 px: 13 styled convs + 7 ToRGBs driven by n_latent = 14
    w vectors (the 14 "layers" of FC-TFG Sec. 4.1.2). w-index map (rosinality's layer order):
        4 px:   conv1 <- w0,  to_rgb1 <- w1
        2^r px: up-conv <- w(2r-5), conv <- w(2r-4), ToRGB <- w(2r-3)      (r = 3 .. log2(size))
    so each ToRGB shares its index with the next block's up-conv."""

    def __init__(self,
                 size,                  # output resolution (power of two, >= 8)
                 style_dim=512,         # C: width of z and w
                 n_mlp=8,               # mapping network depth
                 channel_multiplier=2,  # config-F widths above 32 px; 1 = the narrower "ADA paper256"
                 channels=None,         # optional {res: channels} overriding the formula (tiny preset)
                 lr_mlp=0.01):          # mapping network learning-rate multiplier
        super().__init__()
        log_size = int(math.log2(size))
        if size < 8 or 2 ** log_size != size:
            raise ValueError(f"Generator: size must be a power of two >= 8, got {size}")
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.channels = dict(channels) if channels else default_channels(size, channel_multiplier)
        missing = [2 ** r for r in range(2, log_size + 1) if 2 ** r not in self.channels]
        if missing:
            raise ValueError(f"Generator: channels lacks resolutions {missing}")
        ch = self.channels
        self.n_latent = 2 * log_size - 2       # 14 at 256 px, 10 at 64 px
        self.checkpointing = False  # activation checkpointing per resolution (checkpointed(); memory only)
        self.num_layers = 2 * (log_size - 2) + 1  # styled convs (= noise maps): 13 at 256 px

        # Mapping network: PixelNorm + n_mlp equalized lrelu layers; keys style.1 ... style.n (0 is the norm).
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="lrelu")
                                                  for _ in range(n_mlp)])
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        in_ch = ch[4]
        for r in range(3, log_size + 1):
            out_ch = ch[2 ** r]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch
        # Fixed noise maps for noise_mode='const': layer l has resolution 2^((l+5)//2).
        self.noises = nn.Module()
        for l in range(self.num_layers):
            res = 2 ** ((l + 5) // 2)
            self.noises.register_buffer(f"noise_{l}", torch.randn(1, 1, res, res))

    @classmethod
    def from_preset(cls, name):
        return cls(**PRESETS[name])

    # --- mapping side ------------------------------------------------------------------------------
    def mapping(self, z):
        """z [B, C] -> w [B, C]."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n=4096):
        """w_avg: the centre of W estimated from n random z -> [1, C] (truncation, pSp's latent_avg)."""
        z = torch.randn(n, self.style_dim, device=self.input.input.device)
        return self.mapping(z).mean(0, keepdim=True)

    def broadcast(self, w):
        """[B, C] -> [B, n_latent, C]: the same w for every layer (no mixing)."""
        return w[:, None, :].expand(-1, self.n_latent, -1)

    def mix(self, w1, w2, crossover):
        """Style mixing (StyleGAN Sec. 3.1): layers < crossover take w1, the rest w2. -> [B, L, C]."""
        ws = self.broadcast(w1).clone()
        ws[:, crossover:] = w2[:, None, :]
        return ws

    @staticmethod
    def truncate(ws, w_avg, psi):
        """Truncation trick: w' = w_avg + psi (w - w_avg); psi=1 is a no-op."""
        return w_avg + psi * (ws - w_avg) if psi != 1 else ws

    def sample(self, z, psi=1.0, w_avg=None, mixing_prob=0.0, noise_mode="random"):
        """Random images: z [B, C] (or a pair for mixing) -> [B, 3, H, W]. With probability
        mixing_prob a second z is drawn and mixed at a crossover uniform in [1, n_latent - 1]."""
        ws = self.sample_ws(z, mixing_prob)
        if psi != 1:
            ws = self.truncate(ws, self.mean_latent() if w_avg is None else w_avg, psi)
        return self.synthesis(ws, noise_mode=noise_mode)

    def sample_ws(self, z, mixing_prob=0.0):
        w = self.mapping(z)
        if mixing_prob > 0 and torch.rand(()) < mixing_prob:
            w2 = self.mapping(torch.randn_like(z))
            return self.mix(w, w2, int(torch.randint(1, self.n_latent, ())))
        return self.broadcast(w)

    # --- synthesis side ----------------------------------------------------------------------------
    def modulated_convs(self):
        """All ModulatedConv2d modules in synthesis order; `weight_deltas` is indexed the same way:
        [conv1, to_rgb1, convs[0], convs[1], to_rgbs[0], convs[2], convs[3], to_rgbs[1], ...]."""
        mods = [self.conv1.conv, self.to_rgb1.conv]
        for i, to_rgb in enumerate(self.to_rgbs):
            mods += [self.convs[2 * i].conv, self.convs[2 * i + 1].conv, to_rgb.conv]
        return mods

    def w_index_of_layers(self):
        """w index used by each entry of modulated_convs() (the map in the class docstring)."""
        idx = [0, 1]
        for i in range(len(self.to_rgbs)):
            idx += [2 * i + 1, 2 * i + 2, 2 * i + 3]
        return idx

    def _noise(self, l, B, noise_mode, like):
        """Noise of styled conv l: None, the stored map ('const') or a fresh draw of its size ('random')."""
        if noise_mode == "none":
            return None
        fixed = getattr(self.noises, f"noise_{l}")
        if noise_mode == "const":
            return fixed.to(like.dtype)
        return torch.randn(B, 1, *fixed.shape[2:], device=like.device, dtype=like.dtype)

    def synthesis(self, ws, noise_mode="const", weight_deltas=None):
        """ws [B, n_latent, C] -> image [B, 3, size, size], roughly in [-1, 1] (not clamped).

        noise_mode: 'const' (stored maps, deterministic), 'random' (fresh per call), 'none'.
        weight_deltas: None or a list aligned with modulated_convs(); each entry None or a
            multiplicative offset [B or 1, O, I, k, k] (HyperStyle: W' = W * (1 + delta))."""
        if noise_mode not in ("const", "random", "none"):
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(f"synthesis: want ws [B, {self.n_latent}, {self.style_dim}], got {tuple(ws.shape)}")
        n_mods = 2 + 3 * len(self.to_rgbs)
        deltas = list(weight_deltas) if weight_deltas is not None else [None] * n_mods
        if len(deltas) != n_mods:
            raise ValueError(f"weight_deltas has {len(deltas)} entries, G has {n_mods} modulated convs")
        B = ws.shape[0]
        x = self.conv1(self.input(B), ws[:, 0], self._noise(0, B, noise_mode, ws), deltas[0])
        skip = self.to_rgb1(x, ws[:, 1], delta=deltas[1])
        for i in range(len(self.to_rgbs)):
            noises = [self._noise(l, B, noise_mode, ws) for l in (2 * i + 1, 2 * i + 2)]
            x, skip = ops.checkpointed(self._block, i, x, skip, [ws[:, 2 * i + k] for k in (1, 2, 3)], noises,
                                       deltas[2 + 3 * i:5 + 3 * i], on=self.checkpointing)
        return skip

    def _block(self, i, x, skip, w, noises, deltas):
        """Resolution 2^(i+3): up-conv <- w[0], conv <- w[1], ToRGB <- w[2] (added to the upsampled skip)."""
        x = self.convs[2 * i](x, w[0], noises[0], deltas[0])
        x = self.convs[2 * i + 1](x, w[1], noises[1], deltas[1])
        return x, self.to_rgbs[i](x, w[2], skip, delta=deltas[2])

    def forward(self, ws, noise_mode="const", weight_deltas=None):
        return self.synthesis(ws, noise_mode, weight_deltas)


# ==== Discriminator (StyleGAN2 Sec. 4: residual architecture) =====================================

class ConvLayer(nn.Sequential):
    """[blur ->] equalized conv [-> bias + lrelu]. Downsampling = blur (pad so H -> H+1 for k=3),
    then a stride-2 conv with no padding (H+1 -> H/2). Keys follow rosinality (`0.weight`, ...)."""

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False, activate=True):
        layers = []
        if downsample:
            p = (len(ops.BLUR_KERNEL) - 2) + (kernel_size - 1)  # total blur pad: 4 for k=3, 2 for k=1
            layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride=2 if downsample else 1,
                                  padding=0 if downsample else kernel_size // 2))
        if activate:
            layers.append(BiasLeakyReLU(out_channel))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """conv3x3 -> down-conv3x3, plus a 1x1 down-sampled skip; the sum is scaled by 1/sqrt(2) so the
    two unit-variance branches add up to unit variance."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


def minibatch_stddev(x, group_size=4):
    """Append the std-dev across a group of samples as an extra channel (ProGAN Sec. 3), so D can
    detect a generator whose samples lack variety. Groups are strided: with B=8, G=4 sample j is
    grouped with j+2, j+4, j+6. x [B, C, H, W] -> [B, C + 1, H, W]."""
    B, C, H, W = x.shape
    G = min(B, group_size)
    if B % G:
        raise ValueError(f"minibatch_stddev: batch {B} not divisible by group size {G}")
    y = torch.sqrt(x.view(G, B // G, C, H, W).var(0, unbiased=False) + 1e-8)  # [B/G, C, H, W]
    y = y.mean([1, 2, 3]).view(B // G, 1, 1, 1).repeat(G, 1, H, W)           # [B, 1, H, W]
    return torch.cat([x, y], 1)


class Discriminator(nn.Module):
    """Residual StyleGAN2 D -> one real/fake logit per image (FC-TFG Sec. 3.3.6, Eq. 8).
    in_channels > 3 gives the video discriminator of Table 3 (frames stacked along channels)."""

    def __init__(self,
                 size,                  # input resolution
                 channel_multiplier=2,  # widths as the generator's
                 channels=None,         # optional {res: channels}
                 in_channels=3,         # 3 for images, 3*T for T stacked frames
                 stddev_group=4):       # minibatch-stddev group size (must divide the batch)
        super().__init__()
        log_size = int(math.log2(size))
        if size < 8 or 2 ** log_size != size:
            raise ValueError(f"Discriminator: size must be a power of two >= 8, got {size}")
        ch = dict(channels) if channels else default_channels(size, channel_multiplier)
        self.size, self.in_channels, self.stddev_group = size, in_channels, stddev_group
        self.checkpointing = False  # activation checkpointing per block (checkpointed(); memory only)
        blocks = [ConvLayer(in_channels, ch[size], 1)]
        in_ch = ch[size]
        for r in range(log_size, 2, -1):
            blocks.append(ResBlock(in_ch, ch[2 ** (r - 1)]))
            in_ch = ch[2 ** (r - 1)]
        self.convs = nn.Sequential(*blocks)
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, ch[4], activation="lrelu"),
                                          EqualLinear(ch[4], 1))

    @classmethod
    def from_preset(cls, name, in_channels=3):
        p = PRESETS[name]
        return cls(p["size"], p["channel_multiplier"], p["channels"], in_channels=in_channels)

    def forward(self, x):
        """x [B, in_channels, size, size] -> logits [B, 1]."""
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.size, self.size):
            raise ValueError(f"Discriminator: want [B, {self.in_channels}, {self.size}, {self.size}], "
                             f"got {tuple(x.shape)}")
        out = x
        for block in self.convs:
            out = ops.checkpointed(block, out, on=self.checkpointing)
        out = minibatch_stddev(out, self.stddev_group)
        out = self.final_conv(out)
        return self.final_linear(out.flatten(1))


# ==== Regularisers (StyleGAN2 Sec. 3.2 lazy regularisation, App. C path length) ===================

def r1_penalty(real_logits, real_img):
    """R1 (Mescheder et al. 2018): E[ ||dD(x)/dx||^2 ] on real images, per-sample sum, batch mean.
    Multiply by gamma/2 (and by the lazy interval) at the call site. Needs real_img.requires_grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_img, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def path_length_penalty(img, ws, mean_path_length, decay=0.01):
    """Path-length regulariser (StyleGAN2 Sec. 3.2): the Jacobian J_w of G should scale all
    directions equally. With y ~ N(0, I)/sqrt(HW): L = ||J_w^T y|| per sample; penalise (L - a)^2
    where a is a running mean of L. Returns (penalty, new running mean, mean L)."""
    y = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)   # [B, L, C]
    lengths = grad.pow(2).sum(2).mean(1).sqrt()                            # [B]
    a = mean_path_length + decay * (lengths.detach().mean() - mean_path_length)
    return (lengths - a).pow(2).mean(), a, lengths.detach().mean()


# ==== Files: the one checkpoint reader, strict loader, atomic writer and picture writers of the project ==
# (every module uses them; this file is near the bottom of the import graph, so it is their home):
# load_checkpoint, load_strict, temp_path, write_atomic, save_checkpoint, the two PNG writers, save_image_grid (an
# image grid) and plot_losses (the loss curves of a log.jsonl), and ArgumentParser (every CLI: one-line errors)

@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside: SIGTERM (kill, a job scheduler) raises KeyboardInterrupt as Ctrl-C does, so the writers' cleanup
    runs (VideoWriter.abort, write_atomic) and the entry point ends with its one line instead of vanishing."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ArgumentParser(argparse.ArgumentParser):
    """Every command line of the project: a bad flag or value is reported in ONE line, `prog: error: what
    (--help lists the flags)`, exit status 2, instead of argparse's usage block above the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def load_checkpoint(path, what="checkpoint"):
    """torch.load with weights_only=True (tensors, dicts, lists, numbers, strings only), and one clear
    FileNotFoundError / ValueError for a missing or unreadable file. rosinality training checkpoints
    pickle their argparse Namespace under `args`; we allow-list exactly that class (it holds plain
    values) and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling/zip errors come in many types; report them as one clear error
        raise ValueError(f"{path}: not a loadable {what} ({type(e).__name__}: {e})") from None


def load_strict(module, sd, what, may_lack=("num_batches_tracked",)):
    """module.load_state_dict(sd) where every key must match by name and shape, with one ValueError
    that names the offending keys. Keys ending in an entry of `may_lack` may be absent (BatchNorm's
    num_batches_tracked counters: missing from files of old PyTorch versions and published key lists,
    Wav2Lip#247; unused in eval mode); they keep the module's own value. -> module."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(tuple(may_lack))]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: checkpoint does not match the network: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                         f"{len(wrong)} shape mismatches {wrong[:5]}")
    module.load_state_dict({k: sd.get(k, own[k]) for k in own}, strict=True)
    return module


def temp_path(path):
    """A temporary name beside `path` with the same suffix (writers that pick the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def remove_temporaries(folder, stem="*"):
    """Delete what a writer killed mid-write (kill -9, power loss) left in `folder`: temp_path's names,
    .<stem>.tmp<pid><suffix>, for `stem` or any. The next run of the same job calls it before writing."""
    for tmp in Path(folder).glob(f".{stem}.tmp*"):
        if tmp.is_file() and re.fullmatch(r"\..+\.tmp\d+(\.[^.]+)?", tmp.name):
            tmp.unlink()


def write_atomic(path, write):
    """write(temporary path) then rename it onto `path`: readers, and a run killed mid-write, see the
    old file or the new one, never half of one. The temporary file is removed if write() fails."""
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, obj):
    """torch.save, atomically (write_atomic); load_checkpoint reads it back."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _generator_config(sd):
    """Infer Generator kwargs from a rosinality-layout state dict (shapes, not metadata)."""
    n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
    style_dim = sd["style.1.weight"].shape[1]
    n_blocks = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    size = 2 ** (n_blocks + 2)
    channels = {4: sd["conv1.conv.weight"].shape[1]}
    for i in range(n_blocks):
        channels[2 ** (i + 3)] = sd[f"convs.{2 * i}.conv.weight"].shape[1]
    return dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels)


def _discriminator_config(sd):
    n_res = sum(1 for k in sd if re.fullmatch(r"convs\.\d+\.conv1\.0\.weight", k))
    size = 2 ** (n_res + 2)
    first = sd["convs.0.0.weight"]                      # [C_size, in_channels, 1, 1]
    channels = {size: first.shape[0]}
    for k in range(1, n_res + 1):
        channels[size // 2 ** k] = sd[f"convs.{k}.conv2.1.weight"].shape[0]
    return dict(size=size, channels=channels, in_channels=first.shape[1])


def load_stylegan2(path, device="cpu"):
    """Load G (g_ema if present, else g), D (or None) and latent_avg (or None) from
    - a rosinality training checkpoint {g, d, g_ema, g_optim, d_optim, args, ada_aug_p},
    - a convert_weight.py output {g_ema, latent_avg[, g, d]},
    - a pSp/HyperStyle checkpoint {state_dict with 'decoder.*' keys, latent_avg, opts},
    - our own train.py checkpoints, which use the same keys.
    Fixed noise buffers (noises.*) may be missing in old files; they then keep their random init."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    g_sd = ckpt.get("g_ema") or ckpt.get("g")
    if g_sd is None and isinstance(ckpt.get("state_dict"), dict):  # pSp: decoder.* inside state_dict
        g_sd = {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    if not g_sd or "style.1.weight" not in g_sd:
        raise ValueError(f"{path}: no StyleGAN2 generator weights (looked for g_ema, g, state_dict/decoder.*)")
    try:
        G = Generator(**_generator_config(g_sd))
        missing, unexpected = G.load_state_dict(g_sd, strict=False)
        missing = [k for k in missing if not k.startswith("noises.")]  # old checkpoints lack them
        if missing or unexpected:
            raise ValueError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        D = None
        if isinstance(ckpt.get("d"), dict):
            D = Discriminator(**_discriminator_config(ckpt["d"]))
            D.load_state_dict(ckpt["d"], strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: StyleGAN2 weights do not match the expected layout ({e})") from None
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:
        latent_avg = latent_avg.reshape(-1, latent_avg.shape[-1])[:1].to(device)  # [1, C]
    return G.to(device), (D.to(device) if D is not None else None), latent_avg


def save_image_grid(images, path, nrow=None):
    """Save [N, 3, H, W] images in [-1, 1] as one PNG grid, written atomically."""
    from PIL import Image
    import numpy as np
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    N, _, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    grid = torch.zeros(3, ncol * H, nrow * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    grid = np.ascontiguousarray(grid.permute(1, 2, 0).numpy())
    write_atomic(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def plot_losses(log_path, png_path, smooth=10, panel=(320, 170)):
    """Loss curves of a log.jsonl as one PNG (pillow only): a panel per logged quantity, raw values in grey, a
    `smooth`-point running mean in colour, y range 1st..99th percentile (a spike does not flatten it). -> the number
    of panels (0: nothing to plot, no file)"""
    from PIL import Image, ImageDraw
    import numpy as np
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    keys = [k for k in (rows[0] if rows else {}) if k not in ("step", "time", "img_per_s", "peak_mem_gb")]
    if not keys:
        return 0
    (W, H), ncol = panel, min(3, len(keys))
    img = Image.new("RGB", (W * ncol, H * math.ceil(len(keys) / ncol)), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        ox, oy = (i % ncol) * W, (i // ncol) * H
        draw.rectangle([ox + 40, oy + 18, ox + W - 8, oy + H - 20], outline=(180, 180, 180))
        if len(pts) < 2:
            draw.text((ox + 44, oy + 3), f"{key}: {len(pts)} point(s)", fill="black")
            continue
        steps, vals = (np.array(c, float) for c in zip(*pts))
        mean = np.convolve(vals, np.ones(min(smooth, len(vals))) / min(smooth, len(vals)), mode="valid")
        lo, hi = np.percentile(vals, [1, 99])
        hi = hi if hi > lo else lo + 1e-8
        fx = lambda s: ox + 40 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (W - 48)
        fy = lambda v: oy + H - 20 - (np.clip(v, lo, hi) - lo) / (hi - lo) * (H - 38)
        draw.line([(fx(s), fy(v)) for s, v in zip(steps, vals)], fill=(200, 200, 200))
        draw.line([(fx(s), fy(v)) for s, v in zip(steps[len(steps) - len(mean):], mean)], fill=(20, 90, 200), width=2)
        draw.text((ox + 44, oy + 3), f"{key}: {mean[0]:.4g} -> {mean[-1]:.4g}", fill="black")
        for (x, y), label in (((2, 18), f"{hi:.3g}"), ((2, H - 30), f"{lo:.3g}"),          # y range, step range
                              ((40, H - 16), f"step {int(steps[0])}"), ((W - 70, H - 16), f"{int(steps[-1])}")):
            draw.text((ox + x, oy + y), label, fill=(90, 90, 90))
    write_atomic(png_path, lambda tmp: img.save(tmp, format="PNG"))
    return len(keys)


# ==== Benchmark: python stylegan2.py --bench   (results go to BENCHMARKS.md) ======================

def _timeit(fn, n, sync):
    fn()  # warm-up (and CUDA build / cudnn autotune)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def bench(presets=("tiny", "paper"), batch=4, iters=3, device="cpu", impls=("ref",)):
    """img/s for G forward and for one G+D training step with R1, per preset and op implementation."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for name in presets:
        G, D = Generator.from_preset(name).to(dev), Discriminator.from_preset(name).to(dev)
        for impl in impls:
            ops.allow_cuda_ops(impl != "ref")
            z = torch.randn(batch, G.style_dim, device=dev)

            def g_fwd():
                with torch.no_grad():
                    G.sample(z)

            def train_step():
                fake = G.sample(z)
                real = fake.detach().clone().requires_grad_(True)
                loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
                loss = loss + 5.0 * r1_penalty(D(real), real)
                loss.backward()

            t_g, t_s = _timeit(g_fwd, iters, sync), _timeit(train_step, iters, sync)
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
            rows.append((name, impl, batch, batch / t_g, batch / t_s, mem))
            print(f"{name:6s} {impl:4s} batch {batch}: G forward {batch / t_g:8.1f} img/s | "
                  f"G+D step with R1 {batch / t_s:8.2f} img/s | peak mem {mem:.2f} GiB", flush=True)
    return rows


def bench_ops(device="cuda", iters=50):
    """Pure vs CUDA: upfirdn2d for G's x2 upsample and bias_act (bias + lrelu) on [16, 512, 64, 64]."""
    x = torch.randn(16, 512, 64, 64, device=device)
    f, b = ops.make_kernel(gain=4).to(device), torch.randn(512, device=device)
    sync = torch.cuda.synchronize
    for name, op in (("upfirdn2d up2", lambda impl: ops.upfirdn2d(x, f, up=2, pad=(2, 1, 2, 1), impl=impl)),
                     ("bias_act lrelu", lambda impl: ops.bias_act(x, b, impl=impl))):
        t_ref, t_cuda = _timeit(lambda: op("ref"), iters, sync), _timeit(lambda: op("cuda"), iters, sync)
        print(f"{name} [16,512,64,64]: ref {t_ref * 1e3:.2f} ms, cuda {t_cuda * 1e3:.2f} ms, "
              f"ratio {t_ref / t_cuda:.2f}x", flush=True)


def main(argv=None):
    ap = ArgumentParser(description="StyleGAN2 decoder of FC-TFG: sample a grid or benchmark.")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--checkpoint", help="rosinality/pSp/train.py checkpoint (default: untrained weights)")
    ap.add_argument("--out", default="samples_stylegan2.png", help="PNG grid to write")
    ap.add_argument("--n", type=int, default=16, help="number of samples")
    ap.add_argument("--psi", type=float, default=1.0, help="truncation psi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="print img/s figures instead of sampling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if not (1 <= a.n <= 1024 and math.isfinite(a.psi)) or (a.checkpoint and Path(a.out).resolve() ==
                                                           Path(a.checkpoint).resolve()):
        ap.error(f"--n {a.n} must be 1..1024, --psi {a.psi} finite, and --out not the --checkpoint file")
    if a.bench:
        impls = ("ref", "cuda") if a.device.startswith("cuda") else ("ref",)
        bench(device=a.device, impls=impls)
        if a.device.startswith("cuda"):
            bench_ops(a.device)
        return 0
    torch.manual_seed(a.seed)
    if a.checkpoint:
        try:
            G, _, w_avg = load_stylegan2(a.checkpoint, a.device)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        G, w_avg = Generator.from_preset(a.preset).to(a.device), None
        print("note: no --checkpoint given, so these samples come from UNTRAINED weights")
    G.eval()
    with torch.no_grad():
        imgs = G.sample(torch.randn(a.n, G.style_dim, device=a.device), psi=a.psi, w_avg=w_avg)
    save_image_grid(imgs, a.out)
    print(f"wrote {a.n} samples ({G.size}px) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
