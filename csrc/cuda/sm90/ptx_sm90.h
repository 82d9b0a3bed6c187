// Thin wrappers over the Hopper PTX the tier-2 (sm90a) kernels use: mbarriers, TMA bulk tensor
// copies, wgmma fences and shared-memory matrix descriptors, register reallocation and named
// barriers. Each does one instruction; names follow the PTX mnemonic. The wgmma instructions
// themselves (one per shape and operand source) are generated into sm90/wgmma.h.
#pragma once

#include <cstdint>

namespace ringattn {
namespace ptx {

// ---- mbarrier (shared::cta) ----
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrive_count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx_bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(tx_bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
// Waits until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait_parity(uint32_t bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

// ---- TMA: 2-D tiled bulk tensor copy global -> shared, completing on an mbarrier ----
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tensor_map, uint32_t bar, int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// ---- TMA: 3-D tiled bulk tensor copy global -> shared, completing on an mbarrier ----
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tensor_map, uint32_t bar, int32_t c0, int32_t c1,
                                            int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// ---- TMA: 3-D tiled bulk tensor reduce-add shared -> global (bulk-group completion) ----
// Adds an fp32 box from shared memory to global memory element-wise (atomically per element).
__device__ __forceinline__ void tma_reduce_add_3d(const void* tensor_map, uint32_t src, int32_t c0, int32_t c1,
                                                  int32_t c2) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(tensor_map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
// ---- TMA: 3-D tiled bulk tensor copy shared -> global (bulk-group completion) ----
// Stores a box from shared memory (laid out as the map's swizzle says); the parts of the box
// outside the tensor's bounds are not written. The caller orders the threads' stores into `src`
// before it (fence_proxy_async_shared + a barrier) and waits (bulk_wait_group_read) before `src`
// is written again.
__device__ __forceinline__ void tma_store_3d(const void* tensor_map, uint32_t src, int32_t c0, int32_t c1, int32_t c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups have not finished reading their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of this thread's bulk groups are incomplete (writes done too).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const void* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map)) : "memory");
}

// ---- generic -> async proxy ordering of shared memory (ordinary stores read next by wgmma/TMA) ----
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- wgmma bookkeeping ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of a register across a wgmma issue/wait point.
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_operand(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// Shared-memory matrix descriptor with the 128-byte swizzle (the layout TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B into 1024-byte aligned buffers). Offsets in bytes.
//   K-major operand: rows of 64 16-bit elements (128 B); stride_bytes = 1024 (8-row groups),
//                    leading_bytes unused.
//   MN-major operand: leading_bytes = distance between 64-element blocks along M/N,
//                     stride_bytes = distance between 8-row groups along K (1024).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t smem_addr, uint32_t leading_bytes, uint32_t stride_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
  return d;
}

// A descriptor for the operand start_addr + byte_offset, from the descriptor of start_addr: the
// start-address field is the low 14 bits (address / 16) and a shared-memory address stays below
// 2^18, so adding byte_offset / 16 never carries out of it. One add instead of a rebuilt
// descriptor per k step (byte_offset is a multiple of 16, usually a compile-time constant).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t byte_offset) {
  return desc + (byte_offset >> 4);
}

// This thread's warpgroup (threadIdx.x / 128), broadcast from lane 0 so the compiler knows it is
// warp-uniform: descriptors and addresses derived from it then stay in uniform registers instead
// of being rebuilt per thread (docs/perf-log.md, "the loop's integer work").
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0); }

// ---- register reallocation between warpgroups (needs a register cap at kernel entry) ----
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- named barriers (id 0 is __syncthreads) ----
__device__ __forceinline__ void named_barrier_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int num_threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

// Zeroes rows [first_row, rows) of a tile stored as TMA writes it with the 128-byte swizzle:
// `col_blocks` blocks of 128-byte rows, `col_block_bytes` apart (the swizzle only permutes the
// 16-byte chunks inside a row, so whole rows are contiguous). Threads thread = 0 .. num_threads-1
// share the work; the caller orders the stores for wgmma/TMA (fence_proxy_async_shared + a barrier).
__device__ __forceinline__ void zero_swizzled_rows(uint32_t tile, uint32_t col_block_bytes, int col_blocks,
                                                   int first_row, int rows, int thread, int num_threads) {
  const int chunks_per_block = (rows - first_row) * 8;  // 16-byte chunks
  for (int i = thread; i < chunks_per_block * col_blocks; i += num_threads) {
    const int cb = i / chunks_per_block;
    const int rem = i % chunks_per_block;
    const uint32_t addr = tile + cb * col_block_bytes + (first_row + rem / 8) * 128 + (rem % 8) * 16;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
  }
}

__device__ __forceinline__ bool elect_one_lane() { return (threadIdx.x & 31) == 0; }

}  // namespace ptx
}  // namespace ringattn
