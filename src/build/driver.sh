#!/bin/sh
# gentoo-mkimg's in-stage build driver. It runs inside the raw stage (sandbox or container)
# as root, with:
#   /var/db/repos/gentoo         the Portage tree (read-only)
#   /var/cache/binpkgs           packages/TAG: binary packages, kept across runs
#   /var/cache/distfiles         the shared distfiles cache
#   /var/log/gentoo-mkimg        logs/TAG: the full log, emerge's build logs, result.json
#   /var/tmp/gentoo-mkimg/export named pipes dev and rt (read-only mount: write into them)
#   /var/tmp/gentoo-mkimg/input  what the tool wrote for this build (read-only):
#       make.conf                extra make.conf lines
#       package.use package.accept_keywords package.mask package.unmask
#       repos.conf               entries for extra repositories
#       settings                 shell variables, listed below
# and makes the two roots /var/tmp/gentoo-mkimg/dev and /var/tmp/gentoo-mkimg/rt, each
# written as tar into its pipe once it is done: the tool makes the images' layers of them
# while this script goes on, and tags them only after it succeeded.
#
# settings: MKIMG_JOBS MKIMG_USE MKIMG_DEV_PACKAGES MKIMG_RT_PACKAGES MKIMG_INSTALL_MASK
#           MKIMG_PROFILE (empty: the stage's own) MKIMG_KEEP_GOING (0/1) MKIMG_VERBOSE (0/1)
#           MKIMG_OWNER (uid:gid or empty)
#           MKIMG_SOURCE_DATE_EPOCH (empty: the newest binary package's mtime)
#
# How a root is made (for both, nothing is merged into the stage's own / any more):
#   1. sys-apps/baselayout with USE=build, alone: its pkg_preinst makes the profile's layout
#      (merged-usr: bin -> usr/bin, sbin -> usr/bin, usr/sbin -> bin, lib -> usr/lib; split-usr:
#      real directories), /root and /home, and its pkg_postinst the account files with root.
#      Before anything else, so no package makes a real /bin or /lib where the profile wants
#      a link, and no acct-* package writes an /etc/passwd without root.
#   2. the packages, from binary packages only, without --emptytree: the root is empty, and
#      --emptytree would merge the build dependencies into / again.
# dev and rt are merged at the same time (with more than one job), each by its own emerge.
#
# Output: with MKIMG_VERBOSE=1 everything emerge prints; otherwise only the phases and
# emerge's ">>> Emerging ..." lines. Everything goes to $LOG as well.
#
# Result: $LOGDIR/result.json, rewritten (whole, by rename) when a phase starts, when the
# clamp is known and when the script exits, also on failure:
#   {"phases":[{"name":"configure","start":EPOCH},...],"clamp":EPOCH or null,
#    "failed":null or {"package":"CAT/PF","phase":"compile","log":"portage/CAT:PF:DATE.log"}}
# "failed" names the package an emerge failed on and its build log (relative to $LOGDIR,
# null when Portage wrote none), as Portage recorded them (see note_failure).
set -eu

IN=/var/tmp/gentoo-mkimg/input
OUT=/var/tmp/gentoo-mkimg
LOGDIR=/var/log/gentoo-mkimg
LOG=$LOGDIR/build.log
RESULT=$LOGDIR/result.json
REPO=/var/db/repos/gentoo

# shellcheck source=/dev/null # written by the tool for each build
. "$IN/settings"

: > "$LOG"
rm -f "$RESULT" "$OUT"/failed-*

# The result file (above). Every value is a number or a string of the characters that
# note_failure lets through, so nothing needs escaping.
PHASES_JSON=
CLAMP=
write_result() {
	failed=null
	for f in "$OUT/failed-build" "$OUT/failed-dev" "$OUT/failed-rt"; do
		[ -f "$f" ] || continue
		{ read -r pkg && read -r ph && read -r plog; } < "$f" || continue
		if [ -n "$plog" ]; then plog="\"$plog\""; else plog=null; fi
		failed="{\"package\":\"$pkg\",\"phase\":\"$ph\",\"log\":$plog}"
		break
	done
	printf '{"phases":[%s],"clamp":%s,"failed":%s}\n' "$PHASES_JSON" "${CLAMP:-null}" \
		"$failed" > "$RESULT.tmp" && mv -f "$RESULT.tmp" "$RESULT"
}

