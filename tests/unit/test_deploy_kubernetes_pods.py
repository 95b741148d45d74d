"""deploy/kubernetes: the coordinator and workerd pods mean what README.md says.

Every container's arguments parsed by the daemon's own parser (every flag spelled out) and
loaded by its own configuration loader (``load_config``, ``config_from_args``, which apply the
start-up rules) with the pod's environment and stand-in certificates at the mounted paths;
Secret and csi files versus the ``--tls-*`` flags; probes versus ``--health-listen`` and its
services; the probes' requests, made as the kubelet makes them, against a real leader and
standby started with the manifest's flags; workers' coordinator list versus the coordinators'
advertised names; worker identities versus replicas; the Services and the StatefulSet versus
leader-only readiness; PodDisruptionBudgets. The renders are tests/kube.py's, skipped where
kubectl is missing and failing under CI instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait import certs
from plait.coordinator import config as coordinator_config
from plait.coordinator.health_port import LIVENESS_SERVICE
from plait.coordinator.journal.store import parse_store_url
from plait.workerd import config as workerd_config
from tests.kube import (
    CSI_ATTRIBUTES,
    CSI_VARIABLES,
    KEY_USAGES,
    UID,
    Render,
    container,
    coordinator,
    env_of,
    expand,
    flag_pairs,
    flag_values,
    mounted_files,
    pod_labels,
    pod_spec,
    port,
    r_fixture,  # noqa: F401  (the fixture r)
    renders_fixture,  # noqa: F401  (the fixture renders)
    selects,
    under,
    worker,
    workloads,
    writable_dirs,
)


class Pki:
    """Stand-ins for the mounted TLS files: what ``plait certs`` would put in each Secret, and
    csi-driver's certificate for a worker pod (named after the pod)."""

    def __init__(self) -> None:
        self.ca = certs.make_ca()
        self._pairs: dict[str, tuple[bytes, bytes]] = {}

    def _pair(self, kind: str, name: str) -> tuple[bytes, bytes]:
        if name not in self._pairs:
            hosts = ["plait-coordinator"] if kind == "coordinator" else []
            self._pairs[name] = self.ca.issue(kind, name, hosts=hosts)
        return self._pairs[name]

    def file(self, source: tuple[str, str, str], pod: str) -> bytes:
        volume_kind, name, key = source
        if key == "ca.crt":
            return self.ca.cert_pem
        if volume_kind == "csi":
            pem = self._pair("worker", pod)
        elif name == "plait-coordinator-tls":
            pem = self._pair("coordinator", "plait-coordinator")
        elif name == "plait-worker-tls":
            pem = self._pair("worker", "plait-workerd")
        else:
            raise AssertionError(f"no stand-in for {source}")
        return pem[0] if key == "tls.crt" else pem[1]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def pod_root(
    tmp: Path, pki: Pki, r: Render, w: Mapping[str, Any], pod: str
) -> Callable[[str], str]:
    """Lays out the container's Secret/csi/ConfigMap files under ``tmp``; returns the path
    mapping (container path -> file here)."""
    files = mounted_files(w)
    for path, source in files.items():
        if path.endswith("/*"):
            continue
        target = tmp / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source[0] == "configMap":
            target.write_text(r.one("ConfigMap", source[1])["data"][source[2]])
        else:
            target.write_bytes(pki.file(source, pod))

    def remap(value: str) -> str:
        return str(tmp / value.lstrip("/")) if value in files else value

    return remap


def csi_worker_id(w: Mapping[str, Any], pod: str) -> str | None:
    """The worker id csi-driver's certificate gives ``pod`` (None: no csi volume)."""
    for v in pod_spec(w).get("volumes", []):
        if "csi" in v:
            uri = v["csi"]["volumeAttributes"]["csi.cert-manager.io/uri-sans"]
            kind, _, name = uri.replace("${POD_NAME}", pod).removeprefix("plait://").partition("/")
            assert kind == "worker", uri
            return name
    return None


def coordinator_config_of(
    r: Render, pki: Pki, tmp: Path, pod: str
) -> coordinator_config.CoordinatorConfig:
    """Pod ``pod``'s configuration, as plait-coordinator loads it from the container's
    arguments and environment (its mounted files laid out under ``tmp``)."""
    sts = coordinator(r)
    c = container(sts)
    assert c["command"] == ["plait-coordinator"]
    parser = coordinator_config.build_parser()
    env = env_of(r, sts, pod)
    remap = pod_root(tmp / pod, pki, r, sts, pod)
    pairs = flag_pairs(expand(c["args"], env))
    unknown = {k for k, _ in pairs} - set(parser._option_string_actions)
    assert not unknown, f"{r.name}: plait-coordinator has no {unknown}"
    cli = [f"{k}={remap(v)}" if v else k for k, v in pairs]
    return coordinator_config.load_config(parser.parse_args(cli), env)


