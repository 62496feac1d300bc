// CPU kernels of the fused ActNorm + LU 1x1 convolution.
//
// Two per-pixel primitives: the channel mix y = Wf·x + c (forward, inverse), and the backward pass
// that mixes (dL/dx = Wfᵀ·g) and sums the weight gradient Σ g·xᵀ, Σ g in one sweep of the pixels. Both are loops over SIMD tiles of pixels compiled for AVX-512,
// AVX2+FMA and baseline x86-64, picked at run time; past kDirectMaxChannels, GEMMs. For small C the
// C x C work around them (weight fold, chain rule) is plain loops too: ATen launches would cost
// more than the arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../actnorm_invconv.h"
#include "../glow_ext_math.h"

namespace glow_ext {
namespace {

constexpr int64_t kDirectMaxChannels = 512;  // beat at::baddbmm at every C measured (up to 256)
constexpr int64_t kSmallFoldMaxChannels = 32;   // the per-entry fold loop is O(C^3) scalar
// Past it the chain rule's two float32 GEMMs win (one thread, backward op at 1x64x4x4 and
// 4x64x16x16: the loops took 1.3-1.5x as long).
constexpr int64_t kSmallChainMaxChannels = 48;
// Past this C the one-sweep backward's register-blocked weight gradient loses to the channel mix
// plus MKL's batched GEMM (one thread, backward op, 2026-12-01: at C = 48 the sweep took 1.2-1.9x
// as long, 64x48x4x4 and 4x48x32x32; at C = 12 and 24 it is 0.9-1.0x, 32x24x16x16, 4x24x64x64).
constexpr int64_t kMixOuterMaxChannels = 32;
constexpr int kRows = 8;              // output channels computed per pass over an input tile
constexpr int64_t kTileBytes = 128;   // pixels per task and image row: two AVX-512 registers
constexpr int64_t kMinFlopsPerTask = 1 << 16;
constexpr int64_t kOuterGroupBytes = 192 << 10;  // grad_y and x of a task group, kept in L2

// SIMD lanes of consecutive pixels, one register of the instruction set wide (GCC vector
// extensions; an alias template would drop the attribute). kRows independent accumulators per
// lane hide the FMA latency.
template <typename scalar_t, int kBytes>
struct LaneOf {
  typedef scalar_t type __attribute__((vector_size(kBytes)));
};
template <typename scalar_t, int kBytes>
using Lane = typename LaneOf<scalar_t, kBytes>::type;
static_assert(sizeof(Lane<float, 128>) == 128 && sizeof(Lane<double, 32>) == 32);

template <typename lane_t, typename scalar_t>
struct StridedLoad {
  const scalar_t* base;
  int64_t stride;
  GLOW_HD lane_t operator()(int64_t j) const {
    lane_t v;
    __builtin_memcpy(&v, base + j * stride, sizeof(lane_t));
    return v;
  }
};

template <typename scalar_t>
struct MixArgs {
  const scalar_t* x;
  scalar_t* y;
  const scalar_t* weight;  // (C, C) row-major
  const scalar_t* offset;  // (C,)
  int64_t channels, pixels;  // pixels per image (H·W)
  int64_t tiles_per_image;
};

// Output channels [0, C) at one group of pixels, kRows at a time; lane_t is a SIMD vector of
// consecutive pixels or, for the ragged end of an image, a single pixel.
template <typename lane_t, typename scalar_t>
GLOW_HD void mix_pixels(const MixArgs<scalar_t>& a, const scalar_t* x, scalar_t* y) {
  const int64_t C = a.channels;
  const StridedLoad<lane_t, scalar_t> load{x, a.pixels};
  lane_t out[kRows];
  int64_t i = 0;
  for (; i + kRows <= C; i += kRows) {
    math::mix_rows<kRows>(a.weight + i * C, C, a.offset + i, load, out);
    for (int r = 0; r < kRows; ++r) __builtin_memcpy(y + (i + r) * a.pixels, &out[r], sizeof(lane_t));
  }
  // The rest in blocks of 4, then 1: one row at a time is a single FMA chain, latency-bound
  // (C = 12 would spend as long on its last 4 rows as on the first 8).
  for (; i + kRows / 2 <= C; i += kRows / 2) {
    math::mix_rows<kRows / 2>(a.weight + i * C, C, a.offset + i, load, out);
    for (int r = 0; r < kRows / 2; ++r) __builtin_memcpy(y + (i + r) * a.pixels, &out[r], sizeof(lane_t));
  }
  for (; i < C; ++i) {
    math::mix_rows<1>(a.weight + i * C, C, a.offset + i, load, out);
    __builtin_memcpy(y + i * a.pixels, &out[0], sizeof(lane_t));
  }
}

// Pixels [p, p_end) of image n, in lanes of kLaneBytes; the ragged end in half lanes, then single
// pixels.
template <typename scalar_t, int kLaneBytes>
GLOW_HD void mix_span(const MixArgs<scalar_t>& a, int64_t n, int64_t p, int64_t p_end) {
  constexpr int64_t lane = kLaneBytes / sizeof(scalar_t);
  const scalar_t* x = a.x + n * a.channels * a.pixels;
  scalar_t* y = a.y + n * a.channels * a.pixels;
  for (; p + lane <= p_end; p += lane) mix_pixels<Lane<scalar_t, kLaneBytes>>(a, x + p, y + p);
  for (; p + lane / 2 <= p_end; p += lane / 2) {
    mix_pixels<Lane<scalar_t, kLaneBytes / 2>>(a, x + p, y + p);
  }
  for (; p < p_end; ++p) mix_pixels<scalar_t>(a, x + p, y + p);
}

// Tiles [begin, end) of kTileBytes of pixels.
template <typename scalar_t, int kLaneBytes>
GLOW_HD void mix_tiles(const MixArgs<scalar_t>& a, int64_t begin, int64_t end) {
  constexpr int64_t tile = kTileBytes / sizeof(scalar_t);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p = (t % a.tiles_per_image) * tile;
    mix_span<scalar_t, kLaneBytes>(a, t / a.tiles_per_image, p, std::min(p + tile, a.pixels));
  }
}

template <typename scalar_t>
struct OuterArgs {
  const scalar_t* g;  // grad_y, NCHW
  const scalar_t* x;
  // When set, the pass first writes mix->y = mix->weight·mix->x over each group of pixels, while
  // they are in cache; g is then mix->x or mix->y.
  const MixArgs<scalar_t>* mix;
  int64_t channels, pixels;  // pixels per image (H·W)
  int64_t chunk, chunks_per_image;
};

template <typename lane_t, typename scalar_t>
GLOW_HD scalar_t lane_sum(const lane_t& v) {
  scalar_t s = 0;
  for (int k = 0; k < static_cast<int>(sizeof(lane_t) / sizeof(scalar_t)); ++k) s += v[k];
  return s;
}

// out[i][j] += Σ_p g_i[p]·x_j[p] for a kB x kB block of (i, j) over the pixels of tasks [t0, t1)
// (task = image x pixel chunk); the accumulators stay in registers for the whole range.
template <int kB, typename lane_t, typename scalar_t>
GLOW_HD void outer_block(const OuterArgs<scalar_t>& a, int64_t t0, int64_t t1, int64_t i, int64_t j,
                         scalar_t* out) {
  constexpr int64_t lanes = sizeof(lane_t) / sizeof(scalar_t);
  const int64_t C = a.channels, HW = a.pixels;
  lane_t acc[kB][kB];
  scalar_t tail[kB][kB];
  for (int r = 0; r < kB; ++r) {
    for (int c = 0; c < kB; ++c) {
      acc[r][c] = lane_t{};
      tail[r][c] = 0;
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / a.chunks_per_image;
    const int64_t p0 = (t % a.chunks_per_image) * a.chunk;
    const int64_t p1 = std::min(p0 + a.chunk, HW);
    const scalar_t* g = a.g + (n * C + i) * HW;
    const scalar_t* x = a.x + (n * C + j) * HW;
    int64_t p = p0;
    for (; p + lanes <= p1; p += lanes) {
      lane_t gv[kB], xv[kB];
      for (int r = 0; r < kB; ++r) {
        gv[r] = StridedLoad<lane_t, scalar_t>{g + p, HW}(r);
        xv[r] = StridedLoad<lane_t, scalar_t>{x + p, HW}(r);
      }
      for (int r = 0; r < kB; ++r) {
        for (int c = 0; c < kB; ++c) acc[r][c] += gv[r] * xv[c];
      }
    }
    for (; p < p1; ++p) {
      for (int r = 0; r < kB; ++r) {
        for (int c = 0; c < kB; ++c) tail[r][c] += g[r * HW + p] * x[c * HW + p];
      }
    }
  }
  for (int r = 0; r < kB; ++r) {
    for (int c = 0; c < kB; ++c) out[(i + r) * C + j + c] += lane_sum<lane_t, scalar_t>(acc[r][c]) + tail[r][c];
  }
}

// Partial dL/dWf = Σ g·xᵀ and dL/dc = Σ g over tasks [begin, end), added into out = [C*C | C]
// (after the channel mix of each group when a.mix is set: one pass over the pixels for both).
// Tasks are taken in groups whose data fits in L2, so each group is read from memory once while
// every block of (i, j) sweeps it.
template <typename scalar_t, int kLaneBytes, int kBlock>
GLOW_HD void outer_sums(const OuterArgs<scalar_t>& a, int64_t begin, int64_t end, scalar_t* out) {
  using lane_t = Lane<scalar_t, kLaneBytes>;
  const int64_t C = a.channels;
  const int64_t full = C - C % kBlock;  // (i, j) < full in register blocks, the rest one by one
  const int64_t group = std::max<int64_t>(1, kOuterGroupBytes / (2 * C * a.chunk * sizeof(scalar_t)));
  constexpr int64_t lanes_per_reg = kLaneBytes / sizeof(scalar_t);
  for (int64_t t0 = begin; t0 < end; t0 += group) {
    const int64_t t1 = std::min(end, t0 + group);
    for (int64_t t = t0; a.mix && t < t1; ++t) {
      const int64_t p0 = (t % a.chunks_per_image) * a.chunk;
      mix_span<scalar_t, kLaneBytes>(*a.mix, t / a.chunks_per_image, p0, std::min(p0 + a.chunk, a.pixels));
    }
    for (int64_t i = 0; i < full; i += kBlock) {
      for (int64_t j = 0; j < full; j += kBlock) outer_block<kBlock, lane_t>(a, t0, t1, i, j, out);
    }
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = (i < full ? full : 0); j < C; ++j) outer_block<1, lane_t>(a, t0, t1, i, j, out);
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / a.chunks_per_image;
      const int64_t p0 = (t % a.chunks_per_image) * a.chunk;
      const int64_t p1 = std::min(p0 + a.chunk, a.pixels);
      for (int64_t i = 0; i < C; ++i) {
        const scalar_t* g = a.g + (n * C + i) * a.pixels;
        lane_t lanes{};  // a scalar running sum would be one add per pixel, latency-bound
        int64_t p = p0;
        for (; p + lanes_per_reg <= p1; p += lanes_per_reg) lanes += StridedLoad<lane_t, scalar_t>{g + p, 0}(0);
        scalar_t sum = lane_sum<lane_t, scalar_t>(lanes);
        for (; p < p1; ++p) sum += g[p];
        out[C * C + i] += sum;
      }
    }
  }
}

