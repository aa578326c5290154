"""inversion.py: the visual encoder E_inv (pSp + HyperStyle) and the identity network E_id
(ArcFace).

Paper map (FC-TFG, Jang et al., ACM MM 2023; layouts from the pSp, HyperStyle and InsightFace
releases):
Sec. 3, Fig. 3  z_s = E_inv(x_s), z_d = E_inv(x_d), one shared encoder  -> PSPEncoder
Sec. 4.1.2      "HyperStyle ... we replace the e4e encoder with pSp"       -> HyperStyle, invert()
Sec. 3.3.3      Eq. (5) L_id = 1 - cos(E_id(x_g), E_id(x_d)), ArcFace     -> IdentityEncoder
                E_id's own training (ArcFace margin loss; tiny judges)   -> arcface_loss
Sec. 4.1.2      inversion stage trained before FC-TFG (pSp, then HyperStyle
                losses) -> loss_inversion, psp_loss, hyperstyle_loss
Published checkpoint formats (pSp, HyperStyle, InsightFace IR-SE50) -> load_psp, load_hyperstyle,
                load_arcface
Sections below: 1 IR-SE backbone, 2 pSp, 3 HyperStyle, 4 ArcFace, 5 invert + losses, 6 loaders.
Not here: the generator G and its weight_deltas plumbing (stylegan2.py), the VGG19 perceptual loss
(passed in as a callable), the FC-TFG losses of Eq. (3)-(9) and the training steps (stages.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import files
import stylegan2_ops as ops
# equalised-lr linear (keys weight [out, in], bias [out]) as pSp/HyperStyle use
from stylegan2 import EqualLinear

# Constructor kwargs of the three networks, per preset. `paper` reproduces the published sizes (pSp
# and ArcFace on IR-SE50, HyperStyle on ResNet-34, 256 px, 14 w codes of width 512); `tiny` is the
# same architecture shrunk so that a CPU trains it in minutes at 64 px with 10 w codes of width 128.
PRESETS = {
    "paper": dict(
        psp=dict(size=256, n_latent=14, style_dim=512, units=(3, 4, 14, 3),
                 widths=(64, 128, 256, 512)),
        hyperstyle=dict(size=256, blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), shared_inner=128,
                        other_inner=256),
        arcface=dict(face_size=112, emb_dim=512, units=(3, 4, 14, 3), widths=(64, 128, 256, 512),
                     drop=0.6),
    ),
    "tiny": dict(
        psp=dict(size=64, n_latent=10, style_dim=128, units=(1, 1, 2, 1), widths=(16, 32, 48, 64)),
        hyperstyle=dict(size=64, blocks=(1, 1, 1, 1), widths=(16, 32, 48, 64), shared_inner=32,
                        other_inner=32),
        arcface=dict(face_size=32, emb_dim=64, units=(1, 1, 1, 1), widths=(16, 32, 48, 64),
                     drop=0.0),
    ),
}


# ==== 1. IR-SE backbone (InsightFace IR-SE50 as in pSp's encoders/helpers.py, model_irse.py) =====
# Shared by the pSp encoder and ArcFace.

class SEModule(nn.Module):
    """Squeeze-and-excitation: rescale each channel by a gate computed from the global average.
    Two 1x1 convs without bias (keys fc1, fc2) around a C/16 bottleneck."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(1, channels // reduction)  # tiny widths (16 ch) still get one hidden unit
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H, W]
        g = x.mean((2, 3), keepdim=True)                     # squeeze: [B, C, 1, 1]
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g))))     # excite: a gate in (0, 1) per channel
        return x * g


