"""Stage 3, augment: a versioned augmentation policy (torchvision transforms v2) plus a preview image.

Output: `policy.json` (the spec the train stage builds its transform from) and `report/preview.png` (originals in
the top rows, the same images augmented below; under report/ so that re-drawing it does not retrain the model).
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.augmentation import augment_batch, build_transform, resolve_policy
from kiln.config import AugmentConfig, StoreConfig
from kiln.dataset import read_info, read_split
from kiln.imaging import save_image_grid
from kiln.stage import Stage
from kiln.store import REPORT_DIR, ArtifactRef, ArtifactStore, write_json
from tasks._task import report, stage_task

STAGE = Stage("augment", __name__)


def augment(config: AugmentConfig, dataset: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Resolve the policy for this dataset's image shape, save it and a preview grid."""

    def build(out_dir):
        directory = store.materialize(dataset)
        info = read_info(directory)
        spec = resolve_policy(config, info.image_shape, info.channel_mean)
        transform = build_transform(spec)  # fails here, not in training, if the spec is unusable
        write_json(out_dir / "policy.json", spec)
        images, _ = read_split(directory, "train")
        originals = images[: config.preview_images]
        with torch.random.fork_rng():  # seed the preview without touching the caller's random state
            torch.manual_seed(config.seed)
            augmented = augment_batch(transform, torch.from_numpy(originals).permute(0, 3, 1, 2))
        preview = np.concatenate([originals, augmented.permute(0, 2, 3, 1).numpy()])
        (out_dir / REPORT_DIR).mkdir()
        save_image_grid(preview, out_dir / REPORT_DIR / "preview.png", columns=min(8, len(originals)))
        return {"policy": spec["policy"], "ops": [op["op"] for op in spec["ops"]]}

    return STAGE.produce(store, config, {"dataset": dataset}, build)


@stage_task(STAGE)
def augment_task(config: AugmentConfig, dataset: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """Save the augmentation policy and its preview."""
    ref = augment(config, dataset, ArtifactStore(store.root, store.on_corrupt))
    metrics = ArtifactStore(store.root, store.on_corrupt).manifest(ref).metrics
    report(ref, store, "Augmentation policy", [f"- policy: `{metrics['policy']}` ({', '.join(metrics['ops']) or 'no ops'})",
                                              f"- preview: `{ref.uri}/{REPORT_DIR}/preview.png`"])
    return ref
