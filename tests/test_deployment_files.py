"""Lint of deployments/: the Prefect deployment files, the work pools' base job templates and the pipeline image.

Nothing here starts a Prefect server, Docker or Kubernetes (tests/e2e/test_prefect_deployments.py deploys and runs
deployments/prefect.yaml on a real server and process worker). What is checked is what `prefect deploy`, the Prefect
server and the workers would check or do with these files, using Prefect's own code where it has it:

- every YAML/JSON file in deployments/ loads; Prefect's prefect.yaml model accepts each deployment file as
  `prefect deploy` reads it, its schedules build, its pull steps import;
- every entrypoint resolves (as `prefect deploy` loads it) to the flow object of the module it names;
- every deployment's parameters bind to the flow's signature, pass the JSON-schema validation the server applies to
  a flow run's parameters, and pass kiln's own config validation (cross-section rules included); a config naming a
  profile writes out every key of that profile, since keys it leaves out take kiln/config.py's defaults instead;
- every work pool a deployment names has a documented `prefect work-pool create` command (README and the file's
  header) with the type and base job template it needs; the job variables are declared by that template and pass the
  server's validation; the rendered Kubernetes manifest asks for as many GPUs as the config's train.devices uses and
  mounts the store; docker-py accepts the Docker deployments' container arguments;
- the Dockerfile installs the Makefile's torch pin, runs as the user the Kubernetes template expects, and has the
  working directory the deployments' pull step changes to.
"""

from __future__ import annotations

import inspect
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.importtools import import_object
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import apply_values, find_placeholders
from prefect.workers.base import BaseJobConfiguration
from rich.console import Console

from kiln.config import RetrainPolicy, parse_config, profile_values

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = REPO / "deployments"
PREFECT_FILES = sorted(DEPLOYMENTS.glob("prefect*.yaml"))
DOCKERFILE = DEPLOYMENTS / "Dockerfile"
CREATE_POOL = re.compile(r"prefect work-pool create (\S+) --type (\S+)(?: --base-job-template (\S+))?")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def deployments() -> list[tuple[str, dict[str, Any]]]:
    """(file name, deployment) for every deployment of every prefect*.yaml, merge keys resolved."""
    return [(path.name, deployment) for path in PREFECT_FILES for deployment in load_yaml(path)["deployments"]]


DEPLOYMENTS_BY_ID = {f"{name}:{deployment['name']}": deployment for name, deployment in deployments()}


def documented_pools(text: str) -> dict[str, tuple[str, str | None]]:
    """pool name -> (type, base job template path or None) from the `prefect work-pool create` commands in text."""
    return {name: (kind, template) for name, kind, template in CREATE_POOL.findall(text)}


def header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))


ALL_POOLS = documented_pools((DEPLOYMENTS / "README.md").read_text())


def pool_template(pool: str) -> dict[str, Any] | None:
    template = ALL_POOLS[pool][1]
    return json.loads((REPO / template).read_text()) if template else None


def flow_of(deployment: dict[str, Any]) -> Flow:
    module_path, function = deployment["entrypoint"].split(":")
    module = __import__(module_path.removesuffix(".py").replace("/", "."), fromlist=[function])
    return getattr(module, function)


