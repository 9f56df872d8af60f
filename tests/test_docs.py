"""README.md and docs/*.md: every relative link and image points at a file of the repository, and every `#anchor` at a
heading of the page it names (GitHub's heading ids)."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), the target up to a space (a title may follow) or the closing parenthesis
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return MD_LINK.findall(body) + HTML_LINK.findall(body)


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (word characters, spaces, hyphens kept), spaces to
    hyphens. Link markup keeps only its text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a page's headings, with GitHub's -1, -2, ... for repeated ones."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        ids.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return ids


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not this test's business
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(root) if dest.is_relative_to(root) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_and_images_resolve(page):
    assert links(page.read_text(encoding="utf-8")), f"{page.name}: no link found; is the pattern right?"
    assert broken_links(page) == []


def test_the_manual_is_linked_from_readme():
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in readme] == []


def test_the_check_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Cost scaling — `minmax`\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# T\n\n[ok](docs/a.md#cost-scaling--minmax) [self](#t) ![pic](docs/missing.png) [gone](docs/b.md)\n"
        '[bad anchor](docs/a.md#cost-scaling) <img src="docs/nope.png"> [web](https://example.org/x)\n'
        "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "docs/missing.png",
        "docs/b.md",
        "docs/a.md#cost-scaling",
        "docs/nope.png",
    ], problems
