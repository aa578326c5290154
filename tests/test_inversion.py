"""Tests for inversion.py: pSp encoder, HyperStyle, ArcFace identity network, invert(), loaders.

Oracles: key names / shapes / parameter counts written out independently from the published layouts
(the pSp / HyperStyle / InsightFace key layouts and shapes), hand-derived outputs (zeroed heads,
zero deltas, align_corners bilinear weights via numpy), a float64 functional re-derivation of one
IR-SE unit, and properties (unit norm, crop locality, batch independence). Paper-size networks are
only built on the `meta` device (shapes and counts without memory or compute)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import inversion as I
import stylegan2

TINY, PAPER = I.PRESETS["tiny"], I.PRESETS["paper"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- independent description of the published IR-SE50 key layout (model_ir_se50.pth) -------------

def _bn(name, c):
    return {f"{name}.{s}": (c,) for s in ("weight", "bias", "running_mean", "running_var")}


def irse_keys(units=(3, 4, 14, 3), widths=(64, 128, 256, 512)):
    keys = {"input_layer.0.weight": (widths[0], 3, 3, 3), **_bn("input_layer.1", widths[0]),
            "input_layer.2.weight": (widths[0],)}
    i, cin = 0, widths[0]
    for n, c in zip(units, widths):
        for _ in range(n):
            p = f"body.{i}"
            keys.update(_bn(f"{p}.res_layer.0", cin))
            keys[f"{p}.res_layer.1.weight"] = (c, cin, 3, 3)
            keys[f"{p}.res_layer.2.weight"] = (c,)
            keys[f"{p}.res_layer.3.weight"] = (c, c, 3, 3)
            keys.update(_bn(f"{p}.res_layer.4", c))
            keys[f"{p}.res_layer.5.fc1.weight"] = (c // 16, c, 1, 1)
            keys[f"{p}.res_layer.5.fc2.weight"] = (c, c // 16, 1, 1)
            if cin != c:
                keys[f"{p}.shortcut_layer.0.weight"] = (c, cin, 1, 1)
                keys.update(_bn(f"{p}.shortcut_layer.1", c))
            i, cin = i + 1, c
    return keys


def arcface_keys(units=(3, 4, 14, 3), widths=(64, 128, 256, 512), face=112, emb=512):
    s = face // 16
    return {**irse_keys(units, widths), **_bn("output_layer.0", widths[3]),
            "output_layer.3.weight": (emb, widths[3] * s * s), "output_layer.3.bias": (emb,),
            **_bn("output_layer.4", emb)}


def psp_keys(n_latent=14, style_dim=512, units=(3, 4, 14, 3), widths=(64, 128, 256, 512), size=256):
    keys = {**irse_keys(units, widths),
            "latlayer1.weight": (widths[3], widths[2], 1, 1), "latlayer1.bias": (widths[3],),
            "latlayer2.weight": (widths[3], widths[1], 1, 1), "latlayer2.bias": (widths[3],)}
    for k in range(n_latent):
        spatial = size // 16 if k < 3 else size // 8 if k < 7 else size // 4
        cin = widths[3]
        for j in range(int(math.log2(spatial))):
            keys[f"styles.{k}.convs.{2 * j}.weight"] = (style_dim, cin, 3, 3)
            keys[f"styles.{k}.convs.{2 * j}.bias"] = (style_dim,)
            cin = style_dim
        keys[f"styles.{k}.linear.weight"] = (style_dim, style_dim)
        keys[f"styles.{k}.linear.bias"] = (style_dim,)
    return keys


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def random_sd(keys, scale=0.1):
    sd = {k: torch.randn(s) * scale for k, s in keys.items()}
    for k in sd:  # BatchNorm variances must stay positive
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    return sd


# HyperStyle's table of the 20 modulated convs of a 256 px config-F generator (its layer indexing),
# (O, I, k).
C512 = (512, 512, 3)
PAPER_SHAPES = [C512, None, C512, C512, None, C512, C512, None, C512, C512, None, C512, C512, None,
                (256, 512, 3), (256, 256, 3), None, (128, 256, 3), (128, 128, 3), None]


def micro():
    """A 64 px generator, encoder and hypernetwork narrower than `tiny`, for the optimisation
    tests."""
    G = stylegan2.Generator(size=64, style_dim=32, n_mlp=1,
                            channels={4: 32, 8: 32, 16: 16, 32: 16, 64: 8})
    E = I.PSPEncoder(size=64, n_latent=10, style_dim=32, units=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    H = I.HyperStyle(I.layer_shapes(G), size=64, blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                     shared_inner=8, other_inner=8)
    return G, E, H


# ==================================================================================================
# 1. IR-SE backbone
# ==================================================================================================

def test_irse_unit_matches_functional_derivation_float64():
    unit = I.BottleneckIRSE(16, 32, stride=2).double().eval()
    for m in unit.modules():  # non-trivial BatchNorm statistics so the eval path is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(); m.running_var.uniform_(
                0.5, 2); m.weight.data.normal_(); m.bias.data.normal_()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    r, s = unit.res_layer, unit.shortcut_layer

    def bn(m, h):
        return (h - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None]
                                                                + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    h = bn(r[0], x)
    h = F.conv2d(h, r[1].weight, padding=1)                 # stride 1 first ...
    h = torch.where(h > 0, h, r[2].weight[:, None, None] * h)
    h = F.conv2d(h, r[3].weight, stride=2, padding=1)       # ... stride on the second conv
    h = bn(r[4], h)
    g = torch.sigmoid(F.conv2d(F.relu(F.conv2d(h.mean((2, 3), keepdim=True), r[5].fc1.weight)),
                               r[5].fc2.weight))
    want = h * g + bn(s[1], F.conv2d(x, s[0].weight, stride=2))
    torch.testing.assert_close(unit(x), want, rtol=1e-10, atol=1e-10)


def test_irse_identity_shortcut_is_strided_subsample():
    unit = I.BottleneckIRSE(16, 16, stride=2).eval()
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(unit.shortcut_layer(x), x[:, :, ::2, ::2])
    assert n_params(unit.shortcut_layer) == 0


def test_ir_se_layers_rejects_wrong_stage_count():
    with pytest.raises(ValueError, match="4 stages"):
        I.ir_se_layers((3, 4, 14), (64, 128, 256))


# ==================================================================================================
# 2. pSp encoder
# ==================================================================================================

def test_psp_paper_keys_and_param_counts_match_published():
    with torch.device("meta"):
        E14 = I.PSPEncoder(**PAPER["psp"])
        E18 = I.PSPEncoder(**{**PAPER["psp"], "n_latent": 18})
    want = psp_keys()
    got = shapes_of(E14)
    got.pop("latent_avg")  # ours is a buffer; the pSp file stores it outside state_dict
    assert got == want
    # pSp's own encoder, counted
    assert n_params(E14) == 209_450_688 and n_params(E18) == 267_136_704
    assert n_params(E14.input_layer) + n_params(E14.body) == 30_950_080
    assert n_params(E14.latlayer1) + n_params(E14.latlayer2) == 197_632
    assert [n_params(E14.styles[k]) for k in (0, 3, 7)] == [9_701_888, 12_061_696, 14_421_504]


@pytest.mark.parametrize("preset,n_latent,size,style_dim", [("paper", 14, 256, 512),
                                                             ("paper", 18, 256, 512),
                                                             ("tiny", 10, 64, 128)])
def test_psp_output_shape_and_coarse_middle_fine_routing(preset, n_latent, size, style_dim):
    cfg = {**I.PRESETS[preset]["psp"], "n_latent": n_latent}
    device = "meta" if preset == "paper" else "cpu"  # paper size: shapes only
    with torch.device(device):
        E = I.PSPEncoder(**cfg)
        seen = []
        for head in E.styles:
            head.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[2:])))
        w = E(torch.randn(2, 3, size, size))
    assert tuple(w.shape) == (2, n_latent, style_dim)
    # pSp split: codes 0-2 from size/16 (c3), 3-6 from size/8 (p2), the rest from size/4 (p1)
    want = [(size // 16,) * 2] * 3 + [(size // 8,) * 2] * 4 + [(size // 4,) * 2] * (n_latent - 7)
    assert seen == want


def test_psp_with_zeroed_heads_outputs_latent_avg_plus_head_bias():
    E = I.PSPEncoder(**TINY["psp"]).eval()
    w_avg = torch.randn(1, 128)
    E.set_latent_avg(w_avg)
    with torch.no_grad():
        for k, head in enumerate(E.styles):
            head.linear.weight.zero_()
            head.linear.bias.fill_(float(k))
    w = E(torch.randn(3, 3, 64, 64))
    want = w_avg + torch.arange(10.0)[:, None]  # code k = w_avg + k, for every input
    torch.testing.assert_close(w, want.expand(3, -1, -1))


def test_psp_fpn_uses_align_corners_bilinear_upsampling():
    E = I.PSPEncoder(**TINY["psp"]).eval()
    feats = {}
    E.body[E.taps[1]].register_forward_hook(lambda m, i, o: feats.__setitem__("c2", o))
    E.body[-1].register_forward_hook(lambda m, i, o: feats.__setitem__("c3", o))
    E.styles[3].register_forward_hook(lambda m, i, o: feats.__setitem__("p2", i[0]))
    with torch.no_grad():
        E(torch.randn(1, 3, 64, 64))
        up = (feats["p2"] - E.latlayer1(feats["c2"]))[0, 0].numpy()   # should be bilinear(c3)
    c3 = feats["c3"][0, 0].numpy()
    n_in, n_out = c3.shape[0], up.shape[0]
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)  # align_corners=True sample positions
    rows = np.stack([np.interp(pos, np.arange(n_in), c3[:, j]) for j in range(n_in)], 1)
    want = np.stack([np.interp(pos, np.arange(n_in), rows[i]) for i in range(n_out)])
    np.testing.assert_allclose(up, want, rtol=1e-4, atol=1e-5)


def test_psp_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="power of two"):
        I.PSPEncoder(size=192)
    with pytest.raises(ValueError, match="split"):
        I.PSPEncoder(**{**TINY["psp"], "n_latent": 6})
    E = I.PSPEncoder(**TINY["psp"])
    with pytest.raises(ValueError, match="expects"):
        E(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="latent_avg"):
        E.set_latent_avg(torch.zeros(3, 128))


# ==================================================================================================
# 3. ArcFace identity network
# ==================================================================================================

def test_arcface_paper_keys_and_param_count_match_published():
    with torch.device("meta"):
        E_id = I.IdentityEncoder(**PAPER["arcface"])
        emb = E_id(torch.randn(2, 3, 256, 256))
    assert shapes_of(E_id) == arcface_keys()
    # the released model_ir_se50.pth layout
    assert len(shapes_of(E_id)) == 343 and len(E_id.state_dict()) == 397
    assert n_params(E_id) == 43_797_696
    assert tuple(emb.shape) == (2, 512)


def test_arcface_embedding_unit_norm_frozen_and_batch_independent():
    E_id = I.IdentityEncoder(**TINY["arcface"])
    parent = nn.Sequential(E_id).train()  # a parent switching to train mode must not unfreeze BN
    assert not E_id.training and not any(p.requires_grad for p in E_id.parameters())
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    e = parent(x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(E_id(x[1:2]), e[1:2], rtol=1e-5, atol=1e-6)  # alone vs in a batch


def test_arcface_ignores_pixels_outside_the_face_crop_and_passes_gradients():
    E_id = I.IdentityEncoder(**TINY["arcface"])
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    y = x.detach().clone()
    r0, r1, c0, c1 = [round(v * 64 / 256) for v in I.ID_CROP_256]   # 9, 56, 8, 55 at 64 px
    y[:, :, :r0] = 5.0; y[:, :, r1:] = -5.0; y[:, :, :, :c0] = 3.0; y[:, :, :, c1:] = 7.0
    torch.testing.assert_close(E_id(y), E_id(x.detach()))
    E_id(x)[:, 0].sum().backward()
    g = x.grad.abs().sum((0, 1))
    assert g[r0:r1, c0:c1].sum() > 0 and g[:r0].sum() == 0 and g[:, c1:].sum() == 0


# ==================================================================================================
# 4. HyperStyle and invert()
# ==================================================================================================

def test_hyperstyle_paper_param_count_and_shared_keys():
    with torch.device("meta"):
        H = I.HyperStyle(PAPER_SHAPES, **PAPER["hyperstyle"])
        deltas = H(torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256))
    assert n_params(H) == 312_984_640                           # HyperStyle's own hypernet, counted
    assert n_params(H.conv1) + n_params(H.bn1) + n_params(H.relu) == 19_008
    assert n_params(H.body) == 21_275_136 and n_params(H.shared_weight_hypernet) == 136_843_776
    tuned = [i for i, b in enumerate(H.refinement_blocks) if b is not None]
    assert tuned == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
    assert [n_params(H.refinement_blocks[i]) for i in (14, 15, 17, 18)] == [70_190_080, 36_570_112,
                                                                            19_760_128, 11_355_136]
    shared = sorted(int(k.split(".")[1]) for k in H.state_dict() if k.endswith(".hypernet.w1"))
    assert shared == [0, 2, 3, 5, 6, 8, 9, 11, 12]          # + shared_weight_hypernet: 10 key paths
    assert H.state_dict()["shared_weight_hypernet.w2"].shape == (512, 512 * 512)
    assert [None if d is None else tuple(d.shape) for d in deltas] == \
        [None if s is None else (1, s[0], s[1], s[2], s[2]) for s in PAPER_SHAPES]


def test_invert_tiny_shapes_match_generator_layers():
    G = stylegan2.Generator(**stylegan2.PRESETS["tiny"])
    E = I.PSPEncoder(**TINY["psp"])
    H = I.HyperStyle(I.layer_shapes(G), **TINY["hyperstyle"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ws, deltas, recon = I.invert(G, x, E, H, steps=1)
    assert ws.shape == (1, 10, 128) and recon.shape == (1, 3, 64, 64)
    mods = G.modulated_convs()
    assert len(deltas) == len(mods)
    for d, m in zip(deltas, mods):
        if m.demodulate:
            assert d.shape == (1,) + tuple(m.weight.shape[1:])
        else:
            assert d is None  # ToRGB layers are never tuned


def test_invert_zero_deltas_equal_plain_synthesis_and_encoder_only_mode():
    G, E, H = micro()
    with torch.no_grad():  # make every head output exactly 0
        H.shared_weight_hypernet.w1.zero_(); H.shared_weight_hypernet.b1.zero_()
        for b in H.refinement_blocks:
            if isinstance(b, I.RefinementBlock):
                b.output[1].weight.zero_(); b.output[1].bias.zero_()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ws, deltas, recon = I.invert(G, x, E, H, steps=2)
        plain = G.synthesis(E(x), noise_mode="const")
        ws0, deltas0, recon0 = I.invert(G, x, E, H=None)
    assert all(d is None or (d == 0).all() for d in deltas) and sum(d is not None
                                                                    for d in deltas) == 9
    torch.testing.assert_close(recon, plain, rtol=1e-6, atol=1e-6)
    assert deltas0 == [None] * len(G.modulated_convs())
    torch.testing.assert_close(recon0, plain)
    torch.testing.assert_close(ws0, ws)


def test_invert_accumulates_the_running_sum_of_deltas():
    G, E, H = micro()
    H.eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ws, deltas, recon = I.invert(G, x, E, H, steps=2)
        # naive unrolled loop: Delta^1 = H(x, y0), Delta^2 = Delta^1 + H(x, y1)
        w = E(x)
        y0 = G.synthesis(w)
        d1 = H(x, y0)
        y1 = G.synthesis(w, weight_deltas=d1)
        d2 = [None if a is None else a + b for a, b in zip(d1, H(x, y1))]
        y2 = G.synthesis(w, weight_deltas=d2)
    for a, b in zip(deltas, d2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(recon, y2)
    assert not torch.allclose(y2, y0)  # the deltas do change the image


def test_invert_gradients_flow_through_the_deltas_not_through_the_renders_h_looks_at():
    """Fine-tuning through invert (FC-TFG, Sec. 4.1.2): the renders y_hat^t fed to H are detached,
    as in HyperStyle's own training; the oracle is the unrolled loop with explicit .detach()."""
    torch.manual_seed(0)
    G, E, H = micro()
    G, E, H = G.double(), E.double(), H.double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 2 - 1
    nets = list(G.parameters()) + list(E.parameters()) + list(H.parameters())

    def grads(loss):
        return torch.autograd.grad(loss, nets, allow_unused=True)

    ws, deltas, recon = I.invert(G, x, E, H, steps=2)
    got = grads(recon.square().mean())
    w = E(x)
    d1 = H(x, G.synthesis(w).detach())
    d2 = [None if a is None else a + b
          for a, b in zip(d1, H(x, G.synthesis(w, weight_deltas=d1).detach()))]
    want = grads(G.synthesis(w, weight_deltas=d2).square().mean())
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert I.invert(G, x, E, H, steps=2, recon=False)[2] is None


