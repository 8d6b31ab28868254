"""The Markdown pages: every relative link resolves, and the README stays a front door.

A link `[text](path#anchor)` in any `*.md` file of the repository must name a file or folder that exists,
relative to the page; when it names a Markdown heading (`#anchor`, alone or after a `.md` path), that heading
must exist, with GitHub's anchor rules (lower case, punctuation dropped, spaces to hyphens, `-1`, `-2`, ...
for repeats). Links inside code blocks and code spans are not links and are skipped, as are URLs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
SKIP_DIRS = {"runs", "node_modules", "__pycache__"}  # plus hidden folders and *.egg-info

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,}).*?^\1\2[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def markdown_files() -> list[Path]:
    out = []
    for path in REPO.rglob("*.md"):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        out.append(path)
    return sorted(out)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        title = title.replace("`", "").replace("*", "")  # code and emphasis marks are not in the anchor
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    return broken


def test_anchors_follow_githubs_rules():
    text = "# The CPU sandbox: `isreshape-verl compare`\n## On a laptop (CPU)\n## Metrics\n## Metrics\n" \
           "```\n# not a heading\n```\n### The knob study: width, γ and GRPO's clip\n"
    assert github_anchors(text) == {"the-cpu-sandbox-isreshape-verl-compare", "on-a-laptop-cpu", "metrics",
                                    "metrics-1", "the-knob-study-width-γ-and-grpos-clip"}


def test_links_in_code_are_not_links():
    assert LINK.findall(_prose("see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n")) == ["x.md"]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_is_a_front_door():
    """README.md is short enough to act on in ten minutes; the studies and derivations live in docs/ and
    benchmarks/README.md."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (limit {README_MAX_LINES})"