class BottleneckIRSE(nn.Module):
    """One `bottleneck_IR_SE` unit: pre-activation residual branch BN-conv-PReLU-conv-BN-SE, the
    stride sits on the *second* conv; no activation after the sum (that is the "IR", improved
    residual, part)."""

    def __init__(self, in_c, out_c, stride):
        super().__init__()
        if in_c == out_c:
            # Parameter-free shortcut: a 1x1 max-pool with stride s just keeps every s-th pixel.
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False),
                                                nn.BatchNorm2d(out_c))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_c),
            nn.Conv2d(in_c, out_c, 3, 1, 1, bias=False),
            nn.PReLU(out_c),
            nn.Conv2d(out_c, out_c, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_c),
            SEModule(out_c),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_se_layers(units, widths):
    """Build (input_layer, body) of an IR-SE network. The two Sequentials are returned separately
    and assigned as attributes by the caller so state-dict keys read `input_layer.*` and `body.N.*`,
    exactly the InsightFace/pSp names. IR-SE50: units (3, 4, 14, 3), widths (64, 128, 256, 512);
    every stage halves the resolution in its first unit, so the body divides H and W by 16."""
    if len(units) != 4 or len(widths) != 4:
        raise ValueError(f"IR-SE needs 4 stages; got units={units}, widths={widths}")
    input_layer = nn.Sequential(
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
        nn.PReLU(widths[0]))
    body, in_c = [], widths[0]
    for n, out_c in zip(units, widths):
        for i in range(n):
            body.append(BottleneckIRSE(in_c, out_c, stride=2 if i == 0 else 1))
            in_c = out_c
    return input_layer, nn.Sequential(*body)


def conv_tower(channels, strides):
    """3x3 convs (pad 1, bias) channels[i] -> channels[i+1] at strides[i], each followed by
    LeakyReLU with PyTorch's default slope 0.01, as in pSp and HyperStyle: the heads that shrink a
    feature map to 1x1."""
    layers = []
    for c_in, c_out, s in zip(channels, channels[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, s, 1), nn.LeakyReLU()]
    return nn.Sequential(*layers)


# ==== 2. pSp GradualStyleEncoder = E_inv (Richardson et al. 2021, Sec. 3; FC-TFG Sec. 3, 4.1.2) ===

class GradualStyleBlock(nn.Module):
    """map2style: log2(spatial) stride-2 3x3 convs take a feature map to 1x1, then one EqualLinear.
    One such block per w code (Fig. 3's L codes)."""

    def __init__(self, in_c, out_c, spatial):
        super().__init__()
        n = int(math.log2(spatial))
        if 2 ** n != spatial or n < 1:
            raise ValueError(f"map2style needs a power-of-two spatial size >= 2, got {spatial}")
        self.convs = conv_tower([in_c] + [out_c] * n, [2] * n)
        self.linear = EqualLinear(out_c, out_c)

    def forward(self, x):  # [B, C_feat, s, s] -> [B, C]
        return self.linear(self.convs(x).flatten(1))


