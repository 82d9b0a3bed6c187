"""The HuggingFace adapter (``ring_flash_attn.hf_adapter``) and the drop-in example, on the CPU.

A tiny random-weight ``LlamaForCausalLM`` (built from a ``LlamaConfig``: nothing is downloaded)
runs a packed batch (several sequences in one row, ``position_ids`` restarting at 0 with every
sequence) in one of three ways:

* our ``AttentionInterface`` implementations ``"ring_attn_llama3"`` (contiguous layout, odd
  sequence lengths) and ``"ring_attn_zigzag_llama3"`` (zigzag layout, ``zigzag_shard``);
* upstream's drop-in, ``substitute_hf_flash_attn`` + ``update_ring_flash_attn_params`` with the
  model dispatching to ``"flash_attention_2"``;

on 2 gloo ranks (each rank the same weights and its shard of the sequence), against the same
model with ``attn_implementation="eager"`` on the whole batch in one process. The loss is
``sum(logits * w)`` for a fixed random ``w``, so the ranks' losses add up to the reference loss:
the gathered logits and the all-reduced gradient of every parameter must match the reference.

Batches of padded rows (``[B, L]`` with a left- or right-padding ``attention_mask``, rows of
mixed lengths) run through the model the same way: every rank describes the global mask to
``update_ring_flash_attn_params(attention_mask=...)`` and runs its ``shard_padded_batch`` of the
rows; the reference is the eager model on each row's tokens alone (batch size 1, no padding: what
padding must not change; transformers' eager attention itself gives NaN for left-padded rows in
float64), with ``w`` zero at padding. Logits are compared at the tokens, gradients everywhere.

The attention features of other model families run the same way (``_FAMILIES``: tiny random-weight
models built from configs): Mistral and Qwen2 (a sliding-window layer; windows shorter than the
sequences), Gemma 2 (attention logit softcap and sliding layers), gpt-oss (sink logits ``s_aux`` and
sliding layers, 2 experts; float32, its expert matmul has no float64) and ModernBERT (non-causal,
with bidirectional local layers), against the eager model on each sequence alone; the sinks'
gradient (each rank's share, all-reduced) is among the parameters compared. A negative control
per feature drops it from the attention call and must be far off.

The HuggingFace tests skip (importorskip) only when transformers is missing; CI installs it
(scripts/setup_env.sh). The import-without-transformers test and the drop-in example test
(``examples/ring_flash_attn_drop_in.py`` under ``torch.distributed.run`` with 2 gloo processes)
need no transformers.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn import hf_adapter
from dist_harness import CachedSpawns, case_params, CaseWorker, free_port, rel_err
from cases import cu_seqlens

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 180
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXAMPLE = os.path.join(_ROOT, "examples", "ring_flash_attn_drop_in.py")

# max|x - ref| / max|ref| per tensor (logits; each parameter's gradient). The model's RMSNorm
# computes in fp32 whatever the dtype, so fp64 models carry fp32 roundings too.
_TOL = {"float64": 1e-5, "float32": 5e-5}

_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
               initializer_range=0.2)  # large enough that attention is far from uniform


def _case(case_id, path, scheme, batches, dtype="float64", hs=1, control=False):
    return dict(id=case_id, path=path, scheme=scheme, batches=[list(b) for b in batches], dtype=dtype, hs=hs,
                control=control)


# Schemes whose padded-batch cases use lengths that do not divide the world size: rows of 15
# tokens on 2 ranks, runs of tokens and of padding of any length. Empty while every scheme needs
# a row length divisible by N and zigzag needs runs that are multiples of 2N; add a scheme's name
# ("llama3", "zigzag") once it takes any length.
_ANY_LENGTH_SCHEMES: List[str] = []


def _padded(case_id, path, scheme, side, lens, any_lens, row_len=16, dtype="float64", hs=1, model_mask=True,
            use_cache=False, control=False):
    """A batch of padded rows: ``lens`` tokens per row in rows of ``row_len`` (lengths the scheme
    takes today), or ``any_lens`` in rows of 15 when the scheme is in _ANY_LENGTH_SCHEMES."""
    if scheme in _ANY_LENGTH_SCHEMES:
        lens, row_len = any_lens, 15
    return dict(id=case_id, path=path, scheme=scheme, padded=True, side=side, lens=list(lens), row_len=row_len,
                dtype=dtype, hs=hs, model_mask=model_mask, use_cache=use_cache, control=control)


# Tiny model families for the attention-feature cases: (config class, model class, config kwargs).
# Windows of 5 tokens (ModernBERT: 3 on each side) are shorter than the test sequences.
_COMMON = dict(_CONFIG)
_FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, use_sliding_window=True, sliding_window=5,
                                                      max_window_layers=1)),  # layer 1 slides
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_COMMON, head_dim=16, sliding_window=5,
                                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                                         query_pre_attn_scalar=16)),
    "gptoss": ("GptOssConfig", "GptOssForCausalLM", dict(_COMMON, head_dim=16, sliding_window=5, num_local_experts=2,
                                                         num_experts_per_tok=1,
                                                         rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=256, initializer_range=0.2, local_attention=6,
                        global_attn_every_n_layers=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        cls_token_id=3, sep_token_id=4)),
}


def _feature(case_id, family, path, scheme, lens, dtype="float64", hs=1, control=None, padded=None):
    """A model family with an attention feature on a packed row of sequences ``lens`` (or, with
    ``padded=(side, lens, row_len)``, a batch of padded rows). control: the attention keyword the
    negative control drops (``"is_causal"``: forced to True)."""
    case = dict(id=case_id, family=family, path=path, scheme=scheme, batches=[list(lens)], dtype=dtype, hs=hs,
                feature_control=control, control=False)
    if padded is not None:
        side, rows, row_len = padded
        case.update(padded=True, side=side, lens=list(rows), row_len=row_len, model_mask=True, use_cache=False)
    return case


FEATURE_CASES: List[dict] = [
    _feature("mistral-sliding-llama3", "mistral", "interface", "llama3", [5, 13, 3, 11], control="sliding_window"),
    _feature("qwen2-sliding-layer-zigzag", "qwen2", "interface", "zigzag", [8, 12, 4, 8], control="sliding_window"),
    _feature("gemma2-softcap-sliding-llama3", "gemma2", "interface", "llama3", [7, 2, 9, 14], control="softcap"),
    _feature("gemma2-softcap-sliding-zigzag-hs2", "gemma2", "interface", "zigzag", [12, 8, 4, 8], hs=2),
    _feature("gptoss-sinks-sliding-llama3-fp32", "gptoss", "interface", "llama3", [5, 13, 3, 11], dtype="float32",
             control="s_aux"),
    _feature("gptoss-sinks-sliding-zigzag-hs2-fp32", "gptoss", "interface", "zigzag", [8, 12, 4, 8],
             dtype="float32", hs=2),
    _feature("modernbert-noncausal-llama3", "modernbert", "interface", "llama3", [9, 7, 12, 4], control="is_causal"),
    _feature("modernbert-noncausal-zigzag", "modernbert", "interface", "zigzag", [8, 16, 4, 4]),
    _feature("mistral-sliding-substitute-fp32", "mistral", "substitute", "llama3", [7, 2, 9, 14], dtype="float32"),
    # padded rows through a windowed, soft-capped model
    _feature("gemma2-padded-left-llama3", "gemma2", "interface", "llama3", [], padded=("left", [16, 11, 5], 16)),
]

CASES: Dict[int, List[dict]] = {
    2: FEATURE_CASES + [
        # contiguous layout: odd lengths, a sequence crossing the rank boundary (token 16)
        _case("interface-llama3-odd-fp64", "interface", "llama3", [[5, 13, 3, 11]], control=True),
        # zigzag layout: every length a multiple of 2N = 4; two KV heads per all-gather slice
        _case("interface-zigzag-fp64-hs2", "interface", "zigzag", [[8, 12, 4, 8]], hs=2),
        # upstream's drop-in, two batches with update_ring_flash_attn_params in between
        _case("substitute-fa2-odd-fp32", "substitute", "llama3", [[7, 2, 9, 14], [3, 21, 1, 7]], dtype="float32",
              hs=2),
        # padded rows of mixed lengths. Contiguous layout: runs of any length (rank 0's half of
        # row 2 is all padding); with a negative control: the same rows without padding described
        _padded("padded-left-llama3", "interface", "llama3", "left", [16, 11, 5], [15, 8, 3], control=True),
        # use_cache=True in a training forward: transformers fills a cache nothing reads
        _padded("padded-right-llama3-cache", "interface", "llama3", "right", [7, 16, 2, 0], [7, 15, 2, 0],
                use_cache=True),
        # zigzag layout: runs of tokens and of padding multiples of 2N = 4 (a row of padding only)
        _padded("padded-left-zigzag-hs2", "interface", "zigzag", "left", [16, 12, 0, 4], [15, 9, 0, 4], hs=2),
        # the model is given no mask (update_ring_flash_attn_params carries it)
        _padded("padded-right-zigzag-nomask", "interface", "zigzag", "right", [8, 16, 4], [8, 15, 5],
                model_mask=False),
        # upstream's drop-in: transformers' own FlashAttention mask function hands the mask over
        _padded("padded-left-substitute-fp32", "substitute", "llama3", "left", [9, 16, 3], [9, 15, 2],
                dtype="float32"),
    ],
}


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")



def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x - ref| / max|ref| (inf for a shape mismatch, nan for a NaN in x)."""
    return rel_err(x, ref, floor=1e-30)


