#include "cuda/tile_scheduler.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include "common/mask.h"
#include "common/tile_order.h"
#include "cuda/device_support.h"
#include "cuda/fwd_grid_choice.h"
#include "cuda/kernel_registry.h"
#include "cuda/metadata_errors.cuh"
#include "cuda/work_list_sort.cuh"

namespace ringattn {
namespace cuda {
namespace {

using metadata_errors::CuSeqlens;
using work_list::blocks_of;
using work_list::clamp_i;
using work_list::kThreads;

constexpr size_t kWorkListAlign = 16;  // bytes, of each buffer (the count's holds the forward's tile counter too)
static_assert(kWorkListAlign >= 2 * sizeof(int32_t), "the count and the tile counter share one buffer");

__global__ void __launch_bounds__(kThreads) build_work_list_kernel(const __grid_constant__ SchedulerArgs args) {
  __shared__ int64_t scan[kThreads];
  // (group, sequence) pairs: G * B passes INT32_MAX for B past 2^27.
  const int64_t pairs = static_cast<int64_t>(args.num_groups) * args.batch_size;

  // 1. tiles per (group, sequence), exclusive prefix sums into tile_offsets (64-bit sums,
  // saturated at the capacity: malformed, overlapping sequences may add up past INT32_MAX).
  const int64_t tiles_total = work_list::block_exclusive_offsets(
      pairs,
      [&](int64_t p) {
        const int g = static_cast<int>(p / args.batch_size);
        const int b = static_cast<int>(p % args.batch_size);
        const int32_t* cu = args.cu_seqlens_q[g];
        const int32_t start = clamp_i(cu[b], 0, args.total_q[g]);
        const int32_t end = clamp_i(cu[b + 1], start, args.total_q[g]);
        return blocks_of(end - start, args.block_m);
      },
      args.offsets, args.capacity, scan);
  const int32_t total_items = work_list::saturated_offset(tiles_total, args.capacity);

  // 2. one item per tile, with its cost (the K/V blocks it reads). The metadata values of every
  // (group, sequence) pass through here: malformed ones are reported (metadata_errors.cuh), and
  // clamped to the tensors like everywhere else.
  uint32_t errors = 0;
  for (int64_t p = threadIdx.x; p < pairs; p += kThreads) {
    const int g = static_cast<int>(p / args.batch_size);
    const int b = static_cast<int>(p % args.batch_size);
    const int32_t* cu = args.cu_seqlens_q[g];
    const int32_t cu_q_b = cu[b], cu_q_next = cu[b + 1];
    const int32_t cu_k_b = args.cu_seqlens_k[b], cu_k_next = args.cu_seqlens_k[b + 1];
    errors |= metadata_errors::cu_seqlens_pair<CuSeqlens::kQuery>(cu_q_b, cu_q_next, b, args.batch_size,
                                                                  args.total_q[g]) |
              metadata_errors::cu_seqlens_pair<CuSeqlens::kKey>(cu_k_b, cu_k_next, b, args.batch_size, args.total_k);
    const int32_t q_start = clamp_i(cu_q_b, 0, args.total_q[g]);
    const int32_t seqlen_q = clamp_i(cu_q_next, q_start, args.total_q[g]) - q_start;
    const int32_t k_start = clamp_i(cu_k_b, 0, args.total_k);
    int32_t seqlen_k = clamp_i(cu_k_next, k_start, args.total_k) - k_start;
    if (args.seqused_k[g] != nullptr) {
      const int32_t used = args.seqused_k[g][b];
      errors |= metadata_errors::seqused_k_entry(used, cu_k_b, cu_k_next);
      seqlen_k = clamp_i(used, 0, seqlen_k);
    }
    const int32_t* shifts = args.diagonal_shift[g];
    const int32_t shift = shifts != nullptr ? shifts[b] : 0;
    const int32_t first = args.offsets[p];  // <= total_items (saturated)
    const int32_t tiles = work_list::items_below(first, blocks_of(seqlen_q, args.block_m), total_items);
    // The tiles' items [first, first + tiles), each with its sort key: the key blocks it reads
    // (common/mask.h), as the kernels walk them, and where the call has L2 sections, its
    // sequence's section before that (common/tile_order.h).
    const TileSortKey sort_key(args.sections, k_start, args.total_k);
    auto place_tiles = [&](const auto& mask) {
      for (int32_t m = 0; m < tiles; ++m) {
        args.unsorted[first + m] = WorkItem{(m << 4) | g, b};
        args.costs[first + m] = sort_key(work_list::query_tile_cost(mask, m, args.block_m, args.block_n));
      }
    };
    if (work_list::mask_fits_int32(seqlen_q, seqlen_k))
      place_tiles(MaskPolicy<MaskWindow>(seqlen_q, seqlen_k, args.window, shift));
    else
      place_tiles(MaskPolicy<MaskWindow, int64_t>(seqlen_q, seqlen_k, args.window, shift));
  }
  metadata_errors::report(args.metadata_errors, errors);
  __syncthreads();

  // 3. longest first (per L2 section where the call has them).
  work_list::sort_by_cost_desc(args.unsorted, args.costs, total_items, args.sorted);
  if (threadIdx.x == 0) {
    args.count[0] = total_items;
    // The persistent tier-2 forward's tile counter (sm90/fwd_kernel.cuh), next to the count in
    // the same 16-byte buffer: zero before every forward.
    args.count[1] = 0;
  }
}

}  // namespace

int64_t work_capacity(const int64_t* total_q, int num_groups, int batch_size, int block_m) {
  int64_t cap = 0;
  for (int g = 0; g < num_groups; ++g) cap += (total_q[g] + block_m - 1) / block_m + batch_size;
  return cap;
}

size_t scheduler_workspace_bytes(int num_groups, int batch_size, int64_t capacity) {
  const size_t pairs = static_cast<size_t>(num_groups) * static_cast<size_t>(batch_size);
  return work_list_bytes<WorkItem>(pairs + 1, static_cast<size_t>(capacity), kWorkListAlign);
}

void carve_scheduler_workspace(void* workspace, int num_groups, int batch_size, int64_t capacity,
                               SchedulerArgs* args) {
  const size_t pairs = static_cast<size_t>(num_groups) * static_cast<size_t>(batch_size);
  carve_work_list<WorkItem>(workspace, pairs + 1, static_cast<size_t>(capacity), kWorkListAlign, args);
}

long env_override(const char* name, long lo, long hi, long unset) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return unset;
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(v, &end, 10);
  if (errno == 0 && end != v && *end == '\0' && n >= lo && n <= hi) return n;
  static std::mutex mutex;
  static std::set<std::string> reported;
  std::lock_guard<std::mutex> lock(mutex);
  if (reported.insert(std::string(name) + "=" + v).second)
    std::fprintf(stderr, "ringattn: %s='%s' ignored: expected an integer in [%ld, %ld]\n", name, v, lo, hi);
  return unset;
}

namespace {

// A run length forced by environment variable `name` (kernel development), read once by each
// caller's static: the integer in [1, 2^20) it holds, else 0 (not forced; env_override reports a
// value it cannot take).
int forced_head_run(const char* name) { return static_cast<int>(env_override(name, 1, (1L << 20) - 1, 0)); }

// choose_tile_head_run with the device's SMs and L2 (one look at check_device's per-device cache);
// 1, the head-fastest order, where the device cannot be read.
int head_run_on_device(int device_index, int64_t bytes_per_head, int num_heads, int heads_per_shared_head,
                       int64_t capacity) {
  int sm_count = 0;
  int64_t l2_bytes = 0;
  if (check_device(device_index, nullptr, &sm_count, &l2_bytes) != RINGATTN_STATUS_OK) return 1;
  return choose_tile_head_run(sm_count, l2_bytes, bytes_per_head, num_heads, heads_per_shared_head, capacity);
}

}  // namespace

int tile_head_run(const ringattn_problem& pr, int device_index, int64_t capacity) {
  static const int forced = forced_head_run("RING_FLASH_ATTN_TILE_HEAD_RUN");
  if (forced > 0) return forced;
  // Keys one query row sees (a one-row tile): the window's span where both sides are bounded.
  const int64_t keys = fwd_tile_keys(pr.max_seqlen_k > 0 ? pr.max_seqlen_k : pr.total_k, call_window(pr), 1);
  const int64_t kv_bytes_per_head = 2 * keys * pr.head_dim * 2;  // K and V, 2-byte elements
  return head_run_on_device(device_index, kv_bytes_per_head, pr.num_heads_q, pr.num_heads_q / pr.num_heads_k,
                            capacity);
}

int kv_block_head_run(const ringattn_problem& pr, int64_t q_rows, int device_index, int64_t capacity) {
  static const int forced = forced_head_run("RING_FLASH_ATTN_KV_HEAD_RUN");
  if (forced > 0) return forced;
  const int q_per_kv = pr.num_heads_q / pr.num_heads_k;
  // Q and dO rows of the K/V head's q_per_kv query heads, 2-byte elements.
  const int64_t bytes_per_kv_head = 2 * q_rows * pr.head_dim * 2 * q_per_kv;
  return head_run_on_device(device_index, bytes_per_kv_head, pr.num_heads_k, 1, capacity);
}

TileListSections fwd_tile_list_sections(const ringattn_problem& pr, int device_index, int block_m, int block_n) {
  // Read at each call (unlike the run lengths above), so a test can set it per call.
  const long forced_keys = env_override("RING_FLASH_ATTN_TILE_SECTION_KEYS", 0, INT32_MAX, -1);  // -1: not forced
  if (forced_keys == 0) return TileListSections{};
  const MaskWindow window = call_window(pr);
  if (forced_keys < 0 && window.left < 0 && window.right < 0) return TileListSections{};  // every tile of a sequence costs the same
  int64_t keys = forced_keys;
  if (forced_keys < 0) {
    int sm_count = 0;
    int64_t l2_bytes = 0;
    if (check_device(device_index, nullptr, &sm_count, &l2_bytes) != RINGATTN_STATUS_OK || l2_bytes <= 0)
      return TileListSections{};
    const int64_t kv_bytes_per_key = 2 * static_cast<int64_t>(pr.num_heads_k) * pr.head_dim * 2;  // K and V, 2 bytes
    keys = kv_bytes_per_key > 0 ? (l2_bytes / 4) / kv_bytes_per_key : 0;
    if (keys < 1) keys = 1;
  }
  // The costliest tile: the blocks of the keys one tile sees (the call's hint, else every key),
  // one more where they do not start on a block boundary.
  const int64_t tile_keys = fwd_tile_keys(pr.max_seqlen_k > 0 ? pr.max_seqlen_k : pr.total_k, window, block_m);
  const int64_t max_cost = (tile_keys + block_n - 1) / block_n + 1;
  return choose_tile_list_sections(keys, pr.total_k, max_cost, work_list::kBuckets);
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