def test_checkpointing_keeps_gradients_and_batchnorm_statistics_of_psp_and_hyperstyle():
    """Train-mode BatchNorm in a checkpointed block would update its running statistics twice
    (forward and recomputation); ops.checkpointed recomputes with momentum 0. Same gradients, same
    buffers."""
    torch.manual_seed(0)
    G, E, H = micro()
    G, E, H = G.double(), E.double(), H.double().train()
    E.train()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 2 - 1
    out = {}
    # buffers before the first run
    E0, H0 = ({k: v.clone() for k, v in net.state_dict().items()} for net in (E, H))
    for on in (False, True):
        # both runs start from the same BatchNorm statistics
        E.load_state_dict(E0), H.load_state_dict(H0)
        E.checkpointing = H.checkpointing = on
        E.zero_grad(), H.zero_grad()
        ws, deltas, recon = I.invert(G, x, E, H, steps=2)
        recon.square().mean().backward()
        out[on] = ({n: p.grad.clone() for n, p in [*E.named_parameters(), *H.named_parameters()]},
                   {k: v.clone() for k, v in [*E.state_dict().items(), *H.state_dict().items()]})
    for k, g in out[False][0].items():
        torch.testing.assert_close(out[True][0][k], g, rtol=1e-10, atol=1e-12)
    for k, b in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], b, rtol=1e-12, atol=0)
    # one statistics update per real call: E once, H once per refinement step (2)
    counts = {int(v) for k, v in out[True][1].items() if k.endswith("num_batches_tracked")}
    assert counts == {1, 2}, counts


