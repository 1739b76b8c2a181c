"""Editor: one batched call edits the current frame of several streams, each with its own conditions and state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.backends.base import Backend
from engines.config import EditorConfig
from engines.params import EditParams
from engines.sampling import NoiseSchedule, cfg_prediction, student_start
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder


@dataclass
class EditRequest:
    """One stream's frame to edit: RGB uint8 (H, W, 3) at the editor's resolution, plus its conditions."""

    frame: np.ndarray
    context: torch.Tensor  # (tokens, dim) prompt embedding, from Editor.encode_prompt
    params: EditParams
    state: StreamState


@dataclass
class EditResult:
    frame: np.ndarray  # RGB uint8 (H, W, 3)
    skipped: bool  # True when the similarity filter resent the previous output


def frames_to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames → float (B, 3, H, W) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def tensor_to_frames(images: torch.Tensor) -> list[np.ndarray]:
    """float (B, 3, H, W) in [-1, 1] → uint8 (H, W, 3) frames."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


class Editor:
    """The one-step student edit (the service's path), or 3-pass CFG when the model is not distilled.

    Temporal reuse happens here, per request: fixed noise, latent feedback and the similarity skip all
    read and update the request's StreamState, so one batch can mix streams with different settings.
    """

    def __init__(
        self, backend: Backend, config: EditorConfig, schedule: NoiseSchedule, prompts: CachedPromptEncoder
    ) -> None:
        self.backend = backend
        self.config = config
        self.schedule = schedule
        self.prompts = prompts
        self.null_context = prompts("")  # InstructPix2Pix's 'no text' condition: the empty prompt
        self.unet_rows = 0  # UNet batch rows run so far (a skipped frame costs none)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The prompt's (tokens, dim) context; encoded once per distinct prompt, then cached."""
        return self.prompts(prompt)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @torch.inference_mode()
    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        if not requests:
            return []
        size = self.config.resolution
        for request in requests:
            if request.frame.shape != (size, size, 3) or request.frame.dtype != np.uint8:
                raise ValueError(
                    f"frames must be uint8 ({size}, {size}, 3), got {request.frame.dtype} {request.frame.shape}"
                )
        device, dtype = self.backend.device, self.backend.dtype
        latents = self.backend.encode(frames_to_tensor([r.frame for r in requests]).to(device, dtype))
        results: list[EditResult | None] = [None] * len(requests)
        active: list[int] = []
        for i, request in enumerate(requests):
            if request.state.should_skip(latents[i], request.params):
                request.state.record_skip()
                assert request.state.last_output_frame is not None
                results[i] = EditResult(request.state.last_output_frame, skipped=True)
            else:
                active.append(i)
        if active:
            image_latents = latents[active]
            x0 = self._student(image_latents, [requests[i] for i in active])
            frames = tensor_to_frames(self.backend.decode(x0))
            for j, i in enumerate(active):
                requests[i].state.record_edit(image_latents[j], x0[j], frames[j], requests[i].params)
                results[i] = EditResult(frames[j], skipped=False)
        return [r for r in results if r is not None]

    def _student(self, image_latents: torch.Tensor, requests: list[EditRequest]) -> torch.Tensor:
        """x0 of one denoising step from t = student_timestep, one UNet pass (or three without distillation)."""
        device, dtype = image_latents.device, image_latents.dtype
        shape = tuple(image_latents.shape[1:])
        noise = torch.stack([r.state.noise(r.params, shape, device) for r in requests]).to(dtype)
        guesses = [r.state.feedback_latent(r.params) for r in requests]
        guess = None
        if any(g is not None for g in guesses):
            guess = torch.stack([g if g is not None else torch.zeros(shape, device=device) for g in guesses])
        t = self.config.student_timestep
        x_t = student_start(self.schedule, noise.cpu(), t, None if guess is None else guess.cpu()).to(device, dtype)
        timesteps = torch.full((len(requests),), t, dtype=torch.long, device=device)
        context = torch.stack([r.context for r in requests]).to(device, dtype)
        guidance = torch.tensor(
            [[r.params.text_guidance, r.params.image_guidance] for r in requests], dtype=torch.float32, device=device
        )
        cond = image_latents * self.config.image_latent_scale
        if self.config.distilled:
            self.unet_rows += len(requests)
            prediction = self.backend.denoise(torch.cat([x_t, cond], 1), timesteps, context, guidance)
        else:
            self.unet_rows += 3 * len(requests)
            prediction = cfg_prediction(
                self.backend.denoise,
                self.schedule,
                x_t,
                cond,
                timesteps,
                context,
                self.null_context.to(device, dtype)[None],
                guidance[:, 0],
                guidance[:, 1],
            )
        return self.schedule.predict_x0(prediction.to(dtype), x_t, timesteps)
