/*
 * libringattn: grouped varlen attention behind a plain C ABI.
 *
 * Grouped attention: G query groups read ONE shared K/V stream. Group g has its own
 * queries Q_g [total_q_g, Hq, D], its own cu_seqlens_q_g [B+1] and optionally its own
 * seqused_k_g [B] (how many keys of each sequence, counted from the start, the group
 * sees). G = 1 is plain varlen FlashAttention.
 *
 * Conventions (the same as FlashAttention's varlen API):
 *  - Tensors are row-major with the head dim contiguous. Strides are in ELEMENTS.
 *  - LSE is fp32, natural log, laid out [Hq, total_q] contiguous (head stride total_q).
 *  - causal is bottom-right aligned per (group, sequence): query i of Lq attends key j < Lk
 *    iff j <= i + Lk - Lq; a window (ringattn_problem.window_left/right) bounds the keys on
 *    either side of that diagonal. A row that sees no key gets O = 0 and LSE = -inf (or the
 *    head's sink logit, with sinks).
 *  - Non-finite inputs are never mistaken for masking: the softmax runs in IEEE arithmetic, so a
 *    NaN or +inf score among the keys a row sees makes its O and LSE NaN and reaches dQ of the
 *    row and dK/dV of the keys it sees; a -inf score gives its key weight 0, and a row whose
 *    visible scores are all -inf (every key weighs 0) is treated like a row without keys
 *    (O = 0, LSE = -inf). The CPU backend and both GPU tiers follow this rule.
 *  - Hq % Hk == 0: query head h reads KV head h / (Hq / Hk).
 *
 * Every entry point validates all of its inputs before touching any output; a rejected
 * call returns a non-zero status, writes nothing and leaves a message naming the argument,
 * the expected and the actual value in ringattn_last_error() (thread-local).
 *
 * Outputs (out, softmax_lse, dq, dk, dv, workspace) must not share memory with each other or
 * with any input (tensors and metadata arrays), and an output's strides must not map two of
 * its elements to one address. The host API checks this from pointers, shapes and strides
 * alone (no data is read): exactly where the two tensors have the same strides (aliases,
 * views into one packed buffer such as dk/dv halves of a [total_k, 2, Hk, D] gradient, which
 * share no element and are accepted) or one is a contiguous range; tensors whose byte ranges
 * interleave with different strides are not checked. Inputs may overlap each other.
 *
 * Plain fixed-width types only: the Python package mirrors these structs with ctypes.
 */
#ifndef RINGATTN_RINGATTN_H_
#define RINGATTN_RINGATTN_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define RINGATTN_API __declspec(dllexport)
#else
#define RINGATTN_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a struct below changes layout. The Python loader refuses a mismatch.
 * 2: ringattn_problem.default_softmax_scale (the default scale has its own flag; a
 *    softmax_scale <= 0 no longer means "default" and is rejected).
 * 3: ringattn_exec.metadata_errors (a device word where GPU calls flag malformed cu_seqlens /
 *    seqused_k without a host sync) and ringattn_describe_metadata_errors.
 * 4: ringattn_problem.has_window / window_left / window_right / softcap / sinks (local
 *    attention, logit softcap, per-head sink logits) and the groups' diagonal_shift.
 * A change that moves no byte keeps the number: grouping the K/V fields of ringattn_fwd_params
 * and ringattn_bwd_params into one member kv (ringattn_kv) at the same offsets kept ABI 4
 * (source code must write p.kv.k for p.k; binaries are unaffected). csrc/api/abi_layout.cpp
 * pins the layout of the params structs. */
#define RINGATTN_ABI_VERSION 4
/* The most query groups one call takes. */
#define RINGATTN_MAX_GROUPS 16

typedef enum {
  RINGATTN_STATUS_OK = 0,
  RINGATTN_STATUS_INVALID_ARGUMENT = 1, /* bad shape, stride, pointer, value */
  RINGATTN_STATUS_UNSUPPORTED = 2,      /* valid, but not compiled in / not for this GPU */
  RINGATTN_STATUS_CUDA_ERROR = 3,       /* a CUDA runtime call failed */
  RINGATTN_STATUS_INTERNAL_ERROR = 4
} ringattn_status;

typedef enum {
  RINGATTN_DTYPE_FP32 = 0,
  RINGATTN_DTYPE_FP16 = 1,
  RINGATTN_DTYPE_BF16 = 2,
  RINGATTN_DTYPE_FP64 = 3 /* CPU backend only (gradcheck) */
} ringattn_dtype;

