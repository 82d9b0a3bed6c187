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
from dist_harness import CachedSpawns, case_params, CaseWorker, free_port, rel_err, spawn_root_fixture
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


CASES: Dict[int, List[dict]] = {
    2: [
        # contiguous layout: odd lengths, a sequence crossing the rank boundary (token 16)
        _case("interface-llama3-odd-fp64", "interface", "llama3", [[5, 13, 3, 11]], control=True),
        # zigzag layout: every length a multiple of 2N = 4; two KV heads per all-gather slice
        _case("interface-zigzag-fp64-hs2", "interface", "zigzag", [[8, 12, 4, 8]], hs=2),
        # upstream's drop-in, two batches with update_ring_flash_attn_params in between
        _case("substitute-fa2-odd-fp32", "substitute", "llama3", [[7, 2, 9, 14], [3, 21, 1, 7]], dtype="float32",
              hs=2),
    ],
}


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")



def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x - ref| / max|ref| (inf for a shape mismatch, nan for a NaN in x)."""
    return rel_err(x, ref, floor=1e-30)


def _make_models(attn_implementation: str, dtype: torch.dtype, seed: int):
    """(reference eager model, model for `attn_implementation`) with the same weights. Each gets its
    own config: transformers writes the attention implementation into the config it is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_CONFIG)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype)
    if attn_implementation == "flash_attention_2":
        # transformers refuses to BUILD a "flash_attention_2" model without the flash_attn package
        # (a GPU machine with flash_attn has it); the dispatch at run time is what the
        # substitution changes, so build it eager and switch the name it dispatches on.
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").to(dtype)
        model.config._attn_implementation = "flash_attention_2"
    else:
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
        model = model.to(dtype)
    model.load_state_dict(ref.state_dict())
    return ref, model


def _batch(lens, dtype: torch.dtype, vocab: int, gen: torch.Generator):
    total = sum(lens)
    ids = torch.randint(0, vocab, (total,), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    w = torch.randn(total, vocab, generator=gen, dtype=torch.float64).to(dtype)
    return ids, pos, w


def _forward_loss(model, ids: torch.Tensor, pos: torch.Tensor, w: torch.Tensor):
    logits = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
    return logits, (logits * w).sum()


def _grads(model) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


# ---- 2 gloo ranks ----------------------------------------------------------------------------------


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    import torch.distributed as dist

    dtype = getattr(torch, case["dtype"])
    if case["path"] == "interface":
        names = rfa.register_hf_attention(None, case["hs"])
        attn = names[0] if case["scheme"] == "llama3" else names[1]
    else:
        rfa.substitute_hf_flash_attn(None, case["hs"])
        attn = "flash_attention_2"
    ref, model = _make_models(attn, dtype, seed)
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
            worst = 0.0
            for name, g in _grads(model).items():
                dist.all_reduce(g)
                err = _rel(g, ref_grads[name])
                worst = err if (err != err or err > worst) else worst  # NaN sticks
            result[f"grads[{i}]"] = worst
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
spawn_root = spawn_root_fixture("hf_adapter_dist")


@pytest.mark.parametrize("world_size,case", case_params(CASES))
def test_hf_llama_context_parallel_matches_eager(world_size, case, spawn_root):
    _transformers()
    per_rank = _results(world_size, spawn_root)
    tol = _TOL[case["dtype"]]
    for r, res in enumerate(per_rank):
        got = res["cases"][case["id"]]
        assert "exception" not in got, f"rank {r} of {world_size} (seed {_SEED}):\n{got.get('exception')}"
        for i in range(len(case["batches"])):
            for what in (f"logits[{i}]", f"grads[{i}]"):
                err = got[what]
                assert err <= tol, (f"rank {r}, case {case['id']} (seed {_SEED}): {what} max|err| / max|ref| = "
                                    f"{err:.3e} > {tol:.1e}")
        if case["control"]:
            assert got["control_logits"] > 100 * tol, (
                f"rank {r} (seed {_SEED}): attention over local tokens only gave logits within "
                f"{got['control_logits']:.3e} of the reference: the comparison cannot detect missing context")


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

    with pytest.raises(ValueError, match="batch size 1"):
        fwd(_Attn(), *_qkv(B=2), None)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        fwd(_Attn(), q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        fwd(_Attn(), q, torch.cat([k, k], 2), torch.cat([v, v], 2), None)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        fwd(_Attn(), q, k, v, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="softcap"):
        fwd(_Attn(), q, k, v, None, softcap=30.0)
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