phase() {
	PHASES_JSON="${PHASES_JSON:+$PHASES_JSON,}{\"name\":\"$1\",\"start\":$(date +%s)}"
	write_result
	echo ">>> gentoo-mkimg: $1" | tee -a "$LOG"
}

# After an emerge failed: the package it failed on, from what Portage wrote under
# PORTAGE_LOGDIR since the stamp file $1 was made, into $OUT/failed-$2 (package, phase,
# build log, one a line; the first failure of each part is kept). Portage's elog "save"
# module writes each package's messages to elog/CAT:PF:DATE.log (elog/CAT/PF:DATE.log with
# FEATURES=split-elog), every phase's messages of each class under a line "CLASS: PHASE";
# die() reports with eerror, so the failed package's file has an "ERROR: PHASE" line, and
# the newest such file is the failure. Its build log is PORTAGE_LOGDIR's newest
# CAT:PF:DATE.log (build/CAT/PF:DATE.log with split-log), maybe compressed.
note_failure() {
	dir=${PORTAGE_LOGDIR:-}
	out=$OUT/failed-$2
	[ -n "$dir" ] && [ -d "$dir/elog" ] && [ ! -e "$out" ] || return 0
	elog=$(find "$dir/elog" -type f -name '*.log' -newer "$1" -printf '%T@ %p\n' |
		sort -rn | cut -d' ' -f2- | while read -r f; do
			if grep -qE '^ERROR: [a-z_]+$' "$f"; then
				echo "$f"
				break
			fi
		done)
	[ -n "$elog" ] || return 0
	ph=$(grep -E '^ERROR: [a-z_]+$' "$elog" | tail -n 1 | cut -d' ' -f2)
	rel=${elog#"$dir/elog/"}
	case $rel in
	*/*) cat=${rel%%/*} pf=${rel#*/} ;;
	*) cat=${rel%%:*} pf=${rel#*:} ;;
	esac
	pf=${pf%%:*}
	# Only what a package name can hold: no quote or control character gets into the JSON.
	case "$cat/$pf" in
	*[!A-Za-z0-9+_./-]* | /* | */ | */*/*) return 0 ;;
	esac
	plog=$(find "$dir" -path "$dir/elog" -prune -o -type f -newer "$1" \
		\( -name "$cat:$pf:*.log*" -o -path "*/$cat/$pf:*.log*" \) -printf '%T@ %p\n' |
		sort -rn | head -n 1 | cut -d' ' -f2-)
	plog=${plog#"$LOGDIR/"}
	case $plog in
	*[!A-Za-z0-9+_.:/-]* | /*) plog= ;;
	esac
	printf '%s\n%s\n%s\n' "$cat/$pf" "$ph" "$plog" > "$out.tmp" && mv -f "$out.tmp" "$out"
}

# Run a command with its output in a log (LOGTO, default $LOG); on the terminal in full
# (verbose) or only its ">>> " lines. Keeps the command's exit status; when it fails, notes
# the package it failed on (note_failure) for the part FAILED_AS (build, dev or rt).
logged() {
	log=${LOGTO:-$LOG}
	status=$log.status
	stamp=$OUT/stamp-${FAILED_AS:-build}
	: > "$stamp"
	{
		rc=0
		"$@" 2>&1 || rc=$?
		echo "$rc" > "$status"
	} | tee -a "$log" | {
		if [ "$MKIMG_VERBOSE" = 1 ]; then
			cat
		else
			grep --line-buffered -E '^>>> (gentoo-mkimg|Emerging)' || true
		fi
	}
	rc=$(cat "$status")
	rm -f "$status"
	[ "$rc" = 0 ] || note_failure "$stamp" "${FAILED_AS:-build}"
	rm -f "$stamp"
	return "$rc"
}

keep_going=
[ "$MKIMG_KEEP_GOING" = 1 ] && keep_going=--keep-going

# The user who runs the tool (docker engine, not root) gets the binary packages, distfiles and
# logs back, also when the build fails: the next run must be able to use them.
hand_back() {
	[ -z "$MKIMG_OWNER" ] && return 0
	chown -R "$MKIMG_OWNER" /var/cache/binpkgs /var/cache/distfiles /var/log/gentoo-mkimg || true
}
# On every exit: the result file as it ends, then the files back to their user.
finish() {
	write_result || true
	hand_back
}
trap finish EXIT

# emerge --pretend with the arguments, its plan in $OUT/plan (kept in $LOG); prints what it
# plans: "binary" (binary packages only), "some" (some packages to compile, the rest from
# binary packages; the ones to compile as =CAT/PF[::REPO] atoms in $OUT/compile) or "all"
# (no binary package at all, or a blocker, an uninstall, an error).
plan_build() {
	plan=$OUT/plan
	rc=0
	emerge --pretend "$@" > "$plan" 2>&1 || rc=$?
	cat "$plan" >> "$LOG"
	if [ "$rc" != 0 ] || grep -qE '^\[(blocks|uninstall)' "$plan" ||
		! grep -q '^\[binary' "$plan"; then
		echo all
	elif ! grep -q '^\[ebuild' "$plan"; then
		echo binary
	else
		sed -nE 's/^\[ebuild[^]]*\] +([^ ]+).*/=\1/p' "$plan" > "$OUT/compile"
		echo some
	fi
}

