"""One executor for many runs (methods x seeds x shadow models): local processes, or a Ray cluster.

``make_executor(workers=1)`` runs tasks in this process, in order (what tests and small machines
want: no start-up cost); ``workers > 1`` uses a ``concurrent.futures.ProcessPoolExecutor`` (spawned
processes, one torch thread each, so workers do not fight over cores); ``ray_address`` sends the
same tasks to a Ray cluster (``pip install prune-edge[ray]``), so a user with a GPU cluster runs the
shadow-model grid there without changing the command. Tasks are plain module-level functions with
picklable arguments; results come back in submission order.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


class Executor:
    """``map(fn, args_list)`` -> results in order, with a progress bar."""

    name = "serial"

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple], desc: str = "tasks", progress: bool = True) -> list[Any]:
        return [fn(*a) for a in tqdm(args_list, desc=desc, disable=not progress, leave=False)]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProcessExecutor(Executor):
    name = "processes"

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)

    def map(self, fn, args_list, desc="tasks", progress=True):
        futures = [self.pool.submit(fn, *a) for a in args_list]
        for _ in tqdm(cf.as_completed(futures), total=len(futures), desc=desc, disable=not progress, leave=False):
            pass
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayExecutor(Executor):
    """Tasks as Ray remote functions. ``address`` is a cluster address ("auto", "ray://host:10001"),
    or "local" for a Ray instance in this machine (what the tests use)."""

    name = "ray"

    def __init__(self, address: str, num_gpus_per_task: float = 0.0):
        try:
            import ray
        except ImportError:  # pragma: no cover - depends on the optional extra
            from ..runtime.errors import InputError

            raise InputError("--ray-address needs Ray: pip install 'prune-edge[ray]'") from None
        self.ray = ray
        self.gpus = num_gpus_per_task
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False)

    def map(self, fn, args_list, desc="tasks", progress=True):
        remote = self.ray.remote(num_cpus=1, num_gpus=self.gpus)(fn)
        refs = [remote.remote(*a) for a in args_list]
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, disable=not progress, leave=False) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return self.ray.get(refs)

    def close(self) -> None:
        pass  # the driver's connection ends with the process; a shared cluster stays up


def make_executor(workers: int = 1, ray_address: str | None = None) -> Executor:
    """The executor a run uses: Ray if an address is given, else local processes (or this process)."""
    if ray_address:
        return RayExecutor(ray_address)
    return ProcessExecutor(workers) if workers > 1 else Executor()
