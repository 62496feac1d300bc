// CPU kernels of the fused ActNorm + LU 1x1 convolution.
//
// Two per-pixel primitives: the channel mix y = Wf·x + c (forward, inverse), and the backward pass
// that mixes (dL/dx = Wfᵀ·g) and sums the weight gradient Σ g·xᵀ, Σ g in one sweep of the pixels. Both are loops over SIMD tiles of pixels compiled for AVX-512,
// AVX2+FMA and baseline x86-64, picked at run time; past kDirectMaxChannels, and for the mix on
// images of many pixels from kGemmMinChannels, GEMMs. The C x C work
// around them (weight fold, inverse map, chain rule) is SIMD loops too: they skip the zero triangles
// a dense GEMM multiplies (a third of its flops) and the ~20 ATen launches of the generic version.
// A bfloat16 image is mixed in float32 tile by tile (widened, mixed, each output rounded once, see
// bfloat16_cpu.h); the maps, sums and parameter gradients are float32 as for float32 input.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../actnorm_invconv.h"
#include "../glow_ext_math.h"
#include "bfloat16_cpu.h"

namespace glow_ext {
namespace {

constexpr int64_t kDirectMaxChannels = 512;  // beat at::baddbmm at every C measured (up to 256)
// ... on images of few pixels. From kGemmMinChannels channels and kGemmMinPixels pixels per image,
// MKL's batched GEMM streams the pixels faster than the tiles (the loops took 1.1-1.8x as long, one
// and two threads: 64x48x8x8, 16x96x16x16, 16x192x8x8, 4x48x64x64, 32x80x500, 32x160x500); with
// 16 pixels per image the loops still win (64x96x4x4, 16x384x4x4: 0.9x).
constexpr int64_t kGemmMinChannels = 32;
constexpr int64_t kGemmMinPixels = 64;
// Up to these C the loops (float64 accumulation) beat the generic ATen versions on 2 threads:
// forward op 1.1-1.5x and backward op 1.1-1.3x at C = 48 ... 256, 0.98x at C = 512 (fold and
// chain); the inverse map's register-blocked loops 1.2-1.6x the float64 solves at C = 320 ... 1024.
constexpr int64_t kInverseFoldMaxChannels = 1024;
constexpr int64_t kChainMaxChannels = 256;
constexpr int kChainRows = 4;    // rows of a triangular product computed per pass over its columns
constexpr int kChainLanes = 2;   // SIMD registers of columns per row in that pass
constexpr int64_t kChainParallelChannels = 64;  // below it one thread: a fork costs more
// Past this C the one-sweep backward's register-blocked weight gradient loses to the channel mix
// plus MKL's batched GEMM (one thread, backward op: at C = 48 the sweep took 1.2-1.9x as long,
// 64x48x4x4 and 4x48x32x32; at C = 12 and 24 it is 0.9-1.0x, 32x24x16x16, 4x24x64x64).
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
  int64_t channels, pixels;  // positions per sample (M)
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

// A bfloat16 image's channel mix, computed in float32 (Wf and c are float32).
struct BFloat16MixArgs {
  const cpu::BFloat16Bits* x;
  cpu::BFloat16Bits* y;
  const float* weight;  // (C, C) row-major
  const float* offset;  // (C,)
  int64_t channels, pixels;  // positions per sample (M)
  int64_t tiles_per_image;
};

// Tiles [begin, end) of a bfloat16 image: each tile is widened into `staging` (2·C·tile floats),
// mixed there as a float32 image of one tile, and each output row rounded once into y.
template <int kLaneBytes>
GLOW_HD void mix_bfloat16_tiles(const BFloat16MixArgs& a, int64_t begin, int64_t end, float* staging) {
  constexpr int64_t tile = kTileBytes / sizeof(float);
  const int64_t C = a.channels;
  float* x_tile = staging;
  float* y_tile = staging + C * tile;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / a.tiles_per_image, p = (t % a.tiles_per_image) * tile;
    const int64_t width = std::min(tile, a.pixels - p);
    const cpu::BFloat16Bits* x = a.x + n * C * a.pixels + p;
    for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) x_tile[c * width + i] = x[c * a.pixels + i];
    }
    const MixArgs<float> mix{x_tile, y_tile, a.weight, a.offset, C, width, 1};
    mix_span<float, kLaneBytes>(mix, 0, 0, width);
    cpu::BFloat16Bits* y = a.y + n * C * a.pixels + p;
    for (int64_t c = 0; c < C; ++c) cpu::round_to_bfloat16(y_tile + c * width, y + c * a.pixels, width);
  }
}

