"""The service's shape, checked from its source: server/ reaches engines/ only through the client seam."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {"engines.params", "engines.client"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_server_imports_nothing_of_engines_but_params_and_the_client() -> None:
    offending = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "server").glob("*.py"))
        for name in imported_modules(path)
        if (name == "engines" or name.startswith("engines.")) and name not in ALLOWED
    }
    assert not offending, offending


def test_a_media_worker_never_loads_torch() -> None:
    code = (
        "import sys, server.app, server.supervisor, engines.client_process; "
        "sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "torch was imported by the media side"