class PSPEncoder(nn.Module):
    """E_inv: image -> W+ codes [B, L, C] (pSp "GradualStyleEncoder" with start_from_latent_avg).

    Three feature maps of the IR-SE body, combined top-down like an FPN, feed three groups of codes:
      coarse codes 0..2   <- c3 (deepest, size/16)  : pose, face shape (generator layers at 4-8 px)
      middle codes 3..6   <- p2 = up(c3) + lat1(c2) (size/8)  : features, expression (16-32 px)
      fine   codes 7..L-1 <- p1 = up(p2) + lat2(c1) (size/4)  : colour, texture (64 px and finer)
    pSp hard-codes the split at 3 and 7 codes. Two codes drive each generator resolution, so the
    split means "4-8 px / 16-32 px / the rest" at any output size: 3/4/7 for L=14 (256 px), 3/4/11
    for L=18 (1024 px) and 3/4/3 for the tiny L=10 (64 px) generator. We keep that meaning for
    every L.
    """

    def __init__(self,
                 size=256,                    # input resolution (H = W); a power of two >= 64
                 n_latent=14,                 # L: number of w codes = generator.n_latent (14 at
                                              # 256 px)
                 style_dim=512,               # C: width of one w code
                 units=(3, 4, 14, 3),         # IR-SE units per stage (IR-SE50)
                 widths=(64, 128, 256, 512),  # IR-SE channels per stage; widths[-1] is the FPN
                                              # width
                 split=(3, 7),                # first middle code, first fine code (pSp: 3, 7)
                 ):
        super().__init__()
        if size < 64 or size & (size - 1):
            raise ValueError(f"PSPEncoder size must be a power of two >= 64 (the feature maps, "
                             f"size/16 to size/4, are halved down to 1x1), got {size}")
        if not 0 < split[0] < split[1] < n_latent:
            raise ValueError(f"split {split} does not leave three non-empty groups in "
                             f"{n_latent} codes")
        self.size, self.n_latent, self.style_dim, self.split = size, n_latent, style_dim, tuple(
            split)
        self.checkpointing = False  # activation checkpointing per IR-SE unit (ops.checkpointed())
        self.input_layer, self.body = ir_se_layers(units, widths)
        # c1, c2, c3 unit indices
        self.taps = (units[0] + units[1] - 1, sum(units[:3]) - 1, sum(units) - 1)
        f = widths[3]
        # Lateral 1x1 convs bring c2 and c1 to the FPN width (with bias, as in pSp).
        self.latlayer1 = nn.Conv2d(widths[2], f, 1)
        self.latlayer2 = nn.Conv2d(widths[1], f, 1)
        spatial = [size // 16] * split[0] + [size // 8] * (split[1] - split[0]) + [size // 4] * (
            n_latent - split[1])
        self.styles = nn.ModuleList(GradualStyleBlock(f, style_dim, s) for s in spatial)
        # Mean w of the generator (pSp's `latent_avg`): codes are predicted as offsets from it, so
        # an untrained encoder already decodes to the average face. [L, C]; set it with
        # set_latent_avg.
        self.register_buffer("latent_avg", torch.zeros(n_latent, style_dim))

    def set_latent_avg(self, w_avg):
        """Copy the generator's mean w in: accepts [C], [1, C] (G.mean_latent) or per-code
        [L, C]."""
        w_avg = torch.as_tensor(w_avg, dtype=self.latent_avg.dtype)
        if w_avg.shape not in {(self.style_dim,), (1, self.style_dim),
                               (self.n_latent, self.style_dim)}:
            raise ValueError(f"latent_avg of shape {tuple(w_avg.shape)} does not fit codes "
                             f"[{self.n_latent}, {self.style_dim}]")
        with torch.no_grad():
            self.latent_avg.copy_(w_avg.reshape(-1, self.style_dim).expand(self.n_latent, -1))
        return self

    def forward(self, x):  # [B, 3, H, W] in [-1, 1] -> [B, L, C]
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (self.size, self.size):
            raise ValueError(f"PSPEncoder expects [B, 3, {self.size}, {self.size}], "
                             f"got {tuple(x.shape)}")
        ck = self.checkpointing  # the input layer and every unit / head: only their inputs kept
        h = ops.checkpointed(self.input_layer, x, on=ck)
        for i, unit in enumerate(self.body):
            h = ops.checkpointed(unit, h, on=ck)
            if i == self.taps[0]:
                c1 = h  # [B, widths[1], H/4, W/4]
            elif i == self.taps[1]:
                c2 = h  # [B, widths[2], H/8, W/8]
        c3 = h      # [B, widths[3], H/16, W/16]

        # FPN merge: bilinear upsample (align_corners=True, as pSp) then add
        def up_add(top, lateral):
            return F.interpolate(top, size=lateral.shape[2:], mode="bilinear",
                                 align_corners=True) + lateral

        p2 = up_add(c3, self.latlayer1(c2))
        p1 = up_add(p2, self.latlayer2(c1))
        a, b = self.split
        feats = [c3] * a + [p2] * (b - a) + [p1] * (self.n_latent - b)  # coarse, middle, fine
        codes = [ops.checkpointed(head, f, on=ck) for head, f in zip(self.styles, feats)]
        return torch.stack(codes, 1) + self.latent_avg           # [B, L, C]


# ==== 3. HyperStyle (Alaluf et al. 2022): per-layer weight offsets Delta, W' = W * (1 + Delta) ====

def layer_shapes(G):
    """One entry per G.modulated_convs(): (C_out, C_in, k) for the convs HyperStyle tunes, None for
    the ToRGB layers (the only ones without demodulation), which HyperStyle leaves alone."""
    return [(m.out_channel, m.in_channel, m.kernel_size) if m.demodulate else None
            for m in G.modulated_convs()]


class BasicBlock(nn.Module):
    """ResNet-34 basic block (torchvision key names): conv3x3-BN-ReLU-conv3x3-BN, + shortcut,
    ReLU."""

    def __init__(self, in_c, out_c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.downsample = None
        if stride != 1 or in_c != out_c:
            self.downsample = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_c))

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + skip)


