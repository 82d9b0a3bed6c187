// Which tier-2 forward grid a call gets (fwd_dispatch.cu): the persistent kernel (one CTA per SM,
// each taking tiles from the work list; sm90/fwd_kernel.cuh) where query tiles are short, else
// one CTA per tile. Host code without CUDA headers, so the CPU build's tests check it
// (test/cpp/test_fwd_grid_choice.cpp).
#pragma once

#include <cstdint>

#include "common/mask.h"

namespace ringattn {
namespace cuda {

// The longest a tile may be, in keys its block_m rows see together, for the persistent kernel.
// Measured on an H200 against one CTA per tile (docs/perf-log.md, 2026-12-05; 128 x 128 tiles;
// benchmark/results/2026-12-05_h200_two_kernel_fwd, where every tile of up to 16K keys took the
// persistent kernel): L = 512-2048 (longest tiles 4-16 key blocks) +3 to +38% forward at D=64
// and 128; window (4096, 0) at L=64K, D=128 (every tile 4096 + 128 keys: 33 blocks) +0.9%,
// within noise; D=128 L = 8192 (longest tiles 64 blocks) -1.8 / -2.5% (causal / not), L = 16384
// -0.5 to -7%. The gain falls as tiles grow (the fixed cost per tile it hides is a smaller
// share), so the break-even lies between 33 and 64 blocks; the threshold is the longest tile
// measured not to lose: 33 blocks of 128 keys. (It was 4096 keys per row, which the 4097-key
// rows of a (4096, 0) window missed by one, although their tiles are the measured 33-block ones.)
constexpr int64_t kPersistentFwdMaxTileKeys = 33 * 128;

// Keys the rows of one block_m-row query tile see together, at most: a window bounded on both
// sides (causal is a right side of 0) gives each row left + right + 1 consecutive keys, moving
// one key per row, so a tile's rows see left + right + block_m keys (fewer at the sequence's
// ends); otherwise a tile may see every key, max_seqlen_k (the call's hint). A tile whose keys
// do not start on a key-block boundary (a diagonal shift, Lk - Lq not a multiple of the block)
// touches one block more than keys / block_n.
inline int64_t fwd_tile_keys(int64_t max_seqlen_k, const MaskWindow& window, int block_m) {
  int64_t keys = max_seqlen_k;
  if (window.left >= 0 && window.right >= 0) {
    const int64_t tile_span = static_cast<int64_t>(window.left) + window.right + block_m;
    keys = tile_span < keys ? tile_span : keys;
  }
  return keys;
}

// Whether the call's query tiles are short enough for the persistent forward (the head dim must
// have one too: sm90::has_persistent_fwd, and the call more tiles than SMs).
inline bool fwd_tiles_are_short(int64_t max_seqlen_k, const MaskWindow& window, int block_m) {
  return fwd_tile_keys(max_seqlen_k, window, block_m) <= kPersistentFwdMaxTileKeys;
}

}  // namespace cuda
}  // namespace ringattn
