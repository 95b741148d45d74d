"""deploy/kubernetes: every variant renders, validates, and means what its README.md says.

Each variant (an overlay alone, or with components, from a throwaway kustomization beside the
test's temp files) is rendered once with ``kubectl kustomize`` (kubectl embeds kustomize; v5
is needed), all in parallel; the monitoring component loads deploy/grafana and
deploy/prometheus from outside its directory and makes its PrometheusRule with Plait's exec
generator plugin, so those renders pass ``--enable-alpha-plugins --load-restrictor
LoadRestrictionsNone`` with ``KUSTOMIZE_PLUGIN_HOME`` set, as the README says.

Schemas: every built-in object is validated with kubernetes-validate against the Kubernetes
:data:`K8S_VERSION` schemas in strict mode (an unknown field fails). kubernetes-validate has no
schema for custom resources, and no PyPI, npm or Debian package ships the openAPIV3Schema of
the prometheus-operator or cert-manager CRDs (npm's ``@kubernetes-models/*`` ship compiled
JavaScript validators, PyPI's ``cloudcoil-models-*`` generated pydantic classes that need a
Kubernetes client). So :data:`CRD_SCHEMAS` are JSON schemas written for this test from the
CRDs (PodMonitor and PrometheusRule ``monitoring.coreos.com/v1``, Certificate and Issuer
``cert-manager.io/v1``): closed objects at every level we use, the CRDs' required fields, enums
and duration patterns, other fields of the CRD allowed by name without a type. They catch a
misspelt, misplaced or mistyped field and a bad enum value; they cannot tell a field exists in
an older operator. csi-driver volume attributes are checked against csi-driver's list.

Semantics: containers hardened; every container's arguments parsed by the daemon's own parser
(every flag spelled out) and loaded by its own configuration loader (``load_config``,
``config_from_args``, which apply the start-up rules) with the pod's environment and stand-in
certificates at the mounted paths; Secret and csi files versus the ``--tls-*`` flags; probes
versus ``--health-listen`` and its services; the probes' requests, made as the kubelet makes
them, against a real leader and standby started with the manifest's flags; workers'
coordinator list versus the coordinators' advertised names; worker identities versus
replicas; PodDisruptionBudgets; the NetworkPolicies evaluated flow by flow; the generated
ConfigMaps and PrometheusRule versus deploy/grafana/plait.json and deploy/prometheus/rules.yml,
and no copy of either under deploy/kubernetes; the generator plugin's refusals.

Skipped where kubectl (with kustomize v5) is missing; under CI (``CI`` set) that is a failure
instead: ``.ci/run`` installs kubectl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait import certs
from plait.coordinator import config as coordinator_config
from plait.coordinator.health_port import LIVENESS_SERVICE
from plait.coordinator.journal.store import parse_store_url
from plait.workerd import config as workerd_config

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "plait.json"
PLUGINS = KUBE / "plugins"  # KUSTOMIZE_PLUGIN_HOME
RULE_GENERATOR = PLUGINS / "plait.dev/v1/prometheusrulegenerator/PrometheusRuleGenerator"
RULE_GENERATOR_CONFIG = KUBE / "components" / "monitoring" / "prometheusrule.yaml"

# The Kubernetes release whose API schemas every object must satisfy.
K8S_VERSION = "1.32.0"
IMAGE = "ghcr.io/example/plait:VERSION"
UID = 10001
NAMESPACE = "plait"
MONITORING_FLAGS = ("--enable-alpha-plugins", "--load-restrictor", "LoadRestrictionsNone")
# What the README tells users to add for their Prometheus' ruleSelector.
RULE_LABEL_PATCH = {
    "target": {"kind": "PrometheusRule", "name": "plait"},
    "patch": "- op: add\n  path: /metadata/labels/release\n  value: kube-prometheus-stack\n",
}

# name: (overlay, components, extra kustomization fields). Each overlay alone, and with every
# component: cert-manager on the Deployment, and on the DaemonSet with the components in the
# other order; one with the image renamed and a label for the PrometheusRule, as the README
# tells users to.
VARIANTS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "sqlite": ("sqlite", (), {}),
    "ha-postgres": ("ha-postgres", (), {}),
    "sqlite+cert-manager+monitoring": (
        "sqlite",
        ("cert-manager", "monitoring"),
        {
            "images": [
                {"name": "ghcr.io/example/plait", "newName": "r.example/p", "newTag": "1.2"}
            ],
            "patches": [RULE_LABEL_PATCH],
        },
    ),
    "ha-postgres+daemonset+cert-manager+monitoring": (
        "ha-postgres",
        ("daemonset", "cert-manager", "monitoring"),
        {},
    ),
}
IMAGES = {"sqlite+cert-manager+monitoring": "r.example/p:1.2"}
WORKLOADS = ("StatefulSet", "Deployment", "DaemonSet")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _require_kubectl() -> str:
    """kubectl, with a kustomize new enough for components, labels and replacements (v5)."""
    path = shutil.which("kubectl")
    message = "kubectl is not installed (apt-get install -y kubectl)"
    if path is not None:
        done = subprocess.run(
            [path, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found = re.match(r"v(\d+)\.", json.loads(done.stdout or "{}").get("kustomizeVersion", ""))
        if found and int(found.group(1)) >= 5:
            return path
        message = f"{path} embeds kustomize {found.group(0) if found else '?'}; v5 is needed"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run must install kubectl")
    pytest.skip(message)


@dataclass(frozen=True)
class Render:
    """One variant's ``kubectl kustomize`` output, parsed."""

    name: str
    returncode: int
    stderr: str
    parsed: tuple[dict[str, Any], ...]

    @classmethod
    def of_run(cls, name: str, done: subprocess.CompletedProcess[str]) -> Render:
        docs = yaml.load_all(done.stdout, Loader=_LOADER) if done.returncode == 0 else ()
        return cls(name, done.returncode, done.stderr, tuple(d for d in docs if d))

    @property
    def objects(self) -> tuple[dict[str, Any], ...]:
        assert self.returncode == 0, f"{self.name}: kubectl kustomize failed:\n{self.stderr}"
        return self.parsed

    def of(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        return [
            o
            for o in self.objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        ]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = self.of(kind, name)
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} {name or ''}"
        return found[0]


