"""Every relative link in README.md and docs/*.md points to a file in this repository, and every
`#anchor` to a heading of the page it names: docs move, and a dead link is found here, not by a reader.
Links to other sites are not followed (the suite runs offline)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code spans removed (a link inside code is not a link)."""
    out, in_code = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            in_code = not in_code
            continue
        if not in_code:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def links(text: str) -> list[str]:
    return [m.group(1) for line in prose_lines(text) for m in _LINK.finditer(line)]


def prose_lines_with_code_spans(text: str) -> list[str]:
    """Lines outside fenced code blocks, code spans kept (a heading's anchor includes their text)."""
    out, in_code = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            in_code = not in_code
        elif not in_code:
            out.append(line)
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines_with_code_spans(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    root = root.resolve()
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: another site
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if root not in dest.parents and dest != root:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file {dest}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target}: no heading #{frag} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_checker_catches_a_dead_link_and_a_dead_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A `code` heading: here\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-code-heading-here) [web](https://example.org/x.md)\n"
                    "[gone](missing.md) [bad anchor](other.md#not-a-heading) `[in code](missing2.md)`\n"
                    "```\n[fenced](missing3.md)\n```\n## Own\n[self](#own) [self bad](#nope)\n")
    (tmp_path / "repo").mkdir()
    page.rename(tmp_path / "repo" / "page.md")
    (tmp_path / "other.md").rename(tmp_path / "repo" / "other.md")
    page = tmp_path / "repo" / "page.md"
    page.write_text(page.read_text() + "[outside](../elsewhere.md)\n")
    (tmp_path / "elsewhere.md").write_text("# exists, but not in the repository\n")
    bad = broken_links(page, root=tmp_path / "repo")
    assert [b.split(":")[0] for b in bad] == ["missing.md", "other.md#not-a-heading", "#nope", "../elsewhere.md"]


def test_anchor_follows_github() -> None:
    assert anchor("The default run (`areal-py run`)") == "the-default-run-areal-py-run"
    assert anchor("Staleness ablation: decoupled PPO vs naive PPO") == "staleness-ablation-decoupled-ppo-vs-naive-ppo"
    assert anchor("Asynchronous vs synchronous on long chain-of-thought (`sum_cot`)") == (
        "asynchronous-vs-synchronous-on-long-chain-of-thought-sum_cot")


def test_docs_pages_named_in_code_and_configs_exist() -> None:
    """Code comments and config comments point to docs/<page>.md for the numbers and the why; those pages
    must exist. (Paths with a folder, like an upstream project's docs/x/y.md, are not ours.)"""
    named = re.compile(r"(?<![\w/.])docs/([\w-]+\.md)")
    missing = []
    for folder in ("areal_py", "controller", "trainer", "rollout_server", "benchmarks", "configs", "tests", ".ci"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".yaml", ".toml", "") and f.is_file():
                missing += [f"{f.relative_to(ROOT)}: docs/{m}" for m in named.findall(f.read_text(errors="replace"))
                            if not (ROOT / "docs" / m).exists()]
    assert missing == []
