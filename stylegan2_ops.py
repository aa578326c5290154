"""stylegan2_ops.py: the low-level operations under every network of FC-TFG (not in the paper; the
machinery of StyleGAN2's decoder and of our memory budget).

  upfirdn2d(x, f, up, down, pad)  upsample by zero insertion, pad, FIR filter, downsample: all of
                                  StyleGAN2's blurs and resamplings (the op of NVlabs
                                  stylegan2-ada-pytorch, torch_utils/ops)
  bias_act(x, b, act)             bias + leaky ReLU + gain, one elementwise pass
  checkpointed(block, *args)      activation checkpointing (Chen et al. 2016) that leaves
                                  BatchNorm's running statistics alone; batchnorm_stats_frozen,
                                  use_checkpointing
Each op has a pure-PyTorch reference path (the definition; always correct, always tested) and an
optional fused CUDA kernel (stylegan2_ops.cu), compiled lazily on first use on a CUDA tensor, once
per process.

Not here: the layers built from these ops (stylegan2.py)."""
import contextlib
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)  # binomial [1,3,3,1]: the low-pass filter of every resampling step
# sqrt(2) keeps activations' second moment ~1 after lrelu
LRELU_SLOPE, LRELU_GAIN = 0.2, math.sqrt(2)


# ==== Low-level op 1: upfirdn2d  (upsample -> pad -> FIR -> downsample) ===========================
# Per axis, for every channel: (1) insert up-1 zeros AFTER every sample, (2) zero-pad by (p0, p1), a
# negative pad crops, (3) TRUE convolution with f (i.e. correlation with the flipped filter), (4)
# keep every down-th sample. Output length (L*up + p0 + p1 - K + down) // down.

def _parse_updown(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _upfirdn2d_ref(x, f, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0)):
    """Reference implementation from native ops. x [B,C,H,W], f [KH,KW]; up/down are (x, y)
    pairs."""
    (upx, upy), (downx, downy) = up, down
    px0, px1, py0, py1 = pad
    B, C, H, W = x.shape
    # (1) zero insertion: give each sample a trailing axis of length `up`, pad it with zeros,
    # flatten.
    x = x.reshape(B, C, H, 1, W, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(B, C, H * upy, W * upx)
    # (2) pad with zeros where positive, crop where negative.
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    # (3) conv2d computes a correlation; flipping f turns it into the true convolution.
    w = f.to(x.dtype).flip([0, 1])[None, None].expand(C, 1, *f.shape)
    x = F.conv2d(x, w, groups=C)
    # (4) decimation, starting at sample 0.
    return x[:, :, ::downy, ::downx]


def _grad_pads(in_size, out_size, k, up, down, p0):
    """Pads of the gradient op on one axis, so that dL/dx has length in_size again (the same
    arithmetic as the backward of stylegan2-ada-pytorch's upfirdn2d)."""
    g0 = k - p0 - 1
    g1 = in_size * up - out_size * down + p0 - up + 1
    return g0, g1


class _UpFirDn2d(torch.autograd.Function):
    """Autograd wrapper for a forward-only kernel (CUDA, or the reference for testing this wrapper).

    The gradient of upfirdn2d is upfirdn2d again: flipped filter, up and down swapped, new pads.
    Because backward calls this same Function, grad-of-grad (R1, path length) works to any order."""

    @staticmethod
    def forward(ctx, x, f, up, down, pad, kernel):
        y = kernel(x, f, up, down, pad)
        ctx.save_for_backward(f)
        ctx.args = (x.shape, y.shape, up, down, pad, kernel)
        return y

    @staticmethod
    def backward(ctx, dy):
        (f,) = ctx.saved_tensors
        xs, ys, (upx, upy), (downx, downy), (px0, px1, py0, py1), kernel = ctx.args
        gx0, gx1 = _grad_pads(xs[3], ys[3], f.shape[1], upx, downx, px0)
        gy0, gy1 = _grad_pads(xs[2], ys[2], f.shape[0], upy, downy, py0)
        dx = _UpFirDn2d.apply(dy, f.flip([0, 1]), (downx, downy), (upx, upy), (gx0, gx1, gy0, gy1),
                              kernel)
        return dx, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), impl="auto"):
    """Upsample, pad, FIR-filter and downsample a batch of images.

    x:    [B, C, H, W]
    f:    [KH, KW] filter (true convolution: not flipped by the caller)
    up:   int or (up_x, up_y); zeros inserted after each sample
    down: int or (down_x, down_y)
    pad:  (x0, x1, y0, y1) applied after upsampling; negative values crop
    impl: 'auto' (CUDA kernel for CUDA tensors when it built, else reference), 'cuda', 'ref'
    Returns [B, C, (H*up_y + y0 + y1 - KH + down_y)//down_y,
    (W*up_x + x0 + x1 - KW + down_x)//down_x]."""
    up, down = _parse_updown(up), _parse_updown(down)
    if len(pad) != 4:
        raise ValueError(f"upfirdn2d: pad must be (x0, x1, y0, y1), got {pad}")
    if x.ndim != 4 or f.ndim != 2:
        raise ValueError(f"upfirdn2d: want x [B,C,H,W] and f [KH,KW], got {tuple(x.shape)}, "
                         f"{tuple(f.shape)}")
    if min(up + down) < 1:
        raise ValueError(f"upfirdn2d: up/down must be >= 1, got up={up} down={down}")
    out_w = (x.shape[3] * up[0] + pad[0] + pad[1] - f.shape[1] + down[0]) // down[0]
    out_h = (x.shape[2] * up[1] + pad[2] + pad[3] - f.shape[0] + down[1]) // down[1]
    if out_w < 1 or out_h < 1:
        raise ValueError(f"upfirdn2d: output would be empty ({out_h}x{out_w}) for input "
                         f"{tuple(x.shape)}")
    if _use_cuda(x, impl):
        return _UpFirDn2d.apply(x, f, up, down, tuple(pad), _upfirdn2d_cuda_kernel)
    return _upfirdn2d_ref(x, f, up, down, tuple(pad))


