"""Several processes on one decompose, as launched by ``torchrun``: who does what, and agreeing.

``torchrun --nproc-per-node K [--nnodes N ...] -m pissa_svd decompose SRC ...`` sets the
standard variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`team_from_env` joins the process group they describe (gloo on CPU, NCCL on CUDA, with a
gloo side group for the small Python objects the ranks exchange). No tensor ever crosses
processes: every rank reads its own tensors from SRC and writes them straight into the shared
output files, at offsets every rank computes from the same plan.

The work is split by :func:`assign`, a deterministic longest-processing-time-first schedule
over the plan's batches; a batch is the unit, and batches do not depend on the process count,
so neither do the output bytes.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import InputError, RankFailure


@dataclass
class Team:
    """This process's place in the run; a team of one when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: Any = None  # gloo group for object collectives
    _owns: bool = False  # we initialized the default group, so we tear it down

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        with self._collective():
            dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_gather(self, obj: object) -> list:
        """Every rank's ``obj``, indexed by rank, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        with self._collective():
            dist.all_gather_object(out, obj, group=self._group)
        return out

    @contextmanager
    def _collective(self):
        """A peer that died (killed, out of memory) surfaces as a transport error here."""
        try:
            with _killable():
                yield
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo prefixes its source location
            first = first.split(". This is typically caused")[0]  # gloo's advice, and emoji
            err = RankFailure(
                f"rank {self.rank} lost contact with another process of the run ({first}); "
                "torchrun's summary names the rank that died"
            )
            err.pissa_agreed = True  # nobody is left to tell
            raise err from None

    def close(self) -> None:
        if self._owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns = False


def team_from_env(device_type: str) -> Team:
    """Join the torchrun process group if the environment describes one (WORLD_SIZE > 1)."""
    world = env_world_size()
    if world <= 1:
        return Team()
    import torch.distributed as dist

    rank = _env_int("RANK", None)
    local_rank = _env_int("LOCAL_RANK", 0)
    if rank is None or not 0 <= rank < world or local_rank < 0:
        raise InputError(
            f"WORLD_SIZE={world} with RANK={os.environ.get('RANK')} and LOCAL_RANK="
            f"{os.environ.get('LOCAL_RANK')}: each process needs a RANK from 0 to {world - 1}; "
            "start the processes with torchrun, which sets them"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name) and not dist.is_initialized():
            raise InputError(
                f"WORLD_SIZE={world} but {name} is not set: start the processes with torchrun, "
                "which sets it"
            )
    if device_type == "cuda":
        import torch

        torch.cuda.set_device(local_rank)  # one GPU per local rank, before NCCL starts
    owns = False
    if not dist.is_initialized():
        with _killable():  # the rendezvous waits for every process
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Team(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        _group=group,
        _owns=owns,
    )


@contextmanager
def _killable():
    """SIGTERM at its default action (the process ends) while blocked in torch.distributed:
    a Python handler would only run once the C++ call returns, which a lost peer can delay
    by gloo's 30-minute timeout, so ``kill`` and a scheduler's timeout could not stop the run.
    What the run finished stays in its staging folder for --resume, as after SIGKILL."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        if handler is not None:  # None: not set from Python, so left at the default
            signal.signal(signal.SIGTERM, handler)


def env_world_size() -> int:
    """WORLD_SIZE, as torchrun sets it; 1 when unset."""
    return max(1, _env_int("WORLD_SIZE", 1))


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(
            f"the environment variable {name}={raw!r} is not an integer; unset it, or start "
            "the processes with torchrun, which sets it"
        ) from None


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic in ``costs`` alone, so every rank computes the same schedule.
    """
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner
