#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install dpokit into it.
# torch is installed first and pinned: an unpinned torch pulled in by another package would
# fetch the CUDA build (several GB); with 2.13.0 already present, the package's ">=" range is met.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.dpokit-installed"
# Reinstall only when the package's declared dependencies changed.
want="$(sha1sum pyproject.toml | cut -d' ' -f1)-${TORCH_VERSION}-${1:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
$PIP install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
$PIP install -q --disable-pip-version-check -e ".${1:+[$1]}"
echo "$want" > "$stamp"
