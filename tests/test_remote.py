"""Datasets on an object store: ``--data s3://bucket/prefix`` through pyarrow.fs, against a
real S3-compatible server (moto's server mode, its own process on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import DataError
from storage.paths import read_json
from tasks.ingest import IngestConfig, ingest
from tasks.remote import fetch_remote
from tasks.stage import StageContext
from tests.conftest import SHARED, free_port, stop_group, wait_http

LARGE = SHARED / "ag_news_large"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server; the AWS environment points at it for the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    mp = pytest.MonkeyPatch()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/", proc, "moto S3 server", timeout=60)
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            mp.setenv(k, v)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="news")
        yield client
    finally:
        mp.undo()
        stop_group(proc)


def _put_table(client, key: str, table: pa.Table, tmp: Path) -> bytes:
    path = tmp / key.replace("/", "_")
    pq.write_table(table, path)
    data = path.read_bytes()
    client.put_object(Bucket="news", Key=key, Body=data)
    return data


def test_sharded_parquet_dataset_from_s3(s3, tmp_path):
    train = pq.read_table(LARGE / "train.parquet").slice(0, 900)
    test = pq.read_table(LARGE / "test.parquet").slice(0, 200)
    shards = {
        "ag/train-00000-of-00002.parquet": train.slice(0, 500),
        "ag/train-00001-of-00002.parquet": train.slice(500),
        "ag/test-00000-of-00001.parquet": test,
    }
    sent = {k.split("/")[1]: _put_table(s3, k, t, tmp_path) for k, t in shards.items()}
    s3.put_object(Bucket="news", Key="ag/README.txt", Body=b"not data")
    home = tmp_path / "home"
    folder = Path(fetch_remote.fn("s3://news/ag", str(home)))
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(sent)
    for name, data in sent.items():
        assert (folder / name).read_bytes() == data
    dataset = ingest.fn(str(folder), IngestConfig(), StageContext(str(home)))
    stats = read_json(Path(dataset) / "metrics.json")
    # every shard: rows in = accepted + quarantined = both train shards' rows
    assert stats["rows_in_train"] == 900
    assert stats["rows_accepted_train"] + stats["rows_quarantined_train"] == 900
    assert stats["rows_in_test"] == 200

    # unchanged objects are not copied again; a changed one is, a deleted one goes
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert Path(fetch_remote.fn("s3://news/ag", str(home))) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    new = _put_table(s3, "ag/test-00000-of-00001.parquet", test.slice(0, 100), tmp_path)
    s3.delete_object(Bucket="news", Key="ag/train-00001-of-00002.parquet")
    fetch_remote.fn("s3://news/ag", str(home))
    assert (folder / "test-00000-of-00001.parquet").read_bytes() == new
    assert not (folder / "train-00001-of-00002.parquet").exists()


def test_object_store_errors_name_the_uri(s3, tmp_path):
    with pytest.raises(DataError, match="s3://missing-bucket/x: cannot list.*does not exist"):
        fetch_remote.fn("s3://missing-bucket/x", str(tmp_path))
    with pytest.raises(DataError, match="s3://news/nothing-here: no such bucket or prefix"):
        fetch_remote.fn("s3://news/nothing-here", str(tmp_path))
    s3.put_object(Bucket="news", Key="empty/notes.txt", Body=b"x")
    with pytest.raises(DataError, match="s3://news/empty: no dataset files"):
        fetch_remote.fn("s3://news/empty", str(tmp_path))


def test_endpoint_in_the_uri_instead_of_the_environment(s3, monkeypatch, tmp_path):
    host = s3.meta.endpoint_url.removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3.put_object(Bucket="news", Key="q/train.csv", Body=b'"1","a","b"\n')
    s3.put_object(Bucket="news", Key="q/test.csv", Body=b'"2","c","d"\n')
    folder = Path(
        fetch_remote.fn(f"s3://news/q?endpoint_override={host}&scheme=http", str(tmp_path))
    )
    assert (folder / "train.csv").read_bytes() == b'"1","a","b"\n'
    # the query is not part of the copy's identity: the same prefix, the same folder
    assert folder == Path(
        fetch_remote.fn("s3://news/q?scheme=http&endpoint_override=" + host, str(tmp_path))
    )
