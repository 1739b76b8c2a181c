"""Paired edit batches: augmented crops, a random edit each, its exact target, and a phrasing's cached context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import CropSampler, DataConfig, ImageSplit, load_split
from training.edits import Edit, all_prompts, get_edits
from training.prompts import PromptSpec, PromptTable, build_prompt_table

PROMPT_CACHE = "prompt_contexts.pt"


@dataclass
class EditBatch:
    """Inputs and targets in [-1, 1] (B, 3, S, S), which edit each row got, and the prompt contexts (B, L, D)."""

    images: torch.Tensor
    targets: torch.Tensor
    edit_ids: torch.Tensor
    prompts: list[str]
    context: torch.Tensor


class EditBatchSampler:
    """Draws EditBatches with one numpy RNG (the crop sampler's), so a checkpointed RNG replays the same data."""

    def __init__(
        self, crops: CropSampler, edits: tuple[Edit, ...], table: PromptTable, token_dropout: float = 0.0
    ) -> None:
        if not edits:
            raise ValueError("EditBatchSampler needs at least one edit")
        self.crops = crops
        self.edits = edits
        self.table = table
        self.token_dropout = token_dropout

    @property
    def rng(self) -> np.random.Generator:
        return self.crops.rng

    def sample(self, batch_size: int) -> EditBatch:
        images = self.crops.sample(batch_size)
        ids = torch.from_numpy(self.rng.integers(len(self.edits), size=batch_size))
        targets = torch.empty_like(images)
        for i in ids.unique().tolist():
            rows = ids == i
            targets[rows] = self.edits[i](images[rows])
        prompts = []
        for i in ids.tolist():
            phrasings = self.edits[i].phrasings
            prompts.append(phrasings[int(self.rng.integers(len(phrasings)))])
        context = self.table(prompts)
        if self.token_dropout > 0:
            # Zeroed rows read as padding: the model learns edits from partial prompts (robust to paraphrase).
            dropped = torch.from_numpy(self.rng.random(context.shape[:2]) < self.token_dropout)
            context = context.masked_fill(dropped[..., None], 0.0)
        return EditBatch(images * 2 - 1, targets * 2 - 1, ids, prompts, context)


def keep_first_token(context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`context` (B, L, D) with every token after the first zeroed (read as padding) in the selected rows."""
    out = context.clone()
    out[rows, 1:] = 0.0
    return out


def mix_contexts(context: torch.Tensor, rows: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """`context` (B, L, D) with each selected row replaced by a random blend of itself and another row.

    The blends are prompts no phrasing encodes to, between phrasings and between edits: a distilled model
    trained to match its frozen teacher there follows the teacher where unseen phrasings land too.
    """
    out = context.clone()
    picked = rows.nonzero().flatten()
    if len(picked):
        partners = torch.from_numpy(rng.integers(len(context), size=len(picked)))
        weight = torch.from_numpy(rng.random(len(picked))).to(context.dtype)[:, None, None]
        out[picked] = weight * context[picked] + (1 - weight) * context[partners]
    return out


def make_edit_sampler(
    data: DataConfig,
    prompts: PromptSpec,
    edit_names: list[str] | None,
    cache_dir: Path,
    rng: np.random.Generator,
    token_dropout: float = 0.0,
) -> tuple[EditBatchSampler, ImageSplit]:
    """Load the images, encode every phrasing once (cached in cache_dir), and build the batch sampler."""
    split = load_split(data)
    edits = get_edits(edit_names)
    table = build_prompt_table(prompts, all_prompts(edits), Path(cache_dir) / PROMPT_CACHE)
    return EditBatchSampler(CropSampler(split.train, data, rng), edits, table, token_dropout), split
