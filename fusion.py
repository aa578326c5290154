"""fusion.py: the Latent Fusion Network of FC-TFG (Sec. 3, 3.1, 3.2, Fig. 3) and the video D of
Table 3.

Paper map ("That's What I Said: Fully-Controllable Talking Face Generation", ACM MM 2023):
  Sec. 3.1, "E_can is a 2-layer MLP"        z_s->c = E_can(z_s)                 -> CanonicalEncoder
  Eq. (2), "E_m is a 3-layer MLP"           z_c->d = E_m(E_a(x_a) ⊕ E_inv(x_d)) -> MotionEncoder
  Eq. (1)                                   z_s->d = z_s->c + z_c->d
                                                                             -> LatentFusion.forward
  Sec. 3.2 / 4.4.2, Table 3                 Temporal Fusion: one Conv1d over T  -> TemporalFusion
  Fig. 3 caption                            "each model (E_can and E_m) has L independent weights"
                                            -> one small MLP per w index (a ModuleDict, keyed
                                               "1", "2", ...)
  Sec. 4.1.2                                manipulate layers 1,2,3,4,7,8,9,10 of 14; audio only
                                            into 7 and 8                        -> paper_layers()
  Sec. 4.4.2, Table 3                       video discriminator (frames stacked on channels)
                                                                               -> VideoDiscriminator
  not in the paper (inference only)         hold still what should: a temporal filter on the frames
                                                                                -> Deflicker
  evaluation (evaluate.py, attributes.py)   one clip through FC-TFG or a baseline (the source
                                            copied, G(E_inv(x_d)))              -> run_model

Which w index is "layer k" (Sec. 4.1.2)? We read the paper's numbers as 0-based positions in the
[B, 14, 512] code (what a Python list in the authors' code would hold):
    paper layer = w index : 1   2   3    4    7    8    9     10     (untouched: 0, 5, 6, 11, 12,
                                                                     13)
    drives                : 8px 8px 16px 16px 64px 64px 128px 128px (up-conv + conv of one
                                                                     resolution)
With the StyleGAN2 index map (stylegan2.Generator: resolution 2^r uses w(2r-5) for its up-conv and
w(2r-4) for its conv) every two consecutive paper layers are then the two styled convs of ONE
resolution, and the audio pair 7, 8 is the 64 px block: the scale at which the mouth of a 256 px
face (~60 px wide) is shaped. The 1-based reading (w0-w3, w6-w9) would split the audio pair and
every other pair across two resolutions, so we consider it the less likely intent. Both sets are
constructor arguments.

Tiny preset (64 px, 10 codes), derived by resolution in paper_layers(size): the coarse group (paper
w1-w4, the 8 and 16 px blocks, where StyleGAN places head pose and global layout) keeps the same
ABSOLUTE resolutions, as layout is decided in the first octaves above the 4x4 constant at any output
size; the detail group (paper w7-w10, the size/4 and size/2 blocks: mouth, eyes, expression) keeps
the same RELATIVE resolution, as those parts cover a fixed fraction of the face. At 256 px this
gives back {1,2,3,4,7,8,9,10} with audio {7,8}; at 64 px {1,...,6} (8, 16, 32 px) with audio {3,4}
(16 px = size/4).
  The tiny preset adds w0 (the 4 px const conv): our trained 64 px decoder keeps much of the head's
yaw there, so without w0 no model could turn the head (RESULTS.md, "where the layers hold what").
It is the 1-based reading's first layer; train.py --layers sets any list (an ablation row runs
paper_layers(64)). It also feeds the audio to every manipulated layer: our decoder spreads the
mouth over w0-w6, and the lips follow the audio less with the derived (3, 4) alone (RESULTS.md, the
ablation rows; --audio_layers). Untouched at 64 px: w7, w8 (64 px, the
finest texture) and w9 (last ToRGB); as in the paper, the finest layers keep the source's code and
so its texture.

Not here: the losses of Eq. 3-9 (losses.py), the decoder G and image D (stylegan2.py), E_inv
(inversion.py), E_a (audio.py), the training step (stages.py), the protocols that score
run_model's clips (evaluate.py, attributes.py).
"""
import contextlib

import torch
from torch import nn

import files
import inversion
import stylegan2

# --------------------------------------------------------------------------------------------------
# Presets: plain dicts of LatentFusion kwargs (see LatentFusion.__init__ for the meaning of each).
# A = width of the audio code z_a = E_a(x_a): 512 for the Wav2Lip audio encoder (Sec. 4.1.2), 128
# for audio.AUDIO_ENCODER_PRESETS["tiny"].
PRESETS = {
    "paper": dict(L=14, C=512, A=512, layers=(1, 2, 3, 4, 7, 8, 9, 10), audio_layers=(7, 8),
                  hidden=512, temporal="conv", kernel_size=3, window=None),
    "tiny": dict(L=10, C=128, A=128, layers=(0, 1, 2, 3, 4, 5, 6),
                 audio_layers=(0, 1, 2, 3, 4, 5, 6),
                 hidden=128, temporal="conv", kernel_size=3, window=None),
}
TEMPORAL_MODES = ("conv", "lstm", "none")  # Table 3 rows: 1D conv (ours), LSTM, no temporal layer


