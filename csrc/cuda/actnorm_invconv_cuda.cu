// CUDA kernels of the fused ActNorm + LU 1x1 convolution.
//
// The only per-pixel primitive is the channel mix y = Wf·x + c. For few channels it is a direct
// kernel, one thread per pixel with Wf and c in shared memory; past kDirectMaxChannels a batched
// GEMM (cuBLAS through ATen) wins. The per-element arithmetic is glow_ext_math.h, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../actnorm_invconv.h"
#include "../glow_ext_math.h"

namespace glow_ext {
namespace {

constexpr int64_t kDirectMaxChannels = 64;  // Wf and c in shared memory: at most 33 KiB (double)
constexpr int64_t kSmallFoldMaxChannels = 64;
constexpr int kRows = 4;                    // output channels per pass over a pixel's inputs
constexpr int kMixThreads = 256;
constexpr int64_t kMaxMixBlocks = 1 << 14;  // many waves on any GPU; beyond it threads loop
constexpr int kFoldThreads = 512;

// Input channel j of one pixel, converted to the accumulation type.
template <typename acc_t, typename scalar_t>
struct PixelLoad {
  const scalar_t* x;  // channel 0 of the pixel
  int64_t stride;     // H·W
  GLOW_HD acc_t operator()(int64_t j) const { return static_cast<acc_t>(x[j * stride]); }
};

// Consecutive threads take consecutive pixels, so every load and store is coalesced and all lanes
// of a warp read the same weight (a shared-memory broadcast).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMixThreads)
    channel_mix_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                       const acc_t* __restrict__ weight, const acc_t* __restrict__ offset,
                       int64_t C, int64_t HW, int64_t pixels) {
  // Untyped because every instantiation shares the one extern array.
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* w = reinterpret_cast<acc_t*>(smem);
  acc_t* c = w + C * C;
  for (int64_t k = threadIdx.x; k < C * C; k += blockDim.x) w[k] = weight[k];
  for (int64_t k = threadIdx.x; k < C; k += blockDim.x) c[k] = offset[k];
  __syncthreads();

  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < pixels;
       t += gridDim.x * int64_t{blockDim.x}) {
    const int64_t n = t / HW;
    const int64_t at_pixel = n * C * HW + (t - n * HW);
    const PixelLoad<acc_t, scalar_t> load{x + at_pixel, HW};
    scalar_t* y_p = y + at_pixel;
    acc_t out[kRows];
    int64_t i = 0;
    for (; i + kRows <= C; i += kRows) {
      math::mix_rows<kRows>(w + i * C, C, c + i, load, out);
#pragma unroll
      for (int r = 0; r < kRows; ++r) y_p[(i + r) * HW] = static_cast<scalar_t>(out[r]);
    }
    for (; i < C; ++i) {
      math::mix_rows<1>(w + i * C, C, c + i, load, out);
      y_p[i * HW] = static_cast<scalar_t>(out[0]);
    }
  }
}

