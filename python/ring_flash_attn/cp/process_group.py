"""Process-group resolution of the context-parallel schemes."""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["resolve_group"]


def resolve_group(group: Optional[object]) -> Tuple[Optional[object], int, int]:
    """``(group, world_size, rank)`` of ``group`` (None: the default process group).

    Without an initialised default group (and ``group=None``) the call is single-process:
    ``(None, 1, 0)``, and no collective is issued.
    """
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)
