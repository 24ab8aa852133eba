#!/usr/bin/env bash
# The build steps both images run once vLLM is in place (Dockerfile: the
# official vllm/vllm-openai image; Dockerfile.cpu: python:3.11-slim plus
# scripts/install-vllm.sh), and that CI runs in a fresh virtual environment
# (tests/real_vllm/test_vllm_image_build.py):
#
#   1. install vllm-custom-patches from SOURCE_DIR (a checkout or the build
#      context: pyproject.toml, README.md, src/, patches/);
#   2. install the optional patch packages (pip requirement specifiers);
#   3. install the optional directory of patch files (the image's
#      VLLM_CUSTOM_PATCHES_PATH), readable by all and writable only by its
#      owner: the plugin refuses patch files that group or others can write;
#   4. check that the plugin imports and that the selected patches fit the
#      vLLM of this Python (`vllm-custom-patches check`): a selected patch that
#      would not apply fails the build, naming the patch and the fix.
#
# Installing never changes a package that is already installed (vLLM, torch,
# ...): every pip run is constrained to the versions present before it. A patch
# package that needs another version of one of them fails to install instead.
#
# Exit status: 0 all steps passed; 1 a step failed (an install, or a selected
# patch does not fit); 2 bad arguments or a bad setting (e.g. an unparsable
# VLLM_CUSTOM_PATCHES).
set -euo pipefail

usage() {
    cat <<EOF
usage: $0 [options] SOURCE_DIR

Options (each defaults to the environment variable in brackets):
  --python PATH           Python to install into and check with [PYTHON; default: python3].
                          Use the Python that has vLLM: the image's, or a CI venv's.
  --patch-packages SPECS  patch packages to install: pip requirement specifiers separated
                          by blanks, e.g. "my-patches==1.2 other-patches>=2" [PATCH_PACKAGES]
  --patch-dir DIR         directory of patch files (*.py) to install [PATCH_DIR]
  --patch-dest DIR        where to install them: the image's VLLM_CUSTOM_PATCHES_PATH
                          [PATCH_DEST; default: /opt/vllm-patches]
  --select SELECTION      patches that must fit, in VLLM_CUSTOM_PATCHES syntax
                          ("A,B", "*", "*,-C") [VLLM_CUSTOM_PATCHES; default: empty, nothing
                          checked]. As at vLLM start-up with VLLM_CUSTOM_PATCHES_STRICT=1: a
                          patch named that would not apply fails the build; one taken in
                          only by '*' and unable to apply is reported as SKIPPED.
  --check-env NAME=VALUE  a setting the selected patches read, for the check only (e.g.
                          VLLM_CUSTOM_PATCHES_TRACE_FILE=/tmp/trace.jsonl); repeatable
                          [PATCH_CHECK_ENV: NAME=VALUE items separated by blanks]
  -h, --help              show this help
EOF
}

die_usage() {
    echo "image-build: $*" >&2
    usage >&2
    exit 2
}

python=${PYTHON:-python3}
patch_packages=${PATCH_PACKAGES:-}
patch_dir=${PATCH_DIR:-}
patch_dest=${PATCH_DEST:-/opt/vllm-patches}
selection=${VLLM_CUSTOM_PATCHES:-}
check_env=()
if [[ -n ${PATCH_CHECK_ENV:-} ]]; then
    read -r -a check_env <<<"$PATCH_CHECK_ENV"
fi
source_dir=

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --python | --patch-packages | --patch-dir | --patch-dest | --select | --check-env)
            [[ $# -ge 2 ]] || die_usage "$1 needs a value"
            case $1 in
                --python) python=$2 ;;
                --patch-packages) patch_packages=$2 ;;
                --patch-dir) patch_dir=$2 ;;
                --patch-dest) patch_dest=$2 ;;
                --select) selection=$2 ;;
                --check-env) check_env+=("$2") ;;
            esac
            shift 2
            ;;
        --) shift; break ;;
        -*) die_usage "unknown option $1" ;;
        *)
            [[ -z $source_dir ]] || die_usage "one SOURCE_DIR only (got '$source_dir' and '$1')"
            source_dir=$1
            shift
            ;;
    esac
