"""Every gin file in the repository parses against the registered plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from arforge import launch

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted(p for d in ("gin", "experiments") for p in (REPO / d).rglob("*.gin"))


def test_there_are_gin_files():
    assert (REPO / "gin" / "base.gin") in GIN_FILES


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_gin_file_parses(path):
    launch.parse(path)
