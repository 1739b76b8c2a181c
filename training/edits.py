"""The default editor's restyles: exact classical image operations on torch batches, each with its phrasings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# An edit maps RGB images (B, 3, H, W) in [0, 1] to images of the same shape in [0, 1].
EditFn = Callable[[torch.Tensor], torch.Tensor]

_LUMA = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma (B, 1, H, W) of RGB images (B, 3, H, W)."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders; the kernel spans ±3σ pixels."""
    radius = max(1, int(round(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad_h = min(radius, x.shape[2] - 1)
    pad_w = min(radius, x.shape[3] - 1)
    if pad_h < radius or pad_w < radius:
        # Reflect padding needs the image to be wider than the kernel radius; replicate beyond that.
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _conv_gray(g: torch.Tensor, kernel: list[list[float]], dilation: int = 1) -> torch.Tensor:
    k = torch.tensor(kernel, dtype=g.dtype, device=g.device).view(1, 1, 3, 3)
    return F.conv2d(F.pad(g, (dilation,) * 4, mode="replicate"), k, dilation=dilation)


def _gray3(g: torch.Tensor) -> torch.Tensor:
    return g.expand(-1, 3, -1, -1).clone()


def black_and_white(x: torch.Tensor) -> torch.Tensor:
    """High-contrast monochrome: luma stretched ×1.5 around mid-grey."""
    return _gray3(((luma(x) - 0.5) * 1.5 + 0.5).clamp(0, 1))


_SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))


def sepia(x: torch.Tensor) -> torch.Tensor:
    """The classic sepia matrix, then faded towards cream like an old print."""
    m = torch.tensor(_SEPIA, dtype=x.dtype, device=x.device)
    toned = torch.einsum("oc,bchw->bohw", m, x).clamp(0, 1)
    return (toned * 0.78 + 0.14).clamp(0, 1)


def negative(x: torch.Tensor) -> torch.Tensor:
    """The photographic negative: every channel inverted."""
    return 1.0 - x


def pencil_sketch(x: torch.Tensor) -> torch.Tensor:
    """Colour-dodge of the grey image with its blurred inverse (the classic sketch filter), darkened by γ=2."""
    g = luma(x)
    blurred_inverse = gaussian_blur(1.0 - g, 3.0)
    sketch = (g / (1.0 - blurred_inverse).clamp_min(1e-3)).clamp(0, 1)
    return _gray3(sketch**2)


def soft_posterize(x: torch.Tensor, levels: int, step_width: float) -> torch.Tensor:
    """Quantize [0, 1] values to `levels` levels, each step a smoothstep `step_width` wide (in level units).

    A hard step is an edge no 16-wide autoencoder reproduces: v1's hard 27-colour pop art reconstructed at
    only 2.5 dB above its input, so no student could beat the input by the 3 dB the evaluation asks for.
    """
    v = x * (levels - 1)
    level = torch.floor(v).clamp(max=levels - 2)
    t = ((v - level - (0.5 - step_width / 2)) / step_width).clamp(0, 1)
    return (level + t * t * (3 - 2 * t)) / (levels - 1)


def pop_art(x: torch.Tensor) -> torch.Tensor:
    """Smoothed (σ=2), saturation ×2, then 2 levels per channel: the 8 flat inks of a screen print."""
    smooth = gaussian_blur(x, 2.0)
    g = luma(smooth)
    return soft_posterize(((smooth - g) * 2.0 + g).clamp(0, 1), 2, 0.3)


def warm_sunset(x: torch.Tensor) -> torch.Tensor:
    """A golden-hour grade: red lifted, blue cut, a warm orange cast."""
    gain = torch.tensor((1.08, 0.92, 0.62), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    offset = torch.tensor((0.12, 0.04, 0.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * gain + offset).clamp(0, 1)


def cold_winter(x: torch.Tensor) -> torch.Tensor:
    """A wintry grade: 40% desaturated, red cut, a bright blue cast."""
    g = luma(x)
    muted = (x - g) * 0.6 + g
    gain = torch.tensor((0.72, 0.9, 0.95), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    offset = torch.tensor((0.0, 0.06, 0.2), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (muted * gain + offset).clamp(0, 1)


# An inferno-like false-colour ramp: (position, RGB) anchors interpolated linearly.
_THERMAL_ANCHORS = (
    (0.0, (0.0, 0.0, 0.02)),
    (0.2, (0.2, 0.02, 0.45)),
    (0.45, (0.7, 0.1, 0.4)),
    (0.65, (0.95, 0.35, 0.05)),
    (0.85, (1.0, 0.8, 0.1)),
    (1.0, (1.0, 1.0, 0.85)),
)


def thermal(x: torch.Tensor) -> torch.Tensor:
    """Blurred luma (σ=1.5) through an inferno-like false-colour ramp, as a thermal camera shows heat."""
    g = gaussian_blur(luma(x), 1.5).clamp(0, 1)[:, 0]
    positions = torch.tensor([p for p, _ in _THERMAL_ANCHORS], dtype=x.dtype, device=x.device)
    colours = torch.tensor([c for _, c in _THERMAL_ANCHORS], dtype=x.dtype, device=x.device)
    segment = torch.bucketize(g.contiguous(), positions[1:-1])  # which pair of anchors each pixel lies between
    p0, p1 = positions[segment], positions[segment + 1]
    w = ((g - p0) / (p1 - p0)).clamp(0, 1)[..., None]
    out = colours[segment] + (colours[segment + 1] - colours[segment]) * w
    return out.permute(0, 3, 1, 2).contiguous()


def night_vision(x: torch.Tensor) -> torch.Tensor:
    """Brightened luma (gain 1.5, γ 0.7) shown in phosphor green."""
    g = (luma(x) * 1.5 + 0.05).clamp(0, 1) ** 0.7
    tint = torch.tensor((0.18, 1.0, 0.22), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (g * tint).clamp(0, 1)


_SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
_SOBEL_Y = [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]


def cartoon(x: torch.Tensor) -> torch.Tensor:
    """Smoothed (σ=2), saturated ×1.6 and posterized to 5 soft levels, under soft black ink on Sobel edges."""
    smooth = gaussian_blur(x, 2.0)
    g = luma(smooth)
    flat = soft_posterize(((smooth - g) * 1.6 + g).clamp(0, 1), 5, 0.5)
    mag = (_conv_gray(g, _SOBEL_X) ** 2 + _conv_gray(g, _SOBEL_Y) ** 2).sqrt()
    ink = gaussian_blur(((mag - 0.12) / 0.12).clamp(0, 1), 1.0)
    return flat * (1.0 - ink)


def dreamy_blur(x: torch.Tensor) -> torch.Tensor:
    """Soft focus: a σ=4 blur screened with itself at 50% (a bright glow), tinted lavender."""
    soft = gaussian_blur(x, 4.0)
    glow = 1.0 - (1.0 - soft) * (1.0 - 0.5 * soft)
    tint = torch.tensor((1.0, 0.93, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    lift = torch.tensor((0.04, 0.02, 0.08), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (glow * tint + lift).clamp(0, 1)


_EMBOSS = [[-2.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]


def emboss(x: torch.Tensor) -> torch.Tensor:
    """Grey relief: the emboss kernel (dilation 2) on lightly blurred luma, around mid-grey."""
    g = gaussian_blur(luma(x), 1.0)
    return _gray3((0.5 + 1.2 * _conv_gray(g, _EMBOSS, dilation=2)).clamp(0, 1))


@dataclass(frozen=True)
class Edit:
    """One restyle: its exact target operation, the phrasings it is trained on, and held-out ones for evaluation."""

    name: str
    fn: EditFn
    phrasings: tuple[str, ...]
    held_out: tuple[str, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


#: Each edit's exact operation, by the name its phrasings go by in PHRASINGS_FILE.
EDIT_FUNCTIONS: dict[str, EditFn] = {
    "black_and_white": black_and_white,
    "sepia": sepia,
    "negative": negative,
    "pencil_sketch": pencil_sketch,
    "pop_art": pop_art,
    "warm_sunset": warm_sunset,
    "cold_winter": cold_winter,
    "thermal": thermal,
    "night_vision": night_vision,
    "cartoon": cartoon,
    "dreamy_blur": dreamy_blur,
    "emboss": emboss,
}

#: The edits' phrasings as data: handwritten, figurative, descriptors for the templates, held out.
PHRASINGS_FILE = Path(__file__).with_name("phrasings.json")


def load_edits(path: Path = PHRASINGS_FILE) -> tuple[Edit, ...]:
    """The edits in the file's order. Training phrasings: handwritten, figurative, then each adjective through
    each adjective template and each noun through each noun template, first occurrence kept (the order fixes
    what a seeded run samples)."""
    data = json.loads(path.read_text())
    if list(data["edits"]) != list(EDIT_FUNCTIONS):
        raise ValueError(f"{path} names edits {list(data['edits'])}; the operations are {list(EDIT_FUNCTIONS)}")
    adjective_templates, noun_templates = data["templates"]["adjective"], data["templates"]["noun"]
    edits = []
    for name, entry in data["edits"].items():
        generated = [t.format(a) for a in entry["adjectives"] for t in adjective_templates]
        generated += [t.format(n) for n in entry["nouns"] for t in noun_templates]
        phrasings = tuple(dict.fromkeys([*entry["handwritten"], *entry["figurative"], *generated]))
        edits.append(Edit(name, EDIT_FUNCTIONS[name], phrasings, tuple(entry["held_out"])))
    return tuple(edits)


EDITS: tuple[Edit, ...] = load_edits()
EDITS_BY_NAME: dict[str, Edit] = {edit.name: edit for edit in EDITS}


def get_edits(names: list[str] | None = None) -> tuple[Edit, ...]:
    """The named edits, in the given order (all of them when `names` is None)."""
    if names is None:
        return EDITS
    unknown = [n for n in names if n not in EDITS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown edits {unknown}; known: {sorted(EDITS_BY_NAME)}")
    return tuple(EDITS_BY_NAME[n] for n in names)


def all_prompts(edits: tuple[Edit, ...]) -> list[str]:
    """Every phrasing (training and held-out) of the given edits, plus the empty prompt, without repeats."""
    seen: dict[str, None] = {"": None}
    for edit in edits:
        for prompt in (*edit.phrasings, *edit.held_out):
            seen.setdefault(prompt, None)
    return list(seen)
