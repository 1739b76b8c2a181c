"""Per-session temporal latent reuse (fixed noise, latent feedback, similarity skip) and a flicker measure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engines.params import EditParams


class StreamState:
    """What the editor remembers about one video stream between its frames; owned by one session."""

    def __init__(self, seed: int = 0) -> None:
        self._noise: torch.Tensor | None = None
        self._noise_key: tuple[int, tuple[int, ...], str] | None = None
        self._fresh = torch.Generator().manual_seed(seed)
        self._skip_rng = np.random.default_rng(seed)
        self.last_input_latent: torch.Tensor | None = None
        self.last_output_latent: torch.Tensor | None = None
        self.last_output_frame: np.ndarray | None = None
        self.last_params: EditParams | None = None
        self.consecutive_skips = 0

    def noise(self, params: EditParams, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The starting noise for the next frame: drawn once from the seed when fixed, else fresh."""
        if not params.fixed_noise:
            return torch.randn(shape, generator=self._fresh).to(device)
        key = (params.seed, tuple(shape), str(device))
        if self._noise is None or self._noise_key != key:
            self._noise = torch.randn(shape, generator=torch.Generator().manual_seed(params.seed)).to(device)
            self._noise_key = key
        return self._noise

    def sampling_generator(self, params: EditParams) -> torch.Generator:
        """What a multi-step sampler draws this frame's start and step noise from: a generator seeded anew from
        the seed when the noise is fixed (every frame repeats the same draws, as diffusers' pipeline does for
        that seed), else the stream's running one."""
        return torch.Generator().manual_seed(params.seed) if params.fixed_noise else self._fresh

    def feedback_latent(self, params: EditParams) -> torch.Tensor | None:
        """The previous output latent scaled by the feedback strength, or None when feedback is off."""
        if params.latent_feedback <= 0.0 or self.last_output_latent is None:
            return None
        return params.latent_feedback * self.last_output_latent

    def should_skip(self, latent: torch.Tensor, params: EditParams) -> bool:
        """Decide whether to resend the last output instead of editing this frame (StreamDiffusion's filter).

        Skip probability rises linearly from 0 at `skip_threshold` to 1 at identical latents; at most
        `max_skipped_frames` in a row, so a slowly drifting scene is still refreshed.
        """
        if not params.similarity_skip or self.last_input_latent is None or self.last_output_frame is None:
            return False
        if params != self.last_params:  # a changed edit must show at once, however still the scene
            return False
        if self.consecutive_skips >= params.max_skipped_frames:
            return False
        similarity = float(
            torch.nn.functional.cosine_similarity(latent.flatten(), self.last_input_latent.flatten(), dim=0)
        )
        if similarity < params.skip_threshold:
            return False
        probability = (similarity - params.skip_threshold) / max(1.0 - params.skip_threshold, 1e-6)
        return bool(self._skip_rng.random() < probability)

    def record_edit(
        self, input_latent: torch.Tensor, output_latent: torch.Tensor, frame: np.ndarray, params: EditParams
    ) -> None:
        self.last_params = params
        self.last_input_latent = input_latent
        self.last_output_latent = output_latent
        self.last_output_frame = frame
        self.consecutive_skips = 0

    def record_skip(self) -> None:
        self.consecutive_skips += 1


def flicker(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Weight-free temporal flicker: mean |O_t − O_{t−1}| / mean |I_t − I_{t−1}| over a clip.

    1.0 means the output changes as much as the input does; above 1 the edit adds flicker.
    """
    if len(inputs) != len(outputs) or len(inputs) < 2:
        raise ValueError(f"need two or more paired frames, got {len(inputs)} inputs and {len(outputs)} outputs")
    return _mean_step_change(outputs) / max(_mean_step_change(inputs), 1e-6)


def _mean_step_change(frames: Sequence[np.ndarray]) -> float:
    pairs = zip(frames, frames[1:], strict=False)
    steps = [np.abs(b.astype(np.float32) - a.astype(np.float32)).mean() for a, b in pairs]
    return float(np.mean(steps))
