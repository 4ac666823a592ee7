"""The KubeRay manifests: valid against the RayService CRD, generated from deploy/, monitored."""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.config import model_configs
from serving.k8s_manifests import ROOT, TARGETS, dashboard, manifest_text
from serving.metrics import exported_names

CRD = ROOT.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    assert CRD.exists(), f"the RayService CRD is expected at {CRD}"
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def manifests() -> list[Path]:
    return [ROOT / "k8s" / f"{t.name}.yaml" for t in TARGETS]


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_crd(path, schema):
    manifest = yaml.safe_load(path.read_text())
    jsonschema.validate(manifest, schema)
    broken = copy.deepcopy(manifest)
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):  # the validator does check
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_manifest_is_generated_from_deploy(target):
    path = ROOT / "k8s" / f"{target.name}.yaml"
    assert path.read_text() == manifest_text(target), "run: python -m serving.k8s_manifests"
    manifest = yaml.safe_load(path.read_text())
    embedded = manifest["spec"]["serveConfigV2"]
    assert embedded == (ROOT / "deploy" / target.serve_config).read_text()
    app = yaml.safe_load(embedded)["applications"][0]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    configs = model_configs(app["args"])
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert len(configs) == len(target.decoders)
    for cfg, group in zip(configs, target.decoders):
        decoder = groups[group.name]
        gpus = int(decoder["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= cfg.decoder.tensor_parallel_size  # one pod holds a whole placement group
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert groups[target.vision.name]["maxReplicas"] > groups[target.vision.name]["minReplicas"]
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_decoder_pods_follow_the_decoder_autoscaling_bounds(target):
    """The Ray autoscaler may add a decoder pod for each decoder replica Serve scales up to, of the
    shape that model needs: with several models, each decoder asks for its own group's resource."""
    configs = model_configs(yaml.safe_load((ROOT / "deploy" / target.serve_config).read_text())
                            ["applications"][0]["args"])
    for cfg, group in zip(configs, target.decoders, strict=True):
        decoder = cfg.decoder
        per_pod = group.gpus_per_pod // decoder.tensor_parallel_size
        assert decoder.num_replicas == "auto"
        assert group.min_replicas * per_pod == decoder.min_replicas
        assert group.max_replicas * per_pod == decoder.max_replicas
        if len(configs) > 1:
            assert group.resource in decoder.resources
            assert not any(group.resource in other.decoder.resources for other in configs if other is not cfg)
            # each of the replica's bundles asks a share; one pod (1 unit) holds one replica's bundles
            bundles = decoder.tensor_parallel_size + (1 if decoder.tensor_parallel_size > 1 else 0)
            assert bundles * decoder.resources[group.resource] <= 1


def test_podmonitor_selects_our_pods_on_the_metrics_port():
    monitor = yaml.safe_load((ROOT / "k8s" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for path in manifests():
        cluster = yaml.safe_load(path.read_text())["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        for group in pods:
            labels = group["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items()
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}


def test_dashboard_queries_only_exported_metrics():
    committed = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    assert committed == dashboard()
    exprs = [t["expr"] for p in committed["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_pixtral_[a-z_]+", e)}
    assert used and used <= exported_names(), used - exported_names()
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert bases == {re.sub(r"_(bucket|sum|count)$", "", m) for m in exported_names()}  # every metric has a panel
