"""The ``elmo-news`` command line (typer)."""

from __future__ import annotations

import gc
import importlib
import json
from typing import Annotated, Any

import typer

from flows.cli_args import (
    DEBUG,
    BilmOpt,
    CorpusOpt,
    DaskAddressOpt,
    DataOpt,
    DeviceOpt,
    HomeOpt,
    LabelColumnOpt,
    ProfileOpt,
    SetOpt,
    TaskRunnerOpt,
    TextColumnOpt,
    _tracking,
    check_readable,
    check_run_inputs,
    parse_grid,
    parse_overrides,
    user_errors,
)
from flows.server import abandon_server, await_server, prefect_defaults, prestart_ephemeral_server

app = typer.Typer(
    add_completion=False,
    help="Pretrain ELMo from scratch and classify news.",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the full traceback of any error")
    ] = False,
) -> None:
    """elmo-news: a cached Prefect pipeline that pretrains ELMo and classifies news."""
    DEBUG["on"] = debug


def _load(ref: str) -> Any:
    """``module:name`` -> the object, imported only now (the pipeline's imports are heavy)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def launch(params_ref: str, fields: dict[str, Any], flow_ref: str, **extra: Any) -> Any:
    """The one launch path of run, sweep and pretrain: the ephemeral server boots in its own
    process while the parameters validate and the flow's modules import; bad parameters exit
    with one line before the flow starts (not waiting for that boot); the flow then runs with
    a live display."""
    server = prestart_ephemeral_server()
    try:
        with user_errors():
            params = _load(params_ref)(**fields)
    except typer.Exit as e:
        abandon_server(server, e.exit_code)
        raise
    flow_fn = _load(flow_ref)
    from tasks.progress import live_display

    await_server(server, params.home_dir())
    with live_display():
        return flow_fn(**params.model_dump(), **extra)


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
    from storage.download import AG_NEWS_URL

    summary = launch(
        "flows.params:RunParams",
        dict(
            profile=profile,
            data=data or AG_NEWS_URL,
            pretrain_corpus=pretrain_corpus or [],
            home=home,
            strategies=strategy or ["sum", "wsum", "function"],
            device=device,
            text_columns=text_column or [],
            label_column=label_column,
            overrides=overrides,
            bilm=bilm,
            task_runner=task_runner,
            dask_address=dask_address,
        ),
        "flows.pipeline:elmo_news",
    )
    typer.echo(
        json.dumps({k: v.get("test_accuracy") for k, v in summary["models"].items()}, indent=2)
    )


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
    from storage.download import AG_NEWS_URL

    summary = launch(
        "flows.sweep:SweepParams",
        dict(
            grid=points,
            seeds=seeds,
            profile=profile,
            data=data or AG_NEWS_URL,
            pretrain_corpus=pretrain_corpus or [],
            home=home,
            strategies=strategy or ["wsum"],
            device=device,
            text_columns=text_column or [],
            label_column=label_column,
            overrides=overrides,
            bilm=bilm,
            task_runner=task_runner,
            dask_address=dask_address,
            ablation=ablation,
        ),
        "flows.sweep:elmo_news_sweep",
    )
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

    summary = launch(
        "flows.params:PretrainParams",
        dict(
            corpus=corpus,
            profile=profile,
            home=home,
            device=device,
            overrides=overrides,
        ),
        "flows.pretrain:elmo_news_pretrain",
        torchrun_args=torchrun_arg or None,
    )
    typer.echo(
        json.dumps(
            {"bilm": summary["bilm"], "registry": summary["registry"], **summary["metrics"]},
            indent=2,
        )
    )


@app.command()
def predict(
    input: Annotated[str, typer.Option("--input", help="CSV, Parquet or plain text")],
    output: Annotated[str, typer.Option("--output", help="Parquet file to write")],
    model: Annotated[
        str, typer.Option(help="MLflow model URI")
    ] = "models:/elmo-news-classifier@champion",
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
    input: Annotated[str, typer.Option("--input", help="CSV, Parquet or plain text")],
    output: Annotated[str, typer.Option("--output", help="Parquet file to write")],
    model: Annotated[
        str, typer.Option(help="MLflow model URI")
    ] = "models:/elmo-news-classifier@champion",
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
