"""Plain text from a MediaWiki XML dump: the second domain that healed models are measured on.

The embedded sample is the shortened English Wikipedia dump inside the `gensim` wheel (about 200
articles): encyclopaedic prose, another domain than the default news corpus. Markup is stripped
with a few rules (templates, references, tables, links, files, emphasis, headings) that keep an
article's sentences; nothing here aims to be a full wikitext parser.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from search.model.packaged import packaged_file

ENWIKI_SAMPLE = "enwiki-sample"


def enwiki_sample_path() -> Path:
    return packaged_file(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "Wikipedia sample",
        "gensim",
        "--eval-dataset FILE",
    )


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove `open_ ... close` spans, nested ones included ({{templates}}, {| tables |})."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"'{2,}"), ""),  # ''italic'', '''bold'''
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == Heading ==
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list markers
    (re.compile(r"^\s*\|.*$", re.M), ""),  # leftover table rows
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_markup(wikitext: str) -> str:
    text = html.unescape(wikitext)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


def articles(path: Path, min_chars: int = 200) -> Iterator[str]:
    """Each article's plain text, in dump order; redirects and stubs shorter than `min_chars` skipped."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as stream:
        for _, element in ET.iterparse(stream):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag == "page":
                element.clear()  # a whole dump is never held in memory
            if tag != "text":
                continue
            raw = element.text or ""
            element.clear()
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_markup(raw)
            if len(text) >= min_chars:
                yield text
