#!/usr/bin/env bash
# Benchmark: the push of an updated dev image, package layers against a single layer, in one
# run on the fixtures (the stand-in stage3 and the test repository packed as snapshots).
#
#   1. builds, with the sandbox, in one work dir (packages/TAG is shared by both kinds):
#      - localhost/pk-*:t1 --layers packages from the test repository (cold: compiles all);
#      - localhost/pk-*:t2 --layers packages from a snapshot in which app-misc/hello (a
#        leaf) has a new version (compiles hello);
#      - localhost/sg-*:t1 and :t2 the same with --layers single (compile nothing: the
#        binary packages of t1 and t2 are there).
#   2. for each kind, into an empty local registry (Debian's docker-registry on 127.0.0.1):
#      push dev:t1, then time the push of dev:t2, the update; its bytes sent come from the
#      push report.
#   3. prints both, their ratio, the share of the image each update sent, and which layers
#      of the package image changed.
# Target (issue 13): the update with package layers sends at most 15% of the image.
#
# Usage: bench/layers.sh
# Needs: root (the sandbox), docker-registry, python3 (scripts/setup-host).
set -euo pipefail
cd "$(dirname "$0")/.."
for cmd in docker-registry python3 tar xz curl; do
  command -v "$cmd" >/dev/null || { echo "bench/layers.sh: $cmd is missing (scripts/setup-host)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/layers.sh: run as root (the sandbox engine)" >&2; exit 1; }
# shellcheck source=bench/lib.sh
. bench/lib.sh
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
stage=$(bash tests/fixtures/stage/build-stage.sh)/stage.tar.xz
rt=$(sed -n '/pub const RT_PACKAGES/,/];/p' tests/common/mod.rs | grep -o '"[^"]*"' | tr -d '"' | tr '\n' ' ')
[ -n "$rt" ] || { echo "bench/layers.sh: cannot read RT_PACKAGES" >&2; exit 1; }