typedef enum {
  RINGATTN_DEVICE_CPU = 0,
  RINGATTN_DEVICE_CUDA = 1
} ringattn_device_type;

/* GPU kernel tier. AUTO picks the fastest compiled tier for the card: tier 2 (SM90: TMA + wgmma,
 * warp specialised) on sm90 cards when the build has sm_90a kernels for the dtype and head dim
 * (forward: 64/128/256; backward: 64/128) and total_k > 0, else tier 1 (SM80: mma.sync, every
 * sm80+ card). Both tiers run every feature of ABI 4 (windows, diagonal shifts, softcap, sinks).
 * Every operand the API accepts on a GPU is one TMA can address (16-byte aligned bases, strides
 * in multiples of 8 elements), so a tensor map the driver still refuses is reported as
 * RINGATTN_STATUS_CUDA_ERROR, not silently run on tier 1. In the backward, tier 2 adds dQ with
 * TMA reduce-add (fp32, order not fixed); in deterministic mode tier 2's dQ kernel computes it
 * per query tile in a fixed order.
 * SM80 forces tier 1 (for comparison); SM90 forces tier 2 and fails with
 * RINGATTN_STATUS_UNSUPPORTED, saying why, where tier 2 has no kernel (the backward at head_dim
 * 256, total_k == 0, a card other than sm90). The GPU calls make the device's primary context
 * current on the calling thread (cudaSetDevice). */
typedef enum {
  RINGATTN_TIER_AUTO = 0,
  RINGATTN_TIER_SM80 = 80,
  RINGATTN_TIER_SM90 = 90
} ringattn_tier;

/* Bits a GPU call sets in *ringattn_exec.metadata_errors, one per condition that the host check
 * (ringattn_problem.check_metadata, and the CPU backend) rejects, so a word still 0 after a
 * call means that check would have accepted the call's metadata values. B is batch_size; a
 * negative entry shows up as one of these (a first entry not 0, or a decrease). */
typedef enum {
  RINGATTN_METADATA_CU_SEQLENS_Q_FIRST = 1 << 0,      /* cu_seqlens_q[0] != 0 (some group) */
  RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING = 1 << 1, /* cu_seqlens_q[b + 1] < cu_seqlens_q[b] (some group, some b) */
  RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END = 1 << 2,   /* cu_seqlens_q[B] > total_q of its group */
  RINGATTN_METADATA_CU_SEQLENS_K_FIRST = 1 << 3,      /* cu_seqlens_k[0] != 0 */
  RINGATTN_METADATA_CU_SEQLENS_K_DECREASING = 1 << 4, /* cu_seqlens_k[b + 1] < cu_seqlens_k[b] (some b) */
  RINGATTN_METADATA_CU_SEQLENS_K_PAST_END = 1 << 5,   /* cu_seqlens_k[B] > total_k */
  RINGATTN_METADATA_SEQUSED_K_RANGE = 1 << 6 /* seqused_k[b] < 0 or > cu_seqlens_k[b + 1] - cu_seqlens_k[b]
                                                (some group, some b) */
} ringattn_metadata_error;
/* Every bit above. */
#define RINGATTN_METADATA_ALL_ERRORS 0x7fu

/* Where a call runs. stream is a cudaStream_t (NULL = legacy default stream). */
typedef struct {
  int32_t device_type;  /* ringattn_device_type */
  int32_t device_index; /* CUDA ordinal; ignored on CPU */
  void* stream;         /* cudaStream_t; ignored on CPU */
  int32_t tier;         /* ringattn_tier; ignored on CPU */
  int32_t num_threads;  /* CPU backend threads; <= 0 means all hardware threads; capped at the
                           hardware threads (std::thread::hardware_concurrency) */
  /* GPU calls without check_metadata read cu_seqlens / seqused_k values on the device only:
   * malformed ones give wrong numbers for the sequences concerned (every access stays inside
   * the tensors) and the call still returns RINGATTN_STATUS_OK. To see them without a host
   * sync, point this at a 4-byte aligned uint32_t in the memory of device_index that the caller
   * zeroed: the call's work-list kernels atomicOr ringattn_metadata_error bits into it, in
   * stream order, and never clear it (a well-formed call leaves it unchanged). Read it when you
   * choose (after synchronising the streams of the calls), then zero it again. It must not
   * overlap any output of the call. NULL: no report. Ignored on CPU, where the values are
   * always checked and a malformed call fails with RINGATTN_STATUS_INVALID_ARGUMENT. */
  uint32_t* metadata_errors;
} ringattn_exec;

