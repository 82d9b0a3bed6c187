"""The start and end of the test scripts that run under torchrun (test_ring_variants_gpu.py,
test_all_to_all_gpu.py, test_zigzag_llama3_grouped.py): NCCL on GPUs, or gloo and the CPU
backend with ``--device cpu`` (a smoke test of the script). Not a pytest module: the scripts
import it when they run."""

from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch


def cuda_missing(script: str, device: str) -> bool:
    """True, after printing why, when `device` is "cuda" and no CUDA GPU is visible (the script
    then exits with status 2)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: needs CUDA GPUs (run it under torchrun on a GPU machine; --device cpu for a smoke test "
              "of the script)")
        return True
    return False


def start_process_group(device: str, default_port: int, timeout: Optional[datetime.timedelta] = None,
                        cpu_threads: Optional[int] = None) -> Tuple[torch.device, str]:
    """Joins the process group: NCCL on the LOCAL_RANK GPU ("cuda") or gloo ("cpu", with
    `cpu_threads` torch threads when given). A plain ``python script.py`` run (no RANK in the
    environment) becomes rank 0 of 1 on 127.0.0.1:default_port. `timeout`: the collectives'
    timeout (None: torch.distributed's default). Returns (the rank's device, its name)."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(default_port))
    kwargs = {} if timeout is None else {"timeout": timeout}
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=rank_device, **kwargs)
        return rank_device, torch.cuda.get_device_name()
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    dist.init_process_group("gloo", **kwargs)
    return torch.device("cpu"), "CPU backend (gloo)"


def shared_seed(seed: Optional[int], device: torch.device) -> int:
    """`seed`, or (None) a fresh random seed drawn by rank 0 and broadcast, so that every rank
    draws the same global inputs."""
    import torch.distributed as dist

    if seed is not None:
        return seed
    drawn = torch.randint(0, 1 << 30, (1,), device=device)
    dist.broadcast(drawn, 0)
    return int(drawn.item())


def finish(rank: int, summary: str, failed: int) -> int:
    """Rank 0 prints `summary`; every rank waits for the others, leaves the process group and gets
    the exit status (1 if `failed` is non-zero, else 0)."""
    import torch.distributed as dist

    if rank == 0:
        print(summary, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0