def test_coordinator_arguments_load(r: Render, pki: Pki, tmp_path: Path) -> None:
    sts = coordinator(r)
    c = container(sts)
    for i in range(sts["spec"]["replicas"]):
        pod = f"plait-coordinator-{i}"
        cfg = coordinator_config_of(r, pki, tmp_path, pod)
        assert coordinator_config.split_host_port(cfg.listen)[1] == port(c, "grpc")
        assert cfg.metrics_listen is not None and cfg.metrics_public
        assert coordinator_config.split_host_port(cfg.metrics_listen)[1] == port(c, "metrics")
        headless = sts["spec"]["serviceName"]
        assert cfg.advertise == f"{pod}.{headless}:{port(c, 'grpc')}"
        # The journal: SQLite on the claimed volume, or PostgreSQL from the Secret.
        store = parse_store_url(cfg.store)
        if store.kind == "sqlite":
            assert store.target.startswith("/"), store  # not relative to the read-only cwd
            claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
            claimed = [
                m["mountPath"] for m in container(sts)["volumeMounts"] if m["name"] in claims
            ]
            assert under(store.target, claimed), f"{store.target} is not on a claimed volume"
        else:
            assert store.kind == "postgresql", store


def test_workerd_arguments_load(r: Render, pki: Pki, tmp_path: Path) -> None:
    w = worker(r)
    c = container(w)
    assert c["command"] == ["plait-workerd"]
    pod = "plait-workerd-7d9c5b8f6-x2k9q"
    env = env_of(r, w, pod)
    remap = pod_root(tmp_path, pki, r, w, pod)
    pairs = flag_pairs(expand(c["args"], env))
    parser = workerd_config.build_parser(env)
    unknown = {k for k, _ in pairs} - set(parser._option_string_actions)
    assert not unknown, f"{r.name}: plait-workerd has no {unknown}"
    cli = [f"{k}={remap(v)}" if v else k for k, v in pairs]
    cfg = workerd_config.config_from_args(parser.parse_args(cli), env, detect=lambda: {})
    # The id is the certificate's: the pod's name with per-pod certificates.
    assert cfg.worker_id == (csi_worker_id(w, pod) or "plait-workerd")
    assert cfg.metrics_listen is not None and cfg.metrics_public
    assert cfg.metrics_listen.endswith(f":{port(c, 'metrics')}")
    assert under(cfg.tmp_root, writable_dirs(w)), cfg.tmp_root
    # Every coordinator, by the name it advertises; nothing else.
    sts = coordinator(r)
    grpc_port = port(container(sts), "grpc")
    headless = sts["spec"]["serviceName"]
    want = {f"plait-coordinator-{i}.{headless}:{grpc_port}" for i in range(sts["spec"]["replicas"])}
    assert set(workerd_config.parse_coordinator(cfg.coordinator)) == want


def test_tls_files_are_the_mounted_secret_keys(r: Render) -> None:
    pair = {"--tls-cert": "tls.crt", "--tls-key": "tls.key"}
    expect = {
        "plait-coordinator": {"--tls-client-ca": "ca.crt", **pair},
        "plait-workerd": {"--tls-ca": "ca.crt", **pair},
    }
    for w in (coordinator(r), worker(r)):
        name = w["metadata"]["name"]
        files = mounted_files(w)
        flags = flag_values(container(w)["args"])
        tls = {k: v for k, v in flags.items() if k.startswith("--tls-")}
        assert set(tls) == set(expect[name]), (name, tls)
        for flag, key in expect[name].items():
            assert tls[flag] in files, f"{name}: {flag}={tls[flag]} is not a mounted file"
            assert files[tls[flag]][2] == key, (name, flag, files[tls[flag]])
        # Every mounted Secret/csi file is one of those flags' files, none left over.
        secret_files = {p for p, s in files.items() if s[0] in ("secret", "csi")}
        assert secret_files == set(tls.values()), (name, secret_files)
        sources = {s[:2] for p, s in files.items() if s[0] in ("secret", "csi")}
        assert len(sources) == 1, f"{name}: TLS files from one Secret or csi volume: {sources}"
        if name == "plait-coordinator":
            assert sources == {("secret", "plait-coordinator-tls")}


def test_worker_identities_fit_the_replicas(r: Render) -> None:
    assert not worker_identity_problems(r), worker_identity_problems(r)


