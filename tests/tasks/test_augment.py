import json

import numpy as np
import torch
from PIL import Image

from kiln.augmentation import augment_batch, build_transform, resolve_policy
from kiln.config import AugmentConfig
from kiln.dataset import publish_dataset
from tasks.augment import augment
from tests.conftest import make_blobs_dataset


def test_auto_policy_flips_colour_but_not_grayscale():
    colour = resolve_policy(AugmentConfig(), (32, 32, 3))
    gray = resolve_policy(AugmentConfig(), (8, 8, 1))
    assert [op["op"] for op in colour["ops"]] == ["RandomCrop", "RandomHorizontalFlip"]
    assert colour["ops"][0]["padding"] == 4  # the CIFAR convention: 32 // 8
    assert [op["op"] for op in gray["ops"]] == ["RandomCrop"]
    assert resolve_policy(AugmentConfig(policy="none"), (32, 32, 3))["ops"] == []


def test_transform_keeps_shape_dtype_and_changes_pixels():
    spec = resolve_policy(AugmentConfig(crop_padding=2), (8, 8, 3))
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    out = augment_batch(build_transform(spec), images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_stage_writes_policy_and_preview(store, dataset_ref):
    ref = augment(AugmentConfig(preview_images=6), dataset_ref, store)
    out = store.materialize(ref)
    spec = json.loads((out / "policy.json").read_text())
    assert spec["version"] == 1 and spec["image_shape"] == [8, 8, 3]
    preview = Image.open(out / "report" / "preview.png")
    assert preview.width > 6 * 8 and preview.height > 2 * 8  # two rows (original, augmented), upscaled
    assert augment(AugmentConfig(preview_images=6), dataset_ref, store).reused


def test_grayscale_dataset_gets_no_flip(store):
    ref = publish_dataset(store, make_blobs_dataset(channels=1))
    spec = json.loads((store.materialize(augment(AugmentConfig(), ref, store)) / "policy.json").read_text())
    assert spec["policy"] == "crop"
    assert np.array(Image.open(store.materialize(augment(AugmentConfig(), ref, store)) / "report/preview.png")).ndim == 3


def test_preview_settings_do_not_change_what_training_reads(store, dataset_ref):
    small = augment(AugmentConfig(preview_images=4, seed=1), dataset_ref, store)
    large = augment(AugmentConfig(preview_images=16, seed=2), dataset_ref, store)
    assert small.key != large.key and small.digest == large.digest
