"""Resumable training state: modules, optimisers, step and every RNG, saved atomically and reloaded."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.distributed import Ranks, gather_to_main

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"step-(\d{8})\.pt$")


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    rng: np.random.Generator
    step: int = 0
    # What a rank draws from besides its RNGs (e.g. how many triplet batches it has taken): kept per rank.
    extra: dict[str, Any] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)

    def rank_state(self) -> dict[str, Any]:
        """What differs between data-parallel ranks: their RNGs and extra."""
        return {
            "rng": {
                "numpy": self.rng.bit_generator.state,
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                # Noise drawn on a GPU comes from its own generator.
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_initialized() else {}),
            },
            "extra": dict(self.extra),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            **self.rank_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = (set(self.modules) - set(state["modules"])) | (set(self.optimizers) - set(state["optimizers"]))
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)}")
        own = state
        if self.ranks.parallel or "ranks" in state:
            saved = state.get("ranks", [state])
            if len(saved) != self.ranks.world_size:
                raise ValueError(
                    f"the checkpoint was written by {len(saved)} rank(s), this run has {self.ranks.world_size}: "
                    "resume with the same number of processes"
                )
            own = saved[self.ranks.rank]
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.rng.bit_generator.state = own["rng"]["numpy"]
        torch.set_rng_state(own["rng"]["torch"])
        random.setstate(own["rng"]["python"])
        if "cuda" in own["rng"] and torch.cuda.is_initialized():
            torch.cuda.set_rng_state_all(own["rng"]["cuda"])
        self.step = int(state["step"])
        # In place: a batch source holds this dict and counts into it.
        self.extra.clear()
        self.extra.update(own.get("extra", {}))


def checkpoint_paths(output_dir: Path) -> list[Path]:
    """Checkpoints in output_dir, oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: Path, state: TrainState, keep: int) -> Path:
    """Write step-XXXXXXXX.pt atomically (temp file, then rename) and delete all but the newest `keep`.

    Every rank calls it; rank 0 writes one file holding the (identical) weights and every rank's RNGs.
    """
    folder = Path(output_dir) / CHECKPOINT_DIR
    path = folder / f"step-{state.step:08d}.pt"
    every_rank = gather_to_main(state.ranks, state.rank_state())
    if not state.ranks.is_main:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    payload = state.state_dict()
    if state.ranks.parallel:
        payload["ranks"] = every_rank
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    for old in checkpoint_paths(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def resume_latest(output_dir: Path, state: TrainState) -> Path | None:
    """Load the newest readable checkpoint into `state`; None when there is none (a fresh run)."""
    for path in reversed(checkpoint_paths(output_dir)):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError) as exc:  # a checkpoint cut short by a crash
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        state.load_state_dict(payload)
        return path
    return None