def w_indices_at(res):
    """The two w indices that style the up-conv and the conv of resolution `res` (>= 8):
    w(2r-5), w(2r-4) with r = log2(res) (the layer order of stylegan2.Generator)."""
    r = int(res).bit_length() - 1
    if res < 8 or 2 ** r != res:
        raise ValueError(f"w_indices_at: resolution must be a power of two >= 8, got {res}")
    return [2 * r - 5, 2 * r - 4]


def paper_layers(size):
    """Sec. 4.1.2 layer choice for a generator of output `size` -> (layers, audio_layers), sorted
    tuples of 0-based w indices. Coarse group by absolute resolution (8, 16 px), detail group by
    relative resolution (size/4, size/2); audio = the size/4 block. paper_layers(256) ==
    ((1,2,3,4,7,8,9,10), (7,8))."""
    if size < 32 or 2 ** (int(size).bit_length() - 1) != size:
        raise ValueError(f"paper_layers: size must be a power of two >= 32, got {size}")
    coarse = w_indices_at(8) + w_indices_at(16)                    # head pose, layout (absolute)
    detail = w_indices_at(size // 4) + w_indices_at(size // 2)     # mouth, eyes (relative)
    audio = w_indices_at(size // 4)
    return tuple(sorted(set(coarse + detail))), tuple(audio)


def parse_layers(text):
    """'0,1,2' -> (0, 1, 2): the --layers flag of train.py (manipulated w indices, Sec. 4.1.2)."""
    try:
        return tuple(int(k) for k in str(text).split(","))
    except ValueError:
        raise ValueError(f"layers must be comma-separated w indices such as '1,2,3,4', "
                         f"got {text!r}") from None


def _mlp(d_in, d_hidden, d_out, n_layers):
    """n_layers Linear layers with LeakyReLU(0.2) between them (the paper gives depth only; width
    and activation are our choice: StyleGAN's own mapping network uses the same slope)."""
    dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
    mods = []
    for a, b in zip(dims, dims[1:]):
        mods += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*mods[:-1])                                  # no activation after the last


def _check_layers(L, layers, audio_layers):
    layers, audio_layers = tuple(int(k) for k in layers), tuple(int(k) for k in audio_layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= k < L for k in layers):
        raise ValueError(f"layers must be distinct w indices in [0, {L}), got {layers}")
    if not set(audio_layers) <= set(layers):
        raise ValueError(f"audio_layers {audio_layers} must be a subset of the manipulated layers "
                         f"{layers}")
    return tuple(sorted(layers)), tuple(sorted(audio_layers))


# ==== Sec. 3.1: canonical encoder E_can, z_s -> z_s->c ============================================

class CanonicalEncoder(nn.Module):
    """E_can (Sec. 3.1): per manipulated w index l, an independent 2-layer MLP C -> hidden -> C.
    Layers outside `layers` pass z_s through unchanged (the decoder then renders them from the
    source).

    skip=False (the paper: "a 2-layer MLP"): z_s->c = MLP(z_s). skip=True (train.py --canonical
    residual, an ablation row): z_s->c = z_s + MLP(z_s) with the MLP's last layer zero-initialised,
    so training starts from "canonical = source". That keeps z_s->c dense and far from zero, and
    then Eq. (3)'s |z_s->c ⊙ z_c->d| is an L1 pull of the motion code to 0 instead of a channel
    split (RESULTS.md, Table 4)."""

    def __init__(self,
                 L=14,                          # number of w vectors of the generator
                 C=512,                         # width of one w vector
                 layers=(1, 2, 3, 4, 7, 8, 9, 10),  # w indices with their own MLP (Sec. 4.1.2)
                 hidden=512,                    # MLP width; the paper does not give it
                 skip=False):                   # residual form, identity at init (see docstring)
        super().__init__()
        self.L, self.C, self.skip = L, C, skip
        self.layers, _ = _check_layers(L, layers, ())
        self.mlps = nn.ModuleDict({str(l): _mlp(C, hidden, C, 2) for l in self.layers})
        if skip:
            for m in self.mlps.values():
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)

    def forward(self, z_s):
        """z_s [B, L, C] -> z_s->c [B, L, C]."""
        if z_s.ndim != 3 or z_s.shape[1:] != (self.L, self.C):
            raise ValueError(f"CanonicalEncoder: z_s must be [B, {self.L}, {self.C}], got "
                             f"{tuple(z_s.shape)}")
        out = []
        # the obvious loop: one independent MLP per w index (Fig. 3 caption)
        for l in range(self.L):
            z = z_s[:, l]                                               # [B, C]
            if l in self.layers:
                h = self.mlps[str(l)](z)
                z = z + h if self.skip else h
            out.append(z)
        return torch.stack(out, 1)                                      # [B, L, C]