def _kustomization(tmp: Path, name: str, spec: tuple[str, tuple[str, ...], dict[str, Any]]) -> Path:
    overlay, components, extra = spec
    if not components and not extra:
        return KUBE / "overlays" / overlay  # exactly what the README renders
    directory = tmp / name
    directory.mkdir()
    rel = os.path.relpath(KUBE, directory)  # kustomize takes no absolute roots
    body = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{rel}/overlays/{overlay}"],
        "components": [f"{rel}/components/{c}" for c in components],
        **extra,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return directory


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Render]:
    kubectl = _require_kubectl()
    tmp = tmp_path_factory.mktemp("kustomize")
    every = VARIANTS

    def render(name: str) -> Render:
        spec = every[name]
        monitoring = "monitoring" in spec[1]
        flags = MONITORING_FLAGS if monitoring else ()
        done = subprocess.run(
            [kubectl, "kustomize", *flags, str(_kustomization(tmp, name, spec))],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "KUSTOMIZE_PLUGIN_HOME": str(PLUGINS)} if monitoring else None,
        )
        return Render.of_run(name, done)

    with ThreadPoolExecutor(max_workers=len(every)) as pool:
        return dict(zip(every, pool.map(render, every), strict=True))


@pytest.fixture(params=list(VARIANTS))
def r(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    return renders[request.param]


# ----- pods, containers, volumes ----------------------------------------------------------------


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def workloads(r: Render) -> list[dict[str, Any]]:
    return [o for o in r.objects if o["kind"] in WORKLOADS]


def coordinator(r: Render) -> dict[str, Any]:
    return r.one("StatefulSet", "plait-coordinator")


def worker(r: Render) -> dict[str, Any]:
    found = [o for o in workloads(r) if o["metadata"]["name"] == "plait-workerd"]
    assert len(found) == 1, f"{r.name}: {len(found)} workerd workloads"
    return found[0]


def container(workload: Mapping[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(workload)["containers"]
    assert isinstance(c, dict)
    return c


def port(c: Mapping[str, Any], name: str) -> int:
    (number,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    assert isinstance(number, int)
    return number


def env_of(r: Render, workload: Mapping[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet would give it (Secrets as stand-ins)."""
    c = container(workload)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(r.one("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            fields = {"metadata.name": pod_name, "spec.nodeName": "node-1"}
            env[item["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            assert key == ("plait-postgres", "dsn"), f"{r.name}: unexpected Secret {key}"
            env[item["name"]] = "postgresql://plait:secret@db.example:5432/plait"
        else:
            raise AssertionError(f"{r.name}: unexpected env source {ref}")
    return env


def expand(args: list[str], env: Mapping[str, str]) -> list[str]:
    """``$(VAR)`` as the kubelet expands it in args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


def mounted_files(workload: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    """``{path in the container: (volume kind, source name, key)}`` for Secret, ConfigMap and
    csi-driver volumes (csi-driver's files: ca.crt, tls.crt, tls.key)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    out = {}
    for mount in container(workload).get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a volumeClaimTemplate's
        base = mount["mountPath"].rstrip("/")
        if "secret" in volume:
            source = volume["secret"]
            for item in source["items"]:
                out[f"{base}/{item['path']}"] = ("secret", source["secretName"], item["key"])
        elif "configMap" in volume:
            source = volume["configMap"]
            for key in source.get("items", []) or []:
                out[f"{base}/{key['path']}"] = ("configMap", source["name"], key["key"])
            if not source.get("items"):
                out[f"{base}/*"] = ("configMap", source["name"], "*")
        elif "csi" in volume:
            attrs = volume["csi"]["volumeAttributes"]
            for key, default in (
                ("ca", "ca.crt"),
                ("certificate", "tls.crt"),
                ("privatekey", "tls.key"),
            ):
                name = attrs.get(f"csi.cert-manager.io/{key}-file", default)
                out[f"{base}/{name}"] = ("csi", volume["name"], name)
    return out


def writable_dirs(workload: Mapping[str, Any]) -> list[str]:
    """Mount paths of emptyDir and PersistentVolumeClaim volumes (writable under a read-only
    root file system)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    out = []
    for mount in container(workload).get("volumeMounts", []):
        v = volumes.get(mount["name"], {})
        if ("emptyDir" in v or mount["name"] in claims) and not mount.get("readOnly"):
            out.append(mount["mountPath"].rstrip("/"))
    return out


def under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def flag_pairs(args: list[str]) -> list[tuple[str, str]]:
    """``(--name, value)`` of each ``--name=value`` (value "" for a bare ``--name``)."""
    out = []
    for a in args:
        assert a.startswith("--"), f"{a!r}: arguments here are flags, written --name=value"
        name, _, value = a.partition("=")
        out.append((name, value))
    return out


def flag_values(args: list[str]) -> dict[str, str]:
    """:func:`flag_pairs` as a mapping (the last of a repeated flag)."""
    return dict(flag_pairs(args))


# ----- schemas ----------------------------------------------------------------------------------

_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]  # fmt: skip
_STR: dict[str, Any] = {"type": "string"}
_STRS: dict[str, Any] = {"type": "array", "items": _STR}
_STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": _STR}
_ANY: dict[str, Any] = {}


def _closed(props: dict[str, Any], required: tuple[str, ...] = (), others: str = "") -> Any:
    """An object with exactly ``props`` (typed) and ``others`` (names the CRD has, untyped)."""
    return {
        "type": "object",
        "properties": {**dict.fromkeys(others.split(), _ANY), **props},
        "required": list(required),
        "additionalProperties": False,
    }


_SECRET_KEY = _closed({"name": _STR, "key": _STR, "optional": {"type": "boolean"}}, ("key",))
_SELECTOR = _closed({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}})
_ISSUER_REF = _closed({"name": _STR, "kind": _STR, "group": _STR}, ("name",))


def _object(kind: str, spec: Any) -> Any:
    meta = _closed({"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP})
    return _closed(
        {"apiVersion": _STR, "kind": {"const": kind}, "metadata": meta, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


CRD_SCHEMAS: dict[tuple[str, str], Any] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _object(
        "PodMonitor",
        _closed(
            {
                "jobLabel": _STR,
                "selector": _SELECTOR,
                "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": _STRS}),
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": _closed(
                        {
                            "port": _STR,
                            "path": _STR,
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "tlsConfig": _closed(
                                {
                                    "ca": _closed(
                                        {"secret": _SECRET_KEY, "configMap": _SECRET_KEY}
                                    ),
                                    "serverName": _STR,
                                    "insecureSkipVerify": {"type": "boolean"},
                                },
                                others="cert keySecret maxVersion minVersion",
                            ),
                        },
                        others="authorization basicAuth bearerTokenSecret enableHttp2"
                        " filterRunning followRedirects honorLabels honorTimestamps"
                        " metricRelabelings oauth2 params portNumber proxyUrl relabelings"
                        " targetPort trackTimestampsStaleness",
                    ),
                },
            },
            ("selector",),
            others="attachMetadata bodySizeLimit labelLimit labelNameLengthLimit"
            " labelValueLengthLimit podTargetLabels sampleLimit scrapeClass targetLimit",
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _object(
        "PrometheusRule",
        _closed(
            {
                "groups": {
                    "type": "array",
                    "items": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {
                                "type": "array",
                                "items": _closed(
                                    {
                                        "record": _STR,
                                        "alert": _STR,
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                    ("expr",),
                                ),
                            },
                        },
                        ("name",),
                        others="labels limit partial_response_strategy query_offset",
                    ),
                }
            }
        ),
    ),
    ("cert-manager.io/v1", "Issuer"): _object(
        "Issuer",
        _closed(
            {
                "selfSigned": _closed({"crlDistributionPoints": _STRS}),
                "ca": _closed(
                    {"secretName": _STR},
                    ("secretName",),
                    others="crlDistributionPoints issuingCertificateURLs ocspServers",
                ),
            },
            others="acme vault venafi",
        ),
    ),
    ("cert-manager.io/v1", "Certificate"): _object(
        "Certificate",
        _closed(
            {
                "secretName": _STR,
                "issuerRef": _ISSUER_REF,
                "commonName": _STR,
                "isCA": {"type": "boolean"},
                "dnsNames": _STRS,
                "uris": _STRS,
                "ipAddresses": _STRS,
                "subject": _closed(
                    {"organizationalUnits": _STRS, "organizations": _STRS},
                    others="countries localities postalCodes provinces serialNumber"
                    " streetAddresses",
                ),
                "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
                "duration": {"type": "string", "pattern": _GO_DURATION},
                "renewBefore": {"type": "string", "pattern": _GO_DURATION},
                "privateKey": _closed(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
            },
            ("issuerRef", "secretName"),
            others="additionalOutputFormats emailAddresses encodeUsagesInRequest keystores"
            " literalSubject nameConstraints otherNames renewBeforePercentage"
            " revisionHistoryLimit secretTemplate signatureAlgorithm",
        ),
    ),
}
# csi-driver's volume attributes (pkg/apis/v1alpha1) and the variables it expands in them.
_CSI_NAMES = (
    "issuer-name issuer-kind issuer-group literal-subject common-name organizations"
    " organizationalunits countries provinces localities streetaddresses postalcodes"
    " serialnumber dns-names ip-sans uri-sans duration is-ca key-usages key-encoding"
    " ca-file certificate-file privatekey-file fs-group renew-before reuse-private-key"
)
CSI_ATTRIBUTES = {f"csi.cert-manager.io/{a}" for a in _CSI_NAMES.split(" ")}
CSI_VARIABLES = {"POD_NAME", "POD_NAMESPACE", "POD_UID", "SERVICE_ACCOUNT_NAME"}


def schema_problems(obj: Mapping[str, Any]) -> str | None:
    """Why ``obj`` fails its schema (None: it passes)."""
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    try:
        if crd is not None:
            jsonschema.validate(obj, crd)
        else:
            kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


# ----- rendering and schemas --------------------------------------------------------------------


def test_every_variant_renders(renders: dict[str, Render]) -> None:
    failed = {n: r.stderr for n, r in renders.items() if r.returncode != 0}
    assert not failed, failed
    for name in VARIANTS:
        kinds = {o["kind"] for o in renders[name].objects}
        assert {"Namespace", "StatefulSet", "Service", "NetworkPolicy"} <= kinds, (name, kinds)


def test_every_object_validates_against_its_schema(renders: dict[str, Render]) -> None:
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in VARIANTS:
        for obj in renders[name].objects:
            seen.setdefault(json.dumps(obj, sort_keys=True), (name, obj))
    kinds = {(o["apiVersion"], o["kind"]) for _, o in seen.values()}
    # Every custom resource (an API group of a domain other than k8s.io) has a schema here.
    groups = {k: k[0].rpartition("/")[0] for k in kinds}
    custom = {k for k, g in groups.items() if "." in g and not g.endswith(".k8s.io")}
    assert custom <= set(CRD_SCHEMAS), custom - set(CRD_SCHEMAS)
    problems = [
        f"{name}: {o['kind']}/{o['metadata']['name']}: {p}"
        for name, o in seen.values()
        if (p := schema_problems(o))
    ]
    assert not problems, "\n".join(problems)


def test_the_schema_checks_can_fail(renders: dict[str, Render]) -> None:
    r = renders["ha-postgres+daemonset+cert-manager+monitoring"]
    ds = json.loads(json.dumps(worker(r)))
    container(ds)["readinesProbe"] = {}
    assert "readinesProbe" in (schema_problems(ds) or "")
    cert = json.loads(json.dumps(r.one("Certificate", "plait-coordinator")))
    cert["spec"]["usages"].append("client-auth")
    assert schema_problems(cert)
    cert = json.loads(json.dumps(r.one("Certificate", "plait-coordinator")))
    cert["spec"]["dnsName"] = ["x"]
    assert "dnsName" in (schema_problems(cert) or "")
    mon = r.one("PodMonitor", "plait-coordinator")
    mon = json.loads(json.dumps(mon))
    mon["spec"]["podMetricsEndpoints"][0]["tlsConfig"]["ca"]["secret"]["keys"] = "ca.crt"
    assert schema_problems(mon)


# ----- the containers ---------------------------------------------------------------------------


def test_containers_are_hardened(r: Render) -> None:
    for w in workloads(r):
        pod = pod_spec(w)
        assert pod.get("automountServiceAccountToken") is False, w["metadata"]["name"]
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), (w["metadata"]["name"], key)
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
        assert pod["securityContext"]["fsGroup"] == UID
        for c in pod["containers"] + pod.get("initContainers", []):
            eff = {**pod["securityContext"], **c.get("securityContext", {})}
            where = f"{r.name}: {w['metadata']['name']}/{c['name']}"
            assert eff.get("runAsNonRoot") is True, where
            assert eff.get("runAsUser") == UID and eff.get("runAsGroup") == UID, where
            assert eff.get("readOnlyRootFilesystem") is True, where
            assert eff.get("allowPrivilegeEscalation") is False, where
            assert not eff.get("privileged"), where
            assert eff.get("capabilities") == {"drop": ["ALL"]}, where
            assert eff.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert c["image"] == IMAGES.get(r.name, IMAGE), where
            # /tmp is writable (an emptyDir) under the read-only root.
            assert "/tmp" in writable_dirs(w), where


def test_the_namespace_enforces_the_restricted_standard(r: Render) -> None:
    ns = r.one("Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in r.objects if o["kind"] != "Namespace"} == {
        NAMESPACE
    }


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
    if "client auth" not in usages or set(usages) - set(_KEY_USAGES):
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


# ----- NetworkPolicy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A pod (namespace and labels) or, with ``namespace`` None, an address outside."""

    namespace: str | None
    labels: Mapping[str, str]


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector's verdict."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e["values"],
            "NotIn": not present or value not in e["values"],
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


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


# ----- monitoring -------------------------------------------------------------------------------


def test_monitoring_is_generated_from_deploy_files(renders: dict[str, Render]) -> None:
    for name in ("sqlite+cert-manager+monitoring", "ha-postgres+daemonset+cert-manager+monitoring"):
        r = renders[name]
        dash = r.one("ConfigMap", "plait-grafana-dashboard")
        assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert dash["data"] == {"plait.json": DASHBOARD.read_text()}
        rules = r.one("ConfigMap", "plait-prometheus-rules")
        assert rules["data"] == {"rules.yml": RULES.read_text()}
        for workload in (coordinator(r), worker(r)):
            (mon,) = [
                m
                for m in r.of("PodMonitor")
                if selects(m["spec"]["selector"], pod_labels(workload))
            ]
            job = pod_labels(workload)[mon["spec"]["jobLabel"]]
            assert re.fullmatch(r"plait-.*", job), job  # rules.yml's PlaitTargetDown
            (endpoint,) = mon["spec"]["podMetricsEndpoints"]
            assert port(container(workload), endpoint["port"])
            tls = "--tls-cert" in flag_values(container(workload)["args"])
            is_coordinator = workload is coordinator(r)
            assert endpoint["scheme"] == ("https" if tls and is_coordinator else "http")
            if endpoint["scheme"] == "https":
                ca = endpoint["tlsConfig"]["ca"]["secret"]
                assert (ca["name"], ca["key"]) == ("plait-coordinator-tls", "ca.crt")
                assert endpoint["tlsConfig"]["serverName"] == "plait-coordinator"
    # Not copied: nothing under deploy/kubernetes holds the dashboard or an alert.
    alert = yaml.safe_load(RULES.read_text())["groups"][-1]["rules"][0]["alert"]
    uid = json.loads(DASHBOARD.read_text())["uid"]
    for path in KUBE.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert alert not in text and uid not in text, f"{path} copies deploy/ files"


def test_the_prometheusrule_is_the_rules_file(renders: dict[str, Render]) -> None:
    config = yaml.safe_load(RULE_GENERATOR_CONFIG.read_text())
    assert config["rulesFile"] == os.path.relpath(RULES, RULE_GENERATOR_CONFIG.parent)
    assert config["metadata"]["namespace"] == NAMESPACE
    for name in ("sqlite+cert-manager+monitoring", "ha-postgres+daemonset+cert-manager+monitoring"):
        rule = renders[name].one("PrometheusRule")
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
        assert schema_problems(rule) is None, schema_problems(rule)
        patched = RULE_LABEL_PATCH in VARIANTS[name][2].get("patches", [])
        extra = {"release": "kube-prometheus-stack"} if patched else {}
        assert rule["metadata"] == {
            "name": config["metadata"]["name"],
            "namespace": NAMESPACE,
            "labels": {**config["labels"], **extra},
        }


def _run_rule_generator(config: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """The plugin as kustomize runs it: in the kustomization's directory, told it."""
    return subprocess.run(
        [str(RULE_GENERATOR), str(config)],
        cwd=root,
        env={**os.environ, "KUSTOMIZE_PLUGIN_CONFIG_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_rule_generator_takes_its_config(tmp_path: Path) -> None:
    # Quoted and commented values as written, the path relative to the kustomization.
    (tmp_path / "rules dir").mkdir()
    (tmp_path / "rules dir" / "r.yml").write_text(RULES.read_text())
    config = tmp_path / "config"
    config.write_text(
        "apiVersion: plait.dev/v1\nkind: PrometheusRuleGenerator\n"
        "metadata:\n  name: 'rules'  # comment\n  namespace: \"ns\"\n"
        "rulesFile: rules dir/r.yml\n"
        'labels:\n  release: kube-prometheus-stack\n  "n": "1"\n  c: \'a: b\'\n'
    )
    done = _run_rule_generator(config, tmp_path)
    assert done.returncode == 0, done.stderr
    rule = yaml.safe_load(done.stdout)
    assert rule["metadata"] == {
        "name": "rules",
        "namespace": "ns",
        "labels": {"release": "kube-prometheus-stack", "n": "1", "c": "a: b"},
    }
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    config.write_text("metadata:\n  name: x\n  labels:\n    a: b\nrulesFile: rules dir/r.yml\n")
    done = _run_rule_generator(config, tmp_path)
    assert done.returncode != 0 and "top-level labels" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("---\ngroups: []", "document marker"),
        ("  - name: b\n\t  rules: []", "tab"),
        ("  - name: b\n    rules:\n      - record: b\n        expr: |2\n          up", "indicator"),
        ("other: 1", "top-level key"),
    ],
)
def test_the_rule_generator_refuses_what_indenting_would_break(
    tmp_path: Path, line: str, why: str
) -> None:
    rules = tmp_path / "bad-rules.yml"
    rules.write_text(f"groups:\n  - name: a\n    rules: []\n{line}\n")
    config = tmp_path / "config"
    config.write_text(f"metadata:\n  name: x\nrulesFile: {rules.name}\n")
    done = _run_rule_generator(config, tmp_path)
    assert done.returncode != 0 and not done.stdout, done.stdout
    assert str(rules) in done.stderr and why in done.stderr, done.stderr


def test_ci_installs_kubectl() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"apt_install\b.*\bkubectl\b", ci), ".ci/run must install kubectl"
    assert "test_deploy_kubernetes.py" in ci
