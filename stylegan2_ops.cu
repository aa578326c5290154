// stylegan2_ops.cu: our own CUDA kernels for the two hot ops of the StyleGAN2 decoder G and
// discriminator D (Fig. 3 of the paper; StyleGAN2 = ref. [47], Sec. 3.3.6 and Sec. 4.1.2).
//
//   upfirdn2d(x, f, up, down, pad)   -> upfirdn2d()      spec stylegan2.md Sec. 5 (resampling)
//   y = gain * lrelu(x + b, alpha)   -> bias_act(grad=0) spec stylegan2.md Sec. 2 "Fused bias-act"
//   dL/dx = g * gain * (y>0?1:alpha) -> bias_act(grad=1) (backward AND double-backward)
//
// Written from the maths in the spec, not from NVIDIA's kernels (those are non-commercial).
// The pure-PyTorch path in stylegan2.py is the DEFINITION of both ops; these kernels are an
// optional speed-up that stylegan2.py JIT-builds once, on first use on a CUDA tensor
// (torch.utils.cpp_extension.load(name="fctfg_ops", sources=["stylegan2_ops.cu"])).
//
// Backward of upfirdn2d lives in Python: it is this same op with the flipped filter, up and down
// swapped and new pads (spec Sec. 5), so no gradient kernel is needed here.
//
// The index arithmetic of both upfirdn2d kernels is transliterated line by line into Python in
// tests/test_cuda_source.py and checked against scipy.signal.upfirdn there (no GPU needed).
// KEEP THE TWO IN SYNC: a change to the tap loops here must be mirrored in that file.
//
// Environment: FCTFG_UPFIRDN_NAIVE=1 forces the simple kernel (to compare the two on a GPU).
//
// Not here: autograd wiring, the pure-PyTorch reference, the build/fallback logic (stylegan2.py).

#include <torch/extension.h>
#include <ATen/OpMathType.h>
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h): those pull in cuBLAS/cuSPARSE/cuSOLVER
// headers that some CUDA installs (e.g. a bare nvcc + cudart) lack, and we need none of them.
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream refers to.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

// ------------------------------------------------------------------------------------------
// Integer helpers. C++ '/' and '%' truncate toward zero, so for negative numbers they are NOT
// floor division / modulo. Padding can make coordinates negative, so we need the real ones.
// ------------------------------------------------------------------------------------------

// a mod m in [0, m) for m > 0, also when a < 0 (e.g. pos_mod(-3, 2) == 1, not -1).
__host__ __device__ __forceinline__ int pos_mod(int a, int m) { return ((a % m) + m) % m; }

// floor(a / m) for m > 0 (e.g. floor_div(-3, 2) == -2, while -3 / 2 == -1 in C++).
__host__ __device__ __forceinline__ int floor_div(int a, int m) { return (a - pos_mod(a, m)) / m; }

// ceil(a / m) for m > 0.
__host__ __device__ __forceinline__ int ceil_div(int a, int m) { return -floor_div(-a, m); }

