"""test/test_all_to_all_gpu.py (the torchrun GPU check of Ulysses and the hybrid) in its --device cpu
mode: gloo, the CPU backend, tiny lengths. Every case passes on 2 ranks, and a Ulysses function
returning a wrong output makes the script report FAIL and exit 1."""

from __future__ import annotations

import os

from dist_harness import assert_every_case_passes, run_failing_driver, verdict_lines

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT = os.path.join(_HERE, "test_all_to_all_gpu.py")


def test_every_case_passes_on_two_gloo_ranks():
    # Ulysses 8 func + kvpacked + qkvpacked, batched 8, hybrid 2 meshes x 3 schemes x 2 + kvpacked
    stdout = assert_every_case_passes(_SCRIPT, 31)
    assert stdout.count("mesh 2x1") == 7 and stdout.count("mesh 1x2") == 6


def test_a_wrong_output_fails(tmp_path):
    """ulysses_flash_attn_varlen_func returning 1.05 x its output (one rank, in-process launch): its
    func cases FAIL, the batched ones pass, the exit status is 1."""
    stdout = run_failing_driver(tmp_path, f"""
        import sys
        sys.path.insert(0, {_HERE!r})
        import test_all_to_all_gpu as t
        good = t.rfa.ulysses_flash_attn_varlen_func
        def scaled(*args, **kw):
            res = good(*args, **kw)
            return (res[0] * 1.05,) + tuple(res[1:]) if isinstance(res, tuple) else res * 1.05
        t.rfa.ulysses_flash_attn_varlen_func = scaled
        sys.exit(t.main(["--device", "cpu", "--kinds", "ulysses", "ulysses_batched"]))
    """)
    failed = [ln for ln in verdict_lines(stdout) if ln.startswith("FAIL ")]
    assert len(failed) == 8 and all(" ulysses " in ln and " func " in ln for ln in failed), stdout
    assert "10 PASS / 8 FAIL" in stdout
