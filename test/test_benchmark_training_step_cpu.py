"""CPU checks of benchmark/benchmark_training_step.py (the end-to-end training-step benchmark).

* The FLOP and MFU arithmetic against hand-computed values (parameter counts of the two model
  shapes, visible causal pairs per document, model FLOPs of a Llama-3-8B step, TFLOPS and MFU).
* Layouts and batches: KxL and mixed packings, position_ids restarting per document, cu_seqlens,
  next-token labels that never cross a document, the ranks' shards (contiguous and zigzag), the
  block-diagonal causal mask against brute force.
* The chunked LM-head cross-entropy (loss and gradients) against PyTorch's cross-entropy in float64.
* The attention timing wrapper leaves the step's numbers unchanged and sees every call.
* On a tiny HF Llama, packed documents give the same hidden states through our adapter (both
  schemes), through sdpa with the block-diagonal mask, and document by document.
* Which rows are skipped and why; the comparison text; the plot (where matplotlib imports).
* The whole --tiny run in a subprocess: every row ran, the CSV columns, the metrics consistent
  with the FLOP formula, progress lines with an ETA on stderr, the table on stdout.
"""

from __future__ import annotations

import csv
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ring_flash_attn as rfa

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmark")
_SCRIPT = os.path.join(_BENCH_DIR, "benchmark_training_step.py")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchmark_training_step as ts  # noqa: E402

_SEED = random.SystemRandom().randrange(1 << 30)


# ---- FLOPs and MFU -----------------------------------------------------------------------------------


def test_dense_params_hand_computed():
    # llama3-8b layer: q 4096*4096 + k, v 2*4096*1024 + o 4096*4096 + MLP 3*4096*14336 + 2 norms 4096
    layer_8b = 16_777_216 + 8_388_608 + 16_777_216 + 176_160_768 + 8_192
    assert layer_8b == 218_112_000
    assert ts.dense_params(ts.MODELS["llama3-8b"], 4) == 4 * layer_8b + 4_096 + 4_096 * 128_256 == 1_397_788_672
    # llama3-70b layer: q, o 8192*8192 each, k, v 2*8192*1024, MLP 3*8192*28672, norms 2*8192
    layer_70b = 2 * 67_108_864 + 16_777_216 + 704_643_072 + 16_384
    assert ts.dense_params(ts.MODELS["llama3-70b"], 2) == 2 * layer_70b + 8_192 + 8_192 * 128_256 == 2_761_990_144
    # tiny: q, o 64*64, k, v 64*32, MLP 3*64*128, norms 128; final norm 64, head 64*128
    assert ts.dense_params(ts.TINY_MODEL, 2) == 2 * (2 * 4096 + 2 * 2048 + 24576 + 128) + 64 + 8192 == 82_240


def test_dense_params_match_the_built_model():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    for layers in (1, 3):
        model = ts.build_model(ts.TINY_MODEL, layers, torch.float32, torch.device("cpu"))
        total = sum(p.numel() for p in model.parameters())
        embedding = model.model.embed_tokens.weight.numel()
        assert total - embedding == ts.dense_params(ts.TINY_MODEL, layers)
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
        assert model.config._attn_implementation == "sdpa" and model.training


def _brute_force_pairs(doc_lens):
    doc = [d for d, n in enumerate(doc_lens) for _ in range(n)]
    return sum(1 for i in range(len(doc)) for j in range(len(doc)) if doc[i] == doc[j] and j <= i)


@pytest.mark.parametrize("doc_lens", [[1], [7], [3, 5], [16, 1, 9, 4], [8] * 6])
def test_visible_pairs_brute_force(doc_lens):
    assert ts.visible_pairs(doc_lens) == _brute_force_pairs(doc_lens)


