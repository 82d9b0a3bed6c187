#!/usr/bin/env python
"""One training step of a HuggingFace Llama decoder, end to end, with each attention implementation.

A ``LlamaForCausalLM`` is built from a ``LlamaConfig`` (random weights, nothing downloaded), in
bf16, and trained for a few steps: forward, loss, backward, AdamW step. Only the attention changes
between rows, so the rows say what each attention implementation is worth in a real step.

Usage (one GPU; the default set takes about 4-5 minutes on an H200):

    python benchmark/benchmark_training_step.py --csv benchmark/results/training_step.csv \\
        --plot benchmark/results/training_step.png
    python benchmark/benchmark_training_step.py --seqlens 131072 --packed --checkpointing on
    python benchmark/benchmark_training_step.py --models llama3-70b --seqlens 8192 32768
    # several GPUs, context parallelism through the HF adapter (ours_* rows only):
    torchrun --nproc_per_node 8 benchmark/benchmark_training_step.py --seqlens 131072 --packed
    # the whole pipeline on the CPU with a tiny model (numbers mean nothing; for CI):
    python benchmark/benchmark_training_step.py --tiny --csv /tmp/training_step_tiny.csv

Models (``--models``): ``llama3-8b`` (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocab 128256; default 4 layers) and ``llama3-70b`` (hidden 8192, 64 heads, 8 KV heads,
intermediate 28672, vocab 128256; default 2 layers); ``--layers`` overrides the layer count.

Layouts (one row of tokens per step, batch size 1):

* ``single``: one sequence of L tokens (``--seqlens``);
* ``packed_KxL``: K documents of L tokens packed into one row (``--packed 4x8192``), position_ids
  restarting at 0 with every document; ``mixed`` (layout ``packed_mixed``): documents of mixed
  lengths drawn from a fixed seed (``--mixed-seed``) that fill ``--mixed-tokens`` tokens.

Implementations (``--impls``; a row that cannot run is skipped with the reason, never a crash):

* ``ours_llama3`` / ``ours_zigzag_llama3``: ring_flash_attn's HF adapter
  (``register_hf_attention`` on a process group, the model's attn_implementation set to the
  registered name, ``update_ring_flash_attn_params(cu_seqlens, group)`` before every step). One
  GPU: a 1-rank process group created in the process (NCCL; gloo on the CPU). Under torchrun
  with N ranks each rank holds its shard of the row (contiguous piece, or ``zigzag_shard``) and
  gradients are all-reduced before the optimizer step. ``--heads-k-stride`` defaults to the
  model's KV heads (one all-gather slice, one kernel call per layer).
* ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: transformers' ``sdpa``
  attention with PyTorch's backend forced by ``torch.nn.attention.sdpa_kernel([backend])`` over
  the whole step (a row that runs ran on that backend). Packed documents need the block-diagonal
  causal mask: a 4-D boolean mask ``[1, 1, T, T]`` built from the document boundaries once per row
  (outside the timed steps) and passed as ``attention_mask``; with a mask transformers repeats K/V
  to all query heads (no GQA in sdpa with a mask) and the flash backend refuses masks, so
  ``sdpa_flash`` runs single sequences only. ``sdpa_math`` only up to ``--math-max-tokens``.
* ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` registered as a transformers
  attention function (``AttentionInterface``, name ``torch_varlen_attn``) fed the row's
  cu_seqlens; packed layouts only.
* ``flash_attention_2``: transformers' own path when the flash_attn package is importable
  (packing detected from position_ids).

The loss: the final hidden states times the LM head, cross-entropy against the next token of the
same document, computed over ``--loss-chunk`` tokens at a time with the gradient of each chunk
formed in the forward, so the logits of the whole row (T x 128256) are never stored (without it a
128K-token row could not fit); it does the same matrix products a plain LM head + cross-entropy
does, no recomputation. Parameters, gradients and AdamW states are bf16 (fused AdamW on the GPU;
no fp32 master copy).

Metrics per row: warm-up steps (``--warmup``), then ``--steps`` timed steps (host clock around
each step with the device synchronised before and after); reported: the median.

* ``tokens_per_s``: tokens of the row (all ranks) per second.
* ``tflops`` (per GPU) and ``mfu`` = tflops / ``--peak-tflops`` (default 989: the H100/H200 dense
  bf16 datasheet figure). Model FLOPs per step = 6 * P * T for the dense part (P: parameters of
  the matrix products: every layer, the final norm and the LM head; not the input embedding,
  which is a lookup) + attention over the visible (query, key) pairs of each document under the
  causal mask: 4 * D * Hq * pairs per layer forward, x3 for forward + backward. Activation
  checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).
* ``attn_ms``: the attention's share of the step. One extra step (after the timed ones) runs
  with every attention call wrapped (the implementation's registered function, re-registered
  around it for that step) in two autograd functions that record a CUDA event when the call
  starts and ends, and when its backward starts and ends. The sum of those intervals (forward,
  backward and checkpointing's recomputation: the stream time spent in attention, including any
  time the GPU waits for the host inside the call) over that step's time is the share;
  ``attn_ms = share * step_ms`` and ``rest_ms = step_ms - attn_ms``.
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the timed steps (reset after the
  warm-up), model, gradients and optimizer states included.

Output: progress on stderr (one line per row, with an ETA), the table and a comparison of ours
against the best other implementation on stdout, the CSV (``--csv``, every row with its
``status``; metrics empty for rows that did not run), a PNG (``--plot``, when matplotlib imports).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib.util
import inspect
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
try:
    import ring_flash_attn as rfa
except ImportError:  # running from a checkout without PYTHONPATH
    sys.path.insert(0, os.path.join(_ROOT, "python"))
    import ring_flash_attn as rfa


# ---- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of a Llama decoder (head_dim = hidden / heads)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    default_layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


MODELS: Dict[str, ModelSpec] = {
    "llama3-8b": ModelSpec("llama3-8b", 4096, 32, 8, 14336, 128256, 4),
    "llama3-70b": ModelSpec("llama3-70b", 8192, 64, 8, 28672, 128256, 2),
}
TINY_MODEL = ModelSpec("tiny", 64, 4, 2, 128, 128, 2)

OURS_IMPLS = ("ours_llama3", "ours_zigzag_llama3")
SDPA_IMPLS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
IMPLS = OURS_IMPLS + SDPA_IMPLS + ("varlen_attn", "flash_attention_2")
SDPA_BACKEND_NAMES = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                      "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
VARLEN_ATTN_NAME = "torch_varlen_attn"  # no "flash" in it: transformers would look for a flash_attn kernel

CSV_COLUMNS = ("gpu", "torch", "transformers", "model", "layers", "num_gpus", "layout", "docs", "seqlen", "impl",
               "checkpointing", "status", "step_ms", "attn_ms", "rest_ms", "tokens_per_s", "tflops", "mfu",
               "peak_mem_gb", "note")
REQUIRED_CSV_COLUMNS = ("gpu", "torch", "model", "layers", "num_gpus", "layout", "seqlen", "impl", "tokens_per_s",
                        "mfu", "peak_mem_gb")

DEFAULT_SEQLENS = (8192, 32768)
DEFAULT_PACKED = ("4x8192", "16x2048", "64x512", "mixed")
DEFAULT_PEAK_TFLOPS = 989.0
MIXED_UNIT = 128  # mixed document lengths are multiples of this (zigzag needs multiples of 2N)


# ---- FLOPs (pure Python) --------------------------------------------------------------------------


def dense_params(spec: ModelSpec, layers: int) -> int:
    """Parameters that take part in matrix products per token: every decoder layer (q, k, v, o
    projections, the three MLP matrices, two RMSNorm weights), the final norm and the LM head.
    The input embedding (a lookup) is left out; the LM head is untied."""
    h, d = spec.hidden, spec.head_dim
    attn = h * spec.heads * d * 2 + h * spec.kv_heads * d * 2  # q and o; k and v
    mlp = 3 * h * spec.intermediate
    per_layer = attn + mlp + 2 * h
    return layers * per_layer + h + h * spec.vocab


def visible_pairs(doc_lens: Sequence[int]) -> int:
    """(query, key) pairs a causal mask leaves visible, per document: sum of n (n + 1) / 2."""
    return sum(n * (n + 1) // 2 for n in doc_lens)


def attention_flops(spec: ModelSpec, layers: int, doc_lens: Sequence[int]) -> int:
    """Attention FLOPs of one training step: forward 4 * D * Hq * pairs per layer (QK^T and PV),
    forward + backward 3x that."""
    return 3 * 4 * spec.head_dim * spec.heads * visible_pairs(doc_lens) * layers


def model_flops(spec: ModelSpec, layers: int, doc_lens: Sequence[int]) -> int:
    """Model FLOPs of one training step on the row: 6 * P * T + attention_flops."""
    return 6 * dense_params(spec, layers) * sum(doc_lens) + attention_flops(spec, layers, doc_lens)


def throughput(flops: float, tokens: int, step_s: float, num_gpus: int,
               peak_tflops: float) -> Tuple[float, float, float]:
    """(tokens per second of the whole job, TFLOPS per GPU, MFU = TFLOPS per GPU / peak)."""
    if step_s <= 0 or num_gpus < 1 or peak_tflops <= 0:
        raise ValueError(f"throughput: expected step_s > 0, num_gpus >= 1 and peak_tflops > 0, got {step_s}, "
                         f"{num_gpus}, {peak_tflops}")
    tflops = flops / step_s / num_gpus / 1e12
    return tokens / step_s, tflops, tflops / peak_tflops


# ---- layouts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One row of tokens: its name in the CSV and its documents' lengths."""

    name: str
    doc_lens: Tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.doc_lens)

    @property
    def packed(self) -> bool:
        return self.name != "single"


