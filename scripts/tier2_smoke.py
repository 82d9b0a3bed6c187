#!/usr/bin/env python3
"""Quick first look at the tier-2 (sm90a) kernels on the device, before the full suites: a few
varlen shapes on both tiers against an fp32 reference (max errors), forward and backward, then one timing of each tier
next to PyTorch's SDPA at L=16384 (one group, full causal). Run under `timeout`: a pipeline bug
shows up as a hang. Prints one line per check; exit code 1 if any check fails, 2 without a CUDA GPU.

    RING_FLASH_ATTN_LIBRARY=build/device/libringattn.so PYTHONPATH=python python scripts/tier2_smoke.py
    ... --timing-only      (the timing alone)
    ... --tiny             (small tier-2 cases per head dim, no timing: for compute-sanitizer)
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "test"))
from reference import grouped_attention_reference  # noqa: E402

import ring_flash_attn as rfa  # noqa: E402


def cu(lengths):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device="cuda")


def check(tier, d, causal, dtype, lq, lk, hq=8, hk=2):
    os.environ["RING_FLASH_ATTN_TIER"] = tier
    torch.manual_seed(d * 7 + causal)
    q = torch.randn(sum(lq), hq, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lk), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lk), hk, d, device="cuda", dtype=dtype)
    cq, ck = cu(lq), cu(lk)
    out, lse = rfa.grouped_flash_attn_varlen_func([q], k, v, [cq], ck, [max(lq)], max(lk), causal=causal,
                                                  return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = grouped_attention_reference([q.float()], k.float(), v.float(), [cq], ck, None, None, causal)
    lowp, _ = grouped_attention_reference([q], k, v, [cq], ck, None, None, causal)
    err = (out[0].float() - ref[0]).abs().max().item()
    base = (lowp[0].float() - ref[0]).abs().max().item()
    fin = torch.isfinite(ref_lse[0])
    lse_err = (lse[0][fin] - ref_lse[0][fin]).abs().max().item() if fin.any() else 0.0
    ok = (not torch.isnan(out[0]).any().item()) and err <= 2 * base + 1e-4 and lse_err < 2e-3
    print(f"{'ok  ' if ok else 'FAIL'} tier={tier} D={d} causal={int(causal)} {str(dtype)[6:]} lq={lq} lk={lk}: "
          f"err {err:.2e} (bound {2 * base + 1e-4:.2e}), lse err {lse_err:.2e}", flush=True)
    return ok


def check_bwd(tier, d, causal, dtype, lq, lk, hq=8, hk=2, deterministic=False):
    os.environ["RING_FLASH_ATTN_TIER"] = tier
    torch.manual_seed(d * 11 + causal)
    q = torch.randn(sum(lq), hq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), hk, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), hk, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(sum(lq), hq, d, device="cuda", dtype=dtype)
    cq, ck = cu(lq), cu(lk)
    out = rfa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, deterministic=deterministic)
    got = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()

    def ref(cast):
        xs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o, _ = grouped_attention_reference([xs[0]], xs[1], xs[2], [cq], ck, None, None, causal)
        return torch.autograd.grad(o[0], xs, dout.to(cast))

    r32, rlp = ref(torch.float32), ref(dtype)
    ok = True
    parts = []
    for name, a, b, c in zip(("dq", "dk", "dv"), got, r32, rlp):
        err = (a.float() - b).abs().max().item()
        bound = 2 * (c.float() - b).abs().max().item() + 1e-4
        ok &= (not torch.isnan(a).any().item()) and err <= bound
        parts.append(f"{name} {err:.1e}/{bound:.1e}")
    print(f"{'ok  ' if ok else 'FAIL'} bwd tier={tier} D={d} causal={int(causal)} det={int(deterministic)} "
          f"{str(dtype)[6:]} lq={lq} lk={lk}: " + ", ".join(parts), flush=True)
    return ok


def timing(L=16384, hq=32, hk=8, d=128, iters=20):
    q = torch.randn(L, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(L, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(L, hk, d, device="cuda", dtype=torch.bfloat16)
    c = cu([L])
    flops = 4 * d * hq * L * (L + 1) / 2

    def bench(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            fn()
        t1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(t1) / iters

    rows = []
    for tier in ("sm90", "sm80"):
        os.environ["RING_FLASH_ATTN_TIER"] = tier
        ms = bench(lambda: rfa.flash_attn_varlen_func(q, k, v, c, c, L, L, causal=True))
        rows.append((f"ours tier {tier}", ms))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                                    enable_gqa=True))
            rows.append((name, ms))
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {str(e).splitlines()[0]}")
    for name, ms in rows:
        print(f"time L={L} Hq={hq} Hk={hk} D={d} causal bf16: {name:16s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOPS",
              flush=True)


def main():
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        return 0
    if not torch.cuda.is_available():
        print("tier2_smoke.py: needs a CUDA GPU (an sm90 card for the tier-2 checks); none is available",
              file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()} cc {torch.cuda.get_device_capability()}", flush=True)
    if "--timing-only" in sys.argv:
        timing()
        return 0
    ok = True
    t0 = time.time()
    if "--tiny" in sys.argv:  # under compute-sanitizer: one forward and one backward per head dim
        for d in (64, 128):
            ok &= check("sm90", d, True, torch.bfloat16, [300, 1, 129], [513, 129, 64])
            ok &= check_bwd("sm90", d, True, torch.bfloat16, [300, 1, 129], [513, 129, 64])
        ok &= check_bwd("sm90", 128, True, torch.bfloat16, [300, 1, 129], [513, 129, 64], deterministic=True)
        ok &= check("sm90", 256, True, torch.bfloat16, [300, 1, 129], [513, 129, 64])
        ok &= check_bwd("sm90", 256, True, torch.bfloat16, [300, 1, 129], [513, 129, 64])
        ok &= check_bwd("sm90", 256, False, torch.float16, [300, 1, 129], [513, 129, 64], deterministic=True)
        print("SMOKE " + ("PASS" if ok else "FAIL"), flush=True)
        return 0 if ok else 1
    for d in (64, 128):
        for causal in (True, False):
            for tier in ("sm90", "sm80"):
                ok &= check(tier, d, causal, torch.bfloat16, [128], [128])
                ok &= check(tier, d, causal, torch.bfloat16, [300, 1, 129], [513, 129, 64])
    ok &= check("sm90", 128, True, torch.float16, [1000, 77], [1000, 700])
    ok &= check("sm90", 64, False, torch.float16, [5, 2048], [3000, 2048])
    for causal in (True, False):
        ok &= check("sm90", 256, causal, torch.bfloat16, [300, 1, 129], [513, 129, 64])
        ok &= check("sm90", 256, causal, torch.float16, [1000, 77], [1000, 700])
    for d in (64, 128):
        for causal in (True, False):
            for tier in ("sm90", "sm80"):
                ok &= check_bwd(tier, d, causal, torch.bfloat16, [300, 1, 129], [513, 129, 64])
    ok &= check_bwd("sm90", 128, True, torch.bfloat16, [1000, 77], [1000, 700], deterministic=True)
    ok &= check_bwd("sm90", 128, False, torch.float16, [300, 1, 129], [513, 129, 64], deterministic=True)
    ok &= check_bwd("sm90", 64, True, torch.bfloat16, [300, 1, 129], [513, 129, 64], deterministic=True)
    ok &= check_bwd("sm90", 64, False, torch.bfloat16, [1000, 77], [1000, 700], deterministic=True)
    ok &= check_bwd("sm90", 128, True, torch.float16, [2048], [2048], hq=16, hk=4)
    # Head dim 256: the dK/dV kernel's head-split loop, and the dQ kernel with 32-key blocks.
    for causal in (True, False):
        ok &= check_bwd("sm90", 256, causal, torch.bfloat16, [300, 1, 129], [513, 129, 64])
        ok &= check_bwd("sm90", 256, causal, torch.float16, [1000, 77], [1000, 700], deterministic=True)
    ok &= check_bwd("sm90", 256, True, torch.bfloat16, [2048], [2048], hq=16, hk=4)
    print(f"checks took {time.time() - t0:.1f} s", flush=True)
    if ok:
        timing()
    print("SMOKE " + ("PASS" if ok else "FAIL"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
