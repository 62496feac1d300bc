// Launch shapes of the CUDA kernels, as plain C++: the CUDA files use them, and the CPU build
// compiles them too, so the tests check the grid arithmetic on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace glow_ext {

// Grid-size cap of the grid-stride kernels (channel mix, coupling): many waves on any GPU; past it
// blocks loop. Tests lower it (set_max_grid_blocks) to reach the loops with small inputs.
constexpr int64_t kDefaultMaxGridBlocks = 1 << 14;
int64_t max_grid_blocks();
// Sets the cap (>= 1) and returns the previous one.
int64_t set_max_grid_blocks(int64_t blocks);

constexpr int kMixThreads = 256;  // pixels per channel-mix block
constexpr int kMixRows = 4;       // output channels per pass over a pixel's inputs

// The direct channel mix's grid: blockIdx.x strides over pixels, blockIdx.y picks a group of
// rows_per_group output channels (a multiple of kMixRows). At Glow's deep levels the pixels alone
// give a few blocks for 100+ SMs (4x4 images, batch 16: one block), so the output channels are
// split until about two blocks per SM are launched; each group re-reads the pixels' inputs, which
// at those sizes come from L2.
struct ChannelMixPlan {
  int64_t pixel_blocks, row_groups, rows_per_group;
};

inline ChannelMixPlan plan_channel_mix(int64_t pixels, int64_t channels, int64_t multiprocessors,
                                       int64_t max_blocks) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t pixel_blocks = std::clamp<int64_t>(ceil_div(pixels, kMixThreads), 1, max_blocks);
  const int64_t row_chunks = ceil_div(channels, kMixRows);
  const int64_t wanted_groups = ceil_div(2 * multiprocessors, pixel_blocks);
  const int64_t groups = std::clamp<int64_t>(
      std::min(wanted_groups, max_blocks / pixel_blocks), 1, row_chunks);
  const int64_t rows_per_group = ceil_div(row_chunks, groups) * kMixRows;
  return {pixel_blocks, ceil_div(channels, rows_per_group), rows_per_group};
}

}  // namespace glow_ext
