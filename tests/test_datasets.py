"""Ingest: every row is accounted for, bad rows are quarantined with a reason, bad files fail
with a message naming the file, downloads are all-or-nothing."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import polars as pl
import pytest

from storage.corpus import iter_corpus, resolve_corpus
from storage.datasets import read_dataset
from storage.download import download, fetch_source
from storage.errors import DataError
from storage.readers import read_ag_csv, read_source
from tests.conftest import AG, REUTERS

GOOD = '"3","Wall St. Bears","Short-sellers are seeing green."\n'


def _csv(tmp_path: Path, body: bytes | str, name: str = "train.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(body.encode() if isinstance(body, str) else body)
    return p


ROW_CASES = [
    ("wrong column count", '"3","only title"\n', "expected 3 columns, got 2"),
    ("label outside the class set", '"7","t","d"\n', "label '7' outside the class set"),
    ("non-numeric label", '"x","t","d"\n', "label 'x' outside the class set"),
    ("empty text", '"2","",""\n', "empty text"),
    ("whitespace-only text", '"2","   ","  \\ "\n', "empty text"),
    ("invalid UTF-8", b'"1","caf\xe9 \xff","d"\n', "invalid UTF-8 bytes"),
    ("enormous field", '"1","t","' + "x" * 1_100_000 + '"\n', "field longer than"),
]


@pytest.mark.parametrize(("case", "row", "reason"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_quarantined_with_a_reason(tmp_path, case, row, reason):
    body = GOOD.encode() + (row if isinstance(row, bytes) else row.encode()) + GOOD.encode()
    out = read_ag_csv(_csv(tmp_path, body), "train")
    assert out.rows_in == 3 == len(out.rows) + len(out.quarantine)
    assert len(out.quarantine) == 1
    assert reason in out.quarantine[0]["reason"]
    assert out.quarantine[0]["row"] == 2


def test_duplicates_are_kept_and_counted(tmp_path):
    out = read_ag_csv(_csv(tmp_path, GOOD * 3), "train")
    assert len(out.rows) == 3 and out.duplicates == 2


def test_ragged_csv_with_unbalanced_quote_is_accounted_for(tmp_path):
    out = read_ag_csv(_csv(tmp_path, GOOD + '"1","broken title,"d\n' + GOOD), "train")
    assert out.rows_in == len(out.rows) + len(out.quarantine)
    assert len(out.rows) >= 1


FILE_CASES = [
    ("missing file", None, "does not exist"),
    ("empty file", "", "file is empty"),
    ("blank file", "\n\n  \n", "file is empty"),
]


@pytest.mark.parametrize(("case", "body", "message"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unusable_files_fail_naming_the_file(tmp_path, case, body, message):
    path = tmp_path / "train.csv"
    if body is not None:
        path.write_text(body)
    with pytest.raises(DataError, match=message) as err:
        read_ag_csv(path, "train")
    assert str(path) in str(err.value)


def test_header_only_user_csv_fails_naming_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("headline,topic\n")
    (tmp_path / "test.csv").write_text("headline,topic\nx,y\n")
    with pytest.raises(DataError, match=r"train\.csv: no data rows"):
        read_source(tmp_path, ["headline"], "topic")


def test_missing_folder_and_missing_pair(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_source(tmp_path / "nope", None, None)
    (tmp_path / "train.csv").write_text(GOOD)
    with pytest.raises(DataError, match="no train/test pair"):
        read_source(tmp_path, None, None)


def test_wrong_schema_parquet_fails(tmp_path):
    pl.DataFrame({"body": ["x"], "y": [1]}).write_parquet(tmp_path / "train.parquet")
    pl.DataFrame({"body": ["x"], "y": [1]}).write_parquet(tmp_path / "test.parquet")
    with pytest.raises(DataError, match="missing columns"):
        read_source(tmp_path, None, None)
    with pytest.raises(DataError, match="wrong schema"):
        read_dataset(tmp_path / "train.parquet")


def test_public_parquet_form_and_user_columns(tmp_path):
    df = pl.DataFrame({"text": ["a b c", "d e f", "g h"], "label": [0, 3, 1]})
    df.write_parquet(tmp_path / "train-00000.parquet")
    df.write_parquet(tmp_path / "test-00000.parquet")
    splits, names = read_source(tmp_path, None, None)
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    assert [r["label_name"] for r in splits["train"].rows] == ["World", "Sci/Tech", "Sports"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "train.csv").write_text("headline,topic\nstocks up,econ\ngoal scored,sport\n")
    (user / "test.csv").write_text("headline,topic\nbonds down,econ\nrain,weather\n")
    splits, names = read_source(user, ["headline"], "topic")
    assert names == ["econ", "sport"]
    assert (
        len(splits["test"].rows) == 1
        and "outside the class set" in splits["test"].quarantine[0]["reason"]
    )


def test_every_parquet_shard_of_a_split_is_read(tmp_path):
    """A split published as shards loses no rows (rows in = accepted + quarantined over all)."""
    large = AG.parent / "ag_news_large"
    train = pl.read_parquet(large / "train.parquet").head(3000)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir()
    sharded.mkdir()
    train.write_parquet(whole / "train.parquet")
    train.head(1200).write_parquet(sharded / "train-00000-of-00002.parquet")
    train.tail(1800).write_parquet(sharded / "train-00001-of-00002.parquet")
    test = pl.read_parquet(large / "test.parquet").head(500)
    for d in (whole, sharded):
        test.head(200).write_parquet(d / "test-00000-of-00002.parquet")
        test.tail(300).write_parquet(d / "test-00001-of-00002.parquet")
    a, _ = read_source(whole, None, None)
    b, _ = read_source(sharded, None, None)
    assert b["train"].rows_in == 3000 == len(b["train"].rows) + len(b["train"].quarantine)
    assert b["test"].rows_in == 500 == a["test"].rows_in
    assert [r["text"] for r in b["train"].rows] == [r["text"] for r in a["train"].rows]
    assert len({r["id"] for r in b["train"].rows}) == len(
        b["train"].rows
    )  # ids unique across shards


def test_real_ag_news_sample_is_read_completely():
    out = read_ag_csv(AG / "test.csv", "test")
    assert out.rows_in == 7600 == len(out.rows)
    assert {r["label"] for r in out.rows} == {0, 1, 2, 3}
    assert "#39;" not in " ".join(r["text"] for r in out.rows[:500])


def test_reuters_corpus_reads_title_and_body():
    batches = list(iter_corpus(resolve_corpus(str(REUTERS))))
    texts = [t for b in batches for t in b]
    assert len(batches) > 1  # streamed in bounded batches, not one list
    assert len(texts) > 19_000
    assert any("BAHIA COCOA REVIEW" in t for t in texts[:5])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class _Truncating(_Quiet):
    def do_GET(self):  # claims more bytes than it sends
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a folder with the real AG sample's test split."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "test.csv").write_bytes((AG / "test.csv").read_bytes())
    (root / "train.csv").write_bytes(
        b"".join((AG / "train.csv").read_bytes().splitlines(True)[:300])
    )
    servers = []

    def start(handler=_Quiet):
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
        )
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/", root

    yield start
    for s in servers:
        s.shutdown()


def test_download_from_local_server_then_ingest(server, tmp_path):
    url, root = server()
    sums = {n: hashlib.md5((root / n).read_bytes()).hexdigest() for n in ("train.csv", "test.csv")}
    folder = fetch_source(url, tmp_path / "dl", sums)
    assert (folder / "test.csv").read_bytes() == (AG / "test.csv").read_bytes()
    splits, _ = read_source(folder, None, None)
    assert splits["test"].rows_in == 7600 and splits["train"].rows_in == 300
    # a second fetch reuses the files (no second download needed)
    assert fetch_source(url, tmp_path / "dl", sums) == folder


def test_download_404_leaves_nothing(server, tmp_path):
    url, _ = server()
    with pytest.raises(DataError, match="HTTP 404"):
        download(url + "missing.csv", tmp_path / "dl" / "missing.csv")
    assert not list((tmp_path / "dl").iterdir())


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server()
    with pytest.raises(DataError, match="checksum mismatch"):
        download(url + "test.csv", tmp_path / "dl" / "test.csv", "0" * 64)
    assert not list((tmp_path / "dl").iterdir())


def test_download_truncated_body_leaves_nothing(server, tmp_path):
    url, _ = server(_Truncating)
    with pytest.raises(DataError, match="truncated|failed"):
        download(url + "test.csv", tmp_path / "dl" / "test.csv")
    assert not list((tmp_path / "dl").iterdir())