template <typename scalar_t>
struct OuterArgs {
  const scalar_t* g;  // grad_y, (N, C, M)
  const scalar_t* x;
  // When set, the pass first writes mix->y = mix->weight·mix->x over each group of pixels, while
  // they are in cache; g is then mix->x or mix->y.
  const MixArgs<scalar_t>* mix;
  int64_t channels, pixels;  // positions per sample (M)
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
  const int64_t C = a.channels, M = a.pixels;
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
    const int64_t p1 = std::min(p0 + a.chunk, M);
    const scalar_t* g = a.g + (n * C + i) * M;
    const scalar_t* x = a.x + (n * C + j) * M;
    int64_t p = p0;
    for (; p + lanes <= p1; p += lanes) {
      lane_t gv[kB], xv[kB];
      for (int r = 0; r < kB; ++r) {
        gv[r] = StridedLoad<lane_t, scalar_t>{g + p, M}(r);
        xv[r] = StridedLoad<lane_t, scalar_t>{x + p, M}(r);
      }
      for (int r = 0; r < kB; ++r) {
        for (int c = 0; c < kB; ++c) acc[r][c] += gv[r] * xv[c];
      }
    }
    for (; p < p1; ++p) {
      for (int r = 0; r < kB; ++r) {
        for (int c = 0; c < kB; ++c) tail[r][c] += g[r * M + p] * x[c * M + p];
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

// The C x C products below accumulate in float64 whatever the parameters' dtype: a float32 sum of
// C products in sequence had 1.8-4x the error of plain PyTorch's fold at C = 192-1024
// (benchmarks/accuracy_fused_op.py), above the 2x that the accuracy benchmark allows.
//
// The chain rule's two triangular products have one shape: out[k][c] = alpha[k]·b[k][c] +
// Σ_{m>k} T(k, m)·b[m][c] for the columns c >= k, T strictly upper triangular and read through
// strides (T(k, m) = t[k·t_row + m·t_col]). b and out have `stride` >= C columns, zero-padded.
template <typename scalar_t>
struct TriangularProduct {
  const scalar_t* t;
  int64_t t_row, t_col;
  const double* b;
  const double* alpha;
  double* out;
  int64_t channels, stride;
};

// kRowsB output rows x kChainLanes SIMD registers of columns, held in registers while rows of b are
// added in: each load of a row of b feeds kRowsB FMAs.
template <int kRowsB, typename lane_t>
struct RowBlock {
  static constexpr int64_t kLanes = sizeof(lane_t) / sizeof(double);
  lane_t acc[kRowsB][kChainLanes];

  // acc[r] = scale(r)·(row r of `rows`), the rows `stride` apart, at the block's columns.
  template <typename ScaleFn>
  GLOW_HD void load(const double* rows, int64_t stride, ScaleFn scale) {
    for (int r = 0; r < kRowsB; ++r) {
      const StridedLoad<lane_t, double> row{rows + r * stride, kLanes};
      for (int l = 0; l < kChainLanes; ++l) acc[r][l] = scale(r) * row(l);
    }
  }
  // acc[r] += coef(r)·b for r in [r_begin, r_end), b one row at the block's columns.
  template <typename CoefFn>
  GLOW_HD void add(const double* b, int r_begin, int r_end, CoefFn coef) {
    const StridedLoad<lane_t, double> row{b, kLanes};
    lane_t b_l[kChainLanes];
    for (int l = 0; l < kChainLanes; ++l) b_l[l] = row(l);
    for (int r = r_begin; r < r_end; ++r) {
      const double t = coef(r);
      for (int l = 0; l < kChainLanes; ++l) acc[r][l] += t * b_l[l];
    }
  }
  GLOW_HD void clear() {
    for (int r = 0; r < kRowsB; ++r) {
      for (int l = 0; l < kChainLanes; ++l) acc[r][l] = lane_t{};
    }
  }
  GLOW_HD void store(double* rows, int64_t stride) const {
    for (int r = 0; r < kRowsB; ++r) __builtin_memcpy(rows + r * stride, acc[r], sizeof(acc[r]));
  }
};

// Rows [k0, k0 + kRowsB) of a TriangularProduct, from the lane holding column k0 on. Columns left
// of the diagonal get values too; the caller reads only c >= k.
template <int kRowsB, typename lane_t, typename scalar_t>
GLOW_HD void triangular_rows(const TriangularProduct<scalar_t>& a, int64_t k0) {
  using Block = RowBlock<kRowsB, lane_t>;
  const int64_t C = a.channels, S = a.stride;
  const auto coef = [&](int64_t m) {
    return [&a, k0, m](int r) { return static_cast<double>(a.t[(k0 + r) * a.t_row + m * a.t_col]); };
  };
  for (int64_t c0 = k0 / Block::kLanes * Block::kLanes; c0 < C; c0 += kChainLanes * Block::kLanes) {
    Block block;
    block.load(a.b + k0 * S + c0, S, [&](int r) { return a.alpha[k0 + r]; });
    // m inside the block: row k0 + r takes T(k0 + r, m) only for m > k0 + r.
    for (int64_t m = k0 + 1; m < k0 + kRowsB; ++m) {
      block.add(a.b + m * S + c0, 0, static_cast<int>(m - k0), coef(m));
    }
    for (int64_t m = k0 + kRowsB; m < C; ++m) block.add(a.b + m * S + c0, 0, kRowsB, coef(m));
    block.store(a.out + k0 * S + c0, S);
  }
}

// L·U' for the forward map: out[r][c] = U'[r][c] + Σ_{k<r} L[r][k]·U'[k][c], with L's strict part
// read from `lower` (C x C) and U' from `upper_factor`, its rows zero left of the diagonal and
// zero-padded to `stride` columns, like out.
template <typename scalar_t>
struct LowerUpperProduct {
  const scalar_t* lower;
  const double* upper_factor;
  double* out;
  int64_t channels, stride;
};

// Rows [r0, r0 + kRowsB) of a LowerUpperProduct. Row k of U' is zero left of column k, so a block
// of columns takes only the k before its end.
template <int kRowsB, typename lane_t, typename scalar_t>
GLOW_HD void lower_upper_rows(const LowerUpperProduct<scalar_t>& a, int64_t r0) {
  using Block = RowBlock<kRowsB, lane_t>;
  constexpr int64_t width = kChainLanes * Block::kLanes;
  const int64_t C = a.channels, S = a.stride;
  const auto coef = [&](int64_t k) {
    return [&a, r0, k, C](int r) { return static_cast<double>(a.lower[(r0 + r) * C + k]); };
  };
  for (int64_t c0 = 0; c0 < C; c0 += width) {
    Block block;
    block.load(a.upper_factor + r0 * S + c0, S, [](int) { return 1.0; });
    const int64_t k_end = std::min(r0, c0 + width);  // every row of the block takes k < r0
    for (int64_t k = 0; k < k_end; ++k) block.add(a.upper_factor + k * S + c0, 0, kRowsB, coef(k));
    // k inside the block: row r0 + r takes L[r0 + r][k] only for k < r0 + r.
    for (int64_t k = r0; k < std::min(r0 + kRowsB - 1, c0 + width); ++k) {
      block.add(a.upper_factor + k * S + c0, static_cast<int>(k - r0) + 1, kRowsB, coef(k));
    }
    block.store(a.out + r0 * S + c0, S);
  }
}

template <typename scalar_t, int kLaneBytes>
GLOW_HD void lower_upper_block(const LowerUpperProduct<scalar_t>& a, int64_t r0) {
  using lane_t = Lane<double, kLaneBytes>;
  if (r0 + kChainRows <= a.channels) return lower_upper_rows<kChainRows, lane_t>(a, r0);
  for (int64_t r = r0; r < a.channels; ++r) lower_upper_rows<1, lane_t>(a, r);
}

template <typename scalar_t, int kLaneBytes>
GLOW_HD void triangular_block(const TriangularProduct<scalar_t>& a, int64_t k0) {
  using lane_t = Lane<double, kLaneBytes>;
  if (k0 + kChainRows <= a.channels) return triangular_rows<kChainRows, lane_t>(a, k0);
  for (int64_t k = k0; k < a.channels; ++k) triangular_rows<1, lane_t>(a, k);
}

// The inverse of a lower triangular T in float64, X = T⁻¹: T(i, k) = t[i·t_row + k·t_col] below
// the diagonal (negative strides read U' backwards: J·U'·J is lower triangular, J the reversal),
// diag[i] on it (1 when diag is null). out has `stride` >= C columns, zero-initialised.
template <typename scalar_t>
struct LowerInverse {
  const scalar_t* t;
  int64_t t_row, t_col;
  const double* diag;
  double* out;
  int64_t channels, stride;
};

// Rows [i0, i0 + kRowsB) of X: row i = (e_i − Σ_{k<i} T(i, k)·(row k)) / diag_i. The rows before
// the block are done, so their terms go through a register block; the few terms between rows of
// the block follow in memory, in row order. Row k is zero right of column k, so a block of columns
// takes only the k from its start on, and the rows need no columns past their own.
template <int kRowsB, typename lane_t, typename scalar_t>
GLOW_HD void lower_inverse_rows(const LowerInverse<scalar_t>& a, int64_t i0) {
  using Block = RowBlock<kRowsB, lane_t>;
  constexpr int64_t width = kChainLanes * Block::kLanes;
  const int64_t S = a.stride;
  const auto t = [&a](int64_t i, int64_t k) { return static_cast<double>(a.t[i * a.t_row + k * a.t_col]); };
  for (int64_t c0 = 0; c0 < i0 + kRowsB; c0 += width) {
    Block block;
    block.clear();
    for (int64_t k = c0; k < i0; ++k) {
      block.add(a.out + k * S + c0, 0, kRowsB, [&t, i0, k](int r) { return -t(i0 + r, k); });
    }
    block.store(a.out + i0 * S + c0, S);
    for (int r = 0; r < kRowsB; ++r) {
      double* row = a.out + (i0 + r) * S;
      if (c0 <= i0 + r && i0 + r < c0 + width) row[i0 + r] += 1;
      for (int q = 0; q < r; ++q) {
        const double coef = t(i0 + r, i0 + q);
        const double* row_q = a.out + (i0 + q) * S;
        for (int64_t c = c0; c < c0 + width; ++c) row[c] -= coef * row_q[c];
      }
      if (a.diag != nullptr) {
        const double inv_d = 1.0 / a.diag[i0 + r];
        for (int64_t c = c0; c < c0 + width; ++c) row[c] *= inv_d;
      }
    }
  }
}

// All of X, block after block (each needs the rows before it).
template <typename scalar_t, int kLaneBytes>
GLOW_HD void lower_inverse(const LowerInverse<scalar_t>& a) {
  using lane_t = Lane<double, kLaneBytes>;
  int64_t i0 = 0;
  for (; i0 + kChainRows <= a.channels; i0 += kChainRows) lower_inverse_rows<kChainRows, lane_t>(a, i0);
  for (; i0 < a.channels; ++i0) lower_inverse_rows<1, lane_t>(a, i0);
}

// M = U'⁻¹·L⁻¹ from L⁻¹ and the reversed U'⁻¹ (U'⁻¹[i][k] = upper_inv_reversed[C−1−i][C−1−k]),
// all with `stride` columns.
struct InverseProduct {
  const double* lower_inv;
  const double* upper_inv_reversed;
  double* out;
  int64_t channels, stride;
};

// Rows [i0, i0 + kRowsB) of M = U'⁻¹·L⁻¹: row i takes the rows k >= i of L⁻¹, and row k of L⁻¹
// is zero right of column k, so a block of columns takes only the k from its start on.
template <int kRowsB, typename lane_t>
GLOW_HD void inverse_product_rows(const InverseProduct& a, int64_t i0) {
  using Block = RowBlock<kRowsB, lane_t>;
  const int64_t C = a.channels, S = a.stride;
  const auto coef = [&](int64_t k) {
    return [&a, i0, k, C, S](int r) { return a.upper_inv_reversed[(C - 1 - i0 - r) * S + C - 1 - k]; };
  };
  for (int64_t c0 = 0; c0 < C; c0 += kChainLanes * Block::kLanes) {
    Block block;
    block.clear();
    // k inside the block: row i0 + r takes U'⁻¹[i0 + r][k] only for k >= i0 + r.
    for (int64_t k = std::max(i0, c0); k < i0 + kRowsB - 1; ++k) {
      block.add(a.lower_inv + k * S + c0, 0, static_cast<int>(k - i0) + 1, coef(k));
    }
    for (int64_t k = std::max(i0 + kRowsB - 1, c0); k < C; ++k) {
      block.add(a.lower_inv + k * S + c0, 0, kRowsB, coef(k));
    }
    block.store(a.out + i0 * S + c0, S);
  }
}

template <int kLaneBytes>
GLOW_HD void inverse_product_block(const InverseProduct& a, int64_t i0) {
  using lane_t = Lane<double, kLaneBytes>;
  if (i0 + kChainRows <= a.channels) return inverse_product_rows<kChainRows, lane_t>(a, i0);
  for (int64_t i = i0; i < a.channels; ++i) inverse_product_rows<1, lane_t>(a, i);
}

// One copy of the loops per instruction set; the always-inline math above is compiled into each.
// Lanes are one register wide; the outer-product blocks fill the register file (32 or 16 regs).
#define GLOW_EXT_ISA_VARIANT(SUFFIX, TARGET, LANE_BYTES, BLOCK)                                 \
  template <typename scalar_t>                                                                  \
  TARGET void mix_tiles_##SUFFIX(const MixArgs<scalar_t>& a, int64_t begin, int64_t end) {       \
    mix_tiles<scalar_t, LANE_BYTES>(a, begin, end);                                             \
  }                                                                                             \
  TARGET void mix_bfloat16_tiles_##SUFFIX(const BFloat16MixArgs& a, int64_t begin, int64_t end,  \
                                         float* staging) {                                      \
    mix_bfloat16_tiles<LANE_BYTES>(a, begin, end, staging);                                     \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  TARGET void outer_sums_##SUFFIX(const OuterArgs<scalar_t>& a, int64_t begin, int64_t end,     \
                                  scalar_t* out) {                                              \
    outer_sums<scalar_t, LANE_BYTES, BLOCK>(a, begin, end, out);                                \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  TARGET void triangular_block_##SUFFIX(const TriangularProduct<scalar_t>& a, int64_t k0) {     \
    triangular_block<scalar_t, LANE_BYTES>(a, k0);                                              \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  TARGET void lower_upper_block_##SUFFIX(const LowerUpperProduct<scalar_t>& a, int64_t r0) {    \
    lower_upper_block<scalar_t, LANE_BYTES>(a, r0);                                             \
  }                                                                                             \
  template <typename scalar_t>                                                                  \
  TARGET void lower_inverse_##SUFFIX(const LowerInverse<scalar_t>& a) {                         \
    lower_inverse<scalar_t, LANE_BYTES>(a);                                                     \
  }                                                                                             \
  TARGET void inverse_product_block_##SUFFIX(const InverseProduct& a, int64_t i0) {             \
    inverse_product_block<LANE_BYTES>(a, i0);                                                   \
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

