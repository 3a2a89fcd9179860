#!/usr/bin/env bash
# Benchmark: `gentoo-mkimg verify` of a stage3 with its companions (.asc, clearsigned
# .DIGESTS with BLAKE2B + SHA512, clearsigned .sha256), against, in the same run, the same
# checks done the usual way with GnuPG and coreutils:
#   gpg --verify .asc, gpg --verify .DIGESTS, b2sum, sha512sum, gpg --verify .sha256, sha256sum
# printing wall times, the ratio and our peak RSS. The stage is the stand-in fixture
# (about 50 MB) repeated to STAGE_MB (default 512) so that hashing dominates.
#
# Usage: bench/verify.sh [RUNS] (default 3; the best run of each is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
mb=${STAGE_MB:-512}
scripts/setup-host
cargo build --release --quiet
bin=$PWD/target/release/gentoo-mkimg
fixture=$(bash tests/fixtures/stage/build-stage.sh)
work=$(mktemp -d)
export GNUPGHOME=$work/gnupg
trap 'gpgconf --kill gpg-agent >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -m 700 "$GNUPGHOME"

name=stage3-amd64-musl-openrc-20260101T000000Z.tar.xz
stage=$work/$name
while [ "$(stat -c %s "$stage" 2>/dev/null || echo 0)" -lt $((mb << 20)) ]; do
  cat "$fixture/stage.tar.xz" >>"$stage"
done
gpg() { command gpg --batch --yes --pinentry-mode loopback --passphrase '' "$@"; }
gpg --quick-gen-key 'Bench <bench@test.invalid>' ed25519 sign never 2>/dev/null
fpr=$(gpg --with-colons --list-keys bench@test.invalid | awk -F: '/^fpr/{print $10; exit}')
gpg --armor --export "$fpr" >"$work/keys.asc"
gpg -u "$fpr" --armor --detach-sign -o "$stage.asc" "$stage" 2>/dev/null
printf '# BLAKE2B HASH\n%s  %s\n# SHA512 HASH\n%s  %s\n' \
  "$(b2sum "$stage" | cut -d' ' -f1)" "$name" "$(sha512sum "$stage" | cut -d' ' -f1)" "$name" >"$work/d"
gpg -u "$fpr" --clearsign -o "$stage.DIGESTS" "$work/d" 2>/dev/null
printf '# SHA256 HASH\n%s  %s\n' "$(sha256sum "$stage" | cut -d' ' -f1)" "$name" >"$work/s"
gpg -u "$fpr" --clearsign -o "$stage.sha256" "$work/s" 2>/dev/null

# shellcheck source=bench/lib.sh
. bench/lib.sh
usual() {
  gpg --verify "$stage.asc" "$stage" && gpg --verify "$stage.DIGESTS" &&
    b2sum "$stage" && sha512sum "$stage" && gpg --verify "$stage.sha256" && sha256sum "$stage"
}

# Warm the page cache so both sides read from memory.
cat "$stage" >/dev/null
echo "stage: $(du -h "$stage" | cut -f1), $(nproc) cores"
ref=$(best usual)
echo "gpg + b2sum + sha512sum + sha256sum     ${ref}s"
ours=$(best "$bin" -q verify "$stage" --keyring "$work/keys.asc" --trusted-key "$fpr")
rss=$(/usr/bin/time -f %M "$bin" -q verify "$stage" --keyring "$work/keys.asc" --trusted-key "$fpr" 2>&1 >/dev/null | tail -1)
"$bin" -q verify "$stage" --keyring "$work/keys.asc" --trusted-key "$fpr" | grep -q '  verified'
python3 - "$ours" "$ref" "$rss" <<'PY'
import sys
ours, ref, rss = map(float, sys.argv[1:])
print(f"gentoo-mkimg verify                     {ours:.3f}s  {ours/ref:.2f}x the usual tools  "
      f"peak RSS {rss/1024:.0f} MiB")
PY