def _make_models(attn_implementation: str, dtype: torch.dtype, seed: int, family: str = "llama"):
    """(reference eager model, model for `attn_implementation`) with the same weights: a tiny
    Llama, or a model of ``_FAMILIES``. Each gets its own config: transformers writes the
    attention implementation into the config it is given."""
    import transformers

    if family == "llama":
        config_cls, model_cls, kwargs = transformers.LlamaConfig, transformers.LlamaForCausalLM, _CONFIG
    else:
        config_name, model_name, kwargs = _FAMILIES[family]
        config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype)
    if attn_implementation == "flash_attention_2":
        # transformers refuses to BUILD a "flash_attention_2" model without the flash_attn package
        # (a GPU machine with flash_attn has it); the dispatch at run time is what the
        # substitution changes, so build it eager and switch the name it dispatches on.
        model = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype)
        model.config._attn_implementation = "flash_attention_2"
    else:
        model = model_cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
        model = model.to(dtype)
    model.load_state_dict(ref.state_dict())
    return ref, model


def _batch(lens, dtype: torch.dtype, vocab: int, gen: torch.Generator):
    total = sum(lens)
    ids = torch.randint(0, vocab, (total,), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    w = torch.randn(total, vocab, generator=gen, dtype=torch.float64).to(dtype)
    return ids, pos, w


def _forward_loss(model, ids: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, attention_mask=None):
    """ids, pos: [T] (one row) or [B, L]; w: [..., vocab]. Returns (logits, sum(logits * w))."""
    one_row = ids.dim() == 1
    if one_row:
        ids, pos = ids[None], pos[None]
        attention_mask = None if attention_mask is None else attention_mask[None]
    logits = model(input_ids=ids, position_ids=pos, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[0] if one_row else logits
    return logits, (logits * w).sum()


def _grads(model) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


def _padded_rows(lens: List[int], row_len: int, side: str, dtype: torch.dtype, vocab: int, gen: torch.Generator):
    """A batch of padded rows: (mask [B, L] int64, ids [B, L], position_ids [B, L], w [B, L, vocab]
    zero at padding). Position ids count the tokens of each row from 0 (left padding as in
    generation; padding gets 0 or the last position, which no token sees)."""
    mask = torch.zeros(len(lens), row_len, dtype=torch.long)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, row_len - n:] = 1
        else:
            mask[b, :n] = 1
    ids = torch.randint(0, vocab, (len(lens), row_len), generator=gen)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    w = torch.randn(len(lens), row_len, vocab, generator=gen, dtype=torch.float64).to(dtype) * mask[..., None]
    return mask, ids, pos, w


def _rowwise_reference(ref, mask: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, w: torch.Tensor):
    """The eager model on each row's tokens alone (batch size 1, no padding, no mask): logits
    [B, L, vocab] (zeros at padding) and every parameter's gradient of sum(logits * w)."""
    ref.zero_grad(set_to_none=True)
    logits = torch.zeros(w.shape, dtype=w.dtype)
    loss = 0.0
    for b in range(mask.shape[0]):
        tokens = mask[b].bool()
        if tokens.any():
            row_logits, row_loss = _forward_loss(ref, ids[b, tokens], pos[b, tokens], w[b, tokens])
            logits[b, tokens] = row_logits.detach()
            loss = loss + row_loss
    loss.backward()
    return logits, _grads(ref)


# ---- 2 gloo ranks ----------------------------------------------------------------------------------


def _all_reduced_grad_error(model, ref_grads: Dict[str, torch.Tensor]) -> float:
    """The worst _rel over the parameters of the all-reduced (summed over ranks) gradient."""
    import torch.distributed as dist

    worst = 0.0
    for name, g in _grads(model).items():
        dist.all_reduce(g)
        err = _rel(g, ref_grads[name])
        worst = err if (err != err or err > worst) else worst  # NaN sticks
    return worst


def _gathered_rows(logits: torch.Tensor, mask: torch.Tensor, attn: str, world_size: int) -> torch.Tensor:
    """Every rank's logits [B, L/N, V] -> the global rows [B, L, V] (on every rank)."""
    import torch.distributed as dist

    parts = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(parts, logits.detach().contiguous())
    return hf_adapter.unshard_padded_batch(parts, mask, attn)


def _run_padded_case(case: dict, model, ref, attn: str, dtype: torch.dtype, seed: int, rank: int,
                     world_size: int) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    mask, ids, pos, w = _padded_rows(case["lens"], case["row_len"], case["side"], dtype, _CONFIG["vocab_size"], gen)
    ref_logits, ref_grads = _rowwise_reference(ref, mask, ids, pos, w)
    tokens = mask.bool()

    def shard(x):
        return hf_adapter.shard_padded_batch(x, mask, attn, rank, world_size)

    rfa.update_ring_flash_attn_params(attention_mask=mask)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=shard(ids), position_ids=shard(pos),
                attention_mask=shard(mask) if case["model_mask"] else None, use_cache=case["use_cache"])
    loss = (out.logits * shard(w)).sum()
    loss.backward()
    result = {"logits": _rel(_gathered_rows(out.logits, mask, attn, world_size)[tokens], ref_logits[tokens]),
              "grads": _all_reduced_grad_error(model, ref_grads)}
    if case["control"]:
        # negative control: the same rows with no padding described (every token also sees the
        # padding before it) must be far off, or the comparison above could not tell
        rfa.update_ring_flash_attn_params(attention_mask=torch.ones_like(mask))
        with torch.no_grad():
            unmasked = model(input_ids=shard(ids), position_ids=shard(pos), use_cache=False).logits
        result["control_logits"] = _rel(_gathered_rows(unmasked, mask, attn, world_size)[tokens], ref_logits[tokens])
    return result