# ==== Sec. 3.2, Eq. (2): multimodal motion encoder E_m, z_c->d = E_m(E_a(x_a) ⊕ E_inv(x_d)) =======

class MotionEncoder(nn.Module):
    """E_m (Eq. 2): per manipulated w index l, an independent 3-layer MLP. Its input is the driving
    code z_d[:, :, l] alone, or z_a ⊕ z_d[:, :, l] (channel concat, audio first as written in Eq. 2)
    in the audio layers. Untouched layers get z_c->d = 0, so Eq. (1) leaves them equal to z_s."""

    def __init__(self,
                 L=14,                          # number of w vectors
                 C=512,                         # width of one w vector (z_d and the output)
                 A=512,                         # width of the audio code z_a (Wav2Lip encoder: 512)
                 layers=(1, 2, 3, 4, 7, 8, 9, 10),  # w indices with their own MLP (Sec. 4.1.2)
                 audio_layers=(7, 8),           # subset of `layers` that also sees z_a (Sec. 4.1.2)
                 hidden=512):                   # MLP width; the paper does not give it
        super().__init__()
        self.L, self.C, self.A = L, C, A
        self.layers, self.audio_layers = _check_layers(L, layers, audio_layers)
        self.mlps = nn.ModuleDict({
            str(l): _mlp(C + (A if l in self.audio_layers else 0), hidden, C, 3)
            for l in self.layers})
        # PyTorch's default init (the paper does not say): z_c->d starts small and random. A
        # zero-init last layer would sit in the dead zone of Eq. (3)'s |z_s->c ⊙ z_c->d|: at z_c->d
        # = 0 that term is an L1 pull of strength |z_s->c| per element, stronger than the
        # reconstruction gradient of a still-blurry decoder, so the motion code never left 0
        # (measured; RESULTS.md, "motion collapse").

    def forward(self, z_d, z_a):
        """z_d [B, T, L, C], z_a [B, T, A] -> z_c->d [B, T, L, C]."""
        if z_d.ndim != 4 or z_d.shape[2:] != (self.L, self.C):
            raise ValueError(f"MotionEncoder: z_d must be [B, T, {self.L}, {self.C}], got "
                             f"{tuple(z_d.shape)}")
        if z_a.ndim != 3 or z_a.shape != (*z_d.shape[:2], self.A):
            raise ValueError(f"MotionEncoder: z_a must be [B, T, {self.A}] = "
                             f"{(*z_d.shape[:2], self.A)}, got {tuple(z_a.shape)}")
        out = []
        for l in range(self.L):
            if l in self.layers:
                x = z_d[:, :, l]                                       # [B, T, C]
                if l in self.audio_layers:
                    x = torch.cat([z_a, x], -1)                        # [B, T, A + C]  (⊕ of Eq. 2)
                out.append(self.mlps[str(l)](x))                       # [B, T, C]
            else:
                out.append(z_d.new_zeros(*z_d.shape[:2], self.C))
        return torch.stack(out, 2)                                      # [B, T, L, C]


# ==== Sec. 3.2 / 4.4.2, Table 3: Temporal Fusion over time ========================================