# Merge into / what the merges of the roots (below) would merge there: the install-time
# dependencies (IDEPEND) of their packages, which Portage wants in / whatever ROOT is: e.g.
# sys-apps/shadow, whose useradd the acct-* packages run. Asked of Portage with one plan of
# both roots' packages into an empty root, from binary packages; its packages for / (the
# lines not ending in "to ROOT") are merged, from binary packages, one time, before dev and
# rt merge at the same time.
root_needs() {
	probe=$OUT/probe
	rm -rf "$probe" && mkdir -p "$probe/var/lib/portage" || return
	if [ -f /var/lib/portage/world ]; then
		cp /var/lib/portage/world "$probe/var/lib/portage/world" || return
	fi
	rc=0
	# shellcheck disable=SC2086
	ROOT=$probe emerge --pretend --quiet --usepkgonly --binpkg-respect-use=y --root-deps \
		--with-bdeps=n --color=n --nospinner @system @world $MKIMG_DEV_PACKAGES \
		$MKIMG_RT_PACKAGES > "$OUT/plan" 2>&1 || rc=$?
	cat "$OUT/plan" >> "$LOG"
	rm -rf "$probe"
	# A plan that fails fails the roots too, which say why.
	[ "$rc" = 0 ] || return 0
	# "[binary  N    ] CAT/PF[-BUILD_ID][::REPO]", BUILD_ID when the package is one of several
	# builds (binpkg-multi-instance: PKGDIR/CAT/PN/PF-BUILD_ID.gpkg.tar).
	needs=$(grep '^\[binary' "$OUT/plan" | grep -v " to $probe" |
		sed -E 's/^\[[^]]*\] +([^ ]+).*/\1/; s/::.*//' | while read -r p; do
			for f in "$PKGDIR/${p%%/*}"/*/"${p#*/}".*; do
				[ -f "$f" ] && p=${p%-[0-9]*}
				break
			done
			printf ' =%s' "$p"
		done)
	[ -n "$needs" ] || return 0
	# shellcheck disable=SC2086
	logged env FEATURES="$BINARY_FEATURES" emerge --usepkgonly --binpkg-respect-use=y \
		--oneshot --with-bdeps=n --color=n --nospinner $needs
}

