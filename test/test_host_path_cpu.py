"""The host path of a call (CPU backend): per-key call plans and the eager path of the public
functions must not change what a call computes or raises.

* Plans: a call whose tensors match an earlier call's (type, dtype, device, shape, strides) and
  whose scalars are equal reuses that call's validated C structs and writes only pointers. Here:
  a cached call computes the same bits as a cold one, a bad argument raises the same error after
  a cached good call as on a cold cache, other strides / shapes / dtypes / devices / scalars get
  their own plans, no tensor is kept alive, the caches are bounded and per thread.
* Eager path: outside torch.compile / tracing / modes the public functions call the kernels
  without the dispatcher, through an autograd.Function; its outputs and gradients are the op
  path's, bit for bit, and modes, the profiler and double backward still see the op.
"""

from __future__ import annotations

import gc
import os
import re
import threading
import weakref

import pytest
import torch

from cases import assert_lse_close, assert_pass_rule, make_case, reference
from ring_flash_attn import _host_cache, flash_attn_varlen_func, grouped_flash_attn_varlen_func
from ring_flash_attn import ops as rfa_ops


@pytest.fixture(autouse=True)
def _fresh_plans():
    rfa_ops.clear_plan_caches()
    yield
    rfa_ops.clear_plan_caches()


def _case(dtype=torch.float32, seed=0, seqused=True):
    return make_case([[7, 5], [4, 9]], [9, 12], 4, 2, 32, dtype,
                     seqused_k=[None, [6, 10]] if seqused else None, seed=seed)


def _outputs_for(c):
    outs = [torch.full_like(q, float("nan")) for q in c.q_list]
    lses = [torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float32) for q in c.q_list]
    return outs, lses


def _fwd_into(c, outs, lses, softmax_scale=0.0, **kw):
    args = c.op_args(softmax_scale=softmax_scale)[:-1]  # without deterministic
    rfa_ops.fwd_into(*args, outs, lses, **kw)


def _plan_count(cache) -> int:
    return len(cache)


# ---- plans: same results ---------------------------------------------------------------------


@pytest.mark.parametrize("features", [{}, {"window_size": (3, 0), "softcap": 5.0}], ids=["plain", "window_softcap"])
def test_cached_forward_computes_the_same_bits(features):
    c = _case()
    cold_outs, cold_lses = _outputs_for(c)
    _fwd_into(c, cold_outs, cold_lses, **features)
    assert _plan_count(rfa_ops._FWD_PLANS) == 1
    if not features:  # the plain call against the float64 reference (fresh inputs, NaN-poisoned outputs)
        _, ref_hi, lse_hi = reference(c, torch.float64, None, True)
        _, ref_lp, _ = reference(c, torch.float32, None, True)
        for g in range(c.num_groups):
            assert_pass_rule(f"out[{g}]", cold_outs[g], ref_hi[g], ref_lp[g])
            assert_lse_close(f"lse[{g}]", cold_lses[g], lse_hi[g])
    for _ in range(2):
        outs, lses = _outputs_for(c)
        _fwd_into(c, outs, lses, **features)
        for a, b in zip(outs + lses, cold_outs + cold_lses):
            assert torch.equal(a, b)
    assert _plan_count(rfa_ops._FWD_PLANS) == 1  # hits, no new plan


