# The few verbs people expect. `make test` is what CI runs (.ci/run).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
export OPAMP_TOOLS_BIN := $(CURDIR)/target/tools/bin

.PHONY: all build image test test-image test-node unit lint fmt crds tools tools-interop tools-k8s tools-k8s-node tools-otel tools-bench demo bench fuzz fuzz-lint soak

all: build

build:
	$(CARGO) build --release

## tools: every external binary the tests and the demo use, built from registries and cached
## outside the clone (~/.cache/opamp-operator/tools), linked into target/tools/bin.
tools: tools-interop tools-k8s tools-otel tools-bench

tools-interop:
	bash tests/tools/build-interop-agent.sh
	bash tests/tools/build-protodump.sh

tools-otel:
	bash tests/tools/build-otel.sh

tools-bench:
	bash tests/tools/build-bench.sh

tools-k8s:
	bash tests/tools/build-k8s.sh
	bash tests/tools/build-helm.sh

## tools-k8s-node: what `tests/tools/local-cluster up --node` adds (kubelet, kube-controller-manager,
## kube-scheduler and the pod sandbox image); not part of `tools`.
tools-k8s-node:
	bash tests/tools/build-k8s-node.sh
	bash tests/tools/build-pause-image.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## crds: regenerate crds/ from src/api, and the chart's copy (tests fail when either drifts).
crds:
	$(CARGO) run -q -- crds --out-dir crds
	rm -f charts/opamp-operator/crds/*.yaml
	cp crds/*.yaml charts/opamp-operator/crds/

## test: lints, then every test (unit, transport, interop with the opamp-go agent, e2e against a
## local kube-apiserver + etcd). The cluster is brought up once for the whole run and always taken
## down afterwards, whether the tests pass, fail or are interrupted.
test: tools-interop tools-k8s tools-otel lint
	trap 'tests/tools/local-cluster down; LOCAL_CLUSTER_DIR=$(CURDIR)/target/local-cluster-faults tests/tools/local-cluster down' EXIT; \
	tests/tools/local-cluster up; \
	$(CARGO) test --all-targets --no-fail-fast

## image: the operator image from the Dockerfile, without a daemon (buildah; installed from
## Debian's packages when missing): target/image/opamp-operator.tar, named in target/image/name.
image:
	CARGO="$(CARGO)" tests/tools/build-image

## test-image: builds the image and runs it with podman (tests/image.rs: --version, /healthz,
## /readyz against a local API server, exit 0 on SIGTERM; non-root, read-only root file system).
test-image: image tools-k8s
	trap 'tests/tools/local-cluster down' EXIT; \
	tests/tools/local-cluster up; \
	$(CARGO) test --test image -- --ignored

## test-node: the chart on a real node (tests/node.rs): `local-cluster up --node` (kubelet,
## containerd, controller-manager, scheduler, in a network namespace of their own), the image
## loaded into it, then helm install / upgrade / uninstall with an opamp-go agent connected. Needs
## root; ~25 min cold (the release build and the node's binaries), ~3 min warm.
test-node: image tools-k8s tools-k8s-node tools-interop
	export LOCAL_CLUSTER_DIR=$(CURDIR)/target/local-cluster-node; \
	trap 'tests/tools/local-cluster down' EXIT; \
	tests/tools/local-cluster up --node; \
	tests/tools/local-cluster load-image target/image/opamp-operator.tar; \
	$(CARGO) test --test node --no-run; \
	tests/tools/local-cluster exec -- $(CARGO) test --test node -- --ignored --nocapture

unit:
	$(CARGO) test --lib

## demo: the operator, a small fleet and examples/ on a local control plane; stops it all at the
## end (DEMO_KEEP=1 leaves it running; tests/tools/demo down stops it).
demo:
	CARGO="$(CARGO)" tests/tools/demo

## bench: opamp-operator and an opamp-go server (tests/bench/server) side by side under the same
## fleet simulator: RSS per agent, CPU per heartbeat, time to push a config to every agent. Then,
## on the local control plane: one `opamp-operator run` (kubectl apply -> status.appliedAgents == N),
## and "three replicas": three `run --peers --leader-election` with the fleet split over them
## (kubectl apply -> every agent applied -> status.appliedAgents == N; the status lag after the
## last agent applied, target < 2 s; BENCH_REPLICAS=0 skips it).
## N = 1000 10000 by default (BENCH_SIZES="1000 10000 50000" for more; see tests/bench/run).
## Then realistic fleets, side by side again: collector payloads at 10k (payload), 5k agents
## polling over HTTP (http), the cost of new wss/ws connections and a reconnect storm after the
## server is killed (tls), and ours only: 1,000 AgentConfigs over 100 namespaces under 10k agents
## (controller). BENCH_PHASES picks phases (default: base kube replicas payload http tls
## controller); each phase's time is in the log. Prints the tables and writes them into
## docs/benchmarks.md; the whole target takes under 30 minutes on a fresh clone. The local control
## plane it starts is taken down at the end, as `make test` does.
bench: tools-bench tools-k8s
	nice -n 10 $(CARGO) build --release
	trap 'tests/tools/local-cluster down' EXIT; \
	BENCH_COMMAND="make bench" tests/bench/run

## fuzz: coverage-guided fuzzing (cargo-fuzz + libFuzzer, nightly toolchain) of the wire decoders,
## the session state machine, the HTTP request paths, the dispatch JSON and the CRD-to-plan
## resolution, FUZZ_SECONDS per target (default 60), after `fuzz-lint`; each target keeps its
## corpus in fuzz/corpus/<target> and its log in fuzz/target/<target>.log, a crash stops the run
## with its reproducer in fuzz/artifacts/<target>. The same checks run briefly on stable in
## `cargo test --test properties`.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= ws_frame ws_server_frames gzip_body agent_to_server session_sequence http_request dispatch_json crd_plan
## FUZZ_FLAGS: more libFuzzer flags, e.g. -detect_leaks=0 or -max_len=65536.
FUZZ_FLAGS ?=
fuzz: fuzz-lint
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && mkdir -p target && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  $(CARGO) +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(FUZZ_FLAGS) \
	    2>&1 | tee target/$$t.log | grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|==[0-9]+== ERROR|SUMMARY)' ; \
	done

## fuzz-lint: clippy on the fuzz crate (nightly; its own workspace, so `make lint` does not see it).
fuzz-lint:
	$(CARGO) +nightly clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings

## soak: a simulated fleet with churn (agents restarting and replaced, config changes,
## dispatches) against one release-built `opamp-operator run` process for SOAK_SECONDS (default
## 1800), on a control plane of its own (target/local-cluster-soak, taken down afterwards); prints
## the operator's RSS and open files every minute and fails if they grew beyond the fleet's own.
## SOAK_AGENTS (500) WebSocket and SOAK_HTTP_AGENTS (20) plain-HTTP agents (polling every second). Not part of `make test`.
SOAK_SECONDS ?= 1800
soak: tools-k8s
	export LOCAL_CLUSTER_DIR=$(CURDIR)/target/local-cluster-soak; \
	trap 'tests/tools/local-cluster down' EXIT; \
	tests/tools/local-cluster up; \
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak -- --ignored --nocapture