/* Shape and metadata shared by forward and backward. */
typedef struct {
  int32_t dtype;      /* ringattn_dtype of q, k, v, out (and dout, dq, dk, dv) */
  int32_t batch_size; /* B: sequences per group */
  int32_t num_heads_q;
  int32_t num_heads_k;
  int32_t head_dim;
  int32_t num_groups; /* G, 1 .. RINGATTN_MAX_GROUPS */
  /* Scale of Q K^T: a finite float > 0 of normal magnitude (>= FLT_MIN), when
   * default_softmax_scale is 0. default_softmax_scale = 1 means 1/sqrt(head_dim); softmax_scale
   * must then be 0. Anything else (NaN, inf, <= 0, a subnormal, a flag other than 0/1) is
   * rejected, so no value can silently turn into the default. */
  float softmax_scale;
  int32_t default_softmax_scale;
  int32_t causal;      /* bottom-right aligned */
  /* K/V: [total_k, Hk, D] */
  int64_t total_k;
  int32_t max_seqlen_k;            /* hint only (>= 0); kernels never trust it for memory safety */
  const int32_t* cu_seqlens_k;     /* [B+1], on the call's device */
  /* Check cu_seqlens / seqused_k VALUES on the host before launching. Free on CPU (always on
   * there); on CUDA it copies them to the host and synchronises the stream, so it is off in
   * the hot path. Without it the kernels clamp every sequence to its tensor, so malformed
   * metadata can give wrong numbers but never an out-of-bounds access; exec.metadata_errors
   * then reports them without a sync. */
  int32_t check_metadata;
  /* Local (sliding-window) attention, FlashAttention's window_size, when has_window = 1 (0, as
   * in a zero-initialised struct: no window, window_left/right ignored). Row i of a (group,
   * sequence) with Lq rows and Lk keys has the diagonal key d(i) = i + Lk - Lq + diagonal_shift[b]
   * (the group's shift, 0 without one) and sees key j < Lk iff
   *     d(i) - window_left <= j <= d(i) + window_right;
   * -1 = unbounded on that side, otherwise >= 0. causal = 1 is window_right = 0, so with causal
   * window_right must be -1 or 0. */
  int32_t has_window;
  int32_t window_left;
  int32_t window_right;
  /* Logit softcap: > 0 turns each score s = softmax_scale * q.k into softcap * tanh(s / softcap)
   * before masking and softmax; 0 = off. Finite and >= 0. */
  float softcap;
  int32_t reserved0;
  int32_t reserved1;
  /* Per-query-head sink logits, fp32 [num_heads_q] on the call's device, or NULL. Sink h adds
   * exp(sinks[h]) to the softmax denominator of every row of head h (so to its LSE), never to
   * the output: O = sum_j exp(s_j - lse) v_j with lse = log(exp(sinks[h]) + sum_j exp(s_j)).
   * A row that sees no key then has O = 0 and LSE = sinks[h]. The backward reads the forward's
   * LSE, which already holds the sink, so its gradient formulas do not change; the sink's own
   * gradient, -sum_i exp(sinks[h] - lse_i) * rowsum(dO_i * O_i), is left to the caller (it
   * needs only O, dO and LSE). */
  const float* sinks;
} ringattn_problem;

/* The one K/V stream that every query group of a call reads (forward and backward alike):
 * K and V are [total_k, Hk, D] = [problem.total_k, problem.num_heads_k, problem.head_dim], of
 * dtype problem.dtype, in the memory of the call's device (exec.device_type / device_index).
 * Strides in elements, the head dim contiguous; K and V may have different strides. */
typedef struct {
  const void* k;
  int64_t k_row_stride;
  int64_t k_head_stride;
  const void* v;
  int64_t v_row_stride;
  int64_t v_head_stride;
} ringattn_kv;

/* One query group of the forward pass. */
typedef struct {
  const void* q;          /* [total_q, Hq, D] */
  int64_t q_row_stride;
  int64_t q_head_stride;
  void* out;              /* [total_q, Hq, D], dtype of q */
  int64_t out_row_stride;
  int64_t out_head_stride;
  float* softmax_lse;     /* [Hq, total_q] fp32, contiguous */
  const int32_t* cu_seqlens_q; /* [B+1] */
  const int32_t* seqused_k;    /* [B] or NULL (all keys of each sequence) */
  int64_t total_q;
  int32_t max_seqlen_q;   /* hint only (>= 0) */
  int32_t reserved;
  /* [B] int32 on the call's device, or NULL (all 0): moves each sequence's diagonal (see
   * ringattn_problem.window_left), as context parallelism needs when a query block and a key
   * block sit at different positions of one sequence. Read only when the mask has a bound
   * (causal or a window). */
  const int32_t* diagonal_shift;
} ringattn_fwd_group;

