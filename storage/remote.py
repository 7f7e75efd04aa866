"""Labelled datasets on object stores (``s3://bucket/prefix``, ``gs://...``, ``abfs://...``)
through ``pyarrow.fs``: the files under the prefix are copied once into the home's downloads,
then ingested like a local folder (content-hashed, so a changed object re-runs what it feeds).

S3 settings come from the usual AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ...);
an S3-compatible server (MinIO, Ceph, moto) from ``AWS_ENDPOINT_URL`` or the URI's own query,
as pyarrow reads it: ``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from storage.errors import DataError

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
# what a labelled dataset folder holds (storage.datasets.read_source reads these)
WANTED = (".csv", ".parquet", ".json")
CHUNK = 8 << 20


def is_object_store(uri: str) -> bool:
    return urlsplit(uri).scheme in SCHEMES


def _filesystem(uri: str):  # -> (pyarrow.fs.FileSystem, path)
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if parts.scheme == "s3" and endpoint and "endpoint_override" not in query:
        ep = urlsplit(endpoint)
        query["endpoint_override"] = ep.netloc or ep.path
        query.setdefault("scheme", ep.scheme or "https")
    clean = parts._replace(query=urlencode(query)).geturl()
    try:
        return pafs.FileSystem.from_uri(clean)
    except (OSError, ValueError) as e:
        raise DataError(f"{uri}: cannot open the object store: {e}") from e


def fetch_object_store(uri: str, downloads: Path) -> Path:
    """Copy the dataset files under ``uri`` (a prefix: ``train*.parquet``, ``test.csv``, ...)
    into ``downloads/<hash of uri>/`` and return that folder. An object is copied again only
    when its size or modification time changed; each copy is a temp file + rename, its length
    checked, so an interrupted copy never leaves a file a later run would use."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except FileNotFoundError:
        raise DataError(f"{uri}: no such bucket or prefix") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot list the prefix: {e}") from e
    files = [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(WANTED)]
    if not files:
        raise DataError(f"{uri}: no dataset files (csv / parquet) under the prefix")
    folder = downloads / hashlib.sha256(uri.split("?")[0].encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for info in files:
        name = info.path.rsplit("/", 1)[-1]
        dest = folder / name
        stamp = folder / f".{name}.etag"
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        tag = f"{info.size} {mtime}"
        if dest.exists() and stamp.exists() and stamp.read_text() == tag:
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            n = 0
            with fs.open_input_stream(info.path) as src, os.fdopen(fd, "wb") as out:
                while block := src.read(CHUNK):
                    out.write(block)
                    n += len(block)
            if n != info.size:
                raise DataError(f"{uri}/{name}: copy is truncated: {n} of {info.size} bytes")
            os.replace(tmp, dest)
            stamp.write_text(tag)
        except OSError as e:
            raise DataError(f"{uri}/{name}: copy failed: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
    # objects gone from the prefix must not linger in the copy
    keep = {i.path.rsplit("/", 1)[-1] for i in files}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in keep:
            p.unlink()
    return folder
