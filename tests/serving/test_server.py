"""The bundle's HTTP server, hit by a real client (httpx) over 127.0.0.1: answers, batches, limits, bad input."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Bundle, load_bundle
from tests.conftest import make_blobs_dataset
from tests.serving.conftest import MAX_BATCH, MAX_PIXELS, MAX_UPLOAD_BYTES


def encode(pixels: np.ndarray, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def post_files(url: str, files: list[tuple[str, bytes, str]], **params) -> httpx.Response:
    multipart = [("image", (name, data, media_type)) for name, data, media_type in files]
    return httpx.post(f"{url}/v1/predict", files=multipart, params=params, timeout=30)


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (status, code)
    for word in words:
        assert word in error["message"]


@pytest.fixture(scope="module")
def test_images(bundle_dir: Path) -> tuple[Bundle, np.ndarray]:
    """The bundle (in-process, for expected answers) and a few test images of the data it was trained on."""
    return load_bundle(bundle_dir), make_blobs_dataset().test_images[:6]


def test_health_and_metadata(server: str, bundle_dir: Path):
    health = httpx.get(f"{server}/healthz").json()
    metadata = httpx.get(f"{server}/v1/metadata").json()

    bundle = load_bundle(bundle_dir)
    assert health == {"status": "ok", "model": bundle.name, "version": bundle.version}
    assert metadata["classes"] == bundle.labels
    assert metadata["input"]["image"] == {"height": 8, "width": 8, "channels": 3, "dtype": "uint8", "layout": "HWC"}
    assert metadata["input"]["model_input"] == {"name": "image", "dtype": "tensor(uint8)"}
    assert metadata["variant"] == bundle.manifest["chosen_variant"]
    assert 0 <= metadata["metrics"]["test_accuracy"] <= 1
    limits = metadata["limits"]
    assert (limits["max_upload_bytes"], limits["max_batch"], limits["max_pixels"]) == (MAX_UPLOAD_BYTES, MAX_BATCH, MAX_PIXELS)
    assert limits["max_workers"] >= 1 and limits["max_connections"] >= 1


def test_uploaded_png_and_jpeg_get_the_bundles_own_prediction(server: str, test_images):
    bundle, images = test_images
    expected = bundle.predict_arrays(images[:2])

    response = post_files(server, [("a.png", encode(images[0]), "image/png"),
                                   ("b.jpg", encode(images[1], "JPEG", quality=100), "image/jpeg")], top_k=3)  # fmt: skip

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == (bundle.name, bundle.version)
    first, second = body["predictions"]
    assert first["source"] == "a.png" and second["source"] == "b.jpg"
    assert first["index"] == int(expected[0].argmax())
    assert first["probability"] == pytest.approx(float(expected[0].max()), abs=1e-6)  # PNG is lossless
    assert first["label"] == bundle.labels[first["index"]]
    assert [entry["probability"] for entry in first["top"]] == sorted((e["probability"] for e in first["top"]), reverse=True)
    assert len(first["top"]) == 3 and sum(entry["probability"] for entry in first["top"]) == pytest.approx(1, abs=1e-5)


def test_a_json_batch_of_arrays_and_base64_images(server: str, test_images):
    bundle, images = test_images
    expected = bundle.predict_arrays(images[:3])
    instances = [images[0].tolist(), images[1].tolist(), {"b64": base64.b64encode(encode(images[2])).decode()}]

    response = httpx.post(f"{server}/v1/predict", json={"instances": instances})

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["source"] for p in predictions] == ["instances[0]", "instances[1]", "instances[2]"]
    assert [p["index"] for p in predictions] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose([p["probability"] for p in predictions], expected.max(axis=1), atol=1e-6)


def test_any_size_and_channel_count_is_resized_as_in_training(server: str, test_images):
    bundle, _ = test_images
    one_pixel = np.full((1, 1, 3), 200, np.uint8)
    grey_large = np.random.default_rng(0).integers(0, 256, (300, 500, 1), dtype=np.uint8)

    response = post_files(server, [("1x1.png", encode(one_pixel), "image/png"),
                                   ("grey.png", encode(grey_large), "image/png")])  # fmt: skip

    assert response.status_code == 200, response.text
    expected = bundle.predict_images([one_pixel, grey_large], ["1x1", "grey"])
    assert [p["index"] for p in response.json()["predictions"]] == [p.index for p in expected]


def test_a_100_megapixel_image_is_rejected_from_its_header(server: str):
    huge = encode(np.zeros((10_000, 10_000, 1), np.uint8), compress_level=9)  # 100 MP, ~100 kB as PNG
    assert len(huge) < MAX_UPLOAD_BYTES

    response = post_files(server, [("huge.png", huge, "image/png")])

    assert_error(response, 413, "image_too_large", "10000x10000", "huge.png")


@pytest.mark.parametrize(
    ("name", "data", "code", "words"),
    [
        ("notes.png", b"this is not an image, just text", "unreadable_image", ("notes.png", "not an image")),
        ("empty.png", b"", "empty_file", ("empty.png", "empty")),
    ],
)
def test_files_that_are_not_images_get_400(server: str, name, data, code, words):
    assert_error(post_files(server, [(name, data, "image/png")]), 400, code, *words)


def test_a_truncated_jpeg_gets_400(server: str, test_images):
    _, images = test_images
    jpeg = encode(np.repeat(np.repeat(images[0], 16, axis=0), 16, axis=1), "JPEG", quality=90)
    response = post_files(server, [("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")])
    assert_error(response, 400, "unreadable_image", "cut.jpg", "truncated")


def test_an_empty_body_gets_400(server: str):
    response = httpx.post(f"{server}/v1/predict", content=b"", headers={"content-type": "application/json"})
    assert_error(response, 400, "empty_body", "empty")


@pytest.mark.parametrize("content_type", ["text/plain", "image/png", None])
def test_an_unsupported_content_type_gets_415(server: str, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{server}/v1/predict", content=b"\x89PNG....", headers=headers)
    assert_error(response, 415, "unsupported_media_type", "multipart/form-data")


def test_a_multipart_request_without_files_gets_400(server: str):
    response = httpx.post(f"{server}/v1/predict", files={"comment": (None, "no image here")})  # a plain field
    assert_error(response, 400, "no_images")


@pytest.mark.parametrize("extra", [1, 5])  # one over the limit, and far enough over that the parser stops first
def test_too_many_images_get_413(server: str, test_images, extra: int):
    _, images = test_images
    files = [(f"{index}.png", encode(images[0]), "image/png") for index in range(MAX_BATCH + extra)]
    assert_error(post_files(server, files), 413, "batch_too_large")
    json_batch = {"instances": [images[0].tolist()] * (MAX_BATCH + extra)}
    assert_error(httpx.post(f"{server}/v1/predict", json=json_batch), 413, "batch_too_large", str(MAX_BATCH))


def test_formats_outside_the_supported_list_are_refused_without_decoding(server: str, test_images):
    _, images = test_images
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # Pillow would hand EPS to Ghostscript
    ico = encode(images[0], "ICO")
    response = post_files(server, [("drawing.eps", eps, "application/postscript")])
    assert_error(response, 400, "unreadable_image", "drawing.eps", "supported format")
    assert_error(post_files(server, [("icon.ico", ico, "image/x-icon")]), 400, "unreadable_image", "supported format")


def test_a_body_over_the_byte_limit_gets_413_declared_or_streamed(server: str):
    noise = np.random.default_rng(1).integers(0, 256, MAX_UPLOAD_BYTES + 10, dtype=np.uint8).tobytes()
    declared = post_files(server, [("noise.png", noise, "image/png")])
    assert_error(declared, 413, "payload_too_large", f"{MAX_UPLOAD_BYTES:,}")

    def chunks():  # no Content-Length: the server must count while it reads
        for start in range(0, len(noise), 65536):
            yield noise[start : start + 65536]

    streamed = httpx.post(f"{server}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(streamed, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'[[1, 2], [3, 4]]', 422, "invalid_instances"),
        (b'{"instances": "abc"}', 422, "invalid_instances"),
        (b'{"instances": [[[1, 2], [3]]]}', 422, "invalid_array"),
        (b'{"instances": [[[300, 2], [3, 4]]]}', 422, "invalid_array"),
        (b'{"instances": [[[0.5, 2], [3, 4]]]}', 422, "invalid_array"),
        (b'{"instances": [[[[1, 2, 3, 4]]]]}', 422, "invalid_array"),
        (b'{"instances": [{"b64": "!!!"}]}', 422, "invalid_base64"),
        (b'{"instances": [{"url": "http://x"}]}', 422, "invalid_instance"),
        (b'{"instances": []}', 400, "no_images"),
        (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
        (b'{"instances": [' + b"[" * 500 + b"1" + b"]" * 500 + b"]}", 422, "invalid_array"),  # numpy: ndim <= 64
        ('{"instances": [{"b64": "\u00e9t\u00e9"}]}'.encode(), 422, "invalid_base64"),
        (b'{"instances": [[[true, false], [true, true]]]}', 422, "invalid_array"),
        (b'{"instances": [[[-1, 2], [3, 4]]]}', 422, "invalid_array"),
    ],
)
def test_malformed_json_gets_a_clear_4xx(server: str, body: bytes, status: int, code: str):
    response = httpx.post(f"{server}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert_error(response, status, code)


def test_bad_query_parameters_and_unknown_routes_get_json_errors(server: str, test_images):
    _, images = test_images
    response = httpx.post(f"{server}/v1/predict", params={"top_k": 0}, json={"instances": [images[0].tolist()]})
    assert_error(response, 422, "invalid_parameters", "top_k")
    assert_error(httpx.get(f"{server}/v2/nothing"), 404, "not_found")
    assert_error(httpx.get(f"{server}/v1/predict"), 405, "method_not_allowed")


def test_the_server_is_still_healthy_after_the_bad_requests(server: str):
    assert httpx.get(f"{server}/healthz").status_code == 200