// One copy of the loops per instruction set; the always-inline math above is compiled into each.
// Lanes are one register wide; the outer-product blocks fill the register file (32 or 16 regs).
#define GLOW_EXT_ISA_VARIANT(SUFFIX, TARGET, LANE_BYTES, BLOCK)                                 \
  template <typename scalar_t>                                                                  \
  TARGET void mix_tiles_##SUFFIX(const MixArgs<scalar_t>& a, int64_t begin, int64_t end) {       \
    mix_tiles<scalar_t, LANE_BYTES>(a, begin, end);                                             \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  TARGET void outer_sums_##SUFFIX(const OuterArgs<scalar_t>& a, int64_t begin, int64_t end,     \
                                  scalar_t* out) {                                              \
    outer_sums<scalar_t, LANE_BYTES, BLOCK>(a, begin, end, out);                                \
  }
#if defined(__x86_64__)
GLOW_EXT_ISA_VARIANT(avx512, __attribute__((target("avx512f,avx2,fma"))), 64, 4)
GLOW_EXT_ISA_VARIANT(avx2, __attribute__((target("avx2,fma"))), 32, 2)
#endif
GLOW_EXT_ISA_VARIANT(baseline, , 16, 2)
#undef GLOW_EXT_ISA_VARIANT

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();

