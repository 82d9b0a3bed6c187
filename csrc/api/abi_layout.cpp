// The byte layout of the call parameter structs of include/ringattn/ringattn.h, pinned for 64-bit
// targets (8-byte pointers and size_t): sizes and offsets written as numbers, so that a header
// edit which moves any byte fails to compile here instead of silently changing the ABI. A change
// that is meant to move bytes updates these numbers and bumps RINGATTN_ABI_VERSION.
//
// The K/V fields sit in one member, kv (ringattn_kv), at the offsets that the flat fields k,
// k_row_stride, k_head_stride, v, v_row_stride, v_head_stride had before it (both layouts are ABI 4).
#include <cstddef>
#include <cstdint>

#include "ringattn/ringattn.h"

#if UINTPTR_MAX == UINT64_MAX && SIZE_MAX == UINT64_MAX

#define RINGATTN_PIN(what, expected) static_assert((what) == (expected), #what " moved: the C ABI changed")

namespace {

// Params struct `Params` (forward or backward) is `size` bytes, 8-byte aligned, and has problem,
// exec and the six K/V fields at the offsets they had as flat fields k .. v_head_stride: 136 + 8 i.
template <typename Params>
constexpr bool size_and_front_pinned(size_t size) {
  constexpr size_t kv = offsetof(Params, kv);
  return sizeof(Params) == size && alignof(Params) == 8 && offsetof(Params, problem) == 0 &&
         offsetof(Params, exec) == 104 && kv == 136 &&
         kv + offsetof(ringattn_kv, k) == 136 && kv + offsetof(ringattn_kv, k_row_stride) == 144 &&
         kv + offsetof(ringattn_kv, k_head_stride) == 152 && kv + offsetof(ringattn_kv, v) == 160 &&
         kv + offsetof(ringattn_kv, v_row_stride) == 168 && kv + offsetof(ringattn_kv, v_head_stride) == 176;
}

}  // namespace

RINGATTN_PIN(sizeof(ringattn_kv), 48);
RINGATTN_PIN(alignof(ringattn_kv), 8);

RINGATTN_PIN(size_and_front_pinned<ringattn_fwd_params>(208), true);
RINGATTN_PIN(offsetof(ringattn_fwd_params, groups), 184);
RINGATTN_PIN(offsetof(ringattn_fwd_params, workspace), 192);
RINGATTN_PIN(offsetof(ringattn_fwd_params, workspace_size), 200);

RINGATTN_PIN(size_and_front_pinned<ringattn_bwd_params>(264), true);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dk), 184);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dk_row_stride), 192);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dk_head_stride), 200);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dv), 208);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dv_row_stride), 216);
RINGATTN_PIN(offsetof(ringattn_bwd_params, dv_head_stride), 224);
RINGATTN_PIN(offsetof(ringattn_bwd_params, groups), 232);
RINGATTN_PIN(offsetof(ringattn_bwd_params, deterministic), 240);
RINGATTN_PIN(offsetof(ringattn_bwd_params, reserved), 244);
RINGATTN_PIN(offsetof(ringattn_bwd_params, workspace), 248);
RINGATTN_PIN(offsetof(ringattn_bwd_params, workspace_size), 256);

#undef RINGATTN_PIN

#endif  // 64-bit pointers and size_t
