"""Prompt routing: an instruction's sentence embedding read as a blend of the edits a model was trained on.

An editor trained on a few hundred phrasings of a fixed set of edits follows its training phrasings well and a new
user's words badly: an unseen phrasing lands between the trained contexts, and the one-step student's edit there is
weaker or another edit's (issue 15's paraphrase spread). Routing measures how close the prompt is to many known
phrasings of every edit (nearest neighbours in the sentence-embedding space) and feeds the UNet a softmax blend of
the edits' own contexts instead, so every phrasing read as an edit gets that edit's trained output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engines.client import READING_FLOOR, PromptReading
from engines.config import PromptRouting
from engines.text import PromptEncoder

#: What a table's edit contexts are when nothing trained them: the mean of each edit's training phrasings' contexts.
PHRASING_MEANS = "phrasing means"


@dataclass(frozen=True)
class RouteTable:
    """Known phrasings' unit sentence embeddings (N, D) and their edit (N,), each edit's name and the context it is
    fed as (E, tokens, D), with where those contexts come from."""

    phrasings: torch.Tensor
    edit_of_phrasing: torch.Tensor
    edit_names: tuple[str, ...]
    edit_contexts: torch.Tensor
    contexts_source: str = PHRASING_MEANS

    def __post_init__(self) -> None:
        n, e = self.phrasings.shape[0], len(self.edit_names)
        if self.phrasings.ndim != 2 or self.edit_of_phrasing.shape != (n,):
            raise ValueError(f"phrasings {tuple(self.phrasings.shape)} and their edits do not pair up")
        if self.edit_contexts.ndim != 3 or self.edit_contexts.shape[0] != e:
            raise ValueError(f"{e} edits but contexts of shape {tuple(self.edit_contexts.shape)}")
        if self.edit_contexts.shape[2] != self.phrasings.shape[1]:
            raise ValueError("the edits' contexts and the phrasings' embeddings differ in width")
        counts = torch.bincount(self.edit_of_phrasing, minlength=e)
        if len(counts) != e or int(counts.min()) == 0:
            raise ValueError("every edit needs at least one phrasing, and every phrasing a known edit")

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {
            "phrasings": self.phrasings.half().contiguous(),
            "edit_of_phrasing": self.edit_of_phrasing.to(torch.int32).contiguous(),
            "edit_contexts": self.edit_contexts.float().contiguous(),
        }
        metadata = {"edit_names": "\n".join(self.edit_names), "contexts_source": self.contexts_source}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> RouteTable:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                names = metadata.get("edit_names", "")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a safetensors file: {exc}") from exc
        missing = {"phrasings", "edit_of_phrasing", "edit_contexts"} - tensors.keys()
        if missing or not names:
            raise ValueError(f"{path} is not a route table (missing {sorted(missing) or 'edit_names'})")
        return cls(
            tensors["phrasings"].float(),
            tensors["edit_of_phrasing"].long(),
            tuple(names.split("\n")),
            tensors["edit_contexts"].float(),
            metadata.get("contexts_source", PHRASING_MEANS),
        )


def sentence_embeddings(contexts: torch.Tensor) -> torch.Tensor:
    """Unit vectors of one-token contexts (B, 1, D): what routing compares."""
    return torch.nn.functional.normalize(contexts[:, 0].float(), dim=-1)


def edit_weights(embeddings: torch.Tensor, table: RouteTable, routing: PromptRouting) -> torch.Tensor:
    """(B, E) softmax weights of each prompt over the edits, from unit sentence embeddings (B, D)."""
    similarity = embeddings @ table.phrasings.T  # (B, N)
    scores = []
    for e in range(len(table.edit_names)):
        own = similarity[:, table.edit_of_phrasing == e]
        k = min(routing.top_k, own.shape[1])
        scores.append(own.topk(k, dim=1).values.mean(dim=1))
    return torch.softmax(torch.stack(scores, dim=1) / routing.temperature, dim=1)


class RoutedPromptEncoder(PromptEncoder):
    """A one-token (sentence) prompt encoder whose non-empty prompts become blends of the trained edits' contexts;
    the empty prompt keeps its own context, the 'no instruction' condition."""

    def __init__(self, base: PromptEncoder, table: RouteTable, routing: PromptRouting) -> None:
        if base.tokens != 1:
            raise ValueError(f"routing reads a one-token sentence context, this encoder gives {base.tokens} tokens")
        if table.edit_contexts.shape[1:] != (base.tokens, base.dim):
            raise ValueError(
                f"the route table's contexts are {tuple(table.edit_contexts.shape[1:])}, the encoder's "
                f"{(base.tokens, base.dim)}"
            )
        self.base = base
        self.table = table
        self.routing = routing
        self.dim = base.dim
        self.tokens = base.tokens

    def normalise(self, prompt: str) -> str:
        return self.base.normalise(prompt)

    def weights(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), E) how much of each edit every prompt is read as."""
        return edit_weights(sentence_embeddings(self.base.encode(prompts)), self.table, self.routing)

    def read(self, prompt: str) -> PromptReading:
        """The edits `prompt` is read as, heaviest first: what a user is told their words became. Shares under
        READING_FLOOR are left out; the empty prompt is read as no edit at all."""
        return self.encode_and_read([prompt])[1][0]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_and_read(prompts)[0]

    def encode_and_read(self, prompts: list[str]) -> tuple[torch.Tensor, list[PromptReading]]:
        """The prompts' contexts and readings from one pass of the base encoder."""
        contexts = self.base.encode(prompts)
        weights = edit_weights(sentence_embeddings(contexts), self.table, self.routing)
        routed = torch.einsum("be,etd->btd", weights, self.table.edit_contexts)
        empty = [not p.strip() for p in prompts]
        readings = [[] if blank else self._reading(row) for blank, row in zip(empty, weights, strict=True)]
        return torch.where(torch.tensor(empty)[:, None, None], contexts, routed), readings

    def _reading(self, weights: torch.Tensor) -> PromptReading:
        shares = [(name, float(w)) for name, w in zip(self.table.edit_names, weights, strict=True)]
        return sorted((s for s in shares if s[1] >= READING_FLOOR), key=lambda s: -s[1])