typedef struct {
  ringattn_problem problem;
  ringattn_exec exec;
  ringattn_kv kv;
  const ringattn_fwd_group* groups; /* [num_groups] (host memory) */
  void* workspace;                  /* on the call's device, >= ringattn_fwd_workspace_size */
  size_t workspace_size;
} ringattn_fwd_params;

/* One query group of the backward pass. */
typedef struct {
  const void* q;
  int64_t q_row_stride;
  int64_t q_head_stride;
  const void* out;
  int64_t out_row_stride;
  int64_t out_head_stride;
  const void* dout;
  int64_t dout_row_stride;
  int64_t dout_head_stride;
  const float* softmax_lse; /* [Hq, total_q], as the forward wrote it. fp64 (CPU backend only):
                               ignored; the backward recomputes the LSE in double over this call's
                               keys, since an fp32 LSE would cap fp64 gradients at fp32 accuracy */
  void* dq;                 /* [total_q, Hq, D], dtype of q */
  int64_t dq_row_stride;
  int64_t dq_head_stride;
  const int32_t* cu_seqlens_q;
  const int32_t* seqused_k;
  int64_t total_q;
  int32_t max_seqlen_q;
  int32_t reserved;
  const int32_t* diagonal_shift; /* [B] or NULL, as in ringattn_fwd_group */
} ringattn_bwd_group;

typedef struct {
  ringattn_problem problem;
  ringattn_exec exec;
  ringattn_kv kv;
  void* dk; /* [total_k, Hk, D], dtype of k: sum over groups (and over the query heads of each KV head) */
  int64_t dk_row_stride;
  int64_t dk_head_stride;
  void* dv;
  int64_t dv_row_stride;
  int64_t dv_head_stride;
  const ringattn_bwd_group* groups;
  int32_t deterministic; /* bit-identical results run to run */
  int32_t reserved;
  void* workspace;
  size_t workspace_size;
} ringattn_bwd_params;

/* ---- entry points ---- */
RINGATTN_API ringattn_status ringattn_grouped_fwd(const ringattn_fwd_params* params);
RINGATTN_API ringattn_status ringattn_grouped_bwd(const ringattn_bwd_params* params);

/* Workspace bytes a call with these params needs (0 is a valid answer). Validates the params
 * like the call itself, except data pointers, which may be NULL here. */
RINGATTN_API ringattn_status ringattn_fwd_workspace_size(const ringattn_fwd_params* params, size_t* bytes);
RINGATTN_API ringattn_status ringattn_bwd_workspace_size(const ringattn_bwd_params* params, size_t* bytes);

/* ---- queries ---- */
/* What the ringattn_metadata_error bits of `bits` mean: one phrase per set bit, joined by "; "
 * ("" for 0; bits outside RINGATTN_METADATA_ALL_ERRORS are named as unknown). Thread-local
 * storage, valid until this thread's next call of it. */
RINGATTN_API const char* ringattn_describe_metadata_errors(uint32_t bits);
/* Message of the last failed call on this thread ("" if none). Valid until the next call. */
RINGATTN_API const char* ringattn_last_error(void);
RINGATTN_API const char* ringattn_version(void);
RINGATTN_API int32_t ringattn_abi_version(void);
/* 1 if GPU kernels are compiled in. */
RINGATTN_API int32_t ringattn_cuda_compiled(void);
/* Writes up to `capacity` compiled SM architectures (80, 90, ...) into archs; returns how many
 * are compiled in. */
RINGATTN_API int32_t ringattn_compiled_archs(int32_t* archs, int32_t capacity);
/* Head dims the backend has kernels for; same convention as ringattn_compiled_archs. */
RINGATTN_API int32_t ringattn_supported_head_dims(int32_t device_type, int32_t* head_dims, int32_t capacity);
/* RINGATTN_STATUS_OK if (device, dtype, head_dim) can run here; otherwise a status and
 * ringattn_last_error() says why (no GPU, GPU too old, dtype or head dim not compiled in). */
RINGATTN_API ringattn_status ringattn_check_support(int32_t device_type, int32_t device_index,
                                                    int32_t dtype, int32_t head_dim);

#ifdef __cplusplus
}
#endif

#endif /* RINGATTN_RINGATTN_H_ */
