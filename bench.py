"""bench.py: speed of the StyleGAN2 decoder G and discriminator D, of the fused CUDA ops against
their pure-PyTorch references (stylegan2_ops.py), and of the metrics (metrics.py) against the
reference implementations their tests compare with. Results go to BENCHMARKS.md with date and
machine.

    python bench.py                  G forward and a G+D step with R1, tiny and paper presets, CPU
    python bench.py --device cuda    the same with the fused ops beside the reference ones, and the
                                     upfirdn2d / bias_act ratios (gpu_check.sh runs it)
    python bench.py --metrics        frames/s of SSIM, MS-SSIM, PSNR, MFCC and SyncNet v2 scoring,
                                     and of the test oracles where installed, on the same frames
"""
import importlib
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import files
import metrics
import stylegan2
import stylegan2_ops as ops


def _timeit(fn, n, sync):
    fn()  # warm-up (and CUDA build / cudnn autotune)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def bench(presets=("tiny", "paper"), batch=4, iters=3, device="cpu", impls=("ref",)):
    """img/s for G forward and for one G+D training step with R1, per preset and op
    implementation."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for name in presets:
        G = stylegan2.Generator.from_preset(name).to(dev)
        D = stylegan2.Discriminator.from_preset(name).to(dev)
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
                loss = loss + 5.0 * stylegan2.r1_penalty(D(real), real)
                loss.backward()

            t_g, t_s = _timeit(g_fwd, iters, sync), _timeit(train_step, iters, sync)
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float(
                "nan")
            rows.append((name, impl, batch, batch / t_g, batch / t_s, mem))
            print(f"{name:6s} {impl:4s} batch {batch}: G forward {batch / t_g:8.1f} img/s | "
                  f"G+D step with R1 {batch / t_s:8.2f} img/s | peak mem {mem:.2f} GiB", flush=True)
    return rows


def bench_ops(device="cuda", iters=50):
    """Pure vs CUDA: upfirdn2d for G's x2 upsample and bias_act (bias + lrelu) on
    [16, 512, 64, 64]."""
    x = torch.randn(16, 512, 64, 64, device=device)
    f, b = ops.make_kernel(gain=4).to(device), torch.randn(512, device=device)
    sync = torch.cuda.synchronize
    for name, op in (("upfirdn2d up2",
                      lambda impl: ops.upfirdn2d(x, f, up=2, pad=(2, 1, 2, 1), impl=impl)),
                     ("bias_act lrelu", lambda impl: ops.bias_act(x, b, impl=impl))):
        t_ref, t_cuda = _timeit(lambda: op("ref"), iters, sync), _timeit(lambda: op("cuda"),
                                                                         iters, sync)
        print(f"{name} [16,512,64,64]: ref {t_ref * 1e3:.2f} ms, cuda {t_cuda * 1e3:.2f} ms, "
              f"ratio {t_ref / t_cuda:.2f}x", flush=True)


# ==== Metric throughput (python bench.py --metrics): ours vs the test-only oracles, same frames ===
def _rate(fn, n_items, repeat=3):
    """Best-of-`repeat` items per second of fn() (best-of filters noise from other processes)."""
    fn()  # warm-up (allocations, lazy init)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def bench_metrics(n=16, size=224, device="cpu"):
    """Print frames/s of our metrics and, where installed, of the oracles on the same frames.
    Oracles: scikit-image (SSIM), pytorch-msssim (SSIM, MS-SSIM), numpy (PSNR),
    python_speech_features (MFCC; 'frames' = seconds of audio x 25). On CPU torch runs on one
    thread: the numpy oracles are single-threaded, and on a busy shared machine extra torch
    threads spin-wait and make every torch number several times worse."""
    if device == "cpu":
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # smooth images
    x = F.avg_pool2d(torch.rand(n, 3, size + 8, size + 8, generator=g), 9, stride=1) * 255
    y = (x + 12 * torch.randn(x.shape, generator=g)).clamp(0, 255)
    xd, yd = x.to(device), y.to(device)
    xn, yn = (t.permute(0, 2, 3, 1).numpy().astype(np.float64) for t in (x, y))
    sec = 10  # seconds of audio
    wav = (torch.randn(sec * metrics.SYNC_SR, generator=g) * 3000).round()
    wn = wav.numpy().astype(np.int16)
    T = 12    # frames of the SyncNet clip
    frames = (torch.rand(T, 3, metrics.SYNC_SIZE, metrics.SYNC_SIZE, generator=g) * 255).to(device)
    audio = torch.randn(T * metrics.SYNC_SR // metrics.SYNC_FPS, generator=g) * 0.1
    net = metrics.SyncNetV2().to(device).eval()  # random weights: the speed does not depend on them
    sync = lambda: torch.cuda.synchronize() if device != "cpu" else None

    # an optional package's row: None when not installed
    def oracle(name, module, fn, items=n, repeat=3):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return name, None
        return name, _rate(lambda: fn(mod), items, repeat)
    rows = [("ssim (ours, float32)", _rate(lambda: (metrics.ssim(xd, yd), sync()), n)),
            ("ms_ssim (ours, float32)", _rate(lambda: (metrics.ms_ssim(xd, yd), sync()), n)),
            ("psnr (ours, float64)", _rate(lambda: (metrics.psnr(xd, yd), sync()), n)),
            ("psnr (numpy float64)", _rate(lambda: [10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
                                                    for a, b in zip(xn, yn)], n)),
            oracle("ssim (scikit-image, per frame)", "skimage.metrics",
                   lambda sk: [sk.structural_similarity(
                       a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                       data_range=255, channel_axis=2) for a, b in zip(xn, yn)], repeat=1),
            oracle("ssim (pytorch-msssim)", "pytorch_msssim",
                   lambda m: m.ssim(x, y, data_range=255, size_average=False)),
            oracle("ms_ssim (pytorch-msssim)", "pytorch_msssim",
                   lambda m: m.ms_ssim(x, y, data_range=255, size_average=False)),
            ("mfcc (ours), video frames/s",
             _rate(lambda: metrics.mfcc(wav.to(device)), sec * metrics.SYNC_FPS)),
            oracle("mfcc (python_speech_features)", "python_speech_features",
                   lambda psf: psf.mfcc(wn, metrics.SYNC_SR), sec * metrics.SYNC_FPS),
            ("sync_scores (ours, SyncNet v2, random w)",
             _rate(lambda: metrics.sync_scores(frames, audio, net), T, repeat=1))]
    print(f"metric throughput, {n} frames {size}x{size} RGB, device {device}, "
          f"{torch.get_num_threads()} threads")
    for name, r in rows:
        print(f"  {name:44s} " + ("not installed" if r is None else f"{r:10.1f} frames/s"))
    return rows


def main(argv=None):
    ap = files.ArgumentParser(description="StyleGAN2 G / D, fused-op and metric speed "
                                          "(BENCHMARKS.md)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu | cuda | cuda:N (cuda adds the fused ops' rows and ratios)")
    ap.add_argument("--metrics", action="store_true",
                    help="instead: metric throughput (metrics.py) vs the test oracles")
    a = ap.parse_args(argv)
    if a.metrics:
        bench_metrics(device=a.device)
        return 0
    cuda = a.device.startswith("cuda")
    bench(device=a.device, impls=("ref", "cuda") if cuda else ("ref",))
    if cuda:
        bench_ops(a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
