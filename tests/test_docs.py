"""The README and the pages under docs/: every relative link and anchor resolves, so that a reader who follows
one lands on a file and a heading that exist."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# [text](target) and ![alt](target); a target ends at the first space (an optional "title") or parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"(?ms)^```.*?^```")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens. `MixMatch (`mixmatch.py`)` -> `mixmatch-mixmatchpy`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    with open(path) as f:
        text = FENCE.sub("", f.read())
    seen, result = {}, set()
    for heading in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as f:
        text = FENCE.sub("", f.read())  # a code block's brackets are code, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_slug_matches_githubs_rule():
    assert slug("MixMatch (`mixmatch.py`)") == "mixmatch-mixmatchpy"
    assert slug("On one GPU: the reference setting") == "on-one-gpu-the-reference-setting"
    assert slug("Batch size (FixMatch, 1000 labels, seed 0)") == "batch-size-fixmatch-1000-labels-seed-0"


def test_the_readme_links_to_every_page_under_docs():
    linked = {os.path.normpath(t.split("#")[0]) for t in links("README.md")}
    assert not [p for p in PAGES[1:] if p not in linked], "a page under docs/ that the README does not link to"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, ROOT)}")
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)