class SharedWeightsHypernet(nn.Module):
    """The one projection shared by every equal-shaped layer: code z [B, Z] ->
    Delta [B, O, I, k, k]. Two factorised matmuls instead of one Z x (O*I*k*k) matrix: z -> O rows
    of width Z -> each row to I*k*k numbers. For the square 512x512x3x3 layers it is exactly
    HyperStyle's layout (w2 [Z, O*Z], w1 [Z, I*k*k]); at 256 px this module holds 136.8 M of the
    313 M hypernetwork parameters, sharing it is what keeps HyperStyle from the naive > 3 B
    (HyperStyle paper)."""

    def __init__(self, z_dim, out_c, in_c, k):
        super().__init__()
        self.shape = (out_c, in_c, k, k)
        init = lambda *s: torch.fmod(torch.randn(*s) / 40, 2)  # HyperStyle's small init
        self.w1 = nn.Parameter(init(z_dim, in_c * k * k))
        self.b1 = nn.Parameter(init(in_c * k * k))
        self.w2 = nn.Parameter(init(z_dim, out_c * z_dim))
        self.b2 = nn.Parameter(init(out_c * z_dim))

    def forward(self, z):  # [B, Z] -> [B, O, I, k, k]
        B, Z = z.shape
        h = (z @ self.w2 + self.b2).view(B, self.shape[0], Z)     # [B, O, Z]
        return (h @ self.w1 + self.b1).view(B, *self.shape)      # [B, O, I*k*k] -> [B, O, I, k, k]


class HyperRefinementBlock(nn.Module):
    """Head for a layer of the shared shape: its own conv tower -> code z, then the shared
    projection. Tower: one stride-1 conv to `inner`, then log2(spatial) stride-2 convs down to
    1x1."""

    def __init__(self, hypernet, n_channels, inner, spatial):
        super().__init__()
        m = int(math.log2(spatial))
        self.convs = conv_tower([n_channels] + [inner] * m + [n_channels], [1] + [2] * m)
        self.linear = EqualLinear(n_channels, n_channels)
        # The *same* module object sits in every shared head. state_dict() therefore lists its
        # tensors once per head, as HyperStyle's checkpoints do, while parameters() counts them
        # once.
        self.hypernet = hypernet

    def forward(self, feat):  # [B, C_feat, s, s] -> [B, O, I, k, k]
        return self.hypernet(self.linear(self.convs(feat).flatten(1)))


class RefinementBlock(nn.Module):
    """Head for a layer of any other shape: conv tower, global average, a 1x1 conv to O*I numbers,
    i.e. one offset per (output, input) channel pair, repeated over the k x k kernel taps."""

    def __init__(self, shape, n_channels, inner, spatial):
        super().__init__()
        self.out_c, self.in_c, self.k = shape
        # middle convs: one for 16 px features (as HyperStyle)
        m = max(0, int(math.log2(spatial)) - 3)
        self.convs = conv_tower([n_channels] + [inner] * (m + 1) + [n_channels], [2] * (m + 2))
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                    nn.Conv2d(n_channels, self.in_c * self.out_c, 1))

    def forward(self, feat):  # [B, C_feat, s, s] -> [B, O, I, k, k]
        d = self.output(self.convs(feat)).view(-1, self.out_c, self.in_c, 1, 1)
        return d.expand(-1, -1, -1, self.k, self.k)


