"""Images -> patches, as the reference's Gemma 4 image processor (PIL backend) makes them.

Steps, each as `Gemma4ImageProcessorPil` does it: RGB (transparency composited onto white); an aspect-preserving
bicubic resize to the largest size whose sides are multiples of `pooling_kernel_size * patch_size` (48) and whose
patch count fits `max_soft_tokens * k^2` (small images are scaled up); pixels / 255 with no mean/std; patches in
row-major order, each laid out (row, column, channel); (x, y) patch ids. `max_soft_tokens` (70, 140, 280, 560 or
1120) comes from the folder's `processor_config.json` (or `preprocessor_config.json`) unless the caller sets it.

Pillow decodes the files (the reference uses it too).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import IMAGE_SOFT_TOKEN_BUDGETS as SOFT_TOKEN_BUDGETS


class ImageError(ValueError):
    """An image cannot be read or used; the message names it."""


@dataclass(frozen=True)
class ImageSettings:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280

    def __post_init__(self):
        if self.max_soft_tokens not in SOFT_TOKEN_BUDGETS:
            raise ImageError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {self.max_soft_tokens}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def with_budget(self, max_soft_tokens: int | None) -> "ImageSettings":
        return self if max_soft_tokens is None else replace(self, max_soft_tokens=int(max_soft_tokens))

    @classmethod
    def from_folder(cls, folder, patch_size: int, pooling_kernel_size: int) -> "ImageSettings":
        """The folder's processor settings; the vision config's patch and kernel sizes where it names none."""
        found, source = {}, None
        for name, section in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            path = Path(folder) / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ImageError(f"{path}: not valid JSON ({e})") from None
            data = data.get(section) if section else data
            if isinstance(data, dict) and "max_soft_tokens" in data:
                found, source = data, path
                break
        settings = dict(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size)
        for key in ("patch_size", "pooling_kernel_size", "max_soft_tokens"):
            if key in found:
                settings[key] = found[key]
        try:
            return cls(**settings)
        except ImageError as e:
            raise ImageError(f"{source}: {e}") from None


@dataclass
class Patches:
    """One image's patches: `pixels` `[n, p*p*3]` float32 in [0, 1], `positions` `[n, 2]` (x, y), and the number of
    soft tokens it becomes."""

    pixels: np.ndarray
    positions: np.ndarray
    soft_tokens: int
    size: tuple[int, int]  # (height, width) after resizing

    def padded(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference's padded form: zero pixels and position (-1, -1) up to `length` patches."""
        n = len(self.pixels)
        pixels = np.zeros((length, self.pixels.shape[1]), dtype=np.float32)
        positions = np.full((length, 2), -1, dtype=np.int64)
        pixels[:n], positions[:n] = self.pixels, self.positions
        return pixels, positions


def describe(source) -> str:
    if isinstance(source, (str, Path)):
        text = str(source)
        return text[:40] + "..." if text.startswith("data:") and len(text) > 40 else text
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def open_image(source):
    """A decoded PIL image from a path, raw bytes, a `data:` URL or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    name = describe(source)
    if isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(f"image {name}: a data: URL must look like data:image/png;base64,<data>")
        try:
            source = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"image {name}: the data: URL is not valid base64") from None
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"image {name}: remote URLs are not fetched; download the image and pass its path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageError(f"image {name}: file not found")
        stream = path
    else:
        raise ImageError(f"image {name}: expected a path, bytes, a data: URL or a PIL image")
    try:
        image = Image.open(stream)
        image.load()  # decode now: a truncated file fails here, not deep inside the model
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {name}: cannot be decoded ({e})") from None
    return image


def to_rgb(image):
    """RGB as the reference converts it: anything with transparency is composited onto white first."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """The reference's `get_aspect_ratio_preserving_size`: the largest multiple-of-(k*patch) sides within the patch
    budget (a side that would round to zero becomes one block, the other capped at the budget's row)."""
    p, k = settings.patch_size, settings.pooling_kernel_size
    target_px = settings.max_patches * p * p
    factor = math.sqrt(target_px / (height * width))
    side = k * p
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"a {height}x{width} image cannot be resized to a non-empty grid of {side}-pixel blocks")
    longest = (settings.max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    return th, tw


def patchify(image, settings: ImageSettings) -> Patches:
    """Resize, rescale and cut one (RGB PIL) image into patches with their (x, y) ids."""
    from PIL import Image

    th, tw = target_size(image.height, image.width, settings)
    if (th, tw) != (image.height, image.width):
        image = image.resize((tw, th), resample=Image.Resampling.BICUBIC)
    p = settings.patch_size
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    pixels = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    ph, pw = th // p, tw // p
    pixels = pixels.reshape(3, ph, p, pw, p).transpose(1, 3, 2, 4, 0).reshape(ph * pw, p * p * 3)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    return Patches(pixels, positions, ph * pw // settings.pooling_kernel_size**2, (th, tw))


def process_image(source, settings: ImageSettings) -> Patches:
    """Read (path, bytes, data: URL or PIL image) and patchify one image."""
    image = open_image(source)
    try:
        rgb = to_rgb(image)
    except (OSError, ValueError) as e:
        raise ImageError(f"image {describe(source)}: cannot be converted to RGB ({e})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"image {describe(source)}: has no pixels")
    try:
        return patchify(rgb, settings)
    except ImageError as e:
        raise ImageError(f"image {describe(source)}: {e}") from None
