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
  App. B   noise inputs, constant input, style mixing, truncation -> NoiseInjection, ConstantInput,
                                                                     ...
  Sec. 3 / App. C  minibatch stddev, R1, path length        -> minibatch_stddev, r1_penalty,
                                                               path_length_penalty

The key layout and parameter counts follow rosinality/stylegan2-pytorch so that its checkpoints (and
pSp/HyperStyle checkpoints built on it) load: G 30,034,338 and D 28,864,129 parameters at 256 px
with channel_multiplier 2. Every line here was written from the maths (StyleGAN2 paper and
appendix).

Two low-level ops carry all the resampling and activations, upfirdn2d and bias_act
(stylegan2_ops.py: a pure-PyTorch reference path beside a fused CUDA kernel); activation
checkpointing is there too.

Not here: training steps and EMA (stages.py), the GAN/identity losses of Eq. 4-9 (losses.py),
inversion encoders (inversion.py), reading and writing files (files.py), speed (bench.py).
"""
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import files
import stylegan2_ops as ops  # upfirdn2d, bias_act (reference + CUDA), activation checkpointing

# --------------------------------------------------------------------------------------------------
# Presets: plain dicts of Generator kwargs. The Discriminator uses size/channel_multiplier/channels.
# `paper`: the FC-TFG decoder (Sec. 4.1.2): 256 px, 14 w vectors of 512, config-F widths.
# `tiny`:  our CPU preset: 64 px, 10 w vectors of 128, narrow channels (trains on 2 cores in
# minutes).
PRESETS = {
    "paper": dict(size=256, style_dim=512, n_mlp=8, channel_multiplier=2, channels=None),
    "tiny": dict(size=64, style_dim=128, n_mlp=2, channel_multiplier=2,
                 channels={4: 128, 8: 128, 16: 128, 32: 64, 64: 32}),
}


def default_channels(size, channel_multiplier=2):
    """Feature maps per resolution: min(512, 32768/res) for cm=2 (StyleGAN2 config-F; rosinality's
    table)."""
    cm = channel_multiplier
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm,
             512: 32 * cm, 1024: 16 * cm}
    return {r: c for r, c in table.items() if r <= size}


# ==== Equalized learning rate (StyleGAN2 App. B / ProGAN Sec. 4.1) ================================
# Weights are stored as N(0, 1) and scaled by 1/sqrt(fan_in) at run time, so Adam's per-parameter
# step size is the same for every layer regardless of its fan-in. lr_mul additionally slows a layer
# down (the mapping network uses 0.01): storing w/lr_mul and multiplying by lr_mul at run time
# divides its effective learning rate by 100 without touching the optimiser.

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
    """Without bias: in D the bias lives in the BiasLeakyReLU that follows (or, in the skip,
    nowhere)."""

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
    """[1,3,3,1] low-pass filter (upfirdn2d, up=down=1), pad (p0, p1) on both axes. gain 4 after a
    x2 upsample."""

    def __init__(self, pad, gain=1.0):
        super().__init__()
        self.register_buffer("kernel", ops.make_kernel(gain=gain))
        self.pad = pad

    def forward(self, x):
        return ops.upfirdn2d(x, self.kernel,
                             pad=(self.pad[0], self.pad[1], self.pad[0], self.pad[1]))


class Upsample(nn.Module):
    """x2 upsampling of the RGB skip path: zero insertion + blur with gain 4 (= 2^2); pads (2, 1)
    give 2H + 3 - 4 + 1 = 2H outputs for the 4 taps, centred as in rosinality's Upsample."""

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

    HyperStyle (inversion.py) edits the *generator weights* per image: W -> W * (1 + delta), delta
    of shape [B or 1, O, I, k, k]; it enters before modulation, so demodulation still normalises
    it."""

    def __init__(self,
                 in_channel,           # I: input feature maps
                 out_channel,          # O: output feature maps
                 kernel_size,          # k: 3 for styled convs, 1 for ToRGB
                 style_dim,            # C: width of the w vector that drives this layer
                 demodulate=True,      # False only in ToRGB (colours should keep the style's scale)
                 upsample=False):      # x2: transposed conv (stride 2) + blur
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size,
                                               kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)  # equalized lr
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)  # s starts near 1
        if upsample:
            # conv_transpose2d(stride 2) maps H -> 2H+k-2 = 2H+1; the blur trims it back to 2H with
            # rosinality's pad rule p = (K - 2) - (k - 1), pads ((p+1)//2 + 1, p//2 + 1) for K blur
            # taps.
            p = (len(ops.BLUR_KERNEL) - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), gain=4)

    def extra_repr(self):
        return (f"{self.in_channel}->{self.out_channel}, k={self.kernel_size}, "
                f"demodulate={self.demodulate}, upsample={self.upsample}")

    def styled_weight(self, style, delta=None):
        """Per-sample weights W'' [B, O, I, k, k] for styles [B, C] (Eq. 1 and 3).
        delta [D, O, I, k, k] with D = 1, B, or a divisor of B: one delta per group of B / D
        consecutive samples (FC-TFG: one source's deltas for all T frames of its window), broadcast,
        never copied per sample."""
        B = style.shape[0]
        s = self.modulation(style)                                   # [B, I]
        # HyperStyle: W * (1 + delta)
        w = self.weight if delta is None else self.weight * (1 + delta)
        D = w.shape[0]
        if B % D:
            raise ValueError(f"weight delta batch {D} does not divide the input batch {B}")
        # [B, O, I, k, k]
        w = (self.scale * w[:, None] * s.view(D, B // D, 1, -1, 1, 1)).flatten(0, 1)
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
            # conv_transpose2d wants weights [in, out/groups, k, k]: swap O and I within each
            # sample.
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
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample)
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
                 channel_multiplier=2,  # config-F widths above 32 px; 1 = the narrower
                                        # "ADA paper256"
                 channels=None,         # optional {res: channels} overriding the formula (tiny
                                        # preset)
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
        # activation checkpointing per resolution (checkpointed(); memory only)
        self.checkpointing = False
        self.num_layers = 2 * (log_size - 2) + 1  # styled convs (= noise maps): 13 at 256 px

        # Mapping network: PixelNorm + n_mlp equalized lrelu layers; keys style.1 ... style.n (0 is
        # the norm).
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="lrelu")
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

    # --- mapping side -----------------------------------------------------------------------------
    def mapping(self, z):
        """z [B, C] -> w [B, C]."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n=4096):
        """w_avg: the centre of W estimated from n random z -> [1, C] (truncation, pSp's
        latent_avg)."""
        z = torch.randn(n, self.style_dim, device=self.input.input.device)
        return self.mapping(z).mean(0, keepdim=True)

    def broadcast(self, w):
        """[B, C] -> [B, n_latent, C]: the same w for every layer (no mixing)."""
        return w[:, None, :].expand(-1, self.n_latent, -1)

    def mix(self, w1, w2, crossover):
        """Style mixing (StyleGAN Sec. 3.1): layers < crossover take w1, the rest w2.
        -> [B, L, C]."""
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

    # --- synthesis side ---------------------------------------------------------------------------
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
        """Noise of styled conv l: None, the stored map ('const') or a fresh draw of its size
        ('random')."""
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
            raise ValueError(f"synthesis: want ws [B, {self.n_latent}, {self.style_dim}], "
                             f"got {tuple(ws.shape)}")
        n_mods = 2 + 3 * len(self.to_rgbs)
        deltas = list(weight_deltas) if weight_deltas is not None else [None] * n_mods
        if len(deltas) != n_mods:
            raise ValueError(f"weight_deltas has {len(deltas)} entries, "
                             f"G has {n_mods} modulated convs")
        B = ws.shape[0]
        x = self.conv1(self.input(B), ws[:, 0], self._noise(0, B, noise_mode, ws), deltas[0])
        skip = self.to_rgb1(x, ws[:, 1], delta=deltas[1])
        for i in range(len(self.to_rgbs)):
            noises = [self._noise(l, B, noise_mode, ws) for l in (2 * i + 1, 2 * i + 2)]
            x, skip = ops.checkpointed(self._block, i, x, skip,
                                       [ws[:, 2 * i + k] for k in (1, 2, 3)], noises,
                                       deltas[2 + 3 * i:5 + 3 * i], on=self.checkpointing)
        return skip

    def _block(self, i, x, skip, w, noises, deltas):
        """Resolution 2^(i+3): up-conv <- w[0], conv <- w[1], ToRGB <- w[2] (added to the upsampled
        skip)."""
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
            # total blur pad: 4 for k=3, 2 for k=1
            p = (len(ops.BLUR_KERNEL) - 2) + (kernel_size - 1)
            layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size,
                                  stride=2 if downsample else 1,
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
        # activation checkpointing per block (checkpointed(); memory only)
        self.checkpointing = False
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
            raise ValueError(f"Discriminator: want [B, {self.in_channels}, {self.size}, "
                             f"{self.size}], got {tuple(x.shape)}")
        out = x
        for block in self.convs:
            out = ops.checkpointed(block, out, on=self.checkpointing)
        out = minibatch_stddev(out, self.stddev_group)
        out = self.final_conv(out)
        return self.final_linear(out.flatten(1))


# ==== Regularisers (StyleGAN2 Sec. 3.2 lazy regularisation, App. C path length) ===================

def r1_penalty(real_logits, real_img):
    """R1 (Mescheder et al. 2018): E[ ||dD(x)/dx||^2 ] on real images, per-sample sum, batch mean.
    Multiply by gamma/2 (and by the lazy interval) at the call site. Needs
    real_img.requires_grad."""
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
    ckpt = files.load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    g_sd = ckpt.get("g_ema") or ckpt.get("g")
    # pSp: decoder.* inside state_dict
    if g_sd is None and isinstance(ckpt.get("state_dict"), dict):
        g_sd = {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items()
                if k.startswith("decoder.")}
    if not g_sd or "style.1.weight" not in g_sd:
        raise ValueError(f"{path}: no StyleGAN2 generator weights "
                         f"(looked for g_ema, g, state_dict/decoder.*)")
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
        raise ValueError(f"{path}: StyleGAN2 weights do not match the expected layout "
                         f"({e})") from None
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:
        latent_avg = latent_avg.reshape(-1, latent_avg.shape[-1])[:1].to(device)  # [1, C]
    return G.to(device), (D.to(device) if D is not None else None), latent_avg


def main(argv=None):
    ap = files.ArgumentParser(
        description="StyleGAN2 decoder of FC-TFG: sample a grid (speed: bench.py).")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="size without --checkpoint")
    ap.add_argument("--checkpoint",
                    help="rosinality/pSp/train.py checkpoint (default: untrained weights)")
    ap.add_argument("--out", default="samples_stylegan2.png", help="PNG grid to write")
    ap.add_argument("--n", type=int, default=16, help="number of samples")
    ap.add_argument("--psi", type=float, default=1.0, help="truncation psi")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the latents (and untrained weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu | cuda | cuda:N")
    a = ap.parse_args(argv)
    if not (1 <= a.n <= 1024 and math.isfinite(a.psi)) or (a.checkpoint and Path(a.out).resolve() ==
                                                           Path(a.checkpoint).resolve()):
        ap.error(f"--n {a.n} must be 1..1024, --psi {a.psi} finite, "
                 f"and --out not the --checkpoint file")
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
    files.save_image_grid(imgs, a.out)
    print(f"wrote {a.n} samples ({G.size}px) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
