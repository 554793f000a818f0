"""Collection across processes: ``torchrun --nproc_per_node=P -m gtp_kernels collect ...``.

P ranks (any number of machines, one shared store folder) fill ONE store that equals a
single-process collection: the same shard files byte for byte and the same manifest.

    1. every rank checks the options and the data (the same checks, so a mistake fails everywhere);
    2. rank 0 alone runs the warm-up into ``<out>/warmup`` (or finds it done, or uses
       ``checkpoints``), then tells the others; they wait for that message before they read the
       warm-up folder. The warm-up is one sequential training run: repeating it on every rank
       would cost P - 1 copies of it and, on GPUs, need bitwise-deterministic training
       (atomics in cuBLAS/cuDNN backward kernels are not) for the ranks to agree on the
       checkpoints. Sharing rank 0's files makes agreement a fact, not an assumption;
    3. rank 0 reads the store's missing shards (after every rank has opened the store, before
       any writes) and sends the list; rank r computes missing[r::P]. On a resume only the
       missing shards are split, so the ranks stay balanced;
    4. each rank writes its shards; a shard's entry is merged into the manifest under the store's
       lock (:mod:`.store`: several writers may fill one store), so the manifest lists every
       shard once the last one lands;
    5. after a barrier, rank 0 opens the finished store (every listed file checked) and tells the
       others the verdict; every rank returns the opened store.

Shards are computed independently (same model, same checkpoints, the rows of that shard only),
so which rank computes a shard does not change its bytes. An interrupted run resumes, at any P,
at the first missing shard, as a single-process one does.

Coordination messages are small pickled objects on a gloo group (also when the shards are
computed on GPUs with NCCL as the default group): the warm-up may take hours, and the other
ranks wait for it inside a collective, so that group's timeout is ``timeout`` (default 7
days), not torch's 30 minutes. A rank that fails is not waited for: torchrun (and
torch.multiprocessing.spawn) stop the other ranks when one exits with an error, and an error of
rank 0 before the warm-up message reaches the others as that message.

Multi-node: ``out`` must be one folder every rank sees (a shared file system with POSIX
``flock``, e.g. NFSv4 or Lustre mounted with flock, for the manifest lock).
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .store import TrajectoryStore, open_store

DEFAULT_TIMEOUT = datetime.timedelta(days=7)


def distributed_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside a multi-process
    launch (WORLD_SIZE unset or 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    return rank, world, local


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a multi-process launch."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = distributed_environment()
    return env is None or env[0] == 0


class RankCoordinator:
    """The hooks :func:`collect_trajectory` calls (``coordinator=``) on one rank of ``group``."""

    def __init__(self, group: Any, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.warmup_announced = False

    def _broadcast(self, value: Any) -> Any:
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def wait_for_checkpoints(self) -> None:
        """Ranks > 0, before they read the warm-up folder: wait until rank 0 has written it."""
        if self.rank != 0:
            error = self._broadcast(None)
            if error is not None:
                raise RuntimeError(f"rank 0 failed before the checkpoints were ready, so rank {self.rank} stops: {error}")

    def checkpoints_ready(self) -> None:
        """Rank 0, once the checkpoints are on disk (warmed up, found, or given)."""
        if self.rank == 0 and not self.warmup_announced:
            self.warmup_announced = True
            self._broadcast(None)

    def failed(self, error: BaseException) -> None:
        """Rank 0 failed: if the others still wait for the checkpoints, tell them why."""
        if self.rank == 0 and not self.warmup_announced:
            self.warmup_announced = True
            self._broadcast(f"{type(error).__name__}: {error}")

    def decided_by_rank_0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (so that all ranks take the same path)."""
        return self._broadcast(value)

    def assign_shards(self, todo: Sequence[int]) -> list[int]:
        """This rank's share of the shards still to write: rank 0's list (read once every rank has
        opened the store and before any rank writes, so all ranks split the same list), every
        P-th from the r-th."""
        shared = self._broadcast([int(s) for s in todo])
        return shared[self.rank :: self.world]


def _rank_device(device: Any, local_rank: int) -> Any:
    """'auto' or 'cuda' becomes this rank's GPU (cuda:LOCAL_RANK) when CUDA is there."""
    if str(device) in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return device


def collect_distributed(
    model: Any, data: Any, out: str | os.PathLike, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT, **kwargs: Any,
) -> TrajectoryStore:
    """:func:`collect_trajectory` on every rank of a torchrun launch, into one store (steps above).

    Call it on every rank with the same arguments (those of :func:`collect_trajectory`). The
    process group is the one already initialised, or one made here from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when this rank collects on a
    GPU, gloo otherwise, destroyed again before returning. Outside a multi-process launch this is
    :func:`collect_trajectory` itself. Only rank 0 shows progress (``progress`` applies there).

    Returns the complete store on every rank (incomplete when ``shards`` left some out).
    """
    from .pipeline import collect_trajectory

    made_group = False
    if not (dist.is_available() and dist.is_initialized()):
        env = distributed_environment()
        if env is None:
            return collect_trajectory(model, data, out, **kwargs)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        kwargs["device"] = _rank_device(kwargs.get("device", "auto"), env[2])
        on_gpu = str(kwargs["device"]).startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
        made_group = True
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        # the coordination group: gloo (CPU objects), with a timeout that outlasts the warm-up
        group = dist.new_group(backend="gloo", timeout=timeout)
        coordinator = RankCoordinator(group, rank, world)
        if rank != 0:
            kwargs["progress"] = False
            kwargs["resume"] = True  # rank 0 refuses an existing store for --no-resume; the others join its store
        try:
            store = collect_trajectory(model, data, out, coordinator=coordinator, **kwargs)
        except BaseException as error:
            coordinator.failed(error)
            raise
        dist.barrier(group=group)
        verdict = None
        if rank == 0:
            try:  # every shard listed; opening checks each file's size, header and sampled data
                store = open_store(out, allow_incomplete=kwargs.get("shards") is not None)
            except Exception as error:  # noqa: BLE001 - reported to every rank, re-raised here
                verdict = f"{type(error).__name__}: {error}"
                coordinator._broadcast(verdict)
                raise
        verdict = coordinator._broadcast(verdict)
        if verdict is not None:
            raise RuntimeError(f"rank 0 could not open the finished store {Path(out)}: {verdict}")
        if rank != 0:
            store = open_store(out, allow_incomplete=kwargs.get("shards") is not None)
        return store
    finally:
        if made_group:
            dist.destroy_process_group()
