// CUDA kernels of the fused ActNorm + LU 1x1 convolution.
//
// The only per-pixel primitive is the channel mix y = Wf·x + c. For few channels it is a direct
// kernel, one thread per pixel and row group with its slice of Wf and c in shared memory; past
// kDirectMaxChannels a batched GEMM (cuBLAS through ATen) wins. The maps stay in float32 (float64
// for float64 input) at every C, also for half/bf16 activations, and our ops' GEMMs stay IEEE
// float32 (ieee_float32.h), so the precision changes neither with C nor with torch's global flags.
// The per-element arithmetic is glow_ext_math.h, as on the CPU; the launch shapes are
// cuda_launch_plan.h, which the CPU tests run on the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../actnorm_invconv.h"
#include "../cuda_launch_plan.h"
#include "../glow_ext_math.h"

namespace glow_ext {
namespace {

constexpr int64_t kDirectMaxChannels = 64;  // a row group's slice: at most 33 KiB (double)
constexpr int64_t kSmallFoldMaxChannels = 64;
constexpr int kFoldThreads = 512;
constexpr int kPermThreads = 1024;
// Up to this C the permutation check counts in shared memory (48 KiB of int).
constexpr int64_t kPermSharedMaxChannels = 12 * 1024;

// Input channel j of one pixel, converted to the accumulation type.
template <typename acc_t, typename scalar_t>
struct PixelLoad {
  const scalar_t* x;  // channel 0 of the pixel
  int64_t stride;     // M, the positions per sample
  GLOW_HD acc_t operator()(int64_t j) const { return static_cast<acc_t>(x[j * stride]); }
};

// Consecutive threads take consecutive pixels, so every load and store is coalesced; the block's
// rows_per_group outputs read Wf from its transposed slice, kMixRows weights per vector load. Per
// multiply-add: 1/kMixRows of an input load (L1) and of a shared-memory vector load, so the loop is
// FMA-bound; the row-major layout it replaces needed one shared-memory load per multiply-add.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMixThreads)
    channel_mix_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                       const acc_t* __restrict__ weight, const acc_t* __restrict__ offset,
                       int64_t C, int64_t M, int64_t pixels, int64_t rows_per_group) {
  // Untyped because every instantiation shares the one extern array; aligned for the vector loads.
  extern __shared__ __align__(kMixRows * sizeof(double)) unsigned char smem[];
  const int64_t ld = rows_per_group;
  const int64_t row0 = blockIdx.y * ld, rows = ld < C - row0 ? ld : C - row0;
  acc_t* w_t = reinterpret_cast<acc_t*>(smem);
  acc_t* c = w_t + C * ld;
  for (int64_t k = threadIdx.x; k < C * ld; k += blockDim.x) {
    w_t[k] = math::transposed_slice_entry(weight, C, row0, rows, ld, k);
  }
  for (int64_t r = threadIdx.x; r < ld; r += blockDim.x) c[r] = r < rows ? offset[row0 + r] : acc_t(0);
  __syncthreads();

  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < pixels;
       t += gridDim.x * int64_t{blockDim.x}) {
    const int64_t n = t / M;
    const int64_t at_pixel = n * C * M + (t - n * M);
    scalar_t* y_p = y + at_pixel + row0 * M;
    math::mix_pixel_transposed<kMixRows>(
        w_t, ld, C, c, rows, PixelLoad<acc_t, scalar_t>{x + at_pixel, M},
        [&](int64_t r, acc_t value) { y_p[r * M] = static_cast<scalar_t>(value); });
  }
}

// Past kDirectMaxChannels: one batched GEMM over the images. Half/bf16 input is mixed in float32
// (a float copy of x, then the bias added while rounding back): a half GEMM would need the map
// rounded to half, and cuBLAS may reduce in half under torch's default reduced-precision-reduction
// flags. Cost by reading: 4 extra bytes per element moved each way, against 2·C flops per element
// of an FP32 GEMM — at C >= 96 the GEMM, not the copies, bounds it. For float32/float64 the bias
// enters as baddbmm's C operand: the same traffic as a separate add (a write of the broadcast bias,
// then a read in the GEMM); only a GEMM epilogue would remove it, and cuBLASLt's bias epilogue adds
// along the other dimension of an (N, C, M) output.
at::Tensor channel_mix_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offset) {
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  const auto acc = weight.scalar_type();
  if (x.scalar_type() == acc) {
    const auto y = at::baddbmm(offset.view({1, C, 1}).expand({N, C, M}), weight.expand({N, C, C}),
                               x.view({N, C, M}));
    return y.view(x.sizes());
  }
  const auto mixed = at::matmul(weight, x.view({N, C, M}).to(acc));
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto y3 = y.view({N, C, M});
  at::add_out(y3, mixed, offset.view({1, C, 1}));
  return y;
}

// The device's SM count, read once per device (a driver query, no synchronisation).
int64_t multiprocessor_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return 1;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

