"""The ``elmo-news`` command line (typer)."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    help="Pretrain ELMo from scratch and classify news.",
    pretty_exceptions_show_locals=False,
)
DEBUG = {"on": False}  # --debug: user errors keep their traceback


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the full traceback of any error")
    ] = False,
) -> None:
    """elmo-news: a cached Prefect pipeline that pretrains ELMo and classifies news."""
    DEBUG["on"] = debug


class UserError(ValueError):
    """A mistake in what the user passed (a path, a --set value, a model URI): reported as
    one line, without a traceback."""


def _one_line(e: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):  # "loc: msg; loc: msg", pydantic's own wording
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            msg = err.get("msg", "").removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return " ".join(str(e).split())


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends as ``error: <what and which value>`` on stderr and exit status 2; the
    traceback is kept for bugs (any other exception) and for everything under --debug."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (ValueError, OSError, MlflowException, typer.BadParameter) as e:
        if DEBUG["on"]:
            raise
        logging.getLogger("prefect").disabled = True  # no "Stopping temporary server" line
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None


def check_readable(what: str, raw: str) -> None:
    """A local input must exist and be readable before anything starts (URLs are fetched by
    the flow, with its retries)."""
    if "://" in raw:
        return
    import glob

    if glob.has_magic(raw) and not Path(raw).exists():
        if not glob.glob(raw, recursive=True):
            raise UserError(f"{raw}: {what} glob matches no files")
        return
    p = Path(raw)
    if not p.exists():
        raise UserError(f"{raw}: {what} folder or file does not exist")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"{raw}: {what} is not readable")


def prefect_defaults() -> None:
    """Offline-friendly defaults for the embedded (ephemeral) Prefect server; env wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # "Creating initial MLflow database tables..." on a new store says nothing a user can act on
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def prestart_ephemeral_server() -> Future[None] | None:
    """Start Prefect's ephemeral API server in a background thread when no API URL is set.

    The server boots in its own process; the flow would otherwise start it only after the
    pipeline's imports (torch, MLflow, scikit-learn: ~9 s on a 2-core CPU), so the two ran one
    after the other. Started here they overlap. Wait on the returned future before the flow
    starts (a failed start raises there); the flow then reuses this server (Prefect keeps one
    instance per process). None when a server is configured (``PREFECT_API_URL``) or ephemeral
    servers are turned off (``PREFECT_SERVER_EPHEMERAL_ENABLED``): Prefect would not use one.
    """
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    # the same test as Prefect's client before it starts one itself
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()
    # its "Starting temporary server" line waits until the parameters are known good: a run
    # refused for a bad value prints that one error line and nothing about a server
    logging.getLogger("prefect").disabled = True
    server = SubprocessASGIServer()

    def start() -> None:
        server.start()
        if server.server_process is not None:
            guard_server(server.server_process.pid)

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-server-start")
    started = pool.submit(start)
    pool.shutdown(wait=False)  # the submitted start still runs to its end
    started.server = server  # type: ignore[attr-defined]  # for abandon_server
    return started


