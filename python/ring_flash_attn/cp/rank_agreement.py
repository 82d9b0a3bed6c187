"""Cross-rank agreement of a context-parallel call's arguments (opt-in: ``RING_FLASH_ATTN_CHECK_METADATA=1``).

Every rank of the group must call a scheme with the same shapes, dtypes and flags, and with
metadata taken from the same global batch. Ranks that disagree either compute a silently wrong
result (different valid ``cu_seqlens``, ``causal``, ``softmax_scale``) or, where the sizes of a
collective differ (shapes, dtypes, ``heads_k_stride``), abort inside the communication library
(gloo: SIGABRT; NCCL: a hang or a crash) without a Python error.

With the check on (``RING_FLASH_ATTN_CHECK_METADATA=1`` on every rank; it already makes the
schemes read metadata values on the host), every call first exchanges a FINGERPRINT of its
arguments: one all-gather of a fixed-size int64 tensor (``SLOTS`` entries whatever the
arguments, so the exchange itself cannot disagree on sizes), read once on the host. Every rank
then raises the same RuntimeError naming the first field that differs and each rank's value,
e.g. ``ranks disagree on causal: rank 0 True, rank 1 False``, before any collective whose size
depends on the arguments. A fingerprint holds:

* a header: a marker, the rank's status (its own argument checks passed, or raised), the scheme
  (its name, as text);
* fields that must be equal on every rank: shapes, dtypes, flags, the effective softmax scale,
  hints, and hashes of cu_seqlens tensors computed on their device (no host read besides the
  one of the gathered fingerprints);
* per-rank facts that a scheme checks for consistency across the ranks (the contiguous llama3
  layout's metadata differs from rank to rank: each rank's sequence boundaries are compared with
  the other ranks').

A rank whose own argument checks raise still takes part in the exchange (``validating``): the
other ranks raise a RuntimeError naming it instead of waiting for it in a collective it never
joins. Without the check nothing is exchanged and nothing is read: ranks that disagree get the
wrong results or aborts described above.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .validation import ENV_CHECK_METADATA

__all__ = ["SLOTS", "ConsistencyCheck", "Fingerprint", "RankAgreement", "cross_rank_checks_enabled", "device_of",
           "effective_scale"]

SLOTS = 64  # int64 entries of every fingerprint
_MARKER = 0x5246414350434B31  # identifies a fingerprint of this package
_STATUS_OK, _STATUS_FAILED = 1, 2
_NAME_SLOTS = 5  # the scheme name, 8 ASCII bytes per slot
_HEADER = 3 + _NAME_SLOTS  # marker, status, number of used slots, name

_HASH_MODULUS = 2**31 - 1  # prime; every product below stays under 2^62
_HASH_WEIGHT_1 = 1_000_003
_HASH_WEIGHT_2 = 48_271

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def cross_rank_checks_enabled(values_checked: bool) -> bool:
    """Whether calls exchange fingerprints: ``RING_FLASH_ATTN_CHECK_METADATA=1`` and the scheme
    reads metadata values (``values_checked``: its ``metadata_checks_enabled(device)``)."""
    return values_checked and os.environ.get(ENV_CHECK_METADATA, "0") == "1"


def device_of(x: object) -> torch.device:
    """x's device if x is a tensor, else the CPU (for a rank whose argument is not a tensor)."""
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _hash_on_device(t: Tensor) -> Tensor:
    """int64 ``[2]``: two weighted sums modulo 2^31 - 1 of t's entries (computed on t's device, no
    host read); any change of one entry changes both."""
    x = t.reshape(-1).to(torch.int64).remainder(_HASH_MODULUS)
    i = torch.arange(1, x.numel() + 1, dtype=torch.int64, device=t.device)
    w1 = (i * _HASH_WEIGHT_1).remainder_(_HASH_MODULUS)
    w2 = (i * i).remainder_(_HASH_MODULUS).mul_(_HASH_WEIGHT_2).remainder_(_HASH_MODULUS)
    h1 = (x * w1).remainder_(_HASH_MODULUS).sum().remainder(_HASH_MODULUS)
    h2 = (x * w2).remainder_(_HASH_MODULUS).sum().remainder(_HASH_MODULUS)
    return torch.stack([h1, h2])