done
if [[ $# -gt 0 ]]; then
    [[ -z $source_dir && $# -eq 1 ]] || die_usage "one SOURCE_DIR only"
    source_dir=$1
fi

[[ -n $source_dir ]] || die_usage "SOURCE_DIR is missing"
[[ -f $source_dir/pyproject.toml ]] || die_usage "$source_dir has no pyproject.toml: not a vllm-custom-patches source tree"
if ! command -v "$python" >/dev/null 2>&1; then
    die_usage "Python '$python' not found (--python / PYTHON)"
fi
if [[ -n $patch_dir && ! -d $patch_dir ]]; then
    die_usage "patch directory '$patch_dir' does not exist (--patch-dir / PATCH_DIR)"
fi
for item in ${check_env[@]+"${check_env[@]}"}; do
    [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--check-env '$item' is not NAME=VALUE"
done

umask 022
work=$(mktemp -d "${TMPDIR:-/tmp}/vcp-image-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log() { echo "image-build: $*"; }
fail() {
    echo "image-build: FAILED: $*" >&2
    exit 1
}

log "python: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# What is installed now stays as it is (see the header).
frozen="$work/installed-before.txt"
freeze() {
    # NAME==VERSION of every distribution this Python sees (the first of a name
    # on sys.path, as for imports), but for this package, which may be replaced.
    # Versions pip cannot parse (some distro packages) are left out.
    "$python" - >"$frozen" <<'PY'
import importlib.metadata
import re

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # no packaging yet: a loose check
    Version = None
seen = set()
for dist in importlib.metadata.distributions():
    name, version = dist.metadata["Name"], dist.version
    if not name or not version:
        continue
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    if key == "vllm-custom-patches":
        continue
    if Version is not None:
        try:
            Version(version)
        except InvalidVersion:
            continue
    elif not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        continue
    print(f"{name}=={version}")
PY
}
pip_install() {
    "$python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
        --constraint "$frozen" "$@"
}

# 1. This package. Built from a copy of just what the build needs, so that
#    neither a checkout nor the image's copy of the source gets build/ or
#    *.egg-info written into it (and a checkout's .venv is not copied).
log "[1/4] install vllm-custom-patches from $source_dir"
tree="$work/vllm-custom-patches"
mkdir -p "$tree"
for part in pyproject.toml README.md src patches; do
    [[ -e $source_dir/$part ]] || fail "$source_dir/$part is missing; SOURCE_DIR must hold pyproject.toml, README.md, src/ and patches/"
    cp -R "$source_dir/$part" "$tree/"
done
freeze
pip_install "$tree" || fail "pip could not install vllm-custom-patches from $source_dir (see pip's output above)"

# 2. Patch packages.
read -r -a packages <<<"$patch_packages"
if [[ ${#packages[@]} -gt 0 ]]; then
    log "[2/4] install patch packages: ${packages[*]}"
    freeze
    pip_install "${packages[@]}" || fail "pip could not install the patch packages '${packages[*]}' (see pip's output above).
  They are installed without changing any package already there (vLLM, torch, ...): a patch
  package that needs other versions of those does not fit this image's vLLM."
else
    log "[2/4] no patch packages (--patch-packages / PATCH_PACKAGES)"
fi

# 3. Patch files.
if [[ -n $patch_dir ]]; then
    log "[3/4] install patch files: $patch_dir -> $patch_dest (u=rwX,go=rX)"
    mkdir -p "$patch_dest"
    if [[ $(cd "$patch_dir" && pwd -P) != $(cd "$patch_dest" && pwd -P) ]]; then
        cp -R "$patch_dir/." "$patch_dest/"
    fi
    chmod -R u=rwX,go=rX "$patch_dest"
    export VLLM_CUSTOM_PATCHES_PATH=$patch_dest
else
    log "[3/4] no patch files (--patch-dir / PATCH_DIR)"
fi

# 4. The plugin imports, and the selected patches fit this vLLM.
log "[4/4] check"
"$python" -c "import vllm_custom_patches.plugin, vllm_custom_patches_catalogue" \
    || fail "the installed vllm-custom-patches does not import in $python (see the error above)"
log "$("$python" -m vllm_custom_patches version)"
if [[ -z ${selection//[[:space:],]/} ]]; then
    log "no patches selected (--select / VLLM_CUSTOM_PATCHES): nothing to check; select the patches the image will run with, or '*'"
    log "done"
    exit 0
fi

report="$work/check.json"
status=0
# The check applies each patch to the real classes, reports, and rolls back.
# It runs without writing caches or bytecode into the image.
env ${check_env[@]+"${check_env[@]}"} \
    VLLM_CUSTOM_PATCHES="$selection" \
    VLLM_CACHE_ROOT="$work/vllm-cache" \
    VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 PYTHONDONTWRITEBYTECODE=1 \
    "$python" -m vllm_custom_patches check --json >"$report" || status=$?

if [[ $status -eq 2 ]]; then
    echo "image-build: FAILED: bad setting for the check (message above): fix --select / VLLM_CUSTOM_PATCHES or the settings in --check-env" >&2
    exit 2
fi
if [[ $status -ne 0 && $status -ne 1 ]] || [[ ! -s $report ]]; then
    cat "$report" >&2
    fail "vllm-custom-patches check crashed (exit status $status; output above)"
fi

# Print the report; for each patch that would not apply, say which and how to fix it.
"$python" - "$report" "$selection" <<'PY' || exit 1
import json
import sys

report = json.load(open(sys.argv[1]))
selection = sys.argv[2]
rows = report["patches"]
print(f"image-build: VLLM_CUSTOM_PATCHES={selection!r} against vLLM {report['vllm']}:")
width = max([len(row["name"]) for row in rows] + [4])
for row in rows:
    detail = row["reason"] or "; ".join(
        part
        for part in (
            row["target"],
            f"vLLM {row['versions']}" if row["versions"] else "",
            "overrides " + ", ".join(row["overrides"]) if row["overrides"] else "",
            "adds " + ", ".join(row["additions"]) if row["additions"] else "",
        )
        if part
    )
    print(f"  {row['name']:<{width}}  {row['result'].upper():<8} {row['source']}")
    if detail:
        print(f"  {'':<{width}}  {detail}")
failed = [row for row in rows if row["result"] == "failed"]
if not rows:
    print("image-build: the selection takes in no patch")
for row in failed:
    gate = f" (it supports vLLM {row['versions']})" if row["versions"] else ""
    print(
        f"image-build: FAILED: patch {row['name']!r} would not apply to this image's vLLM {report['vllm']}: "
        f"{row['reason']}\n"
        f"  Fix: drop {row['name']!r} from VLLM_CUSTOM_PATCHES (the build-arg / --select), "
        f"or build on a vLLM the patch supports{gate}, or fix the patch; if the reason is a "
        f"missing or bad setting, pass it with PATCH_CHECK_ENV / --check-env.",
        file=sys.stderr,
    )
sys.exit(1 if failed else 0)
PY
[[ $status -eq 0 ]] || fail "vllm-custom-patches check exited with $status"
log "done: the selected patches fit vLLM in $python"
