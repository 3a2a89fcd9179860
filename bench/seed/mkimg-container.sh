#!/bin/sh
# The container half of the old tool's pipeline (see mkimg.sh), run in the raw image as root:
#   mkimg-container.sh BASENAME TAG OUTDIR
# with the binary packages at /var/cache/binpkgs (Portage's PKGDIR) and the snapshot at
# /var/db/repos/gentoo, and in the environment JOBS, RT_PACKAGES and RT_INSTALL_MASK (the rt
# root's INSTALL_MASK only: the system build needs its headers). Rebuilds the whole system into binary packages, fills the dev and rt
# staging roots from them and packs each as OUTDIR/BASENAME-{dev,rt}-TAG.tar.
set -eu
base=$1 tag=$2 out=$3

# What the stage needs to build at all, the same as gentoo-mkimg's driver gives it: binary
# packages of everything (FEATURES=buildpkg), our own unsigned packages accepted, and the same
# parallelism (JOBS).
cat >> /etc/portage/make.conf <<CONF
FEATURES="\${FEATURES} buildpkg -binpkg-request-signature"
MAKEOPTS="-j$JOBS -l$JOBS"
EMERGE_DEFAULT_OPTS="--jobs=$JOBS --load-average=$JOBS"
CONF

# The merge order gentoo-mkimg's driver fixes (Portage iterates Python sets), so that both
# build the same packages in the same order.
PYTHONHASHSEED=0
export PYTHONHASHSEED
emerge -e --color=n --nospinner @system @world

dev=/$base-dev-$tag
rt=/$base-rt-$tag
mkdir -p "$dev/var/lib/portage" "$rt"
cp /var/lib/portage/world "$dev/var/lib/portage/world"
ROOT=$dev emerge -eK --color=n --nospinner @system @world
# shellcheck disable=SC2086 # a list of atoms
ROOT=$rt INSTALL_MASK="$RT_INSTALL_MASK" emerge -eK1 --color=n --nospinner $RT_PACKAGES

tar -C "$dev" --numeric-owner --xattrs -cf "$out/$base-dev-$tag.tar" .
tar -C "$rt" --numeric-owner --xattrs -cf "$out/$base-rt-$tag.tar" .
