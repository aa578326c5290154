"""Tests for stylegan2.py: shapes, parameter counts, upfirdn2d / bias_act against independent
oracles, gradients to second order, modulated-conv properties, HyperStyle weight deltas, w-index
map, loader, loss plot."""
import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
from PIL import Image
from torch.autograd import gradcheck, gradgradcheck

import files
import stylegan2 as sg
import stylegan2_ops as ops
from conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731


# --------------------------------------------------------------------------------------------------
# Architecture: parameter counts are those of rosinality/stylegan2-pytorch's model.py, not our own
# output.
# --------------------------------------------------------------------------------------------------

def test_paper_parameter_counts_match_rosinality_layout():
    G, D = sg.Generator.from_preset("paper"), sg.Discriminator.from_preset("paper")
    assert n_params(G) == 30_034_338
    assert n_params(G.style) == 2_101_248
    assert n_params(D) == 28_864_129
    assert G.n_latent == 14 and G.num_layers == 13
    assert sum(b.numel() for b in G.buffers()) == 174_928
    assert sum(b.numel() for b in D.buffers()) == 192


def test_cm1_and_tiny_parameter_counts():
    assert n_params(sg.Generator(256, channel_multiplier=1)) == 24_767_458
    assert n_params(sg.Discriminator(256, channel_multiplier=1)) == 24_001_089
    G, D = sg.Generator.from_preset("tiny"), sg.Discriminator.from_preset("tiny")
    assert (n_params(G), n_params(G.style), n_params(D)) == (1_094_520, 33_024, 1_183_137)
    assert G.n_latent == 10


def test_parameter_formulas_per_layer():
    # Styled conv: O*I*k^2 + S*I + I + 1 + O; ToRGB: 3I + S*I + I + 3 (S = style_dim).
    S, I, O = 128, 64, 32
    sc = sg.StyledConv(I, O, 3, S, upsample=True)
    assert n_params(sc) == O * I * 9 + S * I + I + 1 + O
    assert n_params(sg.ToRGB(I, S)) == 3 * I + S * I + I + 3
    assert n_params(sg.ResBlock(I, O)) == 9 * I * I + I + 9 * I * O + O + I * O


def test_published_key_names_and_shapes():
    sd = sg.Generator.from_preset("paper").state_dict()
    expect = {"style.1.weight": (512, 512), "style.8.bias": (512,), "input.input": (1, 512, 4, 4),
              "conv1.conv.weight": (1, 512, 512, 3, 3), "conv1.conv.modulation.weight": (512, 512),
              "conv1.noise.weight": (1,), "conv1.activate.bias": (512,),
              "to_rgb1.bias": (1, 3, 1, 1), "to_rgb1.conv.weight": (1, 3, 512, 1, 1),
              "convs.0.conv.blur.kernel": (4, 4), "convs.11.conv.weight": (1, 128, 128, 3, 3),
              "to_rgbs.5.upsample.kernel": (4, 4), "convs.6.conv.weight": (1, 512, 512, 3, 3),
              "noises.noise_12": (1, 1, 256, 256), "noises.noise_0": (1, 1, 4, 4)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("style.0") for k in sd)
    assert float(sd["convs.0.conv.blur.kernel"].sum()) == pytest.approx(4.0)
    dsd = sg.Discriminator.from_preset("paper").state_dict()
    expect_d = {"convs.0.0.weight": (128, 3, 1, 1), "convs.0.1.bias": (128,),
                "convs.1.conv1.0.weight": (128, 128, 3, 3), "convs.1.conv2.0.kernel": (4, 4),
                "convs.1.conv2.1.weight": (256, 128, 3, 3), "convs.1.conv2.2.bias": (256,),
                "convs.1.skip.0.kernel": (4, 4), "convs.1.skip.1.weight": (256, 128, 1, 1),
                "final_conv.0.weight": (512, 513, 3, 3), "final_linear.0.weight": (512, 8192),
                "final_linear.1.weight": (1, 512)}
    for k, shape in expect_d.items():
        assert tuple(dsd[k].shape) == shape, k
    assert float(dsd["convs.1.conv2.0.kernel"].sum()) == pytest.approx(1.0)
    assert "convs.1.skip.1.bias" not in dsd


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128])
def test_shapes_at_every_resolution(size):
    ch = {r: 16 for r in (4, 8, 16, 32, 64, 128)}
    G = sg.Generator(size, style_dim=32, n_mlp=2, channels=ch)
    D = sg.Discriminator(size, channels=ch)
    assert G.n_latent == 2 * int(math.log2(size)) - 2
    ws = torch.randn(2, G.n_latent, 32)
    img = G.synthesis(ws)
    assert img.shape == (2, 3, size, size)
    assert D(img).shape == (2, 1)
    assert len(G.modulated_convs()) == 2 + 3 * (int(math.log2(size)) - 2)


