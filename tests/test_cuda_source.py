"""Checks of stylegan2_ops.cu that need no GPU.

1. The index arithmetic of both upfirdn2d kernels (simple and tiled), transliterated line by line
   into Python below, against an independent oracle: scipy.signal.upfirdn along each axis with a
   separable filter (upfirdn2d's definition: zero-stuff, pad/crop, true convolution, keep every
   down-th sample, as in NVlabs/stylegan2-ada-pytorch's torch_utils/ops/upfirdn2d.py), over a grid
   of up/down/pad/filter sizes including negative pads (crops), up != down on each axis and
   asymmetric filters (which catch a missing flip). The mirrors also assert every
   shared-memory/global index they form is in range and that every output pixel is written exactly
   once.
   KEEP IN SYNC with stylegan2_ops.cu: each mirror uses the kernel's variable names and loop
   structure; a change to a tap loop there must be made here too.
2. The bias_act kernel's channel indexing and its two modes, mirrored, against torch autograd.
3. nvcc compiles the real file (compile only; slow) with torch's headers and the flags torch's
   JIT build uses. Skips with a reason when nvcc or the headers are missing.
The kernels themselves run only on a GPU: the CUDA-vs-pure parity tests live in test_stylegan2.py.
"""
import itertools
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

signal = pytest.importorskip("scipy.signal")

CU_FILE = Path(__file__).resolve().parents[1] / "stylegan2_ops.cu"


# --------------------------------------------------------------------------------------------
# Python mirrors of the CUDA integer helpers. C semantics on purpose: '/' and '%' truncate
# toward zero in C, so we emulate that (Python's // and % floor instead) to mirror the kernel.
# --------------------------------------------------------------------------------------------
def c_div(a, m):
    """C/CUDA integer '/': truncates toward zero."""
    q = abs(a) // abs(m)
    return q if (a >= 0) == (m >= 0) else -q


def c_mod(a, m):
    """C/CUDA integer '%': the sign follows a."""
    return a - c_div(a, m) * m


def pos_mod(a, m):     # stylegan2_ops.cu: pos_mod
    return c_mod(c_mod(a, m) + m, m)


def floor_div(a, m):   # stylegan2_ops.cu: floor_div
    return c_div(a - pos_mod(a, m), m)


def ceil_div(a, m):    # stylegan2_ops.cu: ceil_div
    return -floor_div(-a, m)


def out_size(L, up, down, p0, p1, K):
    """Host-side output length in upfirdn2d(): (L up + p0 + p1 - K + down) // down."""
    num = L * up + p0 + p1 - K + down
    return c_div(num, down) if num > 0 else 0


