"""deploy/kubernetes rendered: every kustomize variant, parsed, and what reads it.

Each variant (an overlay alone, or with components, from a throwaway kustomization beside the
test's temp files) is rendered once a session with ``kubectl kustomize`` (kubectl embeds
kustomize; v5 is needed), all in parallel; the monitoring component loads deploy/grafana and
deploy/prometheus from outside its directory and makes its PrometheusRule with Plait's exec
generator plugin, so those renders pass ``--enable-alpha-plugins --load-restrictor
LoadRestrictionsNone`` with ``KUSTOMIZE_PLUGIN_HOME`` set, as the README says. The ``renders``
and ``r`` fixtures are imported by each test module (``renders_fixture``, ``r_fixture``).

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

Renders are skipped where kubectl (with kustomize v5) is missing; under CI (``CI`` set) that is
a failure instead: ``.ci/run`` installs kubectl.

Used by tests/unit/test_deploy_kubernetes.py, test_deploy_kubernetes_pods.py and
test_deploy_kubernetes_network.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
PLUGINS = KUBE / "plugins"  # KUSTOMIZE_PLUGIN_HOME

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


@functools.cache
def _render_all(tmp: Path) -> dict[str, Render]:
    """Every variant rendered, in parallel, its kustomizations written under ``tmp``. Cached,
    as pytest makes each module's import of ``renders`` a fixture of its own: one render a
    session however many modules use it."""
    kubectl = _require_kubectl()
    tmp.mkdir()
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


@pytest.fixture(scope="session", name="renders")
def renders_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Render]:
    """Every variant's render, by name (rendered once a session)."""
    return _render_all(tmp_path_factory.getbasetemp() / "kustomize")


@pytest.fixture(params=list(VARIANTS), name="r")
def r_fixture(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    """Each variant's render in turn."""
    return renders[request.param]


# ----- pods, containers, volumes, labels ----------------------------------------------------------


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
KEY_USAGES = [
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
                "usages": {"type": "array", "items": {"enum": KEY_USAGES}},
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
