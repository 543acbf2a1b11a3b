"""The code follows the project's ruff configuration (pyproject.toml): pycodestyle, pyflakes and import order."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
    local = os.path.join(os.path.dirname(sys.executable), "ruff")
    return local if os.path.isfile(local) else shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_passes():
    proc = subprocess.run([_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