class HyperStyle(nn.Module):
    """H: ([x, y_hat]) -> per-layer Delta (HyperStyle Sec. 3). x is the target frame, y_hat the
    current reconstruction; both [B, 3, H, W] in [-1, 1], concatenated to 6 channels. One refinement
    iteration:
        Delta^{t+1} = Delta^t + H([x, y_hat^t]),   y_hat^{t+1} = G(w; W * (1 + Delta^{t+1}))
    (`invert` and `hyperstyle_loss` loop it; `add` is the running sum).
    Trunk: ResNet-34 (stem conv7x7/2 + BN + PReLU, no max-pool; 3/4/6/3 basic blocks)
    -> [B, 512, H/16, W/16].
    Heads: layers whose shape equals the first tuned layer's (conv1 @ 4 px; all 512x512x3x3 convs at
    256 px) share one SharedWeightsHypernet; every other tuned layer gets its own
    RefinementBlock."""

    def __init__(self,
                 shapes,                      # layer_shapes(G): (C_out, C_in, k) or None per
                                              # modulated conv
                 size=256,                    # input resolution; the trunk output is size/16
                 blocks=(3, 4, 6, 3),         # basic blocks per ResNet stage (ResNet-34)
                 widths=(64, 128, 256, 512),  # channels per stage; the stem has widths[0]
                 shared_inner=128,            # tower width of the shared-shape heads
                 other_inner=256,             # tower width of the other heads
                 in_channels=6,               # x and y_hat stacked
                 ):
        super().__init__()
        tuned = [s for s in shapes if s is not None]
        if not tuned:
            raise ValueError("HyperStyle needs at least one tunable layer (shapes are all None)")
        if size < 64 or size & (size - 1):
            raise ValueError(f"HyperStyle size must be a power of two >= 64 (the heads halve the "
                             f"size/16 feature map down to 1x1), got {size}")
        self.size, self.shapes = size, [None if s is None else tuple(s) for s in shapes]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.PReLU(widths[0])
        body, in_c = [], widths[0]
        for stage, (n, out_c) in enumerate(zip(blocks, widths)):
            for i in range(n):
                body.append(BasicBlock(in_c, out_c, stride=2 if (i == 0 and stage > 0) else 1))
                in_c = out_c
        self.body = nn.Sequential(*body)
        self.checkpointing = False  # activation checkpointing per ResNet block (ops.checkpointed())
        feat_c, spatial = widths[3], size // 16
        self.shared_shape = tuned[0]
        self.shared_weight_hypernet = SharedWeightsHypernet(feat_c, *self.shared_shape)
        heads = []
        for s in self.shapes:
            if s is None:
                heads.append(None)
            elif s == self.shared_shape:
                heads.append(HyperRefinementBlock(self.shared_weight_hypernet, feat_c, shared_inner,
                                                  spatial))
            else:
                heads.append(RefinementBlock(s, feat_c, other_inner, spatial))
        self.refinement_blocks = nn.ModuleList(heads)

    # 2x [B, 3, H, W] -> list (one per modulated conv) of [B, O, I, k, k] or None
    def forward(self, x, y_hat):
        if x.shape != y_hat.shape or x.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"HyperStyle expects x and y_hat of shape [B, 3, {self.size}, "
                             f"{self.size}], got {tuple(x.shape)} and {tuple(y_hat.shape)}")
        feat = self.relu(self.bn1(self.conv1(torch.cat([x, y_hat], 1))))  # [B, widths[0], H/2, W/2]
        for block in self.body:  # -> [B, widths[3], H/16, W/16]
            feat = ops.checkpointed(block, feat, on=self.checkpointing)
        return [None if head is None else head(feat) for head in self.refinement_blocks]

    @staticmethod
    def add(deltas, new):
        """Running sum of per-layer deltas (None = no offset for that layer yet)."""
        return [n if d is None else (d if n is None else d + n) for d, n in zip(deltas, new)]


# ==== 4. ArcFace identity network E_id (TreB1eN/InsightFace_Pytorch head, pSp's id_loss; Eq. 5) ===

# Face crop used by pSp/HyperStyle's ID loss, in pixels of a 256 px image: rows 35:223, cols 32:220.
# It was tuned for FFHQ alignment; we scale it to other sizes proportionally.
ID_CROP_256 = (35, 223, 32, 220)


