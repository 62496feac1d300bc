// CPU kernel of the fused affine coupling.
//
// Tasks are blocks of one sample's elements, run in parallel; inside a block, `omp simd` loops over
// the per-element math of coupling_math.h (vectorised for AVX-512, AVX2+FMA or baseline x86-64,
// picked at run time). The forward's log-determinant is reduced per chunk of kChunk elements as
// Σ min(u, 0) - log Π (1 + e): one scalar log per chunk instead of one per element (each factor
// lies in (1, 2], so the product of kChunk of them cannot overflow). The chunks' partial sums are
// added in a fixed order per sample, so the result does not depend on the thread count.
// bfloat16 tensors (x_b and h, or h alone with float32 x_b) are widened per chunk and the outputs
// rounded once per chunk, around the float32 loop (ChunkStaging).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../coupling.h"
#include "../coupling_math.h"
#include "bfloat16_cpu.h"

namespace glow_ext {
namespace {

constexpr int64_t kChunk = 64;            // elements per partial log-determinant
constexpr int64_t kChunksPerTask = 32;    // 2048 elements, ~8-16 KiB per input: one task's work
static_assert(kChunk <= 126, "Π (1 + e) over a chunk must stay below float's largest power of 2");

// The arithmetic's type: float64 for float64 input, float32 otherwise (bfloat16 is widened on load).
// Templates below take the loops' element types (cpu::LoopType), not c10::BFloat16.
template <typename input_t>
using AccOf = std::conditional_t<std::is_same_v<input_t, double>, double, float>;

template <typename input_t, typename h_t>
using CallPointers = math::CouplingPointers<input_t, h_t, AccOf<input_t>>;

// A chunk's values of one tensor of loop type T as the element loop sees them: bfloat16 is widened
// into a float32 buffer before the loop (inputs) or rounded once from one after it, 16 at a time
// (outputs, bfloat16_cpu.h). The loop itself then reads and writes one type, float32 or float64,
// and vectorises as for float32 tensors (GCC does not vectorise its reduction over mixed widths).
// Other types are used in place.
template <typename T>
struct ChunkStaging {
  static constexpr bool kStaged = std::is_same_v<T, cpu::BFloat16Bits>;
  using value_t = std::conditional_t<kStaged, float, T>;
  value_t staged[kStaged ? kChunk : 1];

  const value_t* input(const T* source, int64_t count) {
    if constexpr (kStaged) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) staged[i] = source[i];
      return staged;
    } else {
      return source;
    }
  }
  value_t* output(T* destination) {
    if constexpr (kStaged) {
      return staged;
    } else {
      return destination;
    }
  }
  void flush(T* destination, int64_t count) const {
    if constexpr (kStaged) cpu::round_to_bfloat16(staged, destination, count);
  }
};

// `count` elements from `rows`. Returns their Σ log sigmoid for the forward, 0 otherwise.
template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>
inline __attribute__((always_inline)) acc_t run_chunk(const math::SampleRows<input_t, h_t, acc_t> rows,
                                                      int64_t count) {
  constexpr bool backward = kMode == CouplingMode::kBackward || kMode == CouplingMode::kInverseBackward;
  ChunkStaging<input_t> input, grad, out;
  ChunkStaging<h_t> shift, logit, grad_shift, grad_logit;
  const math::SampleRows<typename ChunkStaging<input_t>::value_t, typename ChunkStaging<h_t>::value_t,
                         acc_t>
      computed{input.input(rows.input, count),
               shift.input(rows.shift, count),
               logit.input(rows.logit, count),
               backward ? grad.input(rows.grad, count) : nullptr,
               rows.grad_logdet,
               out.output(rows.out),
               backward ? grad_shift.output(rows.grad_shift) : nullptr,
               backward ? grad_logit.output(rows.grad_logit) : nullptr};
  acc_t sum = 0;
  if constexpr (kMode == CouplingMode::kForward) {
    acc_t negative = 0, product = 1;
#pragma omp simd reduction(+ : negative) reduction(* : product)
    for (int64_t i = 0; i < count; ++i) {
      const auto parts = math::coupling_element<kMode>(computed, i);
      negative += parts.negative_part();
      product *= parts.denom;
    }
    sum = negative - std::log(product);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) math::coupling_element<kMode>(computed, i);
  }
  out.flush(rows.out, count);
  if constexpr (backward) {
    grad_shift.flush(rows.grad_shift, count);
    grad_logit.flush(rows.grad_logit, count);
  }
  return sum;
}

