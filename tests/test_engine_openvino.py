"""The OpenVINO backend's checks (tests/openvino_checks.py), run by pytest in a process of their own.

A process of its own because, with OpenVINO's runtime loaded, a later test in the same pytest process that reads
parquet through `datasets` (tests/test_training_triplets.py) died of a segmentation fault (2026-12-08, AVX2
EPYC; not yet narrowed down further). The service never loads the two together. This test fails whenever one of
those checks fails, and shows their output.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino package is not installed")
def test_the_openvino_checks_pass_in_their_own_process() -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/openvino_checks.py"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
