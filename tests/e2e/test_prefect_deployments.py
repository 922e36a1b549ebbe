"""Deployments through a real Prefect server and a real process worker, then the flow run page in headless Chromium.

Everything runs on 127.0.0.1 with a temporary PREFECT_HOME: `prefect server start`, `prefect work-pool create`,
`prefect deploy --prefect-file deployments/prefect.yaml --all`, `prefect worker start`, `prefect deployment run`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.config import load_config
from tests.serving.conftest import free_port
from tests.support.chromium import Page, chromium_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "kiln-process"
RUN_TIMEOUT_S = 600
STAGE_ARTIFACTS = {"kiln-download", "kiln-validate", "kiln-augment", "kiln-train", "kiln-evaluate", "kiln-export",
                   "kiln-compress", "kiln-package", "kiln-registry", "kiln-train-progress", "kiln-download-progress",
                   "kiln-training-history",
                   "kiln-evaluation-per-class", "kiln-compression"}  # fmt: skip
CHROMIUM = chromium_path()


class PrefectStack:
    """A Prefect server and a process worker in subprocesses, and a way to run CLI commands against them."""

    def __init__(self, home: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"{self.url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes.append(subprocess.Popen([*PREFECT, *args], cwd=REPO, env=self.env, stdout=log, stderr=log))

    def cli(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run([*PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise AssertionError(f"the Prefect server did not start:\n{(self.logs / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    stack = PrefectStack(tmp_path_factory.mktemp("prefect-home"), free_port())
    try:
        stack.start("server", "server", "start", "--host", "127.0.0.1", "--port", stack.url.rsplit(":", 1)[1])
        stack.wait_healthy()
        stack.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
        stack.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--all", "--no-prompt")
        stack.start("worker", "worker", "start", "--pool", POOL)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


def config_params(store_root: Path) -> str:
    config = load_config("quickstart", overrides=[f"store.root={store_root}"])
    return json.dumps({"config": config.model_dump(mode="json")})


def run_deployment(stack: PrefectStack, name: str, params: str) -> str:
    """Start a run of deployment `name`, wait until it ends; return its flow run id."""
    output = stack.cli("deployment", "run", name, "--params", params)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    run_id = match.group(1)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = httpx.get(f"{stack.url}/api/flow_runs/{run_id}").json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert state["type"] == "COMPLETED", f"{name}: {state}\n{(stack.logs / 'worker.log').read_text()[-4000:]}"
            return run_id
        time.sleep(2)
    raise AssertionError(f"{name} did not finish in {RUN_TIMEOUT_S} s:\n{(stack.logs / 'worker.log').read_text()[-4000:]}")


def artifacts_of(stack: PrefectStack, run_id: str) -> dict[str, dict]:
    response = httpx.post(f"{stack.url}/api/artifacts/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    response.raise_for_status()
    return {artifact["key"]: artifact for artifact in response.json() if artifact["key"]}


@pytest.fixture(scope="module")
def train_run(stack, store_root) -> str:
    return run_deployment(stack, "training-pipeline/train", config_params(store_root))


def test_the_deployments_are_registered_with_a_config_form_and_a_schedule(stack):
    train = httpx.get(f"{stack.url}/api/deployments/name/training-pipeline/train").json()
    retrain = httpx.get(f"{stack.url}/api/deployments/name/retrain/retrain").json()
    assert train["work_pool_name"] == retrain["work_pool_name"] == POOL
    # The UI's run form is drawn from this schema: every config section, with each field's description.
    schema = json.dumps(train["parameter_openapi_schema"])
    for section in ("DataConfig", "TrainConfig", "EvaluateConfig", "PackageConfig"):
        assert section in schema
    assert "peak learning rate of the schedule" in schema
    assert [schedule["schedule"]["cron"] for schedule in retrain["schedules"]] == ["0 4 * * 1"]
    assert "RetrainPolicy" in json.dumps(retrain["parameter_openapi_schema"])


def test_the_train_deployment_runs_the_pipeline_on_a_worker(stack, store_root, train_run):
    run = httpx.get(f"{stack.url}/api/flow_runs/{train_run}").json()
    assert run["name"] == "quickstart-digits"
    bundles = list(store_root.glob("package/*/kiln-classifier-*/manifest.json"))
    assert len(bundles) == 1
    artifacts = artifacts_of(stack, train_run)
    assert STAGE_ARTIFACTS <= set(artifacts), sorted(artifacts)
    assert artifacts["kiln-train-progress"]["data"] == artifacts["kiln-download-progress"]["data"] == 100.0
    assert "production" in artifacts["kiln-registry"]["data"]
    assert bundles[0].parent.name in artifacts["kiln-package"]["data"]


def test_the_retrain_deployment_on_unchanged_data_finishes_without_training(stack, store_root, train_run):
    run_id = run_deployment(stack, "retrain/retrain", config_params(store_root))
    decision = artifacts_of(stack, run_id)["kiln-retrain-decision"]["data"]
    assert "no change" in decision
    pipeline_runs = httpx.post(f"{stack.url}/api/flow_runs/filter",
                               json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()  # fmt: skip
    subflows = httpx.post(f"{stack.url}/api/flows/filter", json={"flows": {"name": {"any_": ["training-pipeline"]}}})
    assert subflows.status_code == 200
    assert pipeline_runs == [] or all(run["flow_id"] != subflows.json()[0]["id"] for run in pipeline_runs)
    assert len(list(store_root.glob("package/*/kiln-classifier-*/manifest.json"))) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_flow_run_page_lists_the_runs_artifacts_in_chromium(stack, train_run, tmp_path):
    screenshot = tmp_path / "flow-run-artifacts.png"
    with Page(CHROMIUM) as page:
        text = page.run(f"{stack.url}/runs/flow-run/{train_run}", click_text="Artifacts", screenshot=screenshot)

    assert "quickstart-digits" in text and "Completed" in text
    shown = {key for key in STAGE_ARTIFACTS if key in text.split()}
    assert shown == STAGE_ARTIFACTS, sorted(STAGE_ARTIFACTS - shown)
    assert "Deployment bundle" in text and "Model registry" in text  # the artifacts' descriptions
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
