#!/usr/bin/env bash
# Benchmark: `gentoo-mkimg push` of an imported stage to a local registry (Debian's
# docker-registry, plain HTTP on 127.0.0.1, started here), against, in the same run,
# `skopeo copy oci:STORE:REF docker://...` of the same image. Each push goes into an empty
# registry (storage wiped before every run), so neither side can skip or mount a blob.
# Prints the best wall time of each, the ratio and the throughput.
# Target (issue 5): not slower than skopeo (ratio <= 1).
#
# The image is the stand-in stage fixture (tests/fixtures/stage/build-stage.sh); when it
# cannot be built, a tarball of parts of /usr (bin, sbin, lib/python3) stands in.
#
# Usage: bench/push.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
for cmd in docker-registry skopeo python3; do
  command -v "$cmd" >/dev/null || { echo "bench/push.sh: $cmd is missing (scripts/setup-host)" >&2; exit 1; }
done
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
work=$(mktemp -d)
reg_pid=
stop_registry() {
  if [ -n "$reg_pid" ]; then
    kill "$reg_pid" 2>/dev/null || true
    wait "$reg_pid" 2>/dev/null || true
    reg_pid=
  fi
}
trap 'stop_registry; rm -rf "$work"' EXIT

if fixture=$(bash tests/fixtures/stage/build-stage.sh 2>"$work/fixture.log"); then
  stage=$fixture/stage.tar.xz
else
  echo "(the stage fixture could not be built: $(tail -1 "$work/fixture.log"); using parts of /usr)"
  tar -C / -cf "$work/usr.tar" usr/bin usr/sbin usr/lib/python3 2>/dev/null || true
  stage=$work/usr.tar
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
host=127.0.0.1:$port
start_registry() {
  stop_registry
  rm -rf "$work/storage"
  mkdir -p "$work/storage"
  cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/storage
http:
  addr: $host
EOF
  docker-registry serve "$work/registry.yml" >>"$work/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "the registry did not start:" >&2
  cat "$work/registry.log" >&2
  exit 1
}

ref=$host/bench/gentoo-raw:1
"$bin" -q --store "$work/store" import "$stage" "$ref"
store_digest=$(python3 - "$work/store" "$ref" <<'PY'
import json, sys
index = json.load(open(sys.argv[1] + "/index.json"))
print(next(m["digest"] for m in index["manifests"]
           if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == sys.argv[2]))
PY
)
bytes=$(python3 - "$work/store" "$store_digest" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/blobs/sha256/" + sys.argv[2].split(":")[1]))
print(m["config"]["size"] + sum(l["size"] for l in m["layers"]))
PY
)
echo "image: $(basename "$stage") imported, $((bytes / 1048576)) MiB of blobs, $(nproc) cores, $runs runs"

# shellcheck source=bench/lib.sh
. bench/lib.sh
ours_best=
skopeo_best=
for i in $(seq "$runs"); do
  start_registry
  t0=$(now)
  pushed=$("$bin" -q --store "$work/store" push "$ref")
  t1=$(now)
  if [ "$pushed" != "$ref $store_digest" ]; then
    echo "gentoo-mkimg push printed '$pushed', expected '$ref $store_digest'" >&2
    exit 1
  fi
  ours_best=$(python3 -c "t=$t1-$t0; b='$ours_best'; print(min(t, float(b)) if b else t)")

  start_registry
  t0=$(now)
  skopeo copy --quiet --dest-tls-verify=false "oci:$work/store:$ref" "docker://$host/bench/skopeo-$i:1" >/dev/null
  t1=$(now)
  skopeo_best=$(python3 -c "t=$t1-$t0; b='$skopeo_best'; print(min(t, float(b)) if b else t)")
done
stop_registry

python3 - "$ours_best" "$skopeo_best" "$bytes" <<'PY'
import sys
ours, skopeo, size = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
mib = size / 1048576
print(f"gentoo-mkimg push          {ours:.3f}s  {mib / ours:7.1f} MiB/s")
print(f"skopeo copy oci: docker:   {skopeo:.3f}s  {mib / skopeo:7.1f} MiB/s")
print(f"ratio ours/skopeo          {ours / skopeo:.2f}  (target <= 1)")
PY
