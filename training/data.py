"""Training images: bundled photos and real clip frames, split train/validation, drawn as augmented crops."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The shared clips (CC BY 4.0, Intel IoT DevKit sample videos): beside the checkout, or inside it elsewhere.
DEFAULT_MEDIA_DIR = next(
    (p for p in (REPO_ROOT.parent / "shared" / "media", REPO_ROOT / "shared" / "media") if p.is_dir()),
    REPO_ROOT.parent / "shared" / "media",
)
MEDIA_ATTRIBUTION = "Sample videos by Intel Corporation (intel-iot-devkit/sample-videos), CC BY 4.0"


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(filename) as f:
            from PIL import Image

            return np.asarray(Image.open(f).convert("RGB"))

    return load


#: Photos bundled with installed packages (no download), with where they come from and their licence.
PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "astronaut": (_skimage("astronaut"), "scikit-image data: NASA, public domain"),
    "coffee": (_skimage("coffee"), "scikit-image data: Rachel Michetti, CC0"),
    "chelsea": (_skimage("chelsea"), "scikit-image data: Stefan van der Walt, CC0"),
    "rocket": (_skimage("rocket"), "scikit-image data: NASA / SpaceX, public domain"),
    "motorcycle": (
        _skimage("stereo_motorcycle"),
        "scikit-image data: Middlebury 2014 stereo benchmark (Scharstein et al.), as redistributed by scikit-image",
    ),
    "camera": (_skimage("camera"), "scikit-image data: Lav Varshney, CC0 (greyscale)"),
    "coins": (_skimage("coins"), "scikit-image data: Brooklyn Museum, no known copyright restrictions (greyscale)"),
    "brick": (_skimage("brick"), "scikit-image data: CC0Textures, CC0 (greyscale)"),
    "grass": (_skimage("grass"), "scikit-image data: linolafett on DeviantArt, CC0 (greyscale)"),
    "gravel": (_skimage("gravel"), "scikit-image data: CC0Textures, CC0 (greyscale)"),
    "china": (_sklearn("china.jpg"), "scikit-learn sample images: danielbuechele on Flickr, CC BY 2.0"),
    "flower": (_sklearn("flower.jpg"), "scikit-learn sample images: vultilion on Flickr, CC BY 2.0"),
    "grace_hopper": (_matplotlib("grace_hopper.jpg"), "matplotlib sample data: US Navy photograph, public domain"),
}

DEFAULT_CLIPS = (
    "asl_again.mkv",
    "asl_bird.mkv",
    "asl_book.mkv",
    "asl_brother.mkv",
    "asl_eat.mkv",
    "asl_help.mkv",
    "asl_hungry.mkv",
    "asl_learn.mkv",
    "person_walk.mp4",
)


class DataConfig(BaseModel):
    """Which images to train on, which to hold out, and how crops are drawn and augmented."""

    model_config = ConfigDict(extra="forbid")

    media_dir: Path = Field(DEFAULT_MEDIA_DIR, description="Folder holding the clips.")
    photos: list[str] = Field(default_factory=lambda: list(PHOTOS), description="Bundled photos (keys of PHOTOS).")
    clips: list[str] = Field(default_factory=lambda: list(DEFAULT_CLIPS), description="Clip files in media_dir.")
    max_frames_per_clip: int = Field(120, ge=1, description="Frames kept per clip, evenly spaced.")
    video_reader: Literal["pyav", "opencv"] = Field(
        "pyav",
        description="What decodes the clips: PyAV (a dependency of the project) or OpenCV's FFmpeg, for a machine "
        "that has OpenCV but not PyAV (the lent GPU machine's image). Both give the same RGB frames of the shared "
        "clips (tests/test_training_data.py, where both are installed).",
    )
    val_photos: list[str] = Field(default_factory=lambda: ["chelsea"], description="Photos held out entirely.")
    val_clips: list[str] = Field(default_factory=lambda: ["asl_help.mkv"], description="Clips held out entirely.")
    val_tail: float = Field(
        0.15, ge=0.0, lt=1.0, description="Fraction at the end of every other clip held out (time-separated)."
    )
    val_frames_per_clip: int = Field(2, ge=1, description="Validation frames kept per clip (evenly spaced).")
    crop_size: int = Field(128, ge=16, description="Side of the square training crops (pixels, multiple of 8).")
    photo_probability: float = Field(0.4, ge=0.0, le=1.0, description="Chance a crop comes from a photo.")
    min_scale: float = Field(0.3, gt=0.0, le=1.0, description="Smallest resize factor of a source before cropping.")
    max_scale: float = Field(1.0, gt=0.0, le=2.0, description="Largest resize factor of a source before cropping.")
    brightness: float = Field(0.2, ge=0.0, le=1.0, description="Brightness jitter (± multiplicative).")
    contrast: float = Field(0.25, ge=0.0, le=1.0, description="Contrast jitter (± around the mean).")
    saturation: float = Field(0.35, ge=0.0, le=1.0, description="Saturation jitter (± around luma).")
    white_balance: float = Field(0.08, ge=0.0, le=0.5, description="Per-channel gain jitter.")
    gamma: float = Field(0.25, ge=0.0, le=1.0, description="Gamma jitter (log-uniform ±).")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        unknown = [p for p in self.photos + self.val_photos if p not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown photos {unknown}; known: {sorted(PHOTOS)}")
        if self.crop_size % 8:
            raise ValueError(f"crop_size must be a multiple of 8, got {self.crop_size}")
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} > max_scale {self.max_scale}")
        return self


@dataclass(frozen=True)
class SourceImage:
    """One RGB uint8 (H, W, 3) image and where it came from."""

    name: str
    pixels: np.ndarray
    kind: str  # "photo" or "clip"


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[..., :3]
    return np.ascontiguousarray(image.astype(np.uint8))


def read_clip(path: Path, max_frames: int, reader: Literal["pyav", "opencv"] = "pyav") -> list[np.ndarray]:
    """Up to `max_frames` evenly spaced RGB frames of a clip, decoded with PyAV (only those are converted) or
    OpenCV."""
    if reader == "opencv":
        return _read_clip_opencv(path, max_frames)
    import av

    with av.open(str(path)) as container:
        count = sum(1 for _ in container.decode(video=0))
    if not count:
        raise ValueError(f"{path} has no video frames")
    keep = set(np.linspace(0, count - 1, min(max_frames, count)).round().astype(int).tolist())
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in keep]


def _read_clip_opencv(path: Path, max_frames: int) -> list[np.ndarray]:
    """read_clip's frames through OpenCV: every frame is decoded once and kept (the shared clips are small)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"{path} has no video frames (or OpenCV cannot decode it)")
    keep = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    return [frames[i] for i in dict.fromkeys(keep.tolist())]