def single_layout(seqlen: int) -> Layout:
    if seqlen < 1:
        raise ValueError(f"--seqlens: expected positive lengths, got {seqlen}")
    return Layout("single", (seqlen,))


def mixed_lengths(total: int, seed: int, unit: int = MIXED_UNIT) -> List[int]:
    """Document lengths, multiples of `unit`, that add up to `total` (a multiple of `unit`):
    log-uniform between `unit` and total / 2 (at least `unit`), drawn from `seed`; the last
    document takes what is left. Deterministic for a given (total, seed, unit)."""
    if unit < 1 or total < unit or total % unit:
        raise ValueError(f"--mixed-tokens: expected a positive multiple of {unit}, got {total}")
    rng = random.Random(seed)
    units_left = total // unit
    max_units = max(1, units_left // 2)
    lens: List[int] = []
    while units_left > 0:
        n = int(round(math.exp(rng.uniform(0.0, math.log(max_units)))))
        n = max(1, min(n, units_left))
        lens.append(n * unit)
        units_left -= n
    return lens


def parse_packed(text: str, mixed_tokens: int, mixed_seed: int, unit: int = MIXED_UNIT) -> Layout:
    """``KxL`` -> K documents of L tokens (layout ``packed_KxL``); ``mixed`` -> mixed_lengths."""
    if text == "mixed":
        return Layout("packed_mixed", tuple(mixed_lengths(mixed_tokens, mixed_seed, unit)))
    parts = text.lower().split("x")
    try:
        count, length = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--packed: expected KxL (K documents of L tokens, e.g. 4x8192) or 'mixed', got "
                         f"{text!r}") from None
    if count < 1 or length < 1:
        raise ValueError(f"--packed: expected K >= 1 and L >= 1 in KxL, got {text!r}")
    return Layout(f"packed_{count}x{length}", (length,) * count)