class TemporalFusion(nn.Module):
    """Refines z_s->d along TIME inside non-overlapping windows (Sec. 4.4.2: "our window size ...
    does not have any overlap along the temporal dimension"). Modes (Table 3):
      "conv" (the paper's): ONE Conv1d over T. Channels = the n manipulated w vectors x C,
             grouped per w vector (groups = n): each w index mixes its own C channels over k frames
             and never another index's, matching the per-layer independence of Fig. 3. Parameters
             n*C*C*k + n*C (6.3 M at paper size) instead of (14*512)^2*k = 157 M for an ungrouped
             kernel. Initialised to the identity (centre tap = I, the rest 0, bias 0), so training
             starts with no smoothing at all.
             Window borders: replicate padding, i.e. frames before the first / after the last frame
             of a window are copies of that frame. A constant sequence therefore stays constant and
             border frames never see zeros (a zero w is a strange face for the decoder).
      "lstm": per w vector, an LSTM(C, C) over the window followed by a zero-initialised
             Linear(C, C) added to the input (residual), so this variant is the identity at init as
             well. Causal: frame t sees frames <= t of its window.
      "none": identity.
    window=None: the whole T axis of the input is one window (train.py feeds one window per sample);
    window=k: the input is cut into consecutive windows of k frames (the last may be shorter) and
    each is processed on its own: the paper's inference (Sec. 4.4.2), whose window borders show as
    seams. halo(): the neighbours a frame needs to be fused as inside one window spanning the whole
    clip; FCTFG.generate and infer.py (continuous mode, their default) pass them across window
    borders."""

    def __init__(self,
                 n_layers=8,        # manipulated w vectors fed to it (the others are not touched)
                 C=512,             # width of one w vector
                 mode="conv",       # "conv" | "lstm" | "none" (Table 3)
                 kernel_size=3,     # conv taps over time (odd); the paper does not give it
                 window=None):      # frames per non-overlapping window; None = the whole input
        super().__init__()
        if mode not in TEMPORAL_MODES:
            raise ValueError(f"TemporalFusion: mode must be one of {TEMPORAL_MODES}, got {mode!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"TemporalFusion: kernel_size must be odd and >= 1, got {kernel_size}")
        if window is not None and window < 1:
            raise ValueError(f"TemporalFusion: window must be None or >= 1, got {window}")
        self.n, self.C, self.mode, self.k, self.window = n_layers, C, mode, kernel_size, window
        if mode == "conv":
            self.conv = nn.Conv1d(n_layers * C, n_layers * C, kernel_size, groups=n_layers)
            with torch.no_grad():
                self.conv.weight.zero_()                           # [n*C, C, k]
                eye = torch.eye(C).repeat(n_layers, 1)             # row o of group g -> input o % C
                self.conv.weight[:, :, kernel_size // 2] = eye
                self.conv.bias.zero_()
        elif mode == "lstm":
            self.lstms = nn.ModuleList(nn.LSTM(C, C, batch_first=True) for _ in range(n_layers))
            self.outs = nn.ModuleList(nn.Linear(C, C) for _ in range(n_layers))
            for lin in self.outs:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def halo(self):
        """(frames before, frames after) that frame t's output reads: the conv's k // 2 on each
        side; the LSTM's state summarises every earlier frame, approximated by one training window
        before (causal)."""
        return {"conv": (self.k // 2, self.k // 2), "lstm": (self.window or 5, 0),
                "none": (0, 0)}[self.mode]

    @contextlib.contextmanager
    def one_window(self, on=True):
        """Inside (on=True): every input is one window, borders and all: for chunks that carry their
        halo."""
        win, self.window = self.window, None if on else self.window
        try:
            yield
        finally:
            self.window = win

    def forward(self, z):
        """z [B, T, n, C] -> [B, T, n, C]."""
        if z.ndim != 4 or z.shape[2:] != (self.n, self.C):
            raise ValueError(f"TemporalFusion: want [B, T, {self.n}, {self.C}], got "
                             f"{tuple(z.shape)}")
        if self.mode == "none":
            return z
        if self.window is None:
            return self._one_window(z)
        return torch.cat([self._one_window(w) for w in z.split(self.window, dim=1)], 1)

    def _one_window(self, z):
        B, T, n, C = z.shape
        if self.mode == "conv":
            x = z.reshape(B, T, n * C).transpose(1, 2)                  # [B, n*C, T]
            p = self.k // 2
            if p:  # replicate padding, written out so its meaning is visible
                x = torch.cat([x[:, :, :1].expand(-1, -1, p), x, x[:, :, -1:].expand(-1, -1, p)], 2)
            y = self.conv(x)                                            # [B, n*C, T]
            return y.transpose(1, 2).reshape(B, T, n, C)
        out = []
        for i in range(n):  # "lstm"
            h, _ = self.lstms[i](z[:, :, i])                            # [B, T, C]
            out.append(z[:, :, i] + self.outs[i](h))
        return torch.stack(out, 2)


# the --paper_windows flag of evaluate.py and infer.py (their default: TemporalFusion.halo)
PAPER_WINDOWS_HELP = ("fuse each temporal window on its own, as the paper's inference (Sec. 4.4.2; "
                      "Table 3's row: seams where windows meet); default: windows see their "
                      "neighbours")


# ==== Not in the paper: holding still what should hold still (inference only) =====================

DEFLICKER_TAU = 6.0   # grey levels; chosen on tune people (RESULTS.md 0.1); 0 turns the filter off
DEFLICKER_HELP = ("not in the paper: fusion.Deflicker's tau in grey levels, a temporal filter on "
                  "the generated frames that holds a shimmering backdrop and skin still; 0 = raw "
                  "renders")


class Deflicker:
    """An edge-preserving temporal filter on the rendered frames, applied at inference only (a
    deviation: the paper renders G(z_s->d) frame by frame). Every driving frame is inverted on its
    own, so the codes carry a little noise that the decoder draws as a shimmer over the backdrop and
    the skin, regions the truth holds still (RESULTS.md 0.1 measures where the frame-to-frame change
    comes from). Per pixel:
        y_0 = x_0,    y_t = y_t-1 + a_t * (x_t - y_t-1),    a_t = 1 - exp(-(|x_t - y_t-1| / tau)^2)
    with |.| the mean over RGB. A change much smaller than tau (the shimmer) is mostly held back,
    one much larger (a blink, the lips, a moving outline) passes at once; a slow drift of d per
    frame is followed a few grey levels behind (the gap g where g (1 - exp(-(g / tau)^2)) = d: 2.7
    for d = 0.5, tau = 6). Causal, with one frame of state: a clip fed in chunks, in order, gives
    what it gives fed whole (FCTFG.generate, infer.animate)."""

    def __init__(self,
                 tau=DEFLICKER_TAU):   # grey levels on 0..255 where a change passes ~63 %; 0 = off
        if not tau >= 0:
            raise ValueError(f"Deflicker: tau must be >= 0 grey levels, got {tau}")
        self.tau, self.prev = tau * 2 / 255, None    # frames are in [-1, 1]: 255 grey levels span 2

    def __call__(self, x):
        """x [T, 3, H, W], the next T frames of the clip -> the filtered frames, same shape and
        dtype."""
        if not self.tau:
            return x
        out = []
        for x_t in x.float():
            if self.prev is None:
                self.prev = x_t                                          # y_0 = x_0
            else:
                d = x_t - self.prev
                a = 1 - torch.exp(-(d.abs().mean(0, keepdim=True) / self.tau) ** 2)
                self.prev = self.prev + a * d                            # y_t
            out.append(self.prev)
        return torch.stack(out).to(x.dtype)


# ==== Fig. 3: the whole Latent Fusion Network =====================================================

class LatentFusion(nn.Module):
    """z_s (source code), z_d (driving codes), z_a (audio codes) -> the codes the decoder G renders.
    Eq. (1) z_s->d = E_can(z_s) + E_m(z_a, z_d), then Temporal Fusion on the manipulated layers."""

    def __init__(self,
                 L=14,                      # w vectors of the generator (14 at 256 px, 10 at 64 px)
                 C=512,                     # width of one w vector
                 A=512,                     # width of the audio code z_a
                 layers=(1, 2, 3, 4, 7, 8, 9, 10),  # manipulated w indices (Sec. 4.1.2, 0-based)
                 audio_layers=(7, 8),       # w indices that also receive audio (Sec. 4.1.2)
                 hidden=512,                # width of every MLP (not in the paper)
                 temporal="conv",           # Temporal Fusion: "conv" | "lstm" | "none" (Table 3)
                 kernel_size=3,             # temporal conv taps (not in the paper)
                 window=None,               # temporal window in frames; None = the whole T axis
                 canonical_skip=False):     # E_can residual + zero init (see CanonicalEncoder)
        super().__init__()
        self.L, self.C, self.A = L, C, A
        self.layers, self.audio_layers = _check_layers(L, layers, audio_layers)
        self.E_can = CanonicalEncoder(L, C, self.layers, hidden, skip=canonical_skip)
        self.E_m = MotionEncoder(L, C, A, self.layers, self.audio_layers, hidden)
        self.temporal = TemporalFusion(len(self.layers), C, temporal, kernel_size, window)
        self.register_buffer("_idx", torch.tensor(self.layers), persistent=False)

    @classmethod
    def from_preset(cls, name, **overrides):
        return cls(**{**PRESETS[name], **overrides})

    def forward(self, z_s, z_d, z_a):
        """z_s [B, L, C], z_d [B, T, L, C], z_a [B, T, A] -> dict of [B, T, L, C] tensors:
          z_sc     = z_s->c, canonical code (Sec. 3.1); G(z_sc) is the canonical image of Fig. 5
          z_cd     = z_c->d, motion code (Eq. 2); 0 on untouched layers
          z_sd_raw = z_sc + z_cd, exactly Eq. (1)
          z_sd     = Temporal Fusion of z_sd_raw on the manipulated layers: what G renders
        Untouched layers hold z_s in all four (z_cd there is 0)."""
        if (z_s.ndim != 3 or z_d.ndim != 4 or z_s.shape[0] != z_d.shape[0]
                or z_s.shape[1:] != z_d.shape[2:]):
            raise ValueError(f"LatentFusion: want z_s [B, L, C] and z_d [B, T, L, C] with the same "
                             f"B, L, C; got {tuple(z_s.shape)} and {tuple(z_d.shape)}")
        B, T = z_d.shape[:2]
        # [B, T, L, C] (same for every t)
        z_sc = self.E_can(z_s).unsqueeze(1).expand(B, T, self.L, self.C)
        z_cd = self.E_m(z_d, z_a)                                        # [B, T, L, C]
        z_sd_raw = z_sc + z_cd                                           # Eq. (1)
        fused = self.temporal(z_sd_raw.index_select(2, self._idx))       # [B, T, n, C]
        z_sd = z_sd_raw.index_copy(2, self._idx, fused)                  # untouched layers stay z_s
        return dict(z_sc=z_sc, z_cd=z_cd, z_sd_raw=z_sd_raw, z_sd=z_sd)


# ==== Sec. 4.4.2, Table 3: the video discriminator ================================================

class VideoDiscriminator(stylegan2.Discriminator):
    """StyleGAN2 D whose input is T frames concatenated along channels (Sec. 4.4.2): [B, T, 3, H, W]
    -> [B, 3T, H, W] -> logits [B, 1]. Channel order is frame-major (f0 R,G,B, f1 R,G,B, ...).
    The paper's default is the image D (stylegan2.Discriminator applied to every frame); this class
    is the "video" column of Table 3. State-dict keys are those of stylegan2.Discriminator, only
    the first 1x1 conv is wider, so from_image_discriminator() can start it from a trained image
    D."""

    def __init__(self,
                 size,                  # frame resolution
                 T,                     # frames per clip (stacked on channels)
                 channel_multiplier=2,  # widths as stylegan2.Discriminator
                 # optional {res: channels}, e.g. stylegan2.PRESETS["tiny"]["channels"]
                 channels=None,
                 stddev_group=4):       # minibatch-stddev group size
        super().__init__(size, channel_multiplier, channels, in_channels=3 * T,
                         stddev_group=stddev_group)
        self.T = T

    def forward(self, x):
        """x [B, T, 3, H, W] -> logits [B, 1]."""
        if x.ndim != 5 or x.shape[1:3] != (self.T, 3):
            raise ValueError(f"VideoDiscriminator: want [B, {self.T}, 3, H, W], got "
                             f"{tuple(x.shape)}")
        return super().forward(x.flatten(1, 2))

    @torch.no_grad()
    def init_from_image_discriminator(self, D_img):
        """Copy a trained image D; the first (fromRGB) conv sees each frame with 1/T of the image
        D's weight, so on a static clip (T copies of one frame) this D returns exactly D_img's
        logit. Equalized lr stores W and multiplies by scale = 1/sqrt(fan_in) at run time; fan_in
        grows T-fold, so the stored weights are rescaled by scale_img / scale_video / T =
        1/sqrt(T)."""
        sd = D_img.state_dict()
        own = self.state_dict()
        first = next(m for m in self.modules() if isinstance(m, stylegan2.EqualConv2d))
        first_img = next(m for m in D_img.modules() if isinstance(m, stylegan2.EqualConv2d))
        key = next(k for k, p in self.named_parameters() if p is first.weight)
        if sd.keys() != own.keys() or sd[key].shape[1] != 3:
            raise ValueError("init_from_image_discriminator: D_img must be a 3-channel "
                             "stylegan2.Discriminator of the same size and widths")
        w = sd[key].repeat(1, self.T, 1, 1) * (first_img.scale / first.scale / self.T)
        sd = {**sd, key: w}
        self.load_state_dict(sd, strict=True)


# ==== Fig. 3 end to end: the whole generator side of FC-TFG in one module =========================

class FCTFG(nn.Module):
    """x_s, x_d, x_a -> x_g. Holds every network of Fig. 3 that the FC-TFG stage trains or
    fine-tunes:
        E_inv  pSp encoder (inversion.PSPEncoder): z_s = E_inv(x_s), z_d = E_inv(x_d)
        H      HyperStyle (inversion.HyperStyle): per-source weight deltas of G (identity detail)
        E_a    Wav2Lip audio encoder (audio.AudioEncoder): z_a = E_a(x_a)
        fusion LatentFusion: E_can, E_m, Eq. (1), Temporal Fusion
        G      StyleGAN2 decoder, rendering z_sd with the SOURCE's HyperStyle deltas for every
               frame: the deltas carry who the person is, the codes carry how they move.
    State-dict keys are prefixed by these names; FCTFG.load(path) rebuilds one from a train.py
    checkpoint of the fctfg stage."""

    def __init__(self, preset="tiny", **fusion_overrides):
        super().__init__()
        import audio  # lazily: `import fusion` alone need not load soundfile and scipy
        self.preset = preset
        self.G = stylegan2.Generator.from_preset(preset)
        inv = inversion.PRESETS[preset]
        self.E_inv = inversion.PSPEncoder(**inv["psp"])
        self.H = inversion.HyperStyle(inversion.layer_shapes(self.G), **inv["hyperstyle"])
        self.E_a = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS[preset])
        self.fusion = LatentFusion.from_preset(preset, **fusion_overrides)
        if self.E_a.out_dim != self.fusion.A:
            raise ValueError(f"audio code width {self.E_a.out_dim} != fusion A {self.fusion.A}")

    def encode_source(self, x_s, hyper_steps=0):
        """x_s [B, 3, H, W] -> (z_s [B, L, C], weight deltas list). hyper_steps = 0: pSp codes
        only."""
        z_s, deltas, _ = inversion.invert(self.G, x_s, self.E_inv, self.H if hyper_steps else None,
                                          steps=hyper_steps, recon=False)
        return z_s, deltas

    def render(self, ws, deltas):
        """ws [B, T, L, C] with per-source deltas (entries [B, O, I, k, k] or None) -> [B, T, 3, H,
        W]. Each source's deltas serve its T frames by broadcasting inside the modulated convs (no
        per-frame copies: at 256 px one copy of every tuned layer's delta is ~100 MB per frame)."""
        B, T = ws.shape[:2]
        return self.G.synthesis(ws.flatten(0, 1), weight_deltas=deltas).unflatten(0, (B, T))

    def decode(self, z_s, deltas, z_d, x_a, keep=slice(None)):
        """Fig. 3 after the visual encoder, for whole temporal windows: z_s [B, L, C] and the
        source's deltas, driving codes z_d [B, T, L, C] = E_inv(x_d) and mel windows x_a [B, T, 1,
        80, 16] -> dict(x_g [B, T', 3, H, W], z_a, z_sc, z_cd, z_sd_raw, z_sd) of the frames `keep`
        selects (T' of T: the others are neighbours that the temporal fusion reads and nobody
        renders). Every caller (training, evaluation, inference, figures) goes through here."""
        B, T = z_d.shape[:2]
        z_a = self.E_a(x_a.flatten(0, 1)).unflatten(0, (B, T))          # Eq. (2): E_a(x_a)
        # Eq. (1)-(2)
        codes = {k: v[:, keep] for k, v in dict(z_a=z_a, **self.fusion(z_s, z_d, z_a)).items()}
        return dict(x_g=self.render(codes["z_sd"], deltas), **codes)

    def forward(self, x_s, x_d, mel, hyper_steps=0):
        """x_s [B, 3, H, W], x_d [B, T, 3, H, W], mel [B, T, 1, 80, 16] ->
        dict(x_g [B, T, 3, H, W], z_s, z_d, z_a, z_sc, z_cd, z_sd_raw, z_sd, deltas)."""
        z_s, deltas = self.encode_source(x_s, hyper_steps)
        z_d = self.E_inv(x_d.flatten(0, 1)).unflatten(0, x_d.shape[:2])   # Eq. (2): E_inv(x_d)
        return dict(z_s=z_s, z_d=z_d, deltas=deltas, **self.decode(z_s, deltas, z_d, mel))

    def generate(self, x_s, x_d, mel, hyper_steps=0, chunk=40, continuous=True,
                 deflicker=DEFLICKER_TAU):
        """One clip: x_s [3, H, W], x_d [T, 3, H, W], mel [T, 1, 80, 16] -> dict(x_g [T, 3, H, W],
        z_d, z_sc, z_sd [T, L, C]). The source is inverted once; the clip then goes through decode
        in chunks of whole temporal windows, so chunking changes nothing:
          continuous=True: each chunk carries its temporal halo (the neighbours across its
            borders), so every frame is fused as inside one window spanning the clip: no seams;
          continuous=False: the paper's non-overlapping windows (Sec. 4.4.2), each fused on its own.
        window None = the whole clip in one call either way. deflicker: Deflicker's tau (0 = the raw
        renders, as the paper)."""
        z_s, deltas = self.encode_source(x_s[None], hyper_steps)
        win, T = self.fusion.temporal.window, x_d.shape[0]
        step = T if win is None else win * max(1, chunk // win)
        before, after = self.fusion.temporal.halo() if continuous and win is not None else (0, 0)
        outs, hold_still = [], Deflicker(deflicker)
        with self.fusion.temporal.one_window(before or after):
            for t0 in range(0, T, step):
                a, b = max(0, t0 - before), min(T, t0 + step + after)     # the chunk and its halo
                z_d = self.E_inv(x_d[a:b])[None]
                keep = slice(t0 - a, t0 - a + min(step, T - t0))
                out = self.decode(z_s, deltas, z_d, mel[a:b][None], keep)
                out["x_g"] = hold_still(out["x_g"][0])[None]                 # chunks in order
                outs.append(dict(z_d=z_d[:, keep], **out))
        return {k: torch.cat([o[k][0] for o in outs]) for k in ("x_g", "z_d", "z_sc", "z_sd")}

    def canonical(self, z, deltas=None):
        """Fig. 5: the canonical image G(E_can(z)) of codes z [N, L, C] (deltas: the source's, or
        None for codes of other frames or people) -> [N, 3, H, W]."""
        return self.G.synthesis(self.fusion.E_can(z), weight_deltas=deltas)

    @classmethod
    def load(cls, path, device="cpu", ck=None):
        """Rebuild from a train.py fctfg checkpoint ({'stage': 'fctfg', 'cfg': ..., 'fctfg': ...});
        ck: that file's contents when the caller has read them already (no second read).
        -> (model in eval mode, cfg with the checkpoint's 'run' dict of non-preset flags, e.g.
        'data')."""
        ck = files.load_checkpoint(path) if ck is None else ck
        if not isinstance(ck, dict) or ck.get("stage") != "fctfg" or "fctfg" not in ck:
            stage = ck.get("stage") if isinstance(ck, dict) else type(ck).__name__
            raise ValueError(f"{path}: not an FC-TFG checkpoint (stage {stage!r})")
        cfg = ck.get("cfg")
        missing = [k for k in ("model", "temporal", "window")
                   if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise ValueError(f"{path}: its settings ('cfg') lack {missing}: not a checkpoint "
                             f"train.py wrote (or a damaged one)")
        # checkpoints from before the --canonical / --layers / --audio_layers flags: the residual
        # E_can and the layers derived by paper_layers
        derived = paper_layers(stylegan2.PRESETS[cfg["model"]]["size"])
        layers = parse_layers(cfg["layers"]) if cfg.get("layers") else derived[0]
        audio_layers = parse_layers(cfg["audio_layers"]) if cfg.get("audio_layers") else derived[1]
        if cfg["model"] not in PRESETS:
            raise ValueError(f"{path}: unknown model preset {cfg['model']!r} (known: "
                             f"{sorted(PRESETS)})")
        model = cls(cfg["model"], temporal=cfg["temporal"], window=cfg["window"] or None,
                    canonical_skip=cfg.get("canonical", "residual") == "residual", layers=layers,
                    audio_layers=audio_layers)
        try:
            model.load_state_dict(ck["fctfg"])
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit the {cfg['model']!r} FC-TFG "
                             f"({e})") from None
        # run: train.py's other flags
        return model.to(device).eval(), {**cfg, "run": ck.get("run", {})}


# ==== One clip through FC-TFG or a baseline (the protocols of evaluate.py and attributes.py) ====
@torch.no_grad()
def run_model(model, x_s, x_d, mel, method="model", hyper_steps=0, chunk=40, canonical=False,
              continuous=True, deflicker=DEFLICKER_TAU):
    """One clip through FC-TFG (fusion.FCTFG.generate; continuous=False: the paper's non-overlapping
    windows) or a baseline. x_s [3, H, W], x_d [T, 3, H, W] in [-1, 1], mel [T, 1, 80, 16] ->
    dict(x_g, canon (or None) [T, 3, H, W], z_sc_spread float or None, ws [T, L, C] or None,
    window).
      model         Eq. (1)-(2) + temporal fusion, rendered with the source's HyperStyle deltas
      encoder_recon G(E_inv(x_d)) with the same deltas: what the latent route gives when z_s->d is
                    the driving frame's own code, i.e. the upper bound of FC-TFG's reconstruction
                    (callers pass the ground truth as x_d for the decoder + inversion ceiling, the
                    'truth_recon' rows)
      copy_source   x_s repeated (no network; model may be None)
    canonical=True also renders G(E_can(E_inv(x_d,t))) for every frame t (Fig. 5b: every frame of
    one video taken to canonical space), without deltas (each frame is its own 'source').
    deflicker: fusion.Deflicker's tau on the rendered frames of model and encoder_recon alike (0:
    the raw renders, as the paper)."""
    if method == "copy_source":
        return dict(x_g=x_s[None].expand(x_d.shape[0], -1, -1, -1), canon=None, z_sc_spread=None,
                    ws=None, window=None)
    if method == "model":
        out = model.generate(x_s, x_d, mel, hyper_steps, chunk, continuous, deflicker)
        z_d, ws = out["z_d"], out["z_sd"]
        spread = float(out["z_sc"].std(0).max()) if x_d.shape[0] > 1 else None
    elif method == "encoder_recon":
        _, deltas = model.encode_source(x_s[None], hyper_steps)
        z_d = ws = model.E_inv(x_d)
        out, spread = dict(x_g=Deflicker(deflicker)(model.render(ws[None], deltas)[0])), None
    else:
        raise ValueError(f"run_model: method must be 'model', 'encoder_recon' or 'copy_source', "
                         f"got {method!r}")
    return dict(x_g=out["x_g"], canon=model.canonical(z_d) if canonical else None,
                z_sc_spread=spread, ws=ws, window=model.fusion.temporal.window)
