"""Property-based tests (hypothesis) of the augmentation policies: whatever the image, size, channels and policy,
an augmented image keeps its shape and dtype, stays within the input's value range, and its label is untouched."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kiln.augmentation import augment_batch, build_transform, resolve_policy
from kiln.config import AugmentConfig
from kiln.training import AugmentedImages

POLICIES = st.sampled_from(["auto", "none", "crop", "crop_flip"])
PADDING = st.one_of(st.none(), st.integers(min_value=0, max_value=12))


@st.composite
def image_batches(draw) -> np.ndarray:
    count = draw(st.integers(min_value=1, max_value=4))
    height = draw(st.integers(min_value=1, max_value=20))
    width = draw(st.integers(min_value=1, max_value=20))
    channels = draw(st.sampled_from([1, 3]))
    return draw(arrays(np.uint8, (count, height, width, channels)))


def transform_for(images: np.ndarray, policy: str, padding: int | None):
    spec = resolve_policy(AugmentConfig(policy=policy, crop_padding=padding), images.shape[1:])
    return spec, build_transform(spec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=image_batches(), policy=POLICIES, padding=PADDING, seed=st.integers(0, 2**31 - 1))
def test_augmented_images_keep_shape_dtype_and_value_range(images, policy, padding, seed):
    _, transform = transform_for(images, policy, padding)
    torch.manual_seed(seed)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    augmented = augment_batch(transform, batch)

    assert augmented.shape == batch.shape and augmented.dtype == torch.uint8
    # Crops pad with reflected pixels (or zeros when the image is smaller than the pad) and flips move pixels:
    # no value can appear that was neither in the image nor the zero padding.
    low, high = int(batch.min()), int(batch.max())
    assert int(augmented.min()) >= min(low, 0) and int(augmented.max()) <= high


@settings(max_examples=100, deadline=None)
@given(images=image_batches(), policy=POLICIES, padding=PADDING, seed=st.integers(0, 2**31 - 1))
def test_labels_pass_through_untouched_and_pixels_are_only_rearranged_without_padding(images, policy, padding, seed):
    spec, transform = transform_for(images, policy, padding)
    labels = np.arange(len(images), dtype=np.int64) * 7 % 10
    dataset = AugmentedImages(images, labels, transform)
    torch.manual_seed(seed)

    for index in range(len(dataset)):
        image, label = dataset[index]
        assert label == labels[index] and isinstance(label, int)
        assert tuple(image.shape) == (images.shape[3], images.shape[1], images.shape[2])
        crop_pads = any(op["op"] == "RandomCrop" and op["padding"] > 0 for op in spec["ops"])
        if not crop_pads:  # flips (and a crop without padding, which keeps the whole image) only move pixels
            original = torch.from_numpy(images[index]).permute(2, 0, 1)
            assert sorted(image.flatten().tolist()) == sorted(original.flatten().tolist())


@given(images=image_batches(), padding=PADDING)
@settings(max_examples=50, deadline=None)
def test_grayscale_auto_policy_never_flips(images, padding):
    spec, _ = transform_for(images, "auto", padding)
    ops = [op["op"] for op in spec["ops"]]
    assert ("RandomHorizontalFlip" in ops) == (images.shape[3] == 3)
