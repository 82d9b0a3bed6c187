"""The 2-D mesh of hybrid context parallelism: ``ulysses_degree`` x ``kv_degree`` ranks.

Rank numbering: rank ``p = kv_rank * ulysses_degree + ulysses_rank`` of the parent group. The
ranks of one ULYSSES group (same ``kv_rank``) are consecutive, so with ranks numbered node by node
and ``ulysses_degree`` dividing the ranks per node, each all-to-all stays inside a node (NVLink)
while the K/V passing runs across nodes, over the ``kv_degree`` ranks of one KV group (same
``ulysses_rank``).

``HybridLayout`` holds the numbers (what the sharding helpers need); ``HybridMesh`` adds the two
process groups. Build one with ``hybrid_mesh(ulysses_degree, ...)`` (from the parent group) or
``hybrid_mesh_from_device_mesh(device_mesh)`` (a 2-D ``DeviceMesh`` with dims ``("kv",
"ulysses")``); the last mesh built (or the one given to ``set_active_hybrid_mesh``) is the one the
HuggingFace adapter's hybrid attention uses. ``choose_hybrid_degrees`` picks the degrees from the
heads, the world size and the ranks per node; ``choose_hybrid_layout`` also the scheme across.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from .all_to_all import check_head_split

try:
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # a torch without distributed support
    DeviceMesh = Any

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["KV_SCHEMES", "HybridLayout", "HybridMesh", "active_hybrid_mesh", "choose_hybrid_degrees",
           "choose_hybrid_layout", "hybrid_mesh", "hybrid_mesh_from_device_mesh", "set_active_hybrid_mesh"]

# The schemes that can run across the KV groups: the all-gather schemes and zigzag ring attention.
KV_SCHEMES = ("zigzag_llama3", "llama3", "zigzag_ring")


def _check_degree(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class HybridLayout:
    """The numbers of a hybrid mesh: ``ulysses_degree`` (ranks of one all-to-all group),
    ``kv_degree`` (ranks of one K/V-passing group) and ``kv_scheme`` (the scheme run across the
    KV groups: ``"zigzag_llama3"``, ``"llama3"`` or ``"zigzag_ring"``)."""

    ulysses_degree: int
    kv_degree: int
    kv_scheme: str = "zigzag_llama3"

    def __post_init__(self):
        _check_degree(self.ulysses_degree, "ulysses_degree")
        _check_degree(self.kv_degree, "kv_degree")
        if self.kv_scheme not in KV_SCHEMES:
            raise ValueError(f"kv_scheme: expected one of {list(KV_SCHEMES)}, got {self.kv_scheme!r}")

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.kv_degree

    def coordinates(self, rank: int) -> Tuple[int, int]:
        """``(kv_rank, ulysses_rank)`` of parent rank ``rank``."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank: expected an int in [0, {self.world_size}) (ulysses_degree {self.ulysses_degree} "
                             f"x kv_degree {self.kv_degree}), got {rank!r}")
        return rank // self.ulysses_degree, rank % self.ulysses_degree


@dataclass(frozen=True)
class HybridMesh:
    """A hybrid mesh with its process groups, as seen from one rank.

    layout: the degrees and the KV scheme. ulysses_group / kv_group: this rank's all-to-all group
    and K/V-passing group (real process groups, also of size 1). kv_rank, ulysses_rank: this
    rank's coordinates. parent_group: the group the mesh was cut from (None: the default group);
    ``has_parent``: False for a DeviceMesh whose ranks are not that group's in kv-major order (the
    mesh then serves direct calls only, not the HF adapter)."""

    layout: HybridLayout
    ulysses_group: object
    kv_group: object
    kv_rank: int
    ulysses_rank: int
    parent_group: Optional[object] = None
    has_parent: bool = True

    @property
    def ulysses_degree(self) -> int:
        return self.layout.ulysses_degree

    @property
    def kv_degree(self) -> int:
        return self.layout.kv_degree

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def rank(self) -> int:
        """This rank in the parent group: ``kv_rank * ulysses_degree + ulysses_rank``."""
        return self.kv_rank * self.ulysses_degree + self.ulysses_rank


_ACTIVE: List[Optional[HybridMesh]] = [None]