@dataclass
class ImageSplit:
    """Training and validation images."""

    train: list[SourceImage]
    val: list[SourceImage]


def load_split(config: DataConfig) -> ImageSplit:
    """Load every configured photo and clip; hold out the validation photos, clips and clip tails."""
    train: list[SourceImage] = []
    val: list[SourceImage] = []
    for name in dict.fromkeys(config.photos + config.val_photos):
        image = SourceImage(name, _rgb(PHOTOS[name][0]()), "photo")
        (val if name in config.val_photos else train).append(image)
    for clip in dict.fromkeys(config.clips + config.val_clips):
        path = config.media_dir / clip
        if not path.is_file():
            raise FileNotFoundError(f"clip {path} not found (set data.media_dir)")
        frames = read_clip(path, config.max_frames_per_clip, config.video_reader)
        held = len(frames) if clip in config.val_clips else int(round(len(frames) * config.val_tail))
        cut = len(frames) - held
        train += [SourceImage(f"{clip}#{i}", f, "clip") for i, f in enumerate(frames[:cut])]
        if held:
            k = min(config.val_frames_per_clip, held)
            if clip in config.val_clips:
                idx = np.linspace(0, len(frames) - 1, k)
            else:
                # Spread over the held-out tail, skipping its first frame (the neighbour of a training frame).
                idx = np.linspace(cut, len(frames) - 1, k + 1)[1:] if held > 1 else np.array([cut])
            picked = dict.fromkeys(idx.round().astype(int).tolist())
            val += [SourceImage(f"{clip}#{i}", frames[i], "clip") for i in picked]
    if not train:
        raise ValueError("no training images: every configured source is held out")
    return ImageSplit(train, val)


def service_view(image: np.ndarray, size: int) -> np.ndarray:
    """What the service feeds the editor: shorter side scaled to `size`, then a centred square crop (uint8)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    resized = Image.fromarray(image).resize(
        (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR
    )
    rw, rh = resized.size
    left, top = (rw - size) // 2, (rh - size) // 2
    return np.array(resized.crop((left, top, left + size, top + size)))


class CropSampler:
    """Draws augmented square crops (B, 3, S, S) in [0, 1] from the training images, with its own seeded RNG."""

    def __init__(self, images: list[SourceImage], config: DataConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        self.photos = [i for i in images if i.kind == "photo"]
        self.clips = [i for i in images if i.kind == "clip"]
        if not self.photos and not self.clips:
            raise ValueError("CropSampler needs at least one image")

    def _pick(self) -> SourceImage:
        use_photo = bool(self.photos) and (not self.clips or self.rng.random() < self.config.photo_probability)
        pool = self.photos if use_photo else self.clips
        return pool[int(self.rng.integers(len(pool)))]

    def _crop(self, image: np.ndarray) -> torch.Tensor:
        c = self.config
        size = c.crop_size
        h, w = image.shape[:2]
        # A scale below size/min(h, w) would need a region larger than the image: clamp to what fits.
        lo = max(c.min_scale, size / min(h, w))
        hi = max(c.max_scale, lo)
        scale = math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
        side = min(int(round(size / scale)), h, w)
        top = int(self.rng.integers(0, h - side + 1))
        left = int(self.rng.integers(0, w - side + 1))
        region = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
        region = region.permute(2, 0, 1)[None].float()
        if side != size:
            region = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.rng.random() < 0.5:
            region = region.flip(-1)
        return region[0]

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness, contrast, saturation, white balance and gamma, all in one batched pass."""
        c, r, b = self.config, self.rng, x.shape[0]

        def u(spread: float, n: int = 1) -> torch.Tensor:
            return torch.from_numpy(r.uniform(-spread, spread, (b, n))).float().view(b, n, 1, 1)

        x = x * (1 + u(c.brightness))
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + u(c.contrast)) + mean
        g = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = (x - g) * (1 + u(c.saturation)) + g
        x = x * (1 + u(c.white_balance, 3))
        return x.clamp(0, 1) ** torch.exp(u(c.gamma))

    def sample(self, batch_size: int) -> torch.Tensor:
        """`batch_size` augmented crops, float32 (B, 3, S, S) in [0, 1]."""
        crops = torch.stack([self._crop(self._pick().pixels) for _ in range(batch_size)]) / 255.0
        return self._jitter(crops.clamp(0, 1)).clamp(0, 1)


def validation_frames(split: ImageSplit, size: int) -> list[tuple[str, np.ndarray]]:
    """The held-out images as the service would see them: (name, uint8 (size, size, 3))."""
    return [(image.name, service_view(image.pixels, size)) for image in split.val]
