#!/usr/bin/env bash
# Benchmark: the phase timings of a full `gentoo-mkimg build` on the fixtures (stand-in stage3
# and the test ebuild repository as a snapshot tarball), then of a rebuild with unchanged
# inputs (which reuses every binary package), with the rebuild/build ratio of the totals.
#
# Usage: bench/build.sh [sandbox|docker]   (default sandbox; docker needs DOCKER_HOST or a
#        default socket, e.g. `podman --runtime runc system service --time=0 unix:///run/podman/podman.sock`)
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-sandbox}
scripts/setup-host
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
stage=$(bash tests/fixtures/stage/build-stage.sh)/stage.tar.xz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/snap"
cp -a tests/fixtures/repo "$work/snap/gentoo-20260101"
tar -cJf "$work/gentoo-20260101.tar.xz" -C "$work/snap" gentoo-20260101
rt=$(sed -n '/pub const RT_PACKAGES/,/];/p' tests/common/mod.rs | grep -o '"[^"]*"' | tr -d '"' | tr '\n' ' ')

run() {
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" --store "$work/images" --work-dir "$work" --cache-dir "$work/cache" build \
    "$stage" "$work/gentoo-20260101.tar.xz" localhost bench t1 --engine "$engine" \
    --rt-packages "$rt" 2>/dev/null | grep -v '^>>> '
  t1=$(date +%s.%N)
  python3 -c "print(f'total {$t1-$t0:.1f}s')"
}
echo "== build ($engine, $(nproc) cores)"
first=$(run); echo "$first"
echo "== rebuild, unchanged inputs"
second=$(run); echo "$second"
python3 - "$first" "$second" <<'PY'
import sys
tot = [float(t.strip().splitlines()[-1].split()[1].rstrip('s')) for t in sys.argv[1:]]
print(f"rebuild/build: {tot[1]/tot[0]:.2f}")
PY
