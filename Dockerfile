# The operator image: the operator as a static binary and a CA bundle, on an empty base.
#
#   make image        builds the binary and this image without a daemon (buildah), and writes
#                     target/image/opamp-operator.tar (docker-archive: `podman load`, `docker load`,
#                     `ctr images import`)
#
# By hand, with any builder: the build context is target/image/context, which holds the binary
# (built with glibc linked in statically, so no libc is needed at run time) and a CA bundle:
#
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --locked --target x86_64-unknown-linux-gnu --bin opamp-operator
#   mkdir -p target/image/context
#   cp target/x86_64-unknown-linux-gnu/release/opamp-operator target/image/context/
#   cp /etc/ssl/certs/ca-certificates.crt target/image/context/
#   docker build -t opamp-operator:0.1.0 -f Dockerfile target/image/context
#
# No shell, no package manager, no libc. In a pod the API server's CA comes with the
# service-account token; the CA bundle serves kubeconfigs naming a publicly trusted API server.
FROM scratch
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY opamp-operator /opamp-operator
# Not root (65532, distroless' `nonroot`); the chart also runs it with a read-only root file
# system and every capability dropped: it writes no files and listens on unprivileged ports.
USER 65532:65532
# OpAMP (/v1/opamp), API (/healthz, /readyz, /api/v1/...), peers, aggregated API, metrics.
EXPOSE 4320 8080 8081 8443 9090
ENTRYPOINT ["/opamp-operator", "run"]
