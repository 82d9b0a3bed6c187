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

// encode_token_head_map of a call's operand (dtype and head dim from `pr`); false with
// "<name>: <reason>" in *why when TMA cannot address it.
bool encode_operand_map(CUtensorMap* map, const std::string& name, const void* base, const ringattn_problem& pr,
                        int64_t tokens, int heads, int64_t row_stride, int64_t head_stride, int box_rows,
                        std::string* why);

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