// Tasks [task_begin, task_end) of kChunksPerTask chunks each; partials[n·chunks + c] receives the
// forward's chunk sums.
template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>
inline __attribute__((always_inline)) void run_tasks(
    const math::CouplingPointers<input_t, h_t, acc_t>& p, int64_t chunks, int64_t task_begin,
    int64_t task_end, acc_t* partials) {
  const int64_t tasks_per_sample = (chunks + kChunksPerTask - 1) / kChunksPerTask;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t n = task / tasks_per_sample;
    const int64_t first = (task - n * tasks_per_sample) * kChunksPerTask;
    const int64_t last = std::min(first + kChunksPerTask, chunks);
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      const acc_t sum = run_chunk<kMode>(p.rows(n, begin), std::min(kChunk, p.per_sample - begin));
      if constexpr (kMode == CouplingMode::kForward) partials[n * chunks + c] = sum;
    }
  }
}

// One copy of the loops per instruction set; the always-inline math is compiled into each.
#define GLOW_EXT_COUPLING_ISA_VARIANT(SUFFIX, TARGET)                                         \
  template <CouplingMode kMode, typename input_t, typename h_t, typename acc_t>              \
  TARGET void run_tasks_##SUFFIX(const math::CouplingPointers<input_t, h_t, acc_t>& p,         \
                                 int64_t chunks, int64_t begin, int64_t end, acc_t* partials) { \
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

// A tensor's data as the loops' element type (dtype checked by the caller's dispatch).
template <typename T>
const T* loop_data(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* loop_data_mutable(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// input_t, h_t: the loops' element types (cpu::LoopType of the tensors' dtypes).
template <CouplingMode kMode, typename input_t, typename h_t>
void run(const CouplingCall& call) {
  using acc_t = AccOf<input_t>;
  const int64_t N = call.out.size(0), per_sample = call.out.numel() / N;
  const bool backward = kMode == CouplingMode::kBackward || kMode == CouplingMode::kInverseBackward;
  const CallPointers<input_t, h_t> p{
      loop_data<input_t>(call.input),
      loop_data<h_t>(call.h),
      backward ? loop_data<input_t>(call.grad) : nullptr,
      kMode == CouplingMode::kBackward ? call.grad_logdet.const_data_ptr<acc_t>() : nullptr,
      loop_data_mutable<input_t>(call.out),
      backward ? loop_data_mutable<h_t>(call.grad_h) : nullptr,
      call.input.stride(0), call.h.stride(0), backward ? call.grad.stride(0) : 0,
      per_sample};
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  const int64_t tasks = N * ((chunks + kChunksPerTask - 1) / kChunksPerTask);
  std::vector<acc_t> partials(kMode == CouplingMode::kForward ? N * chunks : 0);
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
    acc_t* logdet = call.logdet.mutable_data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) {
      acc_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partials[n * chunks + c];
      logdet[n] = sum;
    }
  }
}

template <typename input_t, typename h_t>
void run_mode(const CouplingCall& call) {
  using input_loop_t = cpu::LoopType<input_t>;
  using h_loop_t = cpu::LoopType<h_t>;
  switch (call.mode) {
    case CouplingMode::kForward: return run<CouplingMode::kForward, input_loop_t, h_loop_t>(call);
    case CouplingMode::kInverse: return run<CouplingMode::kInverse, input_loop_t, h_loop_t>(call);
    case CouplingMode::kBackward: return run<CouplingMode::kBackward, input_loop_t, h_loop_t>(call);
    case CouplingMode::kInverseBackward:
      return run<CouplingMode::kInverseBackward, input_loop_t, h_loop_t>(call);
  }
}

// The dtype pairs coupling.cpp admits on the CPU: one dtype (float32, float64, bfloat16), or
// float32 input with bfloat16 h.
void coupling_kernel_cpu(const CouplingCall& call) {
  const auto input = call.input.scalar_type(), h = call.h.scalar_type();
  if (input == at::kDouble) return run_mode<double, double>(call);
  if (input == at::kBFloat16) return run_mode<c10::BFloat16, c10::BFloat16>(call);
  TORCH_INTERNAL_ASSERT(input == at::kFloat && (h == at::kFloat || h == at::kBFloat16));
  if (h == at::kBFloat16) return run_mode<float, c10::BFloat16>(call);
  return run_mode<float, float>(call);
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
