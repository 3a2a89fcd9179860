#!/bin/sh
# gentoo-mkimg's in-stage build driver. It runs inside the raw stage (sandbox or container)
# as root, with:
#   /var/db/repos/gentoo         the Portage tree (read-only)
#   /var/cache/binpkgs           packages/TAG: binary packages, kept across runs
#   /var/cache/distfiles         the shared distfiles cache
#   /var/log/gentoo-mkimg        logs/TAG: the full log, emerge's build logs, phase times
#   /var/tmp/gentoo-mkimg/export named pipes dev.fifo and rt.fifo, only with the docker engine
#   /var/tmp/gentoo-mkimg/input  what the tool wrote for this build (read-only):
#       make.conf                extra make.conf lines
#       package.use package.accept_keywords package.mask package.unmask
#       repos.conf               entries for extra repositories
#       settings                 shell variables, listed below
# and writes the two roots /var/tmp/gentoo-mkimg/dev and /var/tmp/gentoo-mkimg/rt, which
# the tool turns into images after this script succeeds.
#
# settings: MKIMG_JOBS MKIMG_USE MKIMG_DEV_PACKAGES MKIMG_RT_PACKAGES MKIMG_INSTALL_MASK
#           MKIMG_KEEP_GOING (0/1) MKIMG_VERBOSE (0/1) MKIMG_OWNER (uid:gid or empty)
#           MKIMG_SOURCE_DATE_EPOCH (empty: the newest binary package's mtime)
#
# Output: with MKIMG_VERBOSE=1 everything emerge prints; otherwise only the phases and
# emerge's ">>> Emerging ..." lines. Everything goes to $LOG as well.
set -eu

IN=/var/tmp/gentoo-mkimg/input
OUT=/var/tmp/gentoo-mkimg
LOGDIR=/var/log/gentoo-mkimg
LOG=$LOGDIR/build.log
PHASES=$LOGDIR/phases

# shellcheck source=/dev/null # written by the tool for each build
. "$IN/settings"

: > "$LOG"
: > "$PHASES"

phase() {
	echo "$1 $(date +%s)" >> "$PHASES"
	echo ">>> gentoo-mkimg: $1" | tee -a "$LOG"
}

# Run a command with its output in the log; on the terminal in full (verbose) or only its
# ">>> " lines. Keeps the command's exit status.
logged() {
	status=$OUT/.status
	{
		rc=0
		"$@" 2>&1 || rc=$?
		echo "$rc" > "$status"
	} | tee -a "$LOG" | {
		if [ "$MKIMG_VERBOSE" = 1 ]; then
			cat
		else
			grep --line-buffered -E '^>>> (gentoo-mkimg|Emerging)' || true
		fi
	}
	return "$(cat "$status")"
}

keep_going=
[ "$MKIMG_KEEP_GOING" = 1 ] && keep_going=--keep-going

# --- configure Portage ------------------------------------------------------------------
# make.conf gets what the images should keep (they carry /etc/portage): buildpkg, accepting
# our own unsigned binary packages (Portage verifies binary-package signatures by default),
# the USE flags and the config's lines. What only concerns this build machine (parallelism,
# where logs go) is passed in the environment.
phase configure
mkdir -p /etc/portage
conf=/etc/portage/make.conf
[ -d "$conf" ] && conf=/etc/portage/make.conf/zz-gentoo-mkimg
{
	echo
	echo "# --- added by gentoo-mkimg ---"
	# shellcheck disable=SC2016 # expanded by Portage, not here
	echo 'FEATURES="${FEATURES} buildpkg -binpkg-request-signature"'
	[ -n "$MKIMG_USE" ] && echo "USE=\"\${USE} $MKIMG_USE\""
	cat "$IN/make.conf"
} >> "$conf"
if ! grep -qs '^MAKEOPTS=' /etc/portage/make.conf "$IN/make.conf"; then
	MAKEOPTS="-j$MKIMG_JOBS -l$MKIMG_JOBS"
	export MAKEOPTS
fi
if ! grep -qs '^EMERGE_DEFAULT_OPTS=' /etc/portage/make.conf "$IN/make.conf"; then
	EMERGE_DEFAULT_OPTS="--jobs=$MKIMG_JOBS --load-average=$MKIMG_JOBS"
	export EMERGE_DEFAULT_OPTS
fi
# Portage's dependency graph iterates Python sets: a fixed hash seed gives the same merge
# order, and so the same package COUNTERs, every time.
PYTHONHASHSEED=0
export PYTHONHASHSEED
PKGDIR=/var/cache/binpkgs
DISTDIR=/var/cache/distfiles
PORTAGE_LOGDIR=$LOGDIR/portage
PORTAGE_ELOG_SYSTEM=save
export PKGDIR DISTDIR PORTAGE_LOGDIR PORTAGE_ELOG_SYSTEM
mkdir -p "$PORTAGE_LOGDIR"

for f in package.use package.accept_keywords package.mask package.unmask; do
	[ -s "$IN/$f" ] || continue
	if [ -f "/etc/portage/$f" ]; then
		cat "$IN/$f" >> "/etc/portage/$f"
	else
		mkdir -p "/etc/portage/$f"
		cp "$IN/$f" "/etc/portage/$f/zz-gentoo-mkimg"
	fi
