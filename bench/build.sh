#!/usr/bin/env bash
# Benchmark: gentoo-mkimg against the pipeline it replaces, on the fixtures (the stand-in
# stage3, tests/fixtures/stage, and the test ebuild repository packed as a snapshot), in one
# run, everything pushed to one local registry:
#   1. seed: bench/seed/mkimg.sh, the old mkimg.sh/mkimg-container.sh steps from their README,
#      with the docker CLI against Podman's Docker API service: docker import (raw), a
#      privileged docker run (emerge -e @system @world with FEATURES=buildpkg, a dev root
#      with emerge -eK, an rt root with emerge -eK1 of the rt set and INSTALL_MASK, both
#      tarred), docker import (dev, rt), docker push (raw, dev, rt). Timed end to end.
#   2. cold: `gentoo-mkimg build ... --push`, fresh work dir, no binary packages; the ratio
#      ours/seed (target <= 0.66). It pushes dev and rt only (raw is a throw-away image);
#      `push` of raw is timed on its own and added in a second ratio, for the same output.
#   3. unchanged: the same build again (target <= 5 s), and whether dev and rt have the
#      digests of 2.
#   4. bump: a snapshot in which app-misc/hello (a leaf) has a new version, under a new TAG
#      (started from the first TAG's binary packages): the packages compiled (from
#      logs/TAG/build.log; expected: 1) and the time against 2 (target <= 0.5).
#   5. peak RSS (VmHWM) of the gentoo-mkimg process itself in each of its runs, polled from
#      /proc/PID/status (target < 200 MB); the largest of its helper processes (the same
#      executable, e.g. the sandbox's init) beside it. Not emerge and not the containers.
#
# Both sides get the same rt set (tests/common/mod.rs RT_PACKAGES), the same INSTALL_MASK
# (gentoo-mkimg's default, src/config.rs) and the same parallelism (make -jN, emerge
# --jobs=N, N = CPU count). What the seed adds to the stage's make.conf is only what the
# stand-in stage needs to build at all (see bench/seed/mkimg-container.sh).
#
# Everything lives in one temp dir, removed on exit (also on failure or ^C): the registry
# (Debian's docker-registry on 127.0.0.1, its own config and storage), Podman's service (on a
# unix socket in the temp dir, with its own storage root, run root and registries.conf, no
# events file), the containers, both work dirs. The stage fixture is cached in ~/.cache.
#
# Usage: bench/build.sh [sandbox|docker]   (gentoo-mkimg's engine; default sandbox; docker
#        uses the same Podman service as the seed)
# Needs: root, podman, runc, the docker CLI, docker-registry, python3 (scripts/setup-host).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-sandbox}
case $engine in sandbox | docker) ;; *) echo "usage: $0 [sandbox|docker]" >&2; exit 2 ;; esac
for cmd in podman runc docker docker-registry python3 tar xz; do
  command -v "$cmd" >/dev/null || { echo "bench/build.sh: $cmd is missing (scripts/setup-host)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/build.sh: run as root (the seed runs privileged containers)" >&2; exit 1; }

now() { date +%s.%N; }
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
seed=$PWD/bench/seed
stage=$(bash tests/fixtures/stage/build-stage.sh)/stage.tar.xz
rt=$(sed -n '/pub const RT_PACKAGES/,/];/p' tests/common/mod.rs | grep -o '"[^"]*"' | tr -d '"' | tr '\n' ' ')
mask=$(sed -n '/pub const DEFAULT_INSTALL_MASK/,/];/p' src/config.rs | grep -o '"[^"]*"' | tr -d '"' | tr '\n' ' ')
jobs=$(nproc)
if [ -z "$rt" ] || [ -z "$mask" ]; then
  echo "bench/build.sh: cannot read RT_PACKAGES or DEFAULT_INSTALL_MASK" >&2
  exit 1
fi