# ---- batches --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One packed row, all ranks' tokens, on the CPU: ``[T]`` tensors and cu_seqlens ``[B + 1]``."""

    doc_lens: Tuple[int, ...]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restarting at 0 with every document
    labels: torch.Tensor  # int64 [T]: the next token of the same document, -100 at a document's last token

    @property
    def num_labels(self) -> int:
        return int((self.labels != -100).sum())


def make_batch(doc_lens: Sequence[int], vocab: int, seed: int) -> Batch:
    """Random tokens for the documents of one row, with their positions and next-token labels."""
    gen = torch.Generator().manual_seed(seed)
    lens = [int(n) for n in doc_lens]
    total = sum(lens)
    ids = torch.randint(0, vocab, (total,), generator=gen, dtype=torch.int64)
    pos = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens])
    labels = torch.full((total,), -100, dtype=torch.int64)
    start = 0
    for n in lens:
        labels[start:start + n - 1] = ids[start + 1:start + n]
        start += n
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return Batch(tuple(lens), cu, ids, pos, labels)


def shard_index(batch: Batch, zigzag: bool, rank: int, world_size: int) -> torch.Tensor:
    """Indices (int64 ``[T / N]``) of rank `rank`'s tokens: the contiguous piece
    ``[r T/N, (r+1) T/N)``, or its ``zigzag_shard`` (every document length a multiple of 2N)."""
    total = batch.input_ids.shape[0]
    if total % world_size:
        raise ValueError(f"layout: expected a token count divisible by the {world_size} ranks, got {total}")
    if zigzag:
        return rfa.zigzag_shard(torch.arange(total), batch.cu_seqlens, rank, world_size)
    local = total // world_size
    return torch.arange(rank * local, (rank + 1) * local)


def block_causal_mask(doc_lens: Sequence[int], device) -> torch.Tensor:
    """The block-diagonal causal mask of packed documents: bool ``[1, 1, T, T]``, True where query
    i may see key j (same document, j <= i)."""
    lens = torch.tensor([int(n) for n in doc_lens], device=device)
    doc = torch.repeat_interleave(torch.arange(len(doc_lens), device=device), lens)
    idx = torch.arange(doc.shape[0], device=device)
    mask = doc[:, None] == doc[None, :]
    mask &= idx[:, None] >= idx[None, :]
    return mask[None, None]


# ---- the loss -------------------------------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of cross_entropy(hidden @ weight^T, labels) / normalizer, a chunk of
    tokens at a time; the gradients of hidden and weight are formed chunk by chunk in the
    forward (softmax - one-hot) and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                normalizer: float) -> torch.Tensor:
        tokens = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, tokens, chunk):
            h = hidden[start:start + chunk]
            lab = labels[start:start + chunk]
            valid = lab != -100
            target = lab.clamp(min=0)
            logits = (h @ weight.t()).to(acc)  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, target[:, None])[:, 0]
            loss += ((lse - target_logit) * valid).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
                probs *= valid[:, None]
                g = probs.to(hidden.dtype)
                del probs, logits
                grad_hidden[start:start + chunk] = g @ weight
                grad_weight += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.normalizer = normalizer
        ctx.weight_dtype = weight.dtype
        return loss / normalizer

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss / ctx.normalizer
        dh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          normalizer: float) -> torch.Tensor:
    """Mean next-token loss of ``hidden`` ``[T, H]`` under the LM head ``weight`` ``[V, H]`` with
    ``labels`` ``[T]`` (-100: ignored), summed over the valid tokens and divided by
    ``normalizer`` (the valid tokens of all ranks). Scalar, fp32 (fp64 for fp64 inputs)."""
    if chunk < 1:
        raise ValueError(f"--loss-chunk: expected >= 1, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, int(chunk), float(normalizer))


# ---- attention timing ------------------------------------------------------------------------------


@dataclass
class _Span:
    """Markers of one attention call: CUDA events on a GPU, host times (seconds) on the CPU."""

    fwd_start: object = None
    fwd_end: object = None
    bwd_start: object = None
    bwd_end: object = None


class AttentionTimer:
    """Collects the spans of the attention calls of one step (see timed_attention)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: List[_Span] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start, end) -> float:
        if start is None or end is None:
            return 0.0
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    @property
    def forward_calls(self) -> int:
        return sum(1 for s in self.spans if s.fwd_end is not None)

    @property
    def backward_calls(self) -> int:
        return sum(1 for s in self.spans if s.bwd_end is not None)

    def total_ms(self) -> float:
        """Sum of the forward and backward intervals (synchronise the device first)."""
        return sum(self._ms(s.fwd_start, s.fwd_end) + self._ms(s.bwd_start, s.bwd_end) for s in self.spans)


class _EnterAttention(torch.autograd.Function):
    """Identity on (q, k, v): marks the call's start; its backward marks the end of the call's backward."""

    @staticmethod
    def forward(ctx, timer: AttentionTimer, span: _Span, q, k, v):
        span.fwd_start = timer.mark()
        ctx.timer, ctx.span = timer, span
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        ctx.span.bwd_end = ctx.timer.mark()
        return None, None, grad_q, grad_k, grad_v


class _ExitAttention(torch.autograd.Function):
    """Identity on the output: marks the call's end; its backward marks the start of the call's backward."""

    @staticmethod
    def forward(ctx, timer: AttentionTimer, span: _Span, out):
        span.fwd_end = timer.mark()
        ctx.timer, ctx.span = timer, span
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        ctx.span.bwd_start = ctx.timer.mark()
        return None, None, grad_out


def timing_wrapper(inner: Callable, timer: AttentionTimer) -> Callable:
    """A transformers attention function that runs `inner` between the two markers."""

    def timed(module, query, key, value, attention_mask, *args, **kwargs):
        span = _Span()
        timer.spans.append(span)
        query, key, value = _EnterAttention.apply(timer, span, query, key, value)
        out, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        return _ExitAttention.apply(timer, span, out), weights

    return timed


@contextlib.contextmanager
def timed_attention(name: str, timer: AttentionTimer) -> Iterator[None]:
    """Re-register transformers' attention function `name` wrapped by timing_wrapper; restore after."""
    import transformers

    interface = transformers.AttentionInterface()
    original = interface[name]
    transformers.AttentionInterface.register(name, timing_wrapper(original, timer))
    try:
        yield
    finally:
        transformers.AttentionInterface.register(name, original)


# ---- varlen_attn as a transformers attention function ------------------------------------------------


@dataclass
class _VarlenState:
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [B + 1] on the device
    max_seqlen: int = 0


_VARLEN = _VarlenState()


def _varlen_call_kwargs(fn: Callable, causal: bool, scale: Optional[float]) -> dict:
    """Keyword arguments of torch's varlen_attn for this torch version (window_size or is_causal)."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        raise RuntimeError("varlen_attn: this torch version takes neither window_size nor is_causal")
    if scale is not None:
        if "scale" not in params:
            raise RuntimeError("varlen_attn: this torch version takes no scale")
        kwargs["scale"] = scale
    return kwargs


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function running torch's varlen_attn on the packed row.

    query ``[1, Hq, T, D]``, key/value ``[1, Hk, T, D]`` -> ``([1, T, Hq, D], None)``, with the
    documents of the cu_seqlens set in ``_VARLEN`` before the step."""
    from torch.nn.attention.varlen import varlen_attn

    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"varlen_attn: expected batch size 1 and no attention_mask (a packed row), got batch "
                         f"{query.shape[0]}, mask {None if attention_mask is None else tuple(attention_mask.shape)}")
    if dropout or sliding_window is not None or softcap:
        raise NotImplementedError("varlen_attn: dropout, sliding_window and softcap are not used by this benchmark")
    if _VARLEN.cu_seqlens is None:
        raise RuntimeError("varlen_attn: no cu_seqlens set for this step")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attn(q, k, v, _VARLEN.cu_seqlens, _VARLEN.cu_seqlens, _VARLEN.max_seqlen, _VARLEN.max_seqlen,
                      **_varlen_call_kwargs(varlen_attn, bool(causal), scaling))
    return out.unsqueeze(0), None