def set_active_hybrid_mesh(mesh: Optional[HybridMesh]) -> None:
    """The mesh that the hybrid scheme uses when called with a process group (or None) instead of
    a mesh, e.g. from the HuggingFace adapter. None clears it."""
    if mesh is not None and not isinstance(mesh, HybridMesh):
        raise ValueError(f"mesh: expected a HybridMesh or None, got {type(mesh).__name__}")
    _ACTIVE[0] = mesh


def active_hybrid_mesh() -> Optional[HybridMesh]:
    """The active mesh (the last one built, or the one given to ``set_active_hybrid_mesh``)."""
    return _ACTIVE[0]


def _is_default_group(group) -> bool:
    import torch.distributed as dist

    return group is None or group is dist.group.WORLD


def hybrid_mesh(ulysses_degree: int, kv_degree: Optional[int] = None, group: Optional[ProcessGroup] = None,
                kv_scheme: str = "zigzag_llama3", activate: bool = True) -> HybridMesh:
    """Cuts ``group`` (None: the default group) into a ``ulysses_degree`` x ``kv_degree`` mesh.

    Args:
        ulysses_degree: ranks per all-to-all group (consecutive ranks of ``group``).
        kv_degree: ranks per K/V-passing group; None: ``world_size / ulysses_degree``.
        group: the parent group (its world size must be ``ulysses_degree * kv_degree``).
        kv_scheme: the scheme across the KV groups, ``"zigzag_llama3"`` (default), ``"llama3"`` or
            ``"zigzag_ring"`` (ring attention: each step's K/V block hides behind that step's compute,
            which suits many KV ranks across slow links; see docs/scaling.md).
        activate: make it the active mesh (``set_active_hybrid_mesh``).

    Collective: with ``group`` None every process of the default group calls it (it creates every
    sub-group, in the same order on every rank); with a sub-group as ``group`` only that group's
    ranks call it (its sub-groups are created with local synchronisation).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("hybrid_mesh: torch.distributed is not initialised (init_process_group first)")
    U = _check_degree(ulysses_degree, "ulysses_degree")
    N = dist.get_world_size(group)
    if kv_degree is None:
        if N % U:
            raise ValueError(f"ulysses_degree: expected a divisor of the world size {N} of the group, got {U}")
        kv_degree = N // U
    K = _check_degree(kv_degree, "kv_degree")
    if U * K != N:
        raise ValueError(f"kv_degree: expected world size {N} / ulysses_degree {U} = {N / U:g} (the mesh covers the "
                         f"group), got {K}")
    layout = HybridLayout(U, K, kv_scheme)
    ranks = list(range(N)) if _is_default_group(group) else dist.get_process_group_ranks(group)
    kv_rank, ulysses_rank = layout.coordinates(dist.get_rank(group))
    ulysses_ranks = [ranks[a * U:(a + 1) * U] for a in range(K)]
    kv_ranks = [ranks[u::U] for u in range(U)]
    if _is_default_group(group):
        mine_u = mine_k = None
        for members in ulysses_ranks:  # every process creates every group, in the same order
            g = dist.new_group(members)
            if members is ulysses_ranks[kv_rank]:
                mine_u = g
        for members in kv_ranks:
            g = dist.new_group(members)
            if members is kv_ranks[ulysses_rank]:
                mine_k = g
    else:
        mine_u = dist.new_group(ulysses_ranks[kv_rank], use_local_synchronization=True)
        mine_k = dist.new_group(kv_ranks[ulysses_rank], use_local_synchronization=True)
    mesh = HybridMesh(layout=layout, ulysses_group=mine_u, kv_group=mine_k, kv_rank=kv_rank,
                      ulysses_rank=ulysses_rank, parent_group=None if _is_default_group(group) else group)
    if activate:
        set_active_hybrid_mesh(mesh)
    return mesh


def hybrid_mesh_from_device_mesh(device_mesh: DeviceMesh, kv_dim: str = "kv", ulysses_dim: str = "ulysses",
                                 kv_scheme: str = "zigzag_llama3", group: Optional[ProcessGroup] = None,
                                 activate: bool = True) -> HybridMesh:
    """A hybrid mesh from a 2-D ``torch.distributed.device_mesh.DeviceMesh`` (e.g.
    ``init_device_mesh("cuda", (kv_degree, ulysses_degree), mesh_dim_names=("kv", "ulysses"))``
    or two dims of a larger mesh): its groups along ``ulysses_dim`` and ``kv_dim``. ``group``: the
    parent group of the HF adapter (None: the default group); the mesh has a parent when its ranks,
    kv-major, are that group's ranks in order."""
    import torch.distributed as dist

    names = tuple(device_mesh.mesh_dim_names or ())
    for name, dim in (("kv_dim", kv_dim), ("ulysses_dim", ulysses_dim)):
        if dim not in names:
            raise ValueError(f"{name}: expected one of the mesh's dim names {list(names)}, got {dim!r}")
    sub = device_mesh[(kv_dim, ulysses_dim)] if device_mesh.ndim != 2 or names != (kv_dim, ulysses_dim) \
        else device_mesh
    K, U = sub.size(0), sub.size(1)
    layout = HybridLayout(U, K, kv_scheme)
    mesh_ranks = [int(r) for r in sub.mesh.flatten().tolist()]
    parent_ranks = list(range(dist.get_world_size())) if _is_default_group(group) \
        else dist.get_process_group_ranks(group)
    mesh = HybridMesh(layout=layout, ulysses_group=sub.get_group(ulysses_dim), kv_group=sub.get_group(kv_dim),
                      kv_rank=sub.get_local_rank(kv_dim), ulysses_rank=sub.get_local_rank(ulysses_dim),
                      parent_group=None if _is_default_group(group) else group,
                      has_parent=mesh_ranks == parent_ranks)
    if activate:
        set_active_hybrid_mesh(mesh)
    return mesh


