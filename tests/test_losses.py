"""Tests for losses.py: Eq. (3)-(9) against hand-worked values, naive loops and torch's own BCE, and
the hand-written VGG19 against a functional re-computation from a torchvision-layout state dict."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import (LAMBDA, VGG19Features, gan_loss_d, gan_loss_g, identity_loss, load_vgg19,
                    orthogonality_loss, perceptual_loss, r1_penalty, reconstruction_loss, sync_loss,
                    total_loss)

# --------------------------------------------------------------------------------------------------
# Eq. (3) orthogonality
# --------------------------------------------------------------------------------------------------


def test_ortho_hand_worked_values():
    z_sc = torch.tensor([1.0, 2.0, 0.0, -1.0]).view(1, 1, 1, 4)
    z_cd = torch.tensor([3.0, -1.0, 5.0, 2.0]).view(1, 1, 1, 4)
    # products (3, -2, 0, -2), N = 4
    assert orthogonality_loss(z_sc, z_cd, "hadamard_abs").item() == pytest.approx(7 / 4)
    assert orthogonality_loss(z_sc, z_cd, "signed").item() == pytest.approx(-1 / 4)
    assert orthogonality_loss(z_sc, z_cd, "squared").item() == pytest.approx(17 / 4)
    # cos = -1 / (sqrt(6) sqrt(39))
    assert orthogonality_loss(z_sc, z_cd, "cosine").item() == pytest.approx(1 / math.sqrt(234),
                                                                            rel=1e-6)
    assert orthogonality_loss(z_sc, z_cd, None).item() == 0


def test_ortho_zero_for_channel_disjoint_codes_positive_otherwise():
    z_sc = torch.zeros(2, 3, 14, 8)
    z_sc[..., :4] = torch.randn(2, 3, 14, 4)
    z_cd = torch.zeros(2, 3, 14, 8)
    z_cd[..., 4:] = torch.randn(2, 3, 14, 4)
    for mode in ("hadamard_abs", "signed", "squared", "cosine"):
        assert orthogonality_loss(z_sc, z_cd, mode) == 0, mode
    z_cd[..., 3] = 1.0  # share one channel
    for mode in ("hadamard_abs", "squared", "cosine"):
        assert orthogonality_loss(z_sc, z_cd, mode) > 0, mode


def test_hadamard_differs_from_cosine_on_orthogonal_but_overlapping_codes():
    # (1, 1) ⊥ (1, -1): cosine (and signed) call them orthogonal although both use both channels;
    # the channel-wise constraint of Sec. 3.2 does not.
    a, b = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]])
    assert orthogonality_loss(a, b, "cosine").item() == pytest.approx(0, abs=1e-7)
    assert orthogonality_loss(a, b, "signed").item() == 0
    assert orthogonality_loss(a, b, "hadamard_abs").item() == 1.0


def test_ortho_reduction_matches_a_naive_loop():
    z_sc, z_cd = torch.randn(2, 3, 5, 7, dtype=torch.float64), torch.randn(2, 3, 5, 7,
                                                                           dtype=torch.float64)
    vals = [sum(abs(z_sc[b, t, l, c] * z_cd[b, t, l, c]) for c in range(7)) / 7
            for b in range(2) for t in range(3) for l in range(5)]
    torch.testing.assert_close(orthogonality_loss(z_sc, z_cd), sum(vals) / len(vals))
    # `layers` keeps only those w indices
    sel = [1, 3]
    torch.testing.assert_close(orthogonality_loss(z_sc, z_cd, layers=sel),
                               orthogonality_loss(z_sc[:, :, sel], z_cd[:, :, sel]))


@pytest.mark.parametrize("mode", ["hadamard_abs", "signed", "squared", "cosine"])
def test_ortho_gradient_matches_finite_differences(mode):
    z_sc = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    z_cd = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: orthogonality_loss(a, b, mode), (z_sc, z_cd))


def test_signed_mode_is_unbounded_below_at_fixed_z_sd():
    # The docstring's example: z_sd = z_sc + z_cd = 1 is fixed, z_sc = 1 + s, z_cd = -s.
    vals = []
    for s in (0.0, 10.0, 100.0):
        z_sc, z_cd = torch.full((1, 1, 1), 1 + s), torch.full((1, 1, 1), -s)
        assert (z_sc + z_cd).item() == 1
        vals.append(orthogonality_loss(z_sc, z_cd, "signed").item())
        assert orthogonality_loss(z_sc, z_cd, "hadamard_abs").item() == pytest.approx(s + s * s)
    assert vals == [0.0, -110.0, -10100.0]


def test_cosine_mode_is_scale_invariant():
    z_sc, z_cd = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    ref = orthogonality_loss(z_sc, z_cd, "cosine")
    torch.testing.assert_close(orthogonality_loss(7.0 * z_sc, -0.01 * z_cd, "cosine"), ref)
    assert not torch.allclose(orthogonality_loss(7.0 * z_sc, z_cd), orthogonality_loss(z_sc, z_cd))


def test_ortho_bad_input_raises():
    with pytest.raises(ValueError, match="mode"):
        orthogonality_loss(torch.ones(1, 2, 3), torch.ones(1, 2, 3), "l2")
    with pytest.raises(ValueError, match="same"):
        orthogonality_loss(torch.ones(1, 2, 3), torch.ones(1, 2, 4))


def test_ortho_layers_hand_values_and_gradient():
    z_sc = torch.tensor([2.0, 2.0, 3.0]).view(1, 1, 3)          # [B, L=1, C=3]
    z_cd = torch.tensor([0.5, 0.0, -1.0]).view(1, 1, 3)
    assert orthogonality_loss(z_sc, z_cd).item() == pytest.approx((1.0 + 0 + 3.0) / 3)
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: orthogonality_loss(x, y, layers=(0, 2)), (a, b))


# --------------------------------------------------------------------------------------------------
# Eq. (4) sync
# --------------------------------------------------------------------------------------------------

def manual_face_stack(frames):
    """[B, 5, 3, H, W] in [-1, 1] -> [B, 15, H/2, W] in [0, 1]: lower half, frames stacked
    frame-major."""
    x = (frames + 1) / 2
    x = x[..., x.shape[-2] // 2:, :]
    return torch.cat([x[:, t] for t in range(x.shape[1])], 1)


def tiny_syncnet():
    audio = pytest.importorskip("audio")
    return audio.SyncNet(**audio.PRESETS["tiny"]).eval().requires_grad_(False)


def test_sync_loss_equals_one_minus_cosine_of_the_expert_embeddings():
    net = tiny_syncnet()
    x_g = torch.rand(2, 5, 3, 64, 64) * 2 - 1
    mel = torch.randn(2, 1, 80, 16)
    with torch.no_grad():
        a = net.audio_encoder(mel)
        v = net.face_encoder(manual_face_stack(x_g))
        want = (1 - F.cosine_similarity(a, v, dim=1)).mean()
        got = sync_loss(net, x_g, mel)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 <= got.item() <= 1                             # ReLU embeddings: cos in [0, 1]


def test_sync_loss_cuts_long_clips_into_5_frame_chunks():
    net = tiny_syncnet()
    x_g = torch.rand(2, 10, 3, 64, 64) * 2 - 1
    mels = torch.randn(2, 10, 1, 80, 16)                  # one window per frame (audio.mel_windows)
    with torch.no_grad():
        chunks = [sync_loss(net, x_g[:, k:k + 5], mels[:, k]) for k in (0, 5)]
        torch.testing.assert_close(sync_loss(net, x_g, mels), sum(chunks) / 2, rtol=1e-5, atol=1e-6)


def test_sync_loss_gradient_reaches_the_frames_only():
    net = tiny_syncnet()
    x_g = (torch.rand(1, 5, 3, 64, 64) * 2 - 1).requires_grad_(True)
    sync_loss(net, x_g, torch.randn(1, 1, 80, 16)).backward()
    assert torch.isfinite(x_g.grad).all() and x_g.grad.abs().sum() > 0
    assert x_g.grad[..., :32, :].abs().sum() == 0           # the expert sees the lower half only
    assert all(p.grad is None for p in net.parameters())


def test_sync_loss_bad_input_raises():
    net = tiny_syncnet()
    with pytest.raises(ValueError, match="multiple"):
        sync_loss(net, torch.zeros(1, 6, 3, 64, 64), torch.zeros(1, 6, 1, 80, 16))
    with pytest.raises(ValueError, match="T == 5"):
        sync_loss(net, torch.zeros(1, 10, 3, 64, 64), torch.zeros(1, 1, 80, 16))
    with pytest.raises(ValueError, match="x_g"):
        sync_loss(net, torch.zeros(1, 5, 64, 64), torch.zeros(1, 1, 80, 16))


# --------------------------------------------------------------------------------------------------
# Eq. (5) identity
# --------------------------------------------------------------------------------------------------

class ToyIdentity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                       torch.nn.Linear(32, 16))
        self.requires_grad_(False)

    def forward(self, x):
        return self.net(x)                                  # deliberately NOT unit-norm


def test_identity_loss_values_and_gradient():
    E = ToyIdentity().double()
    x_d = torch.rand(2, 3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    assert identity_loss(E, x_d, x_d.clone()).item() == pytest.approx(0, abs=1e-12)
    x_g = (torch.rand_like(x_d) * 2 - 1).requires_grad_(True)
    x_d.requires_grad_(True)
    got = identity_loss(E, x_g, x_d)
    f_g, f_d = E(x_g.flatten(0, 1)), E(x_d.flatten(0, 1))
    want = (1 - (f_g * f_d).sum(1) / (f_g.norm(dim=1) * f_d.norm(dim=1))).mean()
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(x_g.grad).all() and x_g.grad.abs().sum() > 0
    assert x_d.grad is None                                  # the target embedding is a constant


def test_identity_loss_gradcheck():
    E = ToyIdentity().double()
    x_d = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    x_g = torch.rand(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: identity_loss(E, x, x_d), (x_g,))


def test_identity_loss_with_the_arcface_network():
    inversion = pytest.importorskip("inversion")
    E_id = inversion.IdentityEncoder(face_size=16, units=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert identity_loss(E_id, x, x.clone()).item() == pytest.approx(0, abs=1e-6)
    x_g = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    loss = identity_loss(E_id, x_g, x)
    assert 0 < loss.item() <= 2
    loss.backward()
    assert torch.isfinite(x_g.grad).all() and x_g.grad.abs().sum() > 0


def test_identity_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same"):
        identity_loss(ToyIdentity(), torch.zeros(2, 3, 16, 16), torch.zeros(1, 3, 16, 16))


# --------------------------------------------------------------------------------------------------
# Eq. (6) L1
# --------------------------------------------------------------------------------------------------

def test_reconstruction_loss():
    x = torch.rand(2, 5, 3, 8, 8)
    assert reconstruction_loss(x, x.clone()).item() == 0
    assert reconstruction_loss(torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)).item() == 2.0
    y = torch.rand_like(x)
    torch.testing.assert_close(reconstruction_loss(x, y), F.l1_loss(x, y))
    with pytest.raises(ValueError, match="shapes"):
        reconstruction_loss(x, y[:, :4])


# --------------------------------------------------------------------------------------------------
# Eq. (7) VGG19 and the perceptual loss
# --------------------------------------------------------------------------------------------------
# torchvision VGG19 `features` (cfg 'E'), written out by hand (index: (out, in)).
TV_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
            14: (256, 256), 16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512),
            25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512)}
TV_POOLS = (4, 9, 18, 27)


def random_torchvision_vgg19_sd():
    sd = {}
    for i, (o, c) in TV_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, 3, 3) * math.sqrt(2 / (9 * c))
        sd[f"features.{i}.bias"] = torch.randn(o) * 0.1
    # the real classifier is 25088->4096->4096->1000 (123 M floats); the loader ignores it, so small
    # tensors under the real key names are enough to check that it is skipped
    for j in (0, 3, 6):
        sd[f"classifier.{j}.weight"] = torch.randn(4, 4)
        sd[f"classifier.{j}.bias"] = torch.randn(4)
    return sd


def naive_vgg19_taps(sd, x, taps):
    """Re-compute the activations from the raw state dict with functional ops, module index by
    index."""
    out = {}
    for i in range(max(taps) + 1):
        if i in TV_CONVS:
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
        elif i in TV_POOLS:
            x = F.max_pool2d(x, 2)
        else:
            x = F.relu(x)
        if i in taps:
            out[i] = x
    return [out[t] for t in sorted(taps)]


def test_vgg19_layout_and_parameter_count():
    vgg = VGG19Features()
    sd = vgg.state_dict()
    want = {f"features.{i}.{n}" for i in TV_CONVS for n in ("weight", "bias")}
    assert set(sd) == want
    for i, (o, c) in TV_CONVS.items():
        assert sd[f"features.{i}.weight"].shape == (o, c, 3, 3)
    # torchvision's vgg19().features, counted
    assert sum(v.numel() for v in sd.values()) == 20_024_384
    assert all(not p.requires_grad for p in vgg.parameters())


def test_load_vgg19_round_trip_and_forward_matches_functional_oracle(tmp_path):
    sd = random_torchvision_vgg19_sd()
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    taps = (1, 3, 8, 17, 26, 29, 35)
    vgg = load_vgg19(str(path), taps=taps)
    for k, v in vgg.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = vgg(x)
        want = naive_vgg19_taps(sd, x, taps)
    assert len(got) == len(taps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # DataParallel prefixes are tolerated
    vgg2 = load_vgg19({"module." + k: v for k, v in sd.items()})
    assert torch.equal(vgg2.features[34].weight, sd["features.34.weight"])


def test_load_vgg19_rejects_wrong_checkpoints(tmp_path):
    sd = random_torchvision_vgg19_sd()
    with pytest.raises(FileNotFoundError):
        load_vgg19(str(tmp_path / "missing.pth"))
    bad = dict(sd)
    del bad["features.34.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_vgg19(bad)
    with pytest.raises(ValueError, match="unexpected"):
        load_vgg19({**sd, "encoder.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        load_vgg19({**sd, "features.0.weight": torch.zeros(64, 3, 5, 5)})  # e.g. a different net
    with pytest.raises(ValueError, match="unexpected"):
        load_vgg19({**sd, "features.36.weight": torch.zeros(1)})


@pytest.mark.parametrize("mode", ["lpips", "pix2pixhd"])
def test_perceptual_loss_zero_for_identical_images_and_positive_otherwise(mode):
    vgg = VGG19Features(base=8)
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    assert perceptual_loss(vgg, x, x.clone(), mode).item() == 0
    y = (torch.rand_like(x) * 2 - 1).requires_grad_(True)
    loss = perceptual_loss(vgg, y, x, mode)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())     # frozen judge


def test_perceptual_lpips_mode_matches_a_per_tap_oracle():
    vgg = VGG19Features(base=8).double()
    x_g = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x_d = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    vgg.set_taps((3, 8, 17, 26, 35))                   # relu1_2, relu2_2, relu3_4, relu4_4, relu5_4
    fg = vgg(((x_g + 1) / 2 - mean) / std)
    fd = vgg(((x_d + 1) / 2 - mean) / std)
    per_tap = []
    for a, b in zip(fg, fd):
        d = (F.normalize(a, dim=1, eps=0) - F.normalize(b, dim=1, eps=0)).pow(2).sum(1)  # [N, H, W]
        per_tap.append(d.mean())
    want = sum(per_tap) / 5                                   # (1/N_f) Σ_i, Eq. (7)
    torch.testing.assert_close(perceptual_loss(vgg, x_g, x_d, "lpips"), want, rtol=1e-8, atol=1e-10)


def test_perceptual_pix2pixhd_mode_matches_a_per_tap_oracle():
    vgg = VGG19Features(base=8).double()
    x_g = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x_d = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    vgg.set_taps((1, 6, 11, 20, 29))                          # relu1_1 .. relu5_1
    want = sum(w * (a - b).abs().mean() for w, a, b in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1),
                                                           vgg(x_g), vgg(x_d)))
    torch.testing.assert_close(perceptual_loss(vgg, x_g, x_d, "pix2pixhd"), want)


def test_perceptual_loss_bad_input_raises():
    vgg = VGG19Features(base=8)
    with pytest.raises(ValueError, match="mode"):
        perceptual_loss(vgg, torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), "alex")
    with pytest.raises(ValueError, match="same"):
        perceptual_loss(vgg, torch.zeros(1, 3, 16, 16), torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="taps"):
        VGG19Features(base=8, taps=(40,))


# --------------------------------------------------------------------------------------------------
# Eq. (8) GAN, R1
# --------------------------------------------------------------------------------------------------

def test_gan_losses_match_binary_cross_entropy():
    real, fake = torch.randn(6, 1) * 3, torch.randn(6, 1) * 3
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(gan_loss_d(real, fake),
                               bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(gan_loss_g(fake), bce(fake, torch.ones_like(fake)))
    z = torch.zeros(4, 1)                                     # D undecided: log 2 per term
    assert gan_loss_d(z, z).item() == pytest.approx(2 * math.log(2))
    assert gan_loss_g(z).item() == pytest.approx(math.log(2))


def test_gan_losses_are_stable_for_confident_logits():
    big = torch.full((3, 1), 1e4, requires_grad=True)
    loss = gan_loss_g(-big) + gan_loss_d(big, -big)       # fakes rejected hard, reals accepted hard
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    assert loss.item() == pytest.approx(1e4, rel=1e-6)     # only the G term is large: softplus(1e4)
    assert big.grad.abs().sum() > 0                        # non-saturating: G still gets a gradient


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1, keepdim=True)          # dD/dx = w for every sample
    torch.testing.assert_close(r1_penalty(logits, x), w.pow(2).sum())


@pytest.mark.parametrize("n, group", [(8, 4), (6, 2), (5, 1), (3, 4)])
def test_d_side_group_by_group_equals_the_whole_batch(n, group):
    """lazy_r1 and gan_loss_d_backward run one minibatch-stddev group at a time (memory); the values
    and D's gradients must be those of one R1 / one gan_loss_d over the whole batch, written out
    directly (float64, a tiny D with its stddev layer)."""
    import stylegan2
    torch.manual_seed(0)
    D = stylegan2.Discriminator(16, channels={4: 8, 8: 8, 16: 8}, stddev_group=group).double()
    real = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    x = real.clone().requires_grad_(True)
    logits = D(x)
    want = r1_penalty(logits, x)
    # scale 0.5 x (gamma / 2 x every x R1)
    (0.5 * (2.0 / 2 * 16 * want + 0 * logits.sum())).backward()
    want_grads = [p.grad.clone() for p in D.parameters()]
    D.zero_grad()
    got = losses.lazy_r1(D, real, 2.0, 16, scale=0.5)
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-12)
    for g, w in zip([p.grad for p in D.parameters()], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # R1 per sample when a sample is several images (the FC-TFG stage's image D sees a window's
    # frames): the squared gradient norm w.r.t. the whole window, i.e. r1_penalty over [windows,
    # frames, ...]
    if n % 2 == 0:
        win = real.view(n // 2, 2, 3, 16, 16).clone().requires_grad_(True)
        D.zero_grad()
        logits = D(win.flatten(0, 1))
        want = r1_penalty(logits, win)
        (0.5 * (2.0 / 2 * 16 * want + 0 * logits.sum())).backward()
        want_grads = [p.grad.clone() for p in D.parameters()]
        D.zero_grad()
        got = losses.lazy_r1(D, real, 2.0, 16, scale=0.5, per_sample=2)
        assert float(got) == pytest.approx(float(want.detach()), rel=1e-12)
        for g, w in zip([p.grad for p in D.parameters()], want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the D side of Eq. (8), group by group, against one gan_loss_d over the whole batch
    fake = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    D.zero_grad()
    want = gan_loss_d(D(real), D(fake))
    (0.5 * want).backward()
    want_grads = [p.grad.clone() for p in D.parameters()]
    D.zero_grad()
    got = losses.gan_loss_d_backward(D, real, fake, scale=0.5)
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-12)
    for g, w in zip([p.grad for p in D.parameters()], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Eq. (9) total
# --------------------------------------------------------------------------------------------------

def test_lambda_defaults_are_the_papers():
    assert LAMBDA == dict(ortho=1, sync=0.1, id=0.5, rec=1, lpips=1, gan=0.1)


def test_latent_reconstruction_loss_hand_values_gradient_and_errors():
    z_d = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    z_d[:, :, 0] = 5.0                                      # layer 0 differs by 5, layer 2 by 1
    z_d[:, :, 2] = -1.0
    z = torch.zeros_like(z_d, requires_grad=True)
    assert float(losses.latent_reconstruction_loss(z, z_d, (2,)).detach()) == 1.0
    # mean of 5 and 1
    assert float(losses.latent_reconstruction_loss(z, z_d, (0, 2)).detach()) == 3.0
    assert float(losses.latent_reconstruction_loss(z, z_d, (1,)).detach()) == 0.0  # untouched layer
    y = torch.randn(1, 2, 3, 4, dtype=torch.float64)                           # away from |x| kinks
    x = (y + 0.5 * torch.sign(torch.randn_like(y))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: losses.latent_reconstruction_loss(a, y, (0, 2)), (x,))
    with pytest.raises(ValueError, match="latent_reconstruction_loss"):
        losses.latent_reconstruction_loss(z, z_d[:, :1], (0,))


def test_total_loss_is_the_weighted_sum_and_logs_every_term():
    vals = dict(ortho=0.3, sync=0.7, id=0.2, rec=0.05, lpips=0.4, gan=1.3)
    terms = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
    total, logs = total_loss(terms)
    want = 1 * 0.3 + 0.1 * 0.7 + 0.5 * 0.2 + 1 * 0.05 + 1 * 0.4 + 0.1 * 1.3
    assert total.item() == pytest.approx(want)
    assert logs["total"] == pytest.approx(want)
    for k, v in vals.items():
        assert logs[k] == pytest.approx(v)                    # unweighted terms for logging
    total.backward()
    for k in vals:
        assert terms[k].grad.item() == pytest.approx(LAMBDA[k])


def test_total_loss_skips_none_accepts_overrides_and_rejects_bad_terms():
    total, logs = total_loss(dict(rec=torch.tensor(2.0), ortho=None), weights=dict(rec=3.0))
    assert total.item() == 6.0 and "ortho" not in logs
    with pytest.raises(ValueError, match="unknown loss"):
        total_loss(dict(l2=torch.tensor(1.0)))
    with pytest.raises(ValueError, match="unknown weight"):
        total_loss(dict(rec=torch.tensor(1.0)), weights=dict(lambda_rec=1.0))
    with pytest.raises(ValueError, match="scalar"):
        total_loss(dict(rec=torch.ones(3)))
    with pytest.raises(ValueError, match="no loss"):
        total_loss(dict(rec=None))