# ---- the model --------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, layers: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight LlamaForCausalLM of `spec` with `layers` layers, built on `device` in `dtype`
    (attn_implementation "sdpa" until a row sets its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                         max_position_embeddings=1 << 20, tie_word_embeddings=False, attention_dropout=0.0,
                         use_cache=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype or p.device.type != device.type for p in model.parameters()):
        model.to(device=device, dtype=dtype)  # a transformers version that initialised elsewhere
    model.train()
    return model


def set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"attn_implementation: expected {name!r} after setting it, got "
                           f"{model.config._attn_implementation!r}")


def set_checkpointing(model, enabled: bool) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant) on or off."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@dataclass
class StepInputs:
    """What one step of one row feeds the model (the rank's tokens, on the device)."""

    input_ids: torch.Tensor  # [1, T_local]
    position_ids: torch.Tensor  # [1, T_local]
    labels: torch.Tensor  # [T_local]
    normalizer: int  # valid labels of all ranks
    attention_mask: Optional[torch.Tensor] = None  # [1, 1, T, T] bool for sdpa on packed rows
    before_step: Optional[Callable[[], None]] = None  # per-batch setup (update_ring_flash_attn_params)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # sdpa_kernel


class Trainer:
    """A model, its optimizer and the step (forward, chunked loss, backward, all-reduce, AdamW)."""

    def __init__(self, model, device: torch.device, loss_chunk: int, group=None, world_size: int = 1, lr=1e-5):
        self.model = model
        self.device = device
        self.loss_chunk = loss_chunk
        self.group = group
        self.world_size = world_size
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, **fused)

    def step(self, inputs: StepInputs) -> torch.Tensor:
        """One training step; returns the loss (detached, not synchronised)."""
        if inputs.before_step is not None:
            inputs.before_step()
        self.optimizer.zero_grad(set_to_none=True)
        with inputs.context():
            out = self.model.model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                                   attention_mask=inputs.attention_mask, use_cache=False)
            hidden = out.last_hidden_state[0]
            loss = chunked_cross_entropy(hidden, self.model.lm_head.weight, inputs.labels, self.loss_chunk,
                                         inputs.normalizer)
            loss.backward()
        if self.world_size > 1:
            import torch.distributed as dist

            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.group)
        self.optimizer.step()
        return loss.detach()

    def clear(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- rows -------------------------------------------------------------------------------------------


@dataclass
class RowPlan:
    spec: ModelSpec
    layers: int
    layout: Layout
    impl: str
    checkpointing: bool
    skip: str = ""  # why the row cannot run (known before running it)


@dataclass
class RowResult:
    plan: RowPlan
    status: str = "ok"
    step_ms: Optional[float] = None
    attn_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class Context:
    """Settings of the run every row shares."""

    device: torch.device
    dtype: torch.dtype
    group: object
    rank: int
    world_size: int
    warmup: int
    steps: int
    peak_tflops: float
    heads_k_stride: Optional[int]
    loss_chunk: int
    math_max_tokens: int
    env: Dict[str, str]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def skip_reason(impl: str, layout: Layout, device: torch.device, world_size: int, math_max_tokens: int,
                available: Dict[str, str]) -> str:
    """Why `impl` cannot run `layout` here ("" when it can). `available`: impl -> why it is not
    importable (for impls that are missing)."""
    if impl in available:
        return available[impl]
    if layout.tokens % world_size:
        return f"{layout.tokens} tokens are not divisible by the {world_size} ranks"
    if impl in OURS_IMPLS:
        if impl == "ours_zigzag_llama3" and any(n % (2 * world_size) for n in layout.doc_lens):
            return f"zigzag needs every document length to be a multiple of 2 * {world_size}"
        return ""
    if world_size > 1:
        return "single-GPU implementation (N > 1 runs the ours_* rows only)"
    if impl == "sdpa_math":
        if layout.tokens > math_max_tokens:
            return f"the math backend materialises T x T scores: {layout.tokens} tokens > --math-max-tokens " \
                   f"{math_max_tokens}"
        return ""
    if device.type != "cuda":
        return "needs a CUDA device"
    if impl == "sdpa_flash" and layout.packed:
        return "the flash backend takes no attention mask (packed documents need the block-diagonal mask)"
    if impl == "varlen_attn" and not layout.packed:
        return "varlen_attn rows are for packed documents"
    return ""


def unavailable_impls(impls: Sequence[str]) -> Dict[str, str]:
    """impl -> why it cannot be imported, for the requested impls that are missing."""
    out: Dict[str, str] = {}
    if "varlen_attn" in impls:
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError as e:
            out["varlen_attn"] = f"torch.nn.attention.varlen.varlen_attn is not importable ({_first_line(e)})"
    if "flash_attention_2" in impls and importlib.util.find_spec("flash_attn") is None:
        out["flash_attention_2"] = "the flash_attn package is not installed"
    return out


def plan_rows(specs_layers: Sequence[Tuple[ModelSpec, int]], layouts: Sequence[Layout], impls: Sequence[str],
              checkpointing: Sequence[bool], device: torch.device, world_size: int,
              math_max_tokens: int) -> List[RowPlan]:
    """Every (model, checkpointing, layout, impl) row in run order, with its skip reason if known."""
    missing = unavailable_impls(impls)
    rows = []
    for spec, layers in specs_layers:
        for ckpt in checkpointing:
            for layout in layouts:
                for impl in impls:
                    reason = skip_reason(impl, layout, device, world_size, math_max_tokens, missing)
                    rows.append(RowPlan(spec, layers, layout, impl, ckpt, reason))
    return rows


def attn_implementation_name(impl: str) -> str:
    if impl == "ours_llama3":
        return rfa.HF_ATTN_LLAMA3
    if impl == "ours_zigzag_llama3":
        return rfa.HF_ATTN_ZIGZAG_LLAMA3
    if impl in SDPA_IMPLS:
        return "sdpa"
    if impl == "varlen_attn":
        return VARLEN_ATTN_NAME
    if impl == "flash_attention_2":
        return "flash_attention_2"
    raise ValueError(f"--impls: unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")


def step_inputs(plan: RowPlan, ctx: Context) -> StepInputs:
    """The rank's inputs for the row (and the per-step setup its implementation needs)."""
    batch = make_batch(plan.layout.doc_lens, plan.spec.vocab, seed=1234)
    zigzag = plan.impl == "ours_zigzag_llama3"
    index = shard_index(batch, zigzag, ctx.rank, ctx.world_size)
    dev = ctx.device
    inputs = StepInputs(input_ids=batch.input_ids[index][None].to(dev),
                        position_ids=batch.position_ids[index][None].to(dev),
                        labels=batch.labels[index].to(dev), normalizer=batch.num_labels)
    if plan.impl in OURS_IMPLS:
        cu, group = batch.cu_seqlens, ctx.group
        inputs.before_step = lambda: rfa.update_ring_flash_attn_params(cu, group)
    elif plan.impl in SDPA_IMPLS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKEND_NAMES[plan.impl])
        inputs.context = lambda: sdpa_kernel([backend])
        if plan.layout.packed:
            inputs.attention_mask = block_causal_mask(plan.layout.doc_lens, dev)
    elif plan.impl == "varlen_attn":
        cu_dev, max_len = batch.cu_seqlens.to(dev), max(plan.layout.doc_lens)

        def set_varlen():
            _VARLEN.cu_seqlens, _VARLEN.max_seqlen = cu_dev, max_len

        inputs.before_step = set_varlen
    return inputs


