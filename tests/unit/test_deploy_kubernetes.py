"""deploy/kubernetes: every variant renders, validates, and means what its README.md says.

The variants, their rendering and the schemas are tests/kube.py's. Here: every variant renders;
every object passes its schema (and the schema checks can fail); containers hardened; the
namespace enforces the restricted standard; the generated ConfigMaps and PrometheusRule versus
deploy/grafana/plait.json and deploy/prometheus/rules.yml, and no copy of either under
deploy/kubernetes; the generator plugin's refusals. The daemons' arguments, TLS files, probes,
identities, Services and PodDisruptionBudgets are test_deploy_kubernetes_pods.py's, the
NetworkPolicies test_deploy_kubernetes_network.py's.

Skipped where kubectl (with kustomize v5) is missing; under CI (``CI`` set) that is a failure
instead: ``.ci/run`` installs kubectl.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import (
    CRD_SCHEMAS,
    IMAGE,
    IMAGES,
    KUBE,
    NAMESPACE,
    PLUGINS,
    ROOT,
    RULE_LABEL_PATCH,
    UID,
    VARIANTS,
    Render,
    container,
    coordinator,
    flag_values,
    pod_labels,
    pod_spec,
    port,
    r_fixture,  # noqa: F401  (the fixture r)
    renders_fixture,  # noqa: F401  (the fixture renders)
    schema_problems,
    selects,
    worker,
    workloads,
    writable_dirs,
)

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "plait.json"
RULE_GENERATOR = PLUGINS / "plait.dev/v1/prometheusrulegenerator/PrometheusRuleGenerator"
RULE_GENERATOR_CONFIG = KUBE / "components" / "monitoring" / "prometheusrule.yaml"


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