template <typename scalar_t>
void mix_direct(const MixArgs<scalar_t>& a, int64_t tasks) {
  const int64_t flops_per_tile = 2 * a.channels * a.channels * (kTileBytes / sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / std::max<int64_t>(flops_per_tile, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    switch (kIsa) {
#if defined(__x86_64__)
      case Isa::kAvx512: return mix_tiles_avx512(a, begin, end);
      case Isa::kAvx2: return mix_tiles_avx2(a, begin, end);
#endif
      default: return mix_tiles_baseline(a, begin, end);
    }
  });
}

constexpr int64_t kOuterChunkPixels = 4096;

bool mix_outer_cpu(const at::Tensor& src, const at::Tensor& weight_in, const at::Tensor& x,
                   bool outer_of_out, at::Tensor& out, at::Tensor& grad_folded,
                   at::Tensor& grad_offset) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (C > kMixOuterMaxChannels) return false;
  const auto weight = weight_in.contiguous();
  out = at::empty_like(src, at::MemoryFormat::Contiguous);
  auto total = at::zeros({C * C + C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glow_ext_mix_outer_cpu", [&] {
    const std::vector<scalar_t> no_offset(C, 0);
    const MixArgs<scalar_t> mix{src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                weight.const_data_ptr<scalar_t>(), no_offset.data(), C, HW, 0};
    const int64_t chunk = std::min(HW, kOuterChunkPixels);
    const OuterArgs<scalar_t> args{outer_of_out ? mix.y : mix.x, x.const_data_ptr<scalar_t>(), &mix,
                                   C, HW, chunk, (HW + chunk - 1) / chunk};
    const int64_t tasks = N * args.chunks_per_image;
    const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / std::max<int64_t>(4 * C * C * chunk, 1));
    // One partial sum per thread, added up in thread order: the chunks of at::parallel_for are a
    // function of the thread count alone, so the result is the same on every run.
    const int64_t size = C * C + C;
    std::vector<scalar_t> partials(at::get_num_threads() * size, 0);
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      scalar_t* partial = partials.data() + at::get_thread_num() * size;
      switch (kIsa) {
#if defined(__x86_64__)
        case Isa::kAvx512: outer_sums_avx512(args, begin, end, partial); break;
        case Isa::kAvx2: outer_sums_avx2(args, begin, end, partial); break;
#endif
        default: outer_sums_baseline(args, begin, end, partial); break;
      }
    });
    scalar_t* sums = total.mutable_data_ptr<scalar_t>();
    for (size_t t = 0; t < partials.size(); t += size) {
      for (int64_t k = 0; k < size; ++k) sums[k] += partials[t + k];
    }
  });
  grad_folded = total.narrow(0, 0, C * C).view({C, C});
  grad_offset = total.narrow(0, C * C, C);
  return true;
}