def run_row(trainer: Trainer, plan: RowPlan, ctx: Context) -> RowResult:
    """Warm-up, timed steps, one attention-timing step. Raises on failure (the caller reports)."""
    result = RowResult(plan)
    dev = ctx.device
    name = attn_implementation_name(plan.impl)
    set_attn_implementation(trainer.model, name)
    set_checkpointing(trainer.model, plan.checkpointing)
    inputs = step_inputs(plan, ctx)

    def checked_step() -> None:
        loss = trainer.step(inputs)
        value = float(loss)  # synchronises
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value}")

    for _ in range(ctx.warmup):
        checked_step()
    synchronize(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(ctx.steps):
        synchronize(dev)
        t0 = time.perf_counter()
        checked_step()
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    if ctx.world_size > 1:  # the slowest rank's median sets the pace
        import torch.distributed as dist

        t = torch.tensor([step_s], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
        step_s = float(t)
    if dev.type == "cuda":
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(dev))], dtype=torch.float64, device=dev)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ctx.group)
        result.peak_mem_gb = float(peak) / 1e9
    flops = model_flops(plan.spec, plan.layers, plan.layout.doc_lens)
    result.step_ms = step_s * 1e3
    result.tokens_per_s, result.tflops, result.mfu = throughput(flops, plan.layout.tokens, step_s, ctx.world_size,
                                                                ctx.peak_tflops)
    # the attention's share of one more step, applied to the median step
    timer = AttentionTimer(dev)
    try:
        with timed_attention(name, timer):
            synchronize(dev)
            t0 = time.perf_counter()
            checked_step()
            synchronize(dev)
            timing_step_ms = (time.perf_counter() - t0) * 1e3
        if timer.forward_calls < plan.layers or timer.backward_calls < plan.layers:
            result.notes.append(f"attention split unavailable: the timed wrapper saw {timer.forward_calls} forward and "
                                f"{timer.backward_calls} backward calls for {plan.layers} layers")
        else:
            share = min(1.0, timer.total_ms() / timing_step_ms)
            result.attn_ms = share * result.step_ms
    except Exception as e:  # the timing is an extra: keep the row
        result.notes.append(f"attention split failed: {_first_line(e)}")
    if plan.impl in SDPA_IMPLS and plan.layout.packed:
        result.notes.append("4-D block-diagonal causal bool mask, K/V repeated to Hq heads by transformers")
    return result


