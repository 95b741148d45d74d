"""deploy/kubernetes: the NetworkPolicies, evaluated flow by flow, allow what README.md says.

Each flow (from a pod, or an address outside the cluster, to a port and protocol) is judged as
Kubernetes' NetworkPolicy semantics judge it: where policies select the source pod for egress,
or the destination pod for ingress, one of their rules must let it through; addresses outside
the cluster have no policy. The renders are tests/kube.py's, skipped where kubectl is missing
and failing under CI instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.kube import (
    NAMESPACE,
    Render,
    container,
    coordinator,
    env_of,
    pod_labels,
    port,
    r_fixture,  # noqa: F401  (the fixture r)
    renders_fixture,  # noqa: F401  (the fixture renders)
    selects,
    worker,
    workloads,
)


@dataclass(frozen=True)
class Peer:
    """A pod (namespace and labels) or, with ``namespace`` None, an address outside."""

    namespace: str | None
    labels: Mapping[str, str]


def _peer_matches(peer: Mapping[str, Any], other: Peer, own_namespace: str) -> bool:
    if "ipBlock" in peer:
        return other.namespace is None
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": other.namespace}
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif other.namespace != own_namespace:
        return False
    return selects(peer.get("podSelector", {}), other.labels)


def _rule_allows(
    rule: Mapping[str, Any], key: str, other: Peer, ns: str, port: int, proto: str
) -> bool:
    peers = rule.get(key)
    if peers and not any(_peer_matches(p, other, ns) for p in peers):
        return False
    ports = rule.get("ports")
    return not ports or any(
        p.get("protocol", "TCP") == proto and p.get("port") in (None, port) for p in ports
    )


def allowed(r: Render, src: Peer, dst: Peer, port: int, proto: str = "TCP") -> bool:
    """Whether the render's NetworkPolicies let ``src`` open ``port`` on ``dst``."""
    for own, other, direction, key in ((src, dst, "Egress", "to"), (dst, src, "Ingress", "from")):
        if own.namespace is None:
            continue  # outside the cluster: no policy applies
        applying = [
            p
            for p in r.of("NetworkPolicy")
            if p["metadata"]["namespace"] == own.namespace
            and direction in p["spec"]["policyTypes"]
            and selects(p["spec"]["podSelector"], own.labels)
        ]
        if applying and not any(
            _rule_allows(rule, key, other, own.namespace, port, proto)
            for p in applying
            for rule in p["spec"].get(direction.lower(), [])
        ):
            return False
    return True


def test_network_policies(r: Render) -> None:
    coord_w, worker_w = coordinator(r), worker(r)
    coord = Peer(NAMESPACE, pod_labels(coord_w))
    work = Peer(NAMESPACE, pod_labels(worker_w))
    grpc_port, metrics = port(container(coord_w), "grpc"), port(container(coord_w), "metrics")
    health = port(container(coord_w), "health")
    worker_metrics = port(container(worker_w), "metrics")
    prometheus = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
    client = Peer(NAMESPACE, {"plait.dev/client": "true"})
    stranger = Peer(NAMESPACE, {"app": "other"})
    far_client = Peer("elsewhere", {"plait.dev/client": "true"})
    dns = Peer("kube-system", {"k8s-app": "kube-dns"})
    outside = Peer(None, {})
    postgres = env_of(r, coord_w, "plait-coordinator-0")["PLAIT_STORE"].startswith("postgresql")

    flows = [
        (work, coord, grpc_port, True),
        (client, coord, grpc_port, True),
        (prometheus, coord, metrics, True),
        (prometheus, work, worker_metrics, True),
        (coord, outside, 5432, postgres),
        (work, coord, metrics, False),
        (stranger, coord, grpc_port, False),
        (far_client, coord, grpc_port, False),
        (prometheus, coord, grpc_port, False),
        (stranger, work, worker_metrics, False),
        (coord, work, worker_metrics, False),
        (coord, coord, grpc_port, False),  # coordinators meet in the journal, not on the wire
        (work, work, worker_metrics, False),
        (work, outside, 443, False),
        (coord, outside, 443, False),
        (work, outside, 5432, False),
        (outside, coord, grpc_port, False),
    ]
    # The health port is for the kubelet alone, which probes from the pod's own node: traffic
    # NetworkPolicies do not govern (README.md, "NetworkPolicies"). No pod, nothing outside.
    flows += [
        (peer, coord, health, False)
        for peer in (work, client, prometheus, stranger, far_client, coord, outside)
    ]
    wrong = [
        f"{s.labels} -> {d.namespace}/{d.labels}:{p} should be {'allowed' if ok else 'denied'}"
        for s, d, p, ok in flows
        if allowed(r, s, d, p) != ok
    ]
    for pod in (coord, work):
        for proto in ("UDP", "TCP"):
            if not allowed(r, pod, dns, 53, proto):
                wrong.append(f"{pod.labels}: no DNS over {proto}")
    assert not wrong, f"{r.name}:\n" + "\n".join(wrong)
    # Every policy selects some Plait pod (a typo in a selector would select none).
    for p in r.of("NetworkPolicy"):
        assert any(selects(p["spec"]["podSelector"], pod_labels(w)) for w in workloads(r)), p
