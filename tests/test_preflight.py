"""The data preflight: every dataset ingestion would refuse ends, at the real command line,
as one ``error:`` line naming the file, column, class or value, and exit status 2, before
anything runs; a refusal found inside a run (a URL, a deployment) ends the same way, its
traceback kept for ``--debug``. The preflight and ingestion share one set of rules."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import DataError, HomeError
from storage.paths import Home
from storage.splits import plan_splits
from tasks.ingest import IngestConfig, _read, preflight
from tests.conftest import AG, ROOT


def _ag_rows(split: str) -> list[list[str]]:
    with (AG / f"{split}.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@functools.cache
def _by_class() -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for r in _ag_rows("train"):
        out.setdefault(r[0], []).append(r)
    return out


def _ag_folder(folder: Path, train: list[list[str]], test: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    return folder


def _case(tmp: Path, name: str) -> tuple[list[str], str]:
    """The bad inputs a new user met (on small real AG News slices) -> (CLI args, the
    start of the one error line)."""
    c, test = _by_class(), _ag_rows("test")[:40]
    d = tmp / name
    if name == "one class":
        _ag_folder(d, c["1"][:40], test)
        return ["--data", str(d)], (
            f"error: {d}: the train split holds one class only ('World'); a classifier needs "
            "at least two"
        )
    if name == "every test row quarantined":
        _ag_folder(d, c["1"][:20] + c["2"][:20], [["9", *r[1:]] for r in test])
        return ["--data", str(d)], (
            f"error: {d}: no usable test rows (40 of 40 quarantined: label '9' outside the "
            "class set"
        )
    if name in ("integer text column", "missing text column"):
        d.mkdir(parents=True)
        for split, n in (("train", 60), ("test", 20)):
            labels = [None if i % 7 == 0 else f"c{i % 3}" for i in range(n)]
            table = pa.table({"text": list(range(n)), "label": labels})
            pq.write_table(table, d / f"{split}.parquet")
        column = "text" if name == "integer text column" else "headline"
        args = ["--data", str(d), "--text-column", column, "--label-column", "label"]
        if column == "text":
            return args, f"error: {d / 'train.parquet'}: text column 'text' holds Int64 values"
        return args, f"error: {d / 'train.parquet'}: wrong schema, missing columns ['headline']"
    if name == "home is a file":
        home = tmp / "home-file"
        home.write_text("not a folder")
        return ["--data", str(AG), "--home", str(home)], (
            f"error: {home}: the home is a file, not a folder"
        )
    raise AssertionError(name)


CASES = [
    "one class",
    "every test row quarantined",
    "integer text column",
    "missing text column",
    "home is a file",
]


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        ELMO_NEWS_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_error_line_and_exit_2_before_anything_runs(case, tmp_path):
    args, needle = _case(tmp_path, case)
    home = [] if "--home" in args else ["--home", str(tmp_path / "home")]
    res = _cli(tmp_path, "run", "--profile", "smoke", *args, *home)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "home" / "ingest").exists()  # refused before any stage


@pytest.fixture
def served(tmp_path):
    """The one-class dataset behind a local URL: the CLI cannot read it ahead, so the flow's
    own preflight task refuses it."""
    _case(tmp_path, "one class")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "one class")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_a_refusal_inside_the_run_is_one_error_line_and_its_traceback_is_for_debug(
    served, tmp_path
):
    args = ["run", "--profile", "smoke", "--data", served, "--home", str(tmp_path / "h")]
    res = _cli(tmp_path, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr
    assert errors[0].startswith(f"error: {served}: the train split holds one class only")
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "h" / "ingest").exists()

    debug = _cli(tmp_path, "--debug", *args)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr


# ------------------------------------------------------------------ the rules, as functions


def test_preflight_and_ingestion_refuse_with_the_same_words(tmp_path):
    for case in CASES[:3]:
        _case(tmp_path, case)
        with pytest.raises(DataError) as pre:
            preflight(str(tmp_path / case), IngestConfig())
        with pytest.raises(DataError) as ing:
            _read(str(tmp_path / case), IngestConfig(), keep=True)
        assert str(pre.value) == str(ing.value)


def test_preflight_counts_match_what_ingestion_writes():
    config = IngestConfig(limit_train=1500, limit_test=400)
    report = preflight(str(AG), config)
    _, _, plan = _read(str(AG), config, keep=True)
    assert report["rows"] == {k: len(v) for k, v in plan.items()}
    assert report["rows"]["train"] + report["rows"]["val"] == 1500
    assert report["classes"] == 4 and report["smallest_class_train"] > 1


def test_the_validation_split_must_hold_every_class():
    labels = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(DataError, match=r"validation split would hold 1 of 10 train rows"):
        plan_splits(labels, [0], list("abcde"), 0.1, 0, 0, 0, "src")
    plan = plan_splits(labels, [0], list("abcde"), 0.45, 0, 0, 0, "src")
    assert sorted(plan["train"] + plan["val"]) == list(range(10)) and len(plan["val"]) == 5


def test_a_class_of_one_document_is_trained_on_never_validated_on():
    labels = [0] * 50 + [1] * 50 + [2]  # R52 has such classes (one train document)
    for limit in (0, 20):
        plan = plan_splits(labels, [0], list("abc"), 0.1, 0, limit, 0, "src")
        assert 100 in plan["train"] and 100 not in plan["val"]
        assert len(plan["train"]) + len(plan["val"]) == (limit or 101)
        assert {labels[i] for i in plan["val"]} == {0, 1}


def test_a_row_limit_too_small_for_its_classes_names_the_limit():
    labels = [0] * 50 + [1] * 50 + [2] * 50
    with pytest.raises(DataError, match=r"ingest.limit_train would hold 2 of 150 train rows"):
        plan_splits(labels, [0], list("abc"), 0.1, 0, 2, 0, "src")


def test_a_home_that_is_not_writable_or_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(HomeError, match=r"its parent .*/f is a file, not a folder"):
        Home(tmp_path / "f" / "home").check_writable()
    Home(tmp_path / "new" / "home").check_writable()  # a folder still to be made is fine
    # tests run as root, for whom every folder is writable: the permission check is the OS's
    monkeypatch.setattr("storage.paths.os.access", lambda path, mode: False)
    with pytest.raises(HomeError, match=r"home folder is not writable"):
        Home(tmp_path / "home").check_writable()