def _render_bool(v: List[int]) -> str:
    return str(bool(v[0]))


def _render_int(v: List[int]) -> str:
    return str(v[0])


def _render_shape(v: List[int]) -> str:
    return str(tuple(v))


def _render_dtype(v: List[int]) -> str:
    return str(_DTYPES[v[0]]) if 0 <= v[0] < len(_DTYPES) else f"dtype #{v[0]}"


def _render_real(v: List[int]) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", v[0]))[0])


def _render_hash(v: List[int]) -> str:
    return f"hash {v[0]:08x}{v[1]:08x}"


@dataclass
class _Field:
    name: str
    offset: int
    size: int
    render: Callable[[List[int]], str]
    per_rank: bool = False


class Fingerprint:
    """What a call's fingerprint holds, in order. Field names are what the error message says
    differs (e.g. "causal", "the shape of q"). ``local`` facts are per rank: not compared for
    equality but given to the scheme's consistency check."""

    def __init__(self) -> None:
        self.fields: List[_Field] = []
        self._host: List[int] = []
        self._device: List[tuple] = []  # (offset, int64 tensor)

    def _add(self, name: str, values: List[int], render, per_rank: bool = False) -> "Fingerprint":
        self.fields.append(_Field(name, _HEADER + len(self._host), len(values), render, per_rank))
        self._host.extend(values)
        if _HEADER + len(self._host) > SLOTS:
            raise AssertionError(f"a fingerprint holds at most {SLOTS - _HEADER} values")
        return self

    def flag(self, name: str, value: bool) -> "Fingerprint":
        return self._add(name, [int(bool(value))], _render_bool)

    def integer(self, name: str, value: int) -> "Fingerprint":
        return self._add(name, [int(value)], _render_int)

    def shape(self, name: str, shape: Sequence[int]) -> "Fingerprint":
        return self._add(name, [int(x) for x in shape], _render_shape)

    def dtype(self, name: str, dtype: torch.dtype) -> "Fingerprint":
        return self._add(name, [_DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)], _render_dtype)

    def real(self, name: str, value: float) -> "Fingerprint":
        return self._add(name, [struct.unpack("<q", struct.pack("<d", float(value)))[0]], _render_real)

    def tensor_values(self, name: str, t: Tensor) -> "Fingerprint":
        """Two fields: the number of entries of ``t`` and a hash of its values (computed on t's
        device when the fingerprint is exchanged)."""
        self.integer(f"the number of entries of {name}", t.numel())
        self._device.append((_HEADER + len(self._host), t))
        return self._add(f"the values of {name}", [0, 0], _render_hash)

    def local(self, name: str, values: Sequence[int]) -> "Fingerprint":
        return self._add(name, [int(x) for x in values], _render_int if len(values) == 1 else _render_shape,
                         per_rank=True)

    def to_tensor(self, status: int, scheme: str, device: torch.device) -> Tensor:
        name = scheme.encode("ascii", "replace")[:8 * _NAME_SLOTS].ljust(8 * _NAME_SLOTS, b"\0")
        header = [_MARKER, status, len(self._host)] + list(struct.unpack(f"<{_NAME_SLOTS}q", name))
        buf = torch.tensor(header + self._host + [0] * (SLOTS - _HEADER - len(self._host)), dtype=torch.int64,
                           device=device)
        for offset, t in self._device:
            buf[offset:offset + 2] = _hash_on_device(t).to(device)
        return buf


def _scheme_name(row: List[int]) -> str:
    raw = struct.pack(f"<{_NAME_SLOTS}q", *row[3:3 + _NAME_SLOTS])
    return raw.rstrip(b"\0").decode("ascii", "replace")


