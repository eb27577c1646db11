"""Shared fixtures. The broker: KAFKA_BOOTSTRAP_SERVERS if set, else testcontainers' Kafka if a Docker engine
answers, else the embedded Tansu. Every process a fixture starts, it stops."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

from processor.ops.broker import EmbeddedBroker


@dataclass
class BrokerHandle:
    bootstrap: str
    kind: str  # external | testcontainers | tansu
    embedded: EmbeddedBroker | None = None

    @property
    def is_tansu(self) -> bool:
        return self.kind == "tansu"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission: all mean "no Docker"
        return False


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield BrokerHandle(os.environ["KAFKA_BOOTSTRAP_SERVERS"], "external")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield BrokerHandle(kafka.get_bootstrap_server(), "testcontainers")
        return
    with EmbeddedBroker() as embedded:
        yield BrokerHandle(embedded.bootstrap, "tansu", embedded)


@pytest.fixture()
def own_broker() -> Iterator[BrokerHandle]:
    """A broker this test may stall (SIGSTOP) without disturbing the others."""
    with EmbeddedBroker() as embedded:
        yield BrokerHandle(embedded.bootstrap, "tansu", embedded)


@pytest.fixture()
def topics(broker: BrokerHandle) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"input": f"in-{suffix}", "output": f"out-{suffix}", "dlq": f"dlq-{suffix}", "group": f"g-{suffix}"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A Qwen2-architecture chat model with random weights and a tokenizer trained here (no hub needed)."""
    from processor.ops.tiny_model import build_tiny_chat_model, sample_corpus

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-qwen2"), sample_corpus())


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch):
    """vLLM 0.6.3's offline API as a double, imported fresh (so import-time state can be checked)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fakes" / "vllm063"))
    # vllm and its submodules (vllm.sampling_params): a submodule left from an earlier test would hand out that
    # test's classes (RequestOutputKind), unequal to the fresh double's.
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv("VLLM_USE_V1", raising=False)
    yield
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        sys.modules.pop(name, None)
