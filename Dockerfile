# kandinsky-serve with its embedded model: `docker build -t kandinsky-serve .` (CPU torch), or
# `docker build --build-arg CUDA=cu128 -t kandinsky-serve:cuda .` for a CUDA build of torch
# (PyTorch's wheel index for that CUDA version; the wheels bring their CUDA libraries).
# Run: `docker run --rm -p 8000:8000 --shm-size=2g kandinsky-serve` (docs/configuration-and-cluster.md, "Container image").
FROM python:3.11-slim-bookworm

# CPU by default, as `make`'s TORCH_SPEC; CUDA=cu128 (or another PyTorch index name) for GPUs.
ARG CUDA=""
ARG TORCH_VERSION=2.13.0
# Keep in step with cluster/node-types.yaml's ray_version (tests/unit/test_dockerfile.py holds it).
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's default liveness/readiness probes run it in the Ray containers.
# uid 1000, gid 100 (users): the user the KubeRay render's securityContext runs as, as in rayproject/ray.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray

RUN index="https://download.pytorch.org/whl/${CUDA:-cpu}" \
    && pip install "torch==${TORCH_VERSION}" --index-url "$index"

WORKDIR /opt/kandinsky-serve
COPY pyproject.toml README.md ./
COPY deployments ./deployments
COPY serve ./serve
COPY configs ./configs
# The package (the embedded model is its package data) and the Ray the cluster runs; then check
# that the model's files arrived and the app imports.
RUN pip install "ray[serve]==${RAY_VERSION}" . \
    && cd / && python -c "from serve.embedded import trained_checkpoint; import serve.graph.build; print(trained_checkpoint())"

# Writable state under /tmp only, so the container also runs with a read-only root filesystem.
ENV HOME=/home/ray \
    XDG_CACHE_HOME=/tmp/cache \
    KANDINSKY_CACHE_DIR=/tmp/cache/kandinsky-serve
USER 1000:100
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
CMD ["kandinsky-serve", "run", "--config", "configs/local.yaml", "--host", "0.0.0.0"]
