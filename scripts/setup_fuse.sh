#!/usr/bin/env bash
# The power-loss tests (tests/test_power_loss.py) mount a FUSE file system: they need libfuse3
# and fusermount3 (Debian's fuse3) and /dev/fuse. Installed here when missing and possible (root
# with apt-get); otherwise those tests skip, saying why. Never fails the caller.
set -uo pipefail
if command -v fusermount3 >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so\.3 '; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: fuse3 is not installed (needs root and apt-get here): the power-loss tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q fuse3 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fuse3 >/dev/null 2>&1; } \
    || echo "note: could not install fuse3: the power-loss tests will skip" >&2
exit 0