# --- configure Portage ------------------------------------------------------------------
# make.conf gets what the images should keep (they carry /etc/portage): buildpkg, accepting
# our own unsigned binary packages (Portage verifies binary-package signatures by default),
# the USE flags and the config's lines. What only concerns this build machine (parallelism,
# where logs go) is passed in the environment.
phase configure
mkdir -p /etc/portage
if [ -n "$MKIMG_PROFILE" ]; then
	if [ ! -d "$REPO/profiles/$MKIMG_PROFILE" ]; then
		echo "gentoo-mkimg: profile $MKIMG_PROFILE: no $REPO/profiles/$MKIMG_PROFILE in the snapshot" | tee -a "$LOG" >&2
		exit 1
	fi
	rm -rf /etc/portage/make.profile
	ln -s "../..$REPO/profiles/$MKIMG_PROFILE" /etc/portage/make.profile
fi
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
# The stage is thrown away and the roots are read once: Portage's fsync after every merge
# (merge-sync) only costs time here. Not in make.conf: the images keep Portage's default.
FEATURES="${FEATURES:-} -merge-sync"
export FEATURES
# Merges from binary packages only (into / for the roots, and the roots themselves) run
# without pid-sandbox: it starts every ebuild phase in a PID namespace of its own, behind an
# init of its own, so that a process a phase leaves behind dies with it; that costs about a
# sixth of such a merge. The session is a PID namespace already, and whatever a pkg_postinst
# leaves running dies with it. Compiling keeps it (a test suite's strays are killed at once).
BINARY_FEATURES="$FEATURES -pid-sandbox"
PKGDIR=/var/cache/binpkgs
DISTDIR=/var/cache/distfiles
PORTAGE_LOGDIR=$LOGDIR/portage
PORTAGE_ELOG_SYSTEM=save
export PKGDIR DISTDIR PORTAGE_LOGDIR PORTAGE_ELOG_SYSTEM
mkdir -p "$PORTAGE_LOGDIR"
# Owned as Portage wants them: distfiles are fetched as the portage user (userfetch) into a
# setgid portage directory; binary packages are written by root and read by the portage group.
if getent group portage >/dev/null 2>&1; then
	if getent passwd portage >/dev/null 2>&1; then
		chown portage:portage "$DISTDIR"
	else
		chgrp portage "$DISTDIR"
	fi
	chmod 2775 "$DISTDIR"
	chown root:portage "$PKGDIR"
	chmod 0755 "$PKGDIR"
fi

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
# --with-bdeps=y: the build dependencies are merged into / even when their users come from
# binary packages (the stage starts pristine every run), so that what is compiled finds them.
# A binary package is used only if built with today's USE flags and today's dependencies
# (those carried from an earlier TAG were built from another snapshot).
# shellcheck disable=SC2086 # word splitting of package lists is intended
set -- --emptytree --usepkg --binpkg-respect-use=y --binpkg-changed-deps=y --with-bdeps=y \
	--buildpkg --color=n --nospinner $keep_going @system @world $MKIMG_DEV_PACKAGES
# What that costs depends on what has a binary package already (Portage's plan, plan_build):
# - nothing (the first build of a TAG): the whole graph is merged into / as it is compiled.
# - everything (an unchanged rebuild, a new TAG started from the packages of an earlier one):
#   nothing is compiled, and merging it all into / again would only cost time: / gets only
#   what the roots' merges need there (root_needs).
# - some (a new snapshot that bumps a few packages, a changed USE flag): only those are
#   compiled, with --emptytree for them alone, so their whole dependency tree is merged into
#   / from the binary packages first (they are built against what the roots get, as in a
#   whole build), but not the rest of the graph; then / gets what the roots need (root_needs).
case $(plan_build "$@") in
binary)
	echo ">>> gentoo-mkimg: nothing needs compiling: the build root / is not reinstalled from binary packages" |
		tee -a "$LOG"
	root_needs
	;;
