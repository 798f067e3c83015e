# The sluice image: the node agent, the two CNI binaries its install-cni init
# container copies onto the host, and the userspace tools the agent executes.
#
#   make image                      # docker build -t sluice:0.1.0 .
#   docker build --build-arg RUST_TARGET=aarch64-unknown-linux-musl ...  # on an arm64 builder
#
# Published builds use the defaults below: the official rust image builds static
# (musl) binaries and the official debian slim image runs them. Where no registry is
# reachable (this repository's CI) the bases are build args and the binaries come
# from the host: docs/image.md, and tests/e2e/image_daemonset.rs which builds and runs
# the image with podman:
#
#   podman build --build-arg BASE_IMAGE=localhost/sluice-base:bookworm \
#       --build-arg BINARIES=prebuilt --build-context prebuilt=DIR_WITH_THE_4_BINARIES .
#
# Needs BuildKit (docker's default builder since 23.0) or buildah/podman >= 4.0:
# both build only the stages the final image uses, so `binaries-prebuilt` (and its
# `prebuilt` context) is never touched by the default build, nor the rust image by a
# prebuilt one.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG BUILDER_IMAGE=docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE}
ARG BASE_IMAGE=docker.io/library/debian:${DEBIAN_RELEASE}-slim
# source: compile in the builder image (published images). prebuilt: take the
# binaries from the build context named `prebuilt` (glibc binaries must have been
# built against the base image's glibc, e.g. on a bookworm host for a bookworm base).
ARG BINARIES=source

FROM ${BUILDER_IMAGE} AS binaries-source
ARG RUST_TARGET=x86_64-unknown-linux-musl
# Static (musl) binaries: `sluice` and `sluice-ipam` are copied onto the host and
# run there by the container runtime, whose libc we cannot know.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${RUST_TARGET}"
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target "${RUST_TARGET}" \
      -p sluice-cni -p sluice-ipam -p sluice-agent -p sluicectl --bins \
 && mkdir /out \
 && for bin in sluice sluice-ipam sluice-agent sluicectl; do \
      cp "target/${RUST_TARGET}/release/${bin}" /out/; \
    done

FROM scratch AS binaries-prebuilt
COPY --from=prebuilt sluice sluice-ipam sluice-agent sluicectl /out/

FROM binaries-${BINARIES} AS build

FROM ${BASE_IMAGE}
# iptables ships both backends (iptables-legacy-* and iptables-nft-*): the agent
# uses whichever already holds the host's rules. nftables (`nft`) for the nftables
# dataplane and its probe, ipset for the iptables dataplane's peer sets,
# iproute2 and conntrack for operators debugging from inside the pod, kmod so
# modprobe works against the host's /lib/modules (mounted read-only).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset nftables iproute2 conntrack kmod \
 && rm -rf /var/lib/apt/lists/*
# /opt/sluice/bin is where `sluice-agent install-cni` copies the CNI binaries from
# (its --source-bin-dir default); on PATH for the agent and operators.
COPY --from=build /out/ /opt/sluice/bin/
ENV PATH=/opt/sluice/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="sluice node agent and CNI plugins" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["sluice-agent", "run"]
