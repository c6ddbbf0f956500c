"""Packaging and repository hygiene: extras that no pip warns about, CI's scratch ignored."""
from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_extras_request_only_extras_their_packages_provide_verbatim():
    """pip before PEP 685 compares extra names as written: ``math-verify[antlr4_13_2]`` made it
    warn ``math-verify 0.9.0 does not provide the extra 'antlr4_13_2'`` (it provides
    ``antlr4-13-2``).  Checked against each package installed here."""
    for extra, lines in EXTRAS.items():
        for line in lines:
            req = requirements.Requirement(line)
            try:
                provided = metadata.metadata(req.name).get_all("Provides-Extra") or []
            except metadata.PackageNotFoundError:
                continue
            missing = sorted(req.extras - set(provided))
            assert not missing, f"[{extra}] {line} asks for {missing}; {req.name} provides {provided}"


def test_ci_virtual_environment_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    venvs = re.findall(r"-m venv (\S+)", (ROOT / ".ci" / "run").read_text())
    assert venvs, ".ci/run makes no virtual environment any more: update this test"
    for venv in venvs:
        ignored = subprocess.run(["git", "check-ignore", "-q", venv + "/"], cwd=ROOT)
        assert ignored.returncode == 0, f"{venv}/ (made by .ci/run) is not in .gitignore"