some)
	echo ">>> gentoo-mkimg: compiling $(wc -l < "$OUT/compile") of the packages, with their dependencies from binary packages" |
		tee -a "$LOG"
	# shellcheck disable=SC2046 # one atom a line, no blanks in an atom
	logged emerge --emptytree --usepkg --binpkg-respect-use=y --binpkg-changed-deps=y \
		--with-bdeps=y --buildpkg --oneshot --color=n --nospinner $keep_going \
		$(cat "$OUT/compile")
	root_needs
	;;
*)
	logged emerge "$@"
	;;
esac
# baselayout once more with USE=build, as a binary package of its own (binpkg-multi-instance
# keeps both, and --binpkg-respect-use=y makes every merge take the one whose USE flags
# match: without it, --usepkgonly takes a binary package whatever its flags). It is the
# first package of every root. Only when missing.
if ! USE=build emerge --pretend --usepkgonly --binpkg-respect-use=y --oneshot --nodeps \
	sys-apps/baselayout >/dev/null 2>&1; then
	logged env USE=build emerge --oneshot --nodeps --buildpkgonly --color=n --nospinner \
		sys-apps/baselayout
fi

# --- one time for everything the roots carry ------------------------------------------------
# Merging stamps files with the time of the merge. So that an unchanged rebuild gives the same
# images, no mtime in the roots is later than CLAMP: SOURCE_DATE_EPOCH, or the newest binary
# package (unchanged while the packages are). The tool reads it back from the result file.
CLAMP=$MKIMG_SOURCE_DATE_EPOCH
if [ -z "$CLAMP" ]; then
	CLAMP=$(find /var/cache/binpkgs -type f \( -name '*.gpkg.tar' -o -name '*.xpak' -o -name '*.tbz2' \) \
		-printf '%T@\n' | cut -d. -f1 | sort -n | tail -n 1)
	CLAMP=${CLAMP:-0}
fi
write_result

# Settle a root ($1, merged as $2) for reproducibility: number its packages in the order of
# its merge list (number_packages), drop caches that record merge times and inode numbers,
# record symlinks in the package database with CLAMP as their mtime (what they will have),
# keep the database's own metadata cache valid, then clamp every mtime. /etc/portage was
# changed by this script before the packages were built, so it gets CLAMP outright.
settle() {
	number_packages "$1" "$OUT/order-$2"
	find "$1/etc/portage" -exec touch -h -d "@$CLAMP" {} +
	rm -f "$1/var/cache/ldconfig/aux-cache" "$1/var/cache/edb/mtimedb"
	find "$1/var/db/pkg" -mindepth 3 -maxdepth 3 -type f -name CONTENTS \
		-exec sed -i -E "s/^(sym .* )[0-9]+\$/\1$CLAMP/" {} +
	find "$1/var/db/pkg" -mindepth 3 -maxdepth 3 -type f -name metadata \
		-exec sed -i -E "s/^#dir_mtime=[0-9]+\$/#dir_mtime=${CLAMP}000000000/" {} +
	find "$1" -newermt "@$CLAMP" -exec touch -h -d "@$CLAMP" {} +
}

# Hand a root to the tool: as tar into its named pipe, in name order so that the layer does
# not depend on the order of directory listings (the same in both engines: the tool never
# reads the tree itself).
export_root() {
	[ -p "$OUT/export/$1" ] || return 0
	tar --sort=name --xattrs --xattrs-include='*' --numeric-owner -cf "$OUT/export/$1" \
		-C "$OUT/$1" .
}

# A fresh root with the stage's /etc/portage, and baselayout merged first with USE=build.
new_root() {
	rm -rf "${OUT:?}/$1" && mkdir -p "$OUT/$1/etc" && cp -a /etc/portage "$OUT/$1/etc/" &&
		logged env ROOT="$OUT/$1" USE=build INSTALL_MASK="${2:-}" emerge --usepkgonly \
			--binpkg-respect-use=y --oneshot --nodeps --jobs=1 --color=n --nospinner \
			sys-apps/baselayout
}