def test_model_flops_and_mfu_hand_computed():
    spec = ts.MODELS["llama3-8b"]
    pairs = 8192 * 8193 // 2
    assert pairs == 33_558_528
    attention = 3 * 4 * 128 * 32 * pairs * 4  # fwd 4 D Hq pairs per layer, x3 for fwd + bwd, 4 layers
    assert ts.attention_flops(spec, 4, [8192]) == attention == 6_597_875_073_024
    dense = 6 * 1_397_788_672 * 8192
    assert ts.model_flops(spec, 4, [8192]) == dense + attention == 75_301_983_879_168
    tokens_per_s, tflops, mfu = ts.throughput(75_301_983_879_168, 8192, 0.1, 1, 989.0)
    assert tokens_per_s == pytest.approx(81_920.0)
    assert tflops == pytest.approx(753.01983879168)
    assert mfu == pytest.approx(753.01983879168 / 989.0)
    # N GPUs: the job's tokens/s, each GPU's TFLOPS
    tokens_per_s, tflops, mfu = ts.throughput(75_301_983_879_168, 8192, 0.1, 2, 989.0)
    assert tokens_per_s == pytest.approx(81_920.0) and tflops == pytest.approx(376.50991939584)
    # packed documents count pairs per document: 4 x 8192 has 4x the pairs of one 8192, not 16x
    assert ts.attention_flops(spec, 4, [8192] * 4) == 4 * attention
    with pytest.raises(ValueError, match="step_s"):
        ts.throughput(1.0, 1, 0.0, 1, 989.0)


# ---- layouts and batches ----------------------------------------------------------------------------


def test_parse_layouts():
    layout = ts.parse_packed("4x8192", 32768, 0)
    assert layout.name == "packed_4x8192" and layout.doc_lens == (8192,) * 4 and layout.tokens == 32768
    assert layout.packed and not ts.single_layout(8192).packed
    mixed = ts.parse_packed("mixed", 32768, 5)
    assert mixed.name == "packed_mixed" and mixed.tokens == 32768
    for bad in ("4x", "x8", "4x8x2", "0x8", "abc", "4y8"):
        with pytest.raises(ValueError, match="--packed"):
            ts.parse_packed(bad, 32768, 0)
    with pytest.raises(ValueError, match="--seqlens"):
        ts.single_layout(0)


@pytest.mark.parametrize("total,unit", [(32768, 128), (64, 8), (128, 128), (1 << 17, 128)])
def test_mixed_lengths(total, unit):
    for seed in range(5):
        lens = ts.mixed_lengths(total, seed, unit)
        assert sum(lens) == total and all(n > 0 and n % unit == 0 for n in lens)
        assert lens == ts.mixed_lengths(total, seed, unit)  # a fixed seed gives a fixed packing
        if total >= 2 * unit:  # mixed: no document longer than half the row
            assert len(lens) >= 2 and max(lens) <= total // 2
    if total >= 64 * unit:
        assert len({tuple(ts.mixed_lengths(total, s, unit)) for s in range(5)}) > 1
    with pytest.raises(ValueError, match="--mixed-tokens"):
        ts.mixed_lengths(total + 1, 0, unit)


def test_make_batch_positions_labels_cu_seqlens():
    lens = [5, 1, 8, 3]
    batch = ts.make_batch(lens, vocab=50, seed=_SEED)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 5, 6, 14, 17]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    ids, labels = batch.input_ids.tolist(), batch.labels.tolist()
    assert all(0 <= t < 50 for t in ids) and len(set(ids)) > 1
    starts = batch.cu_seqlens.tolist()
    for a, b in zip(starts, starts[1:]):
        assert labels[a:b - 1] == ids[a + 1:b]  # the next token of the same document
        assert labels[b - 1] == -100  # never the first token of the next document
    assert batch.num_labels == 17 - 4
    assert torch.equal(ts.make_batch(lens, 50, _SEED).input_ids, batch.input_ids)


def test_shard_index_contiguous_and_zigzag():
    lens = [8, 4, 12]
    batch = ts.make_batch(lens, vocab=97, seed=_SEED)
    for world in (1, 2):
        pieces = [ts.shard_index(batch, False, r, world) for r in range(world)]
        assert torch.equal(torch.cat(pieces), torch.arange(24))
        zig = [ts.shard_index(batch, True, r, world) for r in range(world)]
        assert sorted(torch.cat(zig).tolist()) == list(range(24))
        for r in range(world):
            assert torch.equal(batch.input_ids[zig[r]], rfa.zigzag_shard(batch.input_ids, batch.cu_seqlens, r, world))
    # N = 1: the zigzag shard is the row in order
    assert torch.equal(ts.shard_index(batch, True, 0, 1), torch.arange(24))
    with pytest.raises(ValueError, match="divisible"):
        ts.shard_index(ts.make_batch([5], 10, 0), False, 0, 2)


