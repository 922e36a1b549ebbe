import json

import numpy as np
import pandas as pd
import pytest

from kiln.config import EvaluateConfig
from kiln.errors import GateFailed
from kiln.metrics import confusion_matrix, per_class_table
from tasks.evaluate import check_gate, evaluate


def test_metrics_match_a_hand_computed_example():
    true = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    matrix = confusion_matrix(true, predicted, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    table = per_class_table(matrix, ["a", "b", "c"])
    assert table["precision"].tolist() == [0.5, 0.6667, 1.0]
    assert table["recall"].tolist() == [0.5, 1.0, 0.5]
    assert table["support"].tolist() == [2, 2, 2]


def test_evaluation_outputs_and_consistency(store, model_ref, dataset_ref):
    ref = evaluate(EvaluateConfig(min_accuracy=0.5), model_ref, dataset_ref, store)
    out = store.materialize(ref)
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = np.load(out / "predictions.npy")
    labels = np.load(store.materialize(dataset_ref) / "test_labels.npy")
    assert metrics["accuracy"] == pytest.approx((predictions == labels).mean(), abs=1e-5)
    assert metrics["blessed"] is True and metrics["accuracy"] > 0.8  # the blobs are easy
    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert matrix.to_numpy().sum() == len(labels)
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert check_gate(EvaluateConfig(min_accuracy=0.5), ref, store) is True


def test_gate_stops_or_continues(store):
    """A hand-written evaluation below its threshold: the gate stops the run, or lets it through as not blessed."""
    from kiln.stage import Stage

    strict = EvaluateConfig(min_accuracy=0.95)
    metrics = {"accuracy": 0.94999, "blessed": False, "min_accuracy": 0.95}

    def build(out_dir):
        (out_dir / "metrics.json").write_text(json.dumps(metrics))

    ref = Stage("evaluate", __name__).produce(store, strict, {}, build)
    with pytest.raises(GateFailed, match=r"accuracy 0.94999 is below evaluate.min_accuracy 0.95.*on_gate_failure"):
        check_gate(strict, ref, store)
    assert check_gate(strict.model_copy(update={"on_gate_failure": "continue"}), ref, store) is False


def test_test_time_augmentation_is_reported_beside_the_plain_accuracy(store, model_ref, dataset_ref):
    plain = store.manifest(evaluate(EvaluateConfig(), model_ref, dataset_ref, store)).metrics
    with_tta = store.manifest(evaluate(EvaluateConfig(tta="flip_translate"), model_ref, dataset_ref, store)).metrics
    assert with_tta["accuracy"] == plain["accuracy"] and "accuracy_tta" not in plain  # the gate's number is unchanged
    assert with_tta["tta"] == "flip_translate" and 0.0 <= with_tta["accuracy_tta"] <= 1.0


def test_test_time_views_are_the_image_its_mirror_and_their_one_pixel_shifts():
    import torch

    from kiln.training import _test_time_views

    batch = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    views, weights = zip(*_test_time_views(batch, "flip_translate"))
    assert len(views) == 6 and all(view.shape == batch.shape for view in views) and set(weights) == {1 / 6}
    assert torch.equal(views[1], batch.flip(3))
    assert torch.equal(views[2][:, :, 1:, 1:], batch[:, :, :-1, :-1])  # shifted down-right by one pixel
    assert torch.equal(views[3][:, :, :-1, :-1], batch[:, :, 1:, 1:])  # shifted up-left
    assert torch.equal(views[4][:, :, 1:, 1:], batch.flip(3)[:, :, :-1, :-1])  # the mirror, shifted
    assert len(_test_time_views(batch, "flip")) == 2 and len(_test_time_views(batch, "none")) == 1
    views, weights = zip(*_test_time_views(batch, "flip_translate_weighted"))
    assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
    assert torch.equal(views[1], batch.flip(3))
    assert torch.equal(views[2][:, :, 1:, 1:], batch[:, :, :-1, :-1])
    assert torch.equal(views[4], views[2].flip(3)) and torch.equal(views[5], views[3].flip(3))  # shifted, mirrored


def test_airbenchs_weighted_tta_is_a_weighted_mean_of_log_probabilities():
    import numpy as np
    import torch

    from kiln.runtime.preprocess import Preprocessing
    from kiln.training import _test_time_views, predict_probabilities, resolve_runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 5))
    images = np.random.default_rng(0).integers(0, 256, size=(7, 6, 6, 3), dtype=np.uint8)
    prep = Preprocessing(6, 6, 3, (0.5,) * 3, (0.25,) * 3)
    runtime = resolve_runtime("cpu", "fp32")
    probabilities = predict_probabilities(model, images, prep, runtime, batch_size=4, tta="flip_translate_weighted")
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        log_probabilities = [weight * torch.log_softmax(model((view / 255 - 0.5) / 0.25), dim=1)
                             for view, weight in _test_time_views(batch, "flip_translate_weighted")]  # fmt: skip
    expected = torch.softmax(sum(log_probabilities), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    plain = predict_probabilities(model, images, prep, runtime, tta="flip_translate")
    assert not np.allclose(plain, probabilities)  # not the plain mean of probabilities