# Merge into the root $ROOT: emerge with the arguments, with $MKIMG_JOBS jobs. Parallel
# merges finish in any order, so the package COUNTERs they get (Portage numbers merges as
# they happen) vary; the order of the merge list does not. So that the images do not depend
# on --jobs or on timing, the merge list is asked for first (emerge --pretend, kept as
# $OUT/order-NAME) and number_packages renumbers the root's packages in its order after the
# merge.
merge_into() {
	name=$1
	shift
	rc=0
	emerge --pretend --quiet --jobs=1 "$@" > "$OUT/order-$name" 2>&1 || rc=$?
	cat "$OUT/order-$name" >> "${LOGTO:-$LOG}"
	# A plan that fails: the merge itself says why.
	[ "$rc" = 0 ] || : > "$OUT/order-$name"
	logged emerge --jobs="$MKIMG_JOBS" "$@"
}

# COUNTER of every package in the root $1, in the order of the merge list $2 (an emerge
# --pretend, above): 1, 2, ... for the packages first merged by new_root (baselayout) and
# then as listed; whatever the list lacks last, by name. Written as Portage writes it (no
# newline), in the package's own COUNTER file and in its consolidated "metadata" file
# where this Portage keeps one (settle stamps that file's #dir_mtime afterwards); the
# root's global counter (/var/cache/edb/counter) is the last number.
number_packages() {
	vdb=$1/var/db/pkg
	[ -d "$vdb" ] || return 0
	# "[binary  N    ] CAT/PF[-BUILD_ID][::REPO] ...": a BUILD_ID (binpkg-multi-instance)
	# is a last "-DIGITS" that the package database's CAT/PF lacks.
	(cd "$vdb" && find . -mindepth 2 -maxdepth 2 -type d) | sed 's|^\./||' | LC_ALL=C sort |
		awk -v plan="$2" '
			{ installed[$0] = 1; names[++n] = $0 }
			END {
				first = "sys-apps/baselayout"
				while ((getline line < plan) > 0) {
					if (line !~ /^\[binary/) continue
					sub(/^\[[^]]*\] +/, "", line); sub(/[ :].*/, "", line)
					order[++m] = line
				}
				for (i = 1; i <= n; i++)
					if (index(names[i], first "-") == 1 && !(names[i] in done)) {
						print names[i]; done[names[i]] = 1
					}
				for (j = 1; j <= m; j++) {
					p = order[j]
					if (!(p in installed)) sub(/-[0-9]+$/, "", p)
					if ((p in installed) && !(p in done)) { print p; done[p] = 1 }
				}
				for (i = 1; i <= n; i++)
					if (!(names[i] in done)) print names[i]
			}' | {
		c=0
		while read -r p; do
			c=$((c + 1))
			printf '%s' "$c" > "$vdb/$p/COUNTER"
			if [ -f "$vdb/$p/metadata" ]; then
				sed -i -E "s/^COUNTER=.*/COUNTER=$c/" "$vdb/$p/metadata"
			fi
		done
		if [ "$c" -gt 0 ]; then
			mkdir -p "$1/var/cache/edb" && printf '%s' "$c" > "$1/var/cache/edb/counter"
		fi
	}
}

# The dev root: everything, with the stage's world file.
merge_dev() {
	new_root dev || return
	if [ -f /var/lib/portage/world ]; then
		mkdir -p "$OUT/dev/var/lib/portage" &&
			cp /var/lib/portage/world "$OUT/dev/var/lib/portage/world" || return
	fi
	# --root-deps: the build dependencies go into the root (they are what dev is for), and
	# with --with-bdeps=n not into / as well (where only an unchanged build lacks them).
	ROOT=$OUT/dev
	export ROOT
	# shellcheck disable=SC2086
	merge_into dev --usepkgonly --binpkg-respect-use=y --color=n \
		--nospinner --root-deps --with-bdeps=n @system @world $MKIMG_DEV_PACKAGES
}