at::Tensor channel_mix_cpu(const at::Tensor& x, const ChannelMap& map) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto weight = map.weight.contiguous();
  const auto offset = map.offset.contiguous();
  if (C > kDirectMaxChannels) {
    const auto y = at::baddbmm(offset.view({1, C, 1}).expand({N, C, HW}), weight.expand({N, C, C}),
                               x.view({N, C, HW}));
    return y.view(x.sizes());
  }
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glow_ext_channel_mix_cpu", [&] {
    const int64_t tile = kTileBytes / sizeof(scalar_t);
    const int64_t tiles = (HW + tile - 1) / tile;
    const MixArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                 weight.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                                 C, HW, tiles};
    mix_direct(args, N * tiles);
  });
  return y;
}

// The parameters in contiguous storage, for the small-C loops that index them directly.
struct ContiguousParams {
  at::Tensor bias, logs, perm, lower, upper, log_s, sign_s;
};

ContiguousParams contiguous_params(const LUParams& p) {
  return {p.bias.contiguous(),  p.logs.contiguous(),  p.perm.contiguous(), p.lower.contiguous(),
          p.upper.contiguous(), p.log_s.contiguous(), p.sign_s.contiguous()};
}

// Wf[i][j] = W[i][j]·exp(logs[j]) and c = Wf·bias straight from the LU factors, one small loop
// instead of the ~10 ATen launches of the generic assembly.
bool fold_forward_small_cpu(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) {
  const int64_t C = p.bias.size(0);
  if (C > kSmallFoldMaxChannels || p.bias.scalar_type() != acc_dtype) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  out.weight = at::empty({C, C}, bias.options());
  out.offset = at::empty({C}, bias.options());
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "glow_ext_fold_forward_cpu", [&] {
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    const scalar_t* s_log = log_s.const_data_ptr<scalar_t>();
    const scalar_t* s_sign = sign_s.const_data_ptr<scalar_t>();
    const scalar_t* actnorm_logs = logs.const_data_ptr<scalar_t>();
    std::vector<scalar_t> diag(C), scale(C);
    for (int64_t j = 0; j < C; ++j) {
      diag[j] = s_sign[j] * std::exp(s_log[j]);
      scale[j] = std::exp(actnorm_logs[j]);
    }
    scalar_t* w = out.weight.mutable_data_ptr<scalar_t>();
    scalar_t* c = out.offset.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      scalar_t c_i = 0;
      for (int64_t j = 0; j < C; ++j) {
        w[i * C + j] = scale[j] * math::lu_weight_entry<scalar_t>(
                                      lower.const_data_ptr<scalar_t>(), upper.const_data_ptr<scalar_t>(),
                                      diag.data(), perm.const_data_ptr<int64_t>(), C, i, j);
        c_i += w[i * C + j] * b[j];
      }
      c[i] = c_i;
    }
  });
  return true;
}

