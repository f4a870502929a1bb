"""The README and docs/ pages are what a user copies commands from and clicks through.

A `make <target>` they name must be a target of the Makefile (a renamed or dropped target
otherwise leaves a command that fails when pasted), and every relative link, anchors included,
must reach a file and heading that exist (pages move between README and docs/).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

TARGET_LINE = re.compile(r"^([A-Za-z][\w.-]*)\s*:(?!=)", re.M)
MAKE_CALL = re.compile(r"(?:^|(?<=[\s;&|(]))make((?:\s+[a-z][a-z0-9_-]*)+)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def makefile_targets() -> set[str]:
    """Every target the Makefile defines (the left of `name:` lines, `:=` assignments excluded)."""
    return set(TARGET_LINE.findall((ROOT / "Makefile").read_text()))


def code_texts(page: str) -> list[str]:
    """The code a page shows: fenced and indented blocks line by line, and inline code spans.

    Only code is read because prose uses "make" as an English verb; comments after `#` are
    dropped for the same reason ("then make init on them").
    """
    texts: list[str] = []
    fenced = False
    for line in page.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            texts.append(line.split("#", 1)[0])
    prose = re.sub(r"```.*?```", "", page, flags=re.S)
    texts += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return texts


def named_targets(page: str) -> set[str]:
    """The targets of every `make a b c VAR=...` in a page's code (`make folds train blend`)."""
    found: set[str] = set()
    for text in code_texts(page):
        for words in MAKE_CALL.findall(text):
            found.update(words.split())
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a markdown file's headings give."""
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_make_command_a_page_shows_names_a_real_target(page: Path) -> None:
    unknown = named_targets(page.read_text()) - makefile_targets()
    assert not unknown, f"{page.name} names make targets the Makefile lacks: {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name} has broken links: {broken}"


def test_the_readme_names_the_test_command_ci_runs() -> None:
    """.ci/run runs `make test`; the README's set-up shows that same command."""
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^    make test\b", (ROOT / "README.md").read_text(), flags=re.M)


def test_the_checks_catch_a_wrong_target_and_a_broken_link(tmp_path: Path) -> None:
    """The parsers see what a user would paste or click, not nothing."""
    page = "    make folds trian DATA=x   # then make init on it\nrun `make weights DATA=x`, see [x](nope.md)\n"
    assert named_targets(page) == {"folds", "trian", "weights"}
    assert LINK.findall(page) == ["nope.md"]
    assert "trian" not in makefile_targets() and "folds" in makefile_targets()
    (tmp_path / "p.md").write_text("# A competition of your own, outside the repo's configs\n")
    assert anchors(tmp_path / "p.md") == {"a-competition-of-your-own-outside-the-repos-configs"}
