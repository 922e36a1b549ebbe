"""The whole pipeline under Prefect's test harness (a real, temporary Prefect API), on the quickstart profile."""

import time
from pathlib import Path

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.training_pipeline import training_pipeline
from kiln.bundle import load_bundle
from kiln.cli import main as kiln_main
from kiln.config import load_config
from kiln.dataset import read_split
from kiln.store import ArtifactStore
from tasks.package import bundle_location

STAGES = ["download", "validate", "augment", "train", "evaluate", "export", "compress", "package"]


def task_run_states(flow_run_id, timeout_s: float = 60.0) -> dict[str, str]:
    """Task name -> state name of one flow run's task runs, read back through the Prefect API.

    The client reports task run states to the server asynchronously (as events), so right after the flow returns the
    server may not hold every stage's run, or holds one without its state yet: wait, bounded, until it does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            recorded = all(run.state is not None and run.state.is_final() for run in runs)
            names = {run.name.rsplit("-", 1)[0] for run in runs}  # run names are "<task>-<suffix>"
            if recorded and set(STAGES) <= names:
                return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
            if time.monotonic() > deadline:
                raise AssertionError(f"the server holds these task runs after {timeout_s} s: "
                                     f"{[(run.name, run.state and run.state.name) for run in runs]}")  # fmt: skip
            time.sleep(0.2)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def pipeline_run(harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    config = load_config("quickstart", overrides=[f"store.root={root}"])
    return config, training_pipeline(config)


def test_quickstart_produces_a_verified_bundle(pipeline_run):
    config, outputs = pipeline_run
    assert list(outputs) == STAGES
    assert not any(ref.reused for ref in outputs.values())
    store = ArtifactStore(config.store.root)
    bundle_dir, archive = bundle_location(outputs["package"], store)
    assert Path(archive).is_file()
    bundle = load_bundle(bundle_dir)
    assert bundle.labels == [str(digit) for digit in range(10)]
    assert {entry["path"] for entry in bundle.manifest["files"]} >= {
        "model.onnx", "model.fp32.onnx", "labels.json", "preprocess.json", "metrics.json", "model_card.md"
    }  # fmt: skip
    # The shipped model (the compress policy's choice) clears the quickstart bar through onnxruntime.
    images, labels = read_split(store.materialize(outputs["download"]), "test")
    accuracy = (bundle.predict_arrays(images).argmax(axis=1) == labels).mean()
    assert accuracy >= 0.90
    assert bundle.manifest["chosen_variant"] in {"fp32", *config.compress.variants}


def test_the_first_run_registers_its_bundle_as_production(pipeline_run):
    from kiln.registry import ModelRegistry, registry_root

    config, outputs = pipeline_run
    store = ArtifactStore(config.store.root)
    version = store.manifest(outputs["package"]).metrics["version"]
    registry = ModelRegistry(registry_root(store))
    production = registry.get(config.package.model_name, "production")
    assert production.version == version
    assert load_bundle(production.path).version == version
    assert [move["to"] for move in registry.history(config.package.model_name)] == [version]


def test_kiln_predict_agrees_with_the_pipelines_own_evaluation(pipeline_run, tmp_path, capsys):
    from PIL import Image

    config, outputs = pipeline_run
    store = ArtifactStore(config.store.root)
    images, _ = read_split(store.materialize(outputs["download"]), "test")
    chosen = load_bundle(bundle_location(outputs["package"], store)[0]).manifest["chosen_variant"]
    expected = np.load(store.materialize(outputs["compress"]) / f"predictions.{chosen}.npy")
    paths = []
    for index in range(12):
        path = tmp_path / f"digit_{index}.png"
        Image.fromarray(images[index][:, :, 0]).save(path)
        paths.append(str(path))
    _, archive = bundle_location(outputs["package"], store)
    assert kiln_main(["predict", archive, *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    predicted = [int(line.split("\t")[1]) for line in lines]
    assert predicted == expected[:12].tolist()


def test_second_identical_run_reuses_every_stage(pipeline_run):
    config, first = pipeline_run
    second = training_pipeline(config)
    assert all(ref.reused for ref in second.values()), {name: ref.reused for name, ref in second.items()}
    assert {name: ref.key for name, ref in second.items()} == {name: ref.key for name, ref in first.items()}
    third_state = training_pipeline(config, return_state=True)  # now served by Prefect's cache, keyed on the hashes
    third = third_state.result()
    assert {name: ref.digest for name, ref in third.items()} == {name: ref.digest for name, ref in first.items()}
    states = task_run_states(third_state.state_details.flow_run_id)
    assert {name: states[name] for name in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert states["gate"] == "Completed"  # the gate is never cached: it must judge every run


def test_changing_one_section_recomputes_only_downstream(pipeline_run):
    config, first = pipeline_run
    changed = config.model_copy(update={"compress": config.compress.model_copy(update={"calibration_samples": 64})})
    outputs = training_pipeline(changed)
    recomputed = {name for name, ref in outputs.items() if not ref.reused}
    assert recomputed == {"compress", "package"}


def test_kiln_predict_needs_neither_torch_nor_prefect(pipeline_run, tmp_path):
    """The bundle runtime is onnxruntime + numpy + pillow: predicting must not import the training stack."""
    import subprocess
    import sys

    from PIL import Image

    config, outputs = pipeline_run
    image = tmp_path / "blank.png"
    Image.new("L", (8, 8), 0).save(image)
    bundle, _ = bundle_location(outputs["package"], ArtifactStore(config.store.root))
    probe = (
        "import sys; from kiln.cli import main; "
        f"rc = main(['predict', {bundle!r}, {str(image)!r}]); "
        "print(sorted(name for name in ('torch', 'prefect', 'onnx', 'great_expectations') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_failed_run_gets_a_summary_artifact_naming_the_stage(pipeline_run):
    """The on_failure hook: a gate the model cannot pass fails the run, and the UI says where and why."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    config, _ = pipeline_run
    strict = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"min_accuracy": 1.0})})
    state = training_pipeline(strict, return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    summary = next(artifact.data for artifact in artifacts if artifact.key == "kiln-failure")
    assert "| gate |" in summary and "min_accuracy" in summary


def test_flipped_bytes_in_stored_outputs_are_recomputed_by_the_next_run(pipeline_run, caplog):
    """Byte flips in the downloaded images and the trained weights: the next run (whose Prefect cache would otherwise
    hand on references to them) rebuilds both, moves the corrupt copies aside, and finishes with a valid bundle.
    (Download is rebuilt bit for bit, so train is keyed as before and finds its own output corrupt.)"""
    import logging

    from kiln.store import CORRUPT_DIR

    config, first = pipeline_run
    store = ArtifactStore(config.store.root)
    corrupted = {}
    for stage in ("download", "train"):
        entry = max(store.manifest(first[stage]).files, key=lambda file: file.size)  # the images / the weights
        path = Path(first[stage].uri) / entry.path
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        corrupted[stage] = path

    with caplog.at_level(logging.WARNING, logger="kiln"):
        outputs = training_pipeline(config)

    assert not outputs["download"].reused and not outputs["train"].reused
    assert outputs["download"].digest == first["download"].digest
    for stage, path in corrupted.items():
        assert f"{path} is corrupted" in caplog.text
        store.verify(outputs[stage])
    assert sorted(entry.name.split("-")[0] for entry in (Path(store.root) / CORRUPT_DIR).iterdir()) == ["download", "train"]
    load_bundle(bundle_location(outputs["package"], store)[0])
