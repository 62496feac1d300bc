// CUDA kernels of the fused affine coupling.
//
// The inverse and both backward passes are one grid-stride loop over the elements. The forward also
// reduces the log-determinant per sample without atomics: each block takes a slice of one sample,
// reduces it with cub::BlockReduce into a partial sum, and the (N, blocks per sample) partials are
// summed by ATen on the same stream: deterministic and without a host synchronisation. The
// per-element arithmetic is coupling_math.h, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <type_traits>

#include "../coupling.h"
#include "../cuda_launch_plan.h"
#include "../coupling_math.h"

namespace glow_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kElementsPerThread = 8;        // per forward block and sample, before splitting
constexpr int64_t kMaxBlocksPerSample = 64;

template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    coupling_elementwise_kernel(math::CouplingPointers<input_t, h_t, acc_t> p, int64_t total) {
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total;
       k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = k / p.per_sample;
    math::coupling_element<kMode>(p.rows(n, 0), k - n * p.per_sample);
  }
}

// Task t = (sample n, slice b): the block strides over sample n's elements from b·kThreads and
// writes the slice's Σ log sigmoid to partials[t].
template <typename input_t, typename h_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    coupling_forward_kernel(math::CouplingPointers<input_t, h_t, acc_t> p, int64_t tasks,
                            int64_t blocks_per_sample, acc_t* __restrict__ partials) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t n = task / blocks_per_sample;
    const auto rows = p.rows(n, 0);
    acc_t sum = 0;
    for (int64_t i = (task - n * blocks_per_sample) * kThreads + threadIdx.x; i < p.per_sample;
         i += blocks_per_sample * kThreads) {
      const auto parts = math::coupling_element<CouplingMode::kForward>(rows, i);
      sum += parts.negative_part() - log1p(parts.e);
    }
    const acc_t total = BlockReduce(temp).Sum(sum);
    if (threadIdx.x == 0) partials[task] = total;
    __syncthreads();  // temp is reused by the block's next task
  }
}

unsigned grid_for(int64_t work_items) {
  return static_cast<unsigned>(std::clamp<int64_t>(work_items, 1, max_grid_blocks()));
}

template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>
void launch_elementwise(const math::CouplingPointers<input_t, h_t, acc_t>& p, int64_t total,
                        cudaStream_t stream) {
  coupling_elementwise_kernel<kMode><<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0,
                                       stream>>>(p, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename input_t, typename h_t>
void run(const CouplingCall& call, cudaStream_t stream) {
  using acc_t = at::opmath_type<input_t>;
  const int64_t N = call.out.size(0), per_sample = call.out.numel() / N;
  const bool backward = call.mode == CouplingMode::kBackward ||
                        call.mode == CouplingMode::kInverseBackward;
  const math::CouplingPointers<input_t, h_t, acc_t> p{
      call.input.const_data_ptr<input_t>(),
      call.h.const_data_ptr<h_t>(),
      backward ? call.grad.const_data_ptr<input_t>() : nullptr,
      call.mode == CouplingMode::kBackward ? call.grad_logdet.const_data_ptr<acc_t>() : nullptr,
      call.out.mutable_data_ptr<input_t>(),
      backward ? call.grad_h.mutable_data_ptr<h_t>() : nullptr,
      call.input.stride(0), call.h.stride(0), backward ? call.grad.stride(0) : 0,
      per_sample};
  switch (call.mode) {
    case CouplingMode::kForward: {
      const int64_t blocks_per_sample = std::clamp<int64_t>(
          per_sample / (kThreads * kElementsPerThread), 1, kMaxBlocksPerSample);
      auto partials = at::empty({N, blocks_per_sample}, call.logdet.options());
      coupling_forward_kernel<<<grid_for(N * blocks_per_sample), kThreads, 0, stream>>>(
          p, N * blocks_per_sample, blocks_per_sample, partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor logdet = call.logdet;
      at::sum_out(logdet, partials, {1});
      return;
    }
    case CouplingMode::kInverse:
      return launch_elementwise<CouplingMode::kInverse>(p, N * per_sample, stream);
    case CouplingMode::kBackward:
      return launch_elementwise<CouplingMode::kBackward>(p, N * per_sample, stream);
    case CouplingMode::kInverseBackward:
      return launch_elementwise<CouplingMode::kInverseBackward>(p, N * per_sample, stream);
  }
}

// One dtype for the input and h, or (coupling.cpp's other admitted pair) float32 input with 16-bit h.
void coupling_kernel_cuda(const CouplingCall& call) {
  const c10::cuda::CUDAGuard guard(call.input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.h.scalar_type(),
                                  "glow_ext_affine_coupling_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (call.input.scalar_type() == at::kFloat) return run<float, scalar_t>(call, stream);
    }
    run<scalar_t, scalar_t>(call, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(glow_ext, CUDA, m) {
  using Ops = BoundCouplingOps<coupling_kernel_cuda>;
  m.impl("affine_coupling", &Ops::forward_op);
  m.impl("affine_coupling_inverse", &Ops::inverse_op);
  m.impl("affine_coupling_backward", &Ops::backward_op);
  m.impl("affine_coupling_inverse_backward", &Ops::inverse_backward_op);
}

}  // namespace glow_ext
