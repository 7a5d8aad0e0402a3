"""Every image mode becomes the right 8-bit RGB pixels (compared value by value).

Each expected array is computed here with numpy floats straight from the definition in
promptcam.data.images (e.g. round(v * 255 / 65535) half up), independently of its integer
arithmetic. Every file also passes validation's check.
"""

from __future__ import annotations

import numpy as np
import pytest
from ingest_corpus import noise, write_png16, write_tiff
from PIL import Image

from promptcam.data.images import (
    ImageSettings,
    ImageTooLarge,
    check_image,
    decode,
    load_image,
    to_rgb,
)

WHITE = (255, 255, 255)
TEAL = (0, 128, 128)


def half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.uint8)


def wide(values: np.ndarray) -> np.ndarray:
    """As float64 (uint16 arithmetic would overflow)."""
    return np.asarray(values, dtype=np.float64)


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey)[..., None], 3, axis=2)


def over(colour: np.ndarray, alpha: np.ndarray, background, value_range: float) -> np.ndarray:
    """c * a + b * (1 - a) in 8-bit units, a = alpha / value_range, c in value_range units."""
    a = alpha.astype(np.float64)[..., None] / value_range
    c = colour.astype(np.float64) * 255 / value_range
    return half_up(c * a + np.asarray(background, dtype=np.float64) * (1 - a))


