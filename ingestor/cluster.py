"""What the worker learns from the Kafka cluster at start: its id and the partitions of the source topics.

The cluster id is the default namespace of derived identifiers (`kafka-<namespace>.<topic>-<partition>-
<offset>`): the same coordinates on two clusters billing into one Stripe account then give two identifiers,
and Stripe does not drop the second event as a duplicate of the first. INGESTOR_IDENTIFIER_NAMESPACE
overrides it (e.g. to keep identifiers stable when a cluster that keeps its offsets gets a new id).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient

from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

NAMESPACE_ENV = "INGESTOR_IDENTIFIER_NAMESPACE"
#: What a namespace may hold (as INGESTOR_IDENTIFIER_NAMESPACE): Kafka's cluster ids (22 characters of
#: base64url) fit as they are; any other id is hashed into this form.
_USABLE = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
HASHED_CHARS = 22


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    cluster_id: str
    #: existing topics among those asked for -> their partition numbers
    partitions: Mapping[str, tuple[int, ...]]


def identifier_namespace(configured: str, cluster_id: str | None) -> str:
    """The namespace of derived identifiers: the configured one, else the cluster id (hashed if unusable)."""
    if configured:
        return configured
    if not cluster_id:
        raise SettingsError(
            f"{NAMESPACE_ENV}: the Kafka cluster reports no cluster id; set {NAMESPACE_ENV} to a name unique "
            "to this cluster"
        )
    if _USABLE.fullmatch(cluster_id):
        return cluster_id
    return hashlib.sha256(cluster_id.encode()).hexdigest()[:HASHED_CHARS]


async def describe(client_options: dict[str, Any], topics: Iterable[str]) -> ClusterInfo:
    """The cluster id and the partitions of `topics` that exist (a missing topic is not created)."""
    admin = AIOKafkaAdminClient(**client_options)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        existing = set(await admin.list_topics()).intersection(topics)
        # Only existing topics: a metadata request naming a missing one may create it (auto.create.topics).
        described = await admin.describe_topics(sorted(existing)) if existing else []
    finally:
        await admin.close()
    partitions = {
        d["topic"]: tuple(sorted(p["partition"] for p in d["partitions"])) for d in described if not d["error_code"]
    }
    return ClusterInfo(cluster_id=str(cluster.get("cluster_id") or ""), partitions=partitions)