# --------------------------------------------------------------------------------------------
# Mirror of upfirdn2d_naive_kernel: one "thread" per output pixel. x: [H, W] (one plane).
# --------------------------------------------------------------------------------------------
def naive_kernel_mirror(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
    in_h, in_w = x.shape
    kh, kw = f.shape
    out_h = out_size(in_h, up_y, down_y, pad_y0, pad_y1, kh)
    out_w = out_size(in_w, up_x, down_x, pad_x0, pad_x1, kw)
    y = np.zeros((out_h, out_w))
    for idx in range(out_h * out_w):
        ox = idx % out_w
        oy = c_div(idx, out_w) % out_h
        base_y = oy * down_y - pad_y0
        base_x = ox * down_x - pad_x0
        ky_first = max(pos_mod(-base_y, up_y), -base_y)
        kx_first = max(pos_mod(-base_x, up_x), -base_x)
        ky_end = min(kh, (in_h - 1) * up_y - base_y + 1)
        kx_end = min(kw, (in_w - 1) * up_x - base_x + 1)
        acc = 0.0
        for ky in range(ky_first, ky_end, up_y):
            assert (base_y + ky) % up_y == 0          # only real (non-inserted) samples
            iy = c_div(base_y + ky, up_y)
            assert 0 <= iy < in_h and 0 <= kh - 1 - ky < kh
            for kx in range(kx_first, kx_end, up_x):
                assert (base_x + kx) % up_x == 0
                ix = c_div(base_x + kx, up_x)
                assert 0 <= ix < in_w and 0 <= kw - 1 - kx < kw
                acc += x[iy, ix] * f[kh - 1 - ky, kw - 1 - kx]
        y[oy, ox] = acc
    return y


# --------------------------------------------------------------------------------------------
# Mirror of upfirdn2d_tiled_kernel. The CUDA file uses TILE_W = TILE_H = 32, BLOCK_H = 8; the
# index logic is generic in the tile size, so the test also runs small tiles (many tiles, partial
# tiles at the edges) on small planes.
# --------------------------------------------------------------------------------------------
def tile_in_extent(T, up, down, K):  # stylegan2_ops.cu: tile_in_extent
    return c_div((T - 1) * down + K - 1, up) + 1


def tiled_kernel_mirror(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1,
                        TILE_W=32, TILE_H=32, BLOCK_H=8):
    in_h, in_w = x.shape
    kh, kw = f.shape
    out_h = out_size(in_h, up_y, down_y, pad_y0, pad_y1, kh)
    out_w = out_size(in_w, up_x, down_x, pad_x0, pad_x1, kw)
    # Host: shared memory holds at most ext_h_max x ext_w_max samples (rows of pitch ext_w_max).
    ext_h_max = tile_in_extent(TILE_H, up_y, down_y, kh)
    ext_w_max = tile_in_extent(TILE_W, up_x, down_x, kw)
    y = np.full((out_h, out_w), np.nan)
    writes = np.zeros((out_h, out_w), dtype=int)
    for by, bx in itertools.product(range(-(-out_h // TILE_H)), range(-(-out_w // TILE_W))):
        tile_ox0 = bx * TILE_W
        tile_oy0 = by * TILE_H
        ix0 = ceil_div(tile_ox0 * down_x - pad_x0, up_x)
        iy0 = ceil_div(tile_oy0 * down_y - pad_y0, up_y)
        ix1 = floor_div((tile_ox0 + TILE_W - 1) * down_x - pad_x0 + kw - 1, up_x)
        iy1 = floor_div((tile_oy0 + TILE_H - 1) * down_y - pad_y0 + kh - 1, up_y)
        ext_w = max(ix1 - ix0 + 1, 0)
        ext_h = max(iy1 - iy0 + 1, 0)
        assert ext_w <= ext_w_max and ext_h <= ext_h_max   # fits the shared memory asked for
        # Load the window, zero-filled outside the plane (flat sx with pitch ext_w_max).
        sx = np.full(ext_h_max * ext_w_max, np.nan)        # NaN: an unloaded slot is never read
        for t in range(ext_h * ext_w):
            r, c = c_div(t, ext_w), t % ext_w
            gy, gx = iy0 + r, ix0 + c
            inside = 0 <= gy < in_h and 0 <= gx < in_w
            sx[r * ext_w_max + c] = x[gy, gx] if inside else 0.0
        for ty, tx in itertools.product(range(BLOCK_H), range(TILE_W)):
            ox = tile_ox0 + tx
            for oy in range(tile_oy0 + ty, tile_oy0 + TILE_H, BLOCK_H):
                if ox >= out_w or oy >= out_h:
                    continue
                base_y = oy * down_y - pad_y0
                base_x = ox * down_x - pad_x0
                ky_first = pos_mod(-base_y, up_y)
                kx_first = pos_mod(-base_x, up_x)
                acc = 0.0
                for ky in range(ky_first, kh, up_y):
                    sy = c_div(base_y + ky, up_y) - iy0
                    assert 0 <= sy < ext_h
                    for kx in range(kx_first, kw, up_x):
                        sxi = c_div(base_x + kx, up_x) - ix0
                        assert 0 <= sxi < ext_w
                        acc += sx[sy * ext_w_max + sxi] * f[kh - 1 - ky, kw - 1 - kx]
                y[oy, ox] = acc
                writes[oy, ox] += 1
    assert (writes == 1).all(), "every output pixel must be written exactly once"
    return y


# --------------------------------------------------------------------------------------------
# Oracle (independent of the code above): scipy.signal.upfirdn along each axis.
# Y = upfirdn(f1, x, up) is the full convolution of the zero-stuffed signal (no trailing
# zeros); out[n] = Y[n*down + K - 1 - p0], 0 outside Y.
# --------------------------------------------------------------------------------------------
def scipy_axis(x, f1, up, down, p0, p1, axis):
    Y = signal.upfirdn(f1, x, up=up, down=1, axis=axis)
    K, L = len(f1), x.shape[axis]
    n_out = out_size(L, up, down, p0, p1, K)
    src = np.arange(n_out) * down + K - 1 - p0
    ok = (src >= 0) & (src < Y.shape[axis])
    out = np.zeros_like(np.take(Y, np.zeros(n_out, dtype=int), axis=axis))
    idx = [slice(None)] * Y.ndim
    idx[axis] = np.nonzero(ok)[0]
    out[tuple(idx)] = np.take(Y, src[ok], axis=axis)
    return out


def scipy_upfirdn2d(x, fy, fx, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
    t = scipy_axis(x, fx, up_x, down_x, pad_x0, pad_x1, axis=1)   # along W
    return scipy_axis(t, fy, up_y, down_y, pad_y0, pad_y1, axis=0)  # then along H


# Per-axis settings: (up, down, p0, p1, K). Covers the StyleGAN2 cases (up 2 pad (2,1) K 4;
# down 2 pad (1,1) K 4; blur pad (2,2), (1,1)), crops, up 3 / down 2, and K from 1 to 5.
AXIS_CASES = [
    (1, 1, 0, 0, 1), (1, 1, 1, 1, 3), (2, 1, 2, 1, 4), (2, 1, 1, 1, 4), (1, 2, 1, 1, 4),
    (1, 2, 2, 2, 4), (1, 1, 2, 2, 4), (3, 2, 1, 0, 4), (2, 3, 0, 2, 5), (2, 2, -1, 3, 3),
    (1, 1, -2, -1, 2), (3, 1, -2, 4, 5), (1, 3, 3, -1, 4), (4, 1, 0, -3, 2), (2, 1, -3, -2, 4),
]


def _axis_pairs():
    # Pair each x-case with two different y-cases so x/y mix-ups show up.
    n = len(AXIS_CASES)
    return [(AXIS_CASES[i], AXIS_CASES[(i + s) % n]) for i in range(n) for s in (0, 5)]


@pytest.mark.parametrize("cx,cy", _axis_pairs())
def test_kernel_index_mirrors_match_scipy(cx, cy):
    up_x, down_x, pad_x0, pad_x1, kw = cx
    up_y, down_y, pad_y0, pad_y1, kh = cy
    rng = np.random.default_rng(0)
    in_h, in_w = 5, 6
    x = rng.standard_normal((in_h, in_w))
    fy, fx = rng.random(kh) + 0.1, rng.random(kw) + 0.1   # asymmetric: a lost flip shows
    f = np.outer(fy, fx)
    args = (up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1)
    if out_size(in_h, up_y, down_y, pad_y0, pad_y1, kh) <= 0 or \
            out_size(in_w, up_x, down_x, pad_x0, pad_x1, kw) <= 0:
        pytest.skip("empty output: the host rejects it before launching")
    want = scipy_upfirdn2d(x, fy, fx, *args)
    np.testing.assert_allclose(naive_kernel_mirror(x, f, *args), want, rtol=0, atol=1e-12)
    for tw, th, bh in [(32, 32, 8), (4, 3, 1), (3, 4, 2)]:    # CUDA sizes, then small tiles
        got = tiled_kernel_mirror(x, f, *args, TILE_W=tw, TILE_H=th, BLOCK_H=bh)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_mirrors_on_non_separable_filter_vs_direct_loop():
    # Second oracle, not separable: the op's four steps (zero-stuff, pad, convolve, subsample) done
    # literally with numpy.
    rng = np.random.default_rng(1)
    x, f = rng.standard_normal((4, 5)), rng.standard_normal((3, 4))
    up_x, up_y, down_x, down_y, px0, px1, py0, py1 = 2, 3, 1, 2, 2, -1, -2, 3
    z = np.zeros((4 * up_y, 5 * up_x)); z[::up_y, ::up_x] = x              # 1. zero-insertion
    z = np.pad(z, ((max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))  # 2. pad ...
    z = z[max(-py0, 0):z.shape[0] - max(-py1, 0), max(-px0, 0):z.shape[1] - max(-px1, 0)]  # crop
    ff = f[::-1, ::-1]                                                    # 3. true convolution
    c = np.array([[(z[i:i + 3, j:j + 4] * ff).sum() for j in range(z.shape[1] - 3)]
                  for i in range(z.shape[0] - 2)])
    want = c[::down_y, ::down_x]                                          # 4. decimation
    args = (up_x, up_y, down_x, down_y, px0, px1, py0, py1)
    np.testing.assert_allclose(naive_kernel_mirror(x, f, *args), want, atol=1e-12)
    np.testing.assert_allclose(tiled_kernel_mirror(x, f, *args, TILE_W=3, TILE_H=2, BLOCK_H=1),
                               want, atol=1e-12)


def test_oracle_comparison_can_fail():
    # The oracle comparison must be able to fail: shift the phase by one and it should.
    x, f = np.arange(12.0).reshape(3, 4), np.outer([1.0, 3, 3, 1], [1.0, 2, 3, 4])
    good = naive_kernel_mirror(x, f, 2, 2, 1, 1, 2, 1, 2, 1)
    shifted = naive_kernel_mirror(x, f, 2, 2, 1, 1, 1, 2, 2, 1)   # pad_x0 off by one
    assert not np.allclose(good, shifted)
    fy, fx = np.array([1.0, 3, 3, 1]), np.array([1.0, 2, 3, 4])
    np.testing.assert_allclose(good, scipy_upfirdn2d(x, fy, fx, 2, 2, 1, 1, 2, 1, 2, 1))


def test_c_integer_helpers():
    assert (c_div(-3, 2), c_mod(-3, 2)) == (-1, -1)        # C truncation, unlike Python
    assert (pos_mod(-3, 2), floor_div(-3, 2), ceil_div(-3, 2)) == (1, -2, -1)
    for a, m in itertools.product(range(-9, 10), range(1, 5)):
        assert pos_mod(a, m) == a % m and floor_div(a, m) == a // m
        assert ceil_div(a, m) == -((-a) // m)


# --------------------------------------------------------------------------------------------
# Mirror of bias_act_kernel (flat index -> channel) against torch autograd.
# --------------------------------------------------------------------------------------------
def bias_act_kernel_mirror(x, b, ref, grad, alpha, gain):
    xf = x.reshape(-1)
    numel = xf.size
    has_bias = grad == 0 and b.size > 0
    C = x.shape[1] if has_bias else 1
    inner = c_div(numel, x.shape[0] * C) if has_bias else 1
    y = np.empty(numel)
    for idx in range(numel):
        v = xf[idx]
        if grad == 0:
            vb = v + b[c_div(idx, inner) % C] if has_bias else v
            y[idx] = gain * (vb if vb > 0 else alpha * vb)
        else:
            r = ref.reshape(-1)[idx]
            y[idx] = v * gain * (1.0 if r > 0 else alpha)
    return y.reshape(x.shape)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 5), (1, 4, 7)])
def test_bias_act_mirror_matches_autograd(shape):
    alpha, gain = 0.2, 2 ** 0.5
    x = torch.randn(shape, dtype=torch.float64)
    b = torch.randn(shape[1], dtype=torch.float64)
    v = (x + b.view(1, -1, *[1] * (len(shape) - 2))).requires_grad_(True)
    y = gain * torch.nn.functional.leaky_relu(v, alpha)
    g = torch.randn(shape, dtype=torch.float64)
    (dv,) = torch.autograd.grad(y, v, g)
    y_m = bias_act_kernel_mirror(x.numpy(), b.numpy(), np.empty(0), 0, alpha, gain)
    np.testing.assert_allclose(y_m, y.detach().numpy(), atol=1e-12)
    dv_m = bias_act_kernel_mirror(g.numpy(), np.empty(0), y_m, 1, alpha, gain)
    np.testing.assert_allclose(dv_m, dv.numpy(), atol=1e-12)
    # no bias (numel 0) = plain activation
    np.testing.assert_allclose(bias_act_kernel_mirror(x.numpy(), np.empty(0), None, 0, alpha, 1.0),
                               torch.nn.functional.leaky_relu(x, alpha).numpy(), atol=1e-12)


# --------------------------------------------------------------------------------------------
# The real file: exported API and an nvcc compile-only check.
# --------------------------------------------------------------------------------------------
def test_source_exports_the_agreed_api():
    src = CU_FILE.read_text()
    assert "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)" in src
    assert ("torch::Tensor upfirdn2d(torch::Tensor x, torch::Tensor f, int64_t up_x, int64_t up_y,"
            in src)
    assert ("torch::Tensor bias_act(torch::Tensor x, torch::Tensor b, torch::Tensor ref, "
            "int64_t grad," in src)
    assert sorted(set(__import__("re").findall(r'm\.def\("(\w+)"', src))) == ["bias_act",
                                                                              "upfirdn2d"]
    # The constants the tiled mirror defaults to are the ones the kernel uses.
    for const in ("TILE_W = 32;", "TILE_H = 32;", "BLOCK_H = 8;"):
        assert f"constexpr int {const}" in src


def _nvcc_command(out_obj):
    """The compile line torch's JIT build uses for a .cu source, minus linking."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): compile check not possible here")
    incs = cpp_extension.include_paths()   # torch's headers (the CUDA ones come with nvcc)
    torch_inc = Path(incs[0])
    for h in ("torch/extension.h", "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h"):
        if not (torch_inc / h).exists():
            pytest.skip(f"torch install lacks {h}: cannot compile CUDA extensions against it")
    py_inc = sysconfig.get_paths()["include"]
    if not Path(py_inc, "Python.h").exists():
        pytest.skip(f"Python.h missing in {py_inc} (install python3-dev)")
    flags = ["-c", "-std=c++20", "-DTORCH_EXTENSION_NAME=fctfg_ops",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "--compiler-options", "-fPIC"]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)   # the half/bf16 and constexpr flags
    # A CPU-only torch wheel ships the c10/cuda headers but not the CMake-generated
    # cuda_cmake_macros.h (it only defines a Windows DLL-export switch); tell c10 to skip it.
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in incs + [py_inc]:
        flags += ["-isystem", inc]
    return [nvcc, *flags, "-o", str(out_obj), str(CU_FILE)]


@pytest.mark.slow
def test_nvcc_compiles_the_extension(tmp_path):
    """About 70 s of CPU (minutes of wall time on a loaded machine): parsing torch's headers
    dominates. Deselect with -m "not slow"."""
    obj = tmp_path / "fctfg_ops.o"
    cmd = _nvcc_command(obj)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        assert "PyInit_fctfg_ops" in syms                  # the Python module entry point
        for name in ("upfirdn2d_naive_kernel", "upfirdn2d_tiled_kernel", "bias_act_kernel"):
            assert name in syms, f"kernel {name} was not instantiated"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_check_script_refuses_in_one_line_without_a_gpu(tmp_path):
    """gpu_check.sh on a machine without CUDA: one clear line, non-zero exit, before building
    anything."""
    script = CU_FILE.parent / "gpu_check.sh"
    r = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "no CUDA GPU visible to torch" in r.stdout + r.stderr
    assert "CUDA ops built" not in r.stdout
