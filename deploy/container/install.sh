#!/bin/sh
# Installs Plait into a new virtual environment at PREFIX from a hashed lock file.
#
# The one copy of the install steps: the image's builder stage runs it
# (deploy/container/Containerfile) and CI runs it for real, then starts what it installed
# (tests/system/test_container_install.py), so the image installs exactly what CI proves.
#
# usage: deploy/container/install.sh PREFIX [LOCK]
#   PREFIX  the venv to create (absent or empty), e.g. /opt/plait
#   LOCK    the lock to install, relative to the source tree or absolute
#           (default requirements/otlp.lock: the runtime pins plus the OTLP span exporters)
# environment: PYTHON, the interpreter the venv is made from (default python3, 3.11+)
#
# 1. the venv, from PYTHON;
# 2. every dependency from LOCK, wheels only: pip refuses any file whose sha256 the lock does
#    not name, and any package it does not pin (--require-hashes);
# 3. Plait's own wheel, built with the lock's setuptools (no build isolation: nothing is
#    fetched) from a copy of the sources, so the tree it runs in gains no build/ or
#    *.egg-info; then installed with --no-deps (its dependencies are the lock's);
# 4. pip check: every installed distribution's requirements are met.
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 PREFIX [LOCK]" >&2
    exit 2
fi
prefix=$1
src=$(cd "$(dirname "$0")/../.." && pwd)
lock=${2:-requirements/otlp.lock}
case $lock in /*) ;; *) lock=$src/$lock ;; esac
python=${PYTHON:-python3}

if [ ! -f "$lock" ]; then
    echo "$0: no lock file $lock" >&2
    exit 2
fi
if [ -e "$prefix" ] && [ -n "$(ls -A "$prefix")" ]; then
    echo "$0: $prefix exists and is not empty; install into a new directory" >&2
    exit 2
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

echo "==> venv $prefix ($("$python" --version))"
"$python" -m venv "$prefix"
pip="$prefix/bin/python -m pip --disable-pip-version-check --no-input"

echo "==> dependencies from ${lock#"$src"/} (--require-hashes, wheels only)"
$pip install --progress-bar off --require-hashes --only-binary :all: -r "$lock"

echo "==> Plait's wheel (setuptools from the lock, no build isolation)"
mkdir "$scratch/src" "$scratch/src/clients"
cp -R "$src/pyproject.toml" "$src/README.md" "$src/coordinator" "$src/workerd" "$scratch/src/"
cp -R "$src/clients/python" "$scratch/src/clients/"
$pip wheel --no-deps --no-build-isolation --wheel-dir "$scratch/dist" "$scratch/src"
$pip install --no-deps --no-index "$scratch"/dist/plait-*.whl

echo "==> pip check"
$pip check
