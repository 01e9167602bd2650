"""Image decoding, mode conversion and resizing to a backbone's input.

Every image ends as 8-bit grayscale (`L`) or RGB, whatever it was stored as:
palette, alpha, CMYK, 1-bit and 16-bit images included.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from spela_transfer.backbones import Preprocessing

# Background that transparent pixels are composited on. A fixed color keeps the
# features of an RGBA image independent of whatever its hidden RGB values were.
BACKGROUND_RGB = (255, 255, 255)
BACKGROUND_GRAY = 255

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL modes that store more than 8 bits per pixel in one integer channel.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImageError(ValueError):
    """An image file that is missing, not an image, or cannot be decoded."""


def open_image(path: str | Path, target_size: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image file.

    Args:
        path: Image file.
        target_size: Width and height the image will be resized to (at least). A JPEG
            more than twice that size is decoded at a reduced scale, which is several
            times faster than decoding at full size and then resizing.

    Raises:
        UnreadableImageError: The file is missing, truncated or not an image; the
            message names the path and the reason.
    """
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning would otherwise print once per worker.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            if target_size is not None and image.format == "JPEG":
                image.draft(image.mode, _draft_size(image.size, target_size))
            image.load()
    except FileNotFoundError as error:
        raise UnreadableImageError(f"{path}: file not found") from error
    except UnidentifiedImageError as error:
        raise UnreadableImageError(f"{path}: not a recognized image format") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{path}: cannot decode ({error})") from error
    return image


def _draft_size(size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    """Smallest size with the image's aspect ratio that covers `target_size`."""
    width, height = size
    scale = max(target_size[0] / width, target_size[1] / height)
    return math.ceil(width * scale), math.ceil(height * scale)


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL image to 8-bit RGB (`channels=3`) or grayscale `L` (`channels=1`).

    Alpha is composited on a white background; 16-bit and 32-bit integer images are
    scaled from their full range to 8 bits; CMYK, YCbCr, LAB and HSV go through RGB.
    """
    if image.mode in _WIDE_INTEGER_MODES:
        image = _wide_to_8bit(image)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")

    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = _composite(image)
    if channels == 1:
        return image if image.mode == "L" else image.convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    # 16-bit files decode as mode "I" in some Pillow versions, so the value range, not the
    # mode, decides: anything above 255 is taken as 16-bit.
    if array.max(initial=0) > 255:
        array = np.clip(array, 0, 65535).astype(np.uint32) >> 8
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")


def _composite(image: Image.Image) -> Image.Image:
    if image.mode in ("LA", "La"):
        background = Image.new("L", image.size, BACKGROUND_GRAY)
        background.paste(image.convert("L"), mask=image.getchannel("A"))
        return background
    background = Image.new("RGB", image.size, BACKGROUND_RGB)
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def resize_and_crop(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize and crop an `L` or RGB image as timm's eval transform does.

    Returns:
        The model input as uint8 `[H, W, C]`, before scaling and normalization.
    """
    _, height, width = preprocessing.input_size
    resample = RESAMPLING[preprocessing.interpolation]
    resize_width, resize_height = preprocessing.resize_size

    if preprocessing.crop_mode == "squash" or height != width:
        # timm resizes non-square inputs to the exact size before the crop.
        image = image.resize((resize_width, resize_height), resample)
    else:
        # Shorter side to the resize size, the longer one in proportion (as torchvision).
        short, long = sorted(image.size)
        new_short, new_long = resize_width, int(resize_width * long / short)
        new_size = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, resample)

    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    if (left, top, image.width, image.height) != (0, 0, width, height):
        image = image.crop((left, top, left + width, top + height))

    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array
