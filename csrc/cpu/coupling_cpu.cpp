// CPU kernel of the fused affine coupling.
//
// Tasks are blocks of one sample's elements, run in parallel; inside a block, `omp simd` loops over
// the per-element math of coupling_math.h (vectorised for AVX-512, AVX2+FMA or baseline x86-64,
// picked at run time). The forward's log-determinant is reduced per chunk of kChunk elements as
// Σ min(u, 0) - log Π (1 + e): one scalar log per chunk instead of one per element (each factor
// lies in (1, 2], so the product of kChunk of them cannot overflow). The chunks' partial sums are
// added in a fixed order per sample, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../coupling.h"
#include "../coupling_math.h"

namespace glow_ext {
namespace {

constexpr int64_t kChunk = 64;            // elements per partial log-determinant
constexpr int64_t kChunksPerTask = 32;    // 2048 elements, ~8-16 KiB per input: one task's work
static_assert(kChunk <= 126, "Π (1 + e) over a chunk must stay below float's largest power of 2");

template <typename scalar_t>
using CallPointers = math::CouplingPointers<scalar_t, scalar_t>;

// `count` elements from `rows`. Returns their Σ log sigmoid for the forward, 0 otherwise.
template <CouplingMode kMode, typename scalar_t>
inline __attribute__((always_inline)) scalar_t run_chunk(const math::SampleRows<scalar_t, scalar_t> rows,
                                                         int64_t count) {
  if constexpr (kMode == CouplingMode::kForward) {
    scalar_t negative = 0, product = 1;
#pragma omp simd reduction(+ : negative) reduction(* : product)
    for (int64_t i = 0; i < count; ++i) {
      const auto parts = math::coupling_element<kMode>(rows, i);
      negative += parts.negative_part();
      product *= parts.denom;
    }
    return negative - std::log(product);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) math::coupling_element<kMode>(rows, i);
    return 0;
  }
}

// Tasks [task_begin, task_end) of kChunksPerTask chunks each; partials[n·chunks + c] receives the
// forward's chunk sums.
template <CouplingMode kMode, typename scalar_t>
inline __attribute__((always_inline)) void run_tasks(const CallPointers<scalar_t>& p, int64_t chunks,
                                                     int64_t task_begin, int64_t task_end,
                                                     scalar_t* partials) {
  const int64_t tasks_per_sample = (chunks + kChunksPerTask - 1) / kChunksPerTask;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t n = task / tasks_per_sample;
    const int64_t first = (task - n * tasks_per_sample) * kChunksPerTask;
    const int64_t last = std::min(first + kChunksPerTask, chunks);
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      const scalar_t sum = run_chunk<kMode>(p.rows(n, begin), std::min(kChunk, p.per_sample - begin));
      if constexpr (kMode == CouplingMode::kForward) partials[n * chunks + c] = sum;
    }
  }
}

// One copy of the loops per instruction set; the always-inline math is compiled into each.
#define GLOW_EXT_COUPLING_ISA_VARIANT(SUFFIX, TARGET)                                         \
  template <CouplingMode kMode, typename scalar_t>                                            \
  TARGET void run_tasks_##SUFFIX(const CallPointers<scalar_t>& p, int64_t chunks, int64_t begin,  \
                                 int64_t end, scalar_t* partials) {                           \
    run_tasks<kMode>(p, chunks, begin, end, partials);                                        \
  }
#if defined(__x86_64__)
GLOW_EXT_COUPLING_ISA_VARIANT(avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))))
GLOW_EXT_COUPLING_ISA_VARIANT(avx2, __attribute__((target("avx2,fma"))))
#endif
GLOW_EXT_COUPLING_ISA_VARIANT(baseline, )
#undef GLOW_EXT_COUPLING_ISA_VARIANT

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();

template <CouplingMode kMode, typename scalar_t>
void run(const CouplingCall& call) {
  const int64_t N = call.out.size(0), per_sample = call.out.numel() / N;
  const bool backward = kMode == CouplingMode::kBackward || kMode == CouplingMode::kInverseBackward;
  const CallPointers<scalar_t> p{
      call.input.const_data_ptr<scalar_t>(),
      call.h.const_data_ptr<scalar_t>(),
      backward ? call.grad.const_data_ptr<scalar_t>() : nullptr,
      kMode == CouplingMode::kBackward ? call.grad_logdet.const_data_ptr<scalar_t>() : nullptr,
      call.out.mutable_data_ptr<scalar_t>(),
      backward ? call.grad_h.mutable_data_ptr<scalar_t>() : nullptr,
      call.input.stride(0), call.h.stride(0), backward ? call.grad.stride(0) : 0,
      per_sample};
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  const int64_t tasks = N * ((chunks + kChunksPerTask - 1) / kChunksPerTask);
  std::vector<scalar_t> partials(kMode == CouplingMode::kForward ? N * chunks : 0);
  // ATen's grain for elementwise work: below it one thread is faster than waking the others (and,
  // on a shared machine, than waiting for them at the barrier).
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kChunk * kChunksPerTask));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    switch (kIsa) {
#if defined(__x86_64__)
      case Isa::kAvx512: return run_tasks_avx512<kMode>(p, chunks, begin, end, partials.data());
      case Isa::kAvx2: return run_tasks_avx2<kMode>(p, chunks, begin, end, partials.data());
#endif
      default: return run_tasks_baseline<kMode>(p, chunks, begin, end, partials.data());
    }
  });
  if constexpr (kMode == CouplingMode::kForward) {
    scalar_t* logdet = call.logdet.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      scalar_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partials[n * chunks + c];
      logdet[n] = sum;
    }
  }
}

void coupling_kernel_cpu(const CouplingCall& call) {
  AT_DISPATCH_FLOATING_TYPES(call.input.scalar_type(), "glow_ext_affine_coupling_cpu", [&] {
    switch (call.mode) {
      case CouplingMode::kForward: return run<CouplingMode::kForward, scalar_t>(call);
      case CouplingMode::kInverse: return run<CouplingMode::kInverse, scalar_t>(call);
      case CouplingMode::kBackward: return run<CouplingMode::kBackward, scalar_t>(call);
      case CouplingMode::kInverseBackward:
        return run<CouplingMode::kInverseBackward, scalar_t>(call);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(glow_ext, CPU, m) {
  using Ops = BoundCouplingOps<coupling_kernel_cpu>;
  m.impl("affine_coupling", &Ops::forward_op);
  m.impl("affine_coupling_inverse", &Ops::inverse_op);
  m.impl("affine_coupling_backward", &Ops::backward_op);
  m.impl("affine_coupling_inverse_backward", &Ops::inverse_backward_op);
}

}  // namespace glow_ext
