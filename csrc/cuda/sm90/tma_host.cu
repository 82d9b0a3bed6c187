#include "cuda/sm90/tma_host.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <mutex>

namespace ringattn {
namespace cuda {
namespace sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn(std::string* why) {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::string error;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess || p == nullptr) {
      error = std::string("the driver has no cuTensorMapEncodeTiled (") + cudaGetErrorString(err) + ")";
      cudaGetLastError();
      return;
    }
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  if (fn == nullptr && why) *why = error;
  return fn;
}

// TMA needs a 16-byte aligned global address.
bool base_is_aligned(const void* base, std::string* why) {
  if (reinterpret_cast<uintptr_t>(base) % 16 == 0) return true;
  *why = "base pointer not 16-byte aligned";
  return false;
}

// cuTensorMapEncodeTiled of a rank-`rank` tensor (dims innermost first, strides in bytes of
// dimensions 1..rank-1), element strides 1, no interleave, L2 promotion 256B, no OOB fill.
bool encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, const void* base,
                  const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle,
                  std::string* why) {
  PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn(why);
  if (fn == nullptr) return false;
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = fn(map, dtype, rank, const_cast<void*>(base), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    *why = "cuTensorMapEncodeTiled returned error " + std::to_string(static_cast<int>(r));
    return false;
  }
  return true;
}

// A [tokens, heads, head_dim] tensor of `elem_bytes`-byte elements (element strides row_stride,
// head_stride; the last dimension contiguous), boxes of box_cols x 1 x box_rows, 128-byte swizzle.
bool encode_token_head_3d(CUtensorMap* map, CUtensorMapDataType dtype, int64_t elem_bytes, const void* base,
                          int head_dim, int64_t tokens, int heads, int64_t row_stride, int64_t head_stride,
                          int box_cols, int box_rows, std::string* why) {
  if (!base_is_aligned(base, why)) return false;
  if (tokens <= 0 || heads <= 0) {
    *why = "empty tensor";
    return false;
  }
  // A stride of a dimension of extent 1 is never used (and the API accepts any value there);
  // give TMA valid ones.
  if (heads == 1) head_stride = head_dim;
  if (tokens == 1) row_stride = static_cast<int64_t>(heads) * head_stride;
  if ((row_stride * elem_bytes) % 16 != 0 || (head_stride * elem_bytes) % 16 != 0 || row_stride <= 0 ||
      head_stride <= 0) {
    *why = "row/head strides not multiples of " + std::to_string(16 / elem_bytes) + " elements";
    return false;
  }
  if (tokens > (int64_t{1} << 31) - 1) {
    *why = "more than 2^31 - 1 tokens";
    return false;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride * elem_bytes),
                                 static_cast<cuuint64_t>(row_stride * elem_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_cols), 1, static_cast<cuuint32_t>(box_rows)};
  return encode_tiled(map, dtype, 3, base, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B, why);
}

}  // namespace

bool encode_token_head_map(CUtensorMap* map, const void* base, bool bf16, int head_dim, int64_t tokens, int heads,
                           int64_t row_stride, int64_t head_stride, int box_rows, std::string* why) {
  return encode_token_head_3d(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, base,
                              head_dim, tokens, heads, row_stride, head_stride, 64, box_rows, why);
}

bool encode_accum_map(CUtensorMap* map, float* base, int head_dim, int64_t tokens, int heads, int box_rows,
                      std::string* why) {
  if (head_dim % 32 != 0) {
    *why = "head_dim not a multiple of 32";
    return false;
  }
  return encode_token_head_3d(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, base, head_dim, tokens, heads,
                              static_cast<int64_t>(heads) * head_dim, head_dim, 32, box_rows, why);
}

bool encode_rows_map(CUtensorMap* map, const float* base, int64_t cols, int64_t rows, int64_t row_stride, int box_cols,
                     std::string* why) {
  if (!base_is_aligned(base, why)) return false;
  if (cols <= 0 || rows <= 0) {
    *why = "empty tensor";
    return false;
  }
  if (row_stride < cols || row_stride % 4 != 0) {
    *why = "row stride " + std::to_string(row_stride) + " not a multiple of 4 elements of at least " +
           std::to_string(cols);
    return false;
  }
  if (box_cols < 4 || box_cols > 256 || box_cols % 4 != 0) {
    *why = "box of " + std::to_string(box_cols) + " columns (expected a multiple of 4 up to 256)";
    return false;
  }
  if (cols > (int64_t{1} << 32) || rows > (int64_t{1} << 32) || row_stride * 4 >= (int64_t{1} << 40)) {
    *why = "tensor too large for TMA";
    return false;
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride * 4)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), 1};
  return encode_tiled(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, base, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_NONE,
                      why);
}

bool encode_operand_map(CUtensorMap* map, const char* name, int group, const void* base, const ringattn_problem& pr,
                        int64_t tokens, int heads, int64_t row_stride, int64_t head_stride, int box_rows,
                        std::string* why) {
  std::string reason;
  if (encode_token_head_map(map, base, pr.dtype == RINGATTN_DTYPE_BF16, pr.head_dim, tokens, heads, row_stride,
                            head_stride, box_rows, &reason))
    return true;
  *why = (group >= 0 ? "groups[" + std::to_string(group) + "]." : std::string()) + name + ": " + reason;
  return false;
}

bool encode_kv_maps(const ringattn_kv& kv, const ringattn_problem& pr, int block_n, CUtensorMap* tma_k,
                    CUtensorMap* tma_v, std::string* why) {
  return encode_operand_map(tma_k, "k", -1, kv.k, pr, pr.total_k, pr.num_heads_k, kv.k_row_stride, kv.k_head_stride,
                            block_n, why) &&
         encode_operand_map(tma_v, "v", -1, kv.v, pr, pr.total_k, pr.num_heads_k, kv.v_row_stride, kv.v_head_stride,
                            block_n, why);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