# The rt root: the runtime closure of the base set, without docs and headers. Its make.conf
# keeps the mask (a later `emerge -K` in the image must not bring headers and docs back),
# builds no binary packages and installs binary packages only; its world file records the rt
# set.
merge_rt() {
	new_root rt "$MKIMG_INSTALL_MASK" || return
	rtconf=$OUT/rt/etc/portage/make.conf
	[ -d "$rtconf" ] && rtconf=$rtconf/zz-gentoo-mkimg-rt
	{
		echo
		echo "# --- gentoo-mkimg: a runtime image ---"
		echo "INSTALL_MASK=\"\${INSTALL_MASK} $MKIMG_INSTALL_MASK\""
		# shellcheck disable=SC2016 # expanded by Portage, not here
		echo 'FEATURES="${FEATURES} -buildpkg"'
		# shellcheck disable=SC2016
		echo 'EMERGE_DEFAULT_OPTS="${EMERGE_DEFAULT_OPTS} --usepkgonly"'
	} >> "$rtconf" || return
	ROOT=$OUT/rt
	INSTALL_MASK=$MKIMG_INSTALL_MASK
	export ROOT INSTALL_MASK
	# shellcheck disable=SC2086
	merge_into rt --usepkgonly \
		--binpkg-respect-use=y --root-deps=rdeps --with-bdeps=n --color=n \
		--nospinner $MKIMG_RT_PACKAGES
}

# --- dev and rt ------------------------------------------------------------------------------
# Each root by an emerge of its own (in a subshell: ROOT and INSTALL_MASK are exported there),
# with its own build dirs and log, appended to $LOG, dev first, when both are done. With more
# than one job, dev and rt are merged at the same time, each with $MKIMG_JOBS jobs; with one,
# one after the other. Either way, the same roots (number_packages, in settle).
phase roots
if [ "$MKIMG_JOBS" -gt 1 ]; then
	echo ">>> gentoo-mkimg: dev and rt at the same time, $MKIMG_JOBS jobs each" | tee -a "$LOG"
else
	echo ">>> gentoo-mkimg: dev, then rt, one package at a time" | tee -a "$LOG"
fi
merge_part() {
	(
		PORTAGE_TMPDIR=$OUT/tmp-$1
		PORTAGE_LOGDIR=$LOGDIR/portage/$1
		LOGTO=$LOGDIR/$1.log
		FAILED_AS=$1
		FEATURES=$BINARY_FEATURES
		export PORTAGE_TMPDIR PORTAGE_LOGDIR FEATURES
		: > "$LOGTO"
		mkdir -p "$PORTAGE_TMPDIR" "$PORTAGE_LOGDIR" && "merge_$1"
	)
}
dev_rc=0
rt_rc=0
if [ "$MKIMG_JOBS" -gt 1 ]; then
	merge_part rt &
	rt_pid=$!
	merge_part dev || dev_rc=$?
	wait "$rt_pid" || rt_rc=$?
else
	merge_part dev || dev_rc=$?
	[ "$dev_rc" = 0 ] && { merge_part rt || rt_rc=$?; }
fi
cat "$LOGDIR/dev.log" "$LOGDIR/rt.log" >> "$LOG" 2>/dev/null || true
rm -rf "$LOGDIR/dev.log" "$LOGDIR/rt.log" "${OUT:?}/tmp-dev" "${OUT:?}/tmp-rt"
[ "$dev_rc" = 0 ] || exit "$dev_rc"
[ "$rt_rc" = 0 ] || exit "$rt_rc"

phase images
settle "$OUT/dev" dev
export_root dev

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
settle "$OUT/rt" rt
export_root rt

# --- the results go back to the user who runs the tool (hand_back, on exit) -----------------
phase finish
phase "done"
