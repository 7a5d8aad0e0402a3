"""Decode any image file to the 8-bit RGB picture a person sees, or say why it cannot be.

One decoder serves validation (:func:`check_image`, a cheap reduced decode of every file)
and the shards (:func:`load_image`), so a file that passes validation also encodes.

Conversions to 8-bit RGB (values are rounded half up, never clipped to the top of the range):

- RGB: unchanged. L (grey) and 1 (bilevel): the grey value in all three channels (1 -> 0/255).
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``; ``I`` holding 16-bit values) and 16-bit RGB/RGBA
  (48/64-bit PNG and uncompressed TIFF): ``round(v * 255 / R)`` with R = 65535, the
  container's full range (so divided by 257). The exact 16-bit values are read: Pillow keeps
  only the high byte of 16-bit colour, so the file is decoded a second time for the low byte
  (formats where that is impossible keep the high byte: at most one level off).
- 12-bit (or 10-, 14-bit) data stored unscaled in 16-bit containers (scientific cameras) is
  scaled by the full 16-bit range like any 16-bit file, which makes it dark: the PNG standard
  requires 16-bit samples to span the full range, and scaling each image by its own maximum
  would make brightness differ between images. Set ``sample_bits`` (``dataset.sample_bits``)
  to scale by ``2**bits - 1`` instead (larger values are clipped); validation warns when
  16-bit images never exceed 4095.
- 32-bit float (``F``): values in 0..1 scale to 0..255; other ranges are refused (no
  convention says what they mean).
- CMYK: ``R = (255 - C) * (255 - K) / 255`` (likewise G, B; no colour management; Adobe's
  inverted CMYK JPEGs are un-inverted by the decoder).
- Palette (``P``): looked up; with a transparent index or an RGBA palette treated as RGBA.
- Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, 16-bit ``RGBA``): composited on ``background``
  (default white): ``round(c * a + b * (1 - a))`` with ``a`` the alpha as a fraction.
- Other modes (YCbCr, HSV, LAB...): Pillow's conversion to RGB.
- EXIF orientation: applied after conversion, so the picture is upright.

Limits: a file with more than ``max_pixels`` pixels is refused before decoding (Pillow's
decompression-bomb check, set to that limit); truncated files always fail
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is set False: a half-grey picture must never pass).
JPEGs are decoded at a reduced DCT scale when that still covers the target size; other large
images are shrunk with a reducing gap (fast and visually the same).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

EXIF_ORIENTATION = 0x0112
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N"}
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
# Single-channel modes whose pixel values are the mask values (a bitmask must survive as is).
MASK_MODES = {"L", "P", "1"}
# Pillow's own hard limit (2 x its warning threshold of 89,478,485 pixels).
DEFAULT_MAX_PIXELS = 178_956_970
FULL_16_BIT = 65535
LOW_BIT_DEPTH = 4096  # 16-bit images below this use at most 12 bits
# Resize in two steps (integer reduce, then bicubic) when shrinking more than 2x this.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class ImageSettings:
    """How files become 8-bit RGB (see the module docstring)."""

    background: tuple[int, int, int] = (255, 255, 255)
    sample_bits: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(f"background must be three values in 0..255: {self.background}")
        if self.sample_bits is not None and not 1 <= self.sample_bits <= 16:
            raise ValueError(f"sample_bits must be in 1..16 or None: {self.sample_bits}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1: {self.max_pixels}")

    @classmethod
    def from_mapping(cls, mapping: dict) -> ImageSettings:
        """From the config's (JSON-like) values: the background may be a list."""
        return cls(**{**mapping, "background": tuple(mapping.get("background", (255,) * 3))})

    @property
    def sample_range(self) -> int:
        return FULL_16_BIT if self.sample_bits is None else 2**self.sample_bits - 1


class ImageTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Decoded:
    """An image as displayed, 8-bit RGB, and the largest raw value of a 16-bit source."""

    image: Image.Image
    max_16_bit: int | None = None
    orientation: int = 1  # EXIF orientation (already applied to ``image``)


def open_image(path: str | os.PathLike, max_pixels: int) -> ImageFile.ImageFile:
    """Open (header only) with truncated files failing and a pixel limit of ``max_pixels``."""
    # Module settings of Pillow, set on every open so that no other code's choice leaks in.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageTooLarge(str(error)) from None
    width, height = image.size
    if width * height > max_pixels:  # formats that skip Pillow's check
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels exceed the limit of {max_pixels}")
    return image


def displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of a stored ``size`` after EXIF orientation."""
    width, height = size
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


def _rounded_ratio(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """round(numerator / denominator) half up, for non-negative integers."""
    return (2 * numerator + denominator) // (2 * denominator)


def scale_to_8_bit(values: np.ndarray, sample_range: int) -> np.ndarray:
    """round(v * 255 / sample_range), clipped to 0..255 (values above the range clip)."""
    values = np.clip(values.astype(np.int64), 0, sample_range)
    return _rounded_ratio(values * 255, sample_range).astype(np.uint8)


def composite(rgba: np.ndarray, background: tuple[int, int, int], value_range: int) -> np.ndarray:
    """RGB of ``rgba`` (values in 0..value_range) over ``background`` (8-bit), as 8-bit."""
    colour = rgba[..., :3].astype(np.int64)
    alpha = rgba[..., 3:].astype(np.int64)
    ground = np.asarray(background, dtype=np.int64) * value_range // 255  # exact: 255 | 65535
    mixed = colour * alpha + ground * (value_range - alpha)  # in value_range**2 units
    return _rounded_ratio(mixed * 255, value_range * value_range).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


def _palette_has_alpha(image: Image.Image) -> bool:
    return "transparency" in image.info or (
        image.palette is not None and image.palette.mode == "RGBA"
    )


def to_rgb(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """A loaded image with 8-bit storage (or 16-bit grey, or float) as 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("L", "1"):
        return image.convert("RGB")
    if mode in SIXTEEN_BIT_GREY or mode == "I":
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > FULL_16_BIT):
            raise ValueError("32-bit integer pixels beyond the 16-bit range: export 8 or 16-bit")
        return _grey_to_rgb(scale_to_8_bit(values, settings.sample_range))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError("float pixels outside 0..1: export as 8 or 16-bit")
        return _grey_to_rgb(np.floor(values * 255 + 0.5).astype(np.uint8))
    if mode == "CMYK":
        cmyk = np.asarray(image).astype(np.int64)
        ink = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:])
        return Image.fromarray(_rounded_ratio(ink, 255).astype(np.uint8), "RGB")
    if mode in ALPHA_MODES or (mode == "P" and _palette_has_alpha(image)):
        rgba = np.asarray(image.convert("RGBA"))
        return Image.fromarray(composite(rgba, settings.background, 255), "RGB")
    return image.convert("RGB")


def _wide_rawmode(image: ImageFile.ImageFile) -> str | None:
    """The raw mode of 16-bit colour that Pillow decodes to its high byte (e.g. RGB;16B)."""
    if image.mode not in ("RGB", "RGBA") or len(image.tile) == 0:
        return None
    rawmodes = {_rawmode(tile) for tile in image.tile}
    if len(rawmodes) != 1:
        return None
    rawmode = rawmodes.pop()
    if rawmode in (f"{image.mode};16B", f"{image.mode};16L", f"{image.mode};16N"):
        return rawmode
    return None


def _rawmode(tile: ImageFile._Tile) -> str:
    return tile.args if isinstance(tile.args, str) else tile.args[0]


def _with_rawmode(tile: ImageFile._Tile, rawmode: str) -> ImageFile._Tile:
    if isinstance(tile.args, str):
        return tile._replace(args=rawmode)
    return tile._replace(args=(rawmode, *tile.args[1:]))


def _byte_swapped(rawmode: str) -> str:
    """The same raw mode with the other byte order (``RGB;16B`` <-> ``RGB;16L``)."""
    base, order = rawmode[:-1], rawmode[-1]
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    return base + ("B" if order == "L" else "L")


def _low_bytes(path: str | os.PathLike, rawmode: str, settings: ImageSettings) -> np.ndarray:
    """The low byte of every 16-bit sample: the same stream decoded with the other byte order."""
    with open_image(path, settings.max_pixels) as image:
        image.tile = [_with_rawmode(tile, _byte_swapped(rawmode)) for tile in image.tile]
        image.load()
        return np.asarray(image)


def _wide_to_rgb(values: np.ndarray, settings: ImageSettings) -> Image.Image:
    """16-bit RGB or RGBA values as 8-bit RGB (alpha composited on the background)."""
    values = np.clip(values, 0, settings.sample_range)
    if values.shape[-1] == 4:
        rgb = composite(values, settings.background, settings.sample_range)
    else:
        rgb = scale_to_8_bit(values, settings.sample_range)
    return Image.fromarray(rgb, "RGB")