def test_the_identity_check_can_fail(renders: dict[str, Render]) -> None:
    # The DaemonSet with the worker Secret instead of per-pod certificates.
    r = renders["ha-postgres+daemonset+cert-manager+monitoring"]
    objects = json.loads(json.dumps(r.objects))
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    (tls,) = [v for v in pod_spec(ds)["volumes"] if v["name"] == "tls"]
    del tls["csi"]
    tls["secret"] = {"secretName": "plait-worker-tls", "items": []}
    problems = worker_identity_problems(Render(r.name, 0, "", tuple(objects)))
    assert problems and "take turns" in problems[0], problems


def worker_identity_problems(r: Render) -> list[str]:
    """Workers sharing one certificate (one worker id) take turns on the coordinator."""
    w = worker(r)
    csi = [v["csi"] for v in pod_spec(w)["volumes"] if "csi" in v]
    if not csi:
        if w["kind"] != "Deployment" or w["spec"].get("replicas", 1) != 1:
            return [f"{r.name}: {w['kind']} pods share the worker Secret's id: they take turns"]
        return []
    (volume,) = csi
    attrs = volume["volumeAttributes"]
    problems = [f"unknown csi attribute {a}" for a in set(attrs) - CSI_ATTRIBUTES]
    for value in attrs.values():
        problems += [
            f"unknown csi variable {v}"
            for v in set(re.findall(r"\$\{(\w+)\}", value)) - CSI_VARIABLES
        ]
    if attrs.get("csi.cert-manager.io/uri-sans") != "plait://worker/${POD_NAME}":
        problems.append("the worker id must be the pod's name")
    if attrs.get("csi.cert-manager.io/organizationalunits") != "worker":
        problems.append("OU=worker grants the role worker")
    usages = attrs.get("csi.cert-manager.io/key-usages", "").split(",")
    if "client auth" not in usages or set(usages) - set(KEY_USAGES):
        problems.append(f"key usages {usages}")
    issuer = attrs.get("csi.cert-manager.io/issuer-name")
    if not r.of("Issuer", issuer):
        problems.append(f"no Issuer {issuer}")
    if attrs.get("csi.cert-manager.io/fs-group") != str(UID):
        problems.append("the key must be readable by the pod's group")
    return problems


# ----- probes, Services, rollout ----------------------------------------------------------------


_PROBE_TIMING = {
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "successThreshold",
}


def health_port(cfg: coordinator_config.CoordinatorConfig) -> int:
    """The port of ``--health-listen``, as the coordinator's own loader read it."""
    assert cfg.health_listen is not None, "no --health-listen"
    host, number = coordinator_config.split_host_port(cfg.health_listen, "health_listen")
    # The kubelet dials the pod's IP, not its loopback.
    assert not coordinator_config.is_loopback_host(host), cfg.health_listen
    return number


def grpc_probe(probe: Mapping[str, Any]) -> dict[str, Any]:
    """A kubelet ``grpc:`` probe's action (port, service), and nothing but timings besides."""
    assert set(probe) - _PROBE_TIMING == {"grpc"}, probe
    action: dict[str, Any] = probe["grpc"]
    assert set(action) <= {"port", "service"}, action
    return action


