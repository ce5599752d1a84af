#!/usr/bin/env bash
# Creates ./.venv with the project and its test extras, at the exact versions
# of constraints.txt, once per setup.py and constraints.txt. Sourced by
# run_local.sh and run_tests.sh; needs only CPython 3.11 to 3.13 and the
# package index.
#
# The interpreter: $PYTHON if set, else the first python3.11, python3,
# python3.12 or python3.13 on PATH (every match, in PATH order) that
# setup.py's python_requires admits (>=3.11.8, not 3.12.0/3.12.1, <3.14).
# Failing that, one whose version is older but whose zipfile refuses
# overlapping entries all the same (a distributor's backport of the
# CVE-2024-0450 fix, such as Debian 12's 3.11.2-6+deb12u2 and later); failing
# that, any 3.11 to 3.13, with a warning. Those two install this dev venv
# with --ignore-requires-python (README, "Pinned versions").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BUSI_VENV:-$ROOT/.venv}"
CONSTRAINTS="$ROOT/constraints.txt"
# Prints "admitted", "patched" (too old for python_requires, but its zipfile
# has the CVE-2024-0450 check), "unpatched", or "unsupported"; fails when $1
# does not run.
_busi_python_status() {
  "$1" - "$ROOT/setup.py" 2>/dev/null <<'PY'
import io, operator, re, struct, sys, zipfile
v = sys.version_info[:3]
if sys.implementation.name != "cpython" or not (3, 11) <= v[:2] <= (3, 13):
  print("unsupported"); sys.exit()
spec = re.search(r'python_requires="([^"]+)"', open(sys.argv[1]).read())[1]
ops = {">=": operator.ge, "<=": operator.le, "!=": operator.ne,
       "==": operator.eq, ">": operator.gt, "<": operator.lt}
def admits(clause):
  op, ver = re.fullmatch(r"\s*([<>!=]=?)\s*([\d.]+)\s*", clause).groups()
  want = tuple(int(p) for p in ver.split("."))
  return ops[op](v[:len(want)], want)
if all(admits(c) for c in spec.split(",")):
  print("admitted"); sys.exit()
# Two members, the second's directory entry pointing into the first's data:
# a zipfile with the CVE-2024-0450 fix refuses to read the first.
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
  z.writestr("a", b"x" * 100)
  z.writestr("b", b"y")
data = bytearray(buf.getvalue())
struct.pack_into("<I", data, data.rfind(b"PK\x01\x02") + 42, 40)
try:
  zipfile.ZipFile(io.BytesIO(bytes(data))).read("a")
  print("unpatched")
except zipfile.BadZipFile:
  print("patched")
PY
}
_busi_pick_python() {
  local want candidate status
  for want in admitted patched unpatched; do
    for candidate in $(type -ap python3.11 python3 python3.12 python3.13); do
      status="$(_busi_python_status "$candidate")" || continue
      [ "$status" = "$want" ] && { echo "$candidate"; return 0; }
    done
  done
  return 1
}
if [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"  # an existing venv keeps its interpreter
elif [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY="$(_busi_pick_python)" ||
    { echo "CPython 3.11 to 3.13 is required (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
fi
PY_STATUS="$(_busi_python_status "$PY")" || PY_STATUS="unsupported"
[ "$PY_STATUS" != "unsupported" ] ||
  { echo "$PY is not CPython 3.11 to 3.13 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
PY_VERSION="$("$PY" -c 'import platform; print(platform.python_version())')"
INSTALL_FLAGS=()
case "$PY_STATUS" in
  patched)
    INSTALL_FLAGS=(--ignore-requires-python)
    BUSI_PY_NOTE="note: Python $PY_VERSION ($PY) is below setup.py's >=3.11.8 but its zipfile refuses overlapping entries (a backport of the CVE-2024-0450 fix, checked); the dev venv is installed with --ignore-requires-python" ;;
  unpatched)
    INSTALL_FLAGS=(--ignore-requires-python)
    BUSI_PY_NOTE="warning: Python $PY_VERSION ($PY) lacks zipfile's CVE-2024-0450 fix (overlapping-entry zip bombs; setup.py asks >=3.11.8): the dev venv is installed with --ignore-requires-python; input archives are read by busi_core.archives.read_zip_member, which refuses overlapping members itself; for a fixed Python set PYTHON and remove $VENV" ;;
  *) BUSI_PY_NOTE="" ;;
esac
STAMP="$VENV/.busi-installed-$(cat "$ROOT/setup.py" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "Setting up $VENV with Python $PY_VERSION (first run: a few minutes, ~3 GB)..." >&2
  [ "$PY_STATUS" != "patched" ] || echo "$BUSI_PY_NOTE" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" \
    ${INSTALL_FLAGS[@]+"${INSTALL_FLAGS[@]}"} -e "$ROOT[test]" >&2
  rm -f "$VENV"/.busi-installed-*
  touch "$STAMP"
fi
# Every time: the dev venv runs on a Python without the fix.
[ "$PY_STATUS" != "unpatched" ] || echo "$BUSI_PY_NOTE" >&2
unset -f _busi_python_status _busi_pick_python
export PATH="$VENV/bin:$PATH"
# No Google credential lookups and no metadata-server probes from local runs.
export NO_GCE_CHECK=true GCE_METADATA_HOST=127.0.0.1 GCE_METADATA_IP=127.0.0.1
export TF_ENABLE_ONEDNN_OPTS="${TF_ENABLE_ONEDNN_OPTS:-1}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
