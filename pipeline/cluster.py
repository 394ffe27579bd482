"""The dask client stage one runs on: a local cluster by default, or an existing scheduler.

Users with a Slurm or Kubernetes dask deployment pass its address (`--scheduler tcp://host:8786`);
everyone else gets a LocalCluster of worker processes, one per GPU. Workers that have GPUs advertise a
`GPU` resource and extraction tasks ask for one, so a GPU never runs two encoders at once. A worker
that dies in the middle of a task has the task rerun on another worker, at most `retries` times
(dask's `distributed.scheduler.allowed-failures`; an existing scheduler keeps its own setting).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from pipeline.errors import UsageError

# Importing distributed configures its loggers (INFO and up); its notices -- a worker killed on shutdown,
# a missing optional dashboard package -- are not the user's business. Errors still show.
logging.getLogger("distributed").setLevel(logging.ERROR)


@contextmanager
def dask_client(scheduler: str, workers: int, gpus: int, retries: int = 2,
                timeout: float = 20.0) -> Iterator[Client]:
    """A connected client; a local cluster (started here) is closed on exit, a remote one is left running."""
    if scheduler != "local":
        try:
            client = Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as err:
            raise UsageError(f"cannot reach the dask scheduler {scheduler!r} within {timeout:g} s "
                             f"(extract.scheduler / --scheduler; extract.scheduler_timeout): {err}") from None
        with client:
            yield client
        return
    resources = {"GPU": 1} if gpus else None
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, resources=resources,
                         dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def gpu_resources(client: Client) -> dict[str, float] | None:
    """{"GPU": 1} if the cluster's workers advertise GPUs (then every task asks for one), else None."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None