def choose_hybrid_degrees(num_heads_q: int, num_heads_k: int, world_size: int,
                          ranks_per_node: int) -> Tuple[int, int]:
    """``(ulysses_degree, kv_degree)`` for ``world_size`` ranks numbered node by node.

    The all-to-all group is kept inside a node (its degree divides ``ranks_per_node`` and the
    world size) and made as large as the heads allow: it must divide the query heads, and the KV
    heads must be a multiple or a divisor of it (a divisor: KV heads replicated). Inside a node
    the all-to-all moves each rank's Q, K, V and O once, over NVLink, against the K/V passing's
    traffic over the slower inter-node links, which shrinks as ``kv_degree`` does (see
    docs/scaling.md, whose model agrees with this choice on the Llama-3 shapes). The rest,
    ``world_size / ulysses_degree``, passes K/V (zigzag llama3) across nodes.
    """
    for name, value in (("num_heads_q", num_heads_q), ("num_heads_k", num_heads_k), ("world_size", world_size),
                        ("ranks_per_node", ranks_per_node)):
        _check_degree(value, name)
    if num_heads_q % num_heads_k:
        raise ValueError(f"num_heads_q: expected a multiple of num_heads_k {num_heads_k}, got {num_heads_q}")
    limit = math.gcd(world_size, ranks_per_node)
    best = 1
    for u in range(1, limit + 1):
        if limit % u:
            continue
        try:
            check_head_split(num_heads_q, num_heads_k, u)
        except ValueError:
            continue
        best = u
    return best, world_size // best


def choose_hybrid_layout(num_heads_q: int, num_heads_k: int, world_size: int, ranks_per_node: int) -> HybridLayout:
    """``choose_hybrid_degrees``'s mesh with the scheme to run across the KV groups:
    ``"zigzag_ring"`` when those groups span nodes and each rank holds a single KV head after the
    all-to-all (the all-gather of zigzag llama3 would then be one slice, with no compute to
    overlap it across the slow links, while each ring step's block hides behind that step's
    compute), else ``"zigzag_llama3"`` (docs/scaling.md compares them)."""
    U, K = choose_hybrid_degrees(num_heads_q, num_heads_k, world_size, ranks_per_node)
    spans_nodes = K > 1 and world_size > ranks_per_node
    single_kv_head = max(num_heads_k, U) // U == 1
    return HybridLayout(U, K, "zigzag_ring" if spans_nodes and single_kv_head else "zigzag_llama3")