// ------------------------------------------------------------------------------------------
// upfirdn2d: the maths (one axis; the 2-D op does the same on H and on W independently).
//
// Input x[i], i in [0, L). Up-sampling factor u, pads p0/p1, filter f[t], t in [0, K), down d.
//   1. zero-insertion:  z[j] = x[j/u] if j % u == 0 else 0,          j in [0, L*u)
//   2. pad / crop:      q[m] = z[m - p0]  (0 outside z; a negative p0 crops the start)
//   3. TRUE convolution, "valid" part: c[n] = sum_t f[t] * q[n + K-1 - t]
//      (= a correlation with the flipped filter: writing k = K-1-t, c[n] = sum_k f[K-1-k] q[n+k])
//   4. decimation:      out[o] = c[o*d]
// Output length: (L*u + p0 + p1 - K + d) / d   (the host refuses a length <= 0).
//
// Put together, with k the "correlation tap" (k = 0 is the leftmost position under the window):
//   out[o] = sum_{k=0}^{K-1} f[K-1-k] * z[base + k],     base = o*d - p0
// where base is the coordinate, on the zero-stuffed grid z, of the window's left edge.
//
// POLYPHASE DECOMPOSITION: z[j] is non-zero only when j is a multiple of u (a "real" sample);
// the u-1 inserted zeros between real samples contribute nothing. So of the K taps, only those
// with (base + k) % u == 0 matter: they are k = k0, k0+u, k0+2u, ... with
//   k0 = pos_mod(-base, u)            (the first k >= 0 with base + k = 0 mod u).
// Each output therefore touches only about K/u taps, and which taps (the "phase" k0) depends on
// o only through base mod u. Example: u=2, K=4, d=1, p0=2: o=0 -> base=-2, k0=0, taps k=0,2;
// o=1 -> base=-1, k0=1, taps k=1,3. Even outputs use filter taps f[3], f[1], odd ones f[2], f[0]:
// this is exactly "zero-insertion + blur == two interleaved 2-tap filters".
//
// Bounds: the real sample at k sits at input index i = (base + k) / u (exact division: base + k
// is a multiple of u). It exists only when 0 <= base + k <= (L-1)*u, i.e.
//   k >= -base               -> if base < 0 start at -base (a multiple of u away from k0, so it
//                               is itself a valid phase; in fact max(k0, -base) is the first
//                               valid tap in both cases, because k0 <= -base when base <= 0)
//   k <= (L-1)*u - base      -> stop before k_end = min(K, (L-1)*u - base + 1)
// Taps outside these bounds would multiply the zero padding; skipping them costs nothing.
// ------------------------------------------------------------------------------------------

// Everything a kernel needs to know about one upfirdn2d call (per-axis numbers, x then y).
struct UpFirDnParams {
  int64_t N;                     // batch * channels (independent planes)
  int in_h, in_w;                // input plane size
  int out_h, out_w;              // output plane size
  int up_x, up_y;                // zero-insertion factors
  int down_x, down_y;            // decimation factors
  int pad_x0, pad_y0;            // leading pads (the trailing pads only set out_h/out_w)
  int kh, kw;                    // filter size
};