def _per_sequence_reference(ref, lens: List[int], ids: torch.Tensor, pos: torch.Tensor, w: torch.Tensor):
    """The eager model on each sequence of a packed row alone: logits [T, vocab] and every
    parameter's gradient of sum(logits * w) (what packing must not change)."""
    ref.zero_grad(set_to_none=True)
    parts, loss, start = [], 0.0, 0
    for n in lens:
        logits, part = _forward_loss(ref, ids[start:start + n], pos[start:start + n], w[start:start + n])
        parts.append(logits.detach())
        loss = loss + part
        start += n
    loss.backward()
    return torch.cat(parts), _grads(ref)


class _DroppedFeature:
    """Within the block, the attention function of ``attn`` runs without the keyword ``name``
    (``"is_causal"``: forced to True): the negative control of a feature."""

    def __init__(self, attn: str, name: str):
        self.attn, self.name = attn, name

    def __enter__(self):
        import transformers

        self.original = transformers.AttentionInterface._global_mapping[self.attn]
        original, name = self.original, self.name

        def without(module, query, key, value, attention_mask, **kwargs):
            if name == "is_causal":
                kwargs["is_causal"] = True
            else:
                kwargs.pop(name, None)
            return original(module, query, key, value, attention_mask, **kwargs)

        transformers.AttentionInterface.register(self.attn, without)
        return self

    def __exit__(self, *exc):
        import transformers

        transformers.AttentionInterface.register(self.attn, self.original)
        return False