class IdentityEncoder(nn.Module):
    """E_id: face image [B, 3, H, W] in [-1, 1] (RGB, any size) -> unit-norm embedding [B, E].
    Crop the face box, average-pool to 112 px, IR-SE50 body, then the ArcFace head
    BN2d -> Dropout -> flatten -> Linear(512*7*7 -> 512) -> BN1d (affine), L2-normalise.
    As a judge (frozen=True) always frozen and in eval mode (BatchNorm running statistics, no
    dropout), even inside a parent that is put in train mode: gradients still flow to the *input*
    image, which is what Eq. (5) needs. frozen=False: the network being trained (train.py's judges
    stage, arcface_loss)."""

    def __init__(self,
                 face_size=112,               # side of the pooled face crop fed to the body
                 emb_dim=512,                 # E: embedding width
                 units=(3, 4, 14, 3),         # IR-SE units per stage (IR-SE50)
                 widths=(64, 128, 256, 512),  # IR-SE channels per stage
                 drop=0.6,                    # head dropout of the released model (inactive: eval
                                              # only)
                 frozen=True,                 # a judge (True) or a network in training (False)
                 ):
        super().__init__()
        if face_size % 16:
            raise ValueError(f"face_size must be a multiple of 16, got {face_size}")
        self.face_size = face_size
        self.checkpointing = False  # activation checkpointing per IR-SE unit (ops.checkpointed())
        self.input_layer, self.body = ir_se_layers(units, widths)
        s = face_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[3]), nn.Dropout(drop), nn.Flatten(),
            nn.Linear(widths[3] * s * s, emb_dim), nn.BatchNorm1d(emb_dim))
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    # a judge is pinned to eval: a metric must not drift with batch statistics
    def train(self, mode=True):
        return super().train(mode and not self.frozen)

    def forward(self, x):  # [B, 3, H, W] -> [B, E]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"IdentityEncoder expects [B, 3, H, W], got {tuple(x.shape)}")
        H, W = x.shape[2:]
        r0, r1, c0, c1 = ID_CROP_256
        x = x[:, :, round(r0 * H / 256):round(r1 * H / 256),
              round(c0 * W / 256):round(c1 * W / 256)]
        x = F.adaptive_avg_pool2d(x, self.face_size)           # [B, 3, 112, 112]
        h = self.input_layer(x)
        for unit in self.body:  # the judge is frozen, but Eq. (5)'s gradient flows through it to x
            h = ops.checkpointed(unit, h, on=self.checkpointing)
        f = self.output_layer(h)                               # [B, E]
        return F.normalize(f, dim=1)


def arcface_loss(emb, centres, labels, s=30.0, m=0.5):
    """The loss that trains E_id: ArcFace's additive angular margin (Deng et al., CVPR 2019, Eq. 3).
    emb [B, E] unit embeddings, centres [K, E] one learned direction per training identity
    (normalised here), labels [B] in 0..K-1. With theta_j the angle between emb and centre j, the
    logits are s cos(theta_j) for every wrong class and s cos(theta_y + m) for the true one, then
    softmax cross-entropy: a face must sit m radians closer to its own centre than a plain softmax
    would ask, which spreads identities apart on the sphere. Where theta_y + m would pass pi (cos no
    longer decreasing) the target logit continues linearly, cos(theta_y) - m sin(m), as InsightFace
    does. s: 64 for 512-d embeddings there; 30 suits our 64-d ones."""
    cos = F.linear(emb, F.normalize(centres, dim=1)).clamp(-1 + 1e-7, 1 - 1e-7)    # [B, K]
    cos_y = cos.gather(1, labels[:, None])                                          # [B, 1]
    theta_y = torch.acos(cos_y)
    target = torch.where(theta_y + m < math.pi, torch.cos(theta_y + m), cos_y - m * math.sin(m))
    return F.cross_entropy(s * cos.scatter(1, labels[:, None], target), labels)


# ==== 5. invert() and the inversion-stage losses ==================================================

