"""infra/: the KubeRay manifests and the Ray cluster launcher config, checked offline.

No Kubernetes here and no kubeconform with CRD schemas on the reachable registries, so
the KubeRay manifests are validated against minimal JSON schemas of the fields we use,
written from KubeRay's CRDs (ray-project/kuberay, ray-operator/config/crd/bases/
ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, apiVersion ray.io/v1). Where KubeRay
versions differ (older CRDs also require minReplicas, maxReplicas and rayStartParams on
every worker group, and rayStartParams on the head), the schemas require the stricter
set, which every version accepts. Spec objects reject unknown keys, so a misspelt field
fails here instead of being dropped silently by the API server's pruning. The cluster
launcher YAML is validated against the schema Ray itself ships.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"

QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}]}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "limits": {"type": "object", "additionalProperties": QUANTITY},
                "requests": {"type": "object", "additionalProperties": QUANTITY},
            },
        },
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "value": {"type": "string"},
                    "valueFrom": {"type": "object"},
                },
            },
        },
        "envFrom": {"type": "array", "items": {"type": "object"}},
        "volumeMounts": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "mountPath"]},
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
            },
        },
    },
}
HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "enableIngress": {"type": "boolean"},
        "headService": {"type": "object"},
        "rayStartParams": STR_MAP,
        "serviceType": {"type": "string"},
        "template": POD_TEMPLATE,
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "rayStartParams": STR_MAP,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
        "template": POD_TEMPLATE,
    },
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "autoscalerOptions": {"type": "object"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP,
        "headServiceAnnotations": STR_MAP,
        "managedBy": {"type": "string"},
        "rayVersion": {"type": "string"},
        "suspend": {"type": "boolean"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        # a DNS-1123 subdomain; KubeRay derives service names from it, so keep it short
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 50},
        "labels": STR_MAP,
    },
}
RAY_CLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": METADATA,
        "spec": RAY_CLUSTER_SPEC,
    },
}
RAY_JOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "clusterSelector": STR_MAP,
                "entrypoint": {"type": "string", "minLength": 1},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "entrypointResources": {"type": "string"},
                "jobId": {"type": "string"},
                "managedBy": {"type": "string"},
                "metadata": STR_MAP,
                "rayClusterSpec": RAY_CLUSTER_SPEC,
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "submitterConfig": {"type": "object"},
                "submitterPodTemplate": POD_TEMPLATE,
                "suspend": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            },
        },
    },
}
CONFIG_MAP = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "data"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": METADATA,
        "data": STR_MAP,
    },
}


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one document"
    return docs[0]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def job() -> dict:
    return _load(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def configmap() -> dict:
    return _load(KUBERAY / "configmap-example.yaml")


def _cluster_specs(cluster: dict, job: dict) -> list[tuple[str, dict]]:
    return [("raycluster.yaml", cluster["spec"]), ("rayjob.yaml", job["spec"]["rayClusterSpec"])]


def _containers(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec.get("workerGroupSpecs", []):
        out += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return out


def test_all_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/configmap-example.yaml",
        "cluster-launcher/aws.yaml",
    }
    for f in files:
        list(yaml.safe_load_all(f.read_text()))


def test_manifests_match_the_kuberay_schemas(cluster, job, configmap):
    jsonschema.validate(cluster, RAY_CLUSTER)
    jsonschema.validate(job, RAY_JOB)
    jsonschema.validate(configmap, CONFIG_MAP)


def test_schemas_catch_mistakes(cluster, job):
    """The schemas are not vacuous: typical slips are rejected."""
    import copy

    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_JOB)
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER)
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER)
    bad = copy.deepcopy(cluster)
    bad["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER)


def test_images_are_pinned_and_match_the_dockerfile(cluster, job):
    images = {c["image"] for _, spec in _cluster_specs(cluster, job) for _, c in _containers(spec)}
    images |= {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, f"head, workers and submitter must run one image: {images}"
    image = images.pop()
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), f"unpinned image {image}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    for where, spec in _cluster_specs(cluster, job):
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion must be the image's ray {ray_version}"


def test_worker_groups_have_gpu_limits(cluster, job):
    for where, spec in _cluster_specs(cluster, job):
        assert spec["workerGroupSpecs"], where
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            for c in group["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}/{group['groupName']}: no GPU limit"
                requests = c["resources"].get("requests", {})
                if "nvidia.com/gpu" in requests:  # Kubernetes insists extended resources match
                    assert str(requests["nvidia.com/gpu"]) == str(limits["nvidia.com/gpu"])
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), f"{where}: the head needs no GPU"


def _env_names_from_secrets(container: dict) -> set[str]:
    names = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    names |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    return names


def test_credentials_come_from_secrets_only(cluster, job):
    secretish = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)
    for where, spec in _cluster_specs(cluster, job):
        for group, c in _containers(spec):
            # every Ray process may touch the object store: each container gets the Secret
            assert _env_names_from_secrets(c) == {"strata-object-store"}, f"{where}/{group}"
            for e in c.get("env", []):
                if secretish.search(e["name"]):
                    assert "value" not in e, f"{where}/{group}: {e['name']} has a literal value"
    for f in INFRA.rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{f}: an AWS access key id"
            assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{20,}", text), f
            assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), f
            for doc in yaml.safe_load_all(text) if f.suffix in (".yaml", ".yml") else []:
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{f}: a Secret in the repo"


def test_rayjob_runs_the_configmap_config(job, configmap):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["strata", "run"], argv
    config_path = Path(argv[2])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = [m for m in head["containers"][0]["volumeMounts"] if config_path.parent == Path(m["mountPath"])]
    assert len(mounts) == 1, f"no head mount at {config_path.parent} for the entrypoint's config"
    volume = volumes[mounts[0]["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = next((i["key"] for i in volume["configMap"].get("items", []) if i["path"] == config_path.name), None)
    assert (key or config_path.name) in configmap["data"], f"ConfigMap has no key for {config_path.name}"
    # the CLI parses the rest of the entrypoint
    from strata_quant.pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv[1:], "--help"])
    assert exit_.value.code == 0


def test_configmap_job_is_a_valid_resumable_config(job, configmap):
    from strata_quant.pipeline.config import parse_config

    cfg = parse_config(yaml.safe_load(configmap["data"]["job.yaml"]), "configmap-example.yaml")
    assert cfg.run.store.startswith("s3://"), "a run that must survive its cluster needs an object-store record"
    assert cfg.run.run_id, "a fixed run_id lets a retried RayJob resume instead of starting over"
    gpus = sum(
        g.get("replicas", g["minReplicas"])
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.run.workers == gpus, f"run.workers {cfg.run.workers} != {gpus} GPUs in the worker group"
    mounts = {
        m["mountPath"]
        for _, c in _containers(job["spec"]["rayClusterSpec"])
        for m in c.get("volumeMounts", [])
        if m["name"] == "models"
    }
    assert mounts == {"/models"} and cfg.model.startswith("/models/"), "every pod must see the checkpoint"


def test_cluster_launcher_config_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(INFRA / "cluster-launcher" / "aws.yaml")
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "no GPU node type"
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "strata" in setup, "setup_commands must install the project"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for arg, pkg in (("RAY_VERSION", "ray[default]"), ("TORCH_VERSION", "torch")):
        version = re.search(rf"^ARG {arg}=(\S+)$", dockerfile, re.M).group(1)
        assert f"{pkg}=={version}" in setup, f"launcher nodes and the image must share {pkg} {version}"
    # and the schema does bite
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_worker": 3}, schema)


def test_cluster_doc_walks_through_every_file():
    readme = (ROOT / "docs" / "cluster.md").read_text()
    for name in ("raycluster.yaml", "rayjob.yaml", "configmap-example.yaml", "aws.yaml", "strata-object-store"):
        assert name in readme, name
    for step in ("kubectl apply", "strata submit", "strata status", "strata logs", "resume", "pre-empt"):
        assert step.lower() in readme.lower(), step