def execute(trainer: Optional[Trainer], plan: RowPlan, ctx: Context) -> RowResult:
    """run_row with every failure turned into a status (out of memory: 'oom: ...'), then cleanup."""
    if plan.skip:
        return RowResult(plan, status=f"skipped: {plan.skip}")
    t0 = time.perf_counter()
    captured: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as captured:
            warnings.simplefilter("always")
            result = run_row(trainer, plan, ctx)
    except torch.cuda.OutOfMemoryError as e:
        result = RowResult(plan, status=f"oom: {_first_line(e)[:160]}")
    except Exception as e:
        result = RowResult(plan, status=f"failed: {_first_line(e)}")
        reasons = [str(w.message).strip().splitlines()[0] for w in captured
                   if "kernel" in str(w.message).lower() or "support" in str(w.message).lower()]
        if reasons:  # sdpa explains a refused backend in warnings
            result.notes.append("; ".join(dict.fromkeys(r[:200] for r in reasons[:3])))
    finally:
        if trainer is not None:
            trainer.clear()
        _VARLEN.cu_seqlens = None
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    result.wall_s = time.perf_counter() - t0
    return result


# ---- output -------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_row(result: RowResult, env: Dict[str, str], num_gpus: int) -> Dict[str, str]:
    p = result.plan
    rest = None if result.step_ms is None or result.attn_ms is None else result.step_ms - result.attn_ms
    return {
        "gpu": env["gpu"], "torch": env["torch"], "transformers": env["transformers"], "model": p.spec.name,
        "layers": str(p.layers), "num_gpus": str(num_gpus), "layout": p.layout.name,
        "docs": str(len(p.layout.doc_lens)),
        "seqlen": str(p.layout.tokens), "impl": p.impl, "checkpointing": "on" if p.checkpointing else "off",
        "status": result.status, "step_ms": _fmt(result.step_ms, 3), "attn_ms": _fmt(result.attn_ms, 3),
        "rest_ms": _fmt(rest, 3), "tokens_per_s": _fmt(result.tokens_per_s, 1), "tflops": _fmt(result.tflops, 2),
        "mfu": _fmt(result.mfu, 4), "peak_mem_gb": _fmt(result.peak_mem_gb, 2), "note": " | ".join(result.notes),
    }


