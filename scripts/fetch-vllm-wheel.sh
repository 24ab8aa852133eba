#!/usr/bin/env bash
# Download the wheel of a vLLM release that is not installed, for the static
# checks of `vllm-custom-patches doctor --vllm VERSION` (the compatibility
# matrix): into the cache the tool reads, once; nothing is installed.
# Usage: scripts/fetch-vllm-wheel.sh VENV VERSION
set -euo pipefail
venv="$1"
version="$2"
cache="${VLLM_CUSTOM_PATCHES_CACHE_DIR:-$HOME/.cache/vllm-custom-patches}"
mkdir -p "$cache"
if compgen -G "$cache/vllm-$version-*.whl" >/dev/null; then
    echo "fetch-vllm-wheel: vllm $version already in $cache"
    exit 0
fi
echo "fetch-vllm-wheel: downloading vllm $version (a few hundred MB, once) into $cache"
"$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$cache" "vllm==$version"
