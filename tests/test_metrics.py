"""Tests of metrics.py (the Table 1 metrics) against independent oracles:
scikit-image (SSIM), pytorch-msssim (MS-SSIM), python_speech_features (MFCC), the spec's computed
regression values, hand-derived cases (PSNR, LMD, offset search) and naive loops (windowing,
down-sampling, blur); the fidelity and steadiness measures against hand values. Optional
oracles are skipped with pytest.importorskip when missing (the motion probe: test_attributes.py)."""
import importlib.util
import io
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import metrics
import procedural


# ------------------------------------------------------------------------------------ fixtures
def _nchw(a):
    """HxWxC (or HxW) numpy image -> [1, C, H, W] float64 tensor."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].to(torch.float64)


def _jpeg(img, quality):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buf.getvalue())))


@pytest.fixture(scope="module")
def astronaut_pairs():
    """Natural image + three degradations. noisy/blur follow the spec's recipe exactly, so the
    spec's [computed] values (scikit-image 0.26 / pytorch-msssim 1.0) apply to them."""
    data = pytest.importorskip("skimage.data")
    img = data.astronaut()  # 512x512x3 uint8 RGB
    noisy = np.clip(np.round(img + np.random.default_rng(0).normal(0.0, 10.0, img.shape)), 0,
                    255).astype(np.uint8)
    blur = np.clip(np.round(scipy.ndimage.gaussian_filter(img.astype(np.float64), sigma=(2, 2, 0))),
                   0, 255).astype(np.uint8)
    return img, dict(noisy=noisy, blur=blur, jpeg=_jpeg(img, 20))


# ------------------------------------------------------------------------------------ SSIM
def test_blur_valid_matches_depthwise_conv():
    # the obvious version: separable Gaussian as two depthwise convolutions
    x = torch.randn(2, 3, 23, 17, dtype=torch.float64)
    g = metrics._gaussian_window(torch.float64, "cpu")
    ref = F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1).expand(3, 1, 1, 11), groups=3),
                   g.view(1, 1, -1, 1).expand(3, 1, 11, 1), groups=3)
    torch.testing.assert_close(metrics._blur_valid(x), ref, rtol=0, atol=1e-12)
    assert abs(float(g.sum()) - 1) < 1e-15 and float(g[5] / g[4]) == pytest.approx(
        math.exp(1 / 4.5))


@pytest.mark.parametrize("kind", ["noisy", "blur", "jpeg"])
def test_ssim_matches_skimage_rgb(astronaut_pairs, kind):
    from skimage.metrics import structural_similarity
    img, deg = astronaut_pairs
    c = slice(128, 384)  # 256x256 centre: keeps the test fast, the full image is checked below
    img, deg = img[c, c], {k: v[c, c] for k, v in deg.items()}
    ref = structural_similarity(img, deg[kind], gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255, channel_axis=2)
    ours = metrics.ssim(_nchw(img), _nchw(deg[kind]))
    assert ours.shape == (1,) and ours.dtype == torch.float64
    assert abs(float(ours) - ref) < 1e-6
    # uint8 input -> float32 path, same value to 1e-4; [0,1] with data_range 1 gives the same value
    assert abs(float(metrics.ssim(_nchw(img).to(torch.uint8),
                                  _nchw(deg[kind]).to(torch.uint8))) - ref) < 1e-4
    assert abs(float(metrics.ssim(_nchw(img) / 255, _nchw(deg[kind]) / 255,
                                  data_range=1.0)) - ref) < 1e-6


