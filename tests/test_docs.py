"""The documentation stands alone: a clone of the repository has everything its text points to.

No tracked file names material that lives outside the repository, and every relative markdown link in the README
and in docs/ reaches a file of the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Names of background notes kept outside the repository: a user who clones it has none of them. (Spelled in pieces
# so that this file does not match itself.)
OUTSIDE = ("../" + "shared", "RAY-" + "NOTES", "DESIGN" + ".md")

# [text](target) or ![alt](target "title"): the target, up to a space or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def git_files(*args: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in out.decode().split("\0") if name]


def outside_references(root: Path, names: list[str]) -> list[str]:
    """``file:line: name`` for every line of the regular files ``names`` (relative to ``root``) that names material
    outside the repository."""
    found = []
    for name in names:
        path = root / name
        if path.is_symlink() or not path.is_file():
            continue  # a link's target is a tracked file of its own (configs -> bict_ray/presets/configs)
        for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            found += [f"{name}:{number}: {word}" for word in OUTSIDE if word in line]
    return found


def markdown_links(text: str) -> list[str]:
    """The link targets of markdown ``text``, leaving out code blocks and inline code."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def broken_links(root: Path, markdown: list[Path], files: set[str]) -> list[str]:
    """``file: target`` for every relative link in ``markdown`` whose file is not one of ``files`` (paths relative to
    ``root``) or lies outside ``root``. Web addresses and anchors within the same page are not checked."""
    broken = []
    for page in markdown:
        for target in markdown_links(page.read_text(encoding="utf-8")):
            if SCHEME.match(target) or target.startswith("#"):
                continue
            relative = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (page.parent / relative).resolve()
            try:
                inside = resolved.relative_to(root.resolve()).as_posix()
            except ValueError:
                inside = None
            exists = inside is not None and (inside in files or any(f.startswith(inside + "/") for f in files))
            if not exists:
                broken.append(f"{page.relative_to(root).as_posix()}: {target}")
    return broken


def documentation_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_tracked_file_names_material_outside_the_repository():
    names = [n for n in git_files() if n != THIS]
    assert "README.md" in names
    assert outside_references(ROOT, names) == []


def test_every_relative_markdown_link_reaches_a_file_of_the_repository():
    # the files a clone has (tracked), and those about to be (new, not ignored)
    files = set(git_files("--cached", "--others", "--exclude-standard"))
    pages = documentation_pages()
    assert len(pages) > 1
    assert broken_links(ROOT, pages, files) == []


def test_the_checks_catch_a_reference_and_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "notes.py").write_text('"""See ' + OUTSIDE[2] + '."""\n')
    (tmp_path / "README.md").write_text(
        "[ok](docs/A.md) [web](https://example.org) [anchor](#top) [dir](docs)\n"
        "[gone](docs/MISSING.md) ![img](plots/x.png) [up](../elsewhere.md)\n"
        "```\n[in a code block](nowhere.md)\n```\n`[inline](nowhere.md)`\n")
    (tmp_path / "docs" / "A.md").write_text("[back](../README.md#documentation) [self](A.md)\n")
    files = {"README.md", "docs/A.md", "notes.py"}
    assert outside_references(tmp_path, sorted(files)) == [f"notes.py:1: {OUTSIDE[2]}"]
    pages = [tmp_path / "README.md", tmp_path / "docs" / "A.md"]
    assert broken_links(tmp_path, pages, files) == [
        "README.md: docs/MISSING.md", "README.md: plots/x.png", "README.md: ../elsewhere.md"]