// Wf⁻¹ = diag(exp(−logs))·U'⁻¹·L⁻¹·Pᵀ and the offset −bias from explicit triangular inverses in
// float64 loops (the generic version's float64 solves, ~20 ATen launches, cost several times more
// at small C: inverse forward + backward at 1x8x4x4 ... 1x32x4x4).
bool fold_inverse_small_cpu(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) {
  const int64_t C = p.bias.size(0);
  if (C > kSmallFoldMaxChannels || p.bias.scalar_type() != acc_dtype) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  out.weight = at::empty({C, C}, bias.options());
  out.offset = -bias;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "glow_ext_fold_inverse_cpu", [&] {
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const int64_t* pm = perm.const_data_ptr<int64_t>();
    std::vector<double> l_inv(C * C, 0.0), u_inv(C * C, 0.0), diag(C);
    for (int64_t i = 0; i < C; ++i) {
      diag[i] = static_cast<double>(sign_s.const_data_ptr<scalar_t>()[i]) *
                std::exp(static_cast<double>(log_s.const_data_ptr<scalar_t>()[i]));
    }
    for (int64_t k = 0; k < C; ++k) {  // column k of L⁻¹ (unit lower) by forward substitution
      l_inv[k * C + k] = 1;
      for (int64_t i = k + 1; i < C; ++i) {
        double acc = 0;
        for (int64_t m = k; m < i; ++m) acc -= static_cast<double>(lo[i * C + m]) * l_inv[m * C + k];
        l_inv[i * C + k] = acc;
      }
    }
    for (int64_t j = 0; j < C; ++j) {  // column j of U'⁻¹ by back substitution
      for (int64_t i = j; i >= 0; --i) {
        double acc = i == j ? 1.0 : 0.0;
        for (int64_t m = i + 1; m <= j; ++m) acc -= static_cast<double>(up[i * C + m]) * u_inv[m * C + j];
        u_inv[i * C + j] = acc / diag[i];
      }
    }
    scalar_t* w = out.weight.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      const double row_scale = std::exp(-static_cast<double>(logs.const_data_ptr<scalar_t>()[i]));
      for (int64_t j = 0; j < C; ++j) {  // (U'⁻¹·L⁻¹)[i][perm[j]]: k from max(i, perm[j])
        double acc = 0;
        for (int64_t k = std::max(i, pm[j]); k < C; ++k) acc += u_inv[i * C + k] * l_inv[k * C + pm[j]];
        w[i * C + j] = static_cast<scalar_t>(row_scale * acc);
      }
    }
  });
  return true;
}

