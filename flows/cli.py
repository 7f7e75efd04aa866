"""The ``elmo-news`` command line (typer)."""

from __future__ import annotations

import gc
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, help="Pretrain ELMo from scratch and classify news.")


@app.callback()
def main() -> None:
    """elmo-news: a cached Prefect pipeline that pretrains ELMo and classifies news."""


def prefect_defaults() -> None:
    """Offline-friendly defaults for the embedded (ephemeral) Prefect server; env wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


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

    ensure_logging_setup()  # so its "Starting temporary server" line shows, as without this

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-server-start")
    started = pool.submit(SubprocessASGIServer().start)
    pool.shutdown(wait=False)  # the submitted start still runs to its end
    return started


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


@app.command()
def run(
    profile: Annotated[str, typer.Option(help="smoke | sample | full | seed")] = "smoke",
    data: Annotated[
        str | None, typer.Option(help="dataset folder/file or URL (default: AG News)")
    ] = None,
    pretrain_corpus: Annotated[
        list[str] | None, typer.Option(help="extra unlabeled text (repeatable)")
    ] = None,
    home: Annotated[
        str | None, typer.Option(help="home folder (default $ELMO_NEWS_HOME or .elmo-news)")
    ] = None,
    strategy: Annotated[
        list[str] | None, typer.Option(help="sum | wsum | function (repeatable)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    text_column: Annotated[
        list[str] | None, typer.Option(help="your data: text column (repeatable)")
    ] = None,
    label_column: Annotated[str, typer.Option(help="your data: label column")] = "",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.field=value")
    ] = None,
) -> None:
    """Run the whole pipeline once (ephemeral Prefect, local MLflow store, local Parquet store)."""
    prefect_defaults()
    # boots in its own process while the parameters and the pipeline's modules import
    server = prestart_ephemeral_server()
    from flows.params import RunParams
    from storage.datasets import AG_NEWS_URL

    params = RunParams(
        profile=profile,  # type: ignore[arg-type]
        data=data or AG_NEWS_URL,
        pretrain_corpus=pretrain_corpus or [],
        home=home,
        strategies=strategy or ["sum", "wsum", "function"],  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        text_columns=text_column or [],
        label_column=label_column,
        overrides=parse_overrides(set_ or []),
    )  # bad parameters fail here, before the flow starts
    from flows.pipeline import elmo_news
    from storage.paths import Home
    from storage.tracking import Tracker

    if server is not None and not server.done():
        # while the server still boots: create / migrate the MLflow store (~2 s on a new home)
        # here instead of at the flow's start
        Tracker(Home(params.home_dir()).mlflow_uri())
    if server is not None:
        server.result()  # the flow must find it up, not half-started
    summary = elmo_news(**params.model_dump())
    typer.echo(
        json.dumps({k: v.get("test_accuracy") for k, v in summary["models"].items()}, indent=2)
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
    from tasks.predict import predict_file

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
    from tasks.predict import embed_file

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