def test_block_causal_mask_brute_force():
    lens = [3, 1, 5, 2]
    mask = ts.block_causal_mask(lens, "cpu")
    assert mask.shape == (1, 1, 11, 11) and mask.dtype == torch.bool
    doc = [d for d, n in enumerate(lens) for _ in range(n)]
    expected = torch.tensor([[doc[i] == doc[j] and j <= i for j in range(11)] for i in range(11)])
    assert torch.equal(mask[0, 0], expected)
    assert int(mask.sum()) == ts.visible_pairs(lens)


# ---- the loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 100])
def test_chunked_cross_entropy_matches_torch(chunk):
    gen = torch.Generator().manual_seed(_SEED)
    tokens, hidden_size, vocab = 24, 16, 37
    hidden = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[[0, 6, 7, 23]] = -100
    normalizer = 50  # e.g. the valid labels of all ranks
    upstream = 2.5
    loss = ts.chunked_cross_entropy(hidden, weight, labels, chunk, normalizer)
    (loss * upstream).backward()
    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(h_ref @ w_ref.t(), labels, ignore_index=-100, reduction="sum") / normalizer
    (ref * upstream).backward()
    assert loss.dtype == torch.float64 and math.isfinite(loss.item()) and ref.item() > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(hidden.grad, h_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    assert hidden.grad.abs().max() > 0 and weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="--loss-chunk"):
        ts.chunked_cross_entropy(hidden, weight, labels, 0, normalizer)


# ---- the model: timing wrapper and packed equivalence ---------------------------------------------------


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def _tiny_model(dtype=torch.float64, layers=2):
    model = ts.build_model(ts.TINY_MODEL, layers, dtype, torch.device("cpu"), seed=_SEED % 1000)
    return model


def _inputs(batch: ts.Batch, **kwargs) -> ts.StepInputs:
    return ts.StepInputs(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                         labels=batch.labels, normalizer=batch.num_labels, **kwargs)


def _loss_and_grads(model, inputs: ts.StepInputs):
    model.zero_grad(set_to_none=True)
    out = model.model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                      attention_mask=inputs.attention_mask, use_cache=False)
    loss = ts.chunked_cross_entropy(out.last_hidden_state[0], model.lm_head.weight, inputs.labels, 16,
                                    inputs.normalizer)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_timing_wrapper_is_an_identity_and_sees_every_call(checkpointing):
    _transformers()
    model = _tiny_model(layers=3)
    ts.set_checkpointing(model, checkpointing)
    batch = ts.make_batch([24, 8], vocab=ts.TINY_MODEL.vocab, seed=_SEED)
    inputs = _inputs(batch, attention_mask=ts.block_causal_mask(batch.doc_lens, "cpu"))
    loss, grads = _loss_and_grads(model, inputs)
    timer = ts.AttentionTimer(torch.device("cpu"))
    with ts.timed_attention("sdpa", timer):
        timed_loss, timed_grads = _loss_and_grads(model, inputs)
    assert timed_loss == loss and math.isfinite(loss)
    for name, g in grads.items():
        assert torch.equal(timed_grads[name], g), name
    # one forward (two with checkpointing's recomputation) and one backward per layer
    assert timer.forward_calls == 3 * (2 if checkpointing else 1) and timer.backward_calls == 3
    assert timer.total_ms() > 0
    # restored: another step adds no spans
    _loss_and_grads(model, inputs)
    assert len(timer.spans) == 3 * (2 if checkpointing else 1)


def test_packed_documents_agree_across_implementations():
    """Hidden states of a packed row: ours (contiguous and zigzag, N=1, no process group), sdpa
    with the block-diagonal mask, and every document on its own (sdpa, causal) are the same."""
    _transformers()
    model = _tiny_model()
    lens = [10, 4, 18]
    batch = ts.make_batch(lens, vocab=ts.TINY_MODEL.vocab, seed=_SEED)
    ids, pos = batch.input_ids[None], batch.position_ids[None]

    def hidden(name, **kwargs):
        ts.set_attn_implementation(model, name)
        with torch.no_grad():
            return model.model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state[0]

    masked = hidden("sdpa", attention_mask=ts.block_causal_mask(lens, "cpu"))
    ts.set_attn_implementation(model, "sdpa")
    with torch.no_grad():
        per_doc = torch.cat([model.model(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False)
                             .last_hidden_state[0] for a, b in zip(batch.cu_seqlens[:-1].tolist(),
                                                                   batch.cu_seqlens[1:].tolist())])
    rfa.register_hf_attention(None, heads_k_stride=ts.TINY_MODEL.kv_heads)
    rfa.update_ring_flash_attn_params(batch.cu_seqlens)
    ours = hidden(rfa.HF_ATTN_LLAMA3)
    ours_zigzag = hidden(rfa.HF_ATTN_ZIGZAG_LLAMA3)
    # a plain causal mask over the whole row (documents see earlier documents) differs: the check can fail
    whole_row = hidden("sdpa", attention_mask=torch.ones(32, 32, dtype=torch.bool).tril()[None, None])
    scale = per_doc.abs().max()
    for name, h in (("sdpa masked", masked), ("ours_llama3", ours), ("ours_zigzag_llama3", ours_zigzag)):
        assert not torch.isnan(h).any(), name
        assert (h - per_doc).abs().max() / scale < 1e-10, name
    assert (whole_row - per_doc).abs().max() / scale > 1e-3