work=$(mktemp -d /tmp/bench-build.XXXXXX)
reg_pid='' svc_pid='' job_pid=''
export DOCKER_HOST=unix://$work/podman.sock DOCKER_CONFIG=$work/docker-config
export CONTAINERS_REGISTRIES_CONF=$work/registries.conf
podman_here() {
  podman --root "$work/podman/root" --runroot "$work/podman/run" --events-backend none "$@"
}
cleanup() {
  local rc=$?
  set +e
  trap - INT TERM
  if [ -n "$job_pid" ]; then
    kill "$job_pid" 2>/dev/null
    wait "$job_pid" 2>/dev/null
  fi
  if [ -n "$svc_pid" ]; then
    docker rm -f seed-mkimg >/dev/null 2>&1
    kill "$svc_pid" 2>/dev/null
    wait "$svc_pid" 2>/dev/null
  fi
  if [ -d "$work/podman/root" ]; then
    podman_here rm -af -t 0 >/dev/null 2>&1
    podman_here rmi -af >/dev/null 2>&1
  fi
  if [ -n "$reg_pid" ]; then
    kill "$reg_pid" 2>/dev/null
    wait "$reg_pid" 2>/dev/null
  fi
  # Whatever is still mounted under the temp dir (Podman's storage, a killed sandbox).
  findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- inputs ------------------------------------------------------------------------------
# t1: the test repository; t2: the same with app-misc/hello-1.1 (a copy of 1.0: hello is a
# leaf, nothing depends on it).
mkdir -p "$work/snap1" "$work/snap2"
cp -a tests/fixtures/repo "$work/snap1/gentoo-20260101"
tar -cJf "$work/gentoo-20260101.tar.xz" -C "$work/snap1" gentoo-20260101
cp -a tests/fixtures/repo "$work/snap2/gentoo-20260102"
cp "$work/snap2/gentoo-20260102/app-misc/hello/hello-1.0.ebuild" \
  "$work/snap2/gentoo-20260102/app-misc/hello/hello-1.1.ebuild"
tar -cJf "$work/gentoo-20260102.tar.xz" -C "$work/snap2" gentoo-20260102
rm -rf "$work/snap1" "$work/snap2"

# --- the registry --------------------------------------------------------------------------
start_registry() {
  local port
  mkdir -p "$work/registry/storage"
  for _ in 1 2 3 4 5; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: bench-build
EOF
    : >"$work/registry/registry.log"
    docker-registry serve "$work/registry/config.yml" >>"$work/registry/registry.log" 2>&1 &
    reg_pid=$!
    for _ in $(seq 300); do
      kill -0 "$reg_pid" 2>/dev/null || break
      if grep -q "listening on 127.0.0.1:$port" "$work/registry/registry.log" &&
        curl -fs -o /dev/null "http://127.0.0.1:$port/v2/"; then
        host=127.0.0.1:$port
        return 0
      fi
      sleep 0.05
    done
    kill "$reg_pid" 2>/dev/null; wait "$reg_pid" 2>/dev/null || true; reg_pid=
  done
  echo "bench/build.sh: the registry did not start:" >&2
  cat "$work/registry/registry.log" >&2
  exit 1
}
start_registry

# --- Podman's Docker API service, private: its socket, storage and registries.conf ----------
# (the tool's --insecure-registry is the seed's "insecure-registries" of the daemon)
printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$host" >"$CONTAINERS_REGISTRIES_CONF"
mkdir -p "$work/podman" "$DOCKER_CONFIG"
# podman itself in the background (not the function: $! would be a subshell's pid).
podman --root "$work/podman/root" --runroot "$work/podman/run" --events-backend none \
  --runtime runc system service --time=0 "$DOCKER_HOST" >"$work/podman/service.log" 2>&1 &
svc_pid=$!
for i in $(seq 150); do
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && break
  if [ "$i" = 150 ] || ! kill -0 "$svc_pid" 2>/dev/null; then
    echo "bench/build.sh: podman system service did not answer:" >&2
    cat "$work/podman/service.log" >&2
    exit 1
  fi
  sleep 0.2
done

echo "== fixtures: $(basename "$stage") ($(($(stat -c %s "$stage") / 1048576)) MiB), test repository; $jobs cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   registry $host, podman $(podman --version | cut -d' ' -f3) service at $DOCKER_HOST, gentoo-mkimg engine $engine"

# --- 1. seed ---------------------------------------------------------------------------------
echo "== 1. seed pipeline (docker import / run --privileged / import / push)"
mkdir -p "$work/seed"
t0=$(now)
if ! (cd "$work/seed" && SEED_CONTAINER=seed-mkimg RT_PACKAGES="$rt" INSTALL_MASK="$mask" JOBS=$jobs \
  bash "$seed/mkimg.sh" "$stage" "$work/gentoo-20260101.tar.xz" "$host/seed" gentoo t1) \
  >"$work/seed.log" 2>&1; then
  echo "seed pipeline failed; its last lines:" >&2
  tail -40 "$work/seed.log" >&2
  exit 1
fi
t1=$(now)
seed_time=$(python3 -c "print(f'{$t1-$t0:.1f}')")
seed_compiled=$(grep -cE '^>>> Emerging \(' "$work/seed.log" || true)
echo "   total ${seed_time}s, $seed_compiled packages compiled"
for kind in raw dev rt; do
  printf '   pushed %s %s\n' "$host/seed/gentoo-$kind:t1" \
    "$(curl -fsI -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
      -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "http://$host/v2/seed/gentoo-$kind/manifests/t1" | tr -d '\r' |
      sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true)"