def test_cached_plan_takes_new_data_pointers():
    """Same key, other tensors: the second call must read and write the new ones."""
    a, b = _case(seed=1), _case(seed=2)
    outs_a, lses_a = _outputs_for(a)
    outs_b, lses_b = _outputs_for(b)
    _fwd_into(a, outs_a, lses_a)
    _fwd_into(b, outs_b, lses_b)  # a hit
    assert _plan_count(rfa_ops._FWD_PLANS) == 1
    rfa_ops.clear_plan_caches()
    cold_b, cold_lse_b = _outputs_for(b)
    _fwd_into(b, cold_b, cold_lse_b)
    for x, y, z in zip(outs_b, cold_b, outs_a):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_cached_python_kernels_forward_and_backward_match_cold_calls():
    # The ops' Python kernels (what torch.ops runs on the ctypes path; with libringattn_torch the
    # C++ kernels run instead, test_torch_shim_cpu.py compares the two).
    c = _case(torch.float64)
    args = c.op_args(softmax_scale=0.3)
    douts = [torch.randn_like(q) for q in c.q_list]
    runs = []
    for _ in range(3):  # cold, then hits
        outs, lses = rfa_ops._grouped_fwd_kernel(*args)
        grads = rfa_ops._grouped_bwd_kernel(douts, c.q_list, c.k, c.v, outs, lses, *args[3:])
        runs.append([*outs, *lses, *grads[0], grads[1], grads[2]])
        assert all(t.is_contiguous() for t in runs[-1])
    assert _plan_count(rfa_ops._FWD_PLANS) == 1 and _plan_count(rfa_ops._BWD_PLANS) == 1
    for later in runs[1:]:
        for a, b in zip(later, runs[0]):
            assert torch.equal(a, b)
    _, ref_hi, _ = reference(c, torch.float64, 0.3, True)
    for g in range(c.num_groups):  # float64 math with the scale rounded to float32 (the C field)
        assert (runs[0][g] - ref_hi[g]).abs().max().item() < 1e-6


# ---- plans: errors after a cached good call ------------------------------------------------------


def _bad_calls():
    """(name, mutate(case, outs, lses) -> (case, outs, lses, kwargs)) of forward calls that must fail."""

    def replace(c, **fields):
        d = dict(c.__dict__)
        d.update(fields)
        return type(c)(**d)

    return [
        ("k dtype", lambda c, o, l: (replace(c, k=c.k.double()), o, l, {})),
        ("q heads", lambda c, o, l: (replace(c, q_list=[c.q_list[0], c.q_list[1][:, :2]]), o, l, {})),
        ("q head dim strided", lambda c, o, l: (replace(c, q_list=[c.q_list[0], torch.cat(
            [c.q_list[1], c.q_list[1]], -1)[..., ::2]]), o, l, {})),
        ("cu_seqlens_k dtype", lambda c, o, l: (replace(c, cu_seqlens_k=c.cu_seqlens_k.long()), o, l, {})),
        ("cu_seqlens_q length", lambda c, o, l: (replace(c, cu_seqlens_q_list=[
            c.cu_seqlens_q_list[0], c.cu_seqlens_q_list[1][:2]]), o, l, {})),
        ("seqused length", lambda c, o, l: (replace(c, seqused_k_list=[None, c.seqused_k_list[1][:1]]), o, l, {})),
        ("cu_seqlens_k value", lambda c, o, l: (replace(c, cu_seqlens_k=c.cu_seqlens_k + 1), o, l, {})),
        ("seqused value", lambda c, o, l: (replace(c, seqused_k_list=[None, c.seqused_k_list[1] + 100]), o, l, {})),
        ("out shape", lambda c, o, l: (c, [o[0], o[1][:-1]], l, {})),
        ("out aliases q", lambda c, o, l: (c, [c.q_list[0], o[1]], l, {})),
        ("outs overlap", lambda c, o, l: (c, [o[0], o[0][:o[1].shape[0]]] if o[0].shape[0] >= o[1].shape[0]
                                          else [o[1][:o[0].shape[0]], o[1]], l, {})),
        ("lse strided", lambda c, o, l: (c, o, [l[0], l[1].t().contiguous().t()], {})),
        ("lse dtype", lambda c, o, l: (c, o, [l[0], l[1].double()], {})),
        ("hint is a bool", lambda c, o, l: (replace(c, max_seqlen_q_list=[True, c.max_seqlen_q_list[1]]), o, l, {})),
        ("hint too large", lambda c, o, l: (replace(c, max_seqlen_k=2**31), o, l, {})),
        ("window malformed", lambda c, o, l: (c, o, l, {"window_size": (1, 2, 3)})),
        ("softcap negative", lambda c, o, l: (c, o, l, {"softcap": -1.0})),
        ("sinks shape", lambda c, o, l: (c, o, l, {"sinks": torch.zeros(3)})),
    ]