def test_ssim_spec_values_and_luma(astronaut_pairs):
    from skimage.metrics import structural_similarity
    img, deg = astronaut_pairs
    # spec Sec. 4 table, "skimage Wang-compatible SSIM, RGB"
    assert float(metrics.ssim(_nchw(img), _nchw(deg["noisy"]))) == pytest.approx(0.633818, abs=1e-6)
    assert float(metrics.ssim(_nchw(img), _nchw(deg["blur"]))) == pytest.approx(0.809438, abs=1e-6)
    # luma option == scikit-image on the same (unrounded) grey image
    w = np.array(metrics.LUMA)
    for kind in ("noisy", "jpeg"):
        ref = structural_similarity(img @ w, deg[kind] @ w, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
        assert abs(float(metrics.ssim(_nchw(img), _nchw(deg[kind]), color="luma")) - ref) < 1e-6


def test_ssim_batch_is_per_image_and_grey(astronaut_pairs):
    from skimage.metrics import structural_similarity
    data = pytest.importorskip("skimage.data")
    cam = data.camera()[::2, ::2]  # 256x256 grey, C = 1
    degs = [np.clip(cam + np.random.default_rng(s).normal(0, 5 + 10 * s, cam.shape), 0, 255)
            for s in range(3)]
    x = torch.cat([_nchw(cam)] * 3)
    y = torch.cat([_nchw(d) for d in degs])
    ours = metrics.ssim(x, y)
    refs = [structural_similarity(cam.astype(np.float64), d, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=255) for d in degs]
    np.testing.assert_allclose(ours.numpy(), refs, atol=1e-6)
    assert ours[0] > ours[1] > ours[2]  # more noise, lower SSIM


def test_ssim_identical_is_one_and_gradient():
    x = torch.rand(2, 3, 32, 40, dtype=torch.float64)
    torch.testing.assert_close(metrics.ssim(x, x, data_range=1.0),
                               torch.ones(2, dtype=torch.float64))
    # gradcheck on a small float64 case (SSIM is used as a loss elsewhere)
    a = torch.rand(1, 2, 13, 14, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 2, 13, 14, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: metrics.ssim(t, b, data_range=1.0), (a,),
                                    fast_mode=True)
    b3 = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: metrics.ssim(t, b3, data_range=1.0, color="luma"),
                                    (torch.rand(1, 3, 12, 12, dtype=torch.float64,
                                                requires_grad=True),), fast_mode=True)


