"""Run a function on two (or more) gloo ranks in spawned CPU processes, for the multi-rank tests.

The ranks meet through a file store in the test's tmp dir, not a TCP port: a port found free
and bound a moment later can be taken meanwhile by another test worker (it happened under
``pytest -n 2``).

Creating a gloo group is not a synchronisation point (pytorch/pytorch#61396): a rank whose work
needs no collective can finish and destroy its group while its peer is still connecting, and the
peer then fails with "Gloo connectFullMesh failed ... Connection closed by peer" (it happened in
CI, under load). So every rank meets the others at a barrier after joining and before leaving.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


class Killed(Exception):
    """Raised by a test's function to stand in for a SIGKILL (e.g. right after a checkpoint)."""


def _worker(rank: int, world: int, store: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    # What torchrun exports; arforge reads LOCAL_RANK (and the rest once the group exists).
    import faulthandler

    faulthandler.enable()  # a native crash in a rank prints that rank's Python stack, not only a signal name
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # a fresh process: nothing may depend on the RNG it starts with
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.distributed.barrier()  # every rank has connected before any can leave
    try:
        fn(**kwargs)
    except Killed:
        pass  # the "killed" run ends here on every rank
    # Only a rank that finished waits for the others: one that raised must not block its peers
    # (mp.spawn then stops them and reports the error).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], tmp_dir: str | os.PathLike, *, world: int = 2, **kwargs: Any) -> None:
    """``fn(**kwargs)`` on ``world`` ranks; ``fn`` must be a module-level function (it is pickled)."""
    store = Path(tmp_dir) / f"store-{uuid.uuid4().hex}"
    mp.spawn(_worker, args=(world, str(store), fn, kwargs), nprocs=world, join=True)


def one_thread(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with one intra-op thread, as each rank runs (the reference of a 2-rank run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(**kwargs)
    finally:
        torch.set_num_threads(n)