def _error_of(fn):
    """(type, message) of what fn raises, addresses masked (they differ from tensor to tensor)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), re.sub(r"0x[0-9a-f]+", "0x...", str(e))
    return None


@pytest.mark.parametrize("name,mutate", _bad_calls(), ids=[n for n, _ in _bad_calls()])
def test_bad_call_after_cached_good_call_raises_as_cold(name, mutate):
    c = _case()
    # every good call of the family first, so that whatever a bad call shares with them is cached
    if name == "hint is a bool":
        c = make_case([[1, 1], [4, 9]], [9, 12], 4, 2, 32, torch.float32, seqused_k=[None, [6, 10]])
    good_outs, good_lses = _outputs_for(c)

    def bad():
        bc, bo, bl, kw = mutate(c, *_outputs_for(c))
        _fwd_into(bc, bo, bl, **kw)

    rfa_ops.clear_plan_caches()
    cold = _error_of(bad)
    assert cold is not None, f"{name}: the bad call did not fail"
    assert cold[0] in (ValueError, NotImplementedError), cold
    rfa_ops.clear_plan_caches()
    for kw in ({}, {"window_size": (1, 0)}, {"softcap": 2.0}, {"sinks": torch.zeros(4)}):
        _fwd_into(c, good_outs, good_lses, **kw)
    if name == "hint is a bool":
        good = make_case([[1, 1], [4, 9]], [9, 12], 4, 2, 32, torch.float32, seqused_k=[None, [6, 10]])
        assert good.max_seqlen_q_list[0] == 1  # the bool's value: equal keys unless types are compared
    assert _error_of(bad) == cold
    assert _error_of(bad) == cold  # and again, after the failed call


def test_bad_call_after_cached_op_call_raises_as_cold():
    c = _case()
    args = list(c.op_args())
    bad_args = list(args)
    bad_args[4] = c.cu_seqlens_k.flip(0)  # decreasing: the library's check of the values
    rfa_ops.clear_plan_caches()
    cold = _error_of(lambda: rfa_ops.grouped_fwd(*bad_args))
    assert cold is not None and cold[0] is ValueError
    rfa_ops.grouped_fwd(*args)
    assert _error_of(lambda: rfa_ops.grouped_fwd(*bad_args)) == cold
    assert _error_of(lambda: grouped_flash_attn_varlen_func(
        c.q_list, c.k, c.v, c.cu_seqlens_q_list, bad_args[4], c.max_seqlen_q_list, c.max_seqlen_k)) is not None
    # flash_attn_varlen_func still names its own arguments after cached calls
    q, k, v = c.q_list[0], c.k, c.v
    for _ in range(2):
        flash_attn_varlen_func(q, k, v, c.cu_seqlens_q_list[0], c.cu_seqlens_k, c.max_seqlen_q_list[0],
                               c.max_seqlen_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[0\]: expected 0"):
        flash_attn_varlen_func(q, k, v, c.cu_seqlens_q_list[0], bad_args[4], c.max_seqlen_q_list[0],
                               c.max_seqlen_k)
    with pytest.raises(ValueError, match=r"^k: expected dtype torch.float64 \(the dtype of q\)"):
        flash_attn_varlen_func(q.double(), k, v, c.cu_seqlens_q_list[0], c.cu_seqlens_k,
                               c.max_seqlen_q_list[0], c.max_seqlen_k)


# ---- plans: keys --------------------------------------------------------------------------------


def test_other_strides_shapes_dtypes_and_scalars_get_their_own_plans():
    c = _case()
    outs, lses = _outputs_for(c)
    _fwd_into(c, outs, lses)
    n = _plan_count(rfa_ops._FWD_PLANS)
    assert n == 1

    # strided heads of q_list[1] (a slice of a wider tensor): same values, another plan
    wide = torch.randn(c.q_list[1].shape[0], 8, 32)
    wide[:, ::2] = c.q_list[1]
    strided = make_case([[7, 5], [4, 9]], [9, 12], 4, 2, 32, torch.float32, seqused_k=[None, [6, 10]])
    strided.q_list = [c.q_list[0], wide[:, ::2]]
    s_outs, s_lses = _outputs_for(strided)
    _fwd_into(strided, s_outs, s_lses)
    assert _plan_count(rfa_ops._FWD_PLANS) == n + 1
    for a, b in zip(s_outs + s_lses, outs + lses):
        assert torch.equal(a, b)

    # a shape (another batch layout), a dtype, a scale, causal, a window: one new plan each
    calls = [
        (make_case([[3, 5], [4, 2]], [9, 12], 4, 2, 32, torch.float32), {}),
        (_case(torch.float64), {}),
    ]
    for other, kw in calls:
        o, l_ = _outputs_for(other)
        _fwd_into(other, o, l_, **kw)
        assert not any(torch.isnan(t).any() for t in o)
    assert _plan_count(rfa_ops._FWD_PLANS) == n + 3
    _fwd_into(c, outs, lses, softmax_scale=0.5)
    _fwd_into(c, outs, lses, window_size=(2, 0))
    rfa_ops.fwd_into(*c.op_args(causal=False)[:-1], outs, lses)
    assert _plan_count(rfa_ops._FWD_PLANS) == n + 6


def test_keys_differ_by_device_and_type():
    c = _case()
    outs, lses = _outputs_for(c)
    args = c.op_args()[:-1]

    def key(q_list, k):
        return rfa_ops._fwd_key(q_list, k, *args[2:10], (-1, -1), 0.0, None, None, outs, lses)

    base = key(c.q_list, c.k)
    assert base is not None and base == key([q.clone() for q in c.q_list], c.k.clone())
    assert key(c.q_list, c.k.to("meta")) != base

    class Sub(torch.Tensor):
        pass

    assert key(c.q_list, c.k.as_subclass(Sub)) != base
    # arguments the plans do not take: the full validation decides
    assert key([c.q_list[0], "not a tensor"], c.k) is None
    assert rfa_ops._fwd_key(c.q_list, c.k, *args[2:6], [True, 5], *args[7:10], (-1, -1), 0.0, None, None,
                            outs, lses) is None
    assert rfa_ops._fwd_key(c.q_list, c.k, *args[2:8], 1, *args[9:10], (-1, -1), 0.0, None, None,
                            outs, lses) is None  # an int scale: not a float


def test_threads_and_torch_threads_are_part_of_the_key():
    c = _case()
    outs, lses = _outputs_for(c)
    before = torch.get_num_threads()
    try:
        _fwd_into(c, outs, lses)
        torch.set_num_threads(1 if before != 1 else 2)
        _fwd_into(c, outs, lses)
    finally:
        torch.set_num_threads(before)
    assert _plan_count(rfa_ops._FWD_PLANS) == 2


def test_plans_hold_no_tensor():
    c = _case()
    q_list = [q.clone().requires_grad_() for q in c.q_list]
    k, v = c.k.clone().requires_grad_(), c.v.clone().requires_grad_()
    sinks = torch.randn(4, requires_grad=True)
    outs, lses = _outputs_for(c)
    _fwd_into(c, outs, lses)
    out_list, lse_list = grouped_flash_attn_varlen_func(
        q_list, k, v, c.cu_seqlens_q_list, c.cu_seqlens_k, c.max_seqlen_q_list, c.max_seqlen_k,
        seqused_k_list=c.seqused_k_list, return_lse=True, sinks=sinks, window_size=(4, 0))
    loss = sum(o.sum() for o in out_list) + sum(torch.where(torch.isfinite(x), x, 0.0).sum() for x in lse_list)
    loss.backward()
    _python_kernel_plans(c, q_list, k, v, sinks)
    assert _plan_count(rfa_ops._FWD_PLANS) >= 2 and _plan_count(rfa_ops._BWD_PLANS) >= 1

    watched = [*q_list, k, v, sinks, *out_list, *lse_list, *outs, *lses, c.cu_seqlens_k,
               *c.cu_seqlens_q_list, c.seqused_k_list[1]]
    refs = [weakref.ref(t) for t in watched]
    del q_list, k, v, sinks, out_list, lse_list, outs, lses, loss, watched, c
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} tensors kept alive"
    for cache in (rfa_ops._FWD_PLANS, rfa_ops._BWD_PLANS):
        for key, plan in cache._entries().items():
            assert not _contains_tensor(key)
            assert not any(isinstance(getattr(plan, f), torch.Tensor) for f in plan.__slots__)


def _python_kernel_plans(c, q_list, k, v, sinks) -> None:
    """Plans of an allocating forward and a backward with sinks and a window, from the ops' Python
    kernels (the public call runs libringattn_torch's C++ kernels when it is loaded, which keep no
    plans); nothing of the calls outlives this function."""
    args = (q_list, k, v, *c.op_args()[3:])
    features = dict(window_size=(4, 0), sinks=sinks)
    outs, lses = rfa_ops._grouped_fwd_kernel(*args, **features)
    rfa_ops._grouped_bwd_kernel([torch.ones_like(o) for o in outs], q_list, k, v, outs, lses, *args[3:], **features)


def _contains_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(_contains_tensor(y) for y in x)
    return False


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(rfa_ops._FWD_PLANS, "capacity", 3)
    results = []
    for n in range(1, 7):
        c = make_case([[n], [n + 1]], [n + 2], 2, 1, 32, torch.float32, seed=n)
        outs, lses = _outputs_for(c)
        _fwd_into(c, outs, lses)
        results.append((c, outs))
        assert _plan_count(rfa_ops._FWD_PLANS) == min(n, 3)
    # the evicted shapes run again (a miss) with the same results
    for c, expected in results:
        outs, lses = _outputs_for(c)
        _fwd_into(c, outs, lses)
        for a, b in zip(outs, expected):
            assert torch.equal(a, b)


def test_plans_are_per_thread():
    cases = [_case(seed=s) for s in range(4)]
    expected = []
    for c in cases:
        outs, lses = _outputs_for(c)
        _fwd_into(c, outs, lses)
        expected.append(outs)
    failures = []
    barrier = threading.Barrier(len(cases))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(30):
                outs, lses = _outputs_for(cases[i])
                _fwd_into(cases[i], outs, lses)
                for a, b in zip(outs, expected[i]):
                    if not torch.equal(a, b):
                        failures.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_clear_plan_caches_reaches_other_threads():
    c = _case()
    outs, lses = _outputs_for(c)
    seen = {}

    def run(tag):
        _fwd_into(c, outs, lses)
        seen[tag] = len(rfa_ops._FWD_PLANS)

    t = threading.Thread(target=run, args=("before",))
    t.start()
    t.join()
    assert seen["before"] == 1 and len(rfa_ops._FWD_PLANS) == 0  # the main thread has its own
    rfa_ops.clear_plan_caches()
    assert len(rfa_ops._FWD_PLANS) == 0


# ---- environment settings ---------------------------------------------------------------------


def test_env_setting_follows_the_environment(monkeypatch):
    name = "RING_FLASH_ATTN_TEST_SETTING"
    parsed = []

    def parse(raw):
        parsed.append(raw)
        if raw == "bad":
            raise ValueError("bad value")
        return raw

    setting = _host_cache.EnvSetting(name, parse)
    monkeypatch.delenv(name, raising=False)
    assert setting.get() is None
    monkeypatch.setenv(name, "a")
    assert setting.get() == "a" and setting.get() == "a"
    assert parsed == [None, "a"]  # parsed once per change
    os.environ[name] = "b"
    assert setting.get() == "b"
    monkeypatch.setenv(name, "bad")
    for _ in range(2):  # a value that does not parse is never kept
        with pytest.raises(ValueError, match="bad value"):
            setting.get()
    monkeypatch.setenv(name, "a")
    assert setting.get() == "a"
    monkeypatch.delenv(name)
    assert setting.get() is None


def test_kernel_tier_switches_at_run_time(monkeypatch):
    for value, tier in (("sm80", 80), ("auto", 0), ("SM90", 90), ("", 0)):
        monkeypatch.setenv("RING_FLASH_ATTN_TIER", value)
        assert rfa_ops._kernel_tier() == tier
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm70")
    with pytest.raises(ValueError, match="RING_FLASH_ATTN_TIER"):
        rfa_ops._kernel_tier()
    monkeypatch.delenv("RING_FLASH_ATTN_TIER")
    assert rfa_ops._kernel_tier() == 0


# ---- eager path vs the op path ----------------------------------------------------------------


def _public_run(c, dtype, *, eager: bool, monkeypatch, sinks=None, **kw):
    """Outputs and gradients (q, k, v, sinks) of a loss over out and LSE."""
    monkeypatch.setattr(rfa_ops, "eager_call_ok", rfa_ops.eager_call_ok if eager else (lambda *a: False))
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*c.q_list, c.k, c.v)]
    q_list, k, v = leaves[:-2], leaves[-2], leaves[-1]
    s = None if sinks is None else sinks.detach().clone().requires_grad_()
    outs, lses = grouped_flash_attn_varlen_func(
        q_list, k, v, c.cu_seqlens_q_list, c.cu_seqlens_k, c.max_seqlen_q_list, c.max_seqlen_k,
        seqused_k_list=c.seqused_k_list, return_lse=True, sinks=s, **kw)
    gen = torch.Generator().manual_seed(5)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    loss = loss + sum((torch.where(torch.isfinite(x), x, 0.0).double()
                       * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum() for x in lses)
    grads = torch.autograd.grad(loss, leaves + ([s] if s is not None else []))
    fn_name = type(outs[0].grad_fn).__name__
    return [*outs, *lses, *grads], fn_name


@pytest.mark.parametrize("features", [
    {},
    {"window_size": (5, 0), "softcap": 4.0},
    {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])},
], ids=["plain", "window_softcap", "sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_matches_the_op_path(features, dtype, monkeypatch):
    c = _case()
    eager, eager_fn = _public_run(c, dtype, eager=True, monkeypatch=monkeypatch, **features)
    op, op_fn = _public_run(c, dtype, eager=False, monkeypatch=monkeypatch, **features)
    assert eager_fn != op_fn  # the two paths did run
    assert len(eager) == len(op)
    for a, b in zip(eager, op):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        assert not torch.isnan(a).any()


def test_eager_path_without_grad_and_in_inference_mode():
    c = _case()
    with torch.no_grad():
        a = grouped_flash_attn_varlen_func(*c.api_args(), seqused_k_list=c.seqused_k_list)
    with torch.inference_mode():
        b = grouped_flash_attn_varlen_func(*c.api_args(), seqused_k_list=c.seqused_k_list)
    op_outs, _ = rfa_ops.grouped_fwd(*c.op_args())
    for x, y, z in zip(a, b, op_outs):
        assert x.grad_fn is None and torch.equal(x, z) and torch.equal(y, z)


def test_parameter_sinks_get_their_gradient():
    c = _case()
    sinks = torch.nn.Parameter(torch.tensor([0.1, 0.2, -0.3, 1.0]))
    q_list = [q.clone().requires_grad_() for q in c.q_list]
    outs = grouped_flash_attn_varlen_func(q_list, c.k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k,
                                          c.max_seqlen_q_list, c.max_seqlen_k, sinks=sinks)
    sum(o.sum() for o in outs).backward()
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in q_list)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_ops():
    c = _case()
    q_list = [q.clone().requires_grad_() for q in c.q_list]
    with _RecordOps() as mode:
        outs = grouped_flash_attn_varlen_func(q_list, c.k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k,
                                              c.max_seqlen_q_list, c.max_seqlen_k)
        torch.autograd.grad(outs, q_list, [torch.ones_like(o) for o in outs])
    assert "ring_flash_attn.grouped_fwd.default" in mode.names
    assert "ring_flash_attn.grouped_bwd.default" in mode.names


def test_tensor_subclasses_take_the_op_path():
    class Sub(torch.Tensor):
        pass

    c = _case()
    k = c.k.as_subclass(Sub)
    assert not rfa_ops.eager_call_ok(c.q_list, k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k, [None, None], None)
    outs = grouped_flash_attn_varlen_func(c.q_list, k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k,
                                          c.max_seqlen_q_list, c.max_seqlen_k, seqused_k_list=c.seqused_k_list)
    expected, _ = rfa_ops.grouped_fwd(*c.op_args())
    for a, b in zip(outs, expected):
        assert torch.equal(a.as_subclass(torch.Tensor), b)


def test_profiler_records_the_op():
    c = _case()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        grouped_flash_attn_varlen_func(*c.api_args())
    assert any(e.key == "ring_flash_attn::grouped_fwd" for e in prof.key_averages())


def test_eager_gate_closes_under_modes_and_transforms():
    assert _host_cache.eager_dispatch_ok()
    with _RecordOps():
        assert not _host_cache.eager_dispatch_ok()
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not _host_cache.eager_dispatch_ok()
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not _host_cache.eager_dispatch_ok()
    assert _host_cache.eager_dispatch_ok()


def test_double_backward_is_refused_on_the_eager_path():
    c = _case(torch.float64)
    q_list = [q.clone().requires_grad_() for q in c.q_list]
    k = c.k.clone().requires_grad_()
    outs = grouped_flash_attn_varlen_func(q_list, k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k,
                                          c.max_seqlen_q_list, c.max_seqlen_k)
    dq = torch.autograd.grad(sum(o.pow(2).sum() for o in outs), q_list[0], create_graph=True)[0]
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(dq.sum(), k)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_gradients(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    c = _case()
    douts = [torch.randn_like(q) for q in c.q_list]

    def attention(*qkv):
        outs = grouped_flash_attn_varlen_func(list(qkv[:-2]), qkv[-2], qkv[-1], c.cu_seqlens_q_list, c.cu_seqlens_k,
                                              c.max_seqlen_q_list, c.max_seqlen_k, seqused_k_list=c.seqused_k_list)
        return sum((o * d).sum() for o, d in zip(outs, douts))

    runs = []
    for use_checkpoint in (False, True):
        leaves = [t.clone().requires_grad_() for t in (*c.q_list, c.k, c.v)]
        if use_checkpoint:
            loss = checkpoint(attention, *leaves, use_reentrant=use_reentrant)
        else:
            loss = attention(*leaves)
        loss.backward()
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert a is not None and torch.equal(a, b)


def test_compile_fullgraph_of_flash_attn_varlen_func_sees_the_op():
    """Under torch.compile the public functions trace to the op (the eager gate is constant-folded
    by dynamo), forward and backward, with the eager path's results."""
    c = _case(seqused=False)
    q, k, v = (t.clone().requires_grad_() for t in (c.q_list[0], c.k, c.v))
    cu_q, cu_k = c.cu_seqlens_q_list[0], c.cu_seqlens_k

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, c.max_seqlen_q_list[0], c.max_seqlen_k,
                                             causal=True, return_attn_probs=True)
        return (out * 2).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    eager = torch.autograd.grad(fn(q, k, v), [q, k, v])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v), [q, k, v])
    assert any("ring_flash_attn.grouped_fwd" in g for g in graphs)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
