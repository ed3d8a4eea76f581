#!/usr/bin/env bash
# Builds the pod sandbox image of `tests/tools/local-cluster up --node` (its containerd reaches no
# registry, so it cannot pull registry.k8s.io/pause): tests/tools/pause/ statically linked, packed
# with buildah into an image FROM scratch (entrypoint /pause, user 65535:65535), saved as a
# docker-archive that local-cluster imports into the node's containerd.
#
# Output: $OPAMP_TOOLS_CACHE/pause-image-<hash of tests/tools/pause>/bin/opamp-pause and
# .../image/pause.tar; the binary is linked into target/tools/bin/, the archive into
# target/tools/images/pause.tar, its image name into target/tools/images/pause.name.
# Needs buildah (installed with apt-get when missing); its storage is a private vfs store in the
# build directory, removed afterwards.
source "$(dirname "$0")/cache.sh"

KEY=$(source_key tests/tools/pause tests/tools/build-pause-image.sh)
IMAGE="localhost/opamp-pause:$KEY"

if ! command -v buildah >/dev/null; then
  log "installing buildah"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
fi

build_pause_image() {
  local out=$1
  (cd "$REPO_ROOT/tests/tools/pause" &&
    go build -buildvcs=false -trimpath -ldflags "-s -w" -o "$out/bin/opamp-pause" .)
  local store="$out/buildah"
  local bah=(buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
  local ctr
  ctr=$("${bah[@]}" from --quiet scratch)
  "${bah[@]}" copy --quiet "$ctr" "$out/bin/opamp-pause" /pause >/dev/null
  "${bah[@]}" config --entrypoint '["/pause"]' --cmd '' --user 65535:65535 \
    --label org.opencontainers.image.title=opamp-pause "$ctr"
  "${bah[@]}" commit --quiet "$ctr" "$IMAGE" >/dev/null
  mkdir -p "$out/image"
  "${bah[@]}" push --quiet "$IMAGE" "docker-archive:$out/image/pause.tar:$IMAGE"
  echo "$IMAGE" >"$out/image/pause.name"
  "${bah[@]}" rm "$ctr" >/dev/null
  # vfs layers are plain directories; some are read-only for the owner.
  chmod -R u+w "$store" 2>/dev/null || true
  rm -rf "$store"
}

cached_build pause-image "$KEY" build_pause_image
mkdir -p "$REPO_ROOT/target/tools/images"
ln -sfn "$OPAMP_TOOLS_CACHE/pause-image-$KEY/image/pause.tar" "$REPO_ROOT/target/tools/images/pause.tar"
ln -sfn "$OPAMP_TOOLS_CACHE/pause-image-$KEY/image/pause.name" "$REPO_ROOT/target/tools/images/pause.name"