// Runs tiles [0, tasks) of pixel_bytes-sized pixels in parallel, run(begin, end) per range.
template <typename RunFn>
void parallel_tiles(int64_t channels, int64_t pixel_bytes, int64_t tasks, RunFn run) {
  const int64_t flops_per_tile = 2 * channels * channels * (kTileBytes / pixel_bytes);
  const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / std::max<int64_t>(flops_per_tile, 1));
  at::parallel_for(0, tasks, grain, run);
}

template <typename scalar_t>
void mix_direct(const MixArgs<scalar_t>& a, int64_t tasks) {
  parallel_tiles(a.channels, sizeof(scalar_t), tasks, [&](int64_t begin, int64_t end) {
    switch (kIsa) {
#if defined(__x86_64__)
      case Isa::kAvx512: return mix_tiles_avx512(a, begin, end);
      case Isa::kAvx2: return mix_tiles_avx2(a, begin, end);
#endif
      default: return mix_tiles_baseline(a, begin, end);
    }
  });
}

// y = Wf·x + c for a bfloat16 x, in float32, y rounded once.
at::Tensor channel_mix_bfloat16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offset) {
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  constexpr int64_t tile = kTileBytes / sizeof(float);
  const int64_t tiles = (M + tile - 1) / tile;
  const BFloat16MixArgs args{static_cast<const cpu::BFloat16Bits*>(x.const_data_ptr()),
                             static_cast<cpu::BFloat16Bits*>(y.mutable_data_ptr()),
                             weight.const_data_ptr<float>(), offset.const_data_ptr<float>(), C, M, tiles};
  parallel_tiles(C, sizeof(float), N * tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> staging(2 * C * tile);
    switch (kIsa) {
#if defined(__x86_64__)
      case Isa::kAvx512: return mix_bfloat16_tiles_avx512(args, begin, end, staging.data());
      case Isa::kAvx2: return mix_bfloat16_tiles_avx2(args, begin, end, staging.data());
#endif
      default: return mix_bfloat16_tiles_baseline(args, begin, end, staging.data());
    }
  });
  return y;
}

