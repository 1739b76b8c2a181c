"""Prompt contexts for training: every phrasing encoded once (MiniLM, or a test hash encoder), cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.config import require_one_token_exactly_when_pooled
from engines.text import CachedPromptEncoder, CLIPPromptEncoder, MiniLMPromptEncoder, PromptEncoder


class PromptSpec(BaseModel):
    """Which prompt encoder a recipe trains against."""

    model_config = ConfigDict(extra="forbid")

    encoder: Literal["minilm", "minilm+sentence", "minilm-pooled", "clip", "hash"] = Field(
        "minilm",
        description="'minilm': all-MiniLM-L6-v2 token embeddings; 'minilm+sentence': the same after the sentence "
        "embedding; 'minilm-pooled': the sentence embedding alone (engines.text.MiniLMPromptEncoder); 'clip': "
        "the CLIP text encoder of clip_folder (a real InstructPix2Pix's own); 'hash': a weight-free stand-in for "
        "tests.",
    )
    clip_folder: Path | None = Field(
        None, description="For 'clip': a folder holding text_encoder/ and tokenizer/ (a stock or converted model)."
    )
    tokens: int = Field(
        16, ge=1, le=77, description="Context length (the editor's max_prompt_tokens); 1 for 'minilm-pooled'."
    )
    hash_dim: int = Field(32, ge=4, description="Token width of the hash encoder (ignored for minilm).")

    @model_validator(mode="after")
    def _check(self) -> PromptSpec:
        require_one_token_exactly_when_pooled(self.encoder, self.tokens, "encoder", "tokens")
        if (self.encoder == "clip") != (self.clip_folder is not None):
            raise ValueError("clip_folder is set exactly when the encoder is 'clip'")
        if self.clip_folder is not None and not (self.clip_folder / "text_encoder" / "config.json").is_file():
            raise ValueError(f"clip_folder {self.clip_folder} has no text_encoder/config.json")
        return self

    @property
    def dim(self) -> int:
        if self.clip_folder is not None:
            return int(json.loads((self.clip_folder / "text_encoder" / "config.json").read_text())["hidden_size"])
        return self.hash_dim if self.encoder == "hash" else MiniLMPromptEncoder.dim


class HashPromptEncoder(PromptEncoder):
    """Each word becomes a fixed pseudo-random vector seeded by its hash: no weights, same output everywhere."""

    def __init__(self, dim: int = 32, tokens: int = 16) -> None:
        self.dim = dim
        self.tokens = tokens

    def _word(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") % (2**63)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.tokens, self.dim)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(re.findall(r"[a-z0-9']+", prompt.lower())[: self.tokens]):
                out[i, j] = self._word(word)
        return out


class LazyPromptEncoder(PromptEncoder):
    """Builds the real encoder only when a prompt missing from the cache must be encoded."""

    def __init__(self, spec: PromptSpec) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.tokens = spec.tokens
        self._encoder: PromptEncoder | None = None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = make_prompt_encoder(self.spec)
        return self._encoder.encode(prompts)


def make_prompt_encoder(spec: PromptSpec) -> PromptEncoder:
    if spec.clip_folder is not None:
        return CLIPPromptEncoder(spec.clip_folder, spec.tokens)
    if spec.encoder != "hash":
        return MiniLMPromptEncoder.named(spec.encoder, spec.tokens)
    return HashPromptEncoder(spec.hash_dim, spec.tokens)


class PromptTable:
    """The (tokens, dim) context of every known prompt; the empty prompt is the null-text condition.

    With `others`, a prompt outside the table (a dataset's instruction) is encoded through it (an LRU cache
    of the recipe's encoder); without, it raises KeyError.
    """

    def __init__(self, contexts: dict[str, torch.Tensor], others: CachedPromptEncoder | None = None) -> None:
        if "" not in contexts:
            raise ValueError("a prompt table needs the empty prompt (the null-text condition)")
        self.contexts = contexts
        self.others = others

    @property
    def null(self) -> torch.Tensor:
        return self.contexts[""]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, dim) contexts."""
        if self.others is None:
            return torch.stack([self.contexts[p] for p in prompts])
        return torch.stack([self.contexts[p] if p in self.contexts else self.others(p) for p in prompts]).float()


def encode_in_batches(encoder: PromptEncoder, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """float32 contexts of many prompts, `batch` prompts an encoder call."""
    return torch.cat([encoder.encode(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]).float()


def build_prompt_table(
    spec: PromptSpec, prompts: list[str], cache_path: Path | None, encoder: PromptEncoder | None = None
) -> PromptTable:
    """Encode `prompts` (and "") once; reuse `cache_path` when it was written for the same encoder and prompts."""
    prompts = list(dict.fromkeys(["", *prompts]))
    key = {"spec": spec.model_dump(), "prompts": prompts}
    if cache_path is not None and cache_path.is_file():
        cached = torch.load(cache_path, weights_only=True)
        if cached.get("key") == repr(key):
            return PromptTable(dict(zip(prompts, cached["contexts"], strict=True)))
    encoder = encoder or make_prompt_encoder(spec)
    contexts = encode_in_batches(encoder, prompts)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")  # data-parallel ranks write it side by side
        torch.save({"key": repr(key), "contexts": contexts}, tmp)
        tmp.replace(cache_path)
    return PromptTable(dict(zip(prompts, contexts, strict=True)))
