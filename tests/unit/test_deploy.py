"""The deployment files are parsed and checked against the code they deploy (they cannot run here: no Docker engine,
no cluster)."""

import json
import re
from pathlib import Path

import yaml

from processor.metrics import Metrics
from processor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_NAMES = set(Settings.env_names().values())
EXTERNAL_ENV = {"HF_TOKEN", "HF_HOME"}  # read by huggingface_hub, not by the settings class


def load_yaml_documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_dockerfile_follows_the_adr():
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1] == "FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04"
    assert "VLLM_USE_V1=0" in text and "ENGINE=vllm" in text
    assert re.search(r"^USER worker$", text, re.M) and "useradd" in text, "runs as a non-root user"
    assert "HF_HOME=/var/cache/huggingface" in text and 'VOLUME ["/var/cache/huggingface"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["python3", "-m", "processor"]' in text and 'CMD ["run"]' in text
    assert "pip install -r requirements.txt" in text


def test_requirements_pin_vllm_and_its_era():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert pins["vllm"] == "0.6.3"
    assert pins["transformers"].startswith("4.46")
    assert "numpy<2" in (ROOT / "requirements.txt").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "vllm" not in dev and f"transformers=={pins['transformers']}" in dev, "one tokenizer path for both engines"


def test_compose_services_volume_gpu_and_env_names():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    init = " ".join(services["kafka-init"]["command"])
    defaults = Settings()
    for topic in (defaults.kafka_input_topic, defaults.kafka_output_topic, defaults.kafka_dlq_topic):
        assert topic in init
    processor = services["processor"]
    devices = processor["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "huggingface-cache:/var/cache/huggingface" in processor["volumes"]
    assert "huggingface-cache" in compose["volumes"]
    assert processor["env_file"] == ".env"
    assert set(processor["environment"]) <= ENV_NAMES | EXTERNAL_ENV
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]


def test_env_example_has_the_adr_values_under_the_settings_names():
    values = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")
    )
    assert set(values) <= ENV_NAMES | EXTERNAL_ENV, set(values) - ENV_NAMES
    assert values["VLLM_MODEL"] == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert values["VLLM_QUANTIZATION"] == "awq"
    assert values["VLLM_GPU_MEMORY_UTILIZATION"] == "0.92"
    assert values["VLLM_MAX_MODEL_LEN"] == "6144"
    assert values["VLLM_USE_V1"] == "0"
    Settings(**{k.lower(): v for k, v in values.items() if k in ENV_NAMES})  # and they validate


def test_kubernetes_manifests():
    k8s = ROOT / "deploy" / "k8s"
    config = yaml.safe_load((k8s / "configmap.yaml").read_text())
    assert set(config["data"]) <= ENV_NAMES
    Settings(**{k.lower(): v for k, v in config["data"].items()})
    secret = yaml.safe_load((k8s / "secret.example.yaml").read_text())
    assert set(secret["stringData"]) <= ENV_NAMES | EXTERNAL_ENV
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    assert pod["terminationGracePeriodSeconds"] > float(config["data"]["SHUTDOWN_TIMEOUT_S"]), "grace longer than the worst batch"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pdb = yaml.safe_load((k8s / "pdb.yaml").read_text())
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    scaled, auth = load_yaml_documents(k8s / "keda-scaledobject.yaml")
    trigger = scaled["spec"]["triggers"][0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["data"]["KAFKA_GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["data"]["KAFKA_INPUT_TOPIC"]
    partitions = int(re.search(r"--topic \$\$topic --partitions (\d+)", (ROOT / "docker-compose.yml").read_text()).group(1))
    assert scaled["spec"]["maxReplicaCount"] == partitions, "capped at the partition count"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert all((k8s / name).exists() for name in kustomization["resources"])


def test_grafana_dashboard_queries_metrics_that_exist():
    from prometheus_client import generate_latest

    exposed = generate_latest(Metrics().registry).decode()
    names = {re.sub(r"_(total|created)$", "", n) for n in re.findall(r"^# TYPE (\w+)", exposed, re.M)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "ai-worker.json").read_text())
    used = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"ai_worker_\w+", t["expr"])}
    base = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
    assert base <= names, base - names


def pins_of(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def test_the_dockerfile_builds_either_vllm_from_one_requirements_argument():
    text = (ROOT / "Dockerfile").read_text()
    arg = re.search(r"^ARG REQUIREMENTS=(\S+)$", text, re.M)
    assert arg and arg.group(1) == "requirements.txt", "the ADR's vLLM 0.6.3 stays the default"
    copy = re.search(r"^COPY \$\{REQUIREMENTS\} requirements\.txt$", text, re.M)
    install = text.index("pip install -r requirements.txt")
    assert copy and arg.start() < copy.start() < install
    assert "--build-arg REQUIREMENTS=requirements-vllm-current.txt" in text
    assert "requirements-vllm-current.txt" not in (ROOT / ".dockerignore").read_text()


def test_the_current_vllm_requirements_are_a_consistent_set():
    adr, current = pins_of("requirements.txt"), pins_of("requirements-vllm-current.txt")
    assert adr["vllm"] == "0.6.3" and current["vllm"] == "0.24.0"
    # What vllm 0.24.0's METADATA asks for: transformers>=5.5.3, tokenizers>=0.21.1, pydantic>=2.12.
    major, minor, patch = (int(x) for x in current["transformers"].split("."))
    assert (major, minor, patch) >= (5, 5, 3)
    assert tuple(int(x) for x in current["tokenizers"].split(".")) >= (0, 21, 1)
    assert tuple(int(x) for x in current["pydantic"].split(".")) >= (2, 12)
    requirement_lines = [line for line in (ROOT / "requirements-vllm-current.txt").read_text().splitlines() if not line.startswith("#")]
    assert not any(line.startswith("numpy") for line in requirement_lines), "numpy<2 was 0.6.3's constraint; 0.24 leaves it to vLLM"
    # Everything else the worker needs is pinned identically in both images.
    shared = set(adr) - {"vllm", "transformers", "tokenizers"}
    assert {k: current.get(k) for k in shared} == {k: adr[k] for k in shared}
    assert set(current) - set(adr) == set(), "nothing extra beyond the vLLM stack"