def _run_feature_case(case: dict, model, ref, attn: str, dtype: torch.dtype, seed: int, rank: int,
                      world_size: int) -> Dict[str, float]:
    """A packed row through a model of ``_FAMILIES``: logits and every parameter's gradient on 2
    ranks against the eager model on each sequence alone (and the negative control)."""
    import torch.distributed as dist

    lens = case["batches"][0]
    cu = cu_seqlens(lens)
    gen = torch.Generator().manual_seed(seed)
    ids, pos, w = _batch(lens, dtype, _CONFIG["vocab_size"], gen)
    ref_logits, ref_grads = _per_sequence_reference(ref, lens, ids, pos, w)
    T = ids.shape[0] // world_size
    if case["scheme"] == "llama3":
        shard = lambda x: x[rank * T:(rank + 1) * T]  # noqa: E731
    else:
        shard = lambda x: rfa.zigzag_shard(x, cu, rank, world_size)  # noqa: E731

    def gathered(logits):
        if case["scheme"] == "llama3":
            parts = [torch.empty_like(logits) for _ in range(world_size)]
            dist.all_gather(parts, logits.detach().contiguous())
            return torch.cat(parts)
        return rfa.zigzag_gather(logits.detach(), cu)

    rfa.update_ring_flash_attn_params(cu, None)
    model.zero_grad(set_to_none=True)
    logits, loss = _forward_loss(model, shard(ids), shard(pos), shard(w))
    loss.backward()
    result = {"logits[0]": _rel(gathered(logits), ref_logits), "grads[0]": _all_reduced_grad_error(model, ref_grads)}
    if case["feature_control"]:
        with _DroppedFeature(attn, case["feature_control"]), torch.no_grad():
            dropped, _ = _forward_loss(model, shard(ids), shard(pos), shard(w))
        result["control_logits"] = _rel(gathered(dropped), ref_logits)
    return result


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    import torch.distributed as dist

    dtype = getattr(torch, case["dtype"])
    if case["path"] == "interface":
        names = rfa.register_hf_attention(None, case["hs"])
        attn = names[0] if case["scheme"] == "llama3" else names[1]
    else:
        rfa.substitute_hf_flash_attn(None, case["hs"])
        attn = "flash_attention_2"
    ref, model = _make_models(attn, dtype, seed, case.get("family", "llama"))
    if case.get("family") and not case.get("padded"):
        try:
            return _run_feature_case(case, model, ref, attn, dtype, seed, rank, world_size)
        finally:
            hf_adapter.restore_hf_flash_attn()
    if case.get("padded"):
        try:
            return _run_padded_case(case, model, ref, attn, dtype, seed, rank, world_size)
        finally:
            hf_adapter.restore_hf_flash_attn()
    gen = torch.Generator().manual_seed(seed)
    result: Dict[str, float] = {}
    try:
        for i, lens in enumerate(case["batches"]):
            cu = cu_seqlens(lens)
            ids, pos, w = _batch(lens, dtype, _CONFIG["vocab_size"], gen)
            ref.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            ref_logits, ref_loss = _forward_loss(ref, ids, pos, w)
            ref_loss.backward()
            ref_grads = _grads(ref)

            T = ids.shape[0] // world_size
            if case["scheme"] == "llama3":
                shard = lambda x: x[rank * T:(rank + 1) * T]  # noqa: E731
            else:
                shard = lambda x: rfa.zigzag_shard(x, cu, rank, world_size)  # noqa: E731
            rfa.update_ring_flash_attn_params(cu, None)
            logits, loss = _forward_loss(model, shard(ids), shard(pos), shard(w))
            loss.backward()
            if case["scheme"] == "llama3":
                parts = [torch.empty_like(logits) for _ in range(world_size)]
                dist.all_gather(parts, logits.detach().contiguous())
                gathered = torch.cat(parts)
            else:
                gathered = rfa.zigzag_gather(logits.detach(), cu)
            result[f"logits[{i}]"] = _rel(gathered, ref_logits)
            result[f"grads[{i}]"] = _all_reduced_grad_error(model, ref_grads)
            if case["control"]:
                # negative control: attention over the rank's own tokens only (no context
                # parallelism) must be far off, or the comparison above could not tell
                with torch.no_grad():
                    local_logits, _ = _forward_loss(ref, shard(ids), shard(pos), shard(w))
                parts = [torch.empty_like(local_logits) for _ in range(world_size)]
                dist.all_gather(parts, local_logits.detach().contiguous())
                result["control_logits"] = _rel(torch.cat(parts), ref_logits)
    finally:
        hf_adapter.restore_hf_flash_attn()
    return result


_results = CachedSpawns(CaseWorker(CASES, _run_case), _SEED, "hf_adapter", _SPAWN_TIMEOUT_S)


def _params(padded: bool, features: bool = False) -> list:
    return [p for p in case_params(CASES) if bool(p.values[1].get("padded")) == padded
            and bool(p.values[1].get("family")) == features]


def _assert_every_rank_within(world_size: int, case: dict, spawn_root: str, quantities, control: str,
                              control_failure: str) -> None:
    """Every rank ran `case` without an exception and its `quantities` are within the dtype's
    tolerance; when case[control] is set (a negative control ran), its logits are more than 100x
    the tolerance away, or the test fails with control_failure (formatted with the control's
    value as `what` and its error as `err`)."""
    _transformers()
    per_rank = _results(world_size, spawn_root)
    tol = _TOL[case["dtype"]]
    for r, res in enumerate(per_rank):
        got = res["cases"][case["id"]]
        assert "exception" not in got, f"rank {r} of {world_size} (seed {_SEED}):\n{got.get('exception')}"
        for what in quantities:
            assert got[what] <= tol, (f"rank {r}, case {case['id']} (seed {_SEED}): {what} max|err| / max|ref| = "
                                      f"{got[what]:.3e} > {tol:.1e}")
        if case[control]:
            assert got["control_logits"] > 100 * tol, (
                f"rank {r} (seed {_SEED}): "
                + control_failure.format(what=case[control], err=f"{got['control_logits']:.3e}"))


@pytest.mark.parametrize("world_size,case", _params(padded=False, features=True) + _params(padded=True, features=True))
def test_hf_attention_features_context_parallel_matches_eager(world_size, case, spawn_root):
    """Sliding windows, softcap, sinks and non-causal attention of tiny Mistral / Qwen2 / Gemma 2 /
    gpt-oss / ModernBERT models on 2 ranks: logits and every parameter's gradient (the sinks'
    included) against the eager model on each sequence (row) alone; dropping the feature from
    the attention call must be far off."""
    _assert_every_rank_within(
        world_size, case, spawn_root, ("logits", "grads") if case.get("padded") else ("logits[0]", "grads[0]"),
        "feature_control", "without {what} the logits are within {err} of the reference: the comparison cannot "
        "detect a dropped feature")


@pytest.mark.parametrize("world_size,case", _params(padded=False))
def test_hf_llama_context_parallel_matches_eager(world_size, case, spawn_root):
    quantities = [f"{what}[{i}]" for i in range(len(case["batches"])) for what in ("logits", "grads")]
    _assert_every_rank_within(
        world_size, case, spawn_root, quantities, "control", "attention over local tokens only gave logits within "
        "{err} of the reference: the comparison cannot detect missing context")


@pytest.mark.parametrize("world_size,case", _params(padded=True))
def test_hf_llama_padded_batch_context_parallel_matches_eager(world_size, case, spawn_root):
    """A batch of padded rows through the model on 2 ranks: logits at the tokens and every
    parameter's gradient against the eager model on each row alone."""
    _assert_every_rank_within(
        world_size, case, spawn_root, ("logits", "grads"), "control", "the rows without their padding described "
        "gave logits within {err} of the reference: the comparison cannot detect ignored padding")


# ---- single process -----------------------------------------------------------------------------------


@pytest.fixture
def clean_adapter():
    """Each test starts and ends without batch metadata and without a substitution."""
    hf_adapter.restore_hf_flash_attn()
    hf_adapter._STATE.batch = None
    hf_adapter.use_ring_attn(True)
    yield hf_adapter
    hf_adapter.restore_hf_flash_attn()
    hf_adapter._STATE.batch = None
    hf_adapter.use_ring_attn(True)


