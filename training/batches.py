"""Paired edit batches: augmented crops, a random edit each, its exact target, and a phrasing's cached context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engines.text import CachedPromptEncoder
from training.data import CropSampler, DataConfig, ImageSplit, load_split
from training.edits import Edit, all_prompts, get_edits
from training.prompts import LazyPromptEncoder, PromptSpec, PromptTable, build_prompt_table
from training.triplets import TripletStream

if TYPE_CHECKING:
    from training.config import EditTrainConfig
    from training.distributed import Ranks

PROMPT_CACHE = "prompt_contexts.pt"


@dataclass
class EditBatch:
    """Inputs and targets in [-1, 1] (B, 3, S, S), which edit each row got, and the prompt contexts (B, L, D)."""

    images: torch.Tensor
    targets: torch.Tensor
    edit_ids: torch.Tensor
    prompts: list[str]
    context: torch.Tensor

    def to(self, device: torch.device) -> EditBatch:
        """The tensors on `device` (the same batch, no copy, when they are there already)."""
        return EditBatch(
            self.images.to(device), self.targets.to(device), self.edit_ids, self.prompts, self.context.to(device)
        )


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
        weight = torch.from_numpy(rng.random(len(picked))).to(context)[:, None, None]
        out[picked] = weight * context[picked] + (1 - weight) * context[partners]
    return out


class TripletMix:
    """Batches from real triplets, a `share` of them, and procedural edits the rest (one rng draw a batch when
    both run); the same interface as EditBatchSampler, with every prompt encoded by the recipe's encoder."""

    def __init__(
        self,
        triplets: TripletStream,
        procedural: EditBatchSampler | None,
        table: PromptTable,
        share: float,
        rng: np.random.Generator,
    ) -> None:
        self.triplets = triplets
        self.procedural = procedural
        self.table = table
        self.share = share
        self.rng = rng

    def sample(self, batch_size: int) -> EditBatch:
        if batch_size != self.triplets.batch_size:
            raise ValueError(f"triplet batches are {self.triplets.batch_size} rows, {batch_size} asked")
        if self.procedural is not None and self.rng.random() >= self.share:
            return self.procedural.sample(batch_size)
        b = self.triplets.next()
        unknown = torch.full((len(b.prompts),), -1, dtype=torch.long)  # no procedural edit id
        return EditBatch(b.images, b.targets, unknown, b.prompts, self.table(b.prompts))


# What a recipe draws its batches from: procedural edits alone, or mixed with real triplets.
BatchSource = EditBatchSampler | TripletMix


def make_batch_source(
    config: EditTrainConfig, rng: np.random.Generator, progress: dict[str, Any], ranks: Ranks
) -> BatchSource:
    """The recipe's batches: procedural edits (as make_edit_sampler), or with `config.triplets` this rank's share
    of a real dataset (counted in `progress`, a checkpointed dict), mixed with procedural edits below share 1."""
    procedural = None
    if config.triplets is None or config.triplets.share < 1:
        procedural, _ = make_edit_sampler(
            config.data, config.prompts, config.edits, config.output_dir, rng, config.token_dropout
        )
    if config.triplets is None:
        assert procedural is not None
        return procedural
    if procedural is not None:
        table = procedural.table
    else:
        table = build_prompt_table(config.prompts, [], Path(config.output_dir) / PROMPT_CACHE)
    table.others = CachedPromptEncoder(LazyPromptEncoder(config.prompts), capacity=4096)
    triplets = TripletStream(
        config.triplets,
        config.data.crop_size,
        config.batch_size,
        config.seed,
        ranks.rank,
        ranks.world_size,
        progress,
    )
    return TripletMix(triplets, procedural, table, config.triplets.share, rng)


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
