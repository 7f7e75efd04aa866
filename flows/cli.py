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
    InputOpt,
    LabelColumnOpt,
    ModelOpt,
    OutputOpt,
    ProfileOpt,
    SetOpt,
    StoreHomeOpt,
    TaskRunnerOpt,
    TextColumnOpt,
    UserError,
    check_home,
    check_readable,
    check_run_inputs,
    check_serving_inputs,
    parse_grid,
    parse_overrides,
    project_errors,
    run_errors,
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


def launch(params_ref: str, fields: dict[str, Any], flow_ref: str) -> Any:
    """The one launch path of run, sweep and pretrain: the ephemeral server boots in its own
    process while the parameters validate, the data passes its preflight and the flow's
    modules import; bad parameters or data exit with one line before the flow starts (not
    waiting for that boot); the flow then runs with a live display, taking the validated
    parameters whole, and a project error inside it also ends as one line."""
    server = prestart_ephemeral_server()
    try:
        with user_errors():
            params = _load(params_ref)(**fields)
        preflight = getattr(params, "preflight", None)
        if preflight is not None:
            with user_errors(project_errors()):
                preflight()
    except typer.Exit as e:
        abandon_server(server, e.exit_code)
        raise
    flow_fn = _load(flow_ref)
    from tasks.progress import live_display

    await_server(server, params.home_dir())
    with live_display(), run_errors():
        return flow_fn(params=params)


def run_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The options of ``run`` / ``sweep`` as the parameter model's fields (an option not given
    takes the model's default), checked as far as needs no heavy import: ``--set`` and
    ``--grid`` parsed, the data, corpora and biLM found, before anything starts."""
    prefect_defaults()
    fields = {k: v for k, v in options.items() if v is not None and k != "set_"}
    with user_errors():
        fields["overrides"] = parse_overrides(options.get("set_") or [])
        if "grid" in fields:
            fields["grid"] = parse_grid(fields["grid"])
    check_run_inputs(
        options.get("data"), options.get("pretrain_corpus") or [], options["bilm"], options["home"]
    )
    return fields


@app.command()
def run(
    profile: ProfileOpt = "smoke",
    data: DataOpt = None,
    pretrain_corpus: CorpusOpt = None,
    home: HomeOpt = None,
    strategies: Annotated[
        list[str] | None, typer.Option("--strategy", help="sum | wsum | function (repeatable)")
    ] = None,
    device: DeviceOpt = "auto",
    text_columns: TextColumnOpt = None,
    label_column: LabelColumnOpt = "",
    set_: SetOpt = None,
    bilm: BilmOpt = "",
    task_runner: TaskRunnerOpt = "",
    dask_address: DaskAddressOpt = "",
) -> None:
    """Run the whole pipeline once (ephemeral Prefect, local MLflow store, local Parquet store)."""
    summary = launch("flows.params:RunParams", run_fields(locals()), "flows.pipeline:elmo_news")
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
    strategies: Annotated[
        list[str] | None,
        typer.Option("--strategy", help="sum | wsum | function (repeatable; default wsum)"),
    ] = None,
    device: DeviceOpt = "auto",
    text_columns: TextColumnOpt = None,
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
    fields = run_fields(locals())
    summary = launch("flows.sweep:SweepParams", fields, "flows.sweep:elmo_news_sweep")
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
    check_home(home)
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
            torchrun_args=torchrun_arg or None,
        ),
        "flows.pretrain:elmo_news_pretrain",
    )
    typer.echo(
        json.dumps(
            {"bilm": summary["bilm"], "registry": summary["registry"], **summary["metrics"]},
            indent=2,
        )
    )


@app.command()
def predict(
    input: InputOpt,
    output: OutputOpt,
    model: ModelOpt = "models:/elmo-news-classifier@champion",
    home: StoreHomeOpt = None,
) -> None:
    """Predict labels and class probabilities for every document of a file."""
    check_serving_inputs(home, input, model)
    from serving.predict import predict_file

    stats = predict_file.fn(model, input, output)
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def embed(
    input: InputOpt,
    output: OutputOpt,
    model: ModelOpt = "models:/elmo-news-classifier@champion",
    all_layers: Annotated[
        bool, typer.Option(help="every biLM layer instead of the learned mix")
    ] = False,
    home: StoreHomeOpt = None,
) -> None:
    """Contextual token embeddings per token (the learned mix, or all layers) to Parquet."""
    check_serving_inputs(home, input, model)
    from serving.predict import embed_file

    n = embed_file(model, input, output, all_layers)
    typer.echo(f"{n} token vectors -> {output}")


@app.command("import-bilm")
def import_bilm(
    options: Annotated[str, typer.Option(help="a published ELMo options.json: path or URL")],
    weights: Annotated[str, typer.Option(help="its weights HDF5: path or URL")],
    embedding: Annotated[
        str, typer.Option(help="bilm-tf's token-input form: the token vectors HDF5")
    ] = "",
    vocab: Annotated[str, typer.Option(help="with --embedding: its vocabulary file")] = "",
    home: StoreHomeOpt = None,
) -> None:
    """Turn a published ELMo model (AllenNLP / bilm-tf files) into this product's biLM and
    register it as elmo-news-bilm, for run --bilm, embed and predict."""
    prefect_defaults()
    check_home(home)
    files = {"options": options, "weights": weights, "embedding": embedding, "vocab": vocab}
    with user_errors():
        if bool(embedding) != bool(vocab):
            raise UserError("--embedding and --vocab go together (bilm-tf's token-input form)")
        for what, ref in files.items():
            if ref:
                check_readable(what, ref)
    from storage.paths import Home
    from storage.published_models import import_and_register

    with user_errors(project_errors()):
        info = import_and_register(options, weights, Home(home), embedding, vocab)
    typer.echo(json.dumps(info, indent=2))


@app.command("export-bilm")
def export_bilm(
    model: Annotated[
        str, typer.Argument(help="models:/elmo-news-bilm/N (or @ALIAS) or a biLM folder")
    ],
    out: Annotated[str, typer.Option(help="folder for options.json + weights.hdf5")],
    home: StoreHomeOpt = None,
) -> None:
    """Write a char-encoder biLM in ELMo's published layout (options.json + weights.hdf5),
    which AllenNLP and bilm-tf load."""
    prefect_defaults()
    from pathlib import Path

    from storage.paths import Home
    from storage.published_models import export_model

    with user_errors():  # an unknown model version, a folder that is not a biLM, a word biLM
        if not model.startswith("models:/"):
            check_readable("biLM", model)
        info = export_model(model, Path(out), Home(home))
    typer.echo(json.dumps(info, indent=2))


def cli() -> None:
    """The console entry point: ``app``, then a quick interpreter exit.

    After a run the process holds millions of objects (torch, MLflow, Prefect, pydantic); the
    interpreter's final garbage collection walks them all (after the atexit handlers have
    stopped the server and flushed logs), which can take longer than a cached run's own flow. Freezing them first leaves that collection nothing to
    walk; nothing is skipped that a process exit does not drop anyway. Only here, not in ``run``,
    so an embedding process (tests, notebooks) keeps its normal collector.
    """
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    cli()