constexpr int64_t kOuterChunkPixels = 4096;

bool mix_outer_cpu(const at::Tensor& src, const at::Tensor& weight_in, const at::Tensor& x,
                   bool outer_of_out, at::Tensor& out, at::Tensor& grad_folded,
                   at::Tensor& grad_offset) {
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  if (C > kMixOuterMaxChannels) return false;
  if (x.scalar_type() == at::kBFloat16) {
    // The float32 sweep on widened copies (two cheap passes against the sweep's C² per pixel);
    // `out` is rounded once, after the sums have read it.
    at::Tensor out32;
    mix_outer_cpu(src.to(at::kFloat), weight_in, x.to(at::kFloat), outer_of_out, out32, grad_folded,
                  grad_offset);
    out = out32.to(at::kBFloat16);
    return true;
  }
  const auto weight = weight_in.contiguous();
  out = at::empty_like(src, at::MemoryFormat::Contiguous);
  auto total = at::zeros({C * C + C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glow_ext_mix_outer_cpu", [&] {
    const std::vector<scalar_t> no_offset(C, 0);
    const MixArgs<scalar_t> mix{src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                weight.const_data_ptr<scalar_t>(), no_offset.data(), C, M, 0};
    const int64_t chunk = std::min(M, kOuterChunkPixels);
    const OuterArgs<scalar_t> args{outer_of_out ? mix.y : mix.x, x.const_data_ptr<scalar_t>(), &mix,
                                   C, M, chunk, (M + chunk - 1) / chunk};
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
  const int64_t N = x.size(0), C = x.size(1), M = positions_per_sample(x);
  const auto weight = map.weight.contiguous();
  const auto offset = map.offset.contiguous();
  if (C > kDirectMaxChannels || (C >= kGemmMinChannels && M >= kGemmMinPixels)) {
    const auto y = at::baddbmm(offset.view({1, C, 1}).expand({N, C, M}), weight.expand({N, C, C}),
                               x.view({N, C, M}).to(weight.scalar_type()));
    return y.view(x.sizes()).to(x.scalar_type());
  }
  if (x.scalar_type() == at::kBFloat16) return channel_mix_bfloat16(x, weight, offset);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glow_ext_channel_mix_cpu", [&] {
    const int64_t tile = kTileBytes / sizeof(scalar_t);
    const int64_t tiles = (M + tile - 1) / tile;
    const MixArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                 weight.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                                 C, M, tiles};
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

// factor[j]·exp(t[j]) in float64 for contiguous (C,) tensors (factor 1 when not given): ActNorm's
// scale exp(logs) and U''s diagonal sign_s·exp(log_s).
template <typename scalar_t>
std::vector<double> scaled_exp(const at::Tensor& t, const at::Tensor* factor = nullptr) {
  std::vector<double> out(t.numel());
  for (size_t j = 0; j < out.size(); ++j) {
    out[j] = std::exp(static_cast<double>(t.const_data_ptr<scalar_t>()[j])) *
             (factor ? static_cast<double>(factor->const_data_ptr<scalar_t>()[j]) : 1.0);
  }
  return out;
}

// Runs tasks [0, count) on the thread pool, cut into one contiguous range per thread of about equal
// cost (cost(t): a task's relative flops). The C x C products' row blocks cost (C - k0)² or k0·C:
// an even cut of the blocks would leave one thread most of the work.
template <typename CostFn, typename RunFn>
void balanced_parallel(int64_t count, bool parallel, CostFn cost, RunFn run) {
  const int64_t parts = parallel ? at::get_num_threads() : 1;
  std::vector<double> prefix(count + 1, 0.0);
  for (int64_t t = 0; t < count; ++t) prefix[t + 1] = prefix[t] + cost(t);
  std::vector<int64_t> bounds(parts + 1, count);
  for (int64_t q = 0; q < parts; ++q) {
    const double target = prefix.back() * static_cast<double>(q) / static_cast<double>(parts);
    bounds[q] = std::lower_bound(prefix.begin(), prefix.end() - 1, target) - prefix.begin();
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = bounds[begin]; t < bounds[end]; ++t) run(t);
  });
}

