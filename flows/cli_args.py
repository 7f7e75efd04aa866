"""What the commands share: option types declared once, argument parsing, input checks,
and errors reported as one line with exit status 2."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.server import prefect_defaults

DEBUG = {"on": False}  # --debug: user errors keep their traceback


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


def project_errors() -> tuple[type[Exception], ...]:
    """The errors about what the user gave (arguments, data, home, checkpoints): one line at
    the command line. Any other exception inside a run is a bug and keeps its traceback."""
    from elmo_core.checkpoint import CheckpointError
    from elmo_core.published import PublishedFormatError
    from storage.errors import DataError, HomeError

    return (UserError, DataError, HomeError, CheckpointError, PublishedFormatError)


@contextmanager
def user_errors(
    types: tuple[type[BaseException], ...] | None = None,
) -> Iterator[None]:
    """Bad input ends as ``error: <what and which value>`` on stderr and exit status 2; the
    traceback is kept for bugs (any other exception) and for everything under --debug.
    Default ``types``: what argument checks raise (value, OS and MLflow errors)."""
    from mlflow.exceptions import MlflowException

    caught = types or (ValueError, OSError, MlflowException, typer.BadParameter)
    try:
        yield
    except caught as e:
        if DEBUG["on"]:
            raise
        logging.getLogger("prefect").disabled = True  # no "Stopping temporary server" line
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None


class _HideProjectTracebacks(logging.Filter):
    """On the console, a task or flow failing with a project error prints no traceback (the
    command's ``error:`` line says it); Prefect's API log handler still records it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return DEBUG["on"] or not isinstance(exc, project_errors())


@contextmanager
def run_errors() -> Iterator[None]:
    """Around a flow: a project error raised in a task ends the command as one ``error:``
    line and exit 2 (the traceback in Prefect's logs, and on the console with --debug)."""
    from tasks.progress import prefect_console_handler

    handler = prefect_console_handler()
    hide = _HideProjectTracebacks()
    if handler is not None:
        handler.addFilter(hide)
    try:
        with user_errors(project_errors()):
            yield
    finally:
        if handler is not None:
            handler.removeFilter(hide)


def check_home(home: str | None) -> None:
    """The home is a writable folder (or can become one) before anything starts."""
    from storage.paths import Home

    with user_errors():
        Home(home).check_writable()


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


def check_run_inputs(data: str | None, corpora: list[str], bilm: str, home: str | None) -> None:
    """``run`` and ``sweep``: the data, corpora and biLM exist (a ``models:/`` biLM in the
    home's registry) before anything starts; a miss exits as a user error."""
    check_home(home)
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


CorpusOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="extra unlabeled text (repeatable): pretrained on beside the train split, or "
        "with --bilm, what the reused biLM adapts on beside it"
    ),
]


HomeOpt = Annotated[
    str | None, typer.Option(help="home folder (default $ELMO_NEWS_HOME or .elmo-news)")
]


DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]


TextColumnOpt = Annotated[
    list[str] | None, typer.Option("--text-column", help="your data: text column (repeatable)")
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


def _tracking(home: str | None) -> None:
    """Point MLflow at the run's store (MLFLOW_TRACKING_URI wins) before resolving models:/ URIs."""
    from storage.paths import Home

    os.environ.setdefault("MLFLOW_TRACKING_URI", Home(home).mlflow_uri())


InputOpt = Annotated[str, typer.Option("--input", help="CSV, Parquet or plain text")]
OutputOpt = Annotated[str, typer.Option("--output", help="Parquet file to write")]
ModelOpt = Annotated[str, typer.Option(help="MLflow model URI")]
StoreHomeOpt = Annotated[str | None, typer.Option(help="home folder holding the MLflow store")]


def check_serving_inputs(home: str | None, input: str, model: str) -> None:
    """``predict`` / ``embed``: the home's MLflow store, a readable input and a model that
    exists in it, before anything loads."""
    prefect_defaults()
    _tracking(home)
    from storage.registry import check_model_uri

    with user_errors():
        check_readable("input", input)
        check_model_uri(model)
