#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install dpokit into it, with the versions the
# test suite was last run with (constraints.txt; refresh it with `make lock`).
# torch is installed first and pinned: an unpinned torch pulled in by another package would
# fetch the CUDA build (several GB); with 2.13.0 already present, the package's ">=" range is met.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.dpokit-installed"
# Reinstall only when the declared dependencies or the constraints changed.
want="$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)-${TORCH_VERSION}-${EXTRAS}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
$PIP install -q --disable-pip-version-check -c constraints.txt "torch==${TORCH_VERSION}"
$PIP install -q --disable-pip-version-check -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
