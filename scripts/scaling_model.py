#!/usr/bin/env python
"""Scaling model of the context-parallel schemes: per GPU, attention compute time vs bytes moved
per training step (forward + backward of one attention layer), and how much of the
communication each scheme hides.

    python scripts/scaling_model.py                       # the tables of docs/scaling.md
    python scripts/scaling_model.py --models llama3-70b --tokens 1048576 --gpus 64 256
    python scripts/scaling_model.py --measured-links links.json   # link rates from a measurement
    python scripts/scaling_model.py --csv scaling.csv     # every row, machine-readable

Inputs (printed at the top of every run with where each comes from):

* kernel rates: measured on one H200 (benchmark/results/2026-12-04_h200_refactor_ab: the per-rank
  zigzag llama3 workload, Llama-3-8B heads, 64K tokens over 8 ranks, tier-2 fused kernel, bf16,
  ranks 0 and 7): forward 659 TFLOPS, forward + backward 515 TFLOPS. A kernel launch with fewer
  128-row query tiles (over its heads) than the 132 SMs is derated in proportion (a model
  assumption, not a measurement);
* link rates: datasheet values unless ``--measured-links`` gives measured ones: NVLink 450 GB/s
  per direction per GPU inside a node, InfiniBand 50 GB/s per GPU across nodes (400 Gb/s NDR, one
  NIC per GPU). ``benchmark/benchmark_collectives.py`` (torchrun) measures the collectives on
  the GPUs at hand and writes that file; keys it may hold (GB/s, bus bandwidth per GPU):
  ``all_gather_intra``, ``reduce_scatter_intra``, ``all_to_all_intra``, ``p2p_intra`` and the
  ``_inter`` forms; a missing key falls back to the datasheet rate of its scope.

The model (one sequence of S tokens, bf16, causal, N GPUs, G GPUs per node; per GPU and layer):

* compute: 4 D Hq S^2 / (2N) FLOPs forward, 3.5x that forward + backward (FlashAttention's
  count), at the measured rates; contiguous layouts (ring, llama3) run at the speed of their
  busiest rank, (2N-1)/N x the average;
* bytes: what the GPU sends (= receives) per step:
    ring, zigzag_ring: N-1 K/V blocks forward, N-1 K/V and dK/dV blocks backward (P2P; across
      nodes every step waits for the inter-node hop);
    llama3, zigzag_llama3: the K/V all-gather forward, again backward, plus the dK/dV
      reduce-scatter, (N-1)/N of the sequence's K/V each, in slices of ``heads_k_stride`` KV heads;
    ulysses: the all-to-all of Q, K, V (KV heads replicated when Hk < N) and O forward, of dO, dQ,
      dK, dV backward, (N-1)/N of the GPU's own shards;
    hybrid (U x K): the all-to-all inside the U GPUs of a node-local group plus zigzag llama3
      (``hybrid``) or zigzag ring attention (``hybrid_ring``) over the K groups on max(Hk, U)/U
      KV heads;
* hiding: a pipeline of n pieces (ring steps, all-gather slices, all-to-all chunks) exposes its
  first piece and whatever of the rest exceeds the compute: exposed = c/n + max(0, c (n-1)/n -
  t); ring steps each expose max(0, block time - step compute). The hybrid's all-to-all is one
  chunk (its default), exposed whole; the schemes pick the smallest ``heads_k_stride`` (most
  pieces) whose launches still fill the GPU.

A scheme HIDES its communication when exposed <= 5% of its compute. The mesh the helper picks is
``ring_flash_attn.choose_hybrid_layout(Hq, Hk, N, G)`` (degrees and the scheme across); the table
also shows the mesh this model finds fastest.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- inputs ----------------------------------------------------------------------------------------

MEASURED_FWD_TFLOPS = 659.0  # H200, refactor_ab: 664.2 (rank 0) and 654.6 (rank 7), tier 2 fused, bf16
MEASURED_FWD_BWD_TFLOPS = 515.0  # H200, refactor_ab: 521.9 (rank 0) and 509.0 (rank 7)
KERNEL_SOURCE = ("measured, one H200, benchmark/results/2026-12-04_h200_refactor_ab (per-rank zigzag llama3, "
                 "Llama-3-8B heads, 64K tokens / 8 ranks, tier-2 fused, bf16)")
NUM_SMS = 132  # H200
TILE_ROWS = 128
FULL_TILES = NUM_SMS  # launches with fewer query tiles than SMs are derated (model assumption)

DATASHEET_GBPS = {"intra": 450.0, "inter": 50.0}  # NVLink 4 per direction per GPU; NDR 400 Gb/s per GPU
COLLECTIVES = ("all_gather", "reduce_scatter", "all_to_all", "p2p")

HIDDEN_FRACTION = 0.05  # exposed <= 5% of compute: the communication is hidden


@dataclass(frozen=True)
class Model:
    name: str
    num_heads_q: int
    num_heads_k: int
    head_dim: int


MODELS = {"llama3-8b": Model("llama3-8b", 32, 8, 128), "llama3-70b": Model("llama3-70b", 64, 8, 128)}
SCHEMES = ("ring", "zigzag_ring", "llama3", "zigzag_llama3", "ulysses", "hybrid", "hybrid_ring")


class Links:
    """GB/s per GPU of each (collective, scope): measured where given, else the datasheet."""

    def __init__(self, measured: Optional[Dict[str, float]] = None, intra_gbps: float = DATASHEET_GBPS["intra"],
                 inter_gbps: float = DATASHEET_GBPS["inter"]):
        self.measured = dict(measured or {})
        self.datasheet = {"intra": intra_gbps, "inter": inter_gbps}

    def gbps(self, collective: str, scope: str) -> float:
        return float(self.measured.get(f"{collective}_{scope}", self.datasheet[scope]))

    def source(self, collective: str, scope: str) -> str:
        return "measured" if f"{collective}_{scope}" in self.measured else "datasheet"

    def seconds(self, nbytes: float, collective: str, scope: str) -> float:
        return nbytes / (self.gbps(collective, scope) * 1e9)


def derating(tiles: int) -> float:
    """The fraction of the measured rate a launch of ``tiles`` query tiles reaches (model assumption)."""
    return min(1.0, tiles / FULL_TILES)


@dataclass
class Rates:
    fwd_tflops: float = MEASURED_FWD_TFLOPS
    fwd_bwd_tflops: float = MEASURED_FWD_BWD_TFLOPS

    def times(self, fwd_flops: float, tiles: int) -> Tuple[float, float]:
        """(forward s, backward s) of ``fwd_flops`` forward FLOPs in launches of ``tiles`` query tiles."""
        derate = derating(tiles)
        t_fwd = fwd_flops / (self.fwd_tflops * 1e12 * derate)
        t_all = 3.5 * fwd_flops / (self.fwd_bwd_tflops * 1e12 * derate)
        return t_fwd, max(t_all - t_fwd, 0.0)


# ---- the model ----------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    tokens: int
    gpus: int
    scheme: str
    mesh: str  # "U x K" for the hybrid, "" otherwise
    compute_ms: float  # forward + backward
    bytes_gb: float  # sent per GPU per step (forward + backward)
    comm_ms: float  # the communication alone, forward + backward
    exposed_ms: float  # not hidden behind compute
    feasible: str = ""  # why the scheme cannot run this shape (empty: it can)
    derate: float = 1.0  # the kernel launches' fraction of the measured rate (< 1: they underfill the GPU)

    @property
    def step_ms(self) -> float:
        return self.compute_ms + self.exposed_ms

    @property
    def exposed_fraction(self) -> float:
        return self.exposed_ms / self.compute_ms if self.compute_ms > 0 else math.inf

    @property
    def hides(self) -> bool:
        return not self.feasible and self.exposed_fraction <= HIDDEN_FRACTION


def pipeline_exposed(comm_s: float, compute_s: float, pieces: int) -> float:
    """Exposed time of ``pieces`` transfers pipelined against ``compute_s`` of compute."""
    pieces = max(pieces, 1)
    return comm_s / pieces + max(0.0, comm_s * (pieces - 1) / pieces - compute_s)


def _scope(ranks: int, stride: int, per_node: int) -> str:
    """Whether a group of ``ranks`` GPUs, ``stride`` apart in rank order, spans nodes."""
    return "intra" if (ranks - 1) * stride < per_node and per_node % max(stride, 1) == 0 else "inter"


def _causal_fwd_flops(model: Model, tokens: int, gpus: int, balanced: bool) -> float:
    flops = 4.0 * model.head_dim * model.num_heads_q * tokens * tokens / 2 / gpus
    return flops if balanced else flops * (2 * gpus - 1) / gpus


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tiles(query_rows: int, heads: int) -> int:
    return max(1, math.ceil(query_rows / TILE_ROWS)) * heads


def _stride_for(heads_k: int, query_rows: int, q_per_k: int) -> int:
    """The smallest heads_k_stride (most slices) whose launches still fill the GPU."""
    for hs in _divisors(heads_k):
        if _tiles(query_rows, hs * q_per_k) >= FULL_TILES:
            return hs
    return heads_k


def ring_scheme(model: Model, tokens: int, gpus: int, per_node: int, links: Links, rates: Rates, bytes_el: int,
                grad_bytes: int, zigzag: bool, group_stride: int = 1) -> Result:
    name = "zigzag_ring" if zigzag else "ring"
    D, Hq, Hk, N = model.head_dim, model.num_heads_q, model.num_heads_k, gpus
    T = tokens // N
    fwd_flops = _causal_fwd_flops(model, tokens, N, balanced=zigzag)
    tiles = _tiles(T // 2 if zigzag else T, Hq)
    t_fwd, t_bwd = rates.times(fwd_flops, tiles)
    block = 2 * T * Hk * D * bytes_el  # K and V of one rank
    dblock = 2 * T * Hk * D * grad_bytes
    scope = _scope(N, group_stride, per_node)
    steps = N - 1
    step_fwd = links.seconds(block, "p2p", scope)
    step_bwd = links.seconds(block + dblock, "p2p", scope)
    exposed = steps * (max(0.0, step_fwd - t_fwd / N) + max(0.0, step_bwd - t_bwd / N))
    nbytes = steps * (2 * block + dblock)
    comm = steps * (step_fwd + step_bwd)
    return Result(model.name, tokens, gpus, name, "", (t_fwd + t_bwd) * 1e3, nbytes / 1e9, comm * 1e3, exposed * 1e3,
                  derate=derating(tiles))


def all_gather_scheme(model: Model, tokens: int, gpus: int, per_node: int, links: Links, rates: Rates,
                      bytes_el: int, grad_bytes: int, zigzag: bool, group_stride: int = 1,
                      name: Optional[str] = None) -> Result:
    """llama3 / zigzag llama3 over ``gpus`` ranks, ``group_stride`` apart in rank order."""
    name = name or ("zigzag_llama3" if zigzag else "llama3")
    D, N = model.head_dim, gpus
    Hk, Hq = model.num_heads_k, model.num_heads_q
    T = tokens // N
    fwd_flops = _causal_fwd_flops(model, tokens, N, zigzag)
    hs = _stride_for(Hk, T, Hq // Hk)
    slices = Hk // hs
    tiles = _tiles(T, hs * Hq // Hk)
    t_fwd, t_bwd = rates.times(fwd_flops, tiles)
    gathered = (N - 1) / N * 2 * tokens * Hk * D  # K and V elements each rank receives
    scope = _scope(N, group_stride, per_node)
    ag = links.seconds(gathered * bytes_el, "all_gather", scope)
    rs = links.seconds(gathered * grad_bytes, "reduce_scatter", scope)
    exposed = pipeline_exposed(ag, t_fwd, slices) + pipeline_exposed(ag + rs, t_bwd, slices)
    nbytes = gathered * (2 * bytes_el + grad_bytes)
    return Result(model.name, tokens, gpus, name, "", (t_fwd + t_bwd) * 1e3, nbytes / 1e9, (2 * ag + rs) * 1e3,
                  exposed * 1e3, derate=derating(tiles))


def _head_split(Hq: int, Hk: int, degree: int) -> Optional[int]:
    """KV replication factor of a head split over ``degree`` ranks, None when impossible."""
    if Hq % degree:
        return None
    if Hk % degree == 0:
        return 1
    if degree % Hk == 0:
        return degree // Hk
    return None


def _all_to_all(model: Model, tokens_local: int, degree: int, per_node: int, links: Links, bytes_el: int):
    """(bytes sent per GPU per step, seconds forward, seconds backward) of the Ulysses all-to-all."""
    D, Hq, Hk = model.head_dim, model.num_heads_q, model.num_heads_k
    hk_rep = max(Hk, degree)
    per_pass = (degree - 1) / degree * tokens_local * D * bytes_el * (2 * Hq + 2 * hk_rep)  # fwd: Q,K,V in, O out
    if degree <= per_node and per_node % degree == 0:
        t = links.seconds(per_pass, "all_to_all", "intra")
    else:  # the part for the other nodes goes over the slower links
        inter = per_pass * (degree - per_node) / (degree - 1)
        t = max(links.seconds(per_pass - inter, "all_to_all", "intra"), links.seconds(inter, "all_to_all", "inter"))
    return 2 * per_pass, t, t


def ulysses_scheme(model: Model, tokens: int, gpus: int, per_node: int, links: Links, rates: Rates,
                   bytes_el: int) -> Result:
    D, Hq, Hk, N = model.head_dim, model.num_heads_q, model.num_heads_k, gpus
    rep = _head_split(Hq, Hk, N)
    if rep is None:
        return Result(model.name, tokens, gpus, "ulysses", "", math.nan, math.nan, math.nan, math.nan,
                      feasible=f"{Hq} query heads / {Hk} KV heads cannot be split over {N} ranks")
    hk_loc = max(Hk, N) // N
    hq_loc = Hq // N
    fwd_flops = _causal_fwd_flops(model, tokens, N, balanced=True)
    chunk = _stride_for(hk_loc, tokens, hq_loc // hk_loc)
    chunks = hk_loc // chunk
    tiles = _tiles(tokens, chunk * hq_loc // hk_loc)
    t_fwd, t_bwd = rates.times(fwd_flops, tiles)
    nbytes, a2a_fwd, a2a_bwd = _all_to_all(model, tokens // N, N, per_node, links, bytes_el)
    # in and out: two transfers per pass, each pipelined over the chunks
    exposed = pipeline_exposed(2 * a2a_fwd, t_fwd, chunks) + pipeline_exposed(2 * a2a_bwd, t_bwd, chunks)
    return Result(model.name, tokens, gpus, "ulysses", "", (t_fwd + t_bwd) * 1e3, nbytes / 1e9,
                  2 * (a2a_fwd + a2a_bwd) * 1e3, exposed * 1e3, derate=derating(tiles))


def hybrid_scheme(model: Model, tokens: int, gpus: int, per_node: int, links: Links, rates: Rates, bytes_el: int,
                  grad_bytes: int, ulysses_degree: int, across: str = "zigzag_llama3") -> Result:
    """The hybrid on a ``ulysses_degree`` x N/``ulysses_degree`` mesh with ``across`` (zigzag_llama3 or
    zigzag_ring) over the KV groups."""
    U, N = ulysses_degree, gpus
    K = N // U
    mesh = f"{U}x{K}"
    name = "hybrid" if across == "zigzag_llama3" else "hybrid_ring"
    rep = _head_split(model.num_heads_q, model.num_heads_k, U)
    if rep is None or N % U or tokens % (2 * K):
        return Result(model.name, tokens, gpus, name, mesh, math.nan, math.nan, math.nan, math.nan,
                      feasible=f"mesh {mesh} does not fit {model.num_heads_q}/{model.num_heads_k} heads")
    hk_loc = max(model.num_heads_k, U) // U
    hq_loc = model.num_heads_q // U
    sub = Model(model.name, hq_loc, hk_loc, model.head_dim)
    # the scheme across the K groups on hq_loc / hk_loc heads: its compute per GPU is the same as
    # N ranks on all heads; it spans nodes when the mesh does (its ranks are U apart)
    if across == "zigzag_llama3":
        inner = all_gather_scheme(sub, tokens, K, per_node, links, rates, bytes_el, grad_bytes, zigzag=True,
                                  group_stride=U, name=name)
    else:
        inner = ring_scheme(sub, tokens, K, per_node, links, rates, bytes_el, grad_bytes, zigzag=True,
                            group_stride=U)
    a2a_bytes, a2a_fwd, a2a_bwd = _all_to_all(model, tokens // N, U, per_node, links, bytes_el)
    exposed = inner.exposed_ms / 1e3 + 2 * (a2a_fwd + a2a_bwd)  # one all-to-all chunk: nothing to overlap
    return Result(model.name, tokens, gpus, name, mesh, inner.compute_ms, inner.bytes_gb + a2a_bytes / 1e9,
                  inner.comm_ms + 2 * (a2a_fwd + a2a_bwd) * 1e3, exposed * 1e3, derate=inner.derate)


def helper_layout(model: Model, gpus: int, per_node: int) -> Tuple[int, str]:
    """(ulysses_degree, scheme across) of the package's ``choose_hybrid_layout`` (imported from
    python/; without torch, the same rule)."""
    try:
        try:
            from ring_flash_attn.cp.mesh import choose_hybrid_layout
        except ImportError:  # a checkout without the package installed: python/ of the tree
            # (appended, so an installed package keeps precedence in this process and in any
            # process it spawns, which inherit sys.path)
            python_dir = os.path.join(_ROOT, "python")
            if python_dir not in sys.path:
                sys.path.append(python_dir)
            from ring_flash_attn.cp.mesh import choose_hybrid_layout

        layout = choose_hybrid_layout(model.num_heads_q, model.num_heads_k, gpus, per_node)
        return layout.ulysses_degree, layout.kv_scheme
    except ImportError:
        limit = math.gcd(gpus, per_node)
        U = max(u for u in _divisors(limit) if _head_split(model.num_heads_q, model.num_heads_k, u) is not None)
        ring = gpus // U > 1 and gpus > per_node and max(model.num_heads_k, U) // U == 1
        return U, "zigzag_ring" if ring else "zigzag_llama3"


def evaluate(model: Model, tokens: int, gpus: int, per_node: int, links: Links, rates: Rates, bytes_el: int = 2,
             grad_bytes: int = 2) -> Tuple[List[Result], Result, Result]:
    """Every scheme at one point; returns (results, the helper's hybrid, the model's best hybrid)."""
    results = [
        ring_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, zigzag=False),
        ring_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, zigzag=True),
        all_gather_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, zigzag=False),
        all_gather_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, zigzag=True),
        ulysses_scheme(model, tokens, gpus, per_node, links, rates, bytes_el),
    ]
    U, across_picked = helper_layout(model, gpus, per_node)
    for across in ("zigzag_llama3", "zigzag_ring"):
        results.append(hybrid_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, U, across))
    meshes = [hybrid_scheme(model, tokens, gpus, per_node, links, rates, bytes_el, grad_bytes, u, across)
              for u in _divisors(gpus) for across in ("zigzag_llama3", "zigzag_ring")]
    meshes = [m for m in meshes if not m.feasible]
    picked = results[-2] if across_picked == "zigzag_llama3" else results[-1]
    best = min(meshes, key=lambda m: m.step_ms) if meshes else picked
    return results, picked, best


# ---- output ---------------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def _tokens_label(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def print_inputs(links: Links, rates: Rates, per_node: int) -> None:
    print("Inputs")
    print(f"  kernel rates: forward {rates.fwd_tflops:g} TFLOPS, forward+backward {rates.fwd_bwd_tflops:g} TFLOPS "
          f"({KERNEL_SOURCE if (rates.fwd_tflops, rates.fwd_bwd_tflops) == (MEASURED_FWD_TFLOPS, MEASURED_FWD_BWD_TFLOPS) else 'given on the command line'}); "
          f"launches under {FULL_TILES} query tiles derated in proportion (model assumption)")
    for scope in ("intra", "inter"):
        parts = [f"{c} {links.gbps(c, scope):g} ({links.source(c, scope)})" for c in COLLECTIVES]
        where = f"inside a node of {per_node} GPUs" if scope == "intra" else "across nodes"
        print(f"  links {where}, GB/s per GPU: " + ", ".join(parts))
    print(f"  hidden: exposed communication <= {HIDDEN_FRACTION:.0%} of compute; per GPU, one attention layer, "
          f"forward + backward, bf16, causal, one sequence")


def _mesh_label(r: Result) -> str:
    return f"{r.mesh} {'ring' if r.scheme == 'hybrid_ring' else 'ag'}"


def _box(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def print_table(model: Model, token_list: Sequence[int], gpu_list: Sequence[int], per_node: int, links: Links,
                rates: Rates, csv_rows: Optional[list], grad_bytes: int) -> None:
    print(f"\n{model.name} ({model.num_heads_q} Q heads, {model.num_heads_k} KV heads, head_dim {model.head_dim}): "
          f"per GPU and layer, GB sent / step ms (forward + backward)")
    header = ["tokens", "GPUs", "compute ms"] + list(SCHEMES) + ["helper mesh", "best mesh"]
    rows = []
    for tokens in token_list:
        for gpus in gpu_list:
            if tokens % (2 * gpus):
                continue
            results, picked, best = evaluate(model, tokens, gpus, per_node, links, rates, grad_bytes=grad_bytes)
            cells = [_tokens_label(tokens), str(gpus), _fmt(results[3].compute_ms)]
            for r in results:
                marks = ("" if r.hides else "*") + ("" if r.derate >= 1.0 else "~")
                cells.append("n/a" if r.feasible else f"{_fmt(r.bytes_gb, 2)} / {_fmt(r.step_ms)}{' ' + marks if marks else ''}")
            slower = picked.step_ms / best.step_ms - 1
            note = "" if slower < 0.005 else f" (+{_fmt(100 * slower, 0)}%)"
            cells += [_mesh_label(picked) + note, _mesh_label(best)]
            rows.append(cells)
            if csv_rows is not None:
                for r in results:
                    csv_rows.append(dict(model=model.name, tokens=tokens, gpus=gpus, scheme=r.scheme, mesh=r.mesh,
                                         compute_ms=_fmt(r.compute_ms, 3), bytes_gb=_fmt(r.bytes_gb, 4),
                                         comm_ms=_fmt(r.comm_ms, 3), exposed_ms=_fmt(r.exposed_ms, 3),
                                         step_ms=_fmt(r.step_ms, 3), hides=str(r.hides), feasible=r.feasible or "yes",
                                         best_mesh=_mesh_label(best) if r.scheme.startswith("hybrid") else ""))
    _box(header, rows)
    print("compute ms: zigzag llama3's attention kernels alone. * = exposed communication above 5% of the scheme's "
          "compute (contiguous ring / llama3 compute at their busiest rank's pace); ~ = its launches underfill the "
          "GPU (derated, a model assumption). n/a: the heads cannot be split over that many ranks. hybrid: zigzag "
          "llama3 (ag) across the KV groups, hybrid_ring: zigzag ring (ring); helper mesh: choose_hybrid_layout's "
          "(+x%: slower than the best mesh under this model)")


def print_thresholds(model: Model, token_list: Sequence[int], gpu_list: Sequence[int], per_node: int, links: Links,
                     rates: Rates, grad_bytes: int) -> None:
    """Per scheme and GPU count: the shortest sequence of the grid at which it hides its communication."""
    print(f"\n{model.name}: shortest sequence (of {', '.join(_tokens_label(t) for t in token_list)}) at which each "
          f"scheme hides its communication")
    header = ["GPUs", "tokens/GPU at 128K"] + list(SCHEMES)
    rows = []
    for gpus in gpu_list:
        cells = [str(gpus), str(131072 // gpus)]
        for i, scheme in enumerate(SCHEMES):
            found = "never"
            for tokens in token_list:
                if tokens % (2 * gpus):
                    continue
                r = evaluate(model, tokens, gpus, per_node, links, rates, grad_bytes=grad_bytes)[0][i]
                if r.feasible:
                    found = "n/a"
                    break
                if r.hides:
                    found = _tokens_label(tokens) + ("" if r.derate >= 1.0 else "~")
                    break
            cells.append(found)
        rows.append(cells)
    _box(header, rows)
    print("~ = there, the scheme's launches underfill the GPU (derated): the kernels, not the links, limit the step")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Inputs and the model: the docstring at the top of scripts/scaling_model.py "
                                       "and docs/scaling.md.")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                   help="attention shapes (default: both)")
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576],
                   help="sequence lengths S (default: 131072 262144 524288 1048576)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024],
                   help="GPU counts N (default: 8 to 1024, powers of 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="default: 8")
    p.add_argument("--nvlink-gbps", type=float, default=DATASHEET_GBPS["intra"],
                   help="datasheet rate inside a node, GB/s per direction per GPU (default: 450)")
    p.add_argument("--ib-gbps", type=float, default=DATASHEET_GBPS["inter"],
                   help="datasheet rate across nodes, GB/s per GPU (default: 50)")
    p.add_argument("--measured-links", default=None,
                   help="JSON of measured GB/s per GPU: all_gather_intra, all_to_all_intra, ... (benchmark_collectives.py)")
    p.add_argument("--fwd-tflops", type=float, default=MEASURED_FWD_TFLOPS,
                   help=f"forward kernel rate (default: {MEASURED_FWD_TFLOPS:g}, measured on one H200)")
    p.add_argument("--fwd-bwd-tflops", type=float, default=MEASURED_FWD_BWD_TFLOPS,
                   help=f"forward + backward kernel rate (default: {MEASURED_FWD_BWD_TFLOPS:g}, measured on one H200)")
    p.add_argument("--grad-bytes", type=int, default=2, choices=(2, 4),
                   help="bytes per element of the dK/dV traffic (2: bf16, the default; 4: fp32)")
    p.add_argument("--csv", default=None, help="write every (model, tokens, GPUs, scheme) row here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    measured = None
    if args.measured_links:
        with open(args.measured_links) as f:
            measured = {k: float(v) for k, v in json.load(f).items() if isinstance(v, (int, float))}
    links = Links(measured, args.nvlink_gbps, args.ib_gbps)
    rates = Rates(args.fwd_tflops, args.fwd_bwd_tflops)
    print_inputs(links, rates, args.gpus_per_node)
    csv_rows: Optional[list] = [] if args.csv else None
    for name in args.models:
        model = MODELS[name]
        print_table(model, args.tokens, args.gpus, args.gpus_per_node, links, rates, csv_rows, args.grad_bytes)
        print_thresholds(model, args.tokens, args.gpus, args.gpus_per_node, links, rates, args.grad_bytes)
    if csv_rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(csv_rows)
        print(f"\nwrote {len(csv_rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
