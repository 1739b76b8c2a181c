"""Per-session temporal reuse (fixed noise, latent feedback, similarity skip, the still hold) and flicker measures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engines.params import EditParams

#: Where the camera moves: its change, averaged over a MOTION_WINDOW² square and the channels, above MOTION_LEVELS
#: (8-bit levels). Elsewhere what changes is the camera's noise and coding. The flicker measures split frames by it,
#: and the still hold redraws a pixel by the same measure (with its own threshold).
MOTION_LEVELS = 2.0
MOTION_WINDOW = 9


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
        # The still hold's memory (hold_still), float32 (3, H, W) in [-1, 1] on the editor's device: the image last
        # sent, and the camera as it was when each pixel was drawn (a blend where a pixel was partly redrawn).
        self.held_output: torch.Tensor | None = None
        self.held_camera: torch.Tensor | None = None

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


def hold_still(
    states: Sequence[StreamState], cameras: torch.Tensor, outputs: torch.Tensor, params: Sequence[EditParams]
) -> torch.Tensor:
    """The images to send for freshly edited frames of several streams, (B, 3, H, W) in [-1, 1] like `cameras` and
    `outputs`: where a stream's camera has changed since a pixel was last drawn (averaged over MOTION_WINDOW²
    pixels and the channels) by its hold_threshold levels or more, the fresh pixel; below half of that, the pixel
    sent before; a blend in between. The change is measured from what each pixel saw when it was drawn, not from
    the last frame, so a slow drift is redrawn once it adds up. A changed edit (any parameter), frame size or
    device redraws every pixel. Batched on the editor's device (a GPU engine holds many streams); call it before
    each stream's record_edit, which it reads last_params from."""
    fresh, cams = outputs.float(), cameras.float()
    holding: list[int] = []
    memories: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (state, asked) in enumerate(zip(states, params, strict=True)):
        held, seen = state.held_output, state.held_camera
        if (
            asked.hold_still
            and held is not None
            and seen is not None
            and held.shape == fresh.shape[1:]
            and held.device == fresh.device
            and asked == state.last_params
        ):
            holding.append(i)
            memories.append((held, seen))
        else:  # drawn fresh: the memory starts here (or is let go when the hold is off)
            state.held_output = fresh[i].clone() if asked.hold_still else None
            state.held_camera = cams[i].clone() if asked.hold_still else None
    if not holding:
        return outputs
    held = torch.stack([m[0] for m in memories])
    seen = torch.stack([m[1] for m in memories])
    camera = cams[holding]
    change = box_mean((camera - seen).abs_().mean(1) * 127.5, MOTION_WINDOW)  # levels, (N, H, W)
    half = torch.tensor([params[i].hold_threshold / 2 for i in holding], device=change.device).view(-1, 1, 1)
    redraw = ((change - half) / half).clamp_(0.0, 1.0)[:, None]
    held.lerp_(fresh[holding], redraw)
    seen.lerp_(camera, redraw)
    sent = fresh.clone()
    for j, i in enumerate(holding):
        states[i].held_output, states[i].held_camera = held[j], seen[j]
        sent[i] = held[j]
    return sent


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


def _pixel_steps(frames: Sequence[np.ndarray]) -> np.ndarray:
    """(T − 1, H, W): |F_t − F_{t−1}| per pixel, averaged over the channels, in 8-bit levels."""
    return np.abs(np.diff(np.stack(frames).astype(np.float32), axis=0)).mean(-1)


def _window_sums(values: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sums of `values` over [i − radius, i + radius] along `dim`, cut at the ends: differences of a running sum,
    so the cost does not grow with the window."""
    n, axis = values.shape[dim], dim % values.ndim
    running = values.cumsum(dim)

    def edge(index: int, width: int) -> torch.Tensor:  # one slice of the running sum, repeated `width` times
        return running.narrow(dim, index, 1).expand(*values.shape[:axis], width, *values.shape[axis + 1 :])

    padded = torch.cat([torch.zeros_like(edge(0, radius + 1)), running, edge(n - 1, radius)], dim)
    return padded.narrow(dim, 2 * radius + 1, n) - padded.narrow(dim, 0, n)


def box_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """(..., H, W) float32: each value averaged over the window² square around it, cut at the borders (what
    avg_pool2d without padded counts gives, at a fifth of its time for a 9×9 window)."""
    radius = window // 2
    wide = values.double()  # running sums of a whole frame need more than float32's 24 bits
    sums = _window_sums(_window_sums(wide, radius, -1), radius, -2)
    rows = _window_sums(wide.new_ones(values.shape[-2], 1), radius, 0)
    columns = _window_sums(wide.new_ones(1, values.shape[-1]), radius, 1)
    return (sums / (rows * columns)).float()


def moving_pixels(inputs: Sequence[np.ndarray]) -> np.ndarray:
    """(T − 1, H, W) bool: the pixels of each camera frame step that move (MOTION_LEVELS, MOTION_WINDOW)."""
    return (box_mean(torch.from_numpy(_pixel_steps(inputs)), MOTION_WINDOW) > MOTION_LEVELS).numpy()


def region_flicker(
    inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], moving: np.ndarray
) -> tuple[float, float]:
    """Flicker over the still pixels and over the moving ones: mean |ΔO| / mean |ΔI| within each region. The
    still part is the shimmer a steady scene shows; the moving part is how far the output follows the motion."""
    d_in, d_out = _pixel_steps(inputs), _pixel_steps(outputs)

    def ratio(region: np.ndarray) -> float:
        return float(d_out[region].mean() / d_in[region].mean()) if region.any() and d_in[region].any() else 0.0

    return ratio(~moving), ratio(moving)
