"""README.md and docs/*.md: every relative link resolves, README stays a front page, and its Python
usage snippet runs.

A link to a repository file must name a file or folder that exists; a link with #anchor into a markdown
file must match one of its headings under GitHub's slug rule (lower case, punctuation dropped, spaces to
hyphens, repeats numbered -1, -2, ...). Links to web addresses are not fetched.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

import fixture_set

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)   # https:, mailto:, ...


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower case, anything but letters, digits,
    spaces, hyphens and underscores dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path):
    """(line number, target) of every markdown link outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / unquote(file_part)).resolve() if file_part else page
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
        elif root not in destination.parents and destination != root:
            problems.append(f"{where}: points outside the repository")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: no heading with anchor #{anchor} in {destination.relative_to(root)}")
    return problems


def test_github_slugs_follow_the_rendered_heading_text():
    assert github_slug("Pose evaluation: `vsam pose-eval`") == "pose-evaluation-vsam-pose-eval"
    assert github_slug("`vsam shards info | list | verify`") == "vsam-shards-info--list--verify"
    assert github_slug("Measured (benchmarks/bench_prep.py, x)") == "measured-benchmarksbench_preppy-x"
    assert github_slug("VSAM vs VGG16 (issue 7)") == "vsam-vs-vgg16-issue-7"


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#two-words) [gone](missing.md) [bad](a.md#nothing) `[code](x.md)`\n"
                    "```\n[fenced](y.md)\n```\n[web](https://example.com)\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md: no such file" in problems[0]
    assert "#nothing" in problems[1]


def test_the_docs_folder_has_pages():
    assert DOCS, "docs/ holds no markdown page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    assert broken_links(page) == []


def test_readme_is_a_front_page_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"


def test_every_docs_page_is_linked_from_the_docs_index():
    linked = {(ROOT / "docs" / target.partition("#")[0]).resolve()
              for _, target in links(ROOT / "docs" / "index.md") if not EXTERNAL.match(target)}
    unlinked = [page.name for page in DOCS if page.name != "index.md" and page.resolve() not in linked]
    assert unlinked == [], f"docs/index.md does not link {unlinked}"


def readme_python_snippet() -> str:
    """The first ```python block under README's "## Python usage"."""
    text = (ROOT / "README.md").read_text().split("\n## Python usage", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_snippet_runs_on_a_trained_checkpoint(tiny_checkpoint):
    """The snippet as printed, with `make demo`'s checkpoint and photo swapped for the suite's."""
    snippet = readme_python_snippet()
    demo_paths = ("demo-out/run/checkpoints/last.pt", "demo-out/images/grace_hopper.jpg")
    assert all(f'"{path}"' in snippet for path in demo_paths), "the snippet no longer loads make demo's files"
    photo = sorted(fixture_set.PHOTOS.glob("*.jpg"))[0]
    for path, ours in zip(demo_paths, (tiny_checkpoint, photo)):
        snippet = snippet.replace(f'"{path}"', repr(str(ours)))
    run = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:__main__", "-c", snippet],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    scores = ast.literal_eval(lines[0])       # {attribute: score}; the subset has no categories to print
    assert len(scores) == 26 and all(0 <= score <= 1 for score in scores.values()), lines[0]
    assert lines[1:] == ["torch.Size([1, 1, 16, 16])"], run.stdout
