"""bench.py: speed of the StyleGAN2 decoder G and discriminator D, and of the fused CUDA ops against
their pure-PyTorch references (stylegan2_ops.py). Results go to BENCHMARKS.md with date and machine.

    python bench.py                  G forward and a G+D step with R1, tiny and paper presets, CPU
    python bench.py --device cuda    the same with the fused ops beside the reference ones, and the
                                     upfirdn2d / bias_act ratios (gpu_check.sh runs it)
"""
import sys
import time

import torch
import torch.nn.functional as F

import files
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


def main(argv=None):
    ap = files.ArgumentParser(description="StyleGAN2 G / D and fused-op speed (BENCHMARKS.md)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu | cuda | cuda:N (cuda adds the fused ops' rows and ratios)")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    bench(device=a.device, impls=("ref", "cuda") if cuda else ("ref",))
    if cuda:
        bench_ops(a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