done
docker rmi -f "$host/seed/gentoo-raw:t1" "$host/seed/gentoo-dev:t1" "$host/seed/gentoo-rt:t1" >/dev/null 2>&1 || true
rm -rf "$work/seed"

# --- gentoo-mkimg runs -------------------------------------------------------------------
ours=$work/ours
mkdir -p "$ours"
# One run of the tool: its output in $work/LABEL.out/.err, its wall time in $secs, the peak
# RSS (VmHWM, kB) of its own process in $rss and of its largest helper in $helper_rss.
mkimg() {
  local label=$1 rc=0 t0 t1 peak
  shift
  t0=$(now)
  "$bin" --store "$ours/images" --work-dir "$ours" --cache-dir "$ours/cache" "$@" \
    >"$work/$label.out" 2>"$work/$label.err" &
  job_pid=$!
  peak=$(python3 - "$job_pid" "$bin" <<'PY'
import os, sys, time
main, exe = int(sys.argv[1]), os.path.realpath(sys.argv[2])
def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
top = helper = 0
while True:
    v = hwm(main)
    if v is None:          # gone, or a zombie (no memory left to report)
        break
    top = max(top, v)
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != main:
            try:
                if os.readlink(f"/proc/{p}/exe") == exe:
                    helper = max(helper, hwm(p) or 0)
            except OSError:
                pass
    time.sleep(0.1)
print(top, helper)
PY
  )
  wait "$job_pid" || rc=$?
  job_pid=
  t1=$(now)
  secs=$(python3 -c "print(f'{$t1-$t0:.1f}')")
  rss=${peak% *} helper_rss=${peak#* }
  if [ "$rc" != 0 ]; then
    echo "gentoo-mkimg $label failed ($rc):" >&2
    tail -40 "$work/$label.out" "$work/$label.err" >&2
    exit 1
  fi
}
mb() { python3 -c "print(f'{$1/1024:.1f}')"; }
# The manifest digest of REPO/gentoo-KIND:TAG in the registry.
pushed_digest() {
  curl -fsI -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$host/v2/ours/gentoo-$1/manifests/$2" | tr -d '\r' |
    sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true
}
# Packages compiled in a build: the ">>> Emerging (N of M) CAT/PF" lines of its log
# (binary packages are ">>> Emerging binary (...)").
compiled() {
  { grep -E '^>>> Emerging \(' "$ours/logs/$1/build.log" || true; } |
    sed -E 's/^>>> Emerging \([0-9]+ of [0-9]+\) //' | sort -u
}
build() { # LABEL SNAPSHOT TAG
  mkimg "$1" build "$stage" "$2" "$host/ours" gentoo "$3" --engine "$engine" \
    --rt-packages "$rt" --push --insecure-registry "$host"
}

echo "== 2. gentoo-mkimg build --push, cold (fresh work dir, no binary packages)"
build cold "$work/gentoo-20260101.tar.xz" t1
cold_time=$secs cold_rss=$rss cold_helper=$helper_rss
cold_dev=$(pushed_digest dev t1) cold_rt=$(pushed_digest rt t1)
cold_compiled=$(compiled t1 | wc -l)
echo "   total ${cold_time}s, $cold_compiled packages compiled, peak RSS $(mb "$cold_rss") MB (helper $(mb "$cold_helper") MB)"
echo "   pushed dev $cold_dev"
echo "   pushed rt  $cold_rt"
sed 's/^/   | /' "$work/cold.out"
mkimg rawpush push --insecure-registry "$host" "$host/ours/gentoo-raw:t1"
raw_time=$secs
echo "   + gentoo-mkimg push of raw (the seed pushes it too): ${raw_time}s, peak RSS $(mb "$rss") MB"

echo "== 3. gentoo-mkimg build --push, unchanged inputs"
build unchanged "$work/gentoo-20260101.tar.xz" t1
same_time=$secs same_rss=$rss
same_dev=$(pushed_digest dev t1) same_rt=$(pushed_digest rt t1)
same=no
[ "$same_dev" = "$cold_dev" ] && [ "$same_rt" = "$cold_rt" ] && [ -n "$cold_dev" ] && same=yes
echo "   total ${same_time}s, peak RSS $(mb "$same_rss") MB, dev/rt digests identical to 2: $same"
[ "$same" = yes ] || echo "   dev $same_dev, rt $same_rt"
sed -n '1,3p' "$work/unchanged.err" | sed 's/^/   | /'

echo "== 4. gentoo-mkimg build --push, new snapshot with app-misc/hello-1.1, new TAG t2"
build bump "$work/gentoo-20260102.tar.xz" t2
bump_time=$secs bump_rss=$rss
bump_list=$(compiled t2)
bump_compiled=$(printf '%s' "$bump_list" | grep -c . || true)
bump_plan=$(grep -cE '^\[ebuild' "$ours/logs/t2/build.log" || true)
echo "   total ${bump_time}s, peak RSS $(mb "$bump_rss") MB, compiled $bump_compiled: $(echo "$bump_list" | tr '\n' ' ')"
echo "   ([ebuild lines in the log's plans: $bump_plan)"
sed 's/^/   | /' "$work/bump.out"

echo "== summary (machine shared with other sessions: load $(cut -d' ' -f1-3 /proc/loadavg) now)"
python3 - "$seed_time" "$cold_time" "$raw_time" "$same_time" "$same" "$bump_time" "$bump_compiled" \
  "$cold_rss" "$same_rss" "$bump_rss" "$cold_helper" <<'PY'
import sys
a = sys.argv[1:]
seed, cold, raw, same = map(float, a[0:4])
same_ok, bump, bump_n = a[4], float(a[5]), int(a[6])
rss = [int(x) / 1024 for x in a[7:10]]
helper = int(a[10]) / 1024
def ok(c): return "ok" if c else "MISSED"
rows = [
    ("seed pipeline (raw+dev+rt pushed)", f"{seed:.1f} s", "", ""),
    ("gentoo-mkimg build --push, cold", f"{cold:.1f} s", f"ours/seed {cold/seed:.2f}", f"<= 0.66 {ok(cold/seed <= 0.66)}"),
    ("  + push of raw", f"{cold+raw:.1f} s", f"ours/seed {(cold+raw)/seed:.2f}", "(same output as the seed)"),
    ("unchanged rebuild", f"{same:.1f} s", f"digests same: {same_ok}", f"<= 5 s {ok(same <= 5 and same_ok == 'yes')}"),
    ("bumped hello, new TAG", f"{bump:.1f} s", f"bump/cold {bump/cold:.2f}", f"<= 0.5 {ok(bump/cold <= 0.5)}"),
    ("  packages compiled", f"{bump_n}", "", f"== 1 {ok(bump_n == 1)}"),
    ("peak RSS cold/unchanged/bump", " / ".join(f"{r:.1f}" for r in rss) + " MB", f"helper {helper:.1f} MB", f"< 200 MB {ok(max(rss) < 200)}"),
]
w = [max(len(r[i]) for r in rows) for i in range(4)]
for r in rows:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
PY
