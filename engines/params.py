"""The per-session edit parameters the engine understands, with their bounds (the control plane's schema)."""

from __future__ import annotations

import copy
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

DEFAULT_PROMPT = "make it a pencil sketch"


class EditParams(BaseModel):
    """What one session asks of the editor; every field can change live between frames."""

    # Strict: JSON false is not 0.0, "7" is not 7 (the schema says number, integer, boolean); ints still pass as floats.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        DEFAULT_PROMPT,
        min_length=1,
        max_length=300,
        description="The edit instruction, e.g. 'make it a pencil sketch'.",
    )
    text_guidance: float = Field(
        7.5,
        ge=0.0,
        le=20.0,
        description="s_T: how strongly the edit follows the instruction (0 = ignore the text).",
    )
    image_guidance: float = Field(
        1.5,
        ge=0.0,
        le=5.0,
        description="s_I: how strongly the output stays close to the camera frame.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the session's noise.")
    fixed_noise: bool = Field(
        True,
        description="Draw the noise once from the seed and reuse it every frame (steadier video).",
    )
    latent_feedback: float = Field(
        0.0,
        ge=0.0,
        le=0.9,
        description="Blend of the previous output latent into the next starting latent (0 = off).",
    )
    similarity_skip: bool = Field(
        False,
        description="Skip the UNet and resend the last output when the frame barely changed.",
    )
    skip_threshold: float = Field(
        0.98,
        ge=0.5,
        le=1.0,
        description="Cosine similarity of frame latents above which skipping starts to be likely.",
    )
    max_skipped_frames: int = Field(
        10,
        ge=1,
        le=120,
        description="Most consecutive frames that may be skipped before one is edited again.",
    )
    hold_still: bool = Field(
        True,
        description="Send the previous output's pixels where the camera has not changed since they were drawn "
        "(a still scene stops shimmering); pixels where it moved are drawn fresh.",
    )
    hold_threshold: float = Field(
        2.0,
        ge=0.25,
        le=32.0,
        description="Levels (0-255) the camera must change, averaged over 9x9 pixels, for a pixel to be drawn fresh; "
        "below half of it the held pixel stays, in between the two blend.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, prompt: str) -> str:
        return check_prompt(prompt)


def check_prompt(prompt: str) -> str:
    """Words, not blanks, control characters or unencodable halves of a character."""
    if not prompt.strip():
        raise ValueError("the prompt is empty or only whitespace")
    odd = {unicodedata.category(c) for c in prompt} & {"Cc", "Cs"}
    if odd:
        what = "a control character" if "Cc" in odd else "a lone surrogate (not valid Unicode text)"
        raise ValueError(f"the prompt contains {what}")
    return prompt


def _all_optional(model: type[BaseModel], name: str) -> type[BaseModel]:
    """A model with the same fields and bounds as `model`, each optional and defaulting to None."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        optional = copy.copy(info)
        optional.default = None
        fields[field_name] = (info.annotation | None, optional)
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), **fields)


_EditParamsPatchBase = _all_optional(EditParams, "_EditParamsPatchBase")


class EditParamsPatch(_EditParamsPatchBase):  # type: ignore[misc,valid-type]
    """A partial update of EditParams: only the fields given change, within the same bounds and checks."""

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, prompt: str | None) -> str | None:
        return None if prompt is None else check_prompt(prompt)

    def apply(self, params: EditParams) -> EditParams:
        """Return params with this patch's given fields replaced (and validated again)."""
        changes = self.model_dump(exclude_unset=True, exclude_none=True)
        return EditParams.model_validate({**params.model_dump(), **changes})