work=$(mktemp -d /tmp/bench-layers.XXXXXX)
reg_pid=
stop_registry() {
  if [ -n "$reg_pid" ]; then
    kill "$reg_pid" 2>/dev/null || true
    wait "$reg_pid" 2>/dev/null || true
    reg_pid=
  fi
}
cleanup() {
  local rc=$?
  set +e
  stop_registry
  findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- inputs: the test repository, and the same with app-misc/hello-1.1 -------------------
mkdir -p "$work/snap1" "$work/snap2"
cp -a tests/fixtures/repo "$work/snap1/gentoo-20260101"
tar -cJf "$work/gentoo-20260101.tar.xz" -C "$work/snap1" gentoo-20260101
cp -a tests/fixtures/repo "$work/snap2/gentoo-20260102"
cp "$work/snap2/gentoo-20260102/app-misc/hello/hello-1.0.ebuild" \
  "$work/snap2/gentoo-20260102/app-misc/hello/hello-1.1.ebuild"
tar -cJf "$work/gentoo-20260102.tar.xz" -C "$work/snap2" gentoo-20260102
rm -rf "$work/snap1" "$work/snap2"

mk() { "$bin" --store "$work/store" --work-dir "$work/w" --cache-dir "$work/cache" "$@"; }
build() { # NAME TAG SNAPSHOT LAYERS
  local t0 t1
  t0=$(now)
  if ! mk build "$stage" "$3" localhost "$1" "$2" --no-verify --rt-packages "$rt" \
    --layers "$4" >"$work/build-$1-$2.out" 2>&1; then
    echo "build of $1 $2 failed; its last lines:" >&2
    tail -30 "$work/build-$1-$2.out" >&2
    exit 1
  fi
  t1=$(now)
  printf '   %-24s %7.1f s\n' "$1 $2 (--layers $4)" "$(python3 -c "print($t1-$t0)")"
}
mkdir -p "$work/w"
echo "== fixtures: $(basename "$stage"), test repository; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== 1. builds"
build pk t1 "$work/gentoo-20260101.tar.xz" packages
build pk t2 "$work/gentoo-20260102.tar.xz" packages
build sg t1 "$work/gentoo-20260101.tar.xz" single
build sg t2 "$work/gentoo-20260102.tar.xz" single

# --- the registry: empty for each kind ----------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
host=127.0.0.1:$port
start_registry() {
  stop_registry
  rm -rf "$work/registry"
  mkdir -p "$work/registry/storage"
  cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry/storage
http:
  addr: $host
EOF
  docker-registry serve "$work/registry/config.yml" >>"$work/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 200); do
    if curl -fs -o /dev/null "http://$host/v2/"; then return 0; fi
    sleep 0.05
  done
  echo "bench/layers.sh: the registry did not start:" >&2
  cat "$work/registry.log" >&2
  exit 1
}

# Size of an image in the store: config and layers.
image_bytes() {
  python3 - "$work/store" "$1" <<'PY'
import json, sys
store, ref = sys.argv[1], sys.argv[2]
index = json.load(open(store + "/index.json"))
d = next(m["digest"] for m in index["manifests"]
         if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref)
m = json.load(open(store + "/blobs/sha256/" + d.split(":")[1]))
print(m["config"]["size"] + sum(l["size"] for l in m["layers"]), len(m["layers"]))
PY
}

echo "== 2. pushes: dev:t1, then the update dev:t2"
declare -A upd_time upd_bytes img_bytes img_layers
for kind in pk sg; do
  start_registry
  for tag in t1 t2; do
    mk -q tag "localhost/$kind-dev:$tag" "$host/bench/$kind-dev:$tag"
  done
  mk -q push "$host/bench/$kind-dev:t1" >/dev/null 2>&1
  t0=$(now)
  mk push "$host/bench/$kind-dev:t2" >"$work/push-$kind.out" 2>&1
  t1=$(now)
  upd_time[$kind]=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  upd_bytes[$kind]=$(sed -n 's/.*, \([0-9]*\) bytes sent.*/\1/p' "$work/push-$kind.out" | tail -1)
  read -r b l < <(image_bytes "localhost/$kind-dev:t2")
  img_bytes[$kind]=$b img_layers[$kind]=$l
  echo "   $kind: $(grep 'bytes sent' "$work/push-$kind.out")"
done
stop_registry

echo "== 3. layers of pk-dev that changed from t1 to t2"
python3 - "$work/store" <<'PY'
import json, sys
store = sys.argv[1]
def image(ref):
    index = json.load(open(store + "/index.json"))
    d = next(m["digest"] for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref)
    m = json.load(open(store + "/blobs/sha256/" + d.split(":")[1]))
    c = json.load(open(store + "/blobs/sha256/" + m["config"]["digest"].split(":")[1]))
    return [(l["digest"], l["size"], h["created_by"]) for l, h in zip(m["layers"], c["history"])]
old = {d for d, _, _ in image("localhost/pk-dev:t1")}
for d, size, what in image("localhost/pk-dev:t2"):
    if d not in old:
        print(f"   {size:>10} bytes  {what[:110]}")
PY

echo "== summary"
python3 - "${upd_time[pk]}" "${upd_bytes[pk]}" "${img_bytes[pk]}" "${img_layers[pk]}" \
  "${upd_time[sg]}" "${upd_bytes[sg]}" "${img_bytes[sg]}" <<'PY'
import sys
pt, pb, pi, pl, st, sb, si = sys.argv[1:]
pt, pb, pi, pl, st, sb, si = float(pt), int(pb), int(pi), int(pl), float(st), int(sb), int(si)
mib = lambda b: b / 1048576
share = pb / pi
print(f"push of the updated dev image   time      bytes sent        of the image")
print(f"package layers ({pl} layers)    {pt:6.2f} s  {mib(pb):8.2f} MiB      {share:6.1%}  (target <= 15%: {'ok' if share <= 0.15 else 'MISSED'})")
print(f"single layer                    {st:6.2f} s  {mib(sb):8.2f} MiB      {sb / si:6.1%}")
print(f"packages / single               {pt / st:6.2f}    {pb / sb:8.2f}")
PY