// Simple kernel: one thread per output pixel (grid-stride loop), taps read straight from global
// memory (L1/L2 catch the reuse between neighbouring threads). Works for every up/down/pad/K.
template <typename scalar_t, typename acc_t>
__global__ void upfirdn2d_naive_kernel(const scalar_t* __restrict__ x,  // [N, in_h, in_w]
                                       const acc_t* __restrict__ f,     // [kh, kw]
                                       scalar_t* __restrict__ y,        // [N, out_h, out_w]
                                       UpFirDnParams p) {
  const int64_t total = p.N * p.out_h * p.out_w;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)blockDim.x * gridDim.x) {
    // Unflatten the output index: idx = (n * out_h + oy) * out_w + ox.
    const int ox = (int)(idx % p.out_w);
    const int oy = (int)((idx / p.out_w) % p.out_h);
    const int64_t n = idx / ((int64_t)p.out_w * p.out_h);

    // Window left/top edge on the zero-stuffed grid (see the maths block above).
    const int base_y = oy * p.down_y - p.pad_y0;
    const int base_x = ox * p.down_x - p.pad_x0;
    // First tap hitting a real sample (phase), clipped so the sample index is >= 0.
    const int ky_first = max(pos_mod(-base_y, p.up_y), -base_y);
    const int kx_first = max(pos_mod(-base_x, p.up_x), -base_x);
    // One past the last tap whose sample index is <= L-1.
    const int ky_end = min(p.kh, (p.in_h - 1) * p.up_y - base_y + 1);
    const int kx_end = min(p.kw, (p.in_w - 1) * p.up_x - base_x + 1);

    const scalar_t* xn = x + n * p.in_h * p.in_w;
    acc_t acc = acc_t(0);
    for (int ky = ky_first; ky < ky_end; ky += p.up_y) {   // stride u: skip inserted zeros
      const int iy = (base_y + ky) / p.up_y;               // exact, and 0 <= iy < in_h
      const acc_t* frow = f + (p.kh - 1 - ky) * p.kw;      // flipped row: TRUE convolution
      for (int kx = kx_first; kx < kx_end; kx += p.up_x) {
        const int ix = (base_x + kx) / p.up_x;
        acc += static_cast<acc_t>(xn[(int64_t)iy * p.in_w + ix]) * frow[p.kw - 1 - kx];
      }
    }
    y[idx] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------
// Tiled kernel. A block computes a TILE_H x TILE_W tile of outputs of one plane at a time.
// All input samples the tile needs are first copied (zero-filled outside the plane) into shared
// memory, so each input is read from global memory once per tile instead of ~K*K/(u*u) times,
// and the inner loop needs no bounds checks. The tap loop is the naive one minus the clipping.
//
// Input window of a tile whose first output is o0 (one axis): output o needs the real samples
// with index i in [ceil((o*d - p0)/u), floor((o*d - p0 + K-1)/u)], so the tile needs
//   i0 = ceil_div(o0*d - p0, u)   ...   i1 = floor_div((o0 + T-1)*d - p0 + K-1, u)
// which is at most floor(((T-1)*d + K-1)/u) + 1 samples long (host computes this bound to size
// shared memory; the same for every tile).
// ------------------------------------------------------------------------------------------
constexpr int TILE_W = 32;    // outputs per tile along W (= blockDim.x: coalesced loads/stores)
constexpr int TILE_H = 32;    // outputs per tile along H
constexpr int BLOCK_H = 8;    // blockDim.y; each thread computes TILE_H / BLOCK_H output rows
static_assert(TILE_H % BLOCK_H == 0, "TILE_H must be a multiple of BLOCK_H");

// Longest input window, per axis, that a tile of T outputs can need (see above).
__host__ __device__ __forceinline__ int tile_in_extent(int T, int up, int down, int K) {
  return ((T - 1) * down + K - 1) / up + 1;
}

template <typename scalar_t, typename acc_t>
__global__ void upfirdn2d_tiled_kernel(const scalar_t* __restrict__ x,  // [N, in_h, in_w]
                                       const acc_t* __restrict__ f,     // [kh, kw]
                                       scalar_t* __restrict__ y,        // [N, out_h, out_w]
                                       UpFirDnParams p) {
  // Dynamic shared memory: the filter (kh*kw), then the input window (ext_h*ext_w).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sf = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sx = sf + p.kh * p.kw;
  const int ext_w_max = tile_in_extent(TILE_W, p.up_x, p.down_x, p.kw);  // row pitch of sx

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  for (int t = tid; t < p.kh * p.kw; t += nthreads) sf[t] = f[t];

  // This block's tile of outputs and the input window it needs.
  const int tile_ox0 = blockIdx.x * TILE_W;
  const int tile_oy0 = blockIdx.y * TILE_H;
  const int ix0 = ceil_div(tile_ox0 * p.down_x - p.pad_x0, p.up_x);
  const int iy0 = ceil_div(tile_oy0 * p.down_y - p.pad_y0, p.up_y);
  const int ix1 = floor_div((tile_ox0 + TILE_W - 1) * p.down_x - p.pad_x0 + p.kw - 1, p.up_x);
  const int iy1 = floor_div((tile_oy0 + TILE_H - 1) * p.down_y - p.pad_y0 + p.kh - 1, p.up_y);
  const int ext_w = max(ix1 - ix0 + 1, 0);   // 0 if no real sample falls under the tile
  const int ext_h = max(iy1 - iy0 + 1, 0);

  // Planes are spread over gridDim.z (capped at 65535), so a block may do several.
  for (int64_t n = blockIdx.z; n < p.N; n += gridDim.z) {
    __syncthreads();  // everyone is done reading the previous plane's window (and sf is ready)
    const scalar_t* xn = x + n * p.in_h * p.in_w;
    for (int t = tid; t < ext_h * ext_w; t += nthreads) {
      const int r = t / ext_w, c = t % ext_w;
      const int gy = iy0 + r, gx = ix0 + c;     // global input coordinates
      const bool inside = gy >= 0 && gy < p.in_h && gx >= 0 && gx < p.in_w;
      sx[r * ext_w_max + c] = inside ? static_cast<acc_t>(xn[(int64_t)gy * p.in_w + gx]) : acc_t(0);
    }
    __syncthreads();  // window complete

    const int ox = tile_ox0 + threadIdx.x;
    for (int oy = tile_oy0 + threadIdx.y; oy < tile_oy0 + TILE_H; oy += BLOCK_H) {
      if (ox >= p.out_w || oy >= p.out_h) continue;   // partial tile at the right/bottom edge
      const int base_y = oy * p.down_y - p.pad_y0;
      const int base_x = ox * p.down_x - p.pad_x0;
      // Same phase as the naive kernel; no clipping: the window is zero-filled where needed.
      const int ky_first = pos_mod(-base_y, p.up_y);
      const int kx_first = pos_mod(-base_x, p.up_x);
      acc_t acc = acc_t(0);
      for (int ky = ky_first; ky < p.kh; ky += p.up_y) {
        // (base_y + ky) is a multiple of up_y, possibly negative: '/' is exact either way.
        const int sy = (base_y + ky) / p.up_y - iy0;         // row inside the window
        const acc_t* frow = sf + (p.kh - 1 - ky) * p.kw;     // flipped: TRUE convolution
        for (int kx = kx_first; kx < p.kw; kx += p.up_x) {
          const int sxi = (base_x + kx) / p.up_x - ix0;
          acc += sx[sy * ext_w_max + sxi] * frow[p.kw - 1 - kx];
        }
      }
      y[(n * p.out_h + oy) * p.out_w + ox] = static_cast<scalar_t>(acc);
    }
  }
}

// Largest shared-memory request for which we use the tiled kernel (the default per-block limit
// that needs no opt-in on every GPU since Kepler).
constexpr int64_t TILED_SMEM_LIMIT = 48 * 1024;

static bool force_naive_from_env() {
  const char* v = std::getenv("FCTFG_UPFIRDN_NAIVE");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}

static void check_floating(const torch::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", s);
}

// Host entry point. x: [N, H, W] CUDA; f: [KH, KW]; returns [N, outH, outW] in x's dtype.
torch::Tensor upfirdn2d(torch::Tensor x, torch::Tensor f, int64_t up_x, int64_t up_y,
                        int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1,
                        int64_t pad_y0, int64_t pad_y1) {
  TORCH_CHECK(x.is_cuda(), "upfirdn2d: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(f.device() == x.device(), "upfirdn2d: f must be on x's device (", x.device(),
              "), got ", f.device());
  TORCH_CHECK(x.dim() == 3, "upfirdn2d: x must be [N, H, W] (3 dims), got ", x.dim(), " dims");
  TORCH_CHECK(f.dim() == 2, "upfirdn2d: f must be [KH, KW] (2 dims), got ", f.dim(), " dims");
  TORCH_CHECK(f.size(0) >= 1 && f.size(1) >= 1, "upfirdn2d: f must be non-empty, got ",
              f.sizes());
  TORCH_CHECK(up_x >= 1 && up_y >= 1, "upfirdn2d: up must be >= 1, got up_x=", up_x,
              " up_y=", up_y);
  TORCH_CHECK(down_x >= 1 && down_y >= 1, "upfirdn2d: down must be >= 1, got down_x=", down_x,
              " down_y=", down_y);
  check_floating(x, "upfirdn2d", "x");
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1, "upfirdn2d: x planes must be non-empty, got ",
              x.sizes());

  const int64_t in_h = x.size(1), in_w = x.size(2), kh = f.size(0), kw = f.size(1);
  // Per-axis coordinates are kept in 32-bit ints inside the kernels: make sure they fit.
  const int64_t big = std::numeric_limits<int>::max() / 4;
  TORCH_CHECK(in_h * up_y + std::abs(pad_y0) + std::abs(pad_y1) + kh < big &&
                  in_w * up_x + std::abs(pad_x0) + std::abs(pad_x1) + kw < big &&
                  down_x * (TILE_W + 1) < big && down_y * (TILE_H + 1) < big,
              "upfirdn2d: sizes too large for 32-bit per-axis indexing");
  // Output size (spec Sec. 5); the numerator is the padded length minus K plus d.
  const int64_t num_h = in_h * up_y + pad_y0 + pad_y1 - kh + down_y;
  const int64_t num_w = in_w * up_x + pad_x0 + pad_x1 - kw + down_x;
  const int64_t out_h = num_h > 0 ? num_h / down_y : 0;
  const int64_t out_w = num_w > 0 ? num_w / down_x : 0;
  TORCH_CHECK(out_h > 0 && out_w > 0, "upfirdn2d: output would be empty (", out_h, " x ", out_w,
              ") for input ", in_h, " x ", in_w, ", filter ", kh, " x ", kw, ", up (", up_x, ", ",
              up_y, "), down (", down_x, ", ", down_y, "), pad (", pad_x0, ", ", pad_x1, ", ",
              pad_y0, ", ", pad_y1, ")");

  const c10::cuda::CUDAGuard device_guard(x.device());
  x = x.contiguous();
  auto y = torch::empty({x.size(0), out_h, out_w}, x.options());
  if (x.size(0) == 0) return y;  // nothing to launch for an empty batch

  UpFirDnParams p;
  p.N = x.size(0);
  p.in_h = (int)in_h;   p.in_w = (int)in_w;
  p.out_h = (int)out_h; p.out_w = (int)out_w;
  p.up_x = (int)up_x;   p.up_y = (int)up_y;
  p.down_x = (int)down_x; p.down_y = (int)down_y;
  p.pad_x0 = (int)pad_x0; p.pad_y0 = (int)pad_y0;
  p.kh = (int)kh;       p.kw = (int)kw;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool force_naive = force_naive_from_env();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
      x.scalar_type(), "fctfg_upfirdn2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;   // float for half/bf16/float, double for double
    // The filter in the accumulation type, on x's device, row-major [kh, kw].
    auto fa = f.to(x.device(), c10::CppTypeToScalarType<acc_t>::value).contiguous();

    const int64_t ext_h = tile_in_extent(TILE_H, p.up_y, p.down_y, p.kh);
    const int64_t ext_w = tile_in_extent(TILE_W, p.up_x, p.down_x, p.kw);
    const int64_t smem = (kh * kw + ext_h * ext_w) * (int64_t)sizeof(acc_t);

    const int64_t tiles_y = (out_h + TILE_H - 1) / TILE_H;   // gridDim.y is limited to 65535
    if (!force_naive && smem <= TILED_SMEM_LIMIT && tiles_y <= 65535) {
      const dim3 block(TILE_W, BLOCK_H);
      const dim3 grid((unsigned)((out_w + TILE_W - 1) / TILE_W), (unsigned)tiles_y,
                      (unsigned)std::min<int64_t>(p.N, 65535));
      upfirdn2d_tiled_kernel<scalar_t, acc_t><<<grid, block, (size_t)smem, stream>>>(
          x.data_ptr<scalar_t>(), fa.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int threads = 256;
      const int64_t total = p.N * out_h * out_w;
      const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 1 << 20);
      upfirdn2d_naive_kernel<scalar_t, acc_t><<<(unsigned)blocks, threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), fa.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// bias_act: bias + leaky ReLU + gain in one pass (one read, one write instead of three).
//   grad == 0 (forward):   v = x + b[c];  y = gain * (v > 0 ? v : alpha * v)
//   grad == 1 (gradient):  x is dL/dy, ref the saved forward OUTPUT y:
//                          dL/dv = x * gain * (ref > 0 ? 1 : alpha)
// ref > 0 <=> v > 0 because gain > 0, so the output is enough to know the slope. The result is
// linear in x with a mask that does not depend on x, and the second derivative of leaky ReLU is
// zero, so the gradient of this gradient (double-backward, needed by R1 and path length) is the
// same masking again: grad == 1 serves both. At v == 0 exactly we use slope alpha (as torch's
// leaky_relu backward does).
// Channel of a flat index for a contiguous [B, C, *rest]: c = (idx / inner) % C, inner = |rest|.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void bias_act_kernel(const scalar_t* __restrict__ x,    // [B, C, *rest]
                                const acc_t* __restrict__ b,       // [C] or nullptr
                                const scalar_t* __restrict__ ref,  // like x, or nullptr
                                scalar_t* __restrict__ y,          // like x
                                int64_t numel, int64_t C, int64_t inner, int grad,
                                acc_t alpha, acc_t gain) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < numel;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const acc_t v = static_cast<acc_t>(x[idx]);
    acc_t out;
    if (grad == 0) {
      const acc_t vb = b != nullptr ? v + b[(idx / inner) % C] : v;
      out = gain * (vb > acc_t(0) ? vb : alpha * vb);
    } else {
      const acc_t r = static_cast<acc_t>(ref[idx]);
      out = v * gain * (r > acc_t(0) ? acc_t(1) : alpha);
    }
    y[idx] = static_cast<scalar_t>(out);
  }
}

