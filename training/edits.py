"""The default editor's restyles: exact classical image operations on torch batches, each with its phrasings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# Templates that turn an edit's descriptors into many more training phrasings (held-out ones stay unseen).
_ADJECTIVE_TEMPLATES = (
    "make it {}",
    "make it look {}",
    "turn it {}",
    "make the image {}",
    "make everything {}",
    "{} please",
    "can you make it {}",
    "i want it {}",
    "make the video {}",
    "{}",
)
_NOUN_TEMPLATES = (
    "turn it into {}",
    "make it look like {}",
    "make it {}",
    "convert it to {}",
    "transform it into {}",
    "make this {}",
    "{}",
    "show it as {}",
    "{} style",
    "i want {}",
)

# Per edit: adjectives and noun phrases that describe it (none repeats a held-out phrasing's key words).
_DESCRIPTORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "black_and_white": (
        ("black and white", "monochrome", "grayscale", "greyscale", "colorless", "black-and-white"),
        ("a black and white photo", "a grayscale picture", "a monochrome image", "an old black and white movie"),
    ),
    "sepia": (
        ("sepia", "sepia toned", "vintage", "antique", "old-fashioned", "aged"),
        ("an old photograph", "a sepia photo", "a vintage photograph", "an antique picture", "a photo from the 1920s"),
    ),
    "negative": (
        ("inverted", "negative", "color inverted", "colour inverted", "reversed"),
        ("a negative", "a photo negative", "a film negative", "an inverted image"),
    ),
    "pencil_sketch": (
        ("sketched", "pencil drawn", "hand drawn", "drawn in graphite"),
        ("a pencil sketch", "a pencil drawing", "a graphite drawing", "a charcoal sketch", "a sketchbook page"),
    ),
    "pop_art": (
        ("pop art", "posterized", "warhol style", "flat and colorful", "comic-book colored"),
        ("pop art", "a warhol print", "a screen print", "a poster with bold flat colors"),
    ),
    "warm_sunset": (
        ("warm", "golden", "sunset colored", "orange tinted", "warmer", "sun-kissed"),
        ("a sunset", "golden hour", "a warm summer evening", "warm orange light", "a sunset photo"),
    ),
    "cold_winter": (
        ("cold", "wintry", "chilly", "blue tinted", "colder", "freezing"),
        ("winter", "a cold winter day", "a snowy scene", "a cold blue photo", "the arctic"),
    ),
    "thermal": (
        ("thermal", "infrared", "heat-mapped", "false colored"),
        ("a thermal image", "a heat map", "an infrared photo", "a thermal camera view", "a thermogram"),
    ),
    "night_vision": (
        ("night vision", "night-vision green", "like night vision"),
        ("night vision", "a night vision camera", "a night vision goggles view", "a green night scope image"),
    ),
    "cartoon": (
        ("cartoonish", "animated", "cel shaded", "comic style", "toon shaded"),
        ("a cartoon", "an animation still", "a comic strip", "a cartoon drawing", "an anime frame"),
    ),
    "dreamy_blur": (
        ("dreamy", "blurry", "soft", "glowing", "ethereal", "out of focus"),
        ("a dream", "soft focus", "a blurry dream", "a glowing soft photo", "a dreamscape"),
    ),
    "emboss": (
        ("embossed", "engraved", "carved", "stamped", "in relief"),
        ("a relief", "a stone carving", "a bas-relief", "embossed metal", "an engraving"),
    ),
}


# Per edit: phrasings that describe it by its effect or by a comparison, which no template produces. v1 learnt
# only descriptor words and missed both metaphorical held-out phrasings (emboss "…grey clay", B&W "drain the
# colour…"); these teach the same kind of wording without using a held-out phrasing's key words.
_FIGURATIVE: dict[str, tuple[str, ...]] = {
    "black_and_white": (
        "take every colour away",
        "wash all the colour out",
        "strip out the colours",
        "only shades of grey",
        "like an old newspaper photo",
        "leave only light and shadow",
        "as if colour had never been invented",
    ),
    "sepia": (
        "make it look a hundred years old",
        "like a yellowed old print",
        "as if it were found in an attic",
        "a tea-stained old photo",
        "like a photo from the wild west",
    ),
    "negative": (
        "turn light into dark and dark into light",
        "like looking at undeveloped film",
        "make the darks bright and the brights dark",
        "every colour turned inside out",
        "the opposite of every colour",
    ),
    "pencil_sketch": (
        "draw it in graphite on white paper",
        "like a drawing in a notebook",
        "make it look scribbled with a pencil",
        "a quick hand sketch",
        "shade it like a pencil portrait",
    ),
    "pop_art": (
        "make it loud like a comic cover",
        "bright primary colours only",
        "like a silkscreen in bold inks",
        "make it look like a lichtenstein painting",
        "punchy saturated flat colours",
    ),
    "warm_sunset": (
        "make it feel like a beach at dusk",
        "add a golden summer glow",
        "like the light just before the sun goes down",
        "make it honey coloured",
        "give it a warm glow",
    ),
    "cold_winter": (
        "make it feel like a snowstorm",
        "as if it were freezing outside",
        "like a scene from the north pole",
        "give it a frozen blue chill",
        "make it look like an ice palace",
    ),
    "thermal": (
        "show me where it is hot and cold",
        "like a firefighter's heat camera",
        "make people glow by their body heat",
        "heat vision",
        "make it look like an infrared heat picture",
    ),
    "night_vision": (
        "like spy camera footage at night",
        "see in the dark with green goggles",
        "make it look like a night-time surveillance camera",
        "green tinted low light view",
        "like a nighttime security camera",
    ),
    "cartoon": (
        "make it look hand-animated",
        "like a frame from a kids' cartoon show",
        "turn the people into cartoon characters",
        "give it bold outlines and flat colours",
        "like a comic book panel",
    ),
    "dreamy_blur": (
        "make it look like a fairy tale",
        "like a soft glowing dream sequence",
        "make it fuzzy and heavenly",
        "blur it like a daydream",
        "give it a soft halo of light",
    ),
    "emboss": (
        "make it look like a coin",
        "sculpt it out of stone",
        "raise it off the surface like a medal",
        "make it look like a plaster cast",
        "mould it in grey metal",
        "like an engraving on a coin",
    ),
}


def _phrasings(name: str, handwritten: tuple[str, ...]) -> tuple[str, ...]:
    """The handwritten phrasings first (the first is the canonical one), the figurative ones, then the templated."""
    adjectives, nouns = _DESCRIPTORS[name]
    generated = [t.format(a) for a in adjectives for t in _ADJECTIVE_TEMPLATES]
    generated += [t.format(n) for n in nouns for t in _NOUN_TEMPLATES]
    return tuple(dict.fromkeys([*handwritten, *_FIGURATIVE[name], *generated]))


EDITS: tuple[Edit, ...] = (
    Edit(
        "black_and_white",
        black_and_white,
        _phrasings(
            "black_and_white",
            (
                "make it black and white",
                "turn it black and white",
                "black and white please",
                "convert to grayscale",
                "make it grayscale",
                "remove all the colors",
                "make it monochrome",
                "a black and white photo",
                "desaturate it completely",
                "turn it into a noir film",
                "make it look like a black-and-white movie",
            ),
        ),
        ("drain the colour out of the picture", "classic monochrome film look"),
    ),
    Edit(
        "sepia",
        sepia,
        _phrasings(
            "sepia",
            (
                "make it look like an old photograph",
                "sepia please",
                "make it sepia",
                "apply a sepia tone",
                "turn it into an old photo",
                "make it vintage",
                "make it look antique",
                "give it a nineteenth century photo look",
                "an old faded brown photograph",
                "make it look like a photo from 1900",
                "add an old-timey sepia filter",
            ),
        ),
        ("make it look like a faded picture from grandma's album", "retro brownish photo"),
    ),
    Edit(
        "negative",
        negative,
        _phrasings(
            "negative",
            (
                "make it a negative",
                "invert the colors",
                "invert it",
                "turn it into a photo negative",
                "show the film negative",
                "reverse all the colours",
                "make an inverted image",
                "color inversion",
                "flip the colors to their opposites",
                "like a negative film strip",
            ),
        ),
        ("swap every colour for its opposite", "photographic negative"),
    ),
    Edit(
        "pencil_sketch",
        pencil_sketch,
        _phrasings(
            "pencil_sketch",
            (
                "make it a pencil sketch",
                "turn it into a pencil drawing",
                "draw it with a pencil",
                "make it look like a sketch",
                "a graphite sketch",
                "sketch it",
                "make a pencil drawing of it",
                "turn this into a hand-drawn sketch",
                "make it look drawn in pencil on paper",
                "charcoal sketch style",
            ),
        ),
        ("an artist's rough pencil study", "convert it to a line sketch"),
    ),
    Edit(
        "pop_art",
        pop_art,
        _phrasings(
            "pop_art",
            (
                "make it pop art",
                "pop art style",
                "posterize it",
                "make it look like a warhol print",
                "turn it into a poster with bold colors",
                "make it comic book pop art",
                "bold flat saturated colours",
                "make it look like a screen print",
                "andy warhol style",
                "make the colors loud and flat",
            ),
        ),
        ("a vivid posterized print", "sixties pop-art poster"),
    ),
    Edit(
        "warm_sunset",
        warm_sunset,
        _phrasings(
            "warm_sunset",
            (
                "make it warm like a sunset",
                "give it a warm sunset tone",
                "golden hour lighting",
                "make it look like sunset",
                "warm it up",
                "make the colors warmer",
                "add an orange glow",
                "make it look like evening sunlight",
                "warm golden tones",
                "make it feel like a summer evening",
            ),
        ),
        ("bathe it in late afternoon sun", "a cosy warm colour grade"),
    ),
    Edit(
        "cold_winter",
        cold_winter,
        _phrasings(
            "cold_winter",
            (
                "make it cold like winter",
                "give it a cold winter tone",
                "make it look icy",
                "cool the colors down",
                "make it blue and cold",
                "make it look like a frozen winter day",
                "add a chilly blue tint",
                "make it feel freezing",
                "arctic color grade",
                "make the colors colder",
            ),
        ),
        ("a frosty january morning look", "icy blue colour grade"),
    ),
    Edit(
        "thermal",
        thermal,
        _phrasings(
            "thermal",
            (
                "make it look like a thermal camera",
                "thermal imaging",
                "show it as a heat map",
                "infrared thermal vision",
                "make it a thermal image",
                "false color heat camera",
                "like a predator heat vision",
                "show the temperature colors",
                "thermographic camera view",
                "make it look like a FLIR camera",
            ),
        ),
        ("see it through a heat-sensing camera", "thermal scan"),
    ),
    Edit(
        "night_vision",
        night_vision,
        _phrasings(
            "night_vision",
            (
                "make it night vision",
                "night vision goggles",
                "make it look like night vision",
                "green night vision camera",
                "show it through night vision",
                "military night vision look",
                "make it green like a night scope",
                "low light green camera",
                "view it with night vision glasses",
                "make it look like a night camera",
            ),
        ),
        ("as seen through a soldier's night-sight", "green phosphor night view"),
    ),
    Edit(
        "cartoon",
        cartoon,
        _phrasings(
            "cartoon",
            (
                "make it a cartoon",
                "turn it into a cartoon",
                "cartoon style",
                "make it look animated",
                "make it look like a comic",
                "cel shaded cartoon",
                "draw it as a cartoon with black outlines",
                "make it look like an animated movie",
                "toon style",
                "turn this into a comic strip",
            ),
        ),
        ("make it look like a saturday morning cartoon", "flat colours with ink outlines"),
    ),
    Edit(
        "dreamy_blur",
        dreamy_blur,
        _phrasings(
            "dreamy_blur",
            (
                "make it dreamy",
                "add a dreamy blur",
                "soft focus",
                "make it soft and glowing",
                "give it a dream-like glow",
                "make it blurry and dreamy",
                "add a soft glow",
                "make it look like a dream",
                "hazy romantic soft focus",
                "make it ethereal",
            ),
        ),
        ("like a hazy memory", "a soft misty glow"),
    ),
    Edit(
        "emboss",
        emboss,
        _phrasings(
            "emboss",
            (
                "emboss it",
                "make it embossed",
                "apply an emboss filter",
                "make it look like a relief",
                "carve it in stone",
                "make it look like embossed metal",
                "turn it into a grey relief",
                "make it look stamped into paper",
                "bas-relief style",
                "make it look engraved",
            ),
        ),
        ("press it into a sheet of grey clay", "an embossed grey surface"),
    ),
)

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
