"""Bad image folders, through the download stage's pure function: a DataError naming the folder or file and the fix,
a file skipped and reported in skipped.csv, or an unusual but valid image decoded to the right pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kiln.dataset import read_dataset
from kiln.errors import DataError
from tasks.download import download
from tests.bad_inputs.conftest import (
    assert_published_complete,
    fails_cleanly,
    image_file,
    imagefolder,
    pixels_of,
    skipped_reasons,
    two_classes,
    write_tree,
)

NEEDS_TWO_CLASSES = (
    "a classifier needs at least two: put images in one folder per class (<class>/*.jpg), optionally under train/ "
    "and test/"
)
REMOVE_OR_ADD = "remove it or add images"
NOT_AN_IMAGE = "not an image in a supported format (PNG, JPEG, BMP, GIF, WEBP, TIFF)"


def png_with_broken_pixel_data() -> bytes:
    """A PNG whose signature and header are intact but whose compressed pixel data is garbage."""
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    png = buffer.getvalue()
    pixel_data = png.index(b"IDAT") + 4
    return png[:pixel_data] + b"\xff" * 20 + png[pixel_data + 20 :]


# --- DataError ------------------------------------------------------------------------------------------------------
def test_dataset_path_missing(store, tmp_path):
    missing = tmp_path / "photos"
    with fails_cleanly(store.root, DataError,
                       f"data.uri {missing} does not exist",
                       "pass an existing folder, a .tar.gz, .tgz, .tar or .zip archive, CSV manifest or URL"):  # fmt: skip
        download(imagefolder(missing), store)


def test_empty_dataset_folder(store, tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    with fails_cleanly(store.root, DataError, f"{empty} has 0 class folder(s) (none)", NEEDS_TWO_CLASSES):
        download(imagefolder(empty), store)


def test_one_class_only(store, tmp_path):
    folder = write_tree(tmp_path / "cats", {f"cat/{index}.png": image_file(index) for index in range(4)})
    with fails_cleanly(store.root, DataError, f"{folder} has 1 class folder(s) (cat)", NEEDS_TWO_CLASSES):
        download(imagefolder(folder), store)


def test_class_folder_with_no_images(store, tmp_path):
    folder = write_tree(tmp_path / "pets", two_classes())
    (folder / "fish").mkdir()
    with fails_cleanly(store.root, DataError, f"class folder 'fish' in {folder} is empty; {REMOVE_OR_ADD}"):
        download(imagefolder(folder), store)


def test_class_folder_whose_only_file_is_a_corrupt_image(store, tmp_path):
    folder = write_tree(tmp_path / "pets", {**two_classes(), "fish/0.png": png_with_broken_pixel_data()})
    with fails_cleanly(
        store.root, DataError,
        f"class folder 'fish' in {folder} has no usable images",
        "(e.g. fish/0.png: corrupt or truncated image (OSError: broken data stream when reading image file))",
        REMOVE_OR_ADD,
    ):  # fmt: skip
        download(imagefolder(folder), store)


def test_images_of_mixed_sizes(store, tmp_path):
    folder = write_tree(tmp_path / "pets", {**two_classes(), "dog/wide.png": image_file(90, size=(12, 6))})
    with fails_cleanly(
        store.root, DataError,
        "images have different sizes, e.g. cat/0.png is 8x8 and dog/wide.png is 12x6 (width x height)",
        "pass --set data.image_size=N to resize all to NxN",
    ):  # fmt: skip
        download(imagefolder(folder), store)


# --- accepted after conversion --------------------------------------------------------------------------------------
def test_images_of_mixed_sizes_with_image_size_set(store, tmp_path):
    wide = Image.new("RGB", (12, 6), (10, 220, 10))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    folder = write_tree(tmp_path / "pets", {**two_classes(), "dog/wide.png": buffer.getvalue()})

    ref = download(imagefolder(folder, image_size=16), store)

    directory = assert_published_complete(store, ref)
    dataset = read_dataset(directory)
    assert dataset.image_shape == (16, 16, 3)
    assert len(dataset.train_labels) + len(dataset.test_labels) == 7  # every image kept, none skipped
    assert skipped_reasons(directory) == {}
    assert np.all(pixels_of(directory, "dog/wide.png") == (10, 220, 10))  # a flat image stays flat when resized


def test_grayscale_mixed_with_rgb(store, tmp_path):
    files = {**two_classes(), "cat/grey.png": image_file(77, mode="L")}
    folder = write_tree(tmp_path / "pets", files)

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    assert read_dataset(directory).image_shape == (8, 8, 3)
    assert np.all(pixels_of(directory, "cat/grey.png") == (77, 77, 77))  # grey repeated into R, G and B
    assert np.all(pixels_of(directory, "cat/0.png") == (200, 30, 30))  # colour images untouched


# --- reported skips -------------------------------------------------------------------------------------------------
def test_non_image_file_is_skipped(store, tmp_path):
    folder = write_tree(tmp_path / "pets", {**two_classes(), "dog/notes.png": b"my notes, not a picture"})

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    assert skipped_reasons(directory) == {"dog/notes.png": NOT_AN_IMAGE}
    assert store.manifest(ref).metrics["skipped_files"] == 1
    dataset = read_dataset(directory)
    assert len(dataset.train_labels) + len(dataset.test_labels) == 6


def test_truncated_jpeg_is_skipped(store, tmp_path):
    jpeg = image_file((90, 20, 30), fmt="JPEG")
    folder = write_tree(tmp_path / "pets", {**two_classes(), "cat/cut.jpg": jpeg[: len(jpeg) // 2]})

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    assert skipped_reasons(directory) == {"cat/cut.jpg": "corrupt or truncated image (OSError: Truncated File Read)"}
    assert store.manifest(ref).metrics["skipped_files"] == 1
    dataset = read_dataset(directory)
    assert len(dataset.train_labels) + len(dataset.test_labels) == 6


# --- unusual encodings, decoded correctly ----------------------------------------------------------------------------
def test_cmyk_jpeg_is_decoded_to_rgb(store, tmp_path):
    red_in_cmyk = image_file((0, 255, 255, 0), mode="CMYK", fmt="JPEG", quality=95)
    folder = write_tree(tmp_path / "pets", {**two_classes(), "cat/cmyk.jpg": red_in_cmyk})

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    pixels = pixels_of(directory, "cat/cmyk.jpg")
    assert pixels.shape == (8, 8, 3)
    assert np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 3  # red, not its inverse (JPEG is lossy: a tolerance)


def test_16_bit_png_is_scaled_not_clipped(store, tmp_path):
    files = {f"{name}/{index}.png": image_file(value + index, mode="L") for name, value in (("a", 10), ("b", 200))
             for index in range(3)}  # fmt: skip
    files["b/deep.png"] = image_file(4000, mode="I;16")
    folder = write_tree(tmp_path / "grey", files)

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    assert read_dataset(directory).image_shape == (8, 8, 1)  # every image grayscale: one channel
    assert np.all(pixels_of(directory, "b/deep.png") == 16)  # 4000 / 257 rounded, not clipped to 255


def test_palette_png_is_decoded_to_its_colours(store, tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))  # index 1 is green
    buffer = io.BytesIO()
    palette_image.save(buffer, format="PNG")
    folder = write_tree(tmp_path / "pets", {**two_classes(), "dog/palette.png": buffer.getvalue()})

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    assert np.all(pixels_of(directory, "dog/palette.png") == (10, 200, 30))  # the colour, not the index 1


def test_exif_rotated_jpeg_is_turned_upright(store, tmp_path):
    stored = Image.new("RGB", (16, 8), (0, 0, 255))  # stored 16 wide x 8 high: left half red, right half blue
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation 6: rotate 90° clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = two_classes(size=(8, 16))  # the other images are 8 wide x 16 high, as the rotated one displays
    folder = write_tree(tmp_path / "pets", {**upright, "cat/rotated.jpg": buffer.getvalue()})

    ref = download(imagefolder(folder), store)

    directory = assert_published_complete(store, ref)
    pixels = pixels_of(directory, "cat/rotated.jpg").astype(int)
    assert pixels.shape == (16, 8, 3)  # height 16, width 8: rotated, so it stacks with the rest
    assert np.abs(pixels[2, 4] - (255, 0, 0)).max() <= 3  # the stored left half is now on top
    assert np.abs(pixels[13, 4] - (0, 0, 255)).max() <= 3
