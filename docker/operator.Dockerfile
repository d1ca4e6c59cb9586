# syntax=docker/dockerfile:1.7
# The operator image: imagegen-operator alone on distroless (glibc, CA certificates, no shell),
# running as a non-root user. Build from the repository root:
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/imagegen/imagegen-operator:0.1.0 .
#
# .ci/run has no Docker engine, so this file is built only by tests/e2e/kind.sh on a CI runner (.github/workflows/e2e-kind.yml).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The operator does not link libtorch: the runtime crate is part of the workspace but is not
# built here.
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY operator operator
COPY engine engine
COPY runtime runtime
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p imagegen-operator --bin imagegen-operator \
    && install -D -m 0755 target/release/imagegen-operator /out/imagegen-operator

FROM ${RUNTIME_IMAGE}
COPY --from=builder /out/imagegen-operator /usr/local/bin/imagegen-operator
# distroless' "nonroot" user; the chart runs the pod as this id with a read-only root.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/imagegen-operator"]