def decoded(path, settings: ImageSettings | None = None) -> np.ndarray:
    settings = settings or ImageSettings()
    check = check_image(str(path), settings)
    assert check.found and check.problem is None, check.error
    image = decode(path, settings).image
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgb_is_unchanged(tmp_path):
    pixels = noise((5, 7, 3), 255, dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(decoded(tmp_path / "rgb.png"), pixels)


def test_grey_is_copied_to_three_channels(tmp_path):
    grey = noise((5, 7), 255, dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(decoded(tmp_path / "grey.png"), grey3(grey))


def test_bilevel_is_black_or_white(tmp_path):
    bits = noise((6, 9), 1, dtype=np.uint8).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    np.testing.assert_array_equal(decoded(tmp_path / "bits.png"), grey3(bits * 255))


@pytest.mark.parametrize("container", ["png", "tiff-little-endian", "tiff-big-endian"])
def test_16_bit_grey_is_scaled_by_the_full_range_not_clipped(tmp_path, container):
    grey = noise((4, 6), 65535, seed=1)
    grey[0, :3] = [0, 40000, 65535]
    if container == "png":
        path = tmp_path / "grey16.png"
        Image.fromarray(grey).save(path)  # Pillow writes 16-bit grey PNGs (mode I;16)
    else:
        path = write_tiff(tmp_path / "grey16.tif", grey, "<" if "little" in container else ">")
    assert Image.open(path).mode in {"I;16", "I;16B"}
    pixels = decoded(path)
    np.testing.assert_array_equal(pixels, grey3(half_up(wide(grey) * 255 / 65535)))
    assert pixels[0, :3, 0].tolist() == [0, 156, 255]  # a clip would make 40000 white


def test_32_bit_integer_mode_holding_16_bit_values(tmp_path):
    values = noise((3, 4), 65535, seed=2).astype(np.int32)
    image = to_rgb(Image.fromarray(values, "I"), ImageSettings())
    np.testing.assert_array_equal(np.asarray(image), grey3(half_up(wide(values) * 255 / 65535)))
    with pytest.raises(ValueError, match="beyond the 16-bit range"):
        to_rgb(Image.fromarray(np.array([[70000]], np.int32), "I"), ImageSettings())


@pytest.mark.parametrize("container", ["png", "tiff-little-endian", "tiff-big-endian"])
def test_48_bit_rgb_keeps_all_16_bits(tmp_path, container):
    rgb = noise((5, 4, 3), 65535, seed=3)
    rgb[0, 0] = [255, 0xFF00, 128 * 257]  # the high byte alone would give 0, 255, 128
    if container == "png":
        path = write_png16(tmp_path / "rgb48.png", rgb)
    else:
        path = write_tiff(tmp_path / "rgb48.tif", rgb, "<" if "little" in container else ">")
    pixels = decoded(path)
    np.testing.assert_array_equal(pixels, half_up(wide(rgb) * 255 / 65535))
    assert pixels[0, 0].tolist() == [1, 254, 128]


@pytest.mark.parametrize("container", ["png", "tiff"])
def test_64_bit_rgba_is_composited_at_16_bits(tmp_path, container):
    rgba = noise((4, 5, 4), 65535, seed=4)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    writer = write_png16 if container == "png" else write_tiff
    path = writer(tmp_path / f"rgba64.{container}", rgba)
    settings = ImageSettings(background=TEAL)
    pixels = decoded(path, settings)
    np.testing.assert_array_equal(pixels, over(rgba[..., :3], rgba[..., 3], TEAL, 65535))
    assert pixels[0, 0].tolist() == list(TEAL)


def test_16_bit_grey_with_alpha_is_within_one_level(tmp_path):
    # Pillow reads 16-bit grey+alpha PNGs only to 8 bits (documented: at most one level off).
    la = noise((4, 5, 2), 65535, seed=5)
    path = write_png16(tmp_path / "la16.png", la)
    exact = over(grey3(la[..., 0]), la[..., 1], WHITE, 65535)
    assert np.abs(decoded(path).astype(int) - exact.astype(int)).max() <= 1


def test_12_bit_data_in_16_bit_files(tmp_path):
    twelve = noise((4, 6), 4095, seed=6)
    twelve[0, 0] = 4095
    path = write_png16(tmp_path / "twelve.png", twelve)
    # Default: the container's full range (the PNG rule), so the picture is dark...
    np.testing.assert_array_equal(decoded(path), grey3(half_up(wide(twelve) * 255 / 65535)))
    assert check_image(str(path), ImageSettings()).low_bit_depth
    # ...unless sample_bits says the camera used 12 of the 16 bits.
    settings = ImageSettings(sample_bits=12)
    pixels = decoded(path, settings)
    np.testing.assert_array_equal(pixels, grey3(half_up(wide(twelve) * 255 / 4095)))
    assert pixels[0, 0, 0] == 255
    full = write_png16(tmp_path / "full.png", noise((4, 6), 65535, seed=7))
    assert not check_image(str(full), ImageSettings()).low_bit_depth


def test_cmyk(tmp_path):
    cmyk = noise((5, 6, 4), 255, seed=8, dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    np.testing.assert_array_equal(
        decoded(tmp_path / "cmyk.tif"), half_up((255 - c) * (255 - k) / 255)
    )


def palette_image(size=(6, 4), seed=9) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = noise((256, 3), 255, seed=seed, dtype=np.uint8)
    indices = noise((size[1], size[0]), 7, seed=seed + 1, dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    return image, palette, indices


def test_palette_is_looked_up(tmp_path):
    image, palette, indices = palette_image()
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(decoded(tmp_path / "palette.png"), palette[indices])


def test_palette_transparency_shows_the_background(tmp_path):
    image, palette, indices = palette_image(seed=11)
    image.save(tmp_path / "palette_t.png", transparency=3)
    assert Image.open(tmp_path / "palette_t.png").info["transparency"] == 3
    expected = np.where((indices == 3)[..., None], np.array(TEAL, np.uint8), palette[indices])
    np.testing.assert_array_equal(
        decoded(tmp_path / "palette_t.png", ImageSettings(background=TEAL)), expected
    )


def test_palette_with_alpha_band():
    _, palette, indices = palette_image(seed=13)
    alpha = noise(indices.shape, 255, seed=14, dtype=np.uint8)
    image = Image.frombytes("PA", indices.shape[::-1], np.stack([indices, alpha], -1).tobytes())
    image.putpalette(palette.tobytes())
    rgb = to_rgb(image, ImageSettings())
    np.testing.assert_array_equal(np.asarray(rgb), over(palette[indices], alpha, WHITE, 255))


@pytest.mark.parametrize("background", [WHITE, TEAL])
def test_rgba_is_composited_on_the_background(tmp_path, background):
    rgba = noise((5, 6, 4), 255, seed=15, dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = decoded(tmp_path / "rgba.png", ImageSettings(background=background))
    np.testing.assert_array_equal(pixels, over(rgba[..., :3], rgba[..., 3], background, 255))
    assert pixels[0, 0].tolist() == list(background)
    assert pixels[0, 1].tolist() == rgba[0, 1, :3].tolist()


def test_grey_with_alpha(tmp_path):
    la = noise((5, 6, 2), 255, seed=16, dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(
        decoded(tmp_path / "la.png"), over(grey3(la[..., 0]), la[..., 1], WHITE, 255)
    )


def test_float_images_in_0_to_1(tmp_path):
    values = np.random.default_rng(17).random((4, 5)).astype(np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    expected = grey3(half_up(values.astype(np.float64) * 255))
    np.testing.assert_array_equal(decoded(tmp_path / "float.tif"), expected)
    Image.fromarray(values * 1000, "F").save(tmp_path / "float_wide.tif")
    check = check_image(str(tmp_path / "float_wide.tif"), ImageSettings())
    assert check.problem == "unreadable" and "outside 0..1" in check.error


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, -1)),  # displayed after a clockwise quarter turn
        (8, lambda a: np.rot90(a, 1)),
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_exif_orientation_is_applied_after_conversion(tmp_path, orientation, turn, mode):
    stored = noise((4, 7, 3), 255, seed=18, dtype=np.uint8)
    if mode == "L":
        stored = stored[..., 0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    expected = turn(stored if mode == "RGB" else grey3(stored))
    pixels = decoded(tmp_path / "turned.png")
    np.testing.assert_array_equal(pixels, expected)
    assert check_image(str(tmp_path / "turned.png"), ImageSettings()).size == (
        pixels.shape[1],
        pixels.shape[0],
    )


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    settings = ImageSettings(max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        decode(tmp_path / "big.png", settings)
    check = check_image(str(tmp_path / "big.png"), settings)
    assert check.problem == "too large"
    assert decoded(tmp_path / "big.png", ImageSettings(max_pixels=1200)).shape == (30, 40, 3)


def test_large_non_jpeg_scans_are_shrunk_like_a_plain_bicubic_resize(tmp_path):
    y, x = np.mgrid[0:1600, 0:2400]
    pixels = np.stack([x * 255 // 2399, y * 255 // 1599, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    small = load_image(tmp_path / "scan.png", short_side=100)
    assert small.size == (150, 100)
    plain = Image.fromarray(pixels).resize((150, 100), Image.Resampling.BICUBIC)
    difference = np.abs(np.asarray(small).astype(int) - np.asarray(plain).astype(int))
    # Smooth channels agree to a level or two; the (x + y) % 256 saw-tooth is aliased by both.
    assert difference[..., :2].max() <= 2
