"""Ring point-to-point exchange: every rank sends a buffer to rank+1 and receives one from rank-1."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["RingComm"]


class RingComm:
    """Point-to-point exchange with the ring neighbours of ``rank`` in ``group``: send to rank+1,
    receive from rank-1 (``torch.distributed.batch_isend_irecv``, one send and one receive per
    ``post``)."""

    def __init__(self, group: Optional[object], world_size: int, rank: int):
        import torch.distributed as dist

        self.group = group
        nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
        if group is None:
            self.next, self.prev = nxt, prv
        else:
            self.next = dist.get_global_rank(group, nxt)
            self.prev = dist.get_global_rank(group, prv)

    def post(self, send: Tensor, tag: int) -> Tuple[Tensor, tuple]:
        """Posts the send of `send` and the receive of a tensor like it; returns
        (recv buffer, pending works). The buffers must stay alive until ``wait``."""
        import torch.distributed as dist

        recv = torch.empty_like(send)
        p2p = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        works = dist.batch_isend_irecv(p2p)
        return recv, (works, send)

    @staticmethod
    def wait(pending: tuple) -> None:
        """Waits for the works of one ``post`` (on CUDA: the current stream waits, no host block)."""
        works, _send = pending
        for w in works:
            w.wait()
