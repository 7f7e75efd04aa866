"""Data behind a URL, downloaded once into the home with a checksum check."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from storage.errors import DataError

AG_NEWS_URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"


AG_NEWS_MD5 = {
    "train.csv": "b1a00f826fdfbd249f79597b59e1dc12",
    "test.csv": "d52ea96a97a2d943681189a97654912d",
}


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, checksum: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` once. The body goes to a temp file, its length is checked against
    Content-Length and its digest against ``checksum`` (md5 or sha256 hex) before the rename, so a
    404, a truncated body or a wrong checksum never leaves a file that later runs would use."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as f:
                expected = resp.headers.get("Content-Length")
                n = 0
                while block := resp.read(1 << 20):
                    f.write(block)
                    n += len(block)
        except urllib.error.HTTPError as e:
            raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"download of {url} failed: {e}") from e
        if expected is not None and n != int(expected):
            raise DataError(f"download of {url} is truncated: {n} of {expected} bytes")
        if checksum:
            algo = "md5" if len(checksum) == 32 else "sha256"
            got = _digest(tmp, algo)
            if got != checksum.lower():
                raise DataError(
                    f"checksum mismatch for {url}: expected {algo} {checksum}, got {got}"
                )
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def fetch_source(data: str, downloads: Path, checksums: dict[str, str] | None = None) -> Path:
    """A local folder/file for ``data``; URLs are downloaded into ``downloads`` first."""
    if not data.startswith(("http://", "https://")):
        return Path(data).expanduser()
    base = data if data.endswith("/") else data + "/"
    if checksums is None and base == AG_NEWS_URL:
        checksums = AG_NEWS_MD5
    folder = downloads / hashlib.sha256(base.encode()).hexdigest()[:16]
    for name in ("train.csv", "test.csv"):
        download(base + name, folder / name, (checksums or {}).get(name))
    return folder
