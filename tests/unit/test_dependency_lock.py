"""The hashed dependency locks agree with pyproject.toml (no network: `make lock` resolves them).

CI and deploy install only from requirements/*.lock with ``pip --require-hashes``; a range
changed in pyproject.toml without re-locking, or a lock entry without hashes, fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)")


def read_lock(name: str) -> dict[str, tuple[str, int]]:
    """``{canonical name: (version, number of hashes)}`` of a uv/pip-compile lock file."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's dependencies with ``extras`` (``plait[x]`` entries expanded)."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    optional = PYPROJECT["project"]["optional-dependencies"]
    todo = list(extras)
    while todo:
        for raw in optional[todo.pop()]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "plait":
                todo += sorted(req.extras)
            else:
                reqs.append(req)
    reqs.append(Requirement("setuptools>=77"))  # requirements/build.in
    return reqs


LOCKS = [("runtime.lock", ()), ("otlp.lock", ("otlp",)), ("dev.lock", ("dev",))]


@pytest.mark.parametrize(("lock", "extras"), LOCKS)
def test_every_dependency_is_locked_within_its_range(lock: str, extras: tuple[str, ...]) -> None:
    pins = read_lock(lock)
    for req in requirements(*extras):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in {lock}: run make lock"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock} pins {req.name}=={version}, outside pyproject.toml's {req}: run make lock"
        )


@pytest.mark.parametrize("lock", ["runtime.lock", "otlp.lock", "dev.lock"])
def test_every_locked_package_carries_hashes(lock: str) -> None:
    pins = read_lock(lock)
    assert pins, f"{lock} has no pins"
    unhashed = sorted(name for name, (_, hashes) in pins.items() if hashes == 0)
    assert not unhashed, f"{lock}: no --hash for {unhashed}"


def test_runtime_dependencies_have_upper_bounds() -> None:
    for raw in PYPROJECT["project"]["dependencies"]:
        req = Requirement(raw)
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
            f"runtime dependency {raw!r} has no upper bound"
        )


@pytest.mark.parametrize(
    ("small", "large"), [("runtime.lock", "otlp.lock"), ("otlp.lock", "dev.lock")]
)
def test_each_lock_pins_the_one_before_it_alike(small: str, large: str) -> None:
    """runtime ⊂ otlp ⊂ dev, at the same versions: what CI tests is what users install."""
    little, big = read_lock(small), read_lock(large)
    differ = {n: (v, big.get(n, ("missing", 0))[0]) for n, (v, _) in little.items()}
    assert {n: d for n, d in differ.items() if d[0] != d[1]} == {}
