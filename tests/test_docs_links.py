"""Every relative link and image in the README, the CHANGELOG and docs/ points at a file of the repository."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target), anchors dropped


def relative_links(page: pathlib.Path) -> list:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_pattern_finds_links_and_images():
    page = ROOT / "README.md"
    assert "docs/lean_state.md" in relative_links(page)
    assert any(t.endswith(".png") for t in relative_links(page))