at::Tensor channel_mix_cuda(const at::Tensor& x, const ChannelMap& map) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto weight = map.weight.contiguous();
  const auto offset = map.offset.contiguous();
  if (C > kDirectMaxChannels) {
    // For half/bf16 the map is rounded to x's dtype so cuBLAS runs a tensor-core GEMM, still
    // accumulating in fp32; an fp32 GEMM on a float copy of x would be many times slower.
    const auto w = weight.to(x.scalar_type());
    const auto c = offset.to(x.scalar_type());
    const auto y = at::baddbmm(c.view({1, C, 1}).expand({N, C, HW}), w.expand({N, C, C}),
                               x.view({N, C, HW}));
    return y.view(x.sizes());
  }
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t pixels = N * HW;
  const int64_t blocks = std::min((pixels + kMixThreads - 1) / kMixThreads, kMaxMixBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "glow_ext_channel_mix_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(C * C + C) * sizeof(acc_t);
    channel_mix_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kMixThreads, smem,
                                          stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
        weight.const_data_ptr<acc_t>(), offset.const_data_ptr<acc_t>(), C, HW, pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

template <typename acc_t>
struct FoldArgs {
  const acc_t *bias, *logs, *lower, *upper, *log_s, *sign_s;
  const int64_t* perm;
  int64_t channels;
  acc_t* weight;  // (C, C) out
  acc_t* offset;  // (C,) out
};

// One block: U''s diagonal and ActNorm's scale once per channel, then all threads fill entries of
// Wf (kept in shared memory too), then each of the first C threads reduces a row against the bias.
template <typename acc_t>
__global__ void __launch_bounds__(kFoldThreads) fold_forward_kernel(FoldArgs<acc_t> a) {
  __shared__ acc_t w[kSmallFoldMaxChannels * kSmallFoldMaxChannels];
  __shared__ acc_t diag[kSmallFoldMaxChannels], scale[kSmallFoldMaxChannels];
  const int64_t C = a.channels;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    diag[j] = a.sign_s[j] * exp(a.log_s[j]);
    scale[j] = exp(a.logs[j]);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < C * C; e += blockDim.x) {
    const int64_t i = e / C, j = e % C;
    w[e] = scale[j] * math::lu_weight_entry<acc_t>(a.lower, a.upper, diag, a.perm, C, i, j);
    a.weight[e] = w[e];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    acc_t c_i = 0;
    for (int64_t j = 0; j < C; ++j) c_i += w[i * C + j] * a.bias[j];
    a.offset[i] = c_i;
  }
}

// Wf[i][j] = W[i][j]·exp(logs[j]) and c = Wf·bias straight from the LU factors in one launch,
// instead of the ~10 ATen launches of the generic assembly.
bool fold_forward_small_cuda(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) {
  const int64_t C = p.bias.size(0);
  if (C > kSmallFoldMaxChannels || p.bias.scalar_type() != acc_dtype) return false;
  const c10::cuda::CUDAGuard guard(p.bias.device());
  const auto bias = p.bias.contiguous(), logs = p.logs.contiguous(), perm = p.perm.contiguous();
  const auto lower = p.lower.contiguous(), upper = p.upper.contiguous();
  const auto log_s = p.log_s.contiguous(), sign_s = p.sign_s.contiguous();
  out.weight = at::empty({C, C}, bias.options());
  out.offset = at::empty({C}, bias.options());
  const int threads = static_cast<int>(std::min<int64_t>(C * C, kFoldThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "glow_ext_fold_forward_cuda", [&] {
    const FoldArgs<scalar_t> args{
        bias.const_data_ptr<scalar_t>(),  logs.const_data_ptr<scalar_t>(),
        lower.const_data_ptr<scalar_t>(), upper.const_data_ptr<scalar_t>(),
        log_s.const_data_ptr<scalar_t>(), sign_s.const_data_ptr<scalar_t>(),
        perm.const_data_ptr<int64_t>(),   C,
        out.weight.mutable_data_ptr<scalar_t>(), out.offset.mutable_data_ptr<scalar_t>()};
    fold_forward_kernel<scalar_t><<<1, threads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

const Backend kCudaBackend{channel_mix_cuda, fold_forward_small_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(glow_ext, CUDA, m) {
  using Ops = BoundOps<kCudaBackend>;
  m.impl("actnorm_invconv_lu", &Ops::forward_op);
  m.impl("actnorm_invconv_lu_inverse", &Ops::inverse_op);
  m.impl("_actnorm_invconv_lu_train", &Ops::forward_train_op);
  m.impl("_actnorm_invconv_lu_inverse_train", &Ops::inverse_train_op);
  m.impl("actnorm_invconv_lu_backward", &Ops::backward_op);
  m.impl("actnorm_invconv_lu_inverse_backward", &Ops::inverse_backward_op);
  m.impl("channel_map", &Ops::channel_map_op);
}

}  // namespace glow_ext