def test_ssim_bad_inputs():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(x, torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match=">= 11"):
        metrics.ssim(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        metrics.ssim(x[0], x[0])
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(x, x, data_range=0)
    with pytest.raises(ValueError, match="color"):
        metrics.ssim(x, x, color="bgr")
    with pytest.raises(ValueError, match="3 RGB"):
        metrics.ssim(x[:, :1], x[:, :1], color="luma")


# ------------------------------------------------------------------------------------ MS-SSIM
@pytest.mark.parametrize("kind", ["noisy", "blur", "jpeg"])
def test_ms_ssim_matches_pytorch_msssim(astronaut_pairs, kind):
    pm = pytest.importorskip("pytorch_msssim")
    img, deg = astronaut_pairs
    x, y = _nchw(img), _nchw(deg[kind])
    # the centre 224 crop (the full 512 image is checked in test_ms_ssim_spec_values)
    c = slice(144, 368)
    xs, ys = x[..., c, c], y[..., c, c]
    ref = float(pm.ms_ssim(xs, ys, data_range=255, size_average=False))
    # pytorch-msssim keeps its window in float32, which moves its float64 results by ~1e-6
    assert abs(float(metrics.ms_ssim(xs, ys)) - ref) < 1e-5
    assert abs(float(metrics.ms_ssim(xs.float(), ys.float())) - ref) < 1e-4


def test_ms_ssim_spec_values(astronaut_pairs):
    img, deg = astronaut_pairs
    # spec: "pytorch-msssim ms_ssim, RGB, 255" 0.951542 / 0.953506 (own float64 0.951541); crop
    # 0.956570 / 0.938550
    assert float(metrics.ms_ssim(_nchw(img), _nchw(deg["noisy"]))) == pytest.approx(0.951542,
                                                                                    abs=2e-6)
    assert float(metrics.ms_ssim(_nchw(img), _nchw(deg["blur"]))) == pytest.approx(0.953506,
                                                                                   abs=2e-6)
    c = slice(144, 368)
    assert float(metrics.ms_ssim(_nchw(img)[..., c, c],
                                 _nchw(deg["blur"])[..., c, c])) == pytest.approx(0.938550,
                                                                                  abs=2e-6)


def test_halve_matches_naive_loop_on_odd_sides():
    # Wang's MATLAB route: 2x2 mean with the last row/column repeated, then every 2nd pixel
    x = torch.randn(1, 2, 7, 10, dtype=torch.float64)
    H, W = x.shape[-2:]
    ref = torch.zeros(1, 2, (H + 1) // 2, (W + 1) // 2, dtype=torch.float64)
    for i in range(ref.shape[-2]):
        for j in range(ref.shape[-1]):
            rows = [min(2 * i, H - 1), min(2 * i + 1, H - 1)]
            cols = [min(2 * j, W - 1), min(2 * j + 1, W - 1)]
            ref[..., i, j] = sum(x[..., r, c] for r in rows for c in cols) / 4
    torch.testing.assert_close(metrics._halve(x), ref)


def test_ms_ssim_identical_small_and_gradient():
    x = torch.rand(2, 3, 161, 170, dtype=torch.float64)  # smallest legal side, odd sizes
    torch.testing.assert_close(metrics.ms_ssim(x, x, data_range=1.0),
                               torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="> 160"):
        metrics.ms_ssim(torch.rand(1, 3, 160, 224), torch.rand(1, 3, 160, 224))
    with pytest.raises(ValueError, match="> 160"):
        metrics.ms_ssim(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    a = (x[:1] * 0.8 + 0.1).clone().requires_grad_(True)
    y = (a.detach() + 0.05 * torch.randn_like(a)).clamp(0, 1)
    metrics.ms_ssim(a, y, data_range=1.0).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ PSNR
def test_psnr_hand_computed_and_inf():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.zeros(1, 1, 2, 2)
    y[0, 0, 0, 0] = 255  # MSE = 255^2 / 4 -> PSNR = 10 log10(4)
    assert float(metrics.psnr(x, y)) == pytest.approx(10 * math.log10(4), abs=1e-12)
    assert float(metrics.psnr(x / 255, y / 255, data_range=1.0)) == pytest.approx(
        10 * math.log10(4), abs=1e-12)
    # batch: per frame, identical frame -> +inf (not NaN)
    xb, yb = torch.cat([x, x]), torch.cat([y, x])
    out = metrics.psnr(xb, yb)
    assert out.dtype == torch.float64 and out.shape == (2,)
    assert math.isinf(float(out[1])) and out[1] > 0 and not out.isnan().any()


def test_psnr_uint8_no_wraparound():
    x = torch.full((1, 3, 4, 4), 10, dtype=torch.uint8)
    y = torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)
    # uint8 subtraction would give (10 - 250) mod 256 = 16; the true difference is 240
    assert float(metrics.psnr(x, y)) == pytest.approx(20 * math.log10(255 / 240), abs=1e-12)


def test_psnr_spec_values(astronaut_pairs):
    img, deg = astronaut_pairs
    a = torch.from_numpy(img).permute(2, 0, 1)[None]  # uint8 tensors straight in
    assert float(metrics.psnr(a, torch.from_numpy(
        deg["noisy"]).permute(2, 0, 1)[None])) == pytest.approx(28.574696, abs=1e-6)
    assert float(metrics.psnr(a, torch.from_numpy(
        deg["blur"]).permute(2, 0, 1)[None])) == pytest.approx(24.979051, abs=1e-6)


# ------------------------------------------------------------------------------------ MFCC
def test_laplacian_energy_matches_scipy_laplace():
    """Oracle: scipy.ndimage.laplace (the same 5-point stencil) on BT.601 luminance, interior pixels
    only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 17, 19), generator=g).float()
    mask = torch.rand(3, 17, 19, generator=g) > 0.4
    y = (x.double().numpy() * np.array(metrics.LUMA).reshape(1, 3, 1, 1)).sum(1)
    lap = np.stack([scipy.ndimage.laplace(f) for f in y])[:, 1:-1, 1:-1]
    want = float((lap ** 2 * mask.numpy()[:, 1:-1, 1:-1]).sum())
    assert metrics.laplacian_energy(x, mask) == pytest.approx(want, rel=1e-12)


def test_fidelity_hand_cases():
    """The truth against itself: as sharp, no error, PSNR inf; a blurred copy is less sharp; a
    colour shift of +10 grey levels on the backdrop only reads exactly 10 there and 0 on the
    skin."""
    ident = procedural.make_identity(procedural.TEST_IDS[3])
    motion = procedural.make_motion(procedural.MOTION_BASE["test"] + 3, 4)[0]
    gt = torch.from_numpy(procedural.render_clip(ident, motion)).permute(0, 3, 1, 2).double()
    masks = procedural.region_masks(ident, motion)
    same = metrics.fidelity(gt, gt, masks)
    assert same["sharpness"] == 1 and same["background_err"] == same["skin_err"] == 0 and same[
        "psnr"] == math.inf
    blurred = torch.from_numpy(scipy.ndimage.gaussian_filter(gt.numpy(), (0, 0, 1, 1)))
    assert metrics.fidelity(blurred, gt, masks)["sharpness"] < 0.5
    bg = torch.from_numpy(masks["background"])[:, None]
    shifted = torch.where(bg, (gt + 10).clamp(max=255), gt)
    f = metrics.fidelity(shifted, gt, masks)
    # clamped pixels move less than 10
    exact = float(((shifted - gt).abs().mean(1))[bg[:, 0]].mean())
    assert f["background_err"] == pytest.approx(exact) and 9 < exact <= 10 and f["skin_err"] == 0


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(1)
    # generic, exactly one window, shorter, one more, tiny
    for n in (16000 + 123, 400, 399, 401, 57):
        audio = np.round(rng.normal(0, 3000, n)).astype(np.int16)
        ref = psf.mfcc(audio, 16000)  # [T, 13]
        ours = metrics.mfcc(torch.from_numpy(audio))
        assert ours.shape == (13, ref.shape[0])
        np.testing.assert_allclose(ours.T.numpy(), ref, rtol=1e-9, atol=1e-9)
    # silence: every energy is exactly 0 -> the eps floors; psf gives log(eps) everywhere in c0
    z = np.zeros(1000, dtype=np.int16)
    np.testing.assert_allclose(metrics.mfcc(torch.from_numpy(z)).T.numpy(), psf.mfcc(z, 16000),
                               atol=1e-9)


def test_mfcc_spec_regression_vector():
    # spec Sec. 3: input A (0.5 sin 440 Hz + 0.1 sin 3 kHz, 1 s) x 32767 rounded to int16
    t = np.arange(16000) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    m = metrics.mfcc(torch.from_numpy(np.round(x * 32767).astype(np.int16)))
    assert m.shape == (13, 99)
    np.testing.assert_allclose(m[:3, 0].numpy(), [21.4510, 4.0105, -0.3497], atol=1e-4)
    # [-1,1] scaling moves only c0, by ln(32767^2) here
    m_f = metrics.mfcc(torch.from_numpy(np.round(x * 32767).astype(np.float64) / 32767))
    np.testing.assert_allclose((m - m_f)[1:].numpy(), 0, atol=1e-8)
    np.testing.assert_allclose((m - m_f)[0].numpy(), 2 * math.log(32767), atol=1e-8)
    with pytest.raises(ValueError, match="mono"):
        metrics.mfcc(torch.zeros(2, 100))


# ------------------------------------------------------------------------------------ SyncNet v2
def _published_keys():
    """Key names of syncnet_v2.model, from the conv/BN positions of syncnet_python's S."""
    keys = []
    for tower in ("netcnnaud", "netcnnlip"):
        for i in (0, 4, 8, 11, 14, 18):
            keys += [f"{tower}.{i}.weight", f"{tower}.{i}.bias"]
            keys += [f"{tower}.{i + 1}.{p}" for p in ("weight", "bias", "running_mean",
                                                      "running_var", "num_batches_tracked")]
    for head in ("netfcaud", "netfclip"):
        keys += [f"{head}.0.weight", f"{head}.0.bias", f"{head}.3.weight", f"{head}.3.bias"]
        keys += [f"{head}.1.{p}" for p in ("weight", "bias", "running_mean", "running_var",
                                           "num_batches_tracked")]
    return keys


def _random_syncnet():
    net = metrics.SyncNetV2()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is really exercised
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


def test_syncnet_layout_and_shapes():
    net = metrics.SyncNetV2()
    sd = net.state_dict()
    # spec: 102 entries, 88 w/o counters
    assert sorted(sd) == sorted(_published_keys()) and len(sd) == 102
    assert sum(p.numel() for p in net.parameters()) == 13_631_616      # spec [computed]
    assert sd["netcnnlip.0.weight"].shape == (96, 3, 5, 7, 7)
    assert sd["netcnnaud.18.weight"].shape == (512, 256, 5, 4)
    assert sd["netcnnlip.18.weight"].shape == (512, 256, 1, 6, 6)
    assert sd["netfclip.3.weight"].shape == (1024, 512)
    net.eval()
    with torch.no_grad():
        assert net.embed_audio(torch.randn(3, 1, 13, 20)).shape == (3, 1024)
        assert net.embed_lips(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)


def test_load_syncnet_v2_roundtrip_and_errors(tmp_path):
    net = _random_syncnet()
    sd = {k: v.clone() for k, v in net.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    p = tmp_path / "syncnet_v2.model"
    torch.save(sd, p)  # published layout: plain state dict (here without the BN counters)
    loaded = load = metrics.load_syncnet_v2(str(p))
    assert not loaded.training
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 1, 13, 20)
    with torch.no_grad():
        torch.testing.assert_close(load.embed_audio(x), net.embed_audio(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        metrics.load_syncnet_v2(str(tmp_path / "nope.model"))
    bad = dict(sd, extra=torch.zeros(1))
    torch.save(bad, tmp_path / "extra.model")
    with pytest.raises(ValueError, match="unexpected keys"):
        metrics.load_syncnet_v2(str(tmp_path / "extra.model"))
    bad = {k: v for k, v in sd.items() if k != "netfclip.3.bias"}
    torch.save(bad, tmp_path / "missing.model")
    with pytest.raises(ValueError, match="netfclip.3.bias"):
        metrics.load_syncnet_v2(str(tmp_path / "missing.model"))
    bad = dict(sd, **{"netfcaud.3.weight": torch.zeros(512, 512)})
    torch.save(bad, tmp_path / "shape.model")
    with pytest.raises(ValueError, match="shape mismatches"):
        metrics.load_syncnet_v2(str(tmp_path / "shape.model"))
    torch.save({"state_dict": sd}, tmp_path / "wrapped.model")
    with pytest.raises(ValueError, match="plain state dict"):
        metrics.load_syncnet_v2(str(tmp_path / "wrapped.model"))


def _naive_scores(v, a, vshift):
    """syncnet_python's calc_pdist + scoring, written as its per-frame loop with
    pairwise_distance."""
    a_pad = F.pad(a, (0, 0, vshift, vshift))
    dists = [F.pairwise_distance(v[[i]].repeat(2 * vshift + 1, 1), a_pad[i:i + 2 * vshift + 1])
             for i in range(len(v))]
    mdist = torch.stack(dists, 1).mean(1)
    minval, minidx = mdist.min(0)
    return float(minval), float(mdist.median() - minval), vshift - int(minidx), mdist


@pytest.mark.parametrize("k", [-4, 0, 3, 15])
def test_offset_search_finds_constructed_shift(k):
    n, D = 40, 16
    v = torch.randn(n, D, dtype=torch.float64)
    a = torch.randn(n, D, dtype=torch.float64) * 2
    for i in range(n):  # the lip window i is matched by the audio window i + k
        if 0 <= i + k < n:
            a[i + k] = v[i]
    out = metrics.lse_from_embeddings(v, a, vshift=15)
    d, c, off, mdist = _naive_scores(v, a, 15)
    assert out["offset"] == off == -k
    assert out["lse_d"] == pytest.approx(d, abs=1e-12) and out["lse_c"] == pytest.approx(
        c, abs=1e-12)
    torch.testing.assert_close(out["mdist"], mdist)
    # LSE-C = median - min: sorted 16th value minus the smallest, by hand
    s = np.sort(mdist.numpy())
    assert out["lse_c"] == pytest.approx(s[15] - s[0], abs=1e-12)
    assert out["lse_c"] > 0


def test_sync_scores_windowing_matches_naive_loop():
    net = _random_syncnet()
    T, H = 9, 40
    g = torch.Generator().manual_seed(3)
    frames = (torch.rand(T, 3, H, H, generator=g) * 255).to(torch.uint8)
    # 8 frames of audio
    audio_i16 = (torch.randn(8 * 640 + 300, generator=g) * 2000).round().to(torch.int16)
    # float audio path
    out = metrics.sync_scores(frames, audio_i16.float() / 32768, net, vshift=5, batch_size=2)
    L = 8
    assert out["n_windows"] == L - 5
    # naive oracle: window by window, MFCC from python_speech_features when installed
    try:
        import python_speech_features as psf
        cc = torch.from_numpy(psf.mfcc(audio_i16.numpy(), 16000).T.copy()).float()
    except ImportError:
        cc = metrics.mfcc(audio_i16).float()
    v, a = [], []
    with torch.no_grad():
        for i in range(L - 5):
            fr = [F.interpolate(frames[t][[2, 1, 0]][None].float(), size=(224, 224),
                                mode="bilinear", align_corners=False)[0]
                  for t in range(i, i + 5)]  # BGR, 224
            v.append(net.embed_lips(torch.stack(fr, 1)[None]))  # [1, 3, 5, 224, 224]
            a.append(net.embed_audio(cc[:, 4 * i:4 * i + 20][None, None]))
    d, c, off, _ = _naive_scores(torch.cat(v), torch.cat(a), 5)
    assert out["lse_d"] == pytest.approx(d, rel=1e-4) and out["lse_c"] == pytest.approx(c, rel=1e-3,
                                                                                        abs=1e-4)
    assert out["offset"] == off
    assert metrics.lse(frames, audio_i16, net, vshift=5) == pytest.approx(
        (out["lse_d"], out["lse_c"]), rel=1e-4, abs=1e-4)


def test_sync_scores_bad_inputs():
    net = metrics.SyncNetV2().eval()
    frames = torch.rand(8, 3, 32, 32) * 255
    with pytest.raises(ValueError, match="16000 Hz"):
        metrics.sync_scores(frames, torch.zeros(8 * 640), net, sample_rate=22050)
    with pytest.raises(ValueError, match="at least 6 frames"):
        metrics.sync_scores(frames[:5], torch.zeros(8 * 640), net)
    with pytest.raises(ValueError, match="at least 6 frames"):
        metrics.sync_scores(frames, torch.zeros(5 * 640 + 639), net)  # audio too short
    with pytest.raises(ValueError, match="0..255"):
        metrics.sync_scores(frames / 127.5 - 1, torch.zeros(8 * 640), net)
    with pytest.raises(ValueError, match="mono"):
        metrics.sync_scores(frames, torch.zeros(2, 8 * 640), net)
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        metrics.sync_scores(frames[:, :1], torch.zeros(8 * 640), net)


# ------------------------------------------------------------------------------------ LMD
def _mouth(rng):
    pts = np.stack([np.cos(np.linspace(0, 2 * np.pi, 20, endpoint=False)) * 20,
                    np.sin(np.linspace(0, 2 * np.pi, 20, endpoint=False)) * 8], 1) + [112, 160]
    return pts + rng.normal(0, 1, pts.shape)


def test_lmd_from_landmarks_known_cases():
    rng = np.random.default_rng(0)
    gt = np.stack([_mouth(rng) for _ in range(4)])  # [T, 20, 2]
    # 1) whole mouth translated: centring removes it -> 0
    assert float(metrics.lmd_from_landmarks(gt + [7.0, -3.0], gt).abs().max()) < 1e-12
    # 2) one point moved by (3, 4): that point is off by 19/20 * 5, the other 19 by 1/20 * 5 each
    #    -> mean over 20 points = (19/20 * 5 + 19 * 5/20) / 20 = 0.475
    gen = gt.copy()
    gen[:, 7] += [3.0, 4.0]
    np.testing.assert_allclose(metrics.lmd_from_landmarks(gen, gt).numpy(), 0.475, atol=1e-12)
    # 3) mouth scaled by s about its centroid: distance = (s - 1) * mean radius
    c = gt.mean(1, keepdims=True)
    gen = c + 1.5 * (gt - c)
    np.testing.assert_allclose(metrics.lmd_from_landmarks(gen, gt).numpy(),
                               0.5 * np.linalg.norm(gt - c, axis=-1).mean(1), atol=1e-12)
    # 4) 68-point input: only points 48..67 count
    full_gt = rng.normal(100, 30, (4, 68, 2))
    full_gen = full_gt + rng.normal(0, 5, full_gt.shape)
    full_gen[:, 48:68] = full_gt[:, 48:68]
    assert float(metrics.lmd_from_landmarks(full_gen, full_gt).abs().max()) < 1e-12
    # missing frame -> NaN for that frame only
    gen = gt.copy()
    gen[2] = np.nan
    out = metrics.lmd_from_landmarks(gen, gt)
    assert out[2].isnan() and not out[[0, 1, 3]].isnan().any()
    with pytest.raises(ValueError, match="landmarks"):
        metrics.lmd_from_landmarks(gt[:, :10], gt[:, :10])


def test_lmd_counts_missing_faces_and_scales_to_224():
    rng = np.random.default_rng(0)
    base = np.zeros((68, 2))
    base[48:68] = _mouth(rng) / 2  # landmarks of a 112x112 frame

    # grey level 0: no face; level v: mouth point 0 moved right by v/10 px
    def fake_landmarker(gray):
        v = int(gray[0, 0])
        if v == 0:
            return None
        pts = base.copy()
        pts[48, 0] += v / 10
        return pts

    def video(levels):
        return torch.stack([torch.full((3, 112, 112), float(v)) for v in levels])

    out = metrics.lmd(video([10, 0, 10, 50, 30]), video([10, 10, 0, 10, 10]),
                      landmarker=fake_landmarker)
    assert (out["n_frames"], out["n_used"], out["n_missing_gen"], out["n_missing_gt"]) == (
        5, 3, 1, 1)
    # per frame, one point off by dx (x only) -> 1.9 |dx| / 20, then x2 for 112 -> 224 pixels
    expected = [0.0, math.nan, math.nan, 1.9 * 4.0 / 20 * 2, 1.9 * 2.0 / 20 * 2]
    np.testing.assert_allclose(out["per_frame"].numpy(), expected, atol=1e-9)
    assert out["lmd"] == pytest.approx(np.nanmean(expected), abs=1e-12)
    none = metrics.lmd(video([0, 0]), video([10, 10]), landmarker=fake_landmarker)
    assert math.isnan(none["lmd"]) and none["n_used"] == 0 and none["n_missing_gen"] == 2
    with pytest.raises(ValueError, match="same"):
        metrics.lmd(video([10]), video([10, 10]), landmarker=fake_landmarker)


def test_lmd_real_dlib_on_a_photo():
    pytest.importorskip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face_recognition_models not installed")
    from PIL import Image
    data = pytest.importorskip("skimage.data")
    img = np.array(Image.fromarray(data.astronaut()).resize((256, 256), Image.BILINEAR))
    face = torch.from_numpy(img).permute(2, 0, 1)  # [3, 256, 256] uint8 RGB
    moved = torch.roll(face, shifts=(5, -4), dims=(1, 2))  # the whole head translated
    black = torch.zeros_like(face)
    gen, gt = torch.stack([face, moved, black]), torch.stack([face, face, face])
    lm = metrics.mouth_landmarks(gt[:1])
    if lm.isnan().any():
        pytest.skip("dlib found no face in the test photo")
    out = metrics.lmd(gen, gt)
    assert out["n_missing_gen"] == 1 and out["n_missing_gt"] == 0 and out["n_used"] == 2
    assert float(out["per_frame"][0]) == 0.0       # same image, same landmarks
    # translation is removed up to detector jitter (224 px units)
    assert float(out["per_frame"][1]) < 2.0
    mouth_c = lm[0].mean(0)                        # the mouth sits in the lower middle of the face
    assert 100 < float(mouth_c[0]) < 170 and 60 < float(mouth_c[1]) < 160, mouth_c


def test_lmd_points_matches_20_point_version_and_hand_case():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 20, 2)) * 10, rng.normal(size=(4, 20, 2)) * 10
    torch.testing.assert_close(metrics.lmd_points(a, b), metrics.lmd_from_landmarks(a, b), rtol=0,
                               atol=1e-12)
    # 4 points, one moved by (3, 4) (length 5): the centroid moves by d/4, so that point is off by
    # 3/4*5 and the three others by 1/4*5: mean (3.75 + 3 * 1.25) / 4 = 1.875
    gt = torch.tensor([[[0.0, 0], [10, 0], [5, -3], [5, 3]]])
    gen = gt.clone()
    gen[0, 1] += torch.tensor([3.0, 4.0])
    assert float(metrics.lmd_points(gen, gt)[0]) == pytest.approx(1.875, abs=1e-12)
    assert float(metrics.lmd_points(gt + 7, gt)[0]) == 0  # translation removed
    with pytest.raises(ValueError, match="landmarks"):
        metrics.lmd_points(gt, gt[:, :3])


# ------------------------------------------------------------------------------------ steadiness
def test_flicker_separates_window_borders_hand_values():
    """Window 3 over T=7: pairs (2,3) and (5,6) straddle borders. A sequence that only jumps at
    borders has inside change 0; a ramp has equal change everywhere (ratio 1)."""
    jumps = torch.tensor([0, 0, 0, 5, 5, 5, 9], dtype=torch.float64)[:, None]
    f = metrics.flicker(jumps, 3)
    assert f["border"] == pytest.approx((5 + 4) / 2) and f["inside"] == 0 and f["ratio"] is None
    ramp = torch.arange(7, dtype=torch.float64)[:, None, None] * torch.ones(1, 2, 2)
    f = metrics.flicker(ramp, 3)
    assert (f["border"] == pytest.approx(1) and f["inside"] == pytest.approx(1)
            and f["ratio"] == pytest.approx(1))
    assert (metrics.flicker(ramp, None)["ratio"] is None
            and metrics.flicker(ramp[:1], 3)["border"] is None)
    f = metrics.flicker(ramp[:3], 5)                    # one window: no border pair at all
    assert f["border"] is None and f["inside"] == pytest.approx(1)


def test_steadiness_hand_values():
    """jitter = mean |x_t+1 - x_t| of gen / of truth; seam = gen's border/inside ratio over the
    truth's. A truth that ramps by 1 per frame; gen ramps by 2 inside windows of 3 and jumps by 8 at
    the borders."""
    truth = torch.arange(7, dtype=torch.float64)[:, None]
    gen = torch.tensor([0, 2, 4, 12, 14, 16, 24], dtype=torch.float64)[:, None]
    s = metrics.steadiness(gen, truth, 3)
    steps = [2, 2, 8, 2, 2, 8]
    assert s["jitter"] == pytest.approx(sum(steps) / 6) and s["seam"] == pytest.approx(8 / 2)
    assert metrics.steadiness(truth, truth, 3) == dict(jitter=1.0, seam=1.0)
    still = metrics.steadiness(torch.zeros(7, 1), truth, 3)  # a still copy: no motion, no seam
    assert still["jitter"] == 0 and still["seam"] is None