def _ranks_text(ranks: List[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(r) for r in ranks[:-1]) + f" and {ranks[-1]}"


def _values_text(values: List[str]) -> str:
    """'rank 0 True, rank 1 False' (ranks with equal values grouped, in order of first rank)."""
    groups: Dict[str, List[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return ", ".join(f"{_ranks_text(ranks)} {v}" for v, ranks in groups.items())


# A scheme's check of the per-rank facts: (every rank's {fact name: values}) -> message or None.
ConsistencyCheck = Callable[[List[Dict[str, List[int]]]], Optional[str]]


class RankAgreement:
    """The cross-rank check of one call of ``scheme`` (e.g. "llama3_flash_attn_varlen_func") on
    ``group`` (``world_size`` ranks). Use::

        agreement = RankAgreement(scheme, group, world_size, device, values_checked)
        with agreement.validating():
            ...  # the rank's own argument checks (they may raise)
        agreement.check(lambda: Fingerprint().flag("causal", causal)...)

    Disabled (both steps do nothing) with one rank or when ``cross_rank_checks_enabled`` is
    False; ``device`` is where the fingerprint tensors live (the device the group's collectives
    take, e.g. q's)."""

    def __init__(self, scheme: str, group: Optional[object], world_size: int, device: torch.device,
                 values_checked: bool):
        self.scheme, self.group, self.world_size = scheme, group, world_size
        self.device = device
        self.enabled = world_size > 1 and cross_rank_checks_enabled(values_checked)

    def _collective_device(self) -> torch.device:
        if self.device.type == "cuda":
            return self.device
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _exchange(self, status: int, fingerprint: Fingerprint) -> List[List[int]]:
        import torch.distributed as dist

        device = self._collective_device()
        mine = fingerprint.to_tensor(status, self.scheme, device)
        gathered = torch.empty(self.world_size * SLOTS, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(gathered, mine, group=self.group)
        return gathered.view(self.world_size, SLOTS).tolist()  # the check's one host read

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        """Runs the rank's own argument checks; if they raise (with the check enabled), this rank
        still sends a fingerprint (status: rejected) before the exception propagates, so that the
        other ranks raise too instead of waiting for it."""
        try:
            yield
        except Exception:
            if self.enabled:
                try:
                    self._exchange(_STATUS_FAILED, Fingerprint())
                except Exception:  # noqa: BLE001 - the argument error below is the one to report
                    pass
            raise

    def check(self, build: Callable[[], Fingerprint], consistency: Optional[ConsistencyCheck] = None) -> None:
        """Exchanges the fingerprint ``build()`` returns and raises RuntimeError (on every rank)
        when a rank rejected its arguments, the ranks called different schemes, a field differs,
        or ``consistency`` (given every rank's ``local`` facts) returns a message."""
        if not self.enabled:
            return
        fingerprint = build()
        rows = self._exchange(_STATUS_OK, fingerprint)
        where = f"{self.scheme} on {self.world_size} ranks"
        foreign = [r for r, row in enumerate(rows) if row[0] != _MARKER]
        if foreign:
            raise RuntimeError(f"{where}: {_ranks_text(foreign)} sent no argument fingerprint (a different version "
                               f"of ring_flash_attn, or {ENV_CHECK_METADATA} not set to 1 there?)")
        rejected = [r for r, row in enumerate(rows) if row[1] != _STATUS_OK]
        if rejected:
            raise RuntimeError(f"{where}: {_ranks_text(rejected)} rejected {'its' if len(rejected) == 1 else 'their'} "
                               f"arguments (the error raised there says why); this rank stops here instead of "
                               f"waiting for {'it' if len(rejected) == 1 else 'them'} in a collective")
        schemes = [_scheme_name(row) for row in rows]
        if len(set(schemes)) > 1:
            raise RuntimeError(f"ranks disagree on the function called: {_values_text(schemes)}")
        if len({row[2] for row in rows}) > 1:
            raise RuntimeError(f"{where}: ranks disagree on the number of fingerprint values: "
                               f"{_values_text([str(row[2]) for row in rows])}")
        for f in fingerprint.fields:
            if f.per_rank:
                continue
            values = [row[f.offset:f.offset + f.size] for row in rows]
            if any(v != values[0] for v in values):
                raise RuntimeError(f"{where}: ranks disagree on {f.name}: "
                                   f"{_values_text([f.render(v) for v in values])}")
        if consistency is not None:
            facts = [{f.name: row[f.offset:f.offset + f.size] for f in fingerprint.fields if f.per_rank}
                     for row in rows]
            message = consistency(facts)
            if message is not None:
                raise RuntimeError(f"{where}: {message}")


def effective_scale(softmax_scale: Optional[float], head_dim: int) -> float:
    """The softmax scale a call uses: ``softmax_scale``, or ``1 / sqrt(head_dim)`` for None."""
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(max(head_dim, 1))