def format_table(results: Sequence[RowResult]) -> str:
    head = (f"{'model':11s} {'L':>2s} {'ckpt':4s} {'layout':16s} {'tokens':>7s} {'impl':18s} {'step ms':>9s} "
            f"{'attn ms':>9s} {'attn%':>5s} {'tok/s':>9s} {'TFLOPS':>7s} {'MFU':>6s} {'peak GB':>7s}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        p = r.plan
        share = "" if r.attn_ms is None or not r.step_ms else f"{100 * r.attn_ms / r.step_ms:.0f}"
        lines.append(f"{p.spec.name:11s} {p.layers:2d} {'on' if p.checkpointing else 'off':4s} {p.layout.name:16s} "
                     f"{p.layout.tokens:7d} {p.impl:18s} {_fmt(r.step_ms, 1):>9s} {_fmt(r.attn_ms, 1):>9s} "
                     f"{share:>5s} {_fmt(r.tokens_per_s, 0):>9s} {_fmt(r.tflops, 1):>7s} "
                     f"{'' if r.mfu is None else f'{100 * r.mfu:.1f}%':>6s} {_fmt(r.peak_mem_gb, 1):>7s}  {r.status}")
    return "\n".join(lines)


def format_comparison(results: Sequence[RowResult]) -> str:
    """For every (model, layers, checkpointing, layout): each ours_* row's tokens/s over the best
    other implementation's."""
    groups: Dict[tuple, List[RowResult]] = {}
    for r in results:
        if r.status == "ok":
            p = r.plan
            groups.setdefault((p.spec.name, p.layers, p.checkpointing, p.layout.name, p.layout.tokens), []).append(r)
    lines = []
    for (model, layers, ckpt, layout, tokens), rows in groups.items():
        others = [r for r in rows if r.plan.impl not in OURS_IMPLS]
        if not others:
            continue
        best = max(others, key=lambda r: r.tokens_per_s)
        for r in rows:
            if r.plan.impl in OURS_IMPLS:
                lines.append(f"{model} L={layers} ckpt={'on' if ckpt else 'off'} {layout} ({tokens} tokens): "
                             f"{r.plan.impl} {r.tokens_per_s / best.tokens_per_s:.3f}x the best other "
                             f"({best.plan.impl}, {best.tokens_per_s:.0f} tok/s)")
    return "\n".join(lines)


def write_plot(results: Sequence[RowResult], path: str, env: Dict[str, str]) -> Optional[str]:
    """Tokens/s per layout and implementation, one panel per (model, layers, checkpointing).
    Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not importable ({_first_line(e)}): no plot"
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return "no row ran: no plot"
    panels: Dict[tuple, List[RowResult]] = {}
    for r in ok:
        panels.setdefault((r.plan.spec.name, r.plan.layers, r.plan.checkpointing), []).append(r)
    impls = [i for i in IMPLS if any(r.plan.impl == i for r in ok)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.5 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, ((model, layers, ckpt), rows) in zip(axes[:, 0], panels.items()):
        layouts = list(dict.fromkeys((r.plan.layout.name, r.plan.layout.tokens) for r in rows))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, key in enumerate(layouts):
                for r in rows:
                    if r.plan.impl == impl and (r.plan.layout.name, r.plan.layout.tokens) == key:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r.tokens_per_s / 1e3)
            if xs:
                ax.bar(xs, ys, width=width, label=impl)
        ax.set_xticks(range(len(layouts)))
        ax.set_xticklabels([f"{name}\n{tokens} tok" for name, tokens in layouts], fontsize=8)
        ax.set_ylabel("thousand tokens / s")
        ax.set_title(f"{model}, {layers} layers, checkpointing {'on' if ckpt else 'off'} - {env['gpu']}, "
                     f"torch {env['torch']}")
        ax.legend(fontsize=8, ncol=4)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def format_eta(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 60}:{s % 60:02d}"


# ---- setup -------------------------------------------------------------------------------------------


def init_distributed(device_type: str) -> Tuple[object, int, int, torch.device]:
    """(group, rank, world size, device). Under torchrun (WORLD_SIZE set): the env:// group over
    all ranks; otherwise a 1-rank group made in this process. NCCL on GPUs, gloo on the CPU."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if world_size > 1:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "transformers": tf_version}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                    help="model shapes (default llama3-8b)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: 4 for llama3-8b, 2 for llama3-70b)")
    ap.add_argument("--seqlens", nargs="*", type=int, default=None,
                    help=f"single-sequence rows (default {' '.join(map(str, DEFAULT_SEQLENS))}; none: --seqlens "
                         f"with no value)")
    ap.add_argument("--packed", nargs="*", default=None,
                    help=f"packed rows, KxL or 'mixed' (default {' '.join(DEFAULT_PACKED)}; none: --packed with no "
                         f"value)")
    ap.add_argument("--mixed-tokens", type=int, default=None, help="tokens of the 'mixed' packed row (default 32768)")
    ap.add_argument("--mixed-seed", type=int, default=0, help="seed of the mixed document lengths")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="implementations (default: all)")
    ap.add_argument("--checkpointing", choices=("on", "off", "both"), default=None,
                    help="activation checkpointing (default off)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row; the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before (default 2)")
    ap.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                    help="peak dense bf16 TFLOPS per GPU for the MFU (default 989: H100/H200 datasheet)")
    ap.add_argument("--heads-k-stride", type=int, default=None,
                    help="ours_*: KV heads per all-gather slice (default: all KV heads)")
    ap.add_argument("--loss-chunk", type=int, default=None, help="tokens per loss chunk (default 8192)")
    ap.add_argument("--math-max-tokens", type=int, default=4096, help="longest row sdpa_math runs (default 4096)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the rows that would start after this many seconds")
    ap.add_argument("--csv", default=None, help="CSV path (default benchmark/results/training_step.csv)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the CSV path with .png)")
    ap.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                    help="CPU, fp32, a tiny model (2 layers, hidden 64, 4 heads, 2 KV heads), 64-token rows, "
                         "ours_* and sdpa_math, checkpointing on and off: the whole pipeline for CI")
    args = ap.parse_args(argv)
    if args.tiny:
        defaults = dict(seqlens=[64], packed=["4x16", "2x32", "mixed"], mixed_tokens=64,
                        impls=["ours_llama3", "ours_zigzag_llama3", "sdpa_math"], checkpointing="both", steps=2,
                        warmup=1, loss_chunk=24)
    else:
        defaults = dict(models=["llama3-8b"], seqlens=list(DEFAULT_SEQLENS), packed=list(DEFAULT_PACKED),
                        mixed_tokens=32768, impls=list(IMPLS), checkpointing="off", steps=5, warmup=2,
                        loss_chunk=8192)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and args.models is not None:
        ap.error("--models: not with --tiny (the tiny model is fixed)")
    for name in ("steps", "layers", "loss_chunk", "mixed_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {value}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected >= 0, got {args.warmup}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device_type, dtype, unit = "cpu", torch.float32, 8
        specs = [TINY_MODEL]
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contend on a shared machine)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; --tiny runs the pipeline on the CPU with a tiny model", file=sys.stderr)
            return 2
        device_type, dtype, unit = "cuda", torch.bfloat16, MIXED_UNIT
        specs = [MODELS[m] for m in args.models]
    try:
        layouts = [single_layout(n) for n in args.seqlens]
        layouts += [parse_packed(t, args.mixed_tokens, args.mixed_seed, unit) for t in args.packed]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("error: the benchmark needs HuggingFace transformers (pip install transformers)", file=sys.stderr)
        return 2
    group, rank, world_size, device = init_distributed(device_type)
    lead = rank == 0
    env = environment(device)
    specs_layers = [(s, args.layers or s.default_layers) for s in specs]
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    plans = plan_rows(specs_layers, layouts, args.impls, ckpts, device, world_size, args.math_max_tokens)
    for spec, _ in specs_layers:
        if args.heads_k_stride is not None and spec.kv_heads % args.heads_k_stride:
            print(f"error: --heads-k-stride: expected a divisor of the {spec.kv_heads} KV heads of {spec.name}, got "
                  f"{args.heads_k_stride}", file=sys.stderr)
            return 2
    if "varlen_attn" in args.impls:
        import transformers

        transformers.AttentionInterface.register(VARLEN_ATTN_NAME, varlen_attention_forward)
    ctx = Context(device=device, dtype=dtype, group=group, rank=rank, world_size=world_size, warmup=args.warmup,
                  steps=args.steps, peak_tflops=args.peak_tflops, heads_k_stride=args.heads_k_stride,
                  loss_chunk=args.loss_chunk, math_max_tokens=args.math_max_tokens, env=env)

    csv_path = args.csv or os.path.join(_ROOT, "benchmark", "results", "training_step.csv")
    plot_path = args.plot or os.path.splitext(csv_path)[0] + ".png"
    csv_file = writer = None
    if lead:
        print(f"# training step benchmark: {env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"{world_size} rank(s) on {device.type}, {str(dtype).replace('torch.', '')}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        fused = "fused, " if device.type == "cuda" else ""
        print(f"# step: forward + chunked LM-head cross-entropy + backward + AdamW ({fused}states in the parameters' "
              f"dtype); {args.warmup} warm-up steps, median of {args.steps}")
        print(f"# MFU against {args.peak_tflops:g} TFLOPS per GPU (--peak-tflops; 989 = H100/H200 dense bf16 "
              f"datasheet); model FLOPs = 6 * params * tokens + attention over visible causal pairs per document")
        print("# sdpa_<backend>: that backend forced with torch.nn.attention.sdpa_kernel over the whole step (a row "
              "that ran ran on it); packed rows pass the block-diagonal causal mask")
        print("# attn ms: share of one extra step spent inside the attention calls and their backward (CUDA events; "
              "host clock on the CPU), times the median step")
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        csv_file = open(csv_path, "w", newline="")
        writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        csv_file.flush()

    results: List[RowResult] = []
    t_start = time.perf_counter()
    done_runs, run_time = 0, 0.0
    trainer: Optional[Trainer] = None
    current = None
    try:
        for i, plan in enumerate(plans, 1):
            elapsed = time.perf_counter() - t_start
            if not plan.skip and args.deadline_s is not None and elapsed > args.deadline_s:
                plan.skip = f"time budget: {elapsed:.0f} s elapsed > --deadline-s {args.deadline_s:g}"
            if not plan.skip and current != (plan.spec, plan.layers):
                trainer = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    rfa.register_hf_attention(group, heads_k_stride=args.heads_k_stride or plan.spec.kv_heads)
                    trainer = Trainer(build_model(plan.spec, plan.layers, dtype, device), device, args.loss_chunk,
                                      group, world_size)
                    current = (plan.spec, plan.layers)
                except Exception as e:  # e.g. out of memory for the model itself
                    current = None
                    plan.skip = f"model build failed: {_first_line(e)}"
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            result = execute(trainer, plan, ctx)
            results.append(result)
            if not plan.skip:
                done_runs += 1
                run_time += result.wall_s
            if lead:
                p = plan
                what = (f"{p.spec.name} L={p.layers} ckpt={'on' if p.checkpointing else 'off'} {p.layout.name} "
                        f"({p.layout.tokens} tok) {p.impl}")
                if result.status == "ok":
                    share = f", attn {100 * result.attn_ms / result.step_ms:.0f}%" if result.attn_ms is not None else ""
                    outcome = (f"{result.step_ms:.1f} ms/step, {result.tokens_per_s:.0f} tok/s, MFU "
                               f"{100 * result.mfu:.1f}%{share}")
                else:
                    outcome = result.status
                remaining = sum(1 for q in plans[i:] if not q.skip)
                eta = run_time / done_runs * remaining if done_runs else 0.0
                print(f"[{i}/{len(plans)}] {what}: {outcome} (elapsed {format_eta(time.perf_counter() - t_start)}, "
                      f"ETA {format_eta(eta)})", file=sys.stderr, flush=True)
                writer.writerow(csv_row(result, env, world_size))
                csv_file.flush()
    finally:
        if csv_file is not None:
            csv_file.close()
        trainer = None
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    if lead:
        print()
        print(format_table(results))
        comparison = format_comparison(results)
        if comparison:
            print("\n# ours vs the best other implementation (tokens/s)")
            print(comparison)
        noted = [r for r in results if r.notes]
        if noted:
            print("\n# notes")
            for r in noted:
                p = r.plan
                print(f"{p.spec.name} L={p.layers} ckpt={'on' if p.checkpointing else 'off'} {p.layout.name} {p.impl}: "
                      f"{' | '.join(r.notes)}")
        print(f"\nCSV: {csv_path}")
        why_not = write_plot(results, plot_path, env)
        print(f"plot: {plot_path}" if why_not is None else f"plot: {why_not}")
    ok = sum(1 for r in results if r.status == "ok")
    if lead:
        print(f"{ok} of {len(results)} rows ran", file=sys.stderr)
    return 0 if ok or not results else 1


if __name__ == "__main__":
    sys.exit(main())
