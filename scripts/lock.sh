#!/usr/bin/env bash
# Refresh constraints.txt: resolve the package's dependencies (with the test and lint extras)
# in a fresh virtualenv, torch pinned first as in setup_venv.sh, and record every version.
# Run it, run `make lint test` against the result, and commit constraints.txt with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
$pip install -q --disable-pip-version-check ".[test,lint]"
{
    echo "# Every package and version the test suite last ran with (scripts/lock.sh writes this file)."
    echo "# scripts/setup_venv.sh installs under these constraints; pyproject.toml keeps loose bounds for users."
    echo "# Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)"
    # torch is pinned by setup_venv.sh itself (TORCH_VERSION), not here
    $pip freeze --disable-pip-version-check --exclude-editable | grep -v -i -E '^(dpokit|torch)[= @]' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