// The chain rule of chain_generic (actnorm_invconv.cpp) as plain loops: at small C its ~25 ATen
// launches cost far more than the arithmetic.
bool chain_small_cpu(const LUParams& p, const at::Tensor& grad_folded, const at::Tensor& grad_offset,
                     const at::Tensor& grad_logdet_hw, ParamGrads& out) {
  const int64_t C = p.bias.size(0);
  if (C > kSmallChainMaxChannels || p.bias.scalar_type() != grad_folded.scalar_type()) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  const auto g_folded = grad_folded.contiguous(), g_offset = grad_offset.contiguous();
  out = {at::empty({C}, bias.options()), at::empty({C}, bias.options()),
         at::zeros({C, C}, bias.options()), at::zeros({C, C}, bias.options()),
         at::empty({C}, bias.options())};
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "glow_ext_chain_cpu", [&] {
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const int64_t* pm = perm.const_data_ptr<int64_t>();
    const scalar_t* gwf = g_folded.const_data_ptr<scalar_t>();
    const scalar_t* gc = g_offset.const_data_ptr<scalar_t>();
    const scalar_t gld = grad_logdet_hw.item<scalar_t>();
    std::vector<scalar_t> diag(C), scale(C), wt_gc(C, 0), grad_v(C * C);
    for (int64_t j = 0; j < C; ++j) {
      diag[j] = sign_s.const_data_ptr<scalar_t>()[j] * std::exp(log_s.const_data_ptr<scalar_t>()[j]);
      scale[j] = std::exp(logs.const_data_ptr<scalar_t>()[j]);
    }
    // ActNorm: Σ dL/dx_hat = Wᵀ·dL/dc, Σ dL/dx_hat ⊙ x_hat = a ⊙ (Σ_i dL/dWf ⊙ W + b ⊙ Wᵀ·dL/dc).
    std::vector<scalar_t> wf_dot(C, 0);
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const scalar_t w_ij = math::lu_weight_entry<scalar_t>(lo, up, diag.data(), pm, C, i, j);
        wt_gc[j] += w_ij * gc[i];
        wf_dot[j] += gwf[i * C + j] * w_ij;
        // dL/dW = dL/dWf·diag(a) + dL/dc ⊗ (a⊙b), stored as Pᵀ·dL/dW (row i goes to perm[i]).
        grad_v[pm[i] * C + j] = (gwf[i * C + j] + gc[i] * b[j]) * scale[j];
      }
    }
    scalar_t* g_bias = out.bias.mutable_data_ptr<scalar_t>();
    scalar_t* g_logs = out.logs.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < C; ++j) {
      g_bias[j] = scale[j] * wt_gc[j];
      g_logs[j] = scale[j] * (wf_dot[j] + wt_gc[j] * b[j]) + gld;
    }
    // dL/dL = (Pᵀ dL/dW)·U'ᵀ below the diagonal; dL/dU' = Lᵀ·(Pᵀ dL/dW) on and above it.
    scalar_t* g_lower = out.lower.mutable_data_ptr<scalar_t>();
    scalar_t* g_upper = out.upper.mutable_data_ptr<scalar_t>();
    scalar_t* g_log_s = out.log_s.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < C; ++r) {
      for (int64_t k = 0; k < r; ++k) {
        scalar_t acc = grad_v[r * C + k] * diag[k];
        for (int64_t j = k + 1; j < C; ++j) acc += grad_v[r * C + j] * up[k * C + j];
        g_lower[r * C + k] = acc;
      }
    }
    for (int64_t k = 0; k < C; ++k) {
      for (int64_t j = k; j < C; ++j) {
        scalar_t acc = grad_v[k * C + j];
        for (int64_t r = k + 1; r < C; ++r) acc += lo[r * C + k] * grad_v[r * C + j];
        if (j == k) {
          g_log_s[k] = acc * diag[k] + gld;
        } else {
          g_upper[k * C + j] = acc;
        }
      }
    }
  });
  return true;
}

const Backend kCpuBackend{channel_mix_cpu, fold_forward_small_cpu, chain_small_cpu,
                          mix_outer_cpu, fold_inverse_small_cpu};

}  // namespace

const char* cpu_kernel_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2+fma";
    case Isa::kBaseline: return "portable";
  }
  return "unknown";
}

TORCH_LIBRARY_IMPL(glow_ext, CPU, m) {
  using Ops = BoundOps<kCpuBackend>;
  m.impl("actnorm_invconv_lu", &Ops::forward_op);
  m.impl("actnorm_invconv_lu_inverse", &Ops::inverse_op);
  m.impl("_actnorm_invconv_lu_train", &Ops::forward_train_op);
  m.impl("_actnorm_invconv_lu_inverse_train", &Ops::inverse_train_op);
  m.impl("actnorm_invconv_lu_backward", &Ops::backward_op);
  m.impl("actnorm_invconv_lu_inverse_backward", &Ops::inverse_backward_op);
  m.impl("channel_map", &Ops::channel_map_op);
}

}  // namespace glow_ext