def make_kernel(k=BLUR_KERNEL, gain=1.0):
    """2-D separable FIR filter outer(k, k), normalised to sum to `gain`.
    Upsampling by 2 spreads each sample over 4 outputs, so up-filters use gain 4 (= factor^2)."""
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k / k.sum() * gain


# ==== Low-level op 2: bias_act  (y = gain * leaky_relu(x + b, alpha)) =============================

def _bias_act_ref(x, b, act="lrelu", alpha=LRELU_SLOPE, gain=LRELU_GAIN):
    if b is not None:
        x = x + b.view(1, -1, *([1] * (x.ndim - 2)))  # bias lives on dim 1 (channels)
    if act == "linear":
        return x
    return F.leaky_relu(x, alpha) * gain


def _bias_act_kernel_ref(x, b, ref, grad, alpha, gain):
    """Pure-PyTorch stand-in with the exact contract of the CUDA kernel (lets CPU tests cover the
    autograd wrapper). grad=0: forward. grad=1: x is an incoming gradient, ref the saved OUTPUT."""
    if grad:
        return x * torch.where(ref > 0, gain, alpha * gain).to(x.dtype)
    v = x if b.numel() == 0 else x + b.view(1, -1, *([1] * (x.ndim - 2)))
    return torch.where(v > 0, v, v * alpha) * gain


class _BiasAct(torch.autograd.Function):
    """Fused bias + leaky ReLU. The derivative gain*(1 or alpha) only depends on the sign of the
    OUTPUT, so we save y, not x. Its own derivative w.r.t. the incoming gradient is the same mask
    (the second derivative of a piecewise-linear function is zero), see _BiasActGrad."""

    @staticmethod
    def forward(ctx, x, b, alpha, gain, kernel):
        y = kernel(x, b, x.new_empty(0), 0, alpha, gain)
        ctx.save_for_backward(y)
        ctx.args = (b.numel() > 0, alpha, gain, kernel)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        has_bias, alpha, gain, kernel = ctx.args
        dx = _BiasActGrad.apply(dy, y, alpha, gain, kernel)
        db = dx.sum([d for d in range(dx.ndim) if d != 1]) if has_bias else None
        return dx, db, None, None, None


class _BiasActGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, y, alpha, gain, kernel):
        ctx.save_for_backward(y)
        ctx.args = (alpha, gain, kernel)
        return kernel(dy, dy.new_empty(0), y, 1, alpha, gain)

    @staticmethod
    def backward(ctx, ddx):
        (y,) = ctx.saved_tensors
        alpha, gain, kernel = ctx.args
        # d(dx)/d(dy) is the same mask; d(dx)/dy is zero almost everywhere (y only chooses the
        # mask).
        return _BiasActGrad.apply(ddx, y, alpha, gain, kernel), None, None, None, None


def bias_act(x, b=None, act="lrelu", alpha=LRELU_SLOPE, gain=LRELU_GAIN, impl="auto"):
    """y = gain * leaky_relu(x + b, alpha) with b broadcast along dim 1; act='linear' adds b only.
    x [B, C, ...], b [C] or None."""
    if act not in ("lrelu", "linear"):
        raise ValueError(f"bias_act: act must be 'lrelu' or 'linear', got {act!r}")
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[1]):
        raise ValueError(f"bias_act: bias {tuple(b.shape)} does not match {x.shape[1]} channels")
    if act == "lrelu" and _use_cuda(x, impl):
        b = x.new_empty(0) if b is None else b.to(x.dtype)
        return _BiasAct.apply(x.contiguous(), b, float(alpha), float(gain), _bias_act_cuda_kernel)
    return _bias_act_ref(x, b, act, alpha, gain)


