"""compose.yaml and the Dockerfile stay true to the code: real verbs, real settings, files that exist.

No Docker engine runs here, so these are static checks of what `docker compose up` would run.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import yaml

from middleware.cli import build_parser
from middleware.settings import GatewaySettings, SchedulerSettings
from workers.settings import WorkerSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
ROLES = {"scheduler": SchedulerSettings, "worker": WorkerSettings, "gateway": GatewaySettings}


def alignq_services(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items()
            if str(service.get("image", "")).startswith("alignq")}


def verb_of(command: list[str]) -> str:
    return next(token for token in command if not token.startswith("-"))


def test_services_are_redis_and_the_three_roles() -> None:
    default = {name for name, service in COMPOSE["services"].items() if not service.get("profiles")}
    assert default == {"redis", "scheduler", "worker", "gateway"}
    redis = COMPOSE["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in COMPOSE["volumes"]


@pytest.mark.parametrize("name", sorted(alignq_services(COMPOSE)))
def test_service_command_is_a_real_alignq_verb(name: str) -> None:
    service = alignq_services(COMPOSE)[name]
    command = service["command"]
    assert isinstance(command, list) and name.split("-")[0] == verb_of(command)  # each role runs its own verb
    args = build_parser().parse_args(command)  # SystemExit on an unknown verb or flag
    assert callable(args.func)
    assert "replicas" not in service.get("deploy", {}), "scale workers with --scale, not a fixed count"


@pytest.mark.parametrize("name", sorted(alignq_services(COMPOSE)))
def test_environment_names_are_settings_fields(name: str) -> None:
    service = alignq_services(COMPOSE)[name]
    environment = service["environment"]
    settings_type = ROLES[verb_of(service["command"])]
    for key, value in environment.items():
        assert key.startswith("ALIGNQ_"), key
        field = key.removeprefix("ALIGNQ_").lower()
        assert field in settings_type.model_fields, f"{name}: {key} is not a {settings_type.__name__} field"
        settings_type(**{field: value})  # the value validates


def test_documented_gpu_per_replica_pattern_is_valid() -> None:
    text = (ROOT / "compose.yaml").read_text()
    block = re.search(r"^  # worker-gpu1:\n((?:  #.*\n)+)", text, re.MULTILINE)
    assert block, "compose.yaml lacks the one-GPU-per-replica example"
    uncommented = "\n".join(line.replace("  # ", "  ", 1) for line in ("  # worker-gpu1:\n" + block.group(1)).splitlines())
    anchors = "x-alignq-env: &alignq-env\n  ALIGNQ_REDIS_URL: redis://redis:6379/0\nservices:\n"
    service = yaml.safe_load(anchors + uncommented)["services"]["worker-gpu1"]
    assert verb_of(service["command"]) == "worker"
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["device_ids"] == ["1"] and device["capabilities"] == ["gpu"]
    for key in service["environment"]:
        assert key.removeprefix("ALIGNQ_").lower() in WorkerSettings.model_fields


def test_dockerfile_copies_files_that_exist_and_installs_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    copies = [shlex.split(line)[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copies
    for args in copies:
        sources = [arg for arg in args[:-1] if not arg.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source not in ignored, f"{source} is excluded by .dockerignore"
    for package in ("schemas", "middleware", "workers"):
        assert any(package in args[0] for args in copies), f"the image lacks {package}/"
    assert re.search(r"pip install .*torch==\$\{TORCH_VERSION\}", dockerfile) and "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert re.search(r"^RUN pip install (\.|\"\.\[[a-z,]*\]\") ", dockerfile, re.MULTILINE), "the image installs the project"
    assert 'ENTRYPOINT ["alignq"]' in dockerfile


def test_vllm_profile_workers_use_the_openai_backend_against_one_gpu() -> None:
    services = COMPOSE["services"]
    vllm, worker = services["vllm"], services["worker-vllm"]
    assert vllm["profiles"] == ["vllm"] == worker["profiles"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"]
    command = vllm["command"]
    served_name = command[command.index("--served-model-name") + 1]
    port = command[command.index("--port") + 1]
    settings = WorkerSettings(**{key.removeprefix("ALIGNQ_").lower(): value
                                 for key, value in worker["environment"].items()})
    assert settings.backend == "openai" and settings.backend_model == served_name
    assert settings.backend_url == f"http://vllm:{port}/v1"
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy" and "healthcheck" in vllm
    assert "replicas" not in worker.get("deploy", {})  # --scale worker-vllm=N
    assert "--profile vllm" in (ROOT / "compose.yaml").read_text()  # the documented command
