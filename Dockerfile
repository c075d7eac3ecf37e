# syntax=docker/dockerfile:1
# ballast container image: build with cargo, run on distroless (glibc, no shell, no
# package manager, no build tools) as a non-root user.
#   docker build -t ballast .
#   docker run -p 8080:8080 -v ballast-data:/var/lib/ballast \
#     -e BALLAST_SOURCES__0__ID=web -e BALLAST_SOURCES__0__WRITE_KEY=change-me ballast
# Kubernetes: charts/ballast (docs/KUBERNETES.md).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# No debug info and a stripped binary in the image (the release profile keeps line
# tables for local profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p ballast --bin ballast \
    && mkdir -p /out/data \
    && cp target/release/ballast /out/ballast

# gcr.io/distroless/cc: glibc and libgcc for the binary, nothing else; "nonroot" is
# uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ballast /usr/local/bin/ballast
COPY packaging/container.toml /etc/ballast/ballast.toml
COPY --from=build --chown=65532:65532 /out/data /var/lib/ballast
USER 65532:65532
VOLUME ["/var/lib/ballast"]
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/ballast"]
CMD ["serve", "--config", "/etc/ballast/ballast.toml"]