at::Tensor channel_mix_cuda(const at::Tensor& x, const ChannelMap& map) {
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto weight = map.weight.contiguous();
  const auto offset = map.offset.contiguous();
  if (C > kDirectMaxChannels) return channel_mix_gemm(x, weight, offset);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t pixels = N * M;
  const auto plan = plan_channel_mix(
      pixels, C, multiprocessor_count(x.device().index()), max_grid_blocks());
  const dim3 grid(static_cast<unsigned>(plan.pixel_blocks), static_cast<unsigned>(plan.row_groups));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "glow_ext_channel_mix_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>((C + 1) * plan.rows_per_group) * sizeof(acc_t);
    channel_mix_kernel<scalar_t, acc_t><<<grid, kMixThreads, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
        weight.const_data_ptr<acc_t>(), offset.const_data_ptr<acc_t>(), C, M, pixels,
        plan.rows_per_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Every entry of perm in [0, C) and none twice, checked on the device: a host check would
// synchronise every call. A bad perm stops the kernel with a device-side assert (the context is
// then unusable, as after ATen's own index checks) instead of letting the fold read out of bounds.
__global__ void __launch_bounds__(kPermThreads)
    permutation_check_kernel(const int64_t* __restrict__ perm, int64_t C, int* global_counts) {
  extern __shared__ int shared_counts[];
  int* counts = global_counts != nullptr ? global_counts : shared_counts;
  if (global_counts == nullptr) {
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) counts[k] = 0;
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    const int64_t entry = perm[i];
    CUDA_KERNEL_ASSERT(entry >= 0 && entry < C && "glow_ext: perm has an entry out of range 0..C-1");
    if (entry >= 0 && entry < C) {
      const int seen_before = atomicAdd(&counts[entry], 1);
      CUDA_KERNEL_ASSERT(seen_before == 0 && "glow_ext: perm repeats an entry");
    }
  }
}

void validate_permutation_cuda(const at::Tensor& perm_in) {
  const int64_t C = perm_in.numel();
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const auto perm = perm_in.contiguous();
  const bool in_shared = C <= kPermSharedMaxChannels;
  at::Tensor counts;
  if (!in_shared) counts = at::zeros({C}, perm.options().dtype(at::kInt));
  const int threads = static_cast<int>(std::min<int64_t>(C, kPermThreads));
  const size_t smem = in_shared ? static_cast<size_t>(C) * sizeof(int) : 0;
  permutation_check_kernel<<<1, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      perm.const_data_ptr<int64_t>(), C, in_shared ? nullptr : counts.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// The chain rule in one block at C <= kSmallFoldMaxChannels: its three phases (glow_ext_math.h)
// separated by barriers, g_v in shared memory. The generic version is ~20 ATen launches of a few
// microseconds each on C x C data that fits in one SM's shared memory.
template <typename acc_t>
__global__ void __launch_bounds__(kFoldThreads) chain_kernel(math::ChainArgs<acc_t> a) {
  __shared__ acc_t g_v[kSmallFoldMaxChannels * kSmallFoldMaxChannels];
  __shared__ acc_t scale[kSmallFoldMaxChannels], diag[kSmallFoldMaxChannels];
  const int64_t C = a.channels;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    scale[j] = exp(a.logs[j]);
    diag[j] = a.sign_s[j] * exp(a.log_s[j]);
    math::chain_actnorm_column(a, j);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < C * C; e += blockDim.x) math::chain_scatter_entry(a, scale, g_v, e);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < C * C; e += blockDim.x) math::chain_lu_entry(a, diag, g_v, e);
}

bool chain_small_cuda(const LUParams& p, const at::Tensor& grad_folded, const at::Tensor& grad_offset,
                      const at::Tensor& folded, const FoldedTerms& terms,
                      const at::Tensor& grad_logdet_m, ParamGrads& out) {
  const int64_t C = p.bias.size(0);
  if (C > kSmallFoldMaxChannels || p.bias.scalar_type() != grad_folded.scalar_type()) return false;
  const c10::cuda::CUDAGuard guard(p.bias.device());
  const auto bias = p.bias.contiguous(), logs = p.logs.contiguous(), perm = p.perm.contiguous();
  const auto lower = p.lower.contiguous(), upper = p.upper.contiguous();
  const auto log_s = p.log_s.contiguous(), sign_s = p.sign_s.contiguous();
  const auto g_folded = grad_folded.contiguous(), g_offset = grad_offset.contiguous();
  const auto wf = folded.defined() ? folded.contiguous() : at::Tensor();
  const auto terms_bias = wf.defined() ? at::Tensor() : terms.grad_bias.contiguous();
  const auto terms_dot = wf.defined() ? at::Tensor() : terms.column_dot.contiguous();
  const auto gld = grad_logdet_m.reshape({1}).to(bias.scalar_type());
  out = {at::empty({C}, bias.options()), at::empty({C}, bias.options()),
         at::empty({C, C}, bias.options()), at::empty({C, C}, bias.options()),
         at::empty({C}, bias.options())};
  const int threads = static_cast<int>(std::min<int64_t>(C * C, kFoldThreads));
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "glow_ext_chain_cuda", [&] {
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    const math::ChainArgs<scalar_t> args{
        ptr(bias), ptr(logs), ptr(lower), ptr(upper), ptr(log_s), ptr(sign_s),
        perm.const_data_ptr<int64_t>(), ptr(g_folded), ptr(g_offset), ptr(wf), ptr(terms_bias),
        ptr(terms_dot), ptr(gld), C,
        out.bias.mutable_data_ptr<scalar_t>(), out.logs.mutable_data_ptr<scalar_t>(),
        out.lower.mutable_data_ptr<scalar_t>(), out.upper.mutable_data_ptr<scalar_t>(),
        out.log_s.mutable_data_ptr<scalar_t>()};
    chain_kernel<scalar_t><<<1, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

const Backend kCudaBackend{channel_mix_cuda, fold_forward_small_cuda, chain_small_cuda,
                           /*mix_outer=*/nullptr, /*fold_inverse=*/nullptr,
                           validate_permutation_cuda};

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