def rendered_job(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker builds: the template's defaults, overridden by the deployment's variables,
    substituted into the template (BaseJobConfiguration.from_template_and_values, minus block/variable lookups)."""
    values = {**BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"]), **job_variables}
    return apply_values(template["job_configuration"], values)


def test_there_are_process_docker_and_kubernetes_deployment_files():
    assert [path.name for path in PREFECT_FILES] == ["prefect-docker.yaml", "prefect-k8s.yaml", "prefect.yaml"]
    for path in DEPLOYMENTS.iterdir():
        if path.suffix in (".yaml", ".yml"):
            assert isinstance(load_yaml(path), dict), path
        elif path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path


@pytest.mark.parametrize("path", PREFECT_FILES, ids=lambda path: path.name)
def test_prefect_deploy_reads_the_file_without_complaint(path):
    console_output = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(path, console=Console(file=console_output))
    # On any problem prefect prints it and skips the file's deployments; here it must say nothing.
    assert console_output.getvalue() == ""
    raw = load_yaml(path)
    assert [config["name"] for config in configs] == [deployment["name"] for deployment in raw["deployments"]]
    for step in (actions["pull"] or []) + actions["build"] + actions["push"]:
        for function in step:
            assert callable(import_object(function)), function
    for config in configs:
        for schedule in config.get("schedules") or []:
            built = _schedule_config_to_deployment_schedule(schedule)
            assert built["schedule"].cron == schedule["cron"]


def test_the_process_file_needs_only_the_process_pool():
    # tests/e2e/test_prefect_deployments.py deploys deployments/prefect.yaml with --all after creating only this pool.
    pools = {deployment["work_pool"]["name"] for deployment in load_yaml(DEPLOYMENTS / "prefect.yaml")["deployments"]}
    assert pools == {"kiln-process"}


def test_deployment_names_are_unique_per_flow_across_files():
    names = [(deployment["entrypoint"], deployment["name"]) for _, deployment in deployments()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("deployment_id", DEPLOYMENTS_BY_ID)
def test_the_entrypoint_is_the_flow_and_the_parameters_fit_it(deployment_id, monkeypatch):
    deployment = DEPLOYMENTS_BY_ID[deployment_id]
    flow = flow_of(deployment)
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is not a Prefect flow"
    monkeypatch.chdir(REPO)  # entrypoints are relative to the repository root, where `prefect deploy` runs
    loaded = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(loaded, Flow) and loaded.name == flow.name

    parameters = deployment.get("parameters") or {}
    inspect.signature(flow.fn).bind(**parameters)  # no unknown parameter names
    # The server's check of a flow run's parameters (enforce_parameter_schema is on by default).
    validate(parameters, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)
    if "config" in parameters:
        config = parse_config(parameters["config"])  # kiln's own validation, cross-section rules included
        if config.profile != "quickstart":
            missing = sorted(
                f"{section}.{key}"
                for section, values in profile_values(config.profile).items()
                for key in (values or {})
                if key not in (parameters["config"].get(section) or {})
            )
            assert not missing, f"{deployment_id}: profile {config.profile} sets {missing}, which this config omits"
            stale = sorted(
                f"{section}.{key}: {parameters['config'][section][key]!r}, the profile {value!r}"
                for section, values in profile_values(config.profile).items()
                for key, value in (values or {}).items()
                if parameters["config"][section][key] != value
            )
            assert not stale, f"{deployment_id}: written out from profile {config.profile}, but differs: {stale}"
    if "policy" in parameters:
        RetrainPolicy.model_validate(parameters["policy"])


def test_every_work_pool_has_a_documented_create_command():
    for path in PREFECT_FILES:
        in_header = documented_pools(header(path))
        for deployment in load_yaml(path)["deployments"]:
            pool = deployment["work_pool"]["name"]
            assert pool in ALL_POOLS, f"deployments/README.md has no `prefect work-pool create {pool}`"
            assert in_header.get(pool) == ALL_POOLS[pool], f"{path.name}'s header documents {pool} differently"
    assert ALL_POOLS["kiln-process"][0] == "process"
    assert ALL_POOLS["kiln-docker"] == ("docker", "deployments/docker-base-job-template.json")
    assert ALL_POOLS["kiln-k8s"] == ("kubernetes", "deployments/k8s-base-job-template.json")


@pytest.mark.parametrize("template_path", sorted(DEPLOYMENTS.glob("*-base-job-template.json")), ids=lambda p: p.name)
def test_the_base_job_templates_are_valid(template_path):
    template = json.loads(template_path.read_text())
    variables = template["variables"]
    is_valid_schema(variables, preprocess=False)  # what the server checks when the pool is created
    defaults = BaseJobConfiguration._get_base_config_defaults(variables["properties"])
    validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert used <= set(variables["properties"]), f"undeclared: {sorted(used - set(variables['properties']))}"


@pytest.mark.parametrize("deployment_id", DEPLOYMENTS_BY_ID)
def test_the_job_variables_fit_the_pool(deployment_id):
    deployment = DEPLOYMENTS_BY_ID[deployment_id]
    job_variables = deployment["work_pool"].get("job_variables") or {}
    template = pool_template(deployment["work_pool"]["name"])
    if template is None:
        assert not job_variables, "a pool created without a template file: its job variables cannot be checked"
        return
    variables = template["variables"]
    # Prefect ignores job variables its template does not declare; here they are mistakes.
    assert set(job_variables) <= set(variables["properties"]), sorted(set(job_variables) - set(variables["properties"]))
    # The server's check when a flow run is created: the template's defaults overlaid with the deployment's values.
    values = {**BaseJobConfiguration._get_base_config_defaults(variables["properties"]), **job_variables}
    validate(values, variables, raise_on_error=True, preprocess=True, ignore_required=False,
             allow_none_with_default=True)  # fmt: skip


def gpus_used_by(config_values: dict[str, Any], visible: int) -> int:
    """How many GPUs the train stage uses when the container sees `visible` (kiln/distributed.py world_size)."""
    devices = parse_config(config_values).train.devices
    return visible if devices == "auto" else int(devices)


@pytest.mark.parametrize("deployment_id", [key for key in DEPLOYMENTS_BY_ID if key.startswith("prefect-k8s.yaml:")])
def test_the_kubernetes_job_asks_for_the_gpus_the_run_uses_and_mounts_the_store(deployment_id):
    deployment = DEPLOYMENTS_BY_ID[deployment_id]
    job_variables = deployment["work_pool"]["job_variables"]
    job = rendered_job(pool_template("kiln-k8s"), job_variables)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == job_variables["gpus"] >= 1
    config_values = deployment["parameters"]["config"]
    config = parse_config(config_values)
    assert gpus_used_by(config_values, gpus) == gpus, "train.devices does not use every GPU the pod asks for"
    assert config.train.batch_size % gpus == 0, "the global batch must split evenly over the ranks"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm"
    if "://" not in config.store.root:
        assert Path(config.store.root).is_relative_to(job_variables.get("store_mount", "/mnt/kiln"))
        assert mounts[job_variables.get("store_mount", "/mnt/kiln")] == "kiln-store"
    else:
        assert container["envFrom"][0]["secretRef"]["name"] == job_variables.get("store_secret", "kiln-store-s3")
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert container["image"] == job_variables["image"]


@pytest.mark.parametrize("deployment_id", [key for key in DEPLOYMENTS_BY_ID if key.startswith("prefect-docker.yaml:")])
def test_the_docker_container_gets_the_gpus_the_run_uses_and_the_store(deployment_id):
    docker_models = pytest.importorskip("docker.models.containers")  # docker-py comes with prefect
    deployment = DEPLOYMENTS_BY_ID[deployment_id]
    job = rendered_job(pool_template("kiln-docker"), deployment["work_pool"]["job_variables"])
    extra = job["container_create_kwargs"]
    # The arguments DockerWorker passes to docker-py's containers.create (its own fields plus container_create_kwargs).
    arguments = docker_models._create_container_args({
        "image": job["image"], "volumes": job["volumes"], "environment": job["env"], "version": "1.44", **extra,
    })  # fmt: skip
    (request,) = arguments["host_config"]["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]]
    config_values = deployment["parameters"]["config"]
    config = parse_config(config_values)
    assert gpus_used_by(config_values, request["Count"]) == request["Count"] >= 1
    targets = [volume.split(":")[1] for volume in job["volumes"]]
    if "://" not in config.store.root:
        assert any(Path(config.store.root).is_relative_to(target) for target in targets), "store.root is not mounted"
    else:
        assert "AWS_ENDPOINT_URL_S3" in job["env"]


def dockerfile_user() -> int:
    users = re.findall(r"^USER (\d+)(?::\d+)?$", DOCKERFILE.read_text(), flags=re.M)
    assert users, "the Dockerfile must switch to a numeric non-root USER"
    return int(users[-1])


def test_the_dockerfile_installs_the_makefile_torch_pin_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    (makefile_pin,) = re.findall(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    (dockerfile_pin,) = re.findall(r'^ARG TORCH_SPEC="(.+)"$', text, flags=re.M)
    assert dockerfile_pin == makefile_pin.strip()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, flags=re.M)
    assert 'pip install --index-url "${TORCH_INDEX}" ${TORCH_SPEC}' in text
    assert 'pip install ".[s3]"' in text
    assert dockerfile_user() != 0
    assert "PREFECT_API_URL" not in re.sub(r"#.*", "", text), "the work pool's worker sets the API URL"
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", text, flags=re.M)
    for path in PREFECT_FILES:
        if path.name != "prefect.yaml":  # the process pool runs in the repository the deploy recorded
            (step,) = load_yaml(path)["pull"]
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    ignored = (DEPLOYMENTS / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "artifacts"} <= set(ignored)
    assert not {"pyproject.toml", "README.md", "kiln", "flows", "tasks"} & set(ignored)