// Host entry point. x: CUDA [B, C, ...]; b: [C] or empty; ref: empty or x's shape.
torch::Tensor bias_act(torch::Tensor x, torch::Tensor b, torch::Tensor ref, int64_t grad,
                       double alpha, double gain) {
  TORCH_CHECK(x.is_cuda(), "bias_act: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(grad == 0 || grad == 1, "bias_act: grad must be 0 (forward) or 1 (gradient), got ",
              grad);
  check_floating(x, "bias_act", "x");
  const bool has_bias = grad == 0 && b.numel() > 0;  // the bias plays no part in the gradient
  if (has_bias) {
    TORCH_CHECK(b.device() == x.device(), "bias_act: b must be on x's device (", x.device(),
                "), got ", b.device());
    TORCH_CHECK(x.dim() >= 2, "bias_act: x must be [B, C, ...] to add a bias, got ", x.sizes());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(1), "bias_act: b must be [C] with C = x.size(1) = ",
                x.size(1), ", got ", b.sizes());
  }
  if (grad == 1) {
    TORCH_CHECK(ref.sizes() == x.sizes(), "bias_act: with grad=1, ref (the forward output) must ",
                "have x's shape ", x.sizes(), ", got ", ref.sizes());
    TORCH_CHECK(ref.device() == x.device(), "bias_act: ref must be on x's device (", x.device(),
                "), got ", ref.device());
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  x = x.contiguous();
  auto y = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  const int64_t C = has_bias ? x.size(1) : 1;
  const int64_t inner = has_bias ? numel / (x.size(0) * C) : 1;  // product of dims after C
  torch::Tensor refc;
  if (grad == 1) refc = ref.to(x.scalar_type()).contiguous();

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
      x.scalar_type(), "fctfg_bias_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    torch::Tensor ba;
    if (has_bias) ba = b.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 1 << 20);
    bias_act_kernel<scalar_t, acc_t><<<(unsigned)blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), has_bias ? ba.data_ptr<acc_t>() : nullptr,
        grad == 1 ? refc.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), numel, C, inner,
        (int)grad, static_cast<acc_t>(alpha), static_cast<acc_t>(gain));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d,
        "upfirdn2d(x [N,H,W], f [KH,KW], up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, "
        "pad_y1) -> [N,outH,outW]: zero-insert, pad/crop, true convolution, decimate",
        py::arg("x"), py::arg("f"), py::arg("up_x"), py::arg("up_y"), py::arg("down_x"),
        py::arg("down_y"), py::arg("pad_x0"), py::arg("pad_x1"), py::arg("pad_y0"),
        py::arg("pad_y1"));
  m.def("bias_act", &bias_act,
        "bias_act(x [B,C,...], b [C] or empty, ref, grad, alpha, gain): grad=0 -> "
        "gain*lrelu(x+b, alpha); grad=1 -> x*gain*(ref>0 ? 1 : alpha)",
        py::arg("x"), py::arg("b"), py::arg("ref"), py::arg("grad"), py::arg("alpha"),
        py::arg("gain"));
}
