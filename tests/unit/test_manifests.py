"""The cluster manifests validate against the schemas their tools use: KubeRay's CRDs, Ray's."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
# The CRDs are not copied into the project: they sit in shared/ beside the checkout.
CRDS = Path(os.environ.get("DISTDL_KUBERAY_CRDS")
            or REPO.parent / "shared" / "kuberay-crds")
MANIFESTS = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml",
             "rayservice.yaml": "ray.io_rayservices.yaml"}


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does.

    Kubernetes prunes fields a structural schema does not name; plain JSON Schema accepts them,
    so a misspelt field would pass unnoticed.
    """
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@functools.lru_cache(maxsize=None)
def _crd_schema(crd_file: str, version: str) -> dict:
    # The CRDs are megabytes of YAML: libyaml's loader reads them about ten times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=loader)
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    return _strict(served[version]["schema"]["openAPIV3Schema"])


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found in {CRDS} "
                                              "(set DISTDL_KUBERAY_CRDS)")
@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_kuberay_manifest_matches_crd(manifest):
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / manifest).read_text())
    schema = _crd_schema(MANIFESTS[manifest], doc["apiVersion"].split("/")[1])
    jsonschema.validate(doc, schema)
    assert doc["spec"], "an empty spec proves nothing"


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found in {CRDS}")
def test_strict_schema_refuses_a_misspelt_field():
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema(MANIFESTS["raycluster.yaml"], "v1"))


def _kuberay(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / "kuberay" / name).read_text())


def test_kuberay_gpu_workers_have_shm_and_token_auth():
    cluster, job, service = (_kuberay(f"ray{kind}.yaml") for kind in ("cluster", "job", "service"))
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"],
                 service["spec"]["rayClusterConfig"]):
        assert spec["authOptions"]["mode"] == "token"
        pod = spec["workerGroupSpecs"][0]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "distdl.cli train" in job["spec"]["entrypoint"]


def test_rayservice_embeds_what_serve_build_writes():
    from distdl.inference import deploy

    embedded = yaml.safe_load(_kuberay("rayservice.yaml")["spec"]["serveConfigV2"])
    # The options of the command in the manifest's header comment.
    options = deploy.ServeOptions(replicas=None, min_replicas=1, max_replicas=4, num_cpus=2,
                                  num_gpus=1, max_batch_size=32, host="0.0.0.0")
    checkpoint = embedded["applications"][0]["args"]["checkpoint"]
    assert embedded == deploy.serve_config([("vision", checkpoint)], options)


def test_aws_config_matches_ray_schema():
    # Found without importing ray: unit tests stay free of it.
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["max_workers"] > 0
