"""Content hashes for cache keys: files by their bytes, configs by canonical JSON, code by source."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path, pattern: str = "*") -> str:
    """Hash of the names and bytes of the files directly in a folder (sorted)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).glob(pattern)):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of canonical JSON (sorted keys): equal configs give equal keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


PACKAGES = ("elmo_core", "storage", "tasks", "flows", "serving")  # the project's own code


def module_file(module: str) -> Path | None:
    """The source file of a project module (a package's ``__init__.py``), None if not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=1024)
def _parse(path: Path, stamp: tuple[int, int]) -> tuple[str, frozenset[str]]:
    """(the module's syntax with comments, docstrings and layout dropped, the modules it
    imports anywhere in its body). ``stamp`` (mtime, size) renews the cache on edits."""
    tree = _without_docstrings(ast.parse(path.read_text(), filename=str(path)))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            imported.add(base)
            imported.update(f"{base}.{a.name}" for a in node.names)  # submodules by name
    return ast.dump(tree, include_attributes=False), frozenset(imported)


def parse_module(module: str) -> tuple[str, frozenset[str]] | None:
    path = module_file(module)
    if path is None:
        return None
    st = path.stat()
    return _parse(path, (st.st_mtime_ns, st.st_size))


def import_closure(roots: Iterable[str]) -> list[str]:
    """The project modules ``roots`` import, transitively (themselves and the packages on
    the way included), read from their syntax: the import graph decides, not a list."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        names = [".".join(mod.split(".")[: i + 1]) for i in range(len(mod.split(".")))]
        for name in names:  # importing a.b runs a/__init__.py first
            if name in seen:
                continue
            parsed = parse_module(name)
            if parsed is None:
                continue
            seen.add(name)
            todo.extend(parsed[1])
    return sorted(seen)


def code_version(roots: Iterable[str]) -> str:
    """Hash of the syntax of every project module ``roots`` import, transitively: editing one
    invalidates exactly the stages whose code reaches it; comments, docstrings and layout
    change nothing."""
    h = hashlib.sha256()
    for mod in import_closure(roots):
        parsed = parse_module(mod)
        assert parsed is not None
        h.update(mod.encode())
        h.update(parsed[0].encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, inputs: dict[str, str], config: Any, modules: Iterable[str]) -> str:
    """The cache key of a stage: its input content hashes, its config and its code version."""
    return hash_json(
        {"stage": stage, "inputs": inputs, "config": config, "code": code_version(modules)}
    )[:24]
