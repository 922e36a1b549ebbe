"""Decode one image file into a uint8 array, resize it, convert its channels: identical in training and serving.

A file counts as an image only if Pillow decodes it completely: extensions are not trusted, and truncated files are
rejected (which needs `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` off, Pillow's default).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# The formats kiln decodes. Pillow knows many more, some of which run external programs (EPS calls Ghostscript) or
# are rarely seen outside labs; a file in any other format is reported as unsupported. (Phone-camera multi-picture
# JPEGs open through the JPEG plugin too.)
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
Image.init()  # registers every plugin: Image.open(formats=...) looks formats up without loading them itself
# What Pillow raises for files that are not images or are damaged (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class UnreadableImage(ValueError):
    """The bytes are not a complete image Pillow can decode; the message says why."""


class ImageTooLarge(ValueError):
    """The image's header declares more pixels than allowed; nothing was decoded."""


def open_image(source: Path | bytes, max_pixels: int | None = None) -> np.ndarray:
    """One file (path or bytes) as uint8 [H, W, 1] for grayscale modes or [H, W, 3] for all others, EXIF-rotated.

    The pixel count is checked against `max_pixels` from the header, before any decoding, so a small file that
    unpacks to a huge image costs nothing. Raises ImageTooLarge or UnreadableImage.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                    f"{max_pixels:,}; send a smaller image"
                )
            image.load()  # decode everything now: a truncated file fails here, not as a half-grey image
            return _to_uint8(ImageOps.exif_transpose(image))
    except ImageTooLarge:
        raise
    except _DECODE_ERRORS as error:
        raise UnreadableImage(_reason(error)) from None


def decode_image(source: Path | bytes, image_size: int | None) -> np.ndarray | str:
    """Like open_image, resized to image_size x image_size when given; returns why the file cannot be used
    instead of raising."""
    try:
        pixels = open_image(source)
    except UnreadableImage as error:
        return str(error)
    if image_size is not None and pixels.shape[:2] != (image_size, image_size):
        pixels = resize(pixels, image_size)
    return pixels


def resize(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C] (or [height, width, C] for a pair), bilinear."""
    height, width = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return resized.reshape(height, width, pixels.shape[2])


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, 1|3] -> [H, W, channels]: grey is repeated into RGB; RGB becomes luminance (Pillow's "L")."""
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    return np.asarray(Image.fromarray(pixels).convert("L"))[..., None]


def fit_to_input(pixels: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Any uint8 [H, W, 1|3] image -> [height, width, channels], converted and resized as in training."""
    pixels = to_channels(pixels, channels)
    if pixels.shape[:2] != (height, width):
        pixels = resize(pixels, (height, width))
    return pixels


def _to_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PNG/TIFF): scale 0..65535 to 0..255; Pillow's convert("L") would clip instead.
        wide = np.asarray(image, dtype=np.float32)
        return np.clip(np.round(wide / 257), 0, 255).astype(np.uint8)[..., None]
    if image.mode in GRAYSCALE_MODES:
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def _reason(error: Exception) -> str:
    message = str(error).strip() or error.__class__.__name__
    if message.startswith("cannot identify image file"):
        return f"not an image in a supported format ({', '.join(FORMATS)})"
    if isinstance(error, OSError) and error.errno is not None:  # from the file system, not from decoding
        return f"cannot be read ({error.__class__.__name__}: {error.strerror})"
    return f"corrupt or truncated image ({error.__class__.__name__}: {message})"