# --------------------------------------------------------------------------------------------------
# The optional CUDA path: built lazily, once per process; a failed build is remembered (no retries).
# --------------------------------------------------------------------------------------------------
_ext = None  # None: not tried yet; False: unavailable in this process; else the compiled module


def cuda_ops():
    """The compiled extension, or False. Set FCTFG_NO_CUDA_OPS=1 to force the reference path."""
    global _ext
    if _ext is None:
        _ext = False  # set before trying, so a failure is tried exactly once
        if os.environ.get("FCTFG_NO_CUDA_OPS", "") not in ("", "0"):
            return _ext
        try:
            from torch.utils.cpp_extension import load
            src = Path(__file__).with_name("stylegan2_ops.cu")
            _ext = load(name="fctfg_ops", sources=[str(src)], extra_cuda_cflags=["-O3"],
                        verbose=False)
        # compiler, headers, ninja, ...
        except (RuntimeError, OSError, ImportError, ValueError) as e:
            warnings.warn(f"stylegan2: CUDA ops unavailable, using the pure PyTorch path ({e})")
    return _ext


def allow_cuda_ops(on):
    """From now on, use the CUDA kernels where they build (True) or the reference path only (False);
    for benchmarks that time both in one process."""
    global _ext
    os.environ["FCTFG_NO_CUDA_OPS"] = "" if on else "1"
    _ext = None if on else False


def _use_cuda(x, impl):
    if impl not in ("auto", "cuda", "ref"):
        raise ValueError(f"impl must be 'auto', 'cuda' or 'ref', got {impl!r}")
    if impl == "cuda" and not x.is_cuda:
        raise ValueError("impl='cuda' needs a CUDA tensor")
    if impl == "ref" or not x.is_cuda:
        return False
    ok = bool(cuda_ops())
    if impl == "cuda" and not ok:
        raise RuntimeError("impl='cuda' requested but the CUDA ops failed to build "
                           "(see the warning)")
    return ok


def _upfirdn2d_cuda_kernel(x, f, up, down, pad):
    B, C, H, W = x.shape
    y = cuda_ops().upfirdn2d(x.reshape(B * C, H, W).contiguous(), f.to(x.dtype).contiguous(),
                             up[0], up[1], down[0], down[1], *pad)
    return y.reshape(B, C, *y.shape[1:])


def _bias_act_cuda_kernel(x, b, ref, grad, alpha, gain):
    return cuda_ops().bias_act(x.contiguous(), b, ref, grad, alpha, gain)


# ==== Activation checkpointing (memory, not in the paper; Chen et al. 2016, "Sublinear Memory
# Cost") ====
# A checkpointed block keeps only its inputs and reruns its forward when the gradient reaches it:
# one more forward for dropping every activation inside (the paper preset's FC-TFG step needs it;
# BENCHMARKS.md).
# Trap: a train-mode BatchNorm would update its running statistics again during the rerun, so the
# rerun uses momentum 0 and its batch counter is put back. Gradients equal the plain forward's
# (tests, float64).

@contextlib.contextmanager
def batchnorm_stats_frozen(module):
    """Inside: train-mode BatchNorms of `module` normalise with batch statistics but keep their
    running statistics and counters (momentum 0), for a forward that repeats one already counted."""
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if isinstance(module, nn.Module) else []
    kept = [(m.momentum,
             m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, n) in zip(bns, kept):
            m.momentum = mom
            if n is not None:
                m.num_batches_tracked.copy_(n)


def checkpointed(block, *args, on=True):
    """block(*args), keeping only args for backward when `on` and autograd records; else a plain
    call. block: an nn.Module (its train-mode BatchNorms are recomputed without a second statistics
    update) or a function without BatchNorm (e.g. one resolution of G.synthesis)."""
    if not (on and torch.is_grad_enabled()):
        return block(*args)
    calls = [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1:
            return block(*a)
        with batchnorm_stats_frozen(block):                       # the recomputation
            return block(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def use_checkpointing(modules, on=True):
    """Switch checkpointed() on or off in every block-structured network inside `modules` (G, D,
    PSPEncoder, HyperStyle, IdentityEncoder carry a .checkpointing attribute). -> how many were
    set."""
    nets = [m for net in modules for m in net.modules() if hasattr(m, "checkpointing")]
    for m in nets:
        m.checkpointing = on
    return len(nets)
