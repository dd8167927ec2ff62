"""The process group and the collectives both trainers use: ``init_distributed`` (gloo on CPU, NCCL on GPUs, the
CPU thread count per rank), sums, barriers, gathers, host-side agreement and rank 0's answer to every rank.

Each collective is a no-op (or returns its input) in a lone process, so the same code runs with and without the
``deepspeed`` launcher.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Any, List, Optional

import torch
import torch.distributed as dist

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's op-builder name for its CPU shared-memory all-reduce


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group the ``deepspeed`` launcher describes (gloo on CPU). Returns rank, world, device."""
    import deepspeed

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:  # a lone process without the launcher: any free port will do
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if _default_threads():  # a user's OMP_NUM_THREADS or torch.set_num_threads wins
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(cpu_threads(local))
    if not dist.is_initialized():
        # DeepSpeed's CPU shared-memory all-reduce op serves only inference_all_reduce (tensor-parallel
        # inference), never training; compiling it took ~30 s of every first run on a fresh machine
        with _without_op(deepspeed.ops.__compatible_ops__, SHM_OP, backend == "gloo"):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), device


def _usable_cores() -> int:
    """The cores this process may run on (taskset, cgroups)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_threads() -> bool:
    """True when nobody chose the thread count: no OMP_NUM_THREADS and torch's count still its default (the
    cores this process could use when torch started, or all of the machine's)."""
    return "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() in (_usable_cores(), os.cpu_count())


def cpu_threads(local_ranks: int, cores: Optional[int] = None) -> int:
    """Threads per rank on a CPU: the cores this process may use, shared among the ranks of this host (at least
    one). Fixed by the machine, not by its momentary load, so a resumed run computes with the same thread count
    (and the same float sums) as the run it continues; on a machine shared with other jobs set
    ``OMP_NUM_THREADS``, which wins."""
    cores = _usable_cores() if cores is None else cores
    return max(1, cores // max(1, local_ranks))


@contextmanager
def _without_op(table: dict, name: str, active: bool):
    """``table[name] = False`` inside the block (when ``active``), the table as it was afterwards."""
    if not active:
        yield
        return
    had, old = name in table, table.get(name)
    table[name] = False
    try:
        yield
    finally:
        if had:
            table[name] = old
        else:
            table.pop(name, None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (a collective)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (itself where there is no process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


_HOST_GROUP: Any = None  # the CPU process group beside NCCL that host_any reduces over


def host_any(flag: bool) -> bool:
    """True on every rank when ``flag`` holds on some rank: a gloo all-reduce of a host value, so nothing waits
    for the accelerator."""
    global _HOST_GROUP
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    if dist.get_backend() == "gloo":
        group = None
    else:  # NCCL reduces device tensors only: a CPU group beside it, made once
        if _HOST_GROUP is None:
            _HOST_GROUP = dist.new_group(backend="gloo")
        group = _HOST_GROUP
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.numpy()[0])

