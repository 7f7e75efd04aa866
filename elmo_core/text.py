"""Deterministic normalisation and tokenisation of news text.

AG News keeps the escapes of its scrape (``#39;``, ``quot;``, ``&lt;``, ``\\$``, ``\\band`` where a
line break was): they are undone here so the biLM sees words, not markup.
"""

from __future__ import annotations

import html
import re

# AG News entity fragments whose leading "&" was lost ("#39;" for "&#39;", "quot;" for "&quot;").
_BROKEN_ENTITY = re.compile(r"(?<!&)(#\d{1,5};|\b(?:quot|amp|lt|gt|nbsp|apos);)")
_TAG = re.compile(r"<[^>]{0,200}>")
_BACKSLASH = re.compile(r"\\+")
_SPACE = re.compile(r"\s+")
# words with inner apostrophes/periods/hyphens stay whole; every other symbol is its own token.
_TOKEN = re.compile(r"[a-z0-9]+(?:['.\-][a-z0-9]+)*|[^\sa-z0-9]")


def normalize(text: str) -> str:
    """Undo AG News escapes and HTML, collapse whitespace. Idempotent."""
    text = _BROKEN_ENTITY.sub(lambda m: "&" + m.group(1), text)
    text = html.unescape(html.unescape(text))
    text = _TAG.sub(" ", text)
    text = _BACKSLASH.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of normalised text."""
    return _TOKEN.findall(normalize(text).lower())