// Padded row length of the products' float64 scratch matrices: every SIMD pass of columns stays
// inside.
int64_t product_stride(int64_t C) {
  constexpr int64_t widest = 64 / sizeof(double);
  return (C + kChainLanes * widest + widest - 1) / widest * widest;
}

template <typename scalar_t>
void triangular_products(const TriangularProduct<scalar_t>* products, int count) {
  const int64_t C = products[0].channels;
  const int64_t blocks = (C + kChainRows - 1) / kChainRows;
  const auto cost = [&](int64_t t) {
    const double cols = static_cast<double>(C - t % blocks * kChainRows);
    return cols * cols;
  };
  balanced_parallel(count * blocks, C >= kChainParallelChannels, cost, [&](int64_t t) {
    const auto& a = products[t / blocks];
    const int64_t k0 = t % blocks * kChainRows;
    switch (kIsa) {
#if defined(__x86_64__)
      case Isa::kAvx512: return triangular_block_avx512(a, k0);
      case Isa::kAvx2: return triangular_block_avx2(a, k0);
#endif
      default: return triangular_block_baseline(a, k0);
    }
  });
}

// Wf = P·L·U'·diag(a) and c = Wf·bias: L·U' by the SIMD loops above (a third of a dense product's
// flops), then the row permutation and scaling in one pass; no ATen launches.
bool fold_forward_cpu(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) {
  const int64_t C = p.bias.size(0);
  if (C > kChainMaxChannels || p.bias.scalar_type() != acc_dtype) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  out.weight = at::empty({C, C}, bias.options());
  out.offset = at::empty({C}, bias.options());
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "glow_ext_fold_forward_cpu", [&] {
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const int64_t S = product_stride(C);
    std::vector<double> upper_factor(C * S, 0), product(C * S);
    const auto diag = scaled_exp<scalar_t>(log_s, &sign_s);
    for (int64_t k = 0; k < C; ++k) {
      upper_factor[k * S + k] = diag[k];
      std::copy(up + k * C + k + 1, up + (k + 1) * C, upper_factor.data() + k * S + k + 1);
    }
    const LowerUpperProduct<scalar_t> a{lower.const_data_ptr<scalar_t>(), upper_factor.data(),
                                        product.data(), C, S};
    const int64_t blocks = (C + kChainRows - 1) / kChainRows;
    const auto cost = [&](int64_t t) {  // Σ_c min(r, c) over the columns
      const double r = static_cast<double>(t * kChainRows);
      return (r + 1) * (static_cast<double>(C) - r / 2);
    };
    balanced_parallel(blocks, C >= kChainParallelChannels, cost, [&](int64_t t) {
      switch (kIsa) {
#if defined(__x86_64__)
        case Isa::kAvx512: return lower_upper_block_avx512(a, t * kChainRows);
        case Isa::kAvx2: return lower_upper_block_avx2(a, t * kChainRows);
#endif
        default: return lower_upper_block_baseline(a, t * kChainRows);
      }
    });
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    const int64_t* pm = perm.const_data_ptr<int64_t>();
    const auto scale = scaled_exp<scalar_t>(logs);
    scalar_t* w = out.weight.mutable_data_ptr<scalar_t>();
    scalar_t* c = out.offset.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      const double* row = product.data() + pm[i] * S;
      double c_i = 0;
      for (int64_t j = 0; j < C; ++j) {
        const double w_ij = row[j] * scale[j];
        w[i * C + j] = static_cast<scalar_t>(w_ij);
        c_i += w_ij * static_cast<double>(b[j]);
      }
      c[i] = static_cast<scalar_t>(c_i);
    }
  });
  return true;
}

