"""Is there a broker, and does it have the topic? Asked once, up front, by every command-line tool, so that a
missing broker ends the command within seconds with one line naming the setting, instead of librdkafka retrying
(and logging) for a minute."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata

from processor.errors import BrokerUnavailableError
from processor.failures import CommandError

PROBE_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)
_AUTH_FAILURES = {
    getattr(KafkaError, name)
    for name in ("_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "_SSL", "TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED")
    if hasattr(KafkaError, name)
}


def broker_unavailable(bootstrap: str) -> BrokerUnavailableError:
    return BrokerUnavailableError(f"no Kafka broker answered at {bootstrap}: is it running? (KAFKA_BOOTSTRAP_SERVERS)")


def translate(exc: KafkaException, bootstrap: str) -> Exception:
    """A client exception as one of ours, saying which setting to look at."""
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if error is not None and error.code() in _AUTH_FAILURES:
        return BrokerUnavailableError(
            f"the broker at {bootstrap} refused this client: {error.str()} "
            "(check KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_*)"
        )
    if error is None or error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT):
        return broker_unavailable(bootstrap)
    return CommandError(f"Kafka at {bootstrap}: {error.str()}")


def cluster_metadata(client: Any, bootstrap: str, timeout_s: float = PROBE_TIMEOUT_S) -> ClusterMetadata:
    """Metadata of every topic (not of one topic: asking for one can auto-create it on some brokers)."""
    try:
        return client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise translate(exc, bootstrap) from None


class ProbeLog:
    """librdkafka's log for the reachability probe, at DEBUG only (`--debug` shows it): its connection failures
    ("FAIL … Connection refused") say what the probe's one-line error says better, and would come before it."""

    def log(self, _level: int, message: str, *args: Any) -> None:
        log.debug(message, *args)


def require_broker(common: dict[str, Any], timeout_s: float = PROBE_TIMEOUT_S) -> ClusterMetadata:
    """Metadata from a quiet client of its own: with no broker, one line (BrokerUnavailableError) and nothing else.
    Commands ask this before they make their own, louder clients."""
    admin = AdminClient({**common, "logger": ProbeLog(), "error_cb": lambda error: log.debug("probe: %s", error.str())})
    return cluster_metadata(admin, str(common.get("bootstrap.servers")), timeout_s)


def require_topic(metadata: ClusterMetadata, topic: str, setting: str, bootstrap: str) -> list[int]:
    """The topic's partitions, or a CommandError saying how to get the topic."""
    found = metadata.topics.get(topic)
    if found is None:
        raise CommandError(
            f"topic {topic} does not exist on {bootstrap}: create it (`python -m processor broker` creates the "
            f"configured topics), or set {setting} to an existing topic"
        )
    if found.error is not None:
        raise CommandError(f"topic {topic} on {bootstrap}: {found.error.str()}")
    return sorted(found.partitions)
