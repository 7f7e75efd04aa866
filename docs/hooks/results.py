"""MkDocs hook: ``{{ report NAME }}`` in a page becomes the benchmark report
``bench/results/NAME.json`` as tables (its command and machine first), so the results pages
show what the benchmarks measured, never figures typed by hand. A missing report fails the
build."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
# a developer's own folders in a recorded command say nothing to a reader
LOCAL_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|srv)/[^\s\"',]*")
MARKER = re.compile(r"\{\{\s*report\s+([A-Za-z0-9_.-]+)\s*\}\}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    return LOCAL_PATH.sub("DIR", str(value)).replace("|", "\\|").replace("\n", " ")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, scalar) for every leaf; lists of records become one row per record."""
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = []
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def _is_cell(value: Any) -> bool:
    """A scalar, or a list of scalars (shown comma-separated)."""
    if isinstance(value, list):
        return not any(isinstance(v, (dict, list)) for v in value)
    return not isinstance(value, dict)


def _records(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and _is_cell(r[k])]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def render(name: str) -> str:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"results page names {path}, which no benchmark has written")
    report = json.loads(path.read_text())
    command = report.pop("command", None)
    machine = report.pop("machine", None)
    head = [f"*Report `bench/results/{name}.json`*"]
    if command:
        cmd = " ".join(command) if isinstance(command, list) else str(command)
        cmd = LOCAL_PATH.sub("DIR", cmd)
        head.append(f"\n```bash\n{cmd}\n```")
    if machine:
        shown = machine
        if isinstance(machine, dict):
            shown = " · ".join(f"{k}: {_fmt(v)}" for k, v in machine.items())
        head.append(f"Machine: {shown}")
    tables = []
    scalars = []
    for key, value in report.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append(f"**{key}**\n\n{_records(value)}")
        else:
            scalars += _flatten(value, key)
    if scalars:
        lines = ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars]
        tables.insert(0, "\n".join(lines))
    return "\n\n".join(head) + "\n\n" + "\n\n".join(tables) + "\n"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
