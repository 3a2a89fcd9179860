#!/usr/bin/env bash
# The old tool's pipeline, rewritten from its README for the benchmark (bench/build.sh): the
# reference that gentoo-mkimg replaces, driven with the docker CLI against whatever DOCKER_HOST
# names (bench/build.sh: Podman's Docker API service on a private socket).
#
#   bash bench/seed/mkimg.sh STAGE3 SNAPSHOT DOCKER_REPO DOCKER_BASENAME DOCKER_TAG
#
# In the current directory: packages/TAG (binary packages), portage/TAG (the snapshot,
# extracted), and the two root tarballs BASENAME-{dev,rt}-TAG.tar. Steps, as in the README:
#   1. docker import STAGE3 -> REPO/BASENAME-raw:TAG
#   2. docker run --privileged of raw with packages/TAG and portage/TAG mounted, running
#      mkimg-container.sh: emerge -e @system @world with FEATURES=buildpkg, then a dev root
#      (ROOT=..., emerge -eK @system @world) and an rt root (emerge -eK1 RT_PACKAGES with
#      INSTALL_MASK), each packed as a tar
#   3. docker import of both tars -> REPO/BASENAME-dev:TAG, REPO/BASENAME-rt:TAG
#   4. docker push of raw, dev and rt
# Environment: RT_PACKAGES (the rt set, required), INSTALL_MASK (required), JOBS (default: CPU
# count); SEED_CONTAINER (the container's name, so that a caller can remove it).
set -euo pipefail
[ $# -eq 5 ] || { echo "usage: $0 STAGE3 SNAPSHOT DOCKER_REPO DOCKER_BASENAME DOCKER_TAG" >&2; exit 2; }
stage=$(realpath "$1") snapshot=$(realpath "$2") repo=$3 base=$4 tag=$5
: "${RT_PACKAGES:?}" "${INSTALL_MASK:?}"
jobs=${JOBS:-$(nproc)}
here=$(cd "$(dirname "$0")" && pwd)
name=${SEED_CONTAINER:-$base-mkimg-$tag}

mkdir -p "packages/$tag" "portage/$tag"
# The snapshot: one top-level directory (gentoo-YYYYMMDD/ or portage/).
tar -xf "$snapshot" -C "portage/$tag" --strip-components=1

raw=$repo/$base-raw:$tag
docker import "$stage" "$raw" >/dev/null

# Detached, then `docker wait` for the exit status and `docker logs` for the output: through
# Podman's Docker API (4.3) an attached `docker run` can miss the container's exit and hang,
# and with --rm it reported success for a failed container.
docker run -d --privileged --network none --name "$name" \
  -v "$PWD/packages/$tag:/var/cache/binpkgs" \
  -v "$PWD/portage/$tag:/var/db/repos/gentoo:ro" \
  -v "$here/mkimg-container.sh:/mkimg-container.sh:ro" \
  -v "$PWD:/out" \
  -e JOBS="$jobs" -e RT_PACKAGES="$RT_PACKAGES" -e RT_INSTALL_MASK="$INSTALL_MASK" \
  "$raw" /bin/sh /mkimg-container.sh "$base" "$tag" /out >/dev/null
status=$(docker wait "$name")
docker logs "$name" 2>&1
docker rm "$name" >/dev/null
if [ "$status" != 0 ]; then
  echo "mkimg-container.sh failed (exit code $status)" >&2
  exit 1
fi

for kind in dev rt; do
  docker import "$base-$kind-$tag.tar" "$repo/$base-$kind:$tag" >/dev/null
done
for kind in raw dev rt; do
  docker push -q "$repo/$base-$kind:$tag" >/dev/null
done
