# syntax=docker/dockerfile:1.7
# The runtime image: the `imagegen` binary and the libtorch 2.11 it links, nothing else (no
# compiler, no Python), running as a non-root user. Build from the repository root.
#
# GPU (default; CUDA 13 base, PyTorch's cu130 wheels):
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/imagegen/imagegen:0.1.0 .
# CPU (kind, CI, laptops):
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/imagegen/imagegen:0.1.0-cpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#     --build-arg BASE_IMAGE=debian:bookworm-slim .
#
# .ci/run has no Docker engine, so this file is built only by tests/e2e/kind.sh on a CI runner (.github/workflows/e2e-kind.yml).

ARG RUST_IMAGE=rust:1.95-bookworm
# CUDA 13 runtime base. The exact CUDA libraries torch 2.11 was built with come from its
# wheels (site-packages/nvidia), copied beside torch/lib below.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# tch 0.24 builds against exactly PyTorch 2.11.0 (LIBTORCH_USE_PYTORCH: torch-sys asks this
# Python where libtorch is).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.11.0 \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && ln -s "$site" /opt/site-packages \
    && mkdir -p "$site/nvidia"
ENV PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY operator operator
COPY engine engine
COPY runtime runtime
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p imagegen-runtime --bin imagegen \
    && install -D -m 0755 target/release/imagegen /out/imagegen \
    # Keep only the shared libraries the binary loads, at the path its rpath names
    # (runtime/build.rs records torch's lib dir); the CUDA wheels' libraries sit beside it
    # in site-packages/nvidia, which torch's own rpaths refer to.
    && site="$(readlink -f /opt/site-packages)" \
    && mkdir -p "/out/libs$site/torch" \
    && cp -a "$site/torch/lib" "/out/libs$site/torch/lib" \
    && cp -a "$site/nvidia" "/out/libs$site/nvidia"

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 imagegen \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin imagegen
COPY --from=builder /out/libs/ /
COPY --from=builder /out/imagegen /usr/local/bin/imagegen
# The operator mounts the weight cache at /cache (HF_HOME) and the store at /store, and gives
# the pod a writable /tmp: the root filesystem can stay read-only.
ENV HOME=/tmp HF_HOME=/cache IMAGEGEN_LISTEN=0.0.0.0:8080
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/imagegen"]
CMD ["--help"]
