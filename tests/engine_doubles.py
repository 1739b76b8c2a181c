"""Editors for the engine process that tests slow down, poison or hold back (picklable: built in the engine).

Each factory takes the EngineSpec the engine process gets and wraps the real shipped editor it loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engines.editor import EditRequest, EditResult
from engines.loader import load_editor
from engines.spec import EngineSpec


class SlowedEditor:
    """The real editor, made to take `seconds` per call at least (the engine slower than the camera)."""

    def __init__(self, editor: Any, seconds: float) -> None:
        self.inner, self.seconds = editor, seconds

    @property
    def resolution(self) -> int:
        return self.inner.resolution

    def prepare_prompts(self, prompts: list[str]) -> Any:
        return self.inner.prepare_prompts(prompts)

    def cached_prompt(self, prompt: str) -> Any:
        return self.inner.cached_prompt(prompt)

    def prompt_key(self, prompt: str) -> str:
        return self.inner.prompt_key(prompt)

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        started = time.perf_counter()
        out = self.inner.edit(requests)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - started)))
        return out


class PoisonedEditor(SlowedEditor):
    """The real editor, except that any batch holding a frame whose prompt contains 'explode' raises."""

    def __init__(self, editor: Any) -> None:
        super().__init__(editor, 0.0)

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        if any("explode" in r.params.prompt for r in requests):
            raise RuntimeError("poisoned frame")
        return self.inner.edit(requests)


class Slowed:
    """Factory: the shipped editor, at least `seconds` a call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, spec: EngineSpec) -> SlowedEditor:
        return SlowedEditor(load_editor(spec), self.seconds)


def poisoned(spec: EngineSpec) -> PoisonedEditor:
    """Factory: the shipped editor that raises on 'explode'."""
    return PoisonedEditor(load_editor(spec))


class GatedUntilFile:
    """Factory: the shipped editor, once `path` exists (a test decides when loading finishes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, spec: EngineSpec) -> Any:
        deadline = time.monotonic() + 60
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return load_editor(spec)


class SlowPromptsEditor(SlowedEditor):
    """The real editor whose prompt encodings take `seconds` more each, and which records the prompts it encoded
    (cached ones are found without an encoding, so they are not recorded)."""

    def __init__(self, editor: Any, seconds: float) -> None:
        super().__init__(editor, 0.0)
        self.prompt_seconds = seconds
        self.encoded: list[str] = []

    def prepare_prompts(self, prompts: list[str]) -> Any:
        new = [p for p in prompts if self.inner.cached_prompt(p) is None]
        if new:
            time.sleep(self.prompt_seconds)
            self.encoded += new
        return self.inner.prepare_prompts(prompts)


class SlowPrompts:
    """Factory: the shipped editor, each prompt encoding `seconds` slower (a test sees what waits for it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, spec: EngineSpec) -> SlowPromptsEditor:
        return SlowPromptsEditor(load_editor(spec), self.seconds)
