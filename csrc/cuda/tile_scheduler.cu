#include "cuda/tile_scheduler.h"

namespace ringattn {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kBuckets = 2048;  // costs are shifted right until the largest one fits

__device__ __forceinline__ int32_t clamp_i(int32_t x, int32_t lo, int32_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// In-place inclusive scan of kThreads values in shared memory (Hillis-Steele).
__device__ void block_inclusive_scan(int32_t* v) {
  for (int offset = 1; offset < kThreads; offset <<= 1) {
    const int32_t add = threadIdx.x >= offset ? v[threadIdx.x - offset] : 0;
    __syncthreads();
    v[threadIdx.x] += add;
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) build_work_list_kernel(const __grid_constant__ SchedulerArgs args) {
  __shared__ int32_t scan[kThreads];
  __shared__ int32_t buckets[kBuckets];
  __shared__ int32_t max_cost;
  if (threadIdx.x == 0) max_cost = 0;
  const int tid = threadIdx.x;
  const int pairs = args.num_groups * args.batch_size;

  // 1. tiles per (group, sequence), exclusive prefix sums into tile_offsets.
  int32_t carry = 0;
  for (int base = 0; base < pairs; base += kThreads) {
    const int p = base + tid;
    int32_t tiles = 0;
    if (p < pairs) {
      const int g = p / args.batch_size;
      const int b = p % args.batch_size;
      const int32_t* cu = args.cu_seqlens_q[g];
      const int32_t start = clamp_i(cu[b], 0, args.total_q[g]);
      const int32_t end = clamp_i(cu[b + 1], start, args.total_q[g]);
      tiles = (end - start + args.block_m - 1) / args.block_m;
    }
    scan[tid] = tiles;
    __syncthreads();
    block_inclusive_scan(scan);
    if (p < pairs) args.tile_offsets[p] = carry + scan[tid] - tiles;
    carry += scan[kThreads - 1];
    __syncthreads();
  }
  if (tid == 0) args.tile_offsets[pairs] = carry;
  const int32_t total_items = carry < args.capacity ? carry : args.capacity;
  for (int i = tid; i < kBuckets; i += kThreads) buckets[i] = 0;
  __threadfence_block();
  __syncthreads();

  // 2. one item per tile, with its cost; histogram of costs.
  for (int p = tid; p < pairs; p += kThreads) {
    const int g = p / args.batch_size;
    const int b = p % args.batch_size;
    const int32_t* cu = args.cu_seqlens_q[g];
    const int32_t q_start = clamp_i(cu[b], 0, args.total_q[g]);
    const int32_t seqlen_q = clamp_i(cu[b + 1], q_start, args.total_q[g]) - q_start;
    const int32_t k_start = clamp_i(args.cu_seqlens_k[b], 0, args.total_k);
    int32_t seqlen_k = clamp_i(args.cu_seqlens_k[b + 1], k_start, args.total_k) - k_start;
    if (args.seqused_k[g] != nullptr) seqlen_k = clamp_i(args.seqused_k[g][b], 0, seqlen_k);
    const int32_t first = args.tile_offsets[p];
    const int32_t tiles = (seqlen_q + args.block_m - 1) / args.block_m;
    for (int32_t m = 0; m < tiles; ++m) {
      const int32_t idx = first + m;
      if (idx >= total_items) break;
      int32_t keys = seqlen_k;
      if (args.causal) {
        const int32_t visible = (m + 1) * args.block_m + seqlen_k - seqlen_q;
        keys = visible < keys ? visible : keys;
      }
      const int32_t cost = keys <= 0 ? 0 : (keys + args.block_n - 1) / args.block_n;
      args.unsorted[idx] = WorkItem{(m << 4) | g, b};
      args.costs[idx] = cost;
      atomicMax(&max_cost, cost);
    }
  }
  __syncthreads();

  // Long sequences have more K/V blocks than there are buckets: coarsen the costs by the
  // smallest power of two that fits them all, so the order stays longest-first at any length
  // (a shared top bucket would leave the longest tiles in arbitrary order).
  int shift = 0;
  while ((max_cost >> shift) >= kBuckets) ++shift;
  for (int32_t i = tid; i < total_items; i += kThreads) atomicAdd(&buckets[args.costs[i] >> shift], 1);
  __syncthreads();

  // 3. bucket start positions, most expensive bucket first.
  // Thread t owns buckets [t*2, t*2+1] counted from the top (kBuckets = 2 * kThreads).
  static_assert(kBuckets == 2 * kThreads, "two buckets per thread");
  const int hi = kBuckets - 1 - 2 * tid;  // this thread's buckets: hi, hi-1
  const int32_t c_hi = buckets[hi];
  const int32_t c_lo = buckets[hi - 1];
  scan[tid] = c_hi + c_lo;
  __syncthreads();
  block_inclusive_scan(scan);
  const int32_t start = scan[tid] - c_hi - c_lo;
  __syncthreads();
  buckets[hi] = start;
  buckets[hi - 1] = start + c_hi;
  __syncthreads();

  // 4. scatter (order inside a bucket is arbitrary: it only affects scheduling).
  for (int32_t i = tid; i < total_items; i += kThreads) {
    const int32_t pos = atomicAdd(&buckets[args.costs[i] >> shift], 1);
    args.sorted[pos] = args.unsorted[i];
  }
  if (tid == 0) *args.count = total_items;
}

size_t align16(size_t x) { return (x + 15) & ~size_t{15}; }

}  // namespace

int64_t work_capacity(const int64_t* total_q, int num_groups, int batch_size, int block_m) {
  int64_t cap = 0;
  for (int g = 0; g < num_groups; ++g) cap += (total_q[g] + block_m - 1) / block_m + batch_size;
  return cap;
}

size_t scheduler_workspace_bytes(int num_groups, int batch_size, int64_t capacity) {
  const size_t pairs = static_cast<size_t>(num_groups) * static_cast<size_t>(batch_size);
  const size_t cap = static_cast<size_t>(capacity);
  return align16((pairs + 1) * sizeof(int32_t)) + align16(cap * sizeof(int32_t)) +
         2 * align16(cap * sizeof(WorkItem)) + align16(sizeof(int32_t));
}

void carve_scheduler_workspace(void* workspace, int num_groups, int batch_size, int64_t capacity,
                               SchedulerArgs* args) {
  const size_t pairs = static_cast<size_t>(num_groups) * static_cast<size_t>(batch_size);
  const size_t cap = static_cast<size_t>(capacity);
  char* p = static_cast<char*>(workspace);
  args->tile_offsets = reinterpret_cast<int32_t*>(p);
  p += align16((pairs + 1) * sizeof(int32_t));
  args->costs = reinterpret_cast<int32_t*>(p);
  p += align16(cap * sizeof(int32_t));
  args->unsorted = reinterpret_cast<WorkItem*>(p);
  p += align16(cap * sizeof(WorkItem));
  args->sorted = reinterpret_cast<WorkItem*>(p);
  p += align16(cap * sizeof(WorkItem));
  args->count = reinterpret_cast<int32_t*>(p);
}

cudaError_t launch_build_work_list(const SchedulerArgs& args, cudaStream_t stream) {
  build_work_list_kernel<<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, build_work_list_kernel);
}

}  // namespace cuda
}  // namespace ringattn