@pytest.mark.parametrize("attn", ["ring_attn_llama3", "ring_attn_zigzag_llama3", "flash_attention_2"])
def test_single_process_matches_eager(attn, clean_adapter):
    """World size 1 (no process group): every path is plain attention over the packed batch."""
    _transformers()
    if attn == "flash_attention_2":
        rfa.substitute_hf_flash_attn(None, 1)
    else:
        # registry order: the all-gather schemes first (the all-to-all ones follow)
        assert rfa.register_hf_attention(None, 2)[:2] == (rfa.HF_ATTN_LLAMA3, rfa.HF_ATTN_ZIGZAG_LLAMA3)
    ref, model = _make_models(attn, torch.float64, _SEED)
    lens = [6, 2, 10, 4]  # even lengths: the zigzag layout of one rank takes them too
    ids, pos, w = _batch(lens, torch.float64, _CONFIG["vocab_size"], torch.Generator().manual_seed(_SEED))
    ref_logits, ref_loss = _forward_loss(ref, ids, pos, w)
    ref_loss.backward()
    rfa.update_ring_flash_attn_params(cu_seqlens(lens), None)
    logits, loss = _forward_loss(model, ids, pos, w)
    loss.backward()
    assert _rel(logits, ref_logits) <= _TOL["float64"]
    ref_grads = _grads(ref)
    for name, g in _grads(model).items():
        assert _rel(g, ref_grads[name]) <= _TOL["float64"], name
    # the packed reference itself keeps sequences apart: its first sequence alone gives the same logits
    alone, _ = _forward_loss(ref, ids[:6], pos[:6], w[:6])
    assert _rel(alone, ref_logits[:6]) <= _TOL["float64"]


def _padded_models(attn: str, seed: int):
    """(eager reference, model for `attn`) in float64, after registering/substituting `attn`."""
    _transformers()
    if attn == "flash_attention_2":
        rfa.substitute_hf_flash_attn(None, 1)
    else:
        rfa.register_hf_attention(None, 1)
    return _make_models(attn, torch.float64, seed)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["ring_attn_llama3", "ring_attn_zigzag_llama3", "flash_attention_2"])
def test_single_process_padded_batch_matches_eager(attn, side, clean_adapter):
    """World size 1: a batch of padded rows of mixed lengths (one without padding) through the
    model, with the model given the mask, against the eager model on each row alone."""
    ref, model = _padded_models(attn, _SEED)
    gen = torch.Generator().manual_seed(_SEED)
    mask, ids, pos, w = _padded_rows([6, 16, 2], 16, side, torch.float64, _CONFIG["vocab_size"], gen)
    ref_logits, ref_grads = _rowwise_reference(ref, mask, ids, pos, w)
    rfa.update_ring_flash_attn_params(attention_mask=mask.bool())  # bool as well as int64
    logits, loss = _forward_loss(model, ids, pos, w, attention_mask=mask)
    loss.backward()
    tokens = mask.bool()
    assert _rel(logits[tokens], ref_logits[tokens]) <= _TOL["float64"]
    grads = _grads(model)
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) <= _TOL["float64"], name


def test_padding_mask_reaches_the_adapter_and_changes_the_result(clean_adapter):
    """Guards against a padding mask that is silently dropped on its way through the model."""
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    ref, model = _padded_models(rfa.HF_ATTN_LLAMA3, _SEED)
    for name in (rfa.HF_ATTN_LLAMA3, rfa.HF_ATTN_ZIGZAG_LLAMA3):
        assert AttentionMaskInterface._global_mapping[name] is hf_adapter._transformers_mask
        assert transformers.AttentionInterface._global_mapping[name].__name__ == f"{name}_attention_forward"
    gen = torch.Generator().manual_seed(_SEED)
    mask, ids, pos, w = _padded_rows([10, 4], 16, "left", torch.float64, _CONFIG["vocab_size"], gen)
    tokens = mask.bool()
    ref_logits, _ = _rowwise_reference(ref, mask, ids, pos, w)
    rfa.update_ring_flash_attn_params(attention_mask=mask)
    with torch.no_grad():
        padded, _ = _forward_loss(model, ids, pos, w, attention_mask=mask)
    assert _rel(padded[tokens], ref_logits[tokens]) <= _TOL["float64"]
    # the same rows with no padding described: the tokens also see the padding before them
    rfa.update_ring_flash_attn_params(attention_mask=torch.ones_like(mask))
    with torch.no_grad():
        unpadded, _ = _forward_loss(model, ids, pos, w)
    assert _rel(unpadded[tokens], ref_logits[tokens]) > 100 * _TOL["float64"]
    # ... and a model given the padding mask now refuses it: the mask reached the attention
    with pytest.raises(ValueError, match="attention_mask: the model's mask differs"):
        _forward_loss(model, ids, pos, w, attention_mask=mask)
    # a packed row (cu_seqlens) has no padding: a mask that hides tokens is refused too
    rfa.update_ring_flash_attn_params(cu_seqlens([16]))
    with pytest.raises(ValueError, match="hides tokens"):
        _forward_loss(model, ids[1], pos[1], w[1], attention_mask=mask[1])
    # ... while an all-ones mask (what a tokenizer returns for a packed row) is accepted
    packed, _ = _forward_loss(model, ids[1], torch.arange(16), w[1], attention_mask=torch.ones(16, dtype=torch.long))
    alone, _ = _forward_loss(ref, ids[1], torch.arange(16), w[1])
    assert _rel(packed, alone) <= _TOL["float64"]