def decode(
    path: str | os.PathLike, settings: ImageSettings, draft: tuple[int, int] | None = None
) -> Decoded:
    """The file as displayed, 8-bit RGB; ``draft``: a size the JPEG decoder may reduce to."""
    with open_image(path, settings.max_pixels) as image:
        if draft is not None:
            # JPEG only: decode at a reduced DCT scale that still covers ``draft``.
            image.draft("RGB", draft)
        wide = _wide_rawmode(image)  # before anything loads the image and drops its tiles
        image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        max_16_bit = None
        if wide is not None:
            high = np.asarray(image).astype(np.int64)
            try:
                low = _low_bytes(path, wide, settings)
            except (OSError, ValueError):  # a codec that cannot swap: replicate the high byte
                low = high
            values = high * 256 + low
            rgb = _wide_to_rgb(values, settings)
            max_16_bit = int(values[..., :3].max()) if values.size else 0
        else:
            if image.mode in SIXTEEN_BIT_GREY or image.mode == "I":
                max_16_bit = int(np.asarray(image).max()) if image.size[0] * image.size[1] else 0
            rgb = to_rgb(image, settings)
    if orientation in TRANSPOSES:
        rgb = rgb.transpose(TRANSPOSES[orientation])
    return Decoded(rgb, max_16_bit, orientation)


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``size`` scaled so its short side is ``short_side``; unchanged if already smaller."""
    width, height = size
    scale = short_side / min(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(
    path: str | os.PathLike, short_side: int, settings: ImageSettings | None = None
) -> Image.Image:
    """The image as displayed, 8-bit RGB, short side at most ``short_side`` (never enlarged)."""
    # The request is square, so it covers the target whatever the orientation.
    image = decode(path, settings or ImageSettings(), draft=(short_side, short_side)).image
    size = resized_size(image.size, short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Image.Image:
    """The mask's raw values as an 8-bit image of ``size`` (NEAREST keeps bit values intact)."""
    with Image.open(path) as mask:
        orientation = mask.getexif().get(EXIF_ORIENTATION, 1)
        values = Image.fromarray(np.asarray(mask).astype(np.uint8))  # 2-D uint8: mode L
    if orientation in TRANSPOSES:
        values = values.transpose(TRANSPOSES[orientation])
    if values.size == size:
        return values
    return values.resize(size, Image.Resampling.NEAREST)


@dataclass(frozen=True)
class ImageCheck:
    """What validation learnt about one file."""

    found: bool
    problem: str | None = None  # kind: "unreadable" or "too large"
    error: str | None = None  # why it failed
    size: tuple[int, int] | None = None  # (width, height) as displayed
    mode: str | None = None
    max_16_bit: int | None = None

    @property
    def low_bit_depth(self) -> bool:
        return self.max_16_bit is not None and self.max_16_bit < LOW_BIT_DEPTH


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def check_image(path: str, settings: ImageSettings) -> ImageCheck:
    """Open, verify and decode ``path`` (JPEG at 1/8 scale) through the shards' own decoder."""
    if not Path(path).is_file():
        return ImageCheck(found=False)
    try:
        with open_image(path, settings.max_pixels) as image:
            size, mode = image.size, image.mode
            image.verify()  # checksums (PNG CRCs) that decoding alone does not look at
        decoded = decode(path, settings, draft=(1, 1))
        size = displayed_size(size, decoded.orientation)
    except ImageTooLarge as error:
        return ImageCheck(found=True, problem="too large", error=str(error))
    except Exception as error:  # Pillow raises many types for corrupt files
        return ImageCheck(found=True, problem="unreadable", error=_describe(error))
    return ImageCheck(found=True, size=size, mode=mode, max_16_bit=decoded.max_16_bit)


def check_mask(path: str, settings: ImageSettings) -> ImageCheck:
    """Open, verify and decode a mask (its values are kept as they are, not converted)."""
    if not Path(path).is_file():
        return ImageCheck(found=False)
    try:
        with open_image(path, settings.max_pixels) as image:
            mode = image.mode
            image.verify()
        with open_image(path, settings.max_pixels) as image:
            image.load()
            size = displayed_size(image.size, image.getexif().get(EXIF_ORIENTATION, 1))
    except ImageTooLarge as error:
        return ImageCheck(found=True, problem="too large", error=str(error))
    except Exception as error:
        return ImageCheck(found=True, problem="unreadable", error=_describe(error))
    return ImageCheck(found=True, size=size, mode=mode)
