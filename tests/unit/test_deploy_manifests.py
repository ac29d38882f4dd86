"""examples/deploy (the issue's deploy/k8s/ and the Helm chart) stay true to the code: they parse, and
every ALIGNQ_* variable, CLI verb and jobs stream they name exists. No cluster runs here: static checks."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from middleware.cli import build_parser
from middleware.settings import GatewaySettings, SchedulerSettings
from schemas import WORKER_GROUP, Keys
from workers.settings import WorkerSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "examples" / "deploy" / "k8s"
CHART = ROOT / "examples" / "deploy" / "helm" / "alignq"
ROLES = {"scheduler": SchedulerSettings, "worker": WorkerSettings, "gateway": GatewaySettings}


def env_names(settings: type) -> set[str]:
    return {f"ALIGNQ_{name.upper()}" for name in settings.model_fields}


ALL_SETTINGS = set().union(*(env_names(cls) for cls in ROLES.values()))


def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers(docs: list[dict]) -> list[dict]:
    return [c for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")
            for c in doc["spec"]["template"]["spec"]["containers"]]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_has_redis_and_the_three_roles() -> None:
    docs = k8s_documents()
    names = {doc["metadata"]["name"] for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}
    assert names == {"redis", "alignq-scheduler", "alignq-worker", "alignq-gateway"}


@pytest.mark.parametrize("container", [c for c in containers(k8s_documents()) if c["image"].startswith("alignq")],
                         ids=lambda c: c["name"])
def test_k8s_containers_run_real_verbs_with_real_settings(container: dict) -> None:
    args = build_parser().parse_args(container["args"])  # SystemExit on an unknown verb or flag
    assert args.verb == container["name"] and callable(args.func)
    for var in container.get("env", []):
        assert var["name"] in env_names(ROLES[args.verb]), f"{var['name']} is no {args.verb} setting"


def test_k8s_config_map_names_real_settings() -> None:
    (config,) = [doc for doc in k8s_documents() if doc["kind"] == "ConfigMap"]
    assert set(config["data"]) <= ALL_SETTINGS, set(config["data"]) - ALL_SETTINGS
    assert {"ALIGNQ_REDIS_URL", "ALIGNQ_SHARDS", "ALIGNQ_REDIS_MIN_REPLICAS"} <= set(config["data"])


def test_keda_scales_the_worker_on_every_jobs_stream_lag() -> None:
    docs = k8s_documents()
    (scaled,) = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    (worker,) = [c for c in containers(docs) if c["name"] == "worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "alignq-worker" and scaled["spec"]["minReplicaCount"] >= 1
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert {t["metadata"]["stream"] for t in triggers} == set(Keys().all_job_streams())
    max_batch_jobs = {v["name"]: v["value"] for v in worker["env"]}["ALIGNQ_MAX_BATCH_JOBS"]
    for trigger in triggers:
        assert trigger["metadata"]["consumerGroup"] == WORKER_GROUP
        assert trigger["metadata"]["lagCount"] == max_batch_jobs  # one full batch waiting per worker


def test_helm_values_name_real_settings_and_streams() -> None:
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["name"] == "alignq"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["config"]) <= ALL_SETTINGS
    for role, settings in ROLES.items():
        assert set(values[role]["env"]) <= env_names(settings), role
    autoscaling = values["autoscaling"]
    assert set(autoscaling["jobStreams"]) == set(Keys().all_job_streams())
    assert autoscaling["consumerGroup"] == WORKER_GROUP
    assert autoscaling["lagCount"] == values["worker"]["env"]["ALIGNQ_MAX_BATCH_JOBS"]


@pytest.mark.parametrize("path", sorted((CHART / "templates").glob("*.yaml")), ids=lambda p: p.name)
def test_helm_templates_name_real_settings_and_verbs(path: pathlib.Path) -> None:
    text = path.read_text()
    assert text.count("{{") == text.count("}}")
    assert set(re.findall(r"ALIGNQ_[A-Z_]+", text)) <= ALL_SETTINGS
    for verb in re.findall(r'args: \["-v", "(\w+)"\]', text):
        assert callable(build_parser().parse_args(["-v", verb]).func)


def test_sharded_job_streams_cover_each_shard_and_lane() -> None:
    streams = Keys.sharded("alignq", 3).all_job_streams()
    assert len(set(streams)) == 9 and all(s.startswith("alignq:{s") for s in streams)
