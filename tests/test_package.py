"""An installed package holds every module of the source tree (its import graph: test_imports.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "npl_agi").rglob("*.py"))


def test_the_built_package_holds_every_module(tmp_path: Path) -> None:
    """What ``pip install`` (install.sh) puts in place, not the editable checkout the tests run.

    Built from a copy: a build in the checkout leaves a ``build/`` that the next build reuses."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("npl_agi-*.whl")
    built = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("npl_agi/") and n.endswith(".py")}
    assert built == {str(p.relative_to(ROOT)) for p in SOURCES}
