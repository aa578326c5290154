"""Tests for fusion.py: layer choice (Sec. 4.1.2), E_can / E_m (Sec. 3.1-3.2), Eq. (1), Temporal
Fusion (Table 3), the video discriminator, and a short end-to-end overfit with every loss of
Eq. (9)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusion
import losses
import stylegan2
from fusion import CanonicalEncoder, LatentFusion, MotionEncoder, TemporalFusion, VideoDiscriminator

PAPER_LAYERS, PAPER_AUDIO = (1, 2, 3, 4, 7, 8, 9, 10), (7, 8)


def randomize_(module, std=0.3):
    """Replace every parameter by noise, so no zero-initialised layer hides a dependency."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def small_fusion(**kw):
    """Paper layer layout (L=14, layers 1,2,3,4,7,8,9,10, audio 7,8) at toy widths, float64."""
    args = dict(L=14, C=6, A=5, layers=PAPER_LAYERS, audio_layers=PAPER_AUDIO, hidden=7)
    args.update(kw)
    return LatentFusion(**args).double()


def codes(B=2, T=4, L=14, C=6, A=5):
    return (torch.randn(B, L, C, dtype=torch.float64), torch.randn(B, T, L, C, dtype=torch.float64),
            torch.randn(B, T, A, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Sec. 4.1.2 layer selection
# --------------------------------------------------------------------------------------------------

def test_w_indices_follow_the_stylegan2_index_map():
    # Hand-read from rosinality's layer order: resolution 2^r uses w(2r-5) (up-conv) and w(2r-4)
    # (conv).
    assert fusion.w_indices_at(8) == [1, 2]
    assert fusion.w_indices_at(16) == [3, 4]
    assert fusion.w_indices_at(64) == [7, 8]
    assert fusion.w_indices_at(256) == [11, 12]
    for bad in (4, 12, 0):
        with pytest.raises(ValueError, match="power of two"):
            fusion.w_indices_at(bad)


def test_paper_layers_reproduce_the_paper_and_derive_tiny():
    assert fusion.paper_layers(256) == (PAPER_LAYERS, PAPER_AUDIO)
    assert fusion.PRESETS["paper"]["layers"] == PAPER_LAYERS
    assert fusion.PRESETS["paper"]["audio_layers"] == PAPER_AUDIO
    layers, audio = fusion.paper_layers(64)
    assert (layers, audio) == ((1, 2, 3, 4, 5, 6), (3, 4))
    # the tiny preset adds w0 (the 4 px conv, where our decoder keeps the yaw; fusion docstring),
    # and train.py's tiny default says the same (its checkpoints record it) and the audio to every
    # manipulated layer (our decoder spreads the mouth over them)
    assert fusion.PRESETS["tiny"]["layers"] == (0,) + layers == fusion.PRESETS["tiny"][
        "audio_layers"]
    import train
    for name in ("tiny", "paper"):
        for key in ("layers", "audio_layers"):
            assert fusion.parse_layers(train.PRESETS[name][key]) == fusion.PRESETS[name][key]
    assert fusion.parse_layers("1, 2") == (1, 2)
    with pytest.raises(ValueError, match="comma-separated"):
        fusion.parse_layers("1;2")
    # every manipulated index is a real w index of the tiny generator (10 codes)
    assert max(layers) < stylegan2.Generator(
        **stylegan2.PRESETS["tiny"]).n_latent == fusion.PRESETS["tiny"]["L"]
    with pytest.raises(ValueError):
        fusion.paper_layers(48)


def test_presets_match_the_other_modules():
    assert fusion.PRESETS["paper"]["C"] == stylegan2.PRESETS["paper"]["style_dim"]
    assert fusion.PRESETS["tiny"]["C"] == stylegan2.PRESETS["tiny"]["style_dim"]
    audio = pytest.importorskip("audio")
    for name in ("paper", "tiny"):
        E_a = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS[name])
        assert E_a.out_dim == fusion.PRESETS[name]["A"], name


# --------------------------------------------------------------------------------------------------
# E_can, E_m: architecture against a hand-written formula, per-layer independence
# --------------------------------------------------------------------------------------------------

def lrelu(x):
    return torch.where(x > 0, x, 0.2 * x)


@pytest.mark.parametrize("skip", [False, True])
def test_canonical_encoder_is_a_per_layer_2_layer_mlp(skip):
    """skip=False: the paper's plain MLP(z); skip=True (--canonical residual): z + MLP(z), and the
    identity map at init (zero last layer)."""
    E = CanonicalEncoder(L=14, C=6, layers=PAPER_LAYERS, hidden=7, skip=skip).double()
    z_s = torch.randn(3, 14, 6, dtype=torch.float64)
    if skip:
        torch.testing.assert_close(E(z_s), z_s, rtol=0, atol=0)
    E = randomize_(E)
    out = E(z_s)
    for l in range(14):
        if l in PAPER_LAYERS:
            m = E.mlps[str(l)]
            W1, b1, W2, b2 = m[0].weight, m[0].bias, m[2].weight, m[2].bias
            want = (z_s[:, l] if skip else 0) + lrelu(z_s[:, l] @ W1.T + b1) @ W2.T + b2  # Sec. 3.1
        else:
            want = z_s[:, l]
        torch.testing.assert_close(out[:, l], want)


def test_motion_encoder_is_a_per_layer_3_layer_mlp_on_audio_concat_driving():
    E = randomize_(MotionEncoder(L=14, C=6, A=5, layers=PAPER_LAYERS, audio_layers=PAPER_AUDIO,
                                 hidden=7).double())
    _, z_d, z_a = codes()
    out = E(z_d, z_a)
    for l in range(14):
        if l not in PAPER_LAYERS:
            assert (out[:, :, l] == 0).all()
            continue
        # Eq. (2): E_a ⊕ E_inv
        x = torch.cat([z_a, z_d[:, :, l]], -1) if l in PAPER_AUDIO else z_d[:, :, l]
        m = E.mlps[str(l)]
        h = lrelu(x @ m[0].weight.T + m[0].bias)
        h = lrelu(h @ m[2].weight.T + m[2].bias)
        torch.testing.assert_close(out[:, :, l], h @ m[4].weight.T + m[4].bias)


def test_per_layer_weights_are_independent():
    F_ = randomize_(small_fusion())
    z_s, z_d, z_a = codes()
    before = F_(z_s, z_d, z_a)
    with torch.no_grad():  # change only layer 7's MLPs
        for p in list(F_.E_can.mlps["7"].parameters()) + list(F_.E_m.mlps["7"].parameters()):
            p.add_(1.0)
    after = F_(z_s, z_d, z_a)
    for key in ("z_sc", "z_cd", "z_sd"):
        torch.testing.assert_close(after[key][:, :, 1], before[key][:, :, 1], rtol=0, atol=0)
        torch.testing.assert_close(after[key][:, :, 8], before[key][:, :, 8], rtol=0, atol=0)
        assert (after[key][:, :, 7] - before[key][:, :, 7]).abs().max() > 1e-3, key


def test_audio_changes_only_the_audio_layers():
    F_ = randomize_(small_fusion())
    z_s, z_d, z_a = codes()
    a = F_(z_s, z_d, z_a)
    b = F_(z_s, z_d, torch.randn_like(z_a))
    for key in ("z_cd", "z_sd"):
        diff = (a[key] - b[key]).abs().amax(dim=(0, 1, 3))          # [L]
        assert (diff[list(PAPER_AUDIO)] > 1e-3).all(), (key, diff)
        others = [l for l in range(14) if l not in PAPER_AUDIO]
        assert (diff[others] == 0).all(), (key, diff)
    torch.testing.assert_close(a["z_sc"], b["z_sc"], rtol=0, atol=0)  # E_can never sees audio


@pytest.mark.parametrize("temporal", ["conv", "lstm", "none"])
def test_untouched_layers_keep_the_source_code_and_eq1_holds(temporal):
    F_ = randomize_(small_fusion(temporal=temporal))
    z_s, z_d, z_a = codes()
    out = F_(z_s, z_d, z_a)
    for key in ("z_sc", "z_cd", "z_sd_raw", "z_sd"):
        assert out[key].shape == z_d.shape, key
    untouched = [l for l in range(14) if l not in PAPER_LAYERS]
    src = z_s[:, None, untouched].expand(-1, z_d.shape[1], -1, -1)
    for key in ("z_sc", "z_sd_raw", "z_sd"):
        torch.testing.assert_close(out[key][:, :, untouched], src, rtol=0, atol=0)
    assert (out["z_cd"][:, :, untouched] == 0).all()
    torch.testing.assert_close(out["z_sd_raw"], out["z_sc"] + out["z_cd"])   # Eq. (1)
    if temporal == "none":
        torch.testing.assert_close(out["z_sd"], out["z_sd_raw"])
    # the canonical code does not depend on time: one per source image
    assert (out["z_sc"] == out["z_sc"][:, :1]).all()


@pytest.mark.parametrize("temporal", ["conv", "lstm", "none"])
def test_fresh_temporal_fusion_is_the_identity(temporal):
    # Temporal Fusion starts as the identity (conv: centre tap I; LSTM: zero residual), so a fresh
    # network renders exactly Eq. (1), z_s->d = z_s->c + z_c->d
    F_ = small_fusion(temporal=temporal)
    z_s, z_d, z_a = codes()
    out = F_(z_s, z_d, z_a)
    torch.testing.assert_close(out["z_sd"], out["z_sd_raw"], rtol=0, atol=1e-12)


def test_fresh_motion_code_depends_on_the_driving_frame():
    # PyTorch's default init (not zero: Eq. (3)'s dead zone at z_c->d = 0, MotionEncoder)
    torch.manual_seed(0)
    F_ = small_fusion()
    z_s, z_d, z_a = codes()
    out = F_(z_s, z_d, z_a)
    moved = (out["z_cd"] != 0).any(-1)                      # [B, T, L]: which w vectors got motion
    assert moved[..., list(F_.layers)].all() and not moved[..., [l for l in range(F_.L)
                                                                 if l not in F_.layers]].any()
    z_d2 = z_d.clone()
    z_d2[:, 1] += 1.0                               # another driving frame 1: only its code changes
    out2 = F_(z_s, z_d2, z_a)
    assert not torch.allclose(out2["z_cd"][:, 1], out["z_cd"][:, 1])
    torch.testing.assert_close(out2["z_cd"][:, 0], out["z_cd"][:, 0])


def test_gradients_reach_every_parameter():
    F_ = randomize_(small_fusion())
    z_s, z_d, z_a = codes()
    z_s.requires_grad_(True)
    out = F_(z_s, z_d, z_a)
    (out["z_sd"].pow(2).sum() + out["z_sc"].sum()).backward()
    for name, p in F_.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(z_s.grad).all()


def test_bad_inputs_raise():
    F_ = small_fusion()
    z_s, z_d, z_a = codes()
    with pytest.raises(ValueError, match="z_s"):
        F_(z_s[:, :13], z_d, z_a)
    with pytest.raises(ValueError, match="z_a"):
        F_(z_s, z_d, z_a[:, :3])
    with pytest.raises(ValueError, match="z_a"):
        F_(z_s, z_d, torch.randn(2, 4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="subset"):
        LatentFusion(L=14, C=6, A=5, layers=(1, 2), audio_layers=(7,))
    with pytest.raises(ValueError, match="w indices"):
        LatentFusion(L=10, C=6, A=5, layers=(1, 12), audio_layers=())
    with pytest.raises(ValueError, match="mode"):
        LatentFusion(L=14, C=6, A=5, temporal="gru")


# --------------------------------------------------------------------------------------------------
# Temporal Fusion (Sec. 3.2, 4.4.2, Table 3)
# --------------------------------------------------------------------------------------------------

def naive_grouped_conv_replicate(z, weight, bias, k):
    """Frame loop: y[t, g] = b_g + Σ_j W_g[:, :, j] @ z[clamp(t + j - k//2), g], with W_g the g-th C
    x C block of the grouped Conv1d weight [n*C, C, k]."""
    B, T, n, C = z.shape
    y = torch.zeros_like(z)
    for t in range(T):
        for g in range(n):
            acc = bias[g * C:(g + 1) * C].clone().expand(B, C).clone()
            for j in range(k):
                s = min(max(t + j - k // 2, 0), T - 1)     # replicate padding at the window borders
                acc = acc + z[:, s, g] @ weight[g * C:(g + 1) * C, :, j].T
            y[:, t, g] = acc
    return y


def test_temporal_conv_matches_a_naive_frame_loop():
    tf = randomize_(TemporalFusion(n_layers=3, C=4, mode="conv", kernel_size=5).double())
    z = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(tf(z), naive_grouped_conv_replicate(z, tf.conv.weight, tf.conv.bias,
                                                                   5))


@pytest.mark.parametrize("mode", ["conv", "lstm", "none"])
def test_temporal_is_identity_at_init(mode):
    z = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(TemporalFusion(3, 4, mode)(z), z, rtol=0, atol=1e-6)


def test_temporal_conv_parameter_count_is_grouped_per_layer():
    tf = TemporalFusion(n_layers=8, C=512, mode="conv", kernel_size=3)
    assert sum(p.numel() for p in tf.parameters()) == 8 * 512 * 512 * 3 + 8 * 512   # 6,295,552


@pytest.mark.parametrize("mode", ["conv", "lstm"])
def test_temporal_output_depends_only_on_frames_of_its_window(mode):
    tf = randomize_(TemporalFusion(2, 3, mode, kernel_size=3, window=4).double())
    T = 10                                         # windows [0..3], [4..7], [8, 9] (short last one)
    z = torch.randn(1, T, 2, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(tf, z)          # [1, T, 2, 3, 1, T, 2, 3]
    dep = jac.abs().sum(dim=(0, 2, 3, 4, 6, 7)) > 0          # dep[t_out, t_in]
    win = torch.arange(T) // 4
    same = win[:, None] == win[None, :]
    assert not dep[~same].any(), "a frame sees another window"
    if mode == "conv":  # kernel 3: t sees t-1, t, t+1 inside its window
        near = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs() <= 1
        assert dep[same & near].all() and not dep[same & ~near].any()
    else:               # LSTM is causal inside the window
        causal = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
        assert dep[same & causal].all() and not dep[same & ~causal].any()
    # a window processed on its own gives the same frames as inside the long clip
    torch.testing.assert_close(tf(z)[:, 4:8], tf(z[:, 4:8]))


def test_temporal_conv_border_padding_repeats_the_edge_frame():
    tf = randomize_(TemporalFusion(2, 3, "conv", kernel_size=5).double())
    frame = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    z = frame.expand(1, 6, 2, 3)                             # a still clip
    y = tf(z)
    # replicate padding: every output frame (borders included) is the same; zero padding would
    # differ
    torch.testing.assert_close(y, y[:, :1].expand_as(y))
    # the first output frame equals the conv applied to [z0, z0, z0, z1, z2]
    z2 = torch.randn(1, 6, 2, 3, dtype=torch.float64)
    x = torch.cat([z2[:, :1], z2[:, :1], z2[:, :3]], 1)     # frames -2, -1 -> frame 0
    want = tf.conv(x.reshape(1, 5, 6).transpose(1, 2)).transpose(1, 2).reshape(1, 1, 2, 3)
    torch.testing.assert_close(tf(z2)[:, :1], want)


def test_temporal_bad_arguments_raise():
    with pytest.raises(ValueError, match="odd"):
        TemporalFusion(2, 3, "conv", kernel_size=4)
    with pytest.raises(ValueError, match="window"):
        TemporalFusion(2, 3, "conv", window=0)
    with pytest.raises(ValueError, match=r"\[B, T, 2, 3\]"):
        TemporalFusion(2, 3, "lstm")(torch.randn(1, 4, 3, 3))


# --------------------------------------------------------------------------------------------------
# Video discriminator (Sec. 4.4.2, Table 3)
# --------------------------------------------------------------------------------------------------

def tiny_d_kwargs():
    p = stylegan2.PRESETS["tiny"]
    return dict(size=p["size"], channel_multiplier=p["channel_multiplier"], channels=p["channels"])


def test_video_discriminator_on_a_still_clip_equals_the_image_discriminator():
    kw = tiny_d_kwargs()
    D_img = randomize_(stylegan2.Discriminator(**kw), std=1.0)
    D_vid = VideoDiscriminator(T=5, **kw)
    D_vid.init_from_image_discriminator(D_img)
    frames = torch.rand(4, 1, 3, kw["size"], kw["size"]) * 2 - 1
    clip = frames.expand(4, 5, 3, kw["size"], kw["size"])
    with torch.no_grad():
        want = D_img(frames[:, 0])
        got = D_vid(clip)
    assert got.shape == (4, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ...and it is not blind to motion: a clip with different frames scores differently
    moving = torch.rand(4, 5, 3, kw["size"], kw["size"]) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(D_vid(moving), D_img(moving[:, 0]), atol=1e-3)


def test_video_discriminator_rejects_bad_input():
    kw = tiny_d_kwargs()
    D_vid = VideoDiscriminator(T=5, **kw)
    with pytest.raises(ValueError, match="VideoDiscriminator"):
        D_vid(torch.randn(4, 3, 3, kw["size"], kw["size"]))
    with pytest.raises(ValueError, match="3-channel"):
        D_vid.init_from_image_discriminator(stylegan2.Discriminator(**kw, in_channels=6))


# --------------------------------------------------------------------------------------------------
# End to end: 20 Adam steps of the tiny fusion network on one fixed batch, every term of Eq. (9)
# --------------------------------------------------------------------------------------------------

class ToyIdentity(torch.nn.Module):
    """Stand-in for ArcFace: a fixed random conv net -> unit vectors."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 16, 4, 4),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.requires_grad_(False)

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class ToyDecoder(torch.nn.Module):
    """Stand-in for G on 2 CPU cores: codes [N, L, C] -> images [N, 3, 64, 64] in (-1, 1). A fixed
    random linear map to 16x16 then 4x nearest upsampling; like G it sees every w index. (The real
    tiny G costs seconds per step on a loaded 2-core machine; its wiring to these losses is the job
    of train.py.)"""

    def __init__(self, L, C):
        super().__init__()
        self.lin = torch.nn.Linear(L * C, 3 * 16 * 16)
        self.requires_grad_(False)

    def forward(self, w):
        x = torch.tanh(self.lin(w.flatten(1))).view(-1, 3, 16, 16)
        return F.interpolate(x, scale_factor=4, mode="nearest")


def test_twenty_step_overfit_lowers_the_total_loss():
    audio = pytest.importorskip("audio")
    torch.manual_seed(0)
    net = LatentFusion.from_preset("tiny")
    B, T, L, C = 1, 5, net.L, net.C
    G = ToyDecoder(L, C)
    # cheap stand-in image D
    D = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.LeakyReLU(0.2),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 1)).requires_grad_(False)
    syncnet = audio.SyncNet(**audio.PRESETS["tiny"]).eval().requires_grad_(False)
    E_a = audio.AudioEncoder(**audio.AUDIO_ENCODER_PRESETS["tiny"]).eval().requires_grad_(False)
    vgg = losses.VGG19Features(base=8)                              # narrower than "tiny": CPU time
    E_id = ToyIdentity()
    with torch.no_grad():
        z_s = torch.randn(B, L, C)                                      # source codes [B, L, C]
        z_d = torch.randn(B, T, L, C)                                   # driving codes [B, T, L, C]
        x_d = G(z_d.flatten(0, 1)).view(B, T, 3, 64, 64)                # driving frames = targets
        mel = torch.randn(B, 1, 80, 16)
        z_a = E_a(mel.repeat_interleave(T, 0)).view(B, T, -1)             # [B, T, A]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        out = net(z_s, z_d, z_a)
        x_g = G(out["z_sd"].flatten(0, 1)).view(B, T, 3, 64, 64)
        terms = dict(
            ortho=losses.orthogonality_loss(out["z_sc"], out["z_cd"], layers=net.layers),
            sync=losses.sync_loss(syncnet, x_g, mel),
            id=losses.identity_loss(E_id, x_g, x_d),
            rec=losses.reconstruction_loss(x_g, x_d),
            lpips=losses.perceptual_loss(vgg, x_g, x_d),
            gan=losses.gan_loss_g(D(x_g.flatten(0, 1))))
        total, logs = losses.total_loss(terms)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(logs)
    totals = [h["total"] for h in history]
    assert all(v == v and abs(v) < 1e6 for v in totals), totals
    assert totals[-1] < 0.9 * totals[0], totals
    assert history[-1]["rec"] < history[0]["rec"], (history[0], history[-1])


def test_generate_continuous_is_one_window_and_paper_mode_is_per_window():
    """FCTFG.generate in chunks: continuous (each chunk with its halo) == the temporal layer over
    the whole clip as one window; continuous=False == each 5-frame window fused alone (the paper's
    mode, Sec. 4.4.2); the two differ only near window borders for the conv (it reads one frame on
    each side)."""
    torch.manual_seed(0)
    m = fusion.FCTFG("tiny", window=5).eval()
    with torch.no_grad():
        for mlp in m.fusion.E_m.mlps.values():
            torch.nn.init.normal_(mlp[-1].weight, std=0.05)
        m.fusion.temporal.conv.weight.add_(0.05 * torch.randn_like(m.fusion.temporal.conv.weight))
        x_s, x_d, mel = torch.rand(3, 64, 64) * 2 - 1, torch.rand(
            13, 3, 64, 64) * 2 - 1, torch.randn(13, 1, 80, 16)
        z_s, deltas = m.encode_source(x_s[None])
        z_d = m.E_inv(x_d)[None]
        outs = {}
        for continuous in (True, False):
            outs[continuous] = m.generate(x_s, x_d, mel, chunk=10, continuous=continuous)["z_sd"]
            with m.fusion.temporal.one_window(continuous):
                ref = m.decode(z_s, deltas, z_d, mel[None])["z_sd"][0]
            torch.testing.assert_close(outs[continuous], ref, atol=1e-5, rtol=1e-5)
    assert m.fusion.temporal.window == 5                                  # restored after each call
    moved = (outs[True] - outs[False]).abs().flatten(1).amax(1) > 1e-4    # frames that differ
    # the frames beside the two borders
    assert moved.tolist() == [t in (4, 5, 9, 10) for t in range(13)]
    assert m.fusion.temporal.halo() == (1, 1)


# ---- the deflicker (not in the paper: a temporal filter on the rendered frames, inference only) ----

def _step_clip(change, channels=(0, 1, 2)):
    """Two frames: all zeros, then `change` (on 0..1 of the [-1, 1] range) in the given channels."""
    x = torch.zeros(2, 3, 2, 2)
    x[1, list(channels)] = change
    return x


def test_deflicker_one_step_is_the_printed_gate():
    """y_1 = y_0 + a (x_1 - y_0), a = 1 - exp(-(|x_1 - y_0|_rgb / tau)^2), values derived by hand: a
    change of tau passes 1 - 1/e, a quarter of tau passes 1 - e^(-1/16), three taus pass all but
    e^-9; the gate reads the mean over RGB (a change in one channel counts a third). float32:
    1 - exp(-1/16) loses ~4 of 24 bits to cancellation, hence rtol 1e-5."""
    tau = 6.0 * 2 / 255                                           # 6 grey levels in [-1, 1] units
    for c, kept in ((tau, 1 - math.exp(-1)), (tau / 4, 1 - math.exp(-1 / 16)),
                    (3 * tau, 1 - math.exp(-9))):
        y = fusion.Deflicker(6.0)(_step_clip(c))
        assert torch.equal(y[0], torch.zeros(3, 2, 2))            # y_0 = x_0
        torch.testing.assert_close(y[1], torch.full((3, 2, 2), c * kept), rtol=1e-5, atol=0)
    y = fusion.Deflicker(6.0)(_step_clip(3 * tau, channels=(0,)))   # gate sees 3 tau / 3 = tau
    torch.testing.assert_close(y[1, 0], torch.full((2, 2), 3 * tau * (1 - math.exp(-1))), rtol=1e-5,
                               atol=0)
    assert torch.equal(y[1, 1:], torch.zeros(2, 2, 2))            # an unchanged channel stays put


def test_deflicker_keeps_a_still_clip_and_off_is_the_identity():
    x = torch.rand(1, 3, 8, 8).expand(6, -1, -1, -1)
    assert torch.equal(fusion.Deflicker()(x), x)
    x = torch.rand(6, 3, 8, 8)
    assert fusion.Deflicker(0)(x) is x


def test_deflicker_in_chunks_equals_whole_clip():
    """One frame of state carried across calls: chunks in order give exactly the whole clip's
    frames."""
    x = torch.rand(13, 3, 8, 8) * 2 - 1
    whole = fusion.Deflicker()(x)
    f = fusion.Deflicker()
    chunked = torch.cat([f(c) for c in x.split((5, 1, 7))])
    assert torch.equal(chunked, whole)
    assert (whole - x).abs().max() > 0.01                         # it did act on this noise


def test_deflicker_follows_a_slow_drift_with_the_predicted_lag():
    """A ramp of d per frame: the filter settles where what it lets through equals d, i.e. where the
    gap it sees before its update, G = lag + d, solves G (1 - exp(-(G / tau)^2)) = d; the root is
    found by scipy's brentq (the oracle). The lag stays well below tau."""
    brentq = pytest.importorskip("scipy.optimize").brentq
    tau, d = 6.0 * 2 / 255, 0.5 * 2 / 255                         # half a grey level per frame
    G = brentq(lambda G: G * (1 - math.exp(-(G / tau) ** 2)) - d, 1e-9, tau)
    x = (torch.arange(400, dtype=torch.float32) * d).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    lag = float((x - fusion.Deflicker(6.0)(x))[-1].mean())
    assert lag == pytest.approx(G - d, rel=1e-3) and lag < 0.5 * tau


@pytest.mark.parametrize("tau", [-1.0, float("nan")])
def test_deflicker_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        fusion.Deflicker(tau)
