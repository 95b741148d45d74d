"""Prints deploy/prometheus/rules.yml as a Prometheus Operator PrometheusRule (deploy layer).

kustomize can generate a ConfigMap from the rules file (this component does), but it cannot
place a file's YAML inside another object's field, and a PrometheusRule needs the rule groups
as ``spec.groups``. So the object is made here, from the file as it is, when you apply it::

    python3 deploy/kubernetes/components/monitoring/prometheusrule.py \\
        --label release=kube-prometheus-stack | kubectl apply -f -

``--label`` sets what your Prometheus' ``ruleSelector`` matches. Needs PyYAML (a dependency
of Plait, so any Plait venv has it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).resolve().parents[3] / "prometheus" / "rules.yml"


def prometheus_rule(
    groups_file: Path, *, name: str, namespace: str, labels: dict[str, str]
) -> dict[str, Any]:
    """The PrometheusRule whose ``spec`` is ``groups_file``'s content, unchanged."""
    with open(groups_file, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or set(spec) != {"groups"}:
        raise ValueError(f"{groups_file}: expected a Prometheus rule file (one key, groups)")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "plait", **labels},
        },
        "spec": spec,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as rules.yml has them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the PrometheusRule to stdout as YAML."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=Path, default=RULES, help=f"rule file (default {RULES})")
    p.add_argument("--name", default="plait", help="the object's name (default plait)")
    p.add_argument("--namespace", default="plait", help="its namespace (default plait)")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)"
    )
    args = p.parse_args(argv)
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    rule = prometheus_rule(args.rules, name=args.name, namespace=args.namespace, labels=labels)
    sys.stdout.write(yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100))
    return 0


if __name__ == "__main__":
    sys.exit(main())
