"""The download stage: every source into the canonical format, offline (HTTP from a server on 127.0.0.1)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.states import Failed

from kiln.config import DataConfig, StoreConfig
from kiln.dataset import read_dataset, read_info
from kiln.errors import ConfigError, DataError, DownloadError, KilnError
from kiln.sources import source_fingerprint
from kiln.sources.http import fetch
from kiln.store import ArtifactStore, sha256_file
from tasks.download import STAGE, download, download_task, retry_on_download_error
from tests.conftest import SHARED_CIFAR
from tests.support.archives import tar_gz, write_tree, zip_archive
from tests.support.http_server import LocalServer, serve_http


# --- building tiny image sets -------------------------------------------------------------------------------------
def image_bytes(value: int, size: tuple[int, int] = (8, 8), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A flat image of one value (per channel), as encoded file bytes."""
    colour = value if mode in ("L", "I;16") else (value, 255 - value, value // 2)
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


write_files = write_tree


def class_files(prefix: str, classes: dict[str, int], per_class: int, **image) -> dict[str, bytes]:
    """{"<prefix><class>/<n>.png": image} with each class a different flat colour."""
    return {
        f"{prefix}{name}/{index}.png": image_bytes(value + index, **image)
        for name, value in classes.items()
        for index in range(per_class)
    }


def imagefolder(uri: str | Path, **settings) -> DataConfig:
    return DataConfig(source="imagefolder", uri=str(uri), **settings)


def skipped_rows(ref) -> dict[str, str]:
    table = pd.read_csv(Path(ref.uri) / "skipped.csv")
    return dict(zip(table["source"], table["reason"]))


def published_outputs(store: ArtifactStore) -> list[Path]:
    stage_dir = Path(store.root) / "download"
    return list(stage_dir.iterdir()) if stage_dir.exists() else []


SPLIT_TREE = {
    **class_files("train/", {"cat": 10, "dog": 120}, per_class=4),
    **class_files("test/", {"cat": 20, "dog": 130}, per_class=2),
}


# --- digits -------------------------------------------------------------------------------------------------------
def test_digits_are_written_in_the_canonical_format_and_reused(store):
    config = DataConfig(source="digits", test_fraction=0.2, seed=0)

    ref = download(config, store)
    again = download(config, store)

    dataset, info = read_dataset(Path(ref.uri)), read_info(Path(ref.uri))
    assert dataset.train_images.shape[1:] == (8, 8, 1) and dataset.train_images.dtype == np.uint8
    assert len(dataset.train_labels) + len(dataset.test_labels) == 1797
    assert info.classes == [str(digit) for digit in range(10)]
    assert dataset.train_images.max() == 255 and dataset.train_images.min() == 0  # 16 -> 255, 0 -> 0
    held_out, kept = np.bincount(dataset.test_labels), np.bincount(dataset.train_labels)
    test_share = held_out / (held_out + kept)
    assert np.all(np.abs(test_share - 0.2) < 0.02)  # stratified: every class holds out about 20%
    manifest = store.manifest(ref)
    assert {entry.path for entry in manifest.files} >= {"train_images.npy", "test_labels.npy", "dataset.json",
                                                       "samples.csv", "skipped.csv"}  # fmt: skip
    for entry in manifest.files:
        assert sha256_file(Path(ref.uri) / entry.path) == entry.sha256
    assert manifest.metrics["classes"] == info.classes and manifest.metrics["skipped_files"] == 0
    assert not ref.reused and again.reused and again.key == ref.key and again.digest == ref.digest


def test_digits_pixels_are_scaled_from_0_16(store):
    from sklearn.datasets import load_digits

    ref = download(DataConfig(source="digits"), store)
    samples = pd.read_csv(Path(ref.uri) / "samples.csv")
    first_train = samples[samples["split"] == "train"].iloc[0]
    index = int(first_train["source"].split(":")[1])
    images, _ = read_dataset(Path(ref.uri)).split("train")
    expected = np.round(load_digits().images[index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(images[0, :, :, 0], expected)


def test_digits_refuse_a_uri_they_would_ignore(store):
    with pytest.raises(ConfigError, match="data.uri='/data/x' is not used by data.source=digits"):
        download(DataConfig(source="digits", uri="/data/x"), store)


def test_sample_limits_subsample_each_split_stratified(store):
    ref = download(DataConfig(source="digits", max_train_samples=200, max_test_samples=50), store)
    dataset = read_dataset(Path(ref.uri))
    assert 190 <= len(dataset.train_labels) <= 200 and 45 <= len(dataset.test_labels) <= 50
    assert set(dataset.train_labels.tolist()) == set(range(10)) == set(dataset.test_labels.tolist())
    samples = pd.read_csv(Path(ref.uri) / "samples.csv")
    assert samples["source"].is_unique  # sources follow their images through the subsample


# --- imagefolder: layouts -----------------------------------------------------------------------------------------
def test_train_and_test_folders_are_the_split(store, tmp_path):
    root = write_files(tmp_path / "pets", {**SPLIT_TREE, "test/bird/0.png": image_bytes(200)})

    ref = download(imagefolder(root), store)

    dataset = read_dataset(Path(ref.uri))
    assert dataset.name == "pets"
    assert dataset.classes == ["bird", "cat", "dog"]  # the union over both splits, sorted
    assert np.bincount(dataset.train_labels, minlength=3).tolist() == [0, 4, 4]
    assert np.bincount(dataset.test_labels, minlength=3).tolist() == [1, 2, 2]
    assert dataset.train_images.shape == (8, 8, 8, 3)
    samples = pd.read_csv(Path(ref.uri) / "samples.csv")
    assert samples["source"].tolist()[:2] == ["train/cat/0.png", "train/cat/1.png"]
    cat_pixel = dataset.train_images[0, 0, 0].tolist()
    assert cat_pixel == [10, 245, 5]


def test_class_folders_alone_are_split_stratified(store, tmp_path):
    root = write_files(tmp_path / "shapes", class_files("", {"round": 0, "square": 100}, per_class=10))

    ref = download(imagefolder(root, test_fraction=0.3, seed=1), store)

    dataset = read_dataset(Path(ref.uri))
    assert dataset.classes == ["round", "square"]
    assert np.bincount(dataset.train_labels).tolist() == [7, 7]
    assert np.bincount(dataset.test_labels).tolist() == [3, 3]


def test_one_wrapping_folder_hidden_files_and_macos_forks_are_ignored(store, tmp_path):
    files = {f"dataset/{name}": data for name, data in SPLIT_TREE.items()}
    files.update({".DS_Store": b"junk", "__MACOSX/dataset/._x": b"junk", "dataset/train/cat/.hidden.png": b"junk",
                  "dataset/train/.cache/0.png": b"junk"})  # fmt: skip
    root = write_files(tmp_path / "wrapped", files)

    ref = download(imagefolder(root), store)

    dataset = read_dataset(Path(ref.uri))
    assert dataset.classes == ["cat", "dog"] and len(dataset.train_labels) == 8
    assert skipped_rows(ref) == {}


def test_symlinked_class_folders_are_followed_and_dangling_links_skipped(store, tmp_path):
    elsewhere = write_files(tmp_path / "elsewhere", class_files("", {"dog": 100}, per_class=3))
    root = write_files(tmp_path / "pets", class_files("", {"cat": 0}, per_class=3))
    (root / "dog").symlink_to(elsewhere / "dog", target_is_directory=True)
    (root / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")

    ref = download(imagefolder(root), store)

    assert read_dataset(Path(ref.uri)).classes == ["cat", "dog"]
    assert skipped_rows(ref) == {"cat/gone.png": "cannot be read (FileNotFoundError: No such file or directory)"}


def test_val_stands_in_for_test_and_is_ignored_beside_test(store, tmp_path):
    val_only = {name.replace("test/", "val/"): data for name, data in SPLIT_TREE.items()}
    ref = download(imagefolder(write_files(tmp_path / "a", val_only)), store)
    assert len(read_dataset(Path(ref.uri)).test_labels) == 4

    both = {**SPLIT_TREE, **class_files("validation/", {"cat": 0, "dog": 1}, per_class=1), "README.md": b"hello"}
    ref = download(imagefolder(write_files(tmp_path / "b", both)), store)
    assert len(read_dataset(Path(ref.uri)).test_labels) == 4
    assert set(skipped_rows(ref)) == {"validation", "README.md"}


@pytest.mark.parametrize("packer, name", [(tar_gz, "pets.tar.gz"), (zip_archive, "pets.zip")])
def test_archives_are_read_like_folders(store, tmp_path, packer, name):
    archive = tmp_path / name
    archive.write_bytes(packer({f"pets/{path}": data for path, data in SPLIT_TREE.items()}))

    ref = download(imagefolder(archive), store)

    dataset = read_dataset(Path(ref.uri))
    assert dataset.name == "pets" and dataset.classes == ["cat", "dog"]
    assert len(dataset.train_labels) == 8 and len(dataset.test_labels) == 4
    assert pd.read_csv(Path(ref.uri) / "samples.csv")["source"].iloc[0] == "train/cat/0.png"


# --- imagefolder: bad files and bad layouts -----------------------------------------------------------------------
def test_non_images_and_truncated_images_are_skipped_with_reasons(store, tmp_path):
    jpeg = image_bytes(90, size=(8, 8), fmt="JPEG")
    files = {**SPLIT_TREE, "train/cat/notes.png": b"these are my notes, not an image",
             "train/dog/broken.jpg": jpeg[: len(jpeg) // 2], "train/loose.txt": b"x"}  # fmt: skip
    root = write_files(tmp_path / "pets", files)

    ref = download(imagefolder(root), store)

    rows = skipped_rows(ref)
    assert set(rows) == {"train/cat/notes.png", "train/dog/broken.jpg", "train/loose.txt"}
    assert rows["train/cat/notes.png"].startswith("not an image")
    assert "truncated" in rows["train/dog/broken.jpg"]
    assert rows["train/loose.txt"] == "not inside a class folder"
    assert len(read_dataset(Path(ref.uri)).train_labels) == 8
    assert store.manifest(ref).metrics["skipped_files"] == 3


def test_empty_class_folder_is_an_error(store, tmp_path):
    root = write_files(tmp_path / "pets", SPLIT_TREE)
    (root / "train" / "fish").mkdir()
    with pytest.raises(DataError, match=r"class folder 'train/fish' .* is empty; remove it or add images"):
        download(imagefolder(root), store)
    assert published_outputs(store) == []


def test_class_folder_without_usable_images_is_an_error(store, tmp_path):
    root = write_files(tmp_path / "pets", {**SPLIT_TREE, "train/fish/a.png": b"not an image"})
    with pytest.raises(DataError, match=r"'train/fish' .* has no usable images .*remove it or add images"):
        download(imagefolder(root), store)


def test_missing_path_is_an_error(store, tmp_path):
    with pytest.raises(DataError, match=r"data.uri .*nowhere does not exist"):
        download(imagefolder(tmp_path / "nowhere"), store)


@pytest.mark.parametrize(
    "files, message",
    [
        (class_files("", {"cat": 0}, per_class=3), r"1 class folder\(s\) \(cat\)"),
        ({"a.png": image_bytes(1), "b.png": image_bytes(2)}, r"0 class folder\(s\) \(none\)"),
    ],
)
def test_fewer_than_two_classes_is_an_error(store, tmp_path, files, message):
    with pytest.raises(DataError, match=message):
        download(imagefolder(write_files(tmp_path / "few", files)), store)


@pytest.mark.parametrize(
    "member", ["../kiln-test-evil.png", "/tmp/kiln-test-evil.png"], ids=["dot-dot", "absolute"]
)
def test_unsafe_archive_is_refused_and_nothing_is_published(store, tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_gz({**SPLIT_TREE, member: image_bytes(1)}))
    with pytest.raises(DataError, match="refusing an archive that writes outside its folder"):
        download(imagefolder(archive), store)
    assert published_outputs(store) == []
    assert not Path("/tmp/kiln-test-evil.png").exists() and not (tmp_path / "kiln-test-evil.png").exists()


def test_archive_with_escaping_symlink_is_refused(store, tmp_path):
    escape = tarfile.TarInfo("train/cat/passwd.png")
    escape.type, escape.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
    (tmp_path / "links.tar.gz").write_bytes(tar_gz(SPLIT_TREE, extra_members=(escape,)))
    with pytest.raises(DataError, match="points outside the archive"):
        download(imagefolder(tmp_path / "links.tar.gz"), store)
    assert published_outputs(store) == []


@pytest.mark.parametrize("content", [b"", b"plain text, not an archive"], ids=["empty", "text"])
def test_a_file_that_is_no_archive_is_an_error(store, tmp_path, content):
    (tmp_path / "data.tar.gz").write_bytes(content)
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)|is not a .tar.gz"):
        download(imagefolder(tmp_path / "data.tar.gz"), store)


def test_archive_larger_than_the_limit_is_refused(store, tmp_path):
    (tmp_path / "big.zip").write_bytes(zip_archive(SPLIT_TREE, zipfile.ZIP_STORED))
    with pytest.raises(DataError, match="data.max_archive_bytes"):
        download(imagefolder(tmp_path / "big.zip", max_archive_bytes=100), store)


# --- imagefolder: sizes and channels ------------------------------------------------------------------------------
def test_mixed_sizes_need_image_size(store, tmp_path):
    root = write_files(tmp_path / "pets", {**SPLIT_TREE, "train/dog/wide.png": image_bytes(50, size=(12, 6))})

    with pytest.raises(DataError, match=r"different sizes, e\.g\. .* is 8x8 and train/dog/wide\.png is 12x6.*"
                                        r"--set data\.image_size=N"):  # fmt: skip
        download(imagefolder(root), store)

    ref = download(imagefolder(root, image_size=16), store)
    dataset = read_dataset(Path(ref.uri))
    assert dataset.train_images.shape == (9, 16, 16, 3) and dataset.test_images.shape == (4, 16, 16, 3)


def test_grayscale_only_gives_one_channel_and_mixed_gives_three(store, tmp_path):
    gray = {**class_files("", {"a": 10, "b": 200}, per_class=3, mode="L"), "b/deep.png": image_bytes(4000, mode="I;16")}
    ref = download(imagefolder(write_files(tmp_path / "gray", gray)), store)
    dataset = read_dataset(Path(ref.uri))
    assert dataset.image_shape == (8, 8, 1)
    all_images = np.concatenate([dataset.train_images, dataset.test_images])
    assert 16 in all_images[:, 0, 0, 0]  # the 16-bit image is scaled (4000 / 257), not clipped to 255

    mixed = {**gray, "a/colour.png": image_bytes(30)}
    ref = download(imagefolder(write_files(tmp_path / "mixed", mixed)), store)
    assert read_dataset(Path(ref.uri)).image_shape == (8, 8, 3)


def test_exif_orientation_is_applied(store, tmp_path):
    image = Image.new("RGB", (12, 6), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    files = {**class_files("", {"a": 0, "b": 99}, per_class=2, size=(6, 12)), "a/rotated.jpg": buffer.getvalue()}
    ref = download(imagefolder(write_files(tmp_path / "exif", files)), store)
    assert read_dataset(Path(ref.uri)).image_shape == (12, 6, 3)  # 6 wide x 12 high once rotated, like the rest


def test_truncated_images_are_never_loaded_half_grey(monkeypatch, store, tmp_path):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(KilnError, match="LOAD_TRUNCATED_IMAGES"):
        download(imagefolder(write_files(tmp_path / "pets", SPLIT_TREE)), store)


def test_worker_processes_decode_the_same_as_one_process(monkeypatch, tmp_path):
    from kiln import decoding as images

    paths = write_files(tmp_path / "many", class_files("", {"a": 0, "b": 100}, per_class=6))
    items = [(path.name, path) for path in sorted(paths.rglob("*.png"))] + [("junk", b"junk")]
    serial = images.decode_images(items, len(items), image_size=4)
    monkeypatch.setattr(images, "_PROCESS_POOL_MIN_FILES", 1)
    monkeypatch.setattr(images, "_FILES_PER_JOB", 3)
    monkeypatch.setattr(images.os, "cpu_count", lambda: 2)
    pooled = images.decode_images(iter(items), len(items), image_size=4)
    assert pooled.keys() == serial.keys() and pooled["junk"] == serial["junk"]
    assert all(np.array_equal(pooled[name], serial[name]) for name in serial if name != "junk")


# --- source fingerprint -------------------------------------------------------------------------------------------
def test_edited_folder_gets_a_new_key(store, tmp_path):
    root = write_files(tmp_path / "pets", SPLIT_TREE)
    config = imagefolder(root)
    first = download(config, store)

    (root / "train" / "cat" / "new.png").write_bytes(image_bytes(77))

    second = download(config, store)
    assert not second.reused and second.key != first.key
    assert len(read_dataset(Path(second.uri)).train_labels) == 9


def test_fingerprints_are_cheap_summaries(tmp_path):
    root = write_files(tmp_path / "pets", SPLIT_TREE)
    assert source_fingerprint(imagefolder(root)) == source_fingerprint(imagefolder(root))
    archive = tmp_path / "pets.zip"
    archive.write_bytes(zip_archive(SPLIT_TREE, zipfile.ZIP_STORED))
    before = source_fingerprint(imagefolder(archive))
    archive.write_bytes(zip_archive({**SPLIT_TREE, "train/cat/x.png": image_bytes(3)}, zipfile.ZIP_STORED))
    assert source_fingerprint(imagefolder(archive)) != before
    assert source_fingerprint(imagefolder("https://example.org/pets.tar.gz")) == ""
    assert source_fingerprint(DataConfig(source="digits")) == ""
    assert source_fingerprint(imagefolder(tmp_path / "missing")) == ""


# --- HTTP -----------------------------------------------------------------------------------------------------------
def test_imagefolder_archive_over_http(store):
    with serve_http(files={"/pets.tar.gz": tar_gz(SPLIT_TREE)}) as server:
        ref = download(imagefolder(server.url("/pets.tar.gz")), store)
    dataset = read_dataset(Path(ref.uri))
    assert dataset.name == "pets" and len(dataset.train_labels) == 8
    assert STAGE.source_fingerprint(imagefolder(server.url("/pets.tar.gz"))) == ""


def test_long_downloads_and_decodes_report_progress(store):
    archive = tar_gz(SPLIT_TREE)
    events: list[tuple[str, int, int]] = []
    with serve_http(files={"/pets.tar.gz": archive}) as server:
        ref = download(imagefolder(server.url("/pets.tar.gz")), store, lambda *event: events.append(event))
    downloading = [event for event in events if event[0] == "downloading pets.tar.gz"]
    assert downloading and downloading[-1][1:] == (len(archive), len(archive))
    assert [done for _, done, _ in downloading] == sorted(done for _, done, _ in downloading)
    images = len(read_dataset(Path(ref.uri)).train_labels) + len(read_dataset(Path(ref.uri)).test_labels)
    assert events[-1][0] == "decoding images" and events[-1][1] == events[-1][2] >= images


@pytest.mark.parametrize(
    "status, error, message", [(404, DataError, "HTTP 404"), (500, DownloadError, "HTTP 500"),
                               (503, DownloadError, "HTTP 503"), (403, DataError, "HTTP 403")]  # fmt: skip
)
def test_http_statuses_are_sorted_into_final_and_transient(store, status, error, message):
    with serve_http() as server:
        server.fail("/pets.tar.gz", status)
        with pytest.raises(error, match=message):
            download(imagefolder(server.url("/pets.tar.gz")), store)
    assert published_outputs(store) == []


def test_refused_connection_and_timeout_are_transient(tmp_path):
    with pytest.raises(DownloadError, match="cannot reach"):
        fetch(LocalServer.refused_url("/x"), tmp_path / "x", timeout_s=5, max_bytes=1000)
    with serve_http() as server:
        server.hang("/slow")
        with pytest.raises(DownloadError, match="sent nothing for data.timeout_s=0.2 s"):
            fetch(server.url("/slow"), tmp_path / "slow", timeout_s=0.2, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_larger_than_the_limit_is_refused(tmp_path):
    with serve_http(files={"/big": bytes(5000)}) as server:
        with pytest.raises(DataError, match="announces 5,000 bytes, over data.max_archive_bytes=1,000"):
            fetch(server.url("/big"), tmp_path / "big", timeout_s=5, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


# --- torchvision sets through a local mirror ------------------------------------------------------------------------
CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def fake_cifar() -> tuple[bytes, dict[str, bytes]]:
    """A cifar-10-python.tar.gz in the real layout (pickled batches, 2 images per class per batch)."""
    rng = np.random.default_rng(0)
    members = {}
    for name in CIFAR_FILES:
        labels = [label for label in range(10) for _ in range(2)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        members[name] = pickle.dumps({"batch_label": name, "labels": labels, "data": data})
    members["batches.meta"] = pickle.dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": 20, "num_vis": 3072})
    archive = tar_gz({f"cifar-10-batches-py/{name}": data for name, data in members.items()})
    return archive, members


def trust_fake_cifar(monkeypatch, archive: bytes, members: dict[str, bytes]) -> None:
    """Point torchvision's md5 constants at the fake, so its real verify/extract/parse path runs."""
    import torchvision

    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "tgz_md5", md5(archive))
    monkeypatch.setattr(cifar, "train_list", [[name, md5(members[name])] for name in CIFAR_FILES[:5]])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5(members["test_batch"])]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5(members["batches.meta"])})


def test_cifar10_from_a_mirror_is_verified_and_converted(monkeypatch, store, fake_cifar):
    archive, members = fake_cifar
    trust_fake_cifar(monkeypatch, archive, members)
    with serve_http(files={"/mirror/cifar-10-python.tar.gz": archive}) as server:
        ref = download(DataConfig(source="cifar10", uri=server.url("/mirror/")), store)
        assert server.requests == ["/mirror/cifar-10-python.tar.gz"]

    dataset = read_dataset(Path(ref.uri))
    assert dataset.classes == CIFAR_CLASSES
    assert dataset.train_images.shape == (100, 32, 32, 3) and dataset.test_images.shape == (20, 32, 32, 3)
    first = pickle.loads(members["data_batch_1"])["data"][0]
    assert np.array_equal(dataset.train_images[0], first.reshape(3, 32, 32).transpose(1, 2, 0))  # CHW -> HWC
    assert np.bincount(dataset.test_labels).tolist() == [2] * 10


def test_cifar10_with_a_different_file_fails_the_checksum(store, fake_cifar):
    import torchvision

    with serve_http(files={"/cifar-10-python.tar.gz": fake_cifar[0]}) as server:
        with pytest.raises(DataError, match="serves a different file than torchvision's checksum expects") as raised:
            download(DataConfig(source="cifar10", uri=server.url("/")), store)
    assert torchvision.datasets.CIFAR10.tgz_md5 in str(raised.value)
    assert torchvision.datasets.CIFAR10.url.startswith("https://www.cs.toronto.edu/")  # the class is not patched
    assert published_outputs(store) == []


def test_cifar10_archive_that_passes_md5_but_is_corrupt(monkeypatch, store, fake_cifar):
    archive, members = fake_cifar
    trust_fake_cifar(monkeypatch, archive, {**members, "test_batch": b"something else"})
    with serve_http(files={"/cifar-10-python.tar.gz": archive}) as server:
        with pytest.raises(DataError, match="could not read the downloaded cifar10 files"):
            download(DataConfig(source="cifar10", uri=server.url("/")), store)


@pytest.mark.parametrize("status, error", [(404, DataError), (500, DownloadError)])
def test_cifar10_mirror_errors(store, status, error):
    with serve_http() as server:
        server.fail("/cifar-10-python.tar.gz", status)
        with pytest.raises(error, match=f"HTTP {status}"):
            download(DataConfig(source="cifar10", uri=server.url("/")), store)


def idx_gz(array: np.ndarray) -> bytes:
    """An MNIST idx file (big-endian header, uint8 data), gzipped."""
    magic = 0x0800 + array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def test_mnist_from_a_mirror(monkeypatch, store):
    import torchvision

    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(30, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(30) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, size=(10, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10),
    }
    files = {name: idx_gz(array) for name, array in arrays.items()}
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(name, md5(data)) for name, data in files.items()])
    with serve_http(files={f"/mnist/{name}": data for name, data in files.items()}) as server:
        ref = download(DataConfig(source="mnist", uri=server.url("/mnist")), store)
        assert len(server.requests) == 4

    dataset = read_dataset(Path(ref.uri))
    assert dataset.train_images.shape == (30, 28, 28, 1) and dataset.test_images.shape == (10, 28, 28, 1)
    assert np.array_equal(dataset.train_images[:, :, :, 0], arrays["train-images-idx3-ubyte.gz"])
    assert dataset.classes == list(torchvision.datasets.MNIST.classes)
    assert torchvision.datasets.MNIST.mirrors[0].startswith("https://")  # the class is not patched


# --- the Prefect task ---------------------------------------------------------------------------------------------
def test_task_retries_only_download_errors():
    assert download_task.retries == 2 and download_task.retry_delay_seconds == [2, 10]
    assert download_task.retry_condition_fn is retry_on_download_error
    assert retry_on_download_error(download_task, None, Failed(data=DownloadError("HTTP 503")))
    assert not retry_on_download_error(download_task, None, Failed(data=DataError("HTTP 404")))
    assert not retry_on_download_error(download_task, None, Failed(data=ValueError("bug")))


def test_task_body_publishes_and_reports(tmp_path):
    store_config = StoreConfig(root=str(tmp_path / "store"))
    ref = download_task.fn(DataConfig(source="digits"), store_config)
    assert json.loads((Path(ref.uri) / "dataset.json").read_text())["name"] == "digits"


# --- real data ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="needs ../shared/datasets/cifar10-jpg.tar.gz")
def test_shared_cifar10_jpeg_archive(store):
    """All 60,000 JPEGs of the shared archive, read in memory and decoded by worker processes."""
    ref = download(imagefolder(SHARED_CIFAR), store)
    dataset = read_dataset(Path(ref.uri))
    assert dataset.classes == sorted(CIFAR_CLASSES)
    assert dataset.train_images.shape == (50000, 32, 32, 3) and dataset.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(dataset.test_labels).tolist() == [1000] * 10
    assert skipped_rows(ref) == {}


def test_a_single_class_is_refused(store, tmp_path):
    folder = write_files(tmp_path / "lonely", class_files("", {"cat": 10}, per_class=6))
    with pytest.raises(DataError, match="class"):
        download(imagefolder(folder), store)
    assert list(Path(store.root).glob("download/*")) == []  # nothing published, no staging left behind
