"""Run one recipe as a torchrun worker and record the weights this rank ends with (tests/test_training_triplets.py).

Usage: torchrun --standalone --nproc_per_node N tests/ddp_recipe.py {teacher,guidance_distill,adversarial_distill}
CONFIG.json. Each rank writes <output_dir>/weights-rank<R>.json: a sha256 of every module its TrainState held.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import TrainState
from training.config import load_config


def module_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(recipe_name: str, config_path: str) -> None:
    recipe = importlib.import_module(f"training.{recipe_name}")
    config_class = {
        "teacher": "TeacherConfig",
        "guidance_distill": "GuidanceDistillConfig",
        "adversarial_distill": "AdversarialDistillConfig",
    }[recipe_name]
    config = load_config(getattr(recipe, config_class), Path(config_path))
    run = recipe.run_training

    def recording(config: Any, state: TrainState, step_fn: Any, desc: str) -> TrainState:
        state = run(config, state, step_fn, desc)
        digests = {name: module_digest(module) for name, module in state.modules.items()}
        record = Path(config.output_dir) / f"weights-rank{state.ranks.rank}.json"
        record.write_text(json.dumps({"world_size": state.ranks.world_size, **digests}))
        return state

    recipe.run_training = recording  # the recipe's own loop, observed as it returns
    recipe.train(config)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
