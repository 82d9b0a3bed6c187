// The longest-first work list of the forward kernels, built on the device (the sequence
// lengths live there; reading them on the host would synchronise).
//
// Work item = (group, sequence, query tile). Every tile is an item (one that sees no key writes
// O = 0 and its LSE). Cost = number of K/V blocks the tile reads, [n_block_min, n_block_max) of
// the mask policy. Items are sorted by cost, largest first, so the causal tail and the long
// group's tiles start in the first wave and the cheap tiles fill the last one; for the tier-2
// persistent forward, longest first per L2 section of sequences (common/tile_order.h,
// TileListSections), so the tiles of one sequence read its keys and values from L2.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/tile_order.h"
#include "cuda/fwd_params.h"
#include "cuda/work_list_inputs.h"

namespace ringattn {
namespace cuda {

// The query-tile work list: offsets has G*B + 1 entries (per (group, sequence)). `sections`: the
// list's L2 sections (none unless the caller asks: fwd_tile_list_sections).
struct SchedulerArgs : WorkListArgs<WorkItem> {
  TileListSections sections;
};

// Upper bound on the number of work items: each sequence adds at most one partial tile.
int64_t work_capacity(const int64_t* total_q, int num_groups, int batch_size, int block_m);

// Bytes of workspace the scheduler needs, and the carving of it.
size_t scheduler_workspace_bytes(int num_groups, int batch_size, int64_t capacity);
void carve_scheduler_workspace(void* workspace, int num_groups, int batch_size, int64_t capacity,
                               SchedulerArgs* args);

cudaError_t launch_build_work_list(const SchedulerArgs& args, cudaStream_t stream);

// Items per head run of a call's query-tile list (common/tile_order.h: the order the forward and
// deterministic dQ kernels walk it in), from the device's SMs and L2 and the K/V bytes of one head
// over the longest sequence (or the window's span). RING_FLASH_ATTN_TILE_HEAD_RUN, a positive
// integer, overrides the choice (kernel development: to time one order against another).
int tile_head_run(const ringattn_problem& pr, int device_index, int64_t capacity);

// The same for the dK/dV kernel's K/V-block list (common/tile_order.h, the head a K/V head): runs
// long enough that the Q/dO rows the K/V heads in flight read (q_rows: the query rows of all
// groups one K/V block can see, over the longest sequences) fit in half the L2.
// RING_FLASH_ATTN_KV_HEAD_RUN, a positive integer, overrides the choice.
int kv_block_head_run(const ringattn_problem& pr, int64_t q_rows, int device_index, int64_t capacity);

// A kernel-development override read from environment variable `name`: its integer value in
// [lo, hi], or `unset` where the variable is unset or empty. Any other value (not an integer,
// trailing characters, out of range) is reported on stderr, once per variable and value, and
// ignored: these variables time one order against another, and a typo must not time the default
// under another label unnoticed.
long env_override(const char* name, long lo, long hi, long unset);

// The L2 sections of a tier-2 persistent forward's list (common/tile_order.h): sections of a
// quarter of the L2 in K/V bytes (both tensors, every K/V head, 2-byte elements) where the call's
// mask bounds a side of the rows' keys (causal, windows: a sequence's tiles differ in cost, so a
// list sorted over the whole call runs them far apart); none otherwise, or where the device's L2
// cannot be read. RING_FLASH_ATTN_TILE_SECTION_KEYS (kernel development, read at each call) forces
// a section length of at least that many key positions (a positive integer) or no sections (0),
// whatever the mask; a value env_override cannot take is reported and ignored.
TileListSections fwd_tile_list_sections(const ringattn_problem& pr, int device_index, int block_m, int block_n);

// For capability checks: whether a kernel image exists for the current device.
cudaError_t probe_kernel_image();

}  // namespace cuda
}  // namespace ringattn
