"""Where the fanned-out stages (classifiers, baseline, sweep points) run: the flow's thread pool
or a Dask cluster through ``prefect_dask.DaskTaskRunner``.

A flow parameter picks it (``task_runner``: ``thread`` | ``dask``, ``dask_address``), with the
environment as default (``ELMO_NEWS_TASK_RUNNER``, ``ELMO_NEWS_DASK_ADDRESS``: a deployment's
``job_variables.env``). Tasks pass paths, so every worker must see the home folder at the same
path (shared storage): ``check_workers`` proves it before anything is submitted, and sets each
worker's torch-thread share of its host's cores.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.utilities.callables import get_call_parameters

from tasks.common import WORKER_THREADS_ENV, logger, visible_cores

RUNNER_ENV = "ELMO_NEWS_TASK_RUNNER"
ADDRESS_ENV = "ELMO_NEWS_DASK_ADDRESS"


def resolve_runner(task_runner: str = "", dask_address: str = "") -> tuple[str, str]:
    """The runner and address a run uses: the parameters, else the environment, else
    ``thread``. An address implies ``dask``; an explicit ``thread`` ignores the environment's
    address; a bad name or address raises ValueError naming it."""
    kind = task_runner or os.environ.get(RUNNER_ENV, "")
    address = dask_address
    if not address and task_runner != "thread":  # an explicit thread ignores the env's address
        address = os.environ.get(ADDRESS_ENV, "")
    if not kind:
        kind = "dask" if address else "thread"
    if kind not in ("thread", "dask"):
        raise ValueError(f"task_runner must be 'thread' or 'dask', got {kind!r}")
    if address and kind != "dask":
        raise ValueError(f"dask_address {address!r} given with task_runner {kind!r}")
    if address and not address.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise ValueError(f"dask_address must look like tcp://HOST:PORT, got {address!r}")
    return kind, address


def thread_shares(workers: dict[str, dict[str, Any]], cores: dict[str, int]) -> dict[str, int]:
    """Torch threads per task for each worker: its host's cores over the task slots (worker
    threads) all workers on that host offer. ``workers`` is the scheduler's
    ``scheduler_info()["workers"]`` (address -> {"host", "nthreads"}); ``cores`` the cores each
    worker process may run on (its affinity)."""
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + int(info["nthreads"])
    return {
        addr: max(1, cores[addr] // max(1, slots[info["host"]])) for addr, info in workers.items()
    }


def _probe(token: str, expect: str) -> dict[str, Any]:
    """Runs on each worker: can it read the flow's token file, import the pipeline, and how
    many cores may it use."""
    out: dict[str, Any] = {"cores": visible_cores(), "pid": os.getpid()}
    try:
        out["sees_home"] = Path(token).read_text() == expect
    except OSError as e:
        out["sees_home"] = False
        out["error"] = str(e)
    try:
        import tasks.classify  # noqa: F401  # the tasks unpickle by reference to this module
    except ImportError as e:
        out["import_error"] = str(e)
    return out


def _set_share(shares: dict[str, int], dask_worker: Any = None) -> int:
    """Runs on each worker (``client.run`` passes the worker as ``dask_worker``)."""
    from flows.runtime import tune_allocator

    tune_allocator()  # as in the flow process: freed training memory stays for reuse
    n = shares[dask_worker.address]
    os.environ[WORKER_THREADS_ENV] = str(n)
    return n


def check_workers(client: Any, home: Path) -> dict[str, int]:
    """Fail before any task runs when a worker cannot see ``home`` (a ValueError naming the
    worker and the path) or cannot import the pipeline; then set each worker's torch-thread
    share. Returns address -> threads."""
    home.mkdir(parents=True, exist_ok=True)
    expect = uuid.uuid4().hex
    token = home / f".worker-check-{expect}"
    token.write_text(expect)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise ValueError(f"the Dask cluster at {client.scheduler.address} has no workers")
        probes = client.run(_probe, str(token), expect)
    finally:
        token.unlink(missing_ok=True)
    blind = {
        a: p.get("error", "different content") for a, p in probes.items() if not p["sees_home"]
    }
    if blind:
        raise ValueError(
            f"Dask worker(s) {sorted(blind)} cannot see the home folder {home} "
            f"({next(iter(blind.values()))}): tasks pass paths, so the home must be on storage "
            "every worker mounts at the same path"
        )
    broken = {a: p["import_error"] for a, p in probes.items() if "import_error" in p}
    if broken:
        a, e = next(iter(broken.items()))
        raise ValueError(
            f"Dask worker {a} cannot import the pipeline ({e}): install elmo-news there"
        )
    shares = thread_shares(workers, {a: p["cores"] for a, p in probes.items()})
    client.run(_set_share, shares)
    return shares


@dataclass
class FanOut:
    """Submits tasks to the run's runner; ``.result()`` on what ``submit`` returns."""

    kind: str
    runner: Any = None  # the DaskTaskRunner, entered
    workers: dict[str, int] = field(default_factory=dict)  # address -> torch threads

    def submit(self, task: Any, *args: Any) -> Any:
        if self.runner is None:
            return task.submit(*args)
        return self.runner.submit(task, get_call_parameters(task.fn, args, {}))


def local_cluster_kwargs(tasks: int) -> dict[str, Any]:
    """A local ``distributed`` cluster sized to the machine: a single-threaded worker process
    per core, no more than there are tasks to run at once."""
    n = max(1, min(tasks, visible_cores()))
    return {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "memory_limit": 0,  # no nanny restarts at a guessed per-worker limit: training peaks
    }


@contextmanager
def fanout(kind: str, address: str, home: Path, tasks: int) -> Iterator[FanOut]:
    """The run's fan-out, open for the block. ``thread``: the flow's own ThreadPoolTaskRunner.
    ``dask``: the cluster at ``address``, else a local one (``local_cluster_kwargs``).

    Task runs are reported to the flow's Prefect API: the settings the task runner sends to
    the workers name the API URL the flow itself uses (with the embedded server it is set only
    in this process; a worker without it would start its own server and report there)."""
    if kind == "thread":
        yield FanOut("thread")
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(tasks))
    with temporary_settings({PREFECT_API_URL: api_url}), runner:
        workers = check_workers(runner.client, home)
        logger().info(
            "Dask cluster %s: %d worker(s), torch threads per task %s",
            runner.client.scheduler_info()["address"],
            len(workers),
            sorted(set(workers.values())),
        )
        yield FanOut("dask", runner, workers)