done
if [ -s "$IN/repos.conf" ]; then
	mkdir -p /etc/portage/repos.conf
	cp "$IN/repos.conf" /etc/portage/repos.conf/zz-gentoo-mkimg.conf
fi

# --- build every package of the system, reusing binary packages -----------------------------
phase build
# shellcheck disable=SC2086 # word splitting of package lists is intended
logged emerge --emptytree --usepkg --buildpkg --color=n --nospinner $keep_going \
	@system @world $MKIMG_DEV_PACKAGES

# --- one time for everything the roots carry ------------------------------------------------
# Merging stamps files with the time of the merge. So that an unchanged rebuild gives the same
# images, no mtime in the roots is later than CLAMP: SOURCE_DATE_EPOCH, or the newest binary
# package (unchanged while the packages are). The tool reads it back from $LOGDIR/clamp.
CLAMP=$MKIMG_SOURCE_DATE_EPOCH
if [ -z "$CLAMP" ]; then
	CLAMP=$(find /var/cache/binpkgs -type f \( -name '*.gpkg.tar' -o -name '*.xpak' -o -name '*.tbz2' \) \
		-printf '%T@\n' | cut -d. -f1 | sort -n | tail -n 1)
	CLAMP=${CLAMP:-0}
fi
echo "$CLAMP" > "$LOGDIR/clamp"

# Settle a root for reproducibility: drop caches that record merge times and inode numbers,
# record symlinks in the package database with CLAMP as their mtime (what they will have),
# keep the database's own metadata cache valid, then clamp every mtime. /etc/portage was
# changed by this script before the packages were built, so it gets CLAMP outright.
settle() {
	find "$1/etc/portage" -exec touch -h -d "@$CLAMP" {} +
	rm -f "$1/var/cache/ldconfig/aux-cache" "$1/var/cache/edb/mtimedb"
	find "$1/var/db/pkg" -mindepth 3 -maxdepth 3 -type f -name CONTENTS \
		-exec sed -i -E "s/^(sym .* )[0-9]+\$/\1$CLAMP/" {} +
	find "$1/var/db/pkg" -mindepth 3 -maxdepth 3 -type f -name metadata \
		-exec sed -i -E "s/^#dir_mtime=[0-9]+\$/#dir_mtime=${CLAMP}000000000/" {} +
	find "$1" -newermt "@$CLAMP" -exec touch -h -d "@$CLAMP" {} +
}

# Where the tool reads a root from a named pipe (docker engine), write it there as tar,
# in name order so that the layer does not depend on the order of directory listings.
export_root() {
	[ -p "$OUT/export/$1.fifo" ] || return 0
	tar --sort=name --xattrs --xattrs-include='*' --numeric-owner -cf "$OUT/export/$1.fifo" \
		-C "$OUT/$1" .
}

# --- the dev root: everything ---------------------------------------------------------------
phase dev
rm -rf "${OUT:?}/dev"
mkdir -p "$OUT/dev/etc"
cp -a /etc/portage "$OUT/dev/etc/"
if [ -f /var/lib/portage/world ]; then
	mkdir -p "$OUT/dev/var/lib/portage"
	cp /var/lib/portage/world "$OUT/dev/var/lib/portage/world"
fi
# shellcheck disable=SC2086
# One job: merges in a fixed order give the same package COUNTERs every time.
logged env ROOT="$OUT/dev" emerge --emptytree --usepkgonly --color=n --nospinner --jobs=1 \
	--root-deps --with-bdeps=y \
	@system @world $MKIMG_DEV_PACKAGES
settle "$OUT/dev"
export_root dev

# --- the rt root: the runtime closure of the base set, without docs and headers -----------
phase rt
rm -rf "${OUT:?}/rt"
mkdir -p "$OUT/rt/etc"
cp -a /etc/portage "$OUT/rt/etc/"
# shellcheck disable=SC2086
logged env INSTALL_MASK="$MKIMG_INSTALL_MASK" ROOT="$OUT/rt" emerge --emptytree --usepkgonly \
	--jobs=1 --oneshot --root-deps=rdeps --with-bdeps=n --color=n --nospinner $MKIMG_RT_PACKAGES

# What Portage leaves despite INSTALL_MASK (directories it created, files of packages
# installed before the mask took effect): remove it, but never the package database.
set -f
for mask in $MKIMG_INSTALL_MASK; do
	case $mask in
	/*)
		set +f
		for p in "$OUT/rt"$mask; do
			[ -e "$p" ] || [ -L "$p" ] || continue
			rm -rf "$p"
		done
		set -f
		;;
	*)
		find "$OUT/rt" -path "$OUT/rt/var/db/pkg" -prune -o \
			\( -type f -o -type l \) -name "$mask" -exec rm -f {} +
		;;
	esac
done
set +f
settle "$OUT/rt"
export_root rt

# --- hand the results to the user who runs the tool ----------------------------------------
phase finish
if [ -n "$MKIMG_OWNER" ]; then
	chown -R "$MKIMG_OWNER" /var/cache/binpkgs /var/log/gentoo-mkimg
fi
phase "done"
