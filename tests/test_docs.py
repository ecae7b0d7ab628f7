"""The README and docs/: links resolve, the README stays a short front door, and its commands run.

Fast and model-free: Markdown is parsed with a few regular expressions, and each `python -m search
<subcommand>` the README shows in a ```bash block is run once with `--help`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

README_MAX_LINES = 300
RESULTS_WITHIN = 150

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SUBCOMMAND = re.compile(r"python -m search\s+(?:--debug\s+)?([a-z][a-z_-]*)")


def _split(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each fenced block as (info string, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                blocks.append((line.strip()[3:].strip(), []))
            else:
                prose.append(line)
        elif match and match.group(1) == fence and line.strip() == fence:
            fence = None
        else:
            blocks[-1][1].append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code, also one whose text wraps onto the next line."""
    prose: list[tuple[int, str]] = []
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if match and (fence is None or (match.group(1) == fence and line.strip() == fence)):
            fence = match.group(1) if fence is None else None
            continue
        if fence is not None:
            continue
        # Code spans are not links, but a link's text may be one: blank their content only.
        prose.append((number, CODE_SPAN.sub(lambda m: m.group(1) + "x" * len(m.group(2)) + m.group(1), line)))
    found = []
    for index, (number, line) in enumerate(prose):
        after = prose[index + 1] if index + 1 < len(prose) else None
        joined = line + (" " + after[1] if after is not None and after[0] == number + 1 else "")
        found.extend((number, m.group(1)) for m in LINK.finditer(joined) if m.start() < len(line))
    return found


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "usage.md", "method.md", "benchmarks.md", "development.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path):
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.name}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_slug_follows_github():
    assert slug("Heal the cut (`--heal linear`)") == "heal-the-cut---heal-linear"
    assert slug("Warm start from another model's study") == "warm-start-from-another-models-study"
    assert slug("The offline task, `heldout_cloze`") == "the-offline-task-heldout_cloze"


def test_readme_is_short_with_results_up_front():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"
    prose, _ = _split("\n".join(lines[:RESULTS_WITHIN]))
    assert any(HEADING.match(line) and "Results" in line for line in prose), (
        f"no heading containing 'Results' in README.md's first {RESULTS_WITHIN} lines"
    )


def subcommands(path: Path) -> set[str]:
    """Subcommands of every `python -m search ...` in the file's ```bash blocks."""
    _, blocks = _split(path.read_text(encoding="utf-8"))
    return {m.group(1) for info, body in blocks if info == "bash" for m in SUBCOMMAND.finditer("\n".join(body))}


def _search(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


README_SUBCOMMANDS = sorted(subcommands(README))


def test_readme_shows_the_workflow():
    assert {"run", "front", "export", "heal", "evaluate"} <= set(README_SUBCOMMANDS)


def test_docs_name_real_subcommands():
    top = _search("--help")
    assert top.returncode == 0, top.stderr
    listed = set(re.findall(r"^    ([a-z][a-z_-]*)", top.stdout, flags=re.M))
    shown = set().union(*(subcommands(p) for p in DOCS))
    assert shown <= listed, f"not subcommands of `python -m search`: {sorted(shown - listed)}"


@pytest.mark.parametrize("subcommand", README_SUBCOMMANDS)
def test_readme_subcommand_help(subcommand: str):
    result = _search(subcommand, "--help")
    assert result.returncode == 0, f"python -m search {subcommand} --help exited {result.returncode}:\n{result.stderr}"
    assert "usage:" in result.stdout
