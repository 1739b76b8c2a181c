"""Real edit triplets (input, instruction, edited image): parquet shards or a saved `datasets` folder, streamed,
decoded and cropped on DataLoader workers, split between ranks, and resumable to the batch."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

# What a checkpoint's TrainState.extra calls the number of triplet batches this rank has drawn.
BATCHES_DRAWN = "triplet_batches_drawn"


class TripletConfig(BaseModel):
    """Where the triplets are, what their columns are called, and how much of the training they make up."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(
        ...,
        description="A folder of *.parquet shards (searched recursively), one .parquet file, "
        "or a folder written by datasets' save_to_disk.",
    )
    image_column: str = Field("original_image", description="The input image (InstructPix2Pix's name).")
    prompt_column: str = Field("edit_prompt", description="The instruction.")
    edited_column: str = Field("edited_image", description="The edited image.")
    share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of batches drawn from these triplets; the rest are procedural edits of the data "
        "section's images. At 1 the procedural images are never loaded.",
    )
    workers: int = Field(2, ge=0, description="DataLoader processes decoding and cropping (0: in the trainer).")
    shuffle_buffer: int = Field(1000, ge=1, description="Rows a streamed shuffle mixes (after shuffling shards).")
    min_crop: float = Field(
        0.6, gt=0, le=1, description="Smallest crop side as a fraction of the image's shorter side (1: no zoom)."
    )

    @model_validator(mode="after")
    def _check_columns(self) -> TripletConfig:
        columns = [self.image_column, self.prompt_column, self.edited_column]
        if len(set(columns)) != 3:
            raise ValueError(f"image, prompt and edited columns must differ, got {columns}")
        return self


def open_triplets(config: TripletConfig) -> Any:
    """The triplets as a streamed `datasets.IterableDataset` of the three columns, images left undecoded."""
    import datasets

    path = Path(config.path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise ValueError(f"{path} holds splits {sorted(saved)}, none called 'train'")
            saved = saved["train"]
        # Shards are what ranks and DataLoader workers divide between them.
        stream = saved.to_iterable_dataset(num_shards=max(1, min(len(saved), 64)))
    else:
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) if path.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no parquet shards or saved dataset at {path}")
        stream = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    wanted = [config.image_column, config.prompt_column, config.edited_column]
    missing = [c for c in wanted if c not in (stream.column_names or [])]
    if missing:
        raise ValueError(
            f"{path} has no column {missing}; its columns are {stream.column_names} (set triplets.*_column)"
        )
    stream = stream.select_columns(wanted)
    for column in (config.image_column, config.edited_column):
        if isinstance(stream.features[column], datasets.Image):
            # Decoded on the workers, after the rows a resumed run skips.
            stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream


def decode_rgb(value: Any) -> np.ndarray:
    """An image cell as RGB uint8 (H, W, 3): encoded bytes, a datasets Image dict, a path, or pixels."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        return np.asarray(Image.fromarray(np.asarray(value, dtype=np.uint8)).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def paired_crop(
    image: np.ndarray, edited: np.ndarray, size: int, min_crop: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random square region of both images (edited resized to image's size first), resized to
    `size`, flipped together half the time; float (3, size, size) in [-1, 1]."""
    h, w = image.shape[:2]
    # np.array copies: decoded pixels may be read-only.
    a = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    b = torch.from_numpy(np.array(edited)).permute(2, 0, 1)[None].float()
    if b.shape[-2:] != a.shape[-2:]:
        b = F.interpolate(b, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    side = int(round(min(h, w) * rng.uniform(min_crop, 1.0)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    pair = torch.cat([a, b])[:, :, top : top + side, left : left + side]
    pair = F.interpolate(pair, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if rng.random() < 0.5:
        pair = pair.flip(-1)
    pair = (pair / 127.5 - 1).clamp(-1, 1)
    return pair[0], pair[1]


class TripletCrops(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """This rank's endless stream of (input crop, edited crop, prompt), epoch after epoch.

    Each row's crop is drawn from an RNG seeded by (seed, rank, worker, row index), so a resumed run that
    skips the rows its batches already used (without decoding them) draws exactly what an unbroken run would.
    """

    def __init__(
        self, stream: Any, config: TripletConfig, size: int, seed: int, rank: int, batch_size: int, skip: int
    ) -> None:
        super().__init__()
        self.stream = stream
        self.config = config
        self.size = size
        self.seed = seed
        self.rank = rank
        self.batch_size = batch_size
        self.skip = skip  # batches each worker has already given

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        skip = self.skip * self.batch_size
        c = self.config
        index = 0
        for epoch in itertools.count():
            self.stream.set_epoch(epoch)
            rows = 0
            for row in self.stream:  # datasets gives each DataLoader worker its own shards
                rows += 1
                index += 1
                if index <= skip:
                    continue
                rng = np.random.default_rng([self.seed, self.rank, worker, index])
                image = decode_rgb(row[c.image_column])
                edited = decode_rgb(row[c.edited_column])
                source, target = paired_crop(image, edited, self.size, c.min_crop, rng)
                yield source, target, str(row[c.prompt_column])
            if rows == 0:
                raise RuntimeError(f"{c.path}: rank {self.rank} worker {worker} got no rows (too few shards?)")


def collate(rows: list[tuple[torch.Tensor, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, targets, prompts = zip(*rows, strict=True)
    return torch.stack(images), torch.stack(targets), list(prompts)


@dataclass
class TripletBatch:
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    targets: torch.Tensor
    prompts: list[str]


class TripletStream:
    """Batches of this rank's share of the triplets, counted in `progress` (a checkpointed dict) so that a
    resumed run continues from the next batch. The DataLoader starts at the first draw, after any resume."""

    def __init__(
        self,
        config: TripletConfig,
        crop_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        progress: dict[str, Any],
    ) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = open_triplets(config)
        stream = stream.shuffle(seed=seed, buffer_size=config.shuffle_buffer)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.config = config
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.progress = progress
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]] | None = None

    def _start(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        # A worker without a shard would end at once and break the workers' turn-taking: use no more than shards.
        workers = min(self.config.workers, self.stream.num_shards)
        # A DataLoader takes batches from its workers in turn, always starting at worker 0: each worker skips
        # the rounds already drawn, and the batches of the unfinished round that were drawn are dropped here.
        rounds, drawn_of_round = divmod(int(self.progress.get(BATCHES_DRAWN, 0)), max(workers, 1))
        crops = TripletCrops(self.stream, self.config, self.crop_size, self.seed, self.rank, self.batch_size, rounds)
        loader = torch.utils.data.DataLoader(
            crops,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=workers > 0,
            # Its own generator: seeding workers from the global one would shift the recipe's noise draws
            # by one at whichever step the loader starts, so a resumed run would draw other noise.
            generator=torch.Generator().manual_seed(self.seed),
        )
        batches = iter(loader)
        for _ in range(drawn_of_round):
            next(batches)
        return batches

    def next(self) -> TripletBatch:
        if self._batches is None:
            self._batches = self._start()
        images, targets, prompts = next(self._batches)
        self.progress[BATCHES_DRAWN] = int(self.progress.get(BATCHES_DRAWN, 0)) + 1
        return TripletBatch(images, targets, prompts)
