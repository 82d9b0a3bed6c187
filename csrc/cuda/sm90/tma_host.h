// Host-side encoding of the TMA tensor maps of the tier-2 kernels. The driver function
// (cuTensorMapEncodeTiled) is looked up through the runtime, so the library does not link
// libcuda directly.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Tensor map over a [tokens, heads, head_dim] operand with element strides row_stride (between
// tokens) and head_stride (between heads), the last dimension contiguous; boxes of
// 64 (head dim) x 1 (head) x box_rows (tokens) with the 128-byte swizzle; coordinates
// (d, head, token). Returns false, with the reason in *why, when TMA cannot address the tensor
// (alignment, strides) or the driver refuses it.
bool encode_token_head_map(CUtensorMap* map, const void* base, bool bf16, int head_dim, int64_t tokens, int heads,
                           int64_t row_stride, int64_t head_stride, int box_rows, std::string* why);

// Tensor map over a contiguous fp32 [tokens, heads, head_dim] accumulator (dq_accum), boxes of
// 32 (head dim, 128 bytes) x 1 x box_rows with the 128-byte swizzle, for TMA reduce-add stores;
// coordinates (d, head, token).
bool encode_accum_map(CUtensorMap* map, float* base, int head_dim, int64_t tokens, int heads, int box_rows,
                      std::string* why);

// Tensor map over `rows` fp32 rows of `cols` values each, row r starting row_stride elements after
// row r - 1 (a multiple of 4: 16 bytes), no swizzle; boxes of box_cols x 1 (box_cols * 4 bytes a
// multiple of 16, box_cols <= 256); coordinates (column, row), the column a multiple of 4 (a box
// must start 16-byte aligned in the innermost dimension, or the copy raises an illegal instruction
// on the device: bwd_stat_rows.h). Columns past `cols` read as 0.
bool encode_rows_map(CUtensorMap* map, const float* base, int64_t cols, int64_t rows, int64_t row_stride, int box_cols,
                     std::string* why);

// encode_token_head_map of a call's operand `name` of group `group` (-1: a tensor of the call; the
// dtype and head dim from `pr`); false with "[groups[<group>].]<name>: <reason>" in *why when TMA
// cannot address it (the message is built only then: this runs at every tier-2 call).
bool encode_operand_map(CUtensorMap* map, const char* name, int group, const void* base, const ringattn_problem& pr,
                        int64_t tokens, int heads, int64_t row_stride, int64_t head_stride, int box_rows,
                        std::string* why);

// The K and V maps of a forward or backward call (its kv and problem), boxes of block_n keys.
bool encode_kv_maps(const ringattn_kv& kv, const ringattn_problem& pr, int block_n, CUtensorMap* tma_k,
                    CUtensorMap* tma_v, std::string* why);

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