def invert(G, x, E_inv, H=None, steps=5, noise_mode="const", recon=True):
    """The one call other modules use: x [B, 3, H, W] -> (ws [B, L, C], weight_deltas, recon
    [B, 3, H, W]).

    weight_deltas has one entry per G.modulated_convs() (None for ToRGB and for untuned layers),
    ready for G.synthesis(ws, weight_deltas=...). Two modes, chosen by the caller:
      - full HyperStyle (H given, steps >= 1; 5 at inference as in HyperStyle): for the *source*
        frame, whose identity details must survive, and whose Delta is computed once per video;
      - encoder codes only (H=None or steps=0; weight_deltas is all None): for the *driving* frames,
        where FC-TFG only needs the codes z_d = E_inv(x_d) (Eq. 2) and speed matters (one pass per
        frame).
    No torch.no_grad here: the paper fine-tunes the pretrained networks (Sec. 4.1.2); wrap the call
    if you want it frozen. recon=False returns None for recon and skips its render
    (FCTFG.encode_source needs only the codes and deltas)."""
    ws = E_inv(x)                                           # [B, L, C]
    if ws.shape[1] != G.n_latent:
        raise ValueError(f"encoder gives {ws.shape[1]} codes but the generator takes {G.n_latent}")
    deltas = [None] * len(G.modulated_convs())
    steps = steps if H is not None else 0
    if steps == 0:
        return ws, deltas, (G.synthesis(ws, noise_mode=noise_mode) if recon else None)
    # The renders y_hat^t that H looks at are inputs, not outputs: HyperStyle's training detaches
    # them between iterations (hyperstyle_loss), so they need no graph here either; gradients reach
    # H, E_inv and G through the summed deltas and the final render.
    with torch.no_grad():
        y_hat = G.synthesis(ws, noise_mode=noise_mode)      # y_hat^0: plain encoder inversion
    for t in range(steps):
        deltas = H.add(deltas, H(x, y_hat))
        if t < steps - 1:
            with torch.no_grad():
                y_hat = G.synthesis(ws, noise_mode=noise_mode, weight_deltas=deltas)
    return ws, deltas, (G.synthesis(ws, noise_mode=noise_mode, weight_deltas=deltas) if recon
                        else None)


LAMBDA_INV = dict(l2=1.0, lpips=0.8, id=0.1)  # face recipe of the pSp and HyperStyle READMEs


def loss_inversion(x_hat, x, E_id=None, perceptual=None):
    """Inversion-stage loss: l2 * MSE + lpips * perceptual + id * (1 - cos(E_id(x_hat), E_id(x))).
    MSE is the mean over pixels (pSp's F.mse_loss); the ID term is Eq. (5) with the target's
    embedding detached, averaged over the batch. perceptual(x_hat, x) -> scalar is passed in (the
    VGG19 LPIPS of the paper lives elsewhere); a missing network drops its term.
    Returns (total, dict of parts)."""
    parts = {"l2": F.mse_loss(x_hat, x)}
    if perceptual is not None:
        parts["lpips"] = perceptual(x_hat, x)
    if E_id is not None:
        parts["id"] = (1 - (E_id(x_hat) * E_id(x).detach()).sum(1)).mean()
    return sum(LAMBDA_INV[k] * v for k, v in parts.items()), parts


def psp_loss(E_inv, G, x, E_id=None, perceptual=None):
    """Stage 1 (pSp): encode, decode with constant noise, loss. Gradients reach E_inv (and G if it
    is not frozen; pSp trains the encoder only, so freeze G or leave it out of the optimiser)."""
    return loss_inversion(G.synthesis(E_inv(x), noise_mode="const"), x, E_id, perceptual)


def hyperstyle_loss(H, G, x, ws, steps=5, E_id=None, perceptual=None):
    """Stage 2 (HyperStyle's training loop): w is fixed (pass it from a frozen E_inv under no_grad);
    each of the `steps` iterations starts from the *detached* previous Delta and y_hat, so the
    graphs of the steps are independent and the summed loss has the same gradient as HyperStyle's
    backward() per step (at the price of keeping all graphs; call it with steps=1 in a loop if
    memory is short).
    Returns (summed total, parts of the last step, final y_hat)."""
    ws = ws.detach()
    with torch.no_grad():
        y_hat = G.synthesis(ws, noise_mode="const")
    deltas = [None] * len(G.modulated_convs())
    total = 0
    for _ in range(steps):
        deltas = H.add([None if d is None else d.detach() for d in deltas], H(x, y_hat.detach()))
        y_hat = G.synthesis(ws, noise_mode="const", weight_deltas=deltas)
        loss, parts = loss_inversion(y_hat, x, E_id, perceptual)
        total = total + loss
    return total, parts, y_hat


# ==== 6. Loaders for the published checkpoint formats (weights_only=True, strict key matching) ====