def _reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1)):
    """A CPU stand-in for torch's varlen_attn (its signature): every document on its own, causal
    when window_size == (-1, 0), K/V heads repeated for GQA."""
    assert window_size in ((-1, 0), (-1, -1)) and return_aux is None
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    cu = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(cu, cu[1:]))
    rep = query.shape[1] // key.shape[1]
    outs = []
    for a, b in zip(cu, cu[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=window_size == (-1, 0), scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs)


def test_varlen_attn_glue_with_a_reference_kernel(monkeypatch):
    """The varlen_attn attention function (what transformers calls) on a tiny Llama, with torch's
    kernel (CUDA only) replaced by a CPU reference of the same signature: the hidden states of a
    packed row match the documents run one by one, and gradients flow."""
    transformers = _transformers()
    import torch.nn.attention.varlen as varlen_module

    real_kwargs = ts._varlen_call_kwargs(varlen_module.varlen_attn, True, 0.25)
    assert real_kwargs == {"window_size": (-1, 0), "scale": 0.25}  # this torch's varlen_attn
    monkeypatch.setattr(varlen_module, "varlen_attn", _reference_varlen_attn)
    transformers.AttentionInterface.register(ts.VARLEN_ATTN_NAME, ts.varlen_attention_forward)
    model = _tiny_model()
    lens = [6, 16, 10]
    batch = ts.make_batch(lens, vocab=ts.TINY_MODEL.vocab, seed=_SEED)
    ids, pos = batch.input_ids[None], batch.position_ids[None]
    ts._VARLEN.cu_seqlens, ts._VARLEN.max_seqlen = batch.cu_seqlens, max(lens)
    try:
        ts.set_attn_implementation(model, ts.VARLEN_ATTN_NAME)
        out = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        out.square().sum().backward()
    finally:
        ts._VARLEN.cu_seqlens = None
    ts.set_attn_implementation(model, "sdpa")
    with torch.no_grad():
        per_doc = torch.cat([model.model(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False)
                             .last_hidden_state[0] for a, b in zip(batch.cu_seqlens[:-1].tolist(),
                                                                   batch.cu_seqlens[1:].tolist())])
    assert not torch.isnan(out).any()
    assert (out.detach() - per_doc).abs().max() / per_doc.abs().max() < 1e-10
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
    with pytest.raises(RuntimeError, match="no cu_seqlens"):
        ts.set_attn_implementation(model, ts.VARLEN_ATTN_NAME)
        model.model(input_ids=ids, position_ids=pos, use_cache=False)


def test_execute_turns_failures_into_statuses(monkeypatch):
    ctx = ts.Context(device=torch.device("cpu"), dtype=torch.float32, group=None, rank=0, world_size=1, warmup=0,
                     steps=1, peak_tflops=989.0, heads_k_stride=None, loss_chunk=8, math_max_tokens=64, env={})
    plan = ts.RowPlan(ts.TINY_MODEL, 2, ts.single_layout(64), "sdpa_cudnn", False)

    def out_of_memory(trainer, plan, ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    def refused(trainer, plan, ctx):
        import warnings

        warnings.warn("Flash attention does not support non-null attn_mask. (Triggered internally)")
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(ts, "run_row", out_of_memory)
    result = ts.execute(None, plan, ctx)
    assert result.status.startswith("oom: ") and "Tried to allocate" in result.status and result.tokens_per_s is None
    monkeypatch.setattr(ts, "run_row", refused)
    result = ts.execute(None, plan, ctx)
    assert result.status == "failed: RuntimeError: No available kernel. Aborting execution."
    assert "does not support non-null attn_mask" in " ".join(result.notes)
    skipped = ts.execute(None, ts.RowPlan(ts.TINY_MODEL, 2, ts.single_layout(64), "sdpa_cudnn", False, "why"), ctx)
    assert skipped.status == "skipped: why"


# ---- rows, skips, output ------------------------------------------------------------------------------


def test_skip_reasons():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    single, packed = ts.single_layout(8192), ts.parse_packed("4x2048", 0, 0)
    odd = ts.Layout("packed_2x7", (7, 7))
    reason = lambda impl, layout, device=cuda, world=1, missing=None: ts.skip_reason(  # noqa: E731
        impl, layout, device, world, 4096, missing or {})
    for impl in ("ours_llama3", "ours_zigzag_llama3", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient",
                 "flash_attention_2"):
        assert reason(impl, single) == "", impl
    for impl in ("ours_llama3", "ours_zigzag_llama3", "sdpa_cudnn", "sdpa_efficient", "varlen_attn"):
        assert reason(impl, packed) == "", impl
    assert "attention mask" in reason("sdpa_flash", packed)
    assert "packed" in reason("varlen_attn", single)
    assert "--math-max-tokens" in reason("sdpa_math", single)
    assert reason("sdpa_math", ts.single_layout(4096)) == ""
    assert reason("sdpa_math", ts.single_layout(64), cpu) == ""
    assert "CUDA" in reason("sdpa_cudnn", single, cpu)
    assert reason("ours_llama3", odd) == "" and "multiple of 2" in reason("ours_zigzag_llama3", odd)
    assert "ours_* rows only" in reason("sdpa_cudnn", single, world=2)
    assert reason("ours_zigzag_llama3", single, world=2) == ""
    assert "divisible" in reason("ours_llama3", ts.single_layout(8191), world=2)
    assert reason("varlen_attn", packed, missing={"varlen_attn": "not importable"}) == "not importable"
    with pytest.raises(ValueError, match="--impls"):
        ts.attn_implementation_name("sdpa_unknown")


def _result(impl, layout, tokens_per_s, status="ok"):
    plan = ts.RowPlan(ts.TINY_MODEL, 2, layout, impl, False)
    return ts.RowResult(plan, status=status, step_ms=10.0, attn_ms=4.0, tokens_per_s=tokens_per_s, tflops=1.0,
                        mfu=0.001)


def test_comparison_against_the_best_other_implementation():
    single = ts.single_layout(64)
    results = [_result("sdpa_cudnn", single, 100.0), _result("sdpa_efficient", single, 80.0),
               _result("sdpa_flash", single, 1000.0, status="oom: out of memory"),
               _result("ours_llama3", single, 110.0), _result("ours_llama3", ts.parse_packed("4x16", 0, 0), 50.0)]
    text = ts.format_comparison(results)
    assert "ours_llama3 1.100x the best other (sdpa_cudnn, 100 tok/s)" in text
    assert "packed_4x16" not in text  # no other implementation ran there
    table = ts.format_table(results)
    assert "oom: out of memory" in table
    assert table.splitlines()[2].split()[5:12] == ["sdpa_cudnn", "10.0", "4.0", "40", "100", "1.0", "0.1%"]
    row = ts.csv_row(results[0], {"gpu": "g", "torch": "t", "transformers": "x"}, 1)
    assert set(row) == set(ts.CSV_COLUMNS) and row["rest_ms"] == "6.000" and row["checkpointing"] == "off"
    skipped = ts.csv_row(ts.RowResult(results[0].plan, status="skipped: why"), {"gpu": "g", "torch": "t",
                                                                                "transformers": "x"}, 1)
    assert skipped["tokens_per_s"] == "" and skipped["status"] == "skipped: why"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (a tool dependency of the plot only)")
    single = ts.single_layout(64)
    results = [_result("sdpa_math", single, 100.0), _result("ours_llama3", single, 110.0)]
    path = str(tmp_path / "training_step.png")
    assert ts.write_plot(results, path, {"gpu": "cpu", "torch": torch.__version__}) is None
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_required_csv_columns_present():
    assert set(ts.REQUIRED_CSV_COLUMNS) <= set(ts.CSV_COLUMNS)
    for extra in ("checkpointing", "step_ms", "attn_ms", "tflops", "status"):
        assert extra in ts.CSV_COLUMNS


# ---- the whole tiny run --------------------------------------------------------------------------------


def _run(args, timeout=600):
    # The environment as is: the package this test imports (installed, or the tree's through the
    # caller's PYTHONPATH) is the one the script gets; python/ of the tree has no library.
    return subprocess.run([sys.executable, _SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def test_tiny_run_end_to_end(tmp_path):
    _transformers()
    csv_path = tmp_path / "training_step_tiny.csv"
    proc = _run(["--tiny", "--csv", str(csv_path), "--mixed-seed", str(_SEED % 100)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert set(ts.REQUIRED_CSV_COLUMNS) <= set(header)
    layouts = {"single", "packed_4x16", "packed_2x32", "packed_mixed"}
    impls = {"ours_llama3", "ours_zigzag_llama3", "sdpa_math"}
    assert len(rows) == len(layouts) * len(impls) * 2
    assert {(r["layout"], r["impl"], r["checkpointing"]) for r in rows} == {
        (lay, impl, ck) for lay in layouts for impl in impls for ck in ("off", "on")}
    for r in rows:
        what = f"{r['layout']} {r['impl']} ckpt={r['checkpointing']}"
        assert r["status"] == "ok", f"{what}: {r['status']}"
        assert (r["gpu"], r["model"], r["layers"], r["num_gpus"], r["seqlen"]) == ("cpu", "tiny", "2", "1", "64")
        step_ms, attn_ms, rest_ms = float(r["step_ms"]), float(r["attn_ms"]), float(r["rest_ms"])
        tokens_per_s, tflops, mfu = float(r["tokens_per_s"]), float(r["tflops"]), float(r["mfu"])
        assert step_ms > 0 and 0 < attn_ms <= step_ms and rest_ms == pytest.approx(step_ms - attn_ms, abs=2e-3), what
        assert tokens_per_s == pytest.approx(64 / (step_ms / 1e3), rel=1e-3), what
        docs = {"single": [64], "packed_4x16": [16] * 4, "packed_2x32": [32] * 2}.get(r["layout"])
        if docs is not None:
            flops = ts.model_flops(ts.TINY_MODEL, 2, docs)
            assert tflops == pytest.approx(flops / (step_ms / 1e3) / 1e12, rel=2e-2, abs=0.006), what
        assert mfu == pytest.approx(tflops / ts.DEFAULT_PEAK_TFLOPS, rel=2e-2, abs=1e-4), what
        assert r["peak_mem_gb"] == ""  # measured on CUDA devices only
    assert "packed_mixed" in {r["layout"] for r in rows}
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len(rows) and all("ETA" in line for line in progress)
    assert progress[-1].startswith(f"[{len(rows)}/{len(rows)}]")
    assert "tok/s" in proc.stdout and "step ms" in proc.stdout and "the best other" in proc.stdout
    assert "MFU against 989 TFLOPS" in proc.stdout


def test_deadline_skips_the_rows(tmp_path):
    _transformers()
    csv_path = tmp_path / "training_step.csv"
    proc = _run(["--tiny", "--deadline-s", "0", "--csv", str(csv_path)], timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # no row ran
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["status"].startswith("skipped: time budget") for r in rows)


def test_tiny_run_two_ranks(tmp_path):
    """The N > 1 path (torchrun, every rank its shard, gradients all-reduced) on 2 gloo ranks."""
    _transformers()
    csv_path = tmp_path / "training_step_n2.csv"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           _SCRIPT, "--tiny", "--checkpointing", "on", "--packed", "2x32", "mixed",
                           "--csv", str(csv_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    for r in rows:
        assert r["num_gpus"] == "2"
        if r["impl"] == "sdpa_math":
            assert r["status"].startswith("skipped: single-GPU")
        else:
            assert r["status"] == "ok", r
            assert float(r["tokens_per_s"]) == pytest.approx(64 / (float(r["step_ms"]) / 1e3), rel=1e-3)


def test_cli_errors(tmp_path):
    proc = _run(["--tiny", "--packed", "4x", "--csv", str(tmp_path / "training_step.csv")], timeout=120)
    assert proc.returncode == 2 and "--packed" in proc.stderr
    proc = _run(["--tiny", "--steps", "0"], timeout=120)
    assert proc.returncode == 2 and "--steps" in proc.stderr
    if not torch.cuda.is_available():
        proc = _run(["--csv", str(tmp_path / "training_step.csv")], timeout=120)
        assert proc.returncode == 2 and "--tiny" in proc.stderr