def abandon_server(started: Future[None] | None, status: int) -> None:
    """Exit now with ``status``, killing a prestarted server that is still booting: a run
    refused for a bad parameter must not wait ~20 s for a boot it will never use (the start
    thread would hold the interpreter's exit until the server answered)."""
    if started is None:
        return
    import time

    server = started.server  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while server.server_process is None and not started.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.server_process is not None:
        server.server_process.kill()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def guard_server(server_pid: int) -> subprocess.Popen[bytes]:
    """A watchdog process that stops the server once this process is gone, SIGKILL included
    (``flows/server_guard.py``); it ends by itself when the server does."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(Path(__file__).with_name("server_guard.py")),
         str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def await_server(started: Future[None] | None, home_dir: str) -> None:
    """Before the flow starts: while the prestarted server still boots, create / migrate the
    MLflow store (~2 s on a new home) instead of at the flow's start; then wait until the
    server is up (the flow must find it up, not half-started)."""
    if started is None:
        return
    from storage.paths import Home
    from storage.tracking import Tracker

    if not started.done():
        Tracker(Home(home_dir).mlflow_uri())
    started.result()
    logging.getLogger("prefect").disabled = False
    logging.getLogger("prefect").info("Prefect server (ephemeral): %s", _server_url())


def _server_url() -> str:
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer().address


def check_run_inputs(data: str | None, corpora: list[str], bilm: str, home: str | None) -> None:
    """``run`` and ``sweep``: the data, corpora and biLM exist (a ``models:/`` biLM in the
    home's registry) before anything starts; a miss exits as a user error."""
    with user_errors():
        for what, path in [
            ("data", data or "https://"),
            *[("pretrain corpus", c) for c in corpora],
        ]:
            check_readable(what, path)
        if bilm and not bilm.startswith("models:/"):
            check_readable("biLM", bilm)
    if bilm.startswith("models:/"):
        _tracking(home)
        from storage.registry import check_model_uri

        with user_errors():
            check_model_uri(bilm)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``section.field=value`` (value parsed as JSON when it can be) -> nested dict."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise typer.BadParameter(f"--set expects section.field=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[field] = value
    return out


# options that run, sweep and pretrain share, declared once
ProfileOpt = Annotated[
    str, typer.Option(help="smoke | sample | full | seed | news | elmo-original")
]
DataOpt = Annotated[
    str | None,
    typer.Option(help="dataset folder/file, URL or s3://bucket/prefix (default: AG News)"),
]
CorpusOpt = Annotated[list[str] | None, typer.Option(help="extra unlabeled text (repeatable)")]
HomeOpt = Annotated[
    str | None, typer.Option(help="home folder (default $ELMO_NEWS_HOME or .elmo-news)")
]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
TextColumnOpt = Annotated[
    list[str] | None, typer.Option(help="your data: text column (repeatable)")
]
LabelColumnOpt = Annotated[str, typer.Option(help="your data: label column")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.field=value")]
BilmOpt = Annotated[
    str,
    typer.Option(
        help="reuse a pretrained biLM: models:/elmo-news-bilm/N, models:/elmo-news-bilm@ALIAS "
        "or a biLM stage folder (skips vocabulary and pretraining)"
    ),
]
TaskRunnerOpt = Annotated[
    str,
    typer.Option(
        help="where the classifiers and the baseline run: thread | dask "
        "(default $ELMO_NEWS_TASK_RUNNER, else thread)"
    ),
]
DaskAddressOpt = Annotated[
    str,
    typer.Option(
        help="Dask scheduler tcp://HOST:PORT (implies dask; default: a local cluster "
        "sized to the machine); every worker must see the home folder at the same path"
    ),
]


@app.command()
def run(
    profile: ProfileOpt = "smoke",
    data: DataOpt = None,
    pretrain_corpus: CorpusOpt = None,
    home: HomeOpt = None,
    strategy: Annotated[
        list[str] | None, typer.Option(help="sum | wsum | function (repeatable)")
    ] = None,
    device: DeviceOpt = "auto",
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = "",
    set_: SetOpt = None,
    bilm: BilmOpt = "",
    task_runner: TaskRunnerOpt = "",
    dask_address: DaskAddressOpt = "",
) -> None:
    """Run the whole pipeline once (ephemeral Prefect, local MLflow store, local Parquet store)."""
    prefect_defaults()
    with user_errors():  # what needs no heavy import is checked before anything starts
        overrides = parse_overrides(set_ or [])
    check_run_inputs(data, pretrain_corpus or [], bilm, home)
    # boots in its own process while the parameters and the pipeline's modules import
    server = prestart_ephemeral_server()
    from flows.params import RunParams
    from storage.download import AG_NEWS_URL

    try:
        with user_errors():
            params = RunParams(
                profile=profile,  # type: ignore[arg-type]
                data=data or AG_NEWS_URL,
                pretrain_corpus=pretrain_corpus or [],
                home=home,
                strategies=strategy or ["sum", "wsum", "function"],  # type: ignore[arg-type]
                device=device,  # type: ignore[arg-type]
                text_columns=text_column or [],
                label_column=label_column,
                overrides=overrides,
                bilm=bilm,
                task_runner=task_runner,  # type: ignore[arg-type]
                dask_address=dask_address,
            )  # bad parameters fail here, before the flow starts
    except typer.Exit as e:
        abandon_server(server, e.exit_code)
        raise
    from flows.pipeline import elmo_news
    from tasks.progress import live_display

    await_server(server, params.home_dir())
    with live_display():
        summary = elmo_news(**params.model_dump())
    typer.echo(
        json.dumps({k: v.get("test_accuracy") for k, v in summary["models"].items()}, indent=2)
    )


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``classifier.field=v1,v2,...`` (each value JSON when it parses, else a string) or
    ``classifier.field=[v1, v2]`` (a JSON list: values that hold commas) -> key -> values."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key or not raw:
            raise typer.BadParameter(f"--grid expects classifier.field=v1,v2,..., got {item!r}")
        if key in grid:
            raise typer.BadParameter(f"--grid {key} given twice")
        if raw.lstrip().startswith("["):
            try:
                values = json.loads(raw)
            except json.JSONDecodeError as e:
                raise typer.BadParameter(f"--grid {key}: not a JSON list: {raw!r}") from e
        else:
            values = []
            for v in raw.split(","):
                try:
                    values.append(json.loads(v))
                except json.JSONDecodeError:
                    values.append(v)
        grid[key] = values
    return grid


@app.command()
def sweep(
    grid: Annotated[
        list[str],
        typer.Option(
            help="classifier.FIELD=v1,v2,... (repeatable; the points are every combination)"
        ),
    ],
    seeds: Annotated[int, typer.Option(help="seeds per point (the profile's seed + 0..n-1)")] = 3,
    profile: ProfileOpt = "smoke",
    data: DataOpt = None,
    pretrain_corpus: CorpusOpt = None,
    home: HomeOpt = None,
    strategy: Annotated[
        list[str] | None, typer.Option(help="sum | wsum | function (repeatable; default wsum)")
    ] = None,
    device: DeviceOpt = "auto",
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = "",
    set_: SetOpt = None,
    bilm: BilmOpt = "",
    task_runner: TaskRunnerOpt = "",
    dask_address: DaskAddressOpt = "",
    ablation: Annotated[
        bool,
        typer.Option(
            help="also train the static ablation per point and seed: each strategy's gain "
            "over it, mean ± std"
        ),
    ] = True,
) -> None:
    """Fan the classifier out over a grid x seeds on the same cached biLM and layers; prints
    mean ± std test accuracy per point, and each strategy's gain over the static ablation."""
    prefect_defaults()
    with user_errors():
        overrides = parse_overrides(set_ or [])
        points = parse_grid(grid)
    check_run_inputs(data, pretrain_corpus or [], bilm, home)
    server = prestart_ephemeral_server()
    from flows.sweep import SweepParams
    from storage.download import AG_NEWS_URL

    try:
        with user_errors():
            params = SweepParams(
                grid=points,
                seeds=seeds,
                profile=profile,  # type: ignore[arg-type]
                data=data or AG_NEWS_URL,
                pretrain_corpus=pretrain_corpus or [],
                home=home,
                strategies=strategy or ["wsum"],  # type: ignore[arg-type]
                device=device,  # type: ignore[arg-type]
                text_columns=text_column or [],
                label_column=label_column,
                overrides=overrides,
                bilm=bilm,
                task_runner=task_runner,  # type: ignore[arg-type]
                dask_address=dask_address,
                ablation=ablation,
            )
    except typer.Exit as e:
        abandon_server(server, e.exit_code)
        raise
    from flows.sweep import elmo_news_sweep
    from tasks.progress import live_display

    await_server(server, params.home_dir())
    with live_display():
        summary = elmo_news_sweep(**params.model_dump())
    typer.echo(summary["markdown"])


@app.command("pretrain")
def pretrain_cmd(
    corpus: Annotated[
        list[str],
        typer.Option(help="unlabeled text: file, folder or glob (repeatable); text/CSV/Parquet"),
    ],
    profile: ProfileOpt = "smoke",
    home: HomeOpt = None,
    device: DeviceOpt = "auto",
    set_: SetOpt = None,
    nproc_per_node: Annotated[
        int, typer.Option(help="data-parallel ranks on this machine (torchrun; 1 = in process)")
    ] = 1,
    torchrun_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="multi-node: torchrun flags replacing the single-node launch (repeatable, "
            "e.g. --torchrun-arg=--nnodes=2 --torchrun-arg=--rdzv-endpoint=HOST:29500 "
            "--torchrun-arg=--nproc-per-node=8); set --set pretrain.world_size to the total"
        ),
    ] = None,
) -> None:
    """Pretrain a biLM on unlabeled text alone and register it as elmo-news-bilm."""
    prefect_defaults()
    with user_errors():
        overrides = parse_overrides(set_ or [])
        if nproc_per_node > 1:
            overrides.setdefault("pretrain", {}).setdefault("world_size", nproc_per_node)
        for c in corpus:
            check_readable("pretrain corpus", c)
    server = prestart_ephemeral_server()
    from flows.params import PretrainParams

    try:
        with user_errors():
            params = PretrainParams(
                corpus=corpus,
                profile=profile,  # type: ignore[arg-type]
                home=home,
                device=device,  # type: ignore[arg-type]
                overrides=overrides,
            )
    except typer.Exit as e:
        abandon_server(server, e.exit_code)
        raise
    from flows.pretrain import elmo_news_pretrain
    from tasks.progress import live_display

    await_server(server, params.home_dir())
    with live_display():
        summary = elmo_news_pretrain(**params.model_dump(), torchrun_args=torchrun_arg or None)
    typer.echo(
        json.dumps(
            {"bilm": summary["bilm"], "registry": summary["registry"], **summary["metrics"]},
            indent=2,
        )
    )