def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_arcface(path, **cfg):
    """InsightFace IR-SE50 (`model_ir_se50.pth`: a plain state dict with keys input_layer.*,
    body.N.*, output_layer.*) -> frozen IdentityEncoder. cfg overrides PRESETS['paper']['arcface'].
    A checkpoint of train.py's judges stage (the tiny judges) holds the same layout under 'e_id',
    sized by its preset."""
    sd = files.load_checkpoint(path, "ArcFace checkpoint")
    if isinstance(sd, dict) and sd.get("stage") == "judges":
        cfg, sd = {**PRESETS[sd["cfg"]["model"]]["arcface"], **cfg}, sd["e_id"]
    if not isinstance(sd, dict) or "state_dict" in sd:
        raise ValueError(f"{path}: expected a plain IR-SE50 state dict (keys input_layer.*, "
                         f"body.N.*, output_layer.*), got a "
                         f"{'wrapped checkpoint' if isinstance(sd, dict) else type(sd)}")
    E_id = IdentityEncoder(**{**PRESETS["paper"]["arcface"], **cfg})
    files.load_strict(E_id, sd, "ArcFace")
    return E_id


def _unwrap(path, what, prefix):
    ckpt = files.load_checkpoint(path, f"{what} checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: a {what} checkpoint is a dict with a 'state_dict' entry; this "
                         f"one has {sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt)}")
    sd = _strip(ckpt["state_dict"], prefix)
    if not sd:
        raise ValueError(f"{path}: no '{prefix}*' keys in state_dict; is this really a {what} "
                         f"checkpoint? first keys: {list(ckpt['state_dict'])[:3]}")
    return ckpt, sd


def _load_decoder(G, ckpt, path):
    dec = _strip(ckpt["state_dict"], "decoder.")
    if not dec:
        raise ValueError(f"{path}: no 'decoder.*' keys to load into G")
    files.load_strict(G, dec, "decoder (StyleGAN2)")


def load_psp(path, G=None, **cfg):
    """pSp checkpoint {'state_dict': encoder.* / decoder.*, 'opts', 'latent_avg'} -> PSPEncoder.
    L is read from the file (number of `styles.k` heads: 14 at 256 px, 18 at 1024 px); cfg overrides
    PRESETS['paper']['psp']. If G is given, the decoder.* weights are loaded into it as well."""
    ckpt, sd = _unwrap(path, "pSp", "encoder.")
    heads = {int(k.split(".")[1]) for k in sd if k.startswith("styles.")}
    cfg = {**PRESETS["paper"]["psp"], "n_latent": len(heads) or PRESETS["paper"]["psp"]["n_latent"],
           **cfg}
    E_inv = PSPEncoder(**cfg)
    if "latent_avg" in ckpt:  # absent when pSp was trained without start_from_latent_avg
        E_inv.set_latent_avg(ckpt["latent_avg"])
    sd = {**sd, "latent_avg": E_inv.latent_avg}  # our buffer; the file keeps it outside state_dict
    files.load_strict(E_inv, sd, "pSp encoder")
    if G is not None:
        _load_decoder(G, ckpt, path)
    return E_inv


def load_hyperstyle(path, G, **cfg):
    """HyperStyle checkpoint {'state_dict': hypernet.* / decoder.*, 'opts', 'latent_avg', ...} ->
    HyperStyle for generator G (layer shapes come from G). The shared projection appears under ten
    key paths in the file (HyperStyle registers it in every shared head); all must be present and
    equal. The decoder.* weights are loaded into G when present. cfg overrides
    PRESETS['paper']['hyperstyle']. The pSp encoder lives in its own file (load_psp)."""
    ckpt, sd = _unwrap(path, "HyperStyle", "hypernet.")
    H = HyperStyle(layer_shapes(G), **{**PRESETS["paper"]["hyperstyle"], **cfg})
    files.load_strict(H, sd, "HyperStyle")
    for name in ("w1", "b1", "w2", "b2"):
        copies = [v for k, v in sd.items() if k.endswith(f"hypernet.{name}")]
        if any(not torch.equal(c, copies[0]) for c in copies):
            raise ValueError(f"{path}: the copies of the shared hypernet tensor '{name}' differ")
    if any(k.startswith("decoder.") for k in ckpt["state_dict"]):
        _load_decoder(G, ckpt, path)
    return H
