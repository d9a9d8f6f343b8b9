"""infra/: the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate, strict: an unknown
field is an error), the kustomization against its files, the Prefect Kubernetes work pool's base job template
rendered with its defaults, and the compose file against the same services and secrets.

kustomize itself is not installable here (neither on the package index nor in Debian), so what it would check is
checked directly: every listed resource exists, every manifest is listed (or is a documented stand-alone file), and
every secret key a manifest reads is in the example secret.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "infra" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # a release current clusters run; the schemas are those of kubernetes-validate
STAND_ALONE = {"secret.example.yaml", "jobs/train-gpu.yaml"}  # applied by hand, on purpose (see their headers)
SERVICES = {"postgres", "mlflow", "prefect-server", "prefect-worker", "crosssim-serve"}


def _manifests() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.mark.parametrize("path", _manifests(), ids=lambda path: str(path.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path):
    for document in _documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {str(path.relative_to(K8S)) for path in _manifests()}
    assert listed <= files, f"listed but missing: {listed - files}"
    assert files - listed == STAND_ALONE
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.split("=")[-1]).is_file(), entry
    generated = {generator["name"] for generator in kustomization["configMapGenerator"]}
    (postgres,) = [doc for doc in _documents(K8S / "postgres.yaml") if doc["kind"] == "StatefulSet"]
    assert {volume["configMap"]["name"] for volume in postgres["spec"]["template"]["spec"]["volumes"]} == generated
    kinds = {(doc["kind"], doc["metadata"]["name"]) for name in listed for doc in _documents(K8S / name)}
    for service in SERVICES - {"prefect-worker"}:
        assert ("Service", service) in kinds
    assert {("HorizontalPodAutoscaler", "crosssim-serve"), ("Deployment", "prefect-worker")} <= kinds


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    template = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))
    return template.get("spec", {}).get("containers", [])


def test_the_server_containers_have_probes_and_resources_and_serve_scales():
    for path in _manifests():
        for document in _documents(path):
            for container in _containers(document):
                assert "requests" in container.get("resources", {}), f"{path.name}: {container['name']} has no requests"
                if document["kind"] in ("Deployment", "StatefulSet"):
                    assert "livenessProbe" in container, f"{path.name}: {container['name']} has no liveness probe"
    (serve,) = [doc for doc in _documents(K8S / "serve.yaml") if doc["kind"] == "Deployment"]
    (container,) = _containers(serve)
    assert (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]) == (
        "/readyz",
        "/healthz",
    )
    (gpu_job,) = _documents(K8S / "jobs" / "train-gpu.yaml")
    (trainer,) = _containers(gpu_job)
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] >= 1 and trainer["command"] == ["torchrun"]


def _secret_keys_read(text: str) -> set[str]:
    keys = set()
    for document in yaml.safe_load_all(text):
        for container in _containers(document or {}):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["name"] == "crosssim-secrets"
                    keys.add(reference["key"])
    return keys


def test_every_secret_key_read_is_in_the_example_secret():
    (example,) = _documents(K8S / "secret.example.yaml")
    read = set().union(*(_secret_keys_read(path.read_text()) for path in _manifests()))
    assert read and read <= set(example["stringData"])


def _render(value, defaults: dict):
    """Prefect's placeholder substitution, for the template's defaults: a value that is one whole placeholder
    becomes the variable's value (any type), a placeholder inside a string is replaced as text."""
    if isinstance(value, dict):
        return {key: _render(item, defaults) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, defaults) for item in value]
    if isinstance(value, str):
        whole = re.fullmatch(r"\{\{ *(\w+) *\}\}", value)
        if whole:
            return defaults[whole.group(1)]
        return re.sub(r"\{\{ *(\w+) *\}\}", lambda match: str(defaults[match.group(1)]), value)
    return value


def test_the_prefect_kubernetes_base_job_template_renders_a_valid_gpu_job():
    template = json.loads((REPO / "infra" / "prefect" / "kubernetes-base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(variables), f"placeholders without a variable: {used - set(variables)}"
    defaults = {name: spec.get("default") for name, spec in variables.items()}
    defaults["command"] = ["prefect", "flow-run", "execute"]  # what the worker sets
    job = _render(template["job_configuration"]["job_manifest"], defaults)
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x"  # the API server completes generateName
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": k, "value": v} for k, v in env.items()]
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)  # the worker turns the env mapping into this
    (container,) = _containers(job)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == "crosssim:latest"


def _env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(pairs)


def test_the_compose_file_runs_the_same_services_with_the_same_settings():
    """Each compose service gets every variable its Kubernetes twin sets (from its environment or the env file that
    also makes the Kubernetes secret), and that file has exactly the example secret's keys."""
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    secrets = _env_file(REPO / "infra" / "secret.env.example")
    (example,) = _documents(K8S / "secret.example.yaml")
    assert set(secrets) == set(example["stringData"])
    twins = {"postgres": "postgres", "mlflow": "mlflow", "prefect-server": "prefect-server", "crosssim-serve": "serve"}
    for path in _manifests():
        for document in _documents(path):
            name = document["metadata"]["name"]
            if document["kind"] not in ("Deployment", "StatefulSet") or name not in twins:
                continue
            service = compose["services"][twins[name]]
            available = set(service.get("environment") or {}) | (set(secrets) if service.get("env_file") else set())
            for container in _containers(document):
                wanted = {variable["name"] for variable in container.get("env", [])} - {"PGDATA"}  # the volume layout
                assert wanted <= available, f"compose {twins[name]} lacks {wanted - available}"
    assert compose["services"]["postgres"]["volumes"][1].startswith("./k8s/postgres-databases.sql:")