def test_tiny_preset_shapes_and_video_discriminator():
    G = sg.Generator.from_preset("tiny")
    img = G.sample(torch.randn(4, 128))
    assert img.shape == (4, 3, 64, 64) and torch.isfinite(img).all()
    Dv = sg.Discriminator.from_preset("tiny", in_channels=3 * 5)
    assert Dv(torch.randn(4, 15, 64, 64)).shape == (4, 1)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="power of two"):
        sg.Generator(100)
    G = sg.Generator(16, style_dim=8, n_mlp=1, channels={4: 4, 8: 4, 16: 4})
    with pytest.raises(ValueError, match="want ws"):
        G.synthesis(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(torch.randn(1, 6, 8), noise_mode="fresh")
    with pytest.raises(ValueError, match="modulated convs"):
        G.synthesis(torch.randn(1, 6, 8), weight_deltas=[None])
    with pytest.raises(ValueError, match="want"):
        sg.Discriminator(16, channels={4: 4, 8: 4, 16: 4})(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        sg.minibatch_stddev(torch.randn(6, 2, 4, 4), 4)


# --------------------------------------------------------------------------------------------------
# upfirdn2d against scipy.signal.upfirdn (separable) and a direct numpy loop (non-separable)
# --------------------------------------------------------------------------------------------------

def _scipy_axis(x, f1, up, down, p0, p1, axis):
    """scipy oracle: Y = scipy.signal.upfirdn(f1, x, up) is the full convolution of the
    zero-stuffed signal; out[n] = Y[n*down + K - 1 - p0], zero outside Y."""
    L, K = x.shape[axis], len(f1)
    n_out = (L * up + p0 + p1 - K + down) // down
    Y = scipy.signal.upfirdn(f1, x, up, 1, axis=axis)
    idx = np.arange(n_out) * down + K - 1 - p0
    valid = (idx >= 0) & (idx < Y.shape[axis])
    out = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1:])
    sl = [slice(None)] * x.ndim
    sl[axis] = np.nonzero(valid)[0]
    take = np.take(Y, idx[valid], axis=axis)
    out[tuple(sl)] = take
    return out