// Wf⁻¹ = diag(exp(−logs))·U'⁻¹·L⁻¹·Pᵀ and the offset −bias from explicit triangular inverses in
// float64 loops: the generic version's float64 solves and ~20 ATen launches cost more up to
// kInverseFoldMaxChannels (inverse forward + backward at 1x8x4x4 ... 1x128x4x4).
bool fold_inverse_cpu(const LUParams& p, at::ScalarType acc_dtype, ChannelMap& out) {
  const int64_t C = p.bias.size(0);
  if (C > kInverseFoldMaxChannels || p.bias.scalar_type() != acc_dtype) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  out.weight = at::empty({C, C}, bias.options());
  out.offset = -bias;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "glow_ext_fold_inverse_cpu", [&] {
    const int64_t S = product_stride(C);
    std::vector<double> lower_inv(C * S), upper_inv_reversed(C * S), product(C * S);
    auto diag_reversed = scaled_exp<scalar_t>(log_s, &sign_s);
    std::reverse(diag_reversed.begin(), diag_reversed.end());
    const LowerInverse<scalar_t> factors[2] = {
        {lower.const_data_ptr<scalar_t>(), C, 1, nullptr, lower_inv.data(), C, S},
        {upper.const_data_ptr<scalar_t>() + C * C - 1, -C, -1, diag_reversed.data(),
         upper_inv_reversed.data(), C, S}};
    const bool parallel = C >= kChainParallelChannels;
    at::parallel_for(0, 2, parallel ? 1 : 2, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        switch (kIsa) {
#if defined(__x86_64__)
          case Isa::kAvx512: lower_inverse_avx512(factors[task]); break;
          case Isa::kAvx2: lower_inverse_avx2(factors[task]); break;
#endif
          default: lower_inverse_baseline(factors[task]); break;
        }
      }
    });
    const InverseProduct a{lower_inv.data(), upper_inv_reversed.data(), product.data(), C, S};
    const int64_t blocks = (C + kChainRows - 1) / kChainRows;
    const auto cost = [&](int64_t t) {  // Σ_c (C - max(i, c)) over the columns
      const double i = static_cast<double>(t * kChainRows);
      return static_cast<double>(C) * static_cast<double>(C) - i * i / 2;
    };
    balanced_parallel(blocks, parallel, cost, [&](int64_t t) {
      switch (kIsa) {
#if defined(__x86_64__)
        case Isa::kAvx512: return inverse_product_block_avx512(a, t * kChainRows);
        case Isa::kAvx2: return inverse_product_block_avx2(a, t * kChainRows);
#endif
        default: return inverse_product_block_baseline(a, t * kChainRows);
      }
    });
    const int64_t* pm = perm.const_data_ptr<int64_t>();
    scalar_t* w = out.weight.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) {
      const double row_scale = std::exp(-static_cast<double>(logs.const_data_ptr<scalar_t>()[i]));
      for (int64_t j = 0; j < C; ++j) w[i * C + j] = static_cast<scalar_t>(row_scale * product[i * S + pm[j]]);
    }
  });
  return true;
}