def test_attention_function_zeros_padding_outputs(clean_adapter):
    """The attention outputs at padding are zeros, at tokens attention over the row's tokens only."""
    _transformers()
    rfa.register_hf_attention(None, 1)
    q, k, v = _qkv(B=2, S=12)
    mask = torch.tensor([[0] * 4 + [1] * 8, [1] * 10 + [0] * 2])  # even runs: zigzag on one rank takes them
    rfa.update_ring_flash_attn_params(attention_mask=mask)
    for fwd in (hf_adapter.llama3_attention_forward, hf_adapter.zigzag_llama3_attention_forward):
        out, _ = fwd(_Attn(), q, k, v, mask.bool(), scaling=0.3)
        assert out.shape == (2, 12, 4, 8)
        assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
        assert torch.equal(out[1, 10:], torch.zeros_like(out[1, 10:]))
        for b, cols in ((0, slice(4, 12)), (1, slice(0, 10))):
            n = cols.stop - cols.start
            cu = cu_seqlens([n])
            ref = rfa.flash_attn_varlen_func(q[b, :, cols].transpose(0, 1), k[b, :, cols].transpose(0, 1),
                                             v[b, :, cols].transpose(0, 1), cu, cu, n, n, softmax_scale=0.3,
                                             causal=True)
            assert _rel(out[b, cols], ref) <= 1e-12
    # is_causal=False (an encoder): every token sees its row's tokens, none of the padding
    out_nc, _ = hf_adapter.llama3_attention_forward(_Attn(), q, k, v, None, is_causal=False)
    ref_nc = rfa.flash_attn_varlen_func(q[0, :, 4:].transpose(0, 1), k[0, :, 4:].transpose(0, 1),
                                        v[0, :, 4:].transpose(0, 1), cu_seqlens([8]), cu_seqlens([8]), 8, 8,
                                        causal=False)
    assert _rel(out_nc[0, 4:], ref_nc) <= 1e-12 and torch.equal(out_nc[0, :4], torch.zeros_like(out_nc[0, :4]))
    with pytest.raises(ValueError, match="expected batch size 2"):
        hf_adapter.llama3_attention_forward(_Attn(), *_qkv(B=1, S=12), None)
    with pytest.raises(ValueError, match="expected the rank's padding mask"):
        hf_adapter.llama3_attention_forward(_Attn(), q, k, v, mask[:1].bool())


def test_kv_cache_decode_raises_and_use_cache_forward_runs(clean_adapter):
    _transformers()
    ref, model = _padded_models(rfa.HF_ATTN_ZIGZAG_LLAMA3, _SEED)
    gen = torch.Generator().manual_seed(_SEED)
    mask, ids, pos, w = _padded_rows([8, 12], 16, "left", torch.float64, _CONFIG["vocab_size"], gen)
    rfa.update_ring_flash_attn_params(attention_mask=mask)
    without = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    # use_cache=True in a training forward (the Llama default) runs, and transformers fills a cache
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True)
    assert torch.equal(out.logits, without)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache is not None and cache.get_seq_length() == 16
    # a decoding step over that cache: the keys outnumber the queries
    with pytest.raises(NotImplementedError, match="KV cache.*use_cache=False"):
        model(input_ids=ids[:, :1], position_ids=pos[:, -1:] + 1, attention_mask=torch.cat([mask, mask[:, :1]], 1),
              cache=cache, use_cache=True)


def test_arbitrary_masks_raise(clean_adapter):
    """A 4-D mask (passed through by transformers unchanged) and a mask pattern a model adds to
    the causal one are refused by name, never dropped."""
    _transformers()
    from transformers.masking_utils import create_causal_mask

    ref, model = _padded_models(rfa.HF_ATTN_LLAMA3, _SEED)
    gen = torch.Generator().manual_seed(_SEED)
    mask, ids, pos, w = _padded_rows([8, 12], 16, "right", torch.float64, _CONFIG["vocab_size"], gen)
    rfa.update_ring_flash_attn_params(attention_mask=mask)
    four_d = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="attention_mask: expected None or a 2-D .* got a 4-D"):
        model(input_ids=ids, position_ids=pos, attention_mask=four_d, use_cache=False)
    embeds = torch.zeros(2, 16, _CONFIG["hidden_size"], dtype=torch.float64)
    # what transformers' mask creation hands our attention: the 2-D padding mask itself
    assert torch.equal(create_causal_mask(model.config, embeds, mask, None, pos), mask.bool())
    with pytest.raises(NotImplementedError, match="own pattern"):
        create_causal_mask(model.config, embeds, mask, None, pos, or_mask_function=lambda b, h, q, kv: kv < 2)
    with pytest.raises(NotImplementedError, match="own pattern"):
        create_causal_mask(model.config, embeds, mask, None, pos, and_mask_function=lambda b, h, q, kv: kv > 2)


