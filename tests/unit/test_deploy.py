"""The deployment files are parsed and checked against the code they deploy (they cannot run here: no Docker engine,
no cluster): compose is interpolated as Compose would (with and without settings), its topic-init script is run
against a stand-in for kafka-topics.sh, and the README's compose commands are parsed by the CLI's own parser."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from processor.cli import build_parser
from processor.metrics import Metrics
from processor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_NAMES = set(Settings.env_names().values())
EXTERNAL_ENV = {"HF_TOKEN", "HF_HOME"}  # read by huggingface_hub, not by the settings class
COMPOSE_ONLY = {"KAFKA_HOST_PORT", "TOPIC_PARTITIONS"}  # read by docker-compose.yml itself
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()


def load_yaml_documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(value, env):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $ (for the container's shell)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.groups()
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def compose(env=None):
    """docker-compose.yml as Compose sees it with `env` as the shell (and no .env file)."""
    return interpolate(yaml.safe_load(COMPOSE_TEXT), env or {})


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
    config = compose()
    services = config["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    processor = services["processor"]
    devices = processor["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "huggingface-cache:/var/cache/huggingface" in processor["volumes"]
    assert "huggingface-cache" in config["volumes"]
    assert set(processor["environment"]) <= ENV_NAMES | EXTERNAL_ENV
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]


def test_compose_runs_without_a_dot_env():
    processor = compose()["services"]["processor"]
    assert processor["env_file"] == [{"path": ".env", "required": False}], ".env is optional (Compose >= 2.24)"
    undefaulted = [m.group(1) for m in _VARIABLE.finditer(COMPOSE_TEXT) if m.group(1) and m.group(2) != ":-"]
    assert undefaulted == [], "every variable compose reads has a default"
    assert "HF_TOKEN" in processor["environment"] and processor["environment"]["HF_TOKEN"] is None, "passed from the shell when set"
    Settings(**{k.lower(): v for k, v in processor["environment"].items() if k in ENV_NAMES})  # the defaults validate


@pytest.mark.parametrize(
    "shell",
    [{}, {"KAFKA_INPUT_TOPIC": "web-search", "KAFKA_OUTPUT_TOPIC": "web-summaries", "KAFKA_DLQ_TOPIC": "web-search.dlq", "TOPIC_PARTITIONS": "4"}],
    ids=["defaults", "renamed"],
)
def test_topic_init_creates_exactly_the_topics_the_worker_uses(shell, tmp_path):
    services = compose(shell)["services"]
    init = services["kafka-init"]
    script = init["command"][0]
    assert init["entrypoint"] == ["/bin/sh", "-c"]
    calls = tmp_path / "calls"
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    script = script.replace("/opt/kafka/bin/kafka-topics.sh", str(stub))
    subprocess.run(["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"], **init["environment"]}, check=True, timeout=30)
    created = {}
    for line in calls.read_text().splitlines():
        args = shlex.split(line)
        created[args[args.index("--topic") + 1]] = int(args[args.index("--partitions") + 1])
    worker = Settings(**{k.lower(): v for k, v in services["processor"]["environment"].items() if k in ENV_NAMES})
    partitions = int(shell.get("TOPIC_PARTITIONS", 6))
    assert created == {worker.kafka_input_topic: partitions, worker.kafka_output_topic: partitions, worker.kafka_dlq_topic: 1}
    if shell:
        assert worker.kafka_input_topic == shell["KAFKA_INPUT_TOPIC"]


@pytest.mark.parametrize("host_port", [None, "19092"])
def test_kafka_is_reachable_from_the_host_on_a_second_listener(host_port):
    kafka = compose({"KAFKA_HOST_PORT": host_port} if host_port else {})["services"]["kafka"]
    env = kafka["environment"]
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert advertised["PLAINTEXT"] == compose()["services"]["processor"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert "HOST" in listeners and "HOST" in protocols and env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    container_port = listeners["HOST"].rsplit(":", 1)[1]
    expected_host_port = host_port or Settings().kafka_bootstrap_servers.rsplit(":", 1)[1]  # the tools' default works
    assert advertised["HOST"] == f"localhost:{expected_host_port}"
    assert kafka["ports"] == [f"127.0.0.1:{expected_host_port}:{container_port}"]


def test_metrics_port_follows_metrics_port_on_the_host_and_prometheus_finds_it():
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    for shell, host in (({}, "9100"), ({"METRICS_PORT": "9200"}, "9200")):
        processor = compose(shell)["services"]["processor"]
        inside = processor["environment"]["METRICS_PORT"]
        assert processor["ports"] == [f"{host}:{inside}"]
        assert target == f"processor:{inside}"
    assert "EXPOSE 9100" in (ROOT / "Dockerfile").read_text()


def test_env_example_has_the_adr_values_under_the_settings_names():
    values = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")
    )
    assert set(values) <= ENV_NAMES | EXTERNAL_ENV | COMPOSE_ONLY, set(values) - ENV_NAMES
    for name in COMPOSE_ONLY:
        assert "${" + name in COMPOSE_TEXT, f"{name} is read by docker-compose.yml"
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
    partitions = int(compose()["services"]["kafka-init"]["environment"]["TOPIC_PARTITIONS"])
    assert scaled["spec"]["maxReplicaCount"] == partitions, "capped at the partition count"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert all((k8s / name).exists() for name in kustomization["resources"])


def test_the_model_cache_access_mode_is_a_documented_choice():
    pvc = yaml.safe_load((ROOT / "deploy" / "k8s" / "pvc.yaml").read_text())
    # ReadWriteOnce binds on every storage class; ReadWriteMany (shared across nodes) needs one that offers it.
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    readme = (ROOT / "README.md").read_text()
    assert "`ReadWriteOnce`" in readme and "`ReadWriteMany`" in readme


def test_readme_states_what_the_gpu_box_needs():
    readme = (ROOT / "README.md").read_text()
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert base in readme, "the README names the image's CUDA base"
    assert "560.35.05" in readme, "and the driver it needs (CUDA 12.6 Update 3's)"
    for name in ("HF_TOKEN", "KAFKA_HOST_PORT", "METRICS_PORT", "TOPIC_PARTITIONS"):
        assert f"`{name}`" in readme, name


def test_readme_compose_commands_are_commands_of_the_image():
    """`docker compose run --rm processor ARGS`: the image's entry point is `python3 -m processor`, so ARGS must
    parse as the CLI's arguments (the old `... processor python -m processor summarize` did not)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "processor"]' in dockerfile
    services = set(compose()["services"])
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"docker compose (?:run --rm|exec) (\S+) ([^`\n]*)", readme)
    assert commands, "the README shows the GPU check through compose"
    for service, args in commands:
        assert service in services
        build_parser().parse_args(shlex.split(args))


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


def test_exactly_once_runs_as_a_statefulset_with_a_stable_transactional_suffix():
    k8s = ROOT / "deploy" / "k8s"
    config = yaml.safe_load((k8s / "configmap.yaml").read_text())
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    sts = yaml.safe_load((k8s / "exactly-once" / "statefulset.yaml").read_text())
    assert sts["kind"] == "StatefulSet" and sts["metadata"]["name"] == deployment["metadata"]["name"]
    assert sts["spec"]["selector"] == deployment["spec"]["selector"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRANSACTIONAL_ID_SUFFIX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "a StatefulSet pod name is stable"
    assert env["PROCESSING_GUARANTEE"]["value"] == "exactly_once"
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    # The configuration validates with a pod name as the suffix; without one, exactly-once is refused at start-up.
    values = {k.lower(): v for k, v in config["data"].items()}
    Settings(**values, processing_guarantee="exactly_once", transactional_id_suffix="ai-worker-0")
    with pytest.raises(Exception, match="TRANSACTIONAL_ID_SUFFIX"):
        Settings(**values, processing_guarantee="exactly_once")