def test_invert_rejects_generator_with_other_code_count():
    G = stylegan2.Generator(size=32, style_dim=32, n_mlp=1, channels={4: 8, 8: 8, 16: 8, 32: 8})
    E = I.PSPEncoder(size=64, n_latent=10, style_dim=32, units=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    with pytest.raises(ValueError, match="codes"):
        I.invert(G, torch.zeros(1, 3, 64, 64), E)


def test_gradients_reach_encoder_and_hypernetwork():
    G, E, H = micro()
    G.requires_grad_(False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss, parts = I.psp_loss(E, G, x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in E.parameters())
    with torch.no_grad():
        ws = E(x)
    total, parts, y = I.hyperstyle_loss(H, G, x, ws, steps=2)
    total.backward()
    grads = {n: p.grad for n, p in H.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]


def test_hyperstyle_training_lowers_reconstruction_loss_on_a_fixed_batch():
    G, E, H = micro()
    G.requires_grad_(False); E.requires_grad_(False)
    with torch.no_grad():
        ws = E(torch.rand(2, 3, 64, 64) * 2 - 1)
        # target: the same generator with its weights perturbed, so some Delta reproduces it exactly
        target_d = [None if not m.demodulate else 0.5 * torch.randn(1, *m.weight.shape[1:])
                    for m in G.modulated_convs()]
        x = G.synthesis(ws, weight_deltas=target_d)
    opt = torch.optim.Adam(H.parameters(), lr=3e-3)

    def loss_now():
        with torch.no_grad():
            return I.hyperstyle_loss(H, G, x, ws, steps=1)[0].item()

    before = loss_now()
    for _ in range(4):
        opt.zero_grad()
        I.hyperstyle_loss(H, G, x, ws, steps=1)[0].backward()
        opt.step()
    after = loss_now()
    with torch.no_grad():
        encoder_only = F.mse_loss(G.synthesis(ws), x).item()  # y_hat^0, what HyperStyle starts from
    assert after < 0.8 * before, (before, after)
    # the learned Delta beats encoder-only inversion
    assert after < encoder_only, (after, encoder_only)


def test_loss_inversion_terms_and_weights():
    E_id = I.IdentityEncoder(**TINY["arcface"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    total, parts = I.loss_inversion(x, x, E_id, perceptual=lambda a, b: (a - b).abs().mean())
    assert abs(total.item()) < 1e-5 and set(parts) == {"l2", "lpips", "id"}
    x_hat = x + 0.1
    total, parts = I.loss_inversion(x_hat, x, E_id, perceptual=lambda a, b: torch.tensor(2.0))
    e1, e2 = E_id(x_hat), E_id(x)
    id_want = (1 - F.cosine_similarity(e1, e2)).mean()
    torch.testing.assert_close(parts["l2"], torch.tensor(0.01), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["id"], id_want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, 1.0 * parts["l2"] + 0.8 * 2.0 + 0.1 * id_want, rtol=1e-4,
                               atol=1e-6)


def test_hyperstyle_rejects_bad_input():
    with pytest.raises(ValueError, match="tunable"):
        I.HyperStyle([None, None], **TINY["hyperstyle"])
    with pytest.raises(ValueError, match="power of two"):
        I.HyperStyle([(8, 8, 3)], **{**TINY["hyperstyle"], "size": 96})
    H = I.HyperStyle([(8, 8, 3)], size=64, blocks=(1, 1, 1, 1), widths=(8, 8, 8, 8), shared_inner=8)
    with pytest.raises(ValueError, match="expects"):
        H(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32))


# ==================================================================================================
# 5. Loaders
# ==================================================================================================

ARC_TINY = dict(units=TINY["arcface"]["units"], widths=TINY["arcface"]["widths"],
                face=TINY["arcface"]["face_size"], emb=TINY["arcface"]["emb_dim"])


def test_load_arcface_round_trip_with_published_key_names(tmp_path):
    sd = random_sd(arcface_keys(**ARC_TINY))  # no num_batches_tracked: older files lack it
    torch.save(sd, tmp_path / "model_ir_se50.pth")
    E_id = I.load_arcface(tmp_path / "model_ir_se50.pth", **TINY["arcface"])
    got = E_id.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(got[k], v)
    assert not E_id.training
    torch.testing.assert_close(E_id(torch.randn(2, 3, 64, 64)).norm(dim=1), torch.ones(2))


@pytest.mark.slow
def test_load_arcface_paper_size_round_trip(tmp_path):
    """The released IR-SE50 layout at full size (175 MB of random weights) loads with the
    defaults."""
    sd = random_sd(arcface_keys(), scale=0.02)
    torch.save(sd, tmp_path / "model_ir_se50.pth")
    E_id = I.load_arcface(tmp_path / "model_ir_se50.pth")
    got = E_id.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    with torch.no_grad():
        e = E_id(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert e.shape == (1, 512) and abs(e.norm().item() - 1) < 1e-5


def test_load_psp_round_trip_infers_code_count_and_loads_decoder(tmp_path):
    cfg = TINY["psp"]
    enc = random_sd(psp_keys(cfg["n_latent"], cfg["style_dim"], cfg["units"], cfg["widths"],
                             cfg["size"]))
    G_src = stylegan2.Generator(**stylegan2.PRESETS["tiny"])
    dec = {k: v + 0.5 for k, v in G_src.state_dict().items()}
    ckpt = {"state_dict": {**{"encoder." + k: v for k, v in enc.items()},
                           **{"decoder." + k: v for k, v in dec.items()}},
            "opts": {"output_size": 64, "start_from_latent_avg": True},
            "latent_avg": torch.randn(128)}
    torch.save(ckpt, tmp_path / "psp.pt")
    G = stylegan2.Generator(**stylegan2.PRESETS["tiny"])
    E = I.load_psp(tmp_path / "psp.pt", G=G, **{k: v for k, v in cfg.items() if k != "n_latent"})
    assert E.n_latent == 10
    got = E.state_dict()
    for k, v in enc.items():
        torch.testing.assert_close(got[k], v)
    torch.testing.assert_close(E.latent_avg, ckpt["latent_avg"].expand(10, -1))
    for k, v in G.state_dict().items():
        torch.testing.assert_close(v, dec[k])


def _hyperstyle_ckpt(H):
    sd = {"hypernet." + k: torch.randn_like(v) if v.is_floating_point() else v.clone()
          for k, v in H.state_dict().items()}
    # the shared projection is one tensor: all its key paths hold the same values
    for k in list(sd):
        for name in ("w1", "b1", "w2", "b2"):
            if k.endswith(f"hypernet.{name}"):
                sd[k] = sd["hypernet.shared_weight_hypernet." + name]
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    return {"state_dict": sd, "opts": {}, "latent_avg": torch.zeros(128), "global_step": 0}


def test_load_hyperstyle_round_trip(tmp_path):
    G = stylegan2.Generator(**stylegan2.PRESETS["tiny"])
    H_src = I.HyperStyle(I.layer_shapes(G), **TINY["hyperstyle"])
    ckpt = _hyperstyle_ckpt(H_src)
    torch.save(ckpt, tmp_path / "hyperstyle.pt")
    H = I.load_hyperstyle(tmp_path / "hyperstyle.pt", G, **TINY["hyperstyle"])
    for k, v in H.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"]["hypernet." + k])
    # a file whose copies of the shared tensor disagree is corrupt
    ckpt["state_dict"]["hypernet.refinement_blocks.0.hypernet.w1"] = torch.zeros_like(
        ckpt["state_dict"]["hypernet.refinement_blocks.0.hypernet.w1"])
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="copies"):
        I.load_hyperstyle(tmp_path / "bad.pt", G, **TINY["hyperstyle"])


def test_loaders_refuse_missing_junk_and_wrong_network(tmp_path):
    with pytest.raises(FileNotFoundError):
        I.load_arcface(tmp_path / "nope.pth")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    for load in (I.load_arcface, I.load_psp):
        with pytest.raises(ValueError, match="not a loadable"):
            load(tmp_path / "junk.pt")
    # weights_only refuses modules
    torch.save({"x": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match="not a loadable"):
        I.load_arcface(tmp_path / "pickled_module.pt")
    arc = random_sd(arcface_keys(**ARC_TINY))
    torch.save(arc, tmp_path / "arc.pth")
    with pytest.raises(ValueError, match="state_dict"):      # ArcFace file handed to the pSp loader
        I.load_psp(tmp_path / "arc.pth")
    torch.save({"state_dict": {"hypernet.conv1.weight": torch.zeros(1)}}, tmp_path / "hs.pt")
    with pytest.raises(ValueError, match="encoder"):      # HyperStyle file handed to the pSp loader
        I.load_psp(tmp_path / "hs.pt")
    # pSp-style file handed to the ArcFace loader
    with pytest.raises(ValueError, match="plain IR-SE50"):
        I.load_arcface(tmp_path / "hs.pt")
    with pytest.raises(ValueError, match="shape mismatches"):  # tiny weights into the paper network
        I.load_arcface(tmp_path / "arc.pth", **{**TINY["arcface"], "emb_dim": 32})
    del arc["body.0.res_layer.1.weight"]
    torch.save(arc, tmp_path / "arc_missing.pth")
    with pytest.raises(ValueError, match="1 missing keys"):
        I.load_arcface(tmp_path / "arc_missing.pth", **TINY["arcface"])


def test_arcface_loss_matches_a_per_sample_float64_oracle():
    """Oracle written from ArcFace's Eq. 3, one sample at a time with math.acos / math.cos,
    including a sample whose theta + m passes pi (the linear continuation); gradcheck in float64."""
    import math as m_
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    centres = torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 3])
    # theta_y = pi: past the margin's range
    emb[4] = -torch.nn.functional.normalize(centres[3], dim=0)
    s, margin = 30.0, 0.5
    want = 0.0
    for e, y in zip(emb, labels):
        # acos' safe range
        cos = [max(-1 + 1e-7, min(1 - 1e-7, float(e @ c / c.norm()))) for c in centres]
        th = m_.acos(cos[y])
        cos[y] = m_.cos(th + margin) if th + margin < m_.pi else cos[y] - margin * m_.sin(margin)
        z = [s * c for c in cos]
        want += -(z[y] - m_.log(sum(m_.exp(v) for v in z))) / len(labels)
    got = I.arcface_loss(emb, centres, labels, s, margin)
    assert float(got) == pytest.approx(want, rel=1e-9)
    ok = emb[:4].clone().requires_grad_(True)                     # away from the kink and the clamp
    assert torch.autograd.gradcheck(lambda e, c: I.arcface_loss(e, c, labels[:4], s, margin),
                                    (ok, centres.clone().requires_grad_(True)))


def test_identity_encoder_frozen_is_a_judge_unfrozen_trains():
    judge, learner = I.IdentityEncoder(**TINY["arcface"]), I.IdentityEncoder(**TINY["arcface"],
                                                                             frozen=False)
    judge.train(), learner.train()
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    assert learner.training and all(p.requires_grad for p in learner.parameters())