def test_update_params_padded_errors(clean_adapter):
    with pytest.raises(ValueError, match="expected exactly one .* got neither"):
        rfa.update_ring_flash_attn_params()
    with pytest.raises(ValueError, match="expected exactly one .* got both"):
        rfa.update_ring_flash_attn_params([0, 4], attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention_mask: expected a 2-D"):
        rfa.update_ring_flash_attn_params(attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="entries 0 \\(padding\\) or 1 \\(token\\), got 2 at \\[1, 3\\]"):
        rfa.update_ring_flash_attn_params(attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 2]]))
    with pytest.raises(ValueError, match="one run of tokens per row.* 2 runs of tokens in row 1"):
        rfa.update_ring_flash_attn_params(attention_mask=torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="row length divisible by the world size 2"):
        hf_adapter._mask_rows(torch.ones(2, 5), 2)
    # the zigzag layout's rule applies to each run, reported when that scheme runs on the batch
    rfa.register_hf_attention(None, 1)
    rfa.update_ring_flash_attn_params(attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    q, k, v = _qkv(B=2, S=4)
    out, _ = hf_adapter.llama3_attention_forward(_Attn(), q, k, v, None)  # the contiguous layout takes it
    assert out.shape == (2, 4, 4, 8)
    with pytest.raises(ValueError, match="zigzag layout cannot take this batch.*multiple of 2 \\* world_size = 2.*"
                       "row 0: padding 1 \\+ tokens 3"):
        hf_adapter.zigzag_llama3_attention_forward(_Attn(), q, k, v, None)


def test_long_padding_is_cut_into_pieces(clean_adapter):
    """Padding runs longer than _PADDING_PIECE become several sequences (linear cost), with the
    same outputs at the tokens and zeros at padding."""
    _transformers()
    piece = hf_adapter._PADDING_PIECE
    assert hf_adapter._row_sequences((0, 300), 300, piece) == [0, 300]  # tokens are never cut
    assert hf_adapter._row_sequences((290, 10), 300, piece) == [0, piece, 2 * piece, 290, 300]
    assert hf_adapter._row_sequences((0, 20), 300, piece) == [0, 20, 20 + piece, 20 + 2 * piece, 300]
    assert hf_adapter._row_sequences((0, 0), 300, piece) == [0, piece, 2 * piece, 300]
    rfa.register_hf_attention(None, 1)
    S = 2 * piece + 40
    q, k, v = _qkv(B=2, S=S)
    mask = torch.zeros(2, S, dtype=torch.long)
    mask[0, S - 24:] = 1  # left padding of 2 pieces + 16
    mask[1, :30] = 1  # right padding
    rfa.update_ring_flash_attn_params(attention_mask=mask)
    for name, fwd in (("llama3", hf_adapter.llama3_attention_forward),
                      ("zigzag_llama3", hf_adapter.zigzag_llama3_attention_forward)):
        calls = hf_adapter._STATE.batch.prepared[name].calls
        assert max(metadata[True][2] for _, _, metadata in calls) <= piece  # max_seqlen_q
        out, _ = fwd(_Attn(), q, k, v, mask)
        for b, cols in ((0, slice(S - 24, S)), (1, slice(0, 30))):
            n = cols.stop - cols.start
            cu = cu_seqlens([n])
            ref = rfa.flash_attn_varlen_func(q[b, :, cols].transpose(0, 1), k[b, :, cols].transpose(0, 1),
                                             v[b, :, cols].transpose(0, 1), cu, cu, n, n, causal=True)
            assert _rel(out[b, cols], ref) <= 1e-12, name
        assert torch.equal(out[~mask.bool()], torch.zeros_like(out[~mask.bool()])), name


@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_and_unshard_padded_batch(world_size):
    mask = torch.zeros(3, 16, dtype=torch.long)
    mask[0, 4:] = 1  # left padding: runs 4 + 12
    mask[1, :8] = 1  # right padding: runs 8 + 8
    mask[2] = 1  # no padding
    x = torch.randn(3, 16, 5)
    for attn in ("ring_attn_llama3", "flash_attention_2", "ring_attn_zigzag_llama3"):
        if attn == "ring_attn_zigzag_llama3" and world_size == 4:
            mask = torch.zeros(3, 16, dtype=torch.long)
            mask[0, 8:] = 1  # runs that are multiples of 2N = 8
            mask[1, :8] = 1
            mask[2] = 1
        shards = [hf_adapter.shard_padded_batch(x, mask, attn, r, world_size) for r in range(world_size)]
        assert all(s.shape == (3, 16 // world_size, 5) for s in shards)
        assert torch.equal(hf_adapter.unshard_padded_batch(shards, mask, attn), x)
    # the columns each rank holds, written out for 2 ranks
    mask = torch.tensor([[0] * 4 + [1] * 12])
    cols = torch.arange(16)[None]
    assert hf_adapter.shard_padded_batch(cols, mask, "ring_attn_llama3", 1, 2).tolist() == [list(range(8, 16))]
    # zigzag: of the padding run (4 columns) chunks 0 and 3, of the token run (12) chunks 0 and 3
    assert hf_adapter.shard_padded_batch(cols, mask, "ring_attn_zigzag_llama3", 0, 2).tolist() == [
        [0, 3, 4, 5, 6, 13, 14, 15]]
    # zigzag: a run that is not a multiple of 2N = 4 (padding 3 + tokens 13) is refused, by every rank and by
    # unshard, rather than cut into parts longer than L / N (the any-length shard would pad each run)
    uncuttable = torch.tensor([[0] * 3 + [1] * 13])
    refusal = ("zigzag layout cannot cut this batch: a row has a sequence of 3 tokens .*multiple of 2 \\* "
               "world_size = 4.*row 0: padding 3 \\+ tokens 13")
    for r in range(2):
        with pytest.raises(ValueError, match=refusal):
            hf_adapter.shard_padded_batch(cols, uncuttable, "ring_attn_zigzag_llama3", r, 2)
    with pytest.raises(ValueError, match=refusal):
        hf_adapter.unshard_padded_batch([cols[:, :8], cols[:, 8:]], uncuttable, "ring_attn_zigzag_llama3")
    assert hf_adapter.shard_padded_batch(cols, uncuttable, "ring_attn_llama3", 1, 2).tolist() == [list(range(8, 16))]
    with pytest.raises(ValueError, match="x: expected a tensor \\[batch, seq, ...\\]"):
        hf_adapter.shard_padded_batch(torch.zeros(2, 16), mask, "ring_attn_llama3", 0, 2)
    with pytest.raises(ValueError, match="rank: expected an int in \\[0, 2\\)"):
        hf_adapter.shard_padded_batch(cols, mask, "ring_attn_llama3", 2, 2)


def test_substitute_restore_and_switch(clean_adapter):
    transformers = _transformers()
    import transformers.modeling_flash_attention_utils as fa_utils

    mapping = transformers.AttentionInterface._global_mapping
    original_attention, original_forward = mapping["flash_attention_2"], fa_utils._flash_attention_forward
    rfa.substitute_hf_flash_attn(None, 1)
    rfa.substitute_hf_flash_attn(None, 1)  # idempotent: the originals are kept once
    assert mapping["flash_attention_2"] is hf_adapter._substituted_attention
    assert fa_utils._flash_attention_forward is hf_adapter._substituted_flash_attention_forward

    # the replaced private function: [1, T, H, D] in and out, the contiguous scheme
    gen = torch.Generator().manual_seed(_SEED)
    q = torch.randn(1, 12, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    rfa.update_ring_flash_attn_params(cu_seqlens([5, 7]), None)
    out = fa_utils._flash_attention_forward(q, k, v, None, 12, True)
    ref = rfa.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens([5, 7]), cu_seqlens([5, 7]), 7, 7, causal=True)
    assert out.shape == (1, 12, 4, 8) and _rel(out[0], ref) <= 1e-12

    # switched off: both entry points go to transformers' originals (recorded calls)
    calls = []
    hf_adapter._STATE.original_flash_forward = lambda *a, **kw: calls.append("forward") or "orig"
    hf_adapter._STATE.original_attention = lambda *a, **kw: calls.append("attention") or ("orig", None)
    rfa.use_ring_attn(False)
    assert fa_utils._flash_attention_forward(q, k, v, None, 12, True) == "orig"
    assert mapping["flash_attention_2"](torch.nn.Module(), q, k, v, None)[0] == "orig"
    assert calls == ["forward", "attention"]
    rfa.use_ring_attn(True)
    hf_adapter._STATE.original_attention, hf_adapter._STATE.original_flash_forward = (original_attention,
                                                                                      original_forward)
    rfa.restore_hf_flash_attn()
    assert mapping["flash_attention_2"] is original_attention
    assert fa_utils._flash_attention_forward is original_forward


class _Attn(torch.nn.Module):
    is_causal = True


def _qkv(B=1, S=12, Hq=4, Hk=2, D=8):
    gen = torch.Generator().manual_seed(_SEED)
    return (torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64),
            torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64),
            torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64))