def test_probes_are_grpc_probes_on_the_health_port(r: Render, pki: Pki, tmp_path: Path) -> None:
    sts = coordinator(r)
    c = container(sts)
    cfg = coordinator_config_of(r, pki, tmp_path, "plait-coordinator-0")
    health = health_port(cfg)
    # The port --health-listen names is a declared container port (named for what it is).
    assert port(c, "health") == health
    readiness, liveness = c["readinessProbe"], c["livenessProbe"]
    # Readiness: service "" (left out), SERVING on the leader alone, after its replay.
    assert grpc_probe(readiness) == {"port": health}
    # Liveness: SERVING from start-up until shutdown begins, standby or leader.
    assert grpc_probe(liveness) == {"port": health, "service": LIVENESS_SERVICE}
    # A shutdown turns liveness NOT_SERVING at its start; it must end (--shutdown-grace) before
    # the kubelet could count enough failures to restart the container.
    since_first_failure = (liveness["failureThreshold"] - 1) * liveness["periodSeconds"]
    assert since_first_failure > cfg.shutdown_grace.total_seconds() + 5, liveness
    assert liveness["timeoutSeconds"] >= 3, liveness  # a loaded event loop answers late
    assert "startupProbe" not in c  # the port opens before the election and the replay
    for w in workloads(r):
        if w is not sts:
            assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container(w))
    # Only the kubelet uses the health port: no Service or PodMonitor names it (and no
    # NetworkPolicy lets a pod reach it: test_network_policies).
    for svc in r.of("Service"):
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort") not in ("health", health) and p["port"] != health, svc
    for mon in r.of("PodMonitor"):
        for endpoint in mon["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] != "health", mon


async def _kubelet_grpc_probe(probe: Mapping[str, Any], address: str) -> bool:
    """What the kubelet does for a ``grpc:`` probe: plaintext, no certificate, one
    ``Health/Check`` for the probe's service (``""`` when left out), passing on SERVING only."""
    request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                request, timeout=probe["timeoutSeconds"]
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.timeout(60)
async def test_the_probes_pass_the_leader_and_keep_a_standby_alive(
    renders: dict[str, Render], pki: Pki, tmp_path: Path
) -> None:
    """The rendered probes, made as the kubelet makes them, against two coordinators started
    from the ha-postgres manifest's own configuration (TLS with client certificates on the
    main port, --health-listen), on one journal: the leader passes both probes, the standby
    liveness only; and the same probe on the main port fails, mTLS refusing it (why the
    health port exists). The ports are loopback's free ones and the journal a shared SQLite
    file. What each service answers when is tests/integration/test_health_port.py's."""
    from plait.coordinator.server import CoordinatorServer

    r = renders["ha-postgres"]
    c = container(coordinator(r))
    readiness, liveness = c["readinessProbe"], c["livenessProbe"]

    def config(pod: str) -> coordinator_config.CoordinatorConfig:
        cfg = coordinator_config_of(r, pki, tmp_path, pod)
        assert cfg.tls_client_ca is not None and cfg.health_listen is not None
        return dataclasses.replace(
            cfg,
            listen="127.0.0.1:0",
            health_listen="127.0.0.1:0",
            metrics_listen=None,
            advertise=None,
            store=f"sqlite:///{tmp_path}/journal.db",
        )

    leader = CoordinatorServer(config("plait-coordinator-0"))
    standby = CoordinatorServer(config("plait-coordinator-1"))  # waits on the leader's lock
    await leader.start()
    try:
        await standby.start(wait_leader=False)
        try:
            results: dict[str, tuple[bool, ...]] = {}
            for name, server in (("leader", leader), ("standby", standby)):
                # The probes' port is the container's --health-listen port; here, the bound one.
                health = f"127.0.0.1:{server.health_port.port}"
                main = f"127.0.0.1:{server.port}"
                results[name] = (
                    await _kubelet_grpc_probe(readiness, health),
                    await _kubelet_grpc_probe(liveness, health),
                    await _kubelet_grpc_probe(readiness, main),
                    await _kubelet_grpc_probe(liveness, main),
                )
        finally:
            await standby.stop(0)
    finally:
        await leader.stop(0)
    assert results == {
        "leader": (True, True, False, False),
        "standby": (False, True, False, False),
    }, results


def test_services_route_to_the_leader_and_name_every_pod(r: Render) -> None:
    sts = coordinator(r)
    labels = pod_labels(sts)
    grpc_port = port(container(sts), "grpc")
    plain = r.one("Service", "plait-coordinator")
    headless = r.one("Service", sts["spec"]["serviceName"])
    for svc in (plain, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {"grpc": grpc_port} == {
            p["name"]: p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"
        }
    assert plain["spec"].get("clusterIP") != "None"
    assert not plain["spec"].get("publishNotReadyAddresses")  # ready = the leader only
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # standbys resolve too


def test_the_statefulset_suits_leader_only_readiness(r: Render) -> None:
    spec = coordinator(r)["spec"]
    store = env_of(r, coordinator(r), "plait-coordinator-0")["PLAIT_STORE"]
    if store.startswith("sqlite:"):
        assert spec["replicas"] == 1  # one coordinator per SQLite journal
    else:
        assert spec["replicas"] == 3
        # Standbys never become ready: OrderedReady would never start the third pod, and a
        # rolling update would wait on the first standby it replaced.
        assert spec["podManagementPolicy"] == "Parallel"
        assert spec["updateStrategy"] == {"type": "OnDelete"}


def test_disruption_budgets(r: Render) -> None:
    by_name = {p["metadata"]["name"]: p for p in r.of("PodDisruptionBudget")}
    assert set(by_name) == {"plait-coordinator", "plait-workerd"}
    for name, pdb in by_name.items():
        selected = [
            w["metadata"]["name"]
            for w in workloads(r)
            if selects(pdb["spec"]["selector"], pod_labels(w))
        ]
        assert selected == [name], (name, selected)
    coord = by_name["plait-coordinator"]["spec"]
    # Standbys are never ready, so they count as unhealthy: evictable at any time; the leader
    # (the one ready pod) is kept until it hands over.
    assert coord["minAvailable"] == 1
    assert coord["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