def _tracking(home: str | None) -> None:
    """Point MLflow at the run's store (MLFLOW_TRACKING_URI wins) before resolving models:/ URIs."""
    from storage.paths import Home

    os.environ.setdefault("MLFLOW_TRACKING_URI", Home(home).mlflow_uri())


@app.command()
def predict(
    model: Annotated[
        str, typer.Option(help="MLflow model URI")
    ] = "models:/elmo-news-classifier@champion",
    input: Annotated[str, typer.Option("--input", help="CSV, Parquet or plain text")] = ...,  # type: ignore[assignment]
    output: Annotated[str, typer.Option("--output", help="Parquet file to write")] = ...,  # type: ignore[assignment]
    home: Annotated[str | None, typer.Option(help="home folder holding the MLflow store")] = None,
) -> None:
    """Predict labels and class probabilities for every document of a file."""
    prefect_defaults()
    _tracking(home)
    from serving.predict import predict_file
    from storage.registry import check_model_uri

    with user_errors():
        check_readable("input", input)
        check_model_uri(model)
    stats = predict_file.fn(model, input, output)
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def embed(
    model: Annotated[
        str, typer.Option(help="MLflow model URI")
    ] = "models:/elmo-news-classifier@champion",
    input: Annotated[str, typer.Option("--input", help="CSV, Parquet or plain text")] = ...,  # type: ignore[assignment]
    output: Annotated[str, typer.Option("--output", help="Parquet file to write")] = ...,  # type: ignore[assignment]
    all_layers: Annotated[
        bool, typer.Option(help="every biLM layer instead of the learned mix")
    ] = False,
    home: Annotated[str | None, typer.Option(help="home folder holding the MLflow store")] = None,
) -> None:
    """Contextual token embeddings per token (the learned mix, or all layers) to Parquet."""
    prefect_defaults()
    _tracking(home)
    from serving.predict import embed_file
    from storage.registry import check_model_uri

    with user_errors():
        check_readable("input", input)
        check_model_uri(model)
    n = embed_file(model, input, output, all_layers)
    typer.echo(f"{n} token vectors -> {output}")


def cli() -> None:
    """The console entry point: ``app``, then a quick interpreter exit.

    After a run the process holds millions of objects (torch, MLflow, Prefect, pydantic); the
    interpreter's final garbage collection walked them for ~4 s on a 2-core CPU (py-spy: all of
    it in gc_collect_main, after the atexit handlers had stopped the server and flushed logs),
    longer than a cached run's own flow. Freezing them first leaves that collection nothing to
    walk; nothing is skipped that a process exit does not drop anyway. Only here, not in ``run``,
    so an embedding process (tests, notebooks) keeps its normal collector.
    """
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    cli()