def test_attention_function_output_and_errors(clean_adapter):
    _transformers()
    rfa.register_hf_attention(None, 1)
    fwd, zz = hf_adapter.llama3_attention_forward, hf_adapter.zigzag_llama3_attention_forward
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="update_ring_flash_attn_params"):
        fwd(_Attn(), q, k, v, None)

    rfa.update_ring_flash_attn_params(torch.tensor([0, 5, 12]), None)  # int64 is accepted
    out, weights = fwd(_Attn(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (1, 12, 4, 8)  # [B, S, H, D]
    cu = cu_seqlens([5, 7])
    ref = rfa.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                     7, 7, softmax_scale=0.3, causal=True)
    assert _rel(out[0], ref) <= 1e-12
    # is_causal=False (an encoder): every query sees its whole sequence
    out_nc, _ = fwd(_Attn(), q, k, v, None, is_causal=False)
    ref_nc = rfa.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                        7, 7, causal=False)
    assert _rel(out_nc[0], ref_nc) <= 1e-12
    # transformers' sliding_window W: the key and the W - 1 before it (causal), W - 1 on each side
    # (not); softcap and the sink logits s_aux (any float dtype, handed on as float32) pass on
    sinks = torch.randn(4, dtype=torch.float64)
    for causal, window in ((True, (3, 0)), (False, (3, 3))):
        out_w, _ = fwd(_Attn(), q, k, v, None, scaling=0.3, sliding_window=4, softcap=2.0, s_aux=sinks,
                       is_causal=causal)
        ref_w = rfa.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu,
                                           cu, 7, 7, softmax_scale=0.3, causal=causal, window_size=window,
                                           softcap=2.0, sinks=sinks.float())
        assert _rel(out_w[0], ref_w) <= 1e-12
        assert _rel(out_w[0], ref if causal else ref_nc) > 1e-3  # the features change the result

    with pytest.raises(ValueError, match="batch size 1"):
        fwd(_Attn(), *_qkv(B=2), None)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        fwd(_Attn(), q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        fwd(_Attn(), q, torch.cat([k, k], 2), torch.cat([v, v], 2), None)
    with pytest.raises(ValueError, match="sliding_window: expected None or an int >= 1"):
        fwd(_Attn(), q, k, v, None, sliding_window=0)
    with pytest.raises(ValueError, match=r"s_aux: expected a tensor \[4\]"):
        fwd(_Attn(), q, k, v, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="softcap: expected a finite float >= 0"):
        fwd(_Attn(), q, k, v, None, softcap=-1.0)
    with pytest.raises(NotImplementedError, match="dropout"):
        fwd(_Attn(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="expected 12 local tokens"):
        fwd(_Attn(), *_qkv(S=10), None)
    with pytest.raises(ValueError, match="multiple of 2 \\* world_size = 2"):
        zz(_Attn(), q, k, v, None)  # lengths 5 and 7 are odd
    rfa.update_ring_flash_attn_params([0, 4, 12], None)  # a list is accepted
    out_zz, _ = zz(_Attn(), q, k, v, None)
    cu = cu_seqlens([4, 8])
    ref_zz = rfa.flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                        8, 8, causal=True)
    assert _rel(out_zz[0], ref_zz) <= 1e-12

    with pytest.raises(ValueError, match="heads_k_stride"):
        rfa.register_hf_attention(None, 0)
    with pytest.raises(ValueError, match="heads_k_stride"):
        rfa.substitute_hf_flash_attn(None, 1.5)
    rfa.register_hf_attention(None, 3)
    with pytest.raises(ValueError, match="heads_k_stride"):
        fwd(_Attn(), q, k, v, None)  # 3 does not divide the 2 KV heads


def test_update_params_errors(clean_adapter):
    with pytest.raises(ValueError, match="integer tensor"):
        rfa.update_ring_flash_attn_params(torch.tensor([0.0, 4.0]), None)
    with pytest.raises(ValueError, match="first entry"):
        rfa.update_ring_flash_attn_params(torch.tensor([1, 4]), None)
    with pytest.raises(ValueError, match="non-decreasing"):
        rfa.update_ring_flash_attn_params(torch.tensor([0, 4, 3]), None)
    with pytest.raises(ValueError, match="batch_size \\+ 1"):
        rfa.update_ring_flash_attn_params(torch.tensor([[0, 4]]), None)


def _subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(rfa.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_package_imports_without_transformers():
    """`import ring_flash_attn` must not need transformers; the adapter names the pip command."""
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it raises ImportError\n"
        "import ring_flash_attn as rfa\n"
        "rfa.update_ring_flash_attn_params([0, 3, 8], None)  # pure metadata: no transformers needed\n"
        "for f, args in ((rfa.register_hf_attention, (None, 1)), (rfa.substitute_hf_flash_attn, (None, 1))):\n"
        "    try:\n"
        "        f(*args)\n"
        "    except ImportError as e:\n"
        "        assert 'pip install transformers' in str(e), str(e)\n"
        "    else:\n"
        "        raise AssertionError(f.__name__ + ' did not raise ImportError')\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ---- the drop-in example (upstream's API, 2 gloo processes) --------------------------------------------


def test_drop_in_example_runs_on_two_gloo_ranks():
    """examples/ring_flash_attn_drop_in.py, written against upstream's API, passes unchanged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), _EXAMPLE]
    proc = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=180, cwd=_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASS ")]
    assert "FAIL" not in proc.stdout, out
    assert len(passed) >= 9, out  # one line per function (see the example's CHECKS)
    assert any("gloo" in line and "cpu" in line for line in proc.stdout.splitlines()), out