// The chain rule of chain_folded (actnorm_invconv.cpp) as loops: at small C its ~25 ATen launches
// cost far more than the arithmetic, and at every C its two dense C x C products do three times
// the work of the triangles they feed (see kChainMaxChannels).
bool chain_cpu(const LUParams& p, const at::Tensor& grad_folded, const at::Tensor& grad_offset,
               const at::Tensor& folded, const FoldedTerms& terms, const at::Tensor& grad_logdet_m,
               ParamGrads& out) {
  const int64_t C = p.bias.size(0);
  if (C > kChainMaxChannels || p.bias.scalar_type() != grad_folded.scalar_type()) return false;
  const auto [bias, logs, perm, lower, upper, log_s, sign_s] = contiguous_params(p);
  const auto g_folded = grad_folded.contiguous(), g_offset = grad_offset.contiguous();
  out = {at::empty({C}, bias.options()), at::empty({C}, bias.options()),
         at::empty({C, C}, bias.options()), at::empty({C, C}, bias.options()),
         at::empty({C}, bias.options())};
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "glow_ext_chain_cpu", [&] {
    const scalar_t* b = bias.const_data_ptr<scalar_t>();
    const int64_t* pm = perm.const_data_ptr<int64_t>();
    const scalar_t* gwf = g_folded.const_data_ptr<scalar_t>();
    const scalar_t* gc = g_offset.const_data_ptr<scalar_t>();
    const double gld = grad_logdet_m.item<double>();
    const auto diag = scaled_exp<scalar_t>(log_s, &sign_s), scale = scaled_exp<scalar_t>(logs);
    const std::vector<double> ones(C, 1);
    // ActNorm: dL/db = Wfᵀ·dL/dc, dL/dlogs = Σ_i dL/dWf ⊙ Wf + b ⊙ dL/db (+ the logdet's term).
    std::vector<double> grad_bias(C, 0), grad_logs(C, 0);
    if (folded.defined()) {
      const auto wf_c = folded.contiguous();
      const scalar_t* wf = wf_c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < C; ++i) {
        for (int64_t j = 0; j < C; ++j) {
          grad_bias[j] += static_cast<double>(wf[i * C + j]) * static_cast<double>(gc[i]);
          grad_logs[j] += static_cast<double>(gwf[i * C + j]) * static_cast<double>(wf[i * C + j]);
        }
      }
    } else {
      const auto bias_term = terms.grad_bias.contiguous(), column_dot = terms.column_dot.contiguous();
      std::copy_n(bias_term.const_data_ptr<scalar_t>(), C, grad_bias.data());
      std::copy_n(column_dot.const_data_ptr<scalar_t>(), C, grad_logs.data());
    }
    scalar_t* g_bias = out.bias.mutable_data_ptr<scalar_t>();
    scalar_t* g_logs = out.logs.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < C; ++j) {
      g_bias[j] = static_cast<scalar_t>(grad_bias[j]);
      g_logs[j] = static_cast<scalar_t>(grad_logs[j] + grad_bias[j] * static_cast<double>(b[j]) + gld);
    }
    // g_v = Pᵀ·dL/dW, dL/dW = (dL/dWf + dL/dc ⊗ b)·diag(a) (row i goes to perm[i]), and its
    // transpose, in rows padded for the products' widest SIMD pass.
    const int64_t S = product_stride(C);
    std::vector<double> g_v(C * S, 0), g_v_t(C * S, 0), upper_full(C * S), lower_full_t(C * S);
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        const double v = (static_cast<double>(gwf[i * C + j]) +
                          static_cast<double>(gc[i]) * static_cast<double>(b[j])) * scale[j];
        g_v[pm[i] * S + j] = v;
        g_v_t[j * S + pm[i]] = v;
      }
    }
    // dL/dU' = Lᵀ·g_v on and above the diagonal; (dL/dL)ᵀ = U'·g_vᵀ above it.
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const TriangularProduct<scalar_t> products[2] = {
        {lo, 1, C, g_v.data(), ones.data(), upper_full.data(), C, S},
        {up, C, 1, g_v_t.data(), diag.data(), lower_full_t.data(), C, S}};
    triangular_products(products, 2);
    scalar_t* g_lower = out.lower.mutable_data_ptr<scalar_t>();
    scalar_t* g_upper = out.upper.mutable_data_ptr<scalar_t>();
    scalar_t* g_log_s = out.log_s.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < C; ++r) {
      for (int64_t k = 0; k < C; ++k) {
        g_lower[r * C + k] = static_cast<scalar_t>(k < r ? lower_full_t[k * S + r] : 0.0);
        g_upper[r * C + k] = static_cast<scalar_t>(k > r ? upper_full[r * S + k] : 0.0);
      }
      g_log_s[r] = static_cast<scalar_t>(upper_full[r * S + r] * diag[r] + gld);
    }
  });
  return true;
}

const Backend kCpuBackend{channel_mix_cpu, fold_forward_cpu, chain_cpu,
                          mix_outer_cpu, fold_inverse_cpu};

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
