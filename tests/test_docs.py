"""The README a newcomer reads first, and the pages it sends them to.

The README keeps what a new user needs first and stays short; everything else
lives in ``docs/``, linked from it.  Links between the pages are checked here,
headings included, so a page or section that moves cannot leave a dead link.
The commands and outputs the pages show are checked where they are produced
(the compatibility matrix in ``tests/real_vllm/test_vllm_doctor.py``, the
quick start's patch against real vLLM in ``tests/real_vllm/test_vllm_cli.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES, ROOT / "benchmarks" / "README.md", ROOT / "examples" / "patch-package" / "README.md"]
MAX_README_LINES = 200

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6}) (.*)$")


def _outside_code(text: str) -> list[str]:
    """The lines of a markdown text that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced block: (its language, its lines)."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
                blocks.append((line.strip()[3:], current))
            else:
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _outside_code(path.read_text()):
        match = _HEADING.match(line)
        if match is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match[2]).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return [m for line in _outside_code(path.read_text()) for m in _LINK.findall(line)]


def _broken(path: Path) -> list[str]:
    broken = []
    for link in _links(path):
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(f"{link} (no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{link} (no heading with anchor #{anchor} in {resolved.name})")
    return broken


def test_the_readme_starts_with_the_two_commands_a_new_user_runs() -> None:
    # Set up and run the main job, set up and run the tests: first, before any section.
    lines = README.read_text().splitlines()
    first_fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert first_fence < first_section, "the two commands must come before the first section"
    assert lines[first_fence] == "```bash"
    commands = [line.split("#")[0].split() for line in lines[first_fence + 1 : first_fence + 3]]
    assert commands == [["make", "demo"], ["make", "test"]], lines[first_fence : first_fence + 4]


def test_the_readme_is_short() -> None:
    count = len(README.read_text().splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md has {count} lines; keep it under {MAX_README_LINES} and move details to a page in docs/"
    )


def test_the_readme_links_every_page_in_docs() -> None:
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [page.name for page in PAGES if page.resolve() not in linked]
    assert PAGES and not missing, f"pages in docs/ the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_opens_with_a_title_and_a_summary_that_leads_back_to_the_readme(page: Path) -> None:
    # A reader who lands on a page from a search sees what it holds and where the start is.
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1], f"{page.name} should open with a '# Title' line"
    summary = "\n".join(lines[2 : lines.index("", 2)])
    assert summary and not summary.startswith(("#", "```", "|")), f"{page.name}: a paragraph should follow the title"
    targets = {(page.parent / link.partition("#")[0]).resolve() for link in _LINK.findall(summary)}
    assert README.resolve() in targets, f"{page.name}: its opening paragraph should link back to the README"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_and_heading_that_exist(path: Path) -> None:
    broken = _broken(path)
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_a_missing_heading_and_a_missing_file(tmp_path: Path) -> None:
    # The check can fail: a renamed section and a moved page are both caught.
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## The kill switch: off\n\n[a](#the-kill-switch-off) [b](#gone) [c](other.md)\n")
    assert _broken(page) == [
        "#gone (no heading with anchor #gone in page.md)",
        f"other.md (no {tmp_path / 'other.md'})",
    ]


def test_the_settings_table_lists_every_setting_the_package_reads() -> None:
    from vllm_custom_patches import _env

    names = {value for key, value in vars(_env).items() if key.startswith("ENV_") and isinstance(value, str)}
    table = {match[1] for line in README.read_text().splitlines() if (match := re.match(r"^\| `(\w+)`", line))}
    assert names and names <= table, f"settings missing from the README's table: {sorted(names - table)}"


def test_the_quick_start_patch_is_the_example_file_the_tests_run() -> None:
    # The README shows examples/image-patches/admission_log.py, which
    # tests/real_vllm/test_vllm_cli.py checks against the real vLLM.
    blocks = [lines for _, lines in _code_blocks(README.read_text()) if "class AdmissionLog(" in "\n".join(lines)]
    assert len(blocks) == 1, "the README's quick start should show AdmissionLog (examples/image-patches) once"
    (block,) = blocks
    source = (ROOT / "examples" / "image-patches" / "admission_log.py").read_text()
    example = {line.strip() for line in source.splitlines()}
    for line in block:
        code = line.split("  #")[0].strip().removesuffix('"""')
        assert not code or code in example, (
            f"the README's quick start differs from examples/image-patches/admission_log.py: {line!r}"
        )