def _numpy_direct(x, f, up, down, pad):
    """Literal definition: stuff zeros, pad/crop, true 2-D convolution, decimate (loops)."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, pad
    C, H, W = x.shape
    z = np.zeros((C, H * uy, W * ux))
    z[:, ::uy, ::ux] = x
    z = np.pad(z, ((0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    z = z[:, max(-py0, 0):z.shape[1] - max(-py1, 0), max(-px0, 0):z.shape[2] - max(-px1, 0)]
    KH, KW = f.shape
    oh, ow = z.shape[1] - KH + 1, z.shape[2] - KW + 1
    out = np.zeros((C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            # true convolution: out[i,j] = sum_{a,b} z[i+a, j+b] * f[KH-1-a, KW-1-b]
            out[:, i, j] = (z[:, i:i + KH, j:j + KW] * f[::-1, ::-1]).sum((1, 2))
    return out[:, ::dy, ::dx]


SEPARABLE_CASES = list(itertools.product(
    [1, 2, 3], [1, 2], [(0, 0), (2, 1), (1, 2), (-1, 2), (3, -2)],
    [[1, 3, 3, 1], [1, 2, 5], [2.0, -1.0]]))


@pytest.mark.parametrize("up,down,pads,f1", SEPARABLE_CASES)
def test_upfirdn2d_matches_scipy_separable(up, down, pads, f1):
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 9))
    f1 = np.asarray(f1, dtype=np.float64)
    px, py = pads, (pads[1], pads[0])  # use different pads on the two axes
    n_w = (9 * up + sum(px) - len(f1) + down) // down
    n_h = (7 * up + sum(py) - len(f1) + down) // down
    if n_w < 1 or n_h < 1:
        pytest.skip("empty output for this combination")
    ref = _scipy_axis(_scipy_axis(x, f1, up, down, *px, axis=3), f1, up, down, *py, axis=2)
    got = ops.upfirdn2d(torch.from_numpy(x), torch.from_numpy(np.outer(f1, f1)), up=up, down=down,
                       pad=(*px, *py), impl="ref")
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("up,down,pad", [((1, 1), (1, 1), (1, 1, 1, 1)),
                                         ((2, 1), (1, 2), (2, 0, -1, 1)),
                                         ((3, 2), (2, 1), (0, 2, 1, 1)),
                                         ((1, 1), (2, 2), (-1, 1, 2, -1))])
def test_upfirdn2d_matches_direct_loop_nonseparable(up, down, pad):
    rng = np.random.default_rng(2)
    # asymmetric: checks the flip
    x, f = rng.standard_normal((3, 6, 5)), rng.standard_normal((3, 4))
    ref = _numpy_direct(x, f, up, down, pad)
    got = ops.upfirdn2d(torch.from_numpy(x)[None], torch.from_numpy(f), up=up, down=down, pad=pad,
                        impl="ref")
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-12)


def test_upfirdn2d_errors():
    x, f = torch.randn(1, 1, 4, 4), torch.ones(3, 3)
    with pytest.raises(ValueError, match="pad"):
        ops.upfirdn2d(x, f, pad=(1, 1))
    with pytest.raises(ValueError, match="empty"):
        ops.upfirdn2d(x, f, pad=(-3, -3, 0, 0))
    with pytest.raises(ValueError, match="up/down"):
        ops.upfirdn2d(x, f, up=0)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        ops.upfirdn2d(x, f, impl="cuda")


GRAD_CASES = [((2, 2), (1, 1), (2, 1, 2, 1)), ((1, 1), (2, 2), (1, 1, 1, 1)),
              ((1, 1), (2, 2), (2, 2, 2, 2)), ((3, 3), (2, 2), (1, 0, 1, 0)),
              ((2, 1), (1, 2), (-1, 2, 0, 1))]


@pytest.mark.parametrize("up,down,pad", GRAD_CASES)
def test_upfirdn2d_function_gradients_to_second_order(up, down, pad):
    """The custom autograd Function (used by the CUDA path) with the reference kernel plugged in:
    its hand-derived backward must pass gradcheck and gradgradcheck, and equal native autograd."""
    x = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(4, 3, dtype=torch.float64)
    fn = lambda t: ops._UpFirDn2d.apply(t, f, up, down, pad, ops._upfirdn2d_ref)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
    ref = lambda t: ops._upfirdn2d_ref(t, f, up, down, pad)  # noqa: E731
    gy = torch.randn_like(ref(x))
    g1 = torch.autograd.grad(fn(x), x, gy)[0]
    g2 = torch.autograd.grad(ref(x), x, gy)[0]
    torch.testing.assert_close(g1, g2)


def test_upfirdn2d_reference_gradients():
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    f = ops.make_kernel(gain=4).double()
    fn = lambda t: ops.upfirdn2d(t, f, up=2, pad=(2, 1, 2, 1), impl="ref")  # noqa: E731
    assert gradcheck(fn, (x,)) and gradgradcheck(fn, (x,))


def test_resampling_kernels_keep_constants():
    """Up kernels sum to 4 and down kernels to 1, so a constant image stays constant (interior)."""
    x = torch.full((1, 1, 8, 8), 3.0)
    up = sg.Upsample()(x)
    assert up.shape == (1, 1, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full((1, 1, 12, 12), 3.0))
    blur = sg.Blur((1, 1))(x)
    assert blur.shape == (1, 1, 7, 7)  # 8 + 1 + 1 - 4 + 1
    torch.testing.assert_close(blur[..., 1:-1, 1:-1], torch.full((1, 1, 5, 5), 3.0))


# --------------------------------------------------------------------------------------------------
# bias_act
# --------------------------------------------------------------------------------------------------

def test_bias_act_reference_values():
    x = torch.tensor([[-2.0, 0.5], [1.0, -0.1]]).view(1, 2, 2, 1)
    b = torch.tensor([1.0, -1.0])
    want = torch.tensor([[-1.0 * 0.2, 1.5], [0.0 * 0.2, -1.1 * 0.2]]).view(
        1, 2, 2, 1) * math.sqrt(2)
    torch.testing.assert_close(ops.bias_act(x, b), want)
    torch.testing.assert_close(ops.bias_act(x, b, act="linear"), x + b.view(1, 2, 1, 1))
    with pytest.raises(ValueError, match="does not match"):
        ops.bias_act(x, torch.zeros(3))
    with pytest.raises(ValueError, match="act must be"):
        ops.bias_act(x, b, act="relu")


def test_bias_act_function_gradients_to_second_order():
    # keep values away from the kink at 0, where finite differences are undefined
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_(True)
    b = (0.01 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    fn = lambda t, c: ops._BiasAct.apply(t, c, 0.2, math.sqrt(2),  # noqa: E731
                                         ops._bias_act_kernel_ref)
    assert gradcheck(fn, (x, b)) and gradgradcheck(fn, (x, b))
    torch.testing.assert_close(fn(x, b), ops._bias_act_ref(x, b))


# --------------------------------------------------------------------------------------------------
# Modulated convolution
# --------------------------------------------------------------------------------------------------

def test_demodulation_gives_unit_variance():
    """StyleGAN2 Eq. (3): with i.i.d. unit-variance input, each output channel has unit variance."""
    conv = sg.ModulatedConv2d(64, 8, 3, style_dim=16)
    x = torch.randn(4, 64, 96, 96)
    with torch.no_grad():
        y = conv(x, torch.randn(4, 16) * 3)
    var = y[..., 1:-1, 1:-1].var(dim=(2, 3))  # interior: zero padding lowers the border variance
    torch.testing.assert_close(var, torch.ones_like(var), atol=0.1, rtol=0)  # ~9000 px per estimate
    assert abs(var.mean().item() - 1) < 0.02
    # without demodulation the variance follows the style's scale instead (the point of Eq. 3)
    conv.demodulate = False
    with torch.no_grad():
        assert conv(x, torch.randn(4, 16) * 3)[..., 1:-1, 1:-1].var() > 2


def _nonfused(conv, x, style):
    """The same maths without per-sample weights (NVIDIA's training form): conv(x * s, W * scale)
    * d."""
    B = x.shape[0]
    s = conv.modulation(style)                                   # [B, I]
    w = conv.weight[0] * conv.scale                              # [O, I, k, k]
    x = x * s.view(B, -1, 1, 1)
    if conv.upsample:
        out = conv.blur(torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2))
    else:
        out = torch.nn.functional.conv2d(x, w, padding=conv.kernel_size // 2)
    if conv.demodulate:
        d = torch.rsqrt((w[None] * s.view(B, 1, -1, 1, 1)).pow(2).sum([2, 3, 4]) + 1e-8)  # [B, O]
        out = out * d.view(B, -1, 1, 1)
    return out


@pytest.mark.parametrize("upsample,demod,k", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_grouped_and_nonfused_forms_agree(upsample, demod, k):
    conv = sg.ModulatedConv2d(6, 5, k, style_dim=7, demodulate=demod, upsample=upsample).double()
    x, s = torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(conv(x, s), _nonfused(conv, x, s))


def test_modulated_conv_gradgradcheck():
    conv = sg.ModulatedConv2d(2, 2, 3, style_dim=3, upsample=True).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(conv, (x, s)) and gradgradcheck(conv, (x, s))


# --------------------------------------------------------------------------------------------------
# Generator behaviour: noise, weight deltas, w-index map, mixing, truncation
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_G():
    torch.manual_seed(0)
    return sg.Generator(32, style_dim=16, n_mlp=2, channels={4: 8, 8: 8, 16: 8, 32: 8}).eval()


def test_fresh_generator_ignores_noise_and_const_is_reproducible(small_G):
    ws = torch.randn(2, small_G.n_latent, 16)
    a = small_G.synthesis(ws, noise_mode="const")
    torch.testing.assert_close(a, small_G.synthesis(ws, noise_mode="random"))  # strength init 0
    torch.testing.assert_close(a, small_G.synthesis(ws, noise_mode="none"))
    with torch.no_grad():
        small_G.conv1.noise.weight.fill_(0.5)
    try:
        b1, b2 = small_G.synthesis(ws, noise_mode="const"), small_G.synthesis(ws,
                                                                              noise_mode="const")
        torch.testing.assert_close(b1, b2)
        assert not torch.allclose(b1, small_G.synthesis(ws, noise_mode="random"))
    finally:
        with torch.no_grad():
            small_G.conv1.noise.weight.zero_()


def _record_layer_outputs(G, fn, part=lambda m: m):
    """Outputs of part(m) for every modulated conv m of G during fn(), in call order."""
    outs, hooks = [], [part(m).register_forward_hook(lambda m, i, o: outs.append(
        o.detach().clone())) for m in G.modulated_convs()]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_zero_weight_deltas_are_bit_identical(small_G):
    ws = torch.randn(2, small_G.n_latent, 16)
    deltas = [torch.zeros_like(m.weight) for m in small_G.modulated_convs()]
    assert torch.equal(small_G.synthesis(ws), small_G.synthesis(ws, weight_deltas=deltas))


def test_nonzero_delta_changes_only_its_layer_onward(small_G):
    ws = torch.randn(2, small_G.n_latent, 16)
    mods = small_G.modulated_convs()
    j = 5  # convs[2] (the up-conv of the 16 px block)
    deltas = [None] * len(mods)
    deltas[j] = 0.3 * torch.randn(2, *mods[j].weight.shape[1:])  # per-sample delta [B, O, I, k, k]
    base = _record_layer_outputs(small_G, lambda: small_G.synthesis(ws))
    edit = _record_layer_outputs(small_G, lambda: small_G.synthesis(ws, weight_deltas=deltas))
    for i in range(j):
        assert torch.equal(base[i], edit[i]), i  # layers before j see identical inputs
    assert not torch.allclose(base[j], edit[j])


def test_per_source_deltas_broadcast_over_consecutive_samples_like_explicit_copies():
    """FC-TFG renders T frames per source with that source's HyperStyle deltas: a delta batch D
    dividing the sample batch B applies delta[j] to samples j*B/D .. (j+1)*B/D-1; the oracle copies
    it per sample."""
    torch.manual_seed(0)
    for up in (False, True):
        conv = sg.ModulatedConv2d(4, 6, 3, 8, upsample=up).double()
        x, style = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.randn(6, 8,
                                                                             dtype=torch.float64)
        delta = 0.2 * torch.randn(2, 6, 4, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(conv(x, style, delta),
                                   conv(x, style, delta.repeat_interleave(3, 0)),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        conv(x, style, 0.2 * torch.randn(4, 6, 4, 3, 3, dtype=torch.float64))


def test_uniform_delta_cancels_under_demodulation_but_scales_torgb(small_G):
    """Hand-derived: demodulation divides out a uniform weight scale (1+c); ToRGB does not
    demodulate, so a uniform delta on the last ToRGB scales its contribution to the image by exactly
    (1+c)."""
    ws = torch.randn(2, small_G.n_latent, 16).double()
    G = small_G.double()
    try:
        mods = G.modulated_convs()
        deltas = [None] * len(mods)
        deltas[3] = torch.full_like(mods[3].weight, 0.7)  # convs[1]: demodulated
        torch.testing.assert_close(G.synthesis(ws), G.synthesis(ws, weight_deltas=deltas))
        outs = _record_layer_outputs(G, lambda: G.synthesis(ws))
        deltas = [None] * len(mods)
        deltas[-1] = torch.full_like(mods[-1].weight, 0.5)
        diff = G.synthesis(ws, weight_deltas=deltas) - G.synthesis(ws)
        torch.testing.assert_close(diff, 0.5 * outs[-1])
    finally:
        small_G.float()


def test_w_index_map_matches_the_layer_table(small_G):
    """Perturbing w_k must change the style (modulation output) of exactly the layers rosinality's
    layer order assigns to k: 4 px conv1<-w0, to_rgb1<-w1; at 2^r: up<-w(2r-5), conv<-w(2r-4),
    rgb<-w(2r-3)."""
    G = small_G
    expected = {}  # layer position in modulated_convs() -> w index, from that table
    expected[0], expected[1] = 0, 1
    for n, r in enumerate(range(3, G.log_size + 1)):
        expected[2 + 3 * n], expected[3 + 3 * n], expected[
            4 + 3 * n] = 2 * r - 5, 2 * r - 4, 2 * r - 3
    styles = lambda ws: _record_layer_outputs(G, lambda: G.synthesis(ws),  # noqa: E731
                                              lambda m: m.modulation)
    ws = torch.randn(1, G.n_latent, 16)
    base = styles(ws)
    for k in range(G.n_latent):
        ws2 = ws.clone()
        ws2[:, k] += 1.0
        changed = {i for i, (a, b) in enumerate(zip(base, styles(ws2))) if not torch.equal(a, b)}
        assert changed == {i for i, wi in expected.items() if wi == k}, k
    assert G.w_index_of_layers() == [expected[i] for i in range(len(expected))]


def test_style_mixing_and_truncation(small_G):
    w1, w2 = torch.randn(2, 16), torch.randn(2, 16)
    ws = small_G.mix(w1, w2, 3)
    assert torch.equal(ws[:, :3], w1[:, None].expand(-1, 3, -1))
    assert torch.equal(ws[:, 3:], w2[:, None].expand(-1, small_G.n_latent - 3, -1))
    avg = torch.randn(1, 16)
    torch.testing.assert_close(sg.Generator.truncate(ws, avg, 0.0), avg.expand_as(ws))
    torch.testing.assert_close(sg.Generator.truncate(ws, avg, 0.5), avg + 0.5 * (ws - avg))
    assert small_G.mean_latent(64).shape == (1, 16)


def test_mapping_pixel_norm_and_lr_mul():
    G = sg.Generator(8, style_dim=4, n_mlp=1, channels={4: 2, 8: 2})
    z = torch.randn(3, 4)
    torch.testing.assert_close(G.mapping(z), G.mapping(5 * z))  # pixel norm: scale-invariant in z
    lin = G.style[1]
    assert lin.lr_mul == 0.01 and lin.scale == pytest.approx(0.01 / 2)
    want = math.sqrt(2) * torch.nn.functional.leaky_relu(
        sg.PixelNorm()(z) @ (lin.weight * lin.scale).T + lin.bias * 0.01, 0.2)
    torch.testing.assert_close(G.mapping(z), want)


# --------------------------------------------------------------------------------------------------
# Discriminator pieces and regularisers
# --------------------------------------------------------------------------------------------------

def test_minibatch_stddev_strided_groups():
    x = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    out = sg.minibatch_stddev(x, 4)
    assert out.shape == (8, 3, 3, 3)
    xn = x.numpy()
    for j in range(8):
        grp = xn[[(j + 2 * m) % 8 for m in range(4)]]  # j with j+2, j+4, j+6 (mod 8)
        want = np.sqrt(grp.var(0) + 1e-8).mean()
        np.testing.assert_allclose(out[j, 2].numpy(), want, rtol=1e-12)


def test_r1_penalty_on_a_linear_discriminator():
    """For D(x) = <a, x>, dD/dx = a, so R1 = ||a||^2 (hand-derived)."""
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    r1 = sg.r1_penalty((x * a).flatten(1).sum(1, keepdim=True), x)
    torch.testing.assert_close(r1, a.pow(2).sum())


def test_path_length_on_a_linear_generator():
    """img = A ws with A a fixed matrix: J^T y = A^T y exactly; compare with the hand formula."""
    torch.manual_seed(3)
    B, L, C, H = 2, 3, 4, 5
    A = torch.randn(3 * H * H, L * C)
    ws = torch.randn(B, L, C, requires_grad=True)
    img = (ws.flatten(1) @ A.T).view(B, 3, H, H)
    torch.manual_seed(7)
    pen, a, mean_len = sg.path_length_penalty(img, ws, mean_path_length=0.0)
    torch.manual_seed(7)
    y = torch.randn(B, 3, H, H) / H
    g = (y.flatten(1) @ A).view(B, L, C)
    lengths = g.pow(2).sum(2).mean(1).sqrt()
    torch.testing.assert_close(mean_len, lengths.mean())
    torch.testing.assert_close(a, 0.01 * lengths.mean())
    torch.testing.assert_close(pen, (lengths - 0.01 * lengths.mean()).pow(2).mean())


def test_r1_and_path_length_double_backward_through_G_and_D():
    G, D = sg.Generator.from_preset("tiny"), sg.Discriminator.from_preset("tiny")
    real = torch.randn(4, 3, 64, 64, requires_grad=True)
    sg.r1_penalty(D(real), real).backward()
    g = D.convs[1].conv1[0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    ws = G.broadcast(G.mapping(torch.randn(2, 128))).detach().requires_grad_(True)
    pen, _, _ = sg.path_length_penalty(G.synthesis(ws), ws, 0.0)
    pen.backward()
    g = G.convs[3].conv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def _grads(net, loss_fn):
    net.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_checkpointing_changes_no_gradient_of_G_and_D_also_through_r1_and_path_length():
    """Activation checkpointing (memory only) must give the plain forward's gradients, including the
    double backward of R1 and the path-length term; float64, so only summation order differs."""
    torch.manual_seed(0)
    G = sg.Generator(32, style_dim=16, n_mlp=2, channels={4: 8, 8: 8, 16: 8, 32: 8}).double()
    D = sg.Discriminator(32, channels={4: 8, 8: 8, 16: 8, 32: 8}, stddev_group=2).double()
    ws = torch.randn(2, G.n_latent, 16, dtype=torch.float64)
    deltas = [None if not m.demodulate else 0.1 * torch.randn(1, *m.weight.shape[1:],
                                                              dtype=torch.float64)
              for m in G.modulated_convs()]
    real = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def g_loss():
        torch.manual_seed(1)  # the path-length term draws its projection y at random
        w = ws.clone().requires_grad_(True)
        img = G.synthesis(w, weight_deltas=deltas)
        return img.square().mean() + sg.path_length_penalty(img, w, 0.0)[0]

    def d_loss():
        x = real.clone().requires_grad_(True)
        logits = D(x)
        return logits.sum() + sg.r1_penalty(logits, x)

    for net, fn in ((G, g_loss), (D, d_loss)):
        net.checkpointing = False
        plain = _grads(net, fn)
        net.checkpointing = True
        ckpt = _grads(net, fn)
        assert plain.keys() == ckpt.keys() and len(plain) > 5
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no graph: checkpointing is a plain call
        torch.testing.assert_close(G.synthesis(ws), G.synthesis(ws), rtol=0, atol=0)


def test_bf16_autocast_is_finite():
    G, D = sg.Generator.from_preset("tiny"), sg.Discriminator.from_preset("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(G.sample(torch.randn(2, 128)))
    assert torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------

def _tiny_pair():
    return sg.Generator.from_preset("tiny").eval(), sg.Discriminator.from_preset("tiny")


def test_load_rosinality_training_checkpoint_with_namespace(tmp_path):
    G, D = _tiny_pair()
    g_ema = sg.Generator.from_preset("tiny").eval()
    path = tmp_path / "010000.pt"
    torch.save({"g": G.state_dict(), "d": D.state_dict(), "g_ema": g_ema.state_dict(),
                "g_optim": {}, "d_optim": {}, "args": argparse.Namespace(size=64, batch=16),
                "ada_aug_p": 0.0}, path)
    G2, D2, avg = sg.load_stylegan2(path)
    ws = torch.randn(2, 10, 128)
    torch.testing.assert_close(G2.eval().synthesis(ws), g_ema.synthesis(ws))  # g_ema preferred
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(D2(x), D(x))
    assert avg is None and G2.channels == sg.PRESETS["tiny"]["channels"]


def test_load_converted_and_psp_layouts_without_noise_buffers(tmp_path):
    G, _ = _tiny_pair()
    sd = {k: v for k, v in G.state_dict().items() if not k.startswith("noises.")}
    latent_avg = torch.randn(128)
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, tmp_path / "conv.pt")
    G2, D2, avg = sg.load_stylegan2(tmp_path / "conv.pt")
    ws = torch.randn(1, 10, 128)
    torch.testing.assert_close(G2.synthesis(ws, noise_mode="none"),
                               G.synthesis(ws, noise_mode="none"))
    assert D2 is None and torch.equal(avg, latent_avg[None])
    psp = {"state_dict": {**{f"decoder.{k}": v for k, v in G.state_dict().items()},
                          "encoder.input_layer.0.weight": torch.zeros(1)},
           "latent_avg": latent_avg.expand(10, -1), "opts": {"output_size": 64}}
    torch.save(psp, tmp_path / "psp.pt")
    G3, _, avg3 = sg.load_stylegan2(tmp_path / "psp.pt")
    torch.testing.assert_close(G3.synthesis(ws), G.synthesis(ws))
    assert avg3.shape == (1, 128)


def test_cm_inferred_from_shapes(tmp_path):
    for cm in (1, 2):
        G = sg.Generator(64, style_dim=32, n_mlp=1, channel_multiplier=cm)
        torch.save({"g_ema": G.state_dict()}, tmp_path / f"cm{cm}.pt")
        G2, _, _ = sg.load_stylegan2(tmp_path / f"cm{cm}.pt")
        assert G2.channels[64] == 256 * cm


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loader_refuses_junk_and_arbitrary_objects(tmp_path):
    with pytest.raises(FileNotFoundError):
        sg.load_stylegan2(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a loadable"):
        sg.load_stylegan2(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no StyleGAN2 generator"):
        sg.load_stylegan2(tmp_path / "other.pt")
    torch.save({"g_ema": {}, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a loadable"):
        sg.load_stylegan2(tmp_path / "evil.pt")
    G, _ = _tiny_pair()
    sd = G.state_dict()
    sd["convs.0.conv.weight"] = torch.zeros(1, 3, 3, 3, 3)  # shape mismatch
    torch.save({"g_ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not match"):
        sg.load_stylegan2(tmp_path / "bad.pt")


def test_cli_writes_grid_and_fails_cleanly(tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, str(ROOT / "stylegan2.py"), "--n", "4", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(out).size == (128, 128) and "UNTRAINED" in r.stdout
    bad_out = tmp_path / "never.png"
    r = subprocess.run([sys.executable, str(ROOT / "stylegan2.py"), "--checkpoint",
                        str(tmp_path / "x.pt"), "--out", str(bad_out)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(
        r.stderr.strip().splitlines()) == 1
    assert not bad_out.exists()


def test_plot_losses_draws_one_panel_per_quantity(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": k, "time": 0.0, "img_per_s": 5.0, "peak_mem_gb": 1.0, "loss_d": 1.0 / k,
             "rec": float(k % 3)}
            for k in range(1, 30)]
    rows[5]["rec"] = float("nan")                       # a non-finite value is skipped, not drawn
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert files.plot_losses(log, tmp_path / "loss.png") == 2   # step/time/img_per_s are not losses
    im = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert im.shape == (170, 640, 3)
    blue = (im[..., 2] > 150) & (im[..., 0] < 80)    # the running-mean curve is drawn in each panel
    assert blue[:, :320].any() and blue[:, 320:].any()
    log.write_text("")
    assert files.plot_losses(log, tmp_path / "none.png") == 0 and not (tmp_path
                                                                       / "none.png").exists()


# --------------------------------------------------------------------------------------------------
# CUDA parity (skip without a GPU)
# --------------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.cuda
# the tiled kernel and the one-thread-per-pixel kernel
@pytest.mark.parametrize("naive", ["0", "1"])
@pytest.mark.parametrize("up,down,pad", GRAD_CASES + [((1, 1), (1, 1), (1, 1, 1, 1))])
def test_cuda_upfirdn2d_matches_reference(up, down, pad, naive, monkeypatch):
    monkeypatch.setenv("FCTFG_UPFIRDN_NAIVE", naive)
    assert ops.cuda_ops(), "CUDA ops failed to build"
    x = torch.randn(3, 5, 17, 23, device="cuda", requires_grad=True)
    f = torch.randn(4, 4, device="cuda")
    y_ref = ops.upfirdn2d(x, f, up, down, pad, impl="ref")
    y_cuda = ops.upfirdn2d(x, f, up, down, pad, impl="cuda")
    torch.testing.assert_close(y_cuda, y_ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, x, gy, create_graph=True)[0]
    g_cuda = torch.autograd.grad(y_cuda, x, gy, create_graph=True)[0]
    torch.testing.assert_close(g_cuda, g_ref, atol=1e-5, rtol=1e-5)
    # double backward: d/dx of <grad, v> through both paths
    gy2 = torch.randn_like(y_ref, requires_grad=True)
    v = torch.randn_like(x)
    a = torch.autograd.grad((torch.autograd.grad(ops.upfirdn2d(x, f, up, down, pad, impl="ref"), x,
                                                 gy2, create_graph=True)[0] * v).sum(), gy2)[0]
    b = torch.autograd.grad((torch.autograd.grad(ops.upfirdn2d(x, f, up, down, pad, impl="cuda"), x,
                                                 gy2, create_graph=True)[0] * v).sum(), gy2)[0]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.cuda
def test_cuda_bias_act_matches_reference():
    assert ops.cuda_ops(), "CUDA ops failed to build"
    x = torch.randn(4, 16, 9, 9, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    y_ref, y_cuda = ops.bias_act(x, b, impl="ref"), ops.bias_act(x, b, impl="cuda")
    torch.testing.assert_close(y_cuda, y_ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y_ref, requires_grad=True)
    gr = torch.autograd.grad(y_ref, (x, b), gy, create_graph=True)
    gc = torch.autograd.grad(y_cuda, (x, b), gy, create_graph=True)
    for a, c in zip(gr, gc):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    v = torch.randn_like(x)
    a = torch.autograd.grad((gr[0] * v).sum(), gy)[0]
    c = torch.autograd.grad((gc[0] * v).sum(), gy)[0]
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.cuda
def test_cuda_generator_r1_and_pl_match_reference():
    G = sg.Generator.from_preset("tiny").cuda()
    D = sg.Discriminator.from_preset("tiny").cuda()
    ws = torch.randn(4, 10, 128, device="cuda")
    out = {}
    for impl in ("ref", "cuda"):
        ops.allow_cuda_ops(impl == "cuda")
        G.zero_grad(), D.zero_grad()
        w = ws.clone().requires_grad_(True)
        img = G.synthesis(w)
        real = img.detach().clone().requires_grad_(True)
        pen, _, _ = sg.path_length_penalty(img, w, 0.0)
        (pen + sg.r1_penalty(D(real), real)).backward()
        out[impl] = (img.detach(), G.convs[2].conv.weight.grad.clone(),
                     D.convs[1].conv1[0].weight.grad.clone())
    ops.allow_cuda_ops(True)
    for a, c in zip(out["ref"], out["cuda"]):
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)


def test_every_cli_flag_says_what_it_does(cli_actions):
    """The sampling CLI here and the speed CLI beside it (bench.py): help text on every flag."""
    import bench
    for fn in (sg.main, bench.main):
        missing = [a.option_strings for a in cli_actions(fn, []) if not a.help]
        assert not missing, (fn.__module__, missing)

