#!/usr/bin/env bash
# Benchmark: `gentoo-mkimg import` of the stand-in stage (.tar.xz), against, in the same run,
#   - the floor: `xz -dc FILE > /dev/null` (decompression alone, what any importer must do),
#   - `podman import FILE` (what the old tool's `docker import` amounts to without a daemon),
# printing wall times, ratios and our peak RSS, for gzip and zstd layers.
# Targets (issue 2): within 1.3x of the floor, faster than podman import, peak RSS < 200 MB.
#
# Usage: bench/import.sh [RUNS]   (default 3; the best run of each is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
scripts/setup-host
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
fixture=$(bash tests/fixtures/stage/build-stage.sh)
stage=$fixture/stage.tar.xz
work=$(mktemp -d)
trap 'rm -rf "$work"; podman --runtime runc rmi -f gentoo-mkimg-bench:import >/dev/null 2>&1 || true' EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh

echo "stage: $stage ($(du -h "$stage" | cut -f1) xz, $(du -h "$fixture/stage.tar" | cut -f1) tar), $(nproc) cores"
floor=$(best xz -dc "$stage")
echo "floor  xz -dc > /dev/null           ${floor}s"
podman_t=$(best podman --runtime runc import "$stage" gentoo-mkimg-bench:import)
echo "podman import                       ${podman_t}s"
for comp in gzip zstd; do
  ours=$(best "$bin" -q --store "$work/store-$comp" import --compression "$comp" "$stage" localhost/bench-raw:1)
  rss=$(/usr/bin/time -f %M "$bin" -q --store "$work/store-$comp" import --compression "$comp" "$stage" localhost/bench-raw:1 2>&1 >/dev/null | tail -1)
  python3 - "$comp" "$ours" "$floor" "$podman_t" "$rss" <<'PY'
import sys
comp, ours, floor, podman, rss = sys.argv[1], *map(float, sys.argv[2:])
print(f"gentoo-mkimg import ({comp:4})          {ours:.3f}s  "
      f"{ours/floor:.2f}x floor (target <= 1.3)  {ours/podman:.2f}x podman (target < 1)  "
      f"peak RSS {rss/1024:.0f} MiB (target < 200)")
PY
done
