"""A collective that runs one step behind the compute: the base of the way back of the all-gather
schemes (``reduce_scatter.SliceReduceScatter``) and of the all-to-all (``all_to_all.HeadsToSequence``)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor

__all__ = ["DeferredCollective"]


class DeferredCollective:
    """Step s's asynchronous collective runs while step s+1 is computed: ``defer`` (called by a
    subclass's ``submit`` with the collective it started) first finishes the previous step's,
    then keeps this one pending; ``finish`` waits for the pending one (NCCL: the current stream
    waits, no host block) and hands its received buffer to the subclass's ``complete``. Call
    ``finish`` after the last step."""

    def __init__(self) -> None:
        # (step, recv, send, work): send stays referenced until its collective has been waited for.
        self.pending: Optional[Tuple[Any, Tensor, Tensor, Any]] = None

    def defer(self, step: Any, recv: Tensor, send: Tensor, work: Any) -> None:
        """Keeps step's started collective (``work``: its handle, None when it already ran) pending."""
        self.finish()  # the previous step's, which ran while this step was computed
        self.pending = (step, recv, send, work)

    def finish(self) -> None:
        """Waits for the pending step's collective and hands its result to ``complete``."""
        if self.pending is None:
            return
        step, recv, _, work = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        self.complete(step, recv)

    def complete(self, step: Any, recv: Tensor) -> None:
        """Copies step's received buffer to where it belongs (the subclass's)."""
        raise NotImplementedError
