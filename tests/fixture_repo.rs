//! The test ebuild repository (tests/fixtures/repo) on the stand-in stage, with the real
//! Portage, through `gentoo-mkimg shell` (sandbox engine):
//! - `emerge --info` shows the repository's profiles (merged-usr and split-usr 23.0);
//! - `emerge --emptytree --usepkg @system @world` with FEATURES=buildpkg compiles
//!   everything (a real shared library, a real ELF linked against it, a build-only tool, the
//!   stage's toolchain and tools as packages) into gpkg binary packages;
//! - then, as gentoo-mkimg builds (a second run: the build phase takes only binary
//!   packages): baselayout once more with USE=build as a binary package of its own, and
//!   roots that start with it: `ROOT=R USE=build emerge -K --oneshot --nodeps baselayout`,
//!   then the dev root `ROOT=R emerge -K --root-deps @system @world` and the rt root
//!   `ROOT=R INSTALL_MASK=... emerge -K --root-deps=rdeps --with-bdeps=n <rt set>`, none of
//!   which merges anything into / again. The roots have the merged-usr links, root and the
//!   acct-* accounts, run /bin/sh, awk, hello, emerge and C++ programs (compiled in the dev
//!   root, installed from a binary package in rt), and every file of the dev root belongs
//!   to a package but for what baselayout and the account tools make outside any package;
//! - the split-usr profile: refused on the merged-usr stage itself (pkg_setup), it gives a
//!   root of real directories when baselayout is built for that root.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const TAG: &str = "fixture";

struct Workspace {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    cache: PathBuf,
}

fn workspace() -> Workspace {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&work).unwrap();
    Workspace {
        _tmp: tmp,
        work,
        cache,
    }
}

impl Workspace {
    fn pkgdir(&self) -> PathBuf {
        self.work.join("packages").join(TAG)
    }

    /// Runs `command` in a session on the stand-in stage with the test repository as the
    /// snapshot and `env` (NAME=VALUE) added to its environment.
    fn session(&self, env: &[&str], command: &[&str]) -> Output {
        let stage = common::stage();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
        cmd.arg("--work-dir")
            .arg(&self.work)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("shell")
            .arg(stage.xz())
            .arg("--snapshot")
            .arg(common::repo())
            .args(["--tag", TAG]);
        for e in env {
            cmd.args(["-e", e]);
        }
        cmd.arg("--").args(command).stdin(Stdio::null());
        let started = Instant::now();
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run gentoo-mkimg: {e}"));
        let shown: Vec<&str> = command
            .iter()
            .map(|a| a.lines().next().unwrap_or_default())
            .collect();
        eprintln!(
            "[fixture_repo] {}: {} in {:.1}s",
            shown.join(" "),
            out.status,
            started.elapsed().as_secs_f64()
        );
        out
    }

    /// Like [`Workspace::session`]; panics with the output's tail unless it succeeds.
    fn session_ok(&self, env: &[&str], command: &[&str]) -> String {
        let out = self.session(env, command);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{command:?} failed ({}):\n--- stdout (tail):\n{}\n--- stderr (tail):\n{}",
            out.status,
            tail(&stdout, 80),
            tail(&String::from_utf8_lossy(&out.stderr), 80)
        );
        stdout
    }
}

/// `bash -c SCRIPT` in new mount and pid namespaces with their own /proc (util-linux's
/// unshare, in the stage).
fn in_own_namespaces(script: &str) -> Vec<&str> {
    vec![
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "bash",
        "-c",
        script,
    ]
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn jobs() -> String {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .to_string()
}

/// The `@@ NAME` sections of a script's output: NAME -> the lines up to the next one.
fn sections(stdout: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("@@ ") {
            if let Some((n, t)) = current.take() {
                map.insert(n, t);
            }
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((n, t)) = current {
        map.insert(n, t);
    }
    map
}

/// The sections of a session's output, by name.
struct Sections {
    map: BTreeMap<String, String>,
    out: String,
}

impl Sections {
    fn new(out: String) -> Self {
        Sections {
            map: sections(&out),
            out,
        }
    }

    fn get(&self, name: &str) -> &str {
        self.map
            .get(name)
            .unwrap_or_else(|| panic!("no section {name} in:\n{}", tail(&self.out, 60)))
    }
}

/// The members of a gpkg binary package (an uncompressed tar of `PF-N/metadata.tar.zst`,
/// `PF-N/image.tar.zst`, ...): the inner tar named `inner` (`metadata` or `image`),
/// decompressed, as member path -> (mode, content).
fn gpkg_inner(gpkg: &Path, inner: &str) -> BTreeMap<String, (u32, Vec<u8>)> {
    let file = std::fs::File::open(gpkg).unwrap();
    let mut outer = tar::Archive::new(file);
    for entry in outer.entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if path.ends_with(&format!("/{inner}.tar.zst")) {
            let decoder = zstd::stream::read::Decoder::new(entry).unwrap();
            let mut members = BTreeMap::new();
            let mut archive = tar::Archive::new(decoder);
            for member in archive.entries().unwrap() {
                let mut member = member.unwrap();
                let name = member.path().unwrap().to_string_lossy().into_owned();
                let mode = member.header().mode().unwrap();
                let mut content = Vec::new();
                member.read_to_end(&mut content).unwrap();
                members.insert(name, (mode, content));
            }
            return members;
        }
    }
    panic!("{}: no {inner}.tar.zst", gpkg.display());
}

#[test]
fn emerge_info_shows_the_repository_profiles() {
    let ws = workspace();
    let out = ws.session_ok(&[], &["emerge", "--info"]);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Portage 3.0.83 (")
            && first.contains(&format!("{},", common::REPO_PROFILE)),
        "{out}"
    );
    for line in [
        "ACCEPT_KEYWORDS=\"amd64\"",
        "CHOST=\"x86_64-pc-linux-gnu\"",
        "location: /var/db/repos/gentoo",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == line),
            "{line} missing:\n{out}"
        );
    }
    assert!(!out.contains("!!!"), "{out}");
    // Portage's own sandboxes are on, as make.globals has them (the stand-in stage's
    // make.conf does not turn them off).
    let features = out
        .lines()
        .find_map(|l| l.strip_prefix("FEATURES=\""))
        .unwrap_or_else(|| panic!("no FEATURES in:\n{out}"));
    for feature in [
        "sandbox",
        "usersandbox",
        "ipc-sandbox",
        "network-sandbox",
        "pid-sandbox",
    ] {
        assert!(
            features.split_whitespace().any(|f| f == feature),
            "{feature} is off: {features}"
        );
    }

    // The profile resolves every package of @system and @world, from this repository; the
    // split-usr profile is a profile of its own, with USE=split-usr.
    let script = format!(
        r#"set -eu
echo "@@ merged"
emerge --pretend --emptytree --verbose @system @world
ln -sfn ../../var/db/repos/gentoo/profiles/{split} /etc/portage/make.profile
echo "@@ split-info"
emerge --info 2>/dev/null | head -n 1
echo "@@ split"
emerge --pretend --nodeps --verbose --oneshot sys-apps/baselayout
"#,
        split = common::SPLIT_USR_PROFILE
    );
    let out = ws.session_ok(&[], &["bash", "-c", &script]);
    let sec = sections(&out);
    let merged = &sec["merged"];
    for package in [
        "sys-apps/baselayout",
        "virtual/libc",
        "virtual/package-manager",
        "virtual/service-manager",
        "sys-apps/openrc",
        "app-alternatives/sh",
        "app-alternatives/awk",
        "sys-apps/shadow",
        "sys-devel/gcc",
        "sys-devel/binutils",
        "dev-build/make",
        "sys-kernel/linux-headers",
        "acct-user/portage",
        "acct-user/demo",
        "app-misc/hello",
    ] {
        assert!(
            merged
                .lines()
                .any(|l| l.starts_with("[ebuild") && l.contains(&format!("{package}-"))),
            "{package} is not in @system/@world:\n{merged}"
        );
    }
    let baselayout = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("[ebuild") && l.contains("sys-apps/baselayout-"))
            .unwrap_or_else(|| panic!("no baselayout in:\n{text}"))
            .to_string()
    };
    assert!(baselayout(merged).contains("(-split-usr)"), "{merged}");
    assert!(
        sec["split-info"].contains(&format!("{},", common::SPLIT_USR_PROFILE)),
        "{}",
        sec["split-info"]
    );
    assert!(
        baselayout(&sec["split"]).contains("(split-usr"),
        "{}",
        sec["split"]
    );
}

/// The names of the tool's default rt set that the test repository has, and hello: what
/// `common::RT_PACKAGES` says it is.
#[test]
fn rt_packages_are_the_default_rt_set_the_repository_has() {
    let mut want: Vec<&str> = gentoo_mkimg::config::DEFAULT_RT_PACKAGES
        .iter()
        .copied()
        .filter(|atom| common::repo().join(atom).is_dir())
        .collect();
    want.push("app-misc/hello");
    let mut have = common::RT_PACKAGES.to_vec();
    want.sort_unstable();
    have.sort_unstable();
    assert_eq!(have, want);
}

/// Lines of emerge's output that merge a package, and whether each goes into `root`
/// (">>> Emerging binary (1 of 9) cat/pkg-1::gentoo for /tmp/r/") or into / (no "for").
fn merges<'a>(out: &'a str, root: &str) -> (Vec<&'a str>, Vec<&'a str>) {
    let suffix = format!(" for {root}/");
    out.lines()
        .filter(|l| l.starts_with(">>> Emerging"))
        .partition(|l| l.ends_with(&suffix))
}

/// The kind of each path of a `@@ layout` section ("bin link usr/bin", "lib dir").
fn layout(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect()
}

/// Profile 23.0's merged-usr links, as baselayout[build] makes them.
const MERGED_USR_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/bin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
    ("usr/sbin", "bin"),
];

/// Prints "PATH KIND" for the merged-usr paths of the root $r (KIND: "link TARGET", "dir",
/// "missing").
const LAYOUT_SH: &str = r#"for d in bin sbin lib lib64 usr/sbin; do
	if [ -L "$r/$d" ]; then echo "$d link $(readlink "$r/$d")";
	elif [ -d "$r/$d" ]; then echo "$d dir"; else echo "$d missing"; fi
done"#;

/// Checks an account file (passwd or group) of a root: root first, then the acct accounts
/// with their fixed ids.
fn assert_accounts(text: &str, accounts: &[(&str, u32)], what: &str) {
    let entries: BTreeMap<&str, Vec<&str>> = text
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields[0], fields)
        })
        .collect();
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.starts_with("root:x:0:")),
        "{what}: root is not first:\n{text}"
    );
    for (name, id) in accounts {
        let fields = entries
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no {name}:\n{text}"));
        assert_eq!(fields[2], id.to_string(), "{what}: {name}:\n{text}");
    }
}

#[test]
fn repository_builds_packages_and_roots() {
    let ws = workspace();
    let jobs = jobs();
    let makeopts = format!("MAKEOPTS=-j{jobs}");
    let jobs_opt = format!("--jobs={jobs}");

    // 1. Everything compiled into binary packages.
    let started = Instant::now();
    let out = ws.session_ok(
        &["FEATURES=buildpkg", &makeopts],
        &[
            "emerge",
            "--emptytree",
            "--usepkg",
            "--quiet-build=y",
            &jobs_opt,
            "@system",
            "@world",
        ],
    );
    let emerge_e = started.elapsed();
    assert!(
        !out.contains(">>> Emerging binary"),
        "a binary package was used:\n{out}"
    );
    let found = common::binpkgs(&ws.pkgdir());
    let names: BTreeSet<&str> = found.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = common::BUILT_PACKAGES.iter().copied().collect();
    assert_eq!(
        names,
        expected,
        "binary packages in {}",
        ws.pkgdir().display()
    );
    for (name, files) in &found {
        let want = if name == "dev-libs/slotted" { 2 } else { 1 };
        assert_eq!(files.len(), want, "{name}: {files:?}");
        for file in files {
            assert!(
                file.to_string_lossy().ends_with("-1.gpkg.tar"),
                "{}",
                file.display()
            );
        }
    }
    for name in common::UNBUILT_PACKAGES {
        assert!(!names.contains(name), "{name} was built");
    }
    check_packages(&found);

    // 2. gentoo-mkimg's build, a second time: the build phase takes binary packages only.
    let mask = gentoo_mkimg::config::DEFAULT_INSTALL_MASK.join(" ");
    let script = RECIPE_SH
        .replace("@JOBS@", &jobs)
        .replace("@MASK@", &mask)
        .replace("@RT@", &common::RT_PACKAGES.join(" "))
        .replace("@OWNERS_PY@", OWNERS_PY)
        .replace("@LAYOUT_SH@", LAYOUT_SH);
    // The session's own mount namespace belongs to the host (its root holds capabilities only
    // in its user namespace), so the recipe's chroot checks mount /dev, /proc and the binds in
    // a mount and pid namespace of their own, as Portage's sandboxes do.
    let sec = Sections::new(ws.session_ok(&[], &in_own_namespaces(&script)));
    let build = sec.get("build");
    let (_, into_stage) = merges(build, "");
    assert!(
        into_stage.len() >= common::BUILT_PACKAGES.len()
            && into_stage
                .iter()
                .all(|l| l.starts_with(">>> Emerging binary")),
        "the second build phase did not take binary packages only:\n{build}"
    );
    check_baselayout_instances(&sec);
    let dev_seconds = sec.get("dev-seconds").trim().to_string();
    let sizes = sec
        .get("sizes")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    check_dev_root(&sec);
    check_rt_root(&sec);
    let found = common::binpkgs(&ws.pkgdir());
    for (name, want) in [
        ("sys-apps/baselayout", 2),
        ("app-misc/cxxdemo", 1),
        ("app-misc/extra", 1),
    ] {
        assert_eq!(
            found.get(name).map_or(0, Vec::len),
            want,
            "{name}: {:?}",
            found.get(name)
        );
    }

    // 3. The split-usr profile.
    let script = SPLIT_SH
        .replace("@SPLIT@", common::SPLIT_USR_PROFILE)
        .replace("@LAYOUT_SH@", LAYOUT_SH);
    let sec = Sections::new(ws.session_ok(&[], &in_own_namespaces(&script)));
    check_split_root(&sec);

    eprintln!(
        "[fixture_repo] emerge -e: {:.0}s; dev root: {dev_seconds}s; sizes (MB): {sizes}",
        emerge_e.as_secs_f64(),
    );
}

/// The binary packages of the first build: what each carries and declares.
fn check_packages(found: &BTreeMap<String, Vec<PathBuf>>) {
    let pkg = |name: &str| &found[name][0];
    let text = |meta: &BTreeMap<String, (u32, Vec<u8>)>, key: &str| {
        meta.get(&format!("metadata/{key}"))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_string())
            .unwrap_or_default()
    };

    // hello: a real ELF that needs libdemo.so.1, built with devtool, docs under USE=doc.
    let meta = gpkg_inner(pkg("app-misc/hello"), "metadata");
    assert!(
        text(&meta, "NEEDED.ELF.2").contains("/usr/bin/hello;;;libdemo.so.1,libc.so.6;"),
        "{}",
        text(&meta, "NEEDED.ELF.2")
    );
    assert_eq!(text(&meta, "BDEPEND"), "dev-util/devtool");
    assert!(
        text(&meta, "USE").split_whitespace().any(|u| u == "doc"),
        "{}",
        text(&meta, "USE")
    );
    assert_eq!(text(&meta, "CHOST"), "x86_64-pc-linux-gnu");
    let image = gpkg_inner(pkg("app-misc/hello"), "image");
    let (mode, elf) = &image["image/usr/bin/hello"];
    assert!(elf.starts_with(b"\x7fELF"), "hello is not an ELF file");
    assert_eq!(mode & 0o777, 0o755);
    for doc in [
        "image/usr/share/man/man1/hello.1.bz2",
        "image/usr/share/doc/hello-1.0/README",
    ] {
        assert!(image.contains_key(doc), "{doc} missing: {:?}", image.keys());
    }
    // libdemo: the shared library with its soname, the header, the static library, the .la.
    let meta = gpkg_inner(pkg("sys-libs/libdemo"), "metadata");
    assert!(
        text(&meta, "PROVIDES").contains("libdemo.so.1"),
        "{}",
        text(&meta, "PROVIDES")
    );
    let image = gpkg_inner(pkg("sys-libs/libdemo"), "image");
    for file in [
        "image/usr/lib/libdemo.so.1.0.0",
        "image/usr/lib/libdemo.so.1",
        "image/usr/lib/libdemo.so",
        "image/usr/lib/libdemo.a",
        "image/usr/lib/libdemo.la",
        "image/usr/include/demo.h",
    ] {
        assert!(
            image.contains_key(file),
            "{file} missing: {:?}",
            image.keys()
        );
    }
    assert!(
        image["image/usr/lib/libdemo.so.1.0.0"]
            .1
            .starts_with(b"\x7fELF")
    );
    assert!(image["image/usr/lib/libdemo.a"].1.starts_with(b"!<arch>\n"));

    // What each package has in its image, and what it must not have.
    for (name, present, absent) in [
        (
            // the layout and the account files are made outside the image
            "sys-apps/baselayout",
            &[
                "image/usr/share/baselayout/passwd",
                "image/usr/share/baselayout/group",
                "image/etc/env.d/50baselayout",
                "image/lib/sysctl.d/00protected-links.conf",
            ][..],
            &[
                "image/bin",
                "image/etc/passwd",
                "image/etc/group",
                "image/root",
                "image/home",
            ][..],
        ),
        (
            // "into /": the loader and ldconfig where dpkg has them; the development files
            "sys-libs/glibc",
            &[
                "image/lib64/ld-linux-x86-64.so.2",
                "image/lib/x86_64-linux-gnu/libc.so.6",
                "image/sbin/ldconfig",
                "image/usr/include/stdio.h",
                "image/usr/lib/x86_64-linux-gnu/crt1.o",
                "image/usr/lib/x86_64-linux-gnu/libc.so",
                "image/etc/env.d/00glibc",
            ][..],
            &["image/etc/ld.so.conf"][..],
        ),
        (
            "app-shells/bash",
            &["image/bin/bash"][..],
            &["image/usr/bin/sh", "image/bin/sh", "image/usr/bin/bash"][..],
        ),
        ("app-alternatives/sh", &["image/bin/sh"][..], &[][..]),
        (
            "sys-apps/mawk",
            &["image/usr/bin/mawk"][..],
            &["image/usr/bin/awk"][..],
        ),
        ("app-alternatives/awk", &["image/usr/bin/awk"][..], &[][..]),
        (
            "sys-apps/openrc",
            &[
                "image/sbin/openrc",
                "image/lib/rc/sh/functions.sh",
                "image/lib/rc/tmp/.keep_sys-apps_openrc-0",
            ][..],
            &[][..],
        ),
        (
            "sys-apps/shadow",
            &[
                "image/usr/bin/useradd",
                "image/usr/bin/groupadd",
                "image/etc/login.defs",
            ][..],
            &[][..],
        ),
        (
            "sys-devel/gcc",
            &[
                "image/usr/bin/x86_64-pc-linux-gnu-gcc",
                "image/usr/bin/x86_64-pc-linux-gnu-g++",
                "image/usr/bin/cc",
                "image/usr/bin/c++",
                "image/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus",
                "image/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
                "image/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
            ][..],
            &[][..],
        ),
        (
            "sys-devel/binutils",
            &["image/usr/bin/x86_64-pc-linux-gnu-ld", "image/usr/bin/as"][..],
            &[][..],
        ),
        (
            "acct-user/portage",
            &["image/var/lib/portage/home/.keep_acct-user_portage-0"][..],
            &[][..],
        ),
    ] {
        let image = gpkg_inner(pkg(name), "image");
        for path in present {
            assert!(
                image.contains_key(*path) || image.contains_key(&format!("{path}/")),
                "{name}: no {path}: {:?}",
                image.keys().take(40).collect::<Vec<_>>()
            );
        }
        for path in absent {
            assert!(
                !image
                    .keys()
                    .any(|k| k == path || k.starts_with(&format!("{path}/"))),
                "{name} has {path}"
            );
        }
    }

    // The accounts: groupadd/useradd at install time (IDEPEND on shadow); the user needs its
    // group; Portage needs both. As in ::gentoo, nothing depends on gcc or the
    // app-alternatives providers (they come with @system), and bash and mawk do not provide
    // sh and awk.
    for name in [
        "acct-group/portage",
        "acct-user/portage",
        "acct-group/demo",
        "acct-user/demo",
    ] {
        let meta = gpkg_inner(pkg(name), "metadata");
        assert_eq!(text(&meta, "IDEPEND"), "sys-apps/shadow", "{name}");
    }
    let meta = gpkg_inner(pkg("acct-user/portage"), "metadata");
    assert!(
        text(&meta, "RDEPEND").contains("acct-group/portage"),
        "{}",
        text(&meta, "RDEPEND")
    );
    let meta = gpkg_inner(pkg("sys-apps/portage"), "metadata");
    for dep in ["acct-user/portage", "acct-group/portage"] {
        assert!(
            text(&meta, "RDEPEND").contains(dep),
            "{}",
            text(&meta, "RDEPEND")
        );
    }
    let meta = gpkg_inner(pkg("sys-apps/baselayout"), "metadata");
    let iuse: BTreeSet<&str> = text(&meta, "IUSE").leak().split_whitespace().collect();
    assert!(
        iuse.contains("build") && iuse.contains("split-usr"),
        "{iuse:?}"
    );
    for (name, files) in found {
        let meta = gpkg_inner(&files[0], "metadata");
        let rdepend = text(&meta, "RDEPEND");
        for dep in ["sys-devel/gcc", "app-alternatives/"] {
            assert!(!rdepend.contains(dep), "{name} depends on {dep}: {rdepend}");
        }
    }
}

/// The USE=build instance of baselayout, and which instance `--usepkgonly` takes.
fn check_baselayout_instances(sec: &Sections) {
    // Before the USE=build instance exists, a pretend --usepkgonly run with USE=build
    // "succeeds" with the USE=-build package (--usepkgonly compares no USE flags); only
    // --binpkg-respect-use=y finds that the instance is missing.
    let loose = sec.get("build-instance-check-loose");
    assert!(
        loose.contains("rc=0") && loose.contains("sys-apps/baselayout-2.17-1 "),
        "{loose}"
    );
    let strict = sec.get("build-instance-check");
    assert!(!strict.contains("rc=0"), "{strict}");
    let instances: Vec<&str> = sec.get("instances").lines().collect();
    assert_eq!(
        instances,
        ["baselayout-2.17-1.gpkg.tar", "baselayout-2.17-2.gpkg.tar"],
        "baselayout's binary packages"
    );
    // Which one is taken: without --binpkg-respect-use=y, --usepkgonly takes the newest
    // instance whatever USE says.
    let picks = sec.get("picks");
    for (case, instance) in [
        ("USE= respect=", "2.17-2"),
        ("USE= respect=--binpkg-respect-use=y", "2.17-1"),
        ("USE=build respect=", "2.17-2"),
        ("USE=build respect=--binpkg-respect-use=y", "2.17-2"),
    ] {
        let line = picks
            .lines()
            .find(|l| l.starts_with(&format!("{case}:")))
            .unwrap_or_else(|| panic!("no {case} in:\n{picks}"));
        assert!(
            line.contains(&format!("sys-apps/baselayout-{instance}::gentoo")),
            "{case} took the wrong instance: {line}"
        );
    }
    // A build phase (--usepkg) takes the USE=-build one.
    let again = sec.get("pretend-again");
    let line = again
        .lines()
        .find(|l| l.contains("sys-apps/baselayout-"))
        .unwrap_or_else(|| panic!("{again}"));
    assert!(
        line.starts_with("[binary")
            && line.contains("baselayout-2.17-1::gentoo")
            && line.contains("USE=\"-build"),
        "{line}"
    );
    assert!(
        again
            .lines()
            .filter(|l| l.starts_with('['))
            .all(|l| l.starts_with("[binary")),
        "not all binary:\n{again}"
    );
}

/// The dev root: layout, accounts, owners, what runs in it.
fn check_dev_root(sec: &Sections) {
    let root = "/tmp/dev";
    for section in ["dev-baselayout", "dev-merge"] {
        let (_, into_stage) = merges(sec.get(section), root);
        assert!(
            into_stage.is_empty(),
            "{section}: merged into the stage's own /: {into_stage:?}"
        );
    }
    let (into_root, _) = merges(sec.get("dev-merge"), root);
    assert!(
        into_root.len() >= common::BUILT_PACKAGES.len(),
        "{}",
        sec.get("dev-merge")
    );
    let layout = layout(sec.get("dev-layout"));
    for (path, target) in MERGED_USR_LINKS {
        assert_eq!(
            layout[*path],
            format!("link {target}"),
            "/{path} of the dev root"
        );
    }
    assert_accounts(sec.get("dev-passwd"), common::ACCT_USERS, "dev /etc/passwd");
    assert_accounts(sec.get("dev-group"), common::ACCT_GROUPS, "dev /etc/group");

    // Every file of the root comes from a package, except the state Portage keeps, the
    // copied /etc/portage, and what baselayout and the account tools make outside any
    // package: the merged-usr links (pkg_preinst, USE=build), the account files
    // (pkg_postinst copies them where missing; useradd and groupadd keep backups).
    let mut owner_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut unowned = Vec::new();
    for line in sec.get("dev-files").lines() {
        let (owner, path) = line.split_once(' ').unwrap();
        if owner == "-" {
            unowned.push(path);
        } else {
            owner_of.insert(path, owner);
        }
    }
    let made_outside_packages = [
        "/bin",
        "/sbin",
        "/lib",
        "/lib64",
        "/usr/sbin",
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/passwd-",
        "/etc/group-",
        "/etc/shadow-",
    ];
    let generated = [
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/profile.env",
        "/etc/csh.env",
        "/etc/environment.d/10-gentoo-env.conf",
        "/var/lib/portage/world",
    ];
    let state_dirs = [
        "/etc/portage/",
        "/var/db/pkg/",
        "/var/cache/",
        "/var/lib/portage/",
        "/var/log/",
    ];
    let stray: Vec<_> = unowned
        .iter()
        .filter(|p| {
            !made_outside_packages.contains(p)
                && !generated.contains(p)
                && !state_dirs.iter().any(|d| p.starts_with(d))
        })
        .collect();
    assert!(stray.is_empty(), "files of no package: {stray:?}");
    eprintln!(
        "[fixture_repo] dev root: {} files and symlinks, unowned outside the state dirs: {:?}",
        owner_of.len() + unowned.len(),
        unowned
            .iter()
            .filter(|p| !state_dirs.iter().any(|d| p.starts_with(d)))
            .collect::<Vec<_>>()
    );
    for link in &made_outside_packages[..5] {
        assert!(unowned.contains(link), "{link} belongs to a package");
    }
    for (path, package) in [
        ("/usr/bin/hello", "app-misc/hello-1.0"),
        ("/usr/lib/libdemo.so.1.0.0", "sys-libs/libdemo-1.0"),
        ("/usr/include/demo.h", "sys-libs/libdemo-1.0"),
        ("/usr/lib/libdemo.a", "sys-libs/libdemo-1.0"),
        ("/usr/lib/libdemo.la", "sys-libs/libdemo-1.0"),
        ("/usr/share/man/man1/hello.1.bz2", "app-misc/hello-1.0"),
        ("/usr/share/doc/hello-1.0/README", "app-misc/hello-1.0"),
        ("/usr/bin/devtool", "dev-util/devtool-1.0"),
        ("/usr/bin/bash", "app-shells/bash-5.2.15"),
        ("/usr/bin/sh", "app-alternatives/sh-0"),
        ("/usr/bin/awk", "app-alternatives/awk-0"),
        ("/usr/share/baselayout/passwd", "sys-apps/baselayout-2.17"),
        (
            "/usr/lib/sysctl.d/00protected-links.conf",
            "sys-apps/baselayout-2.17",
        ),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", "sys-libs/glibc-2.36"),
        ("/usr/lib64/ld-linux-x86-64.so.2", "sys-libs/glibc-2.36"),
        ("/usr/bin/ldconfig", "sys-libs/glibc-2.36"),
        ("/usr/include/stdio.h", "sys-libs/glibc-2.36"),
        ("/usr/bin/useradd", "sys-apps/shadow-4.13"),
        ("/usr/bin/openrc", "sys-apps/openrc-0.54"),
        (
            "/usr/lib/rc/tmp/.keep_sys-apps_openrc-0",
            "sys-apps/openrc-0.54",
        ),
        (
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "sys-devel/gcc-12.2.0",
        ),
        (
            "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "sys-devel/gcc-12.2.0",
        ),
        ("/usr/bin/x86_64-pc-linux-gnu-g++", "sys-devel/gcc-12.2.0"),
        ("/usr/bin/ld", "sys-devel/binutils-2.40"),
        ("/usr/bin/make", "dev-build/make-4.3"),
        (
            "/usr/include/linux/version.h",
            "sys-kernel/linux-headers-6.1",
        ),
        (
            "/var/lib/portage/home/.keep_acct-user_portage-0",
            "acct-user/portage-0",
        ),
        ("/usr/bin/python3.11", "dev-lang/python-3.11.2"),
        ("/usr/bin/emerge", "sys-apps/portage-3.0.83"),
        ("/usr/share/anyof/a", "app-misc/anyof-a-1.0"),
        ("/usr/bin/slotted-1", "dev-libs/slotted-1.0"),
        ("/usr/bin/slotted-2", "dev-libs/slotted-2.0"),
    ] {
        assert_eq!(
            owner_of.get(path).copied(),
            Some(package),
            "owner of {path}"
        );
    }
    assert!(
        !owner_of.keys().any(|p| p.starts_with("/usr/share/anyof/b")),
        "the unchosen alternative is in the root"
    );

    assert_eq!(sec.get("dev-awk"), "1\n");
    assert_eq!(sec.get("dev-hello"), format!("{}\n", common::HELLO_LINE));
    let sh = sec.get("dev-sh");
    for want in [
        "hello 1.0 (devtool 1.0, libdemo 1.0)",
        "slotted 1.0 (slot 1)",
        "slotted 2.0 (slot 2)",
        "Portage 3.0.83 (python 3.11",
    ] {
        assert!(sh.contains(want), "{want} missing:\n{sh}");
    }
    assert_eq!(
        sec.get("dev-cxx"),
        "c++ in the root\n",
        "a C++ program compiled in the root"
    );
    assert!(
        sec.get("dev-cxxdemo-build")
            .contains(">>> Emerging (1 of 1) app-misc/cxxdemo-1.0"),
        "{}",
        sec.get("dev-cxxdemo-build")
    );
    assert_eq!(
        sec.get("dev-cxxdemo"),
        format!("{}\n", common::CXXDEMO_LINE)
    );
    assert_eq!(
        sec.get("dev-cxxdemo-dir"),
        "777:778 750\n",
        "/var/lib/cxxdemo"
    );
    assert!(
        sec.get("build-in-root")
            .contains(">>> Emerging (1 of 1) app-misc/extra-1.0"),
        "{}",
        sec.get("build-in-root")
    );
    assert!(
        sec.get("install-in-root")
            .contains(">>> Emerging binary (1 of 1) app-misc/extra-1.0"),
        "{}",
        sec.get("install-in-root")
    );
    assert_eq!(
        sec.get("extra"),
        format!("{}\n{}\n", common::EXTRA_LINE, common::HELLO_LINE)
    );
}

/// The rt root: the rt set's runtime closure without what INSTALL_MASK leaves out.
fn check_rt_root(sec: &Sections) {
    let root = "/tmp/rt";
    for section in ["rt-baselayout", "rt-merge", "rt-cxxdemo"] {
        let (into_root, into_stage) = merges(sec.get(section), root);
        assert!(
            into_stage.is_empty(),
            "{section}: merged into the stage's own /: {into_stage:?}"
        );
        assert!(
            !into_root.is_empty(),
            "{section}: nothing merged:\n{}",
            sec.get(section)
        );
    }
    let layout = layout(sec.get("rt-layout"));
    for (path, target) in MERGED_USR_LINKS {
        assert_eq!(
            layout[*path],
            format!("link {target}"),
            "/{path} of the rt root"
        );
    }
    assert_accounts(sec.get("rt-passwd"), common::ACCT_USERS, "rt /etc/passwd");
    assert_eq!(
        sec.get("rt-run"),
        format!("1\n{}\n{}\n", common::HELLO_LINE, common::CXXDEMO_LINE)
    );
    let packages: BTreeSet<&str> = sec.get("rt-packages").lines().collect();
    for absent in common::BUILD_ONLY_PACKAGES
        .iter()
        .chain(&["sys-kernel/linux-headers", "sys-devel/binutils"])
    {
        assert!(
            !packages.contains(absent),
            "{absent} is in rt: {packages:?}"
        );
    }
    for present in common::RT_PACKAGES
        .iter()
        .chain(&["acct-user/demo", "sys-libs/glibc"])
    {
        assert!(
            packages.contains(present),
            "{present} is not in rt: {packages:?}"
        );
    }
    assert_eq!(
        sec.get("rt-masked"),
        "/usr/include missing\n/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus missing\n\
         /usr/lib/x86_64-linux-gnu/libstdc++.so.6 present\n/usr/bin/useradd present\n",
        "rt after INSTALL_MASK"
    );
}

/// The split-usr profile: refused for the stage's own (merged-usr) /, works for a ROOT.
fn check_split_root(sec: &Sections) {
    let (_, into_stage) = merges(sec.get("split-build"), "");
    assert!(
        !into_stage.is_empty()
            && into_stage
                .iter()
                .all(|l| l.starts_with(">>> Emerging binary")),
        "{}",
        sec.get("split-build")
    );
    let refused = sec.get("split-stage");
    assert!(
        !refused.contains("rc=0")
            && refused.contains("23.0 split-usr profile, but the disk is merged-usr"),
        "{refused}"
    );
    // The merged-usr USE=build instance is no package for this profile; --usepkgonly would
    // take it unless told to respect USE.
    let loose = sec.get("split-pick-loose");
    assert!(
        loose.contains("sys-apps/baselayout-2.17-2::gentoo"),
        "{loose}"
    );
    let strict = sec.get("split-pick");
    assert!(
        !strict.contains("rc=0") && strict.contains("use flag configuration mismatch"),
        "{strict}"
    );
    let root = "/tmp/split";
    let built = sec.get("split-baselayout");
    assert!(
        built.contains(&format!(
            ">>> Emerging (1 of 1) sys-apps/baselayout-2.17::gentoo for {root}/"
        )),
        "{built}"
    );
    let (into_root, into_stage) = merges(sec.get("split-merge"), root);
    assert!(
        into_stage.is_empty(),
        "merged into the stage's own /: {into_stage:?}"
    );
    assert!(!into_root.is_empty(), "{}", sec.get("split-merge"));
    let layout = layout(sec.get("split-layout"));
    for (path, _) in MERGED_USR_LINKS {
        assert_eq!(layout[*path], "dir", "/{path} of the split-usr root");
    }
    let run = sec.get("split-run");
    let lines: Vec<&str> = run.lines().collect();
    assert!(
        lines.len() == 4
            && lines[0] == common::HELLO_LINE
            && lines[1].starts_with("Portage 3.0.83 (python 3.11")
            && lines[2..] == ["bash", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"],
        "hello, emerge, /bin/sh and the loader in the split-usr root:\n{run}"
    );
    assert!(
        sec.get("split-use")
            .split_whitespace()
            .any(|u| u == "split-usr"),
        "{}",
        sec.get("split-use")
    );
}

/// gentoo-mkimg's build as the driver does it (a second run: every binary package is
/// there), and what the tests look at in the roots, in `@@ NAME` sections.
const RECIPE_SH: &str = r#"set -eu
JOBS=@JOBS@
MASK='@MASK@'
RT='@RT@'
echo "@@ build"
FEATURES=buildpkg MAKEOPTS=-j$JOBS emerge --emptytree --usepkg --jobs=$JOBS --color=n @system @world 2>&1

# baselayout again with USE=build, as a binary package of its own, unless there is one.
echo "@@ build-instance-check-loose"
rc=0; USE=build emerge --pretend --usepkgonly --oneshot --nodeps --color=n sys-apps/baselayout 2>&1 || rc=$?
echo "rc=$rc"
echo "@@ build-instance-check"
rc=0; USE=build emerge --pretend --usepkgonly --binpkg-respect-use=y --oneshot --nodeps --color=n sys-apps/baselayout 2>&1 || rc=$?
echo "rc=$rc"
echo "@@ build-instance"
USE=build emerge --oneshot --nodeps --buildpkgonly --color=n sys-apps/baselayout 2>&1
echo "@@ instances"
ls /var/cache/binpkgs/sys-apps/baselayout | sort
echo "@@ picks"
for use in "" build; do
	for respect in "" --binpkg-respect-use=y; do
		printf 'USE=%s respect=%s: ' "$use" "$respect"
		USE=$use emerge --pretend --verbose --usepkgonly $respect --oneshot --nodeps --color=n \
			sys-apps/baselayout 2>/dev/null | grep 'sys-apps/baselayout-' || echo none
	done
done
echo "@@ pretend-again"
emerge --pretend --verbose --emptytree --usepkg --color=n @system @world 2>/dev/null

# The dev root: baselayout[build] first, then everything (build dependencies included,
# --root-deps) from binary packages; --with-bdeps=n: the build phase took binary packages,
# so the build-only ones (devtool) are not in / and must not be merged there now.
r=/tmp/dev
mkdir -p $r/etc $r/var/lib/portage
cp -a /etc/portage $r/etc/
cp /var/lib/portage/world $r/var/lib/portage/world
echo "@@ dev-baselayout"
ROOT=$r USE=build emerge --usepkgonly --binpkg-respect-use=y --oneshot --nodeps --color=n \
	sys-apps/baselayout 2>&1
echo "@@ dev-merge"
SECONDS=0
ROOT=$r emerge --usepkgonly --binpkg-respect-use=y --root-deps --with-bdeps=n --jobs=1 \
	--color=n @system @world 2>&1
echo "@@ dev-seconds"
echo $SECONDS
echo "@@ dev-layout"
@LAYOUT_SH@
echo "@@ dev-passwd"
cat $r/etc/passwd
echo "@@ dev-group"
cat $r/etc/group
echo "@@ dev-files"
python3 - $r <<'PY'
@OWNERS_PY@
PY
# What a container made from the root would have: /dev, /proc, the repository, the
# binary packages.
mount --rbind /dev $r/dev
mount -t proc proc $r/proc
mkdir -p $r/var/db/repos/gentoo $r/var/cache/binpkgs
mount --bind /var/db/repos/gentoo $r/var/db/repos/gentoo
mount --bind /var/cache/binpkgs $r/var/cache/binpkgs
echo "@@ dev-awk"
chroot $r /bin/sh -c 'awk "BEGIN{print 1}"'
echo "@@ dev-hello"
chroot $r /usr/bin/hello
echo "@@ dev-sh"
chroot $r /bin/sh -c 'hello --version; slotted-1; slotted-2; emerge --version 2>&1'
echo "@@ dev-cxx"
cat > $r/tmp/check.cpp <<'CPP'
#include <iostream>
#include <string>
int main() { std::string s = "c++ in"; s += " the root"; std::cout << s << std::endl; }
CPP
chroot $r /bin/sh -c 'cd /tmp && g++ -O2 -o check check.cpp && ./check && rm check check.cpp'
echo "@@ dev-cxxdemo-build"
chroot $r /usr/bin/env FEATURES=buildpkg emerge --oneshot --quiet-build=y --color=n \
	app-misc/cxxdemo 2>&1
echo "@@ dev-cxxdemo"
chroot $r cxxdemo
echo "@@ dev-cxxdemo-dir"
stat -c '%u:%g %a' $r/var/lib/cxxdemo
echo "@@ build-in-root"
chroot $r /usr/bin/env FEATURES=buildpkg emerge --buildpkgonly --quiet-build=y --oneshot \
	--color=n app-misc/extra 2>&1
echo "@@ install-in-root"
chroot $r emerge --usepkgonly --oneshot --color=n app-misc/extra 2>&1
echo "@@ extra"
chroot $r extra
# -l: /dev holds the session's device binds, which go only with their parent.
umount -l $r/dev
umount $r/proc $r/var/db/repos/gentoo $r/var/cache/binpkgs

# The rt root: baselayout[build] first, then the rt set's runtime closure; later, a C++
# program from its binary package.
r=/tmp/rt
mkdir -p $r/etc
cp -a /etc/portage $r/etc/
echo "@@ rt-baselayout"
ROOT=$r USE=build INSTALL_MASK="$MASK" emerge --usepkgonly --binpkg-respect-use=y --oneshot \
	--nodeps --color=n sys-apps/baselayout 2>&1
echo "@@ rt-merge"
ROOT=$r INSTALL_MASK="$MASK" emerge --usepkgonly --binpkg-respect-use=y --root-deps=rdeps \
	--with-bdeps=n --jobs=1 --color=n $RT 2>&1
echo "@@ rt-cxxdemo"
ROOT=$r INSTALL_MASK="$MASK" emerge --usepkgonly --binpkg-respect-use=y --root-deps=rdeps \
	--with-bdeps=n --oneshot --color=n app-misc/cxxdemo 2>&1
echo "@@ rt-layout"
@LAYOUT_SH@
echo "@@ rt-passwd"
cat $r/etc/passwd
echo "@@ rt-packages"
(cd $r/var/db/pkg && for p in */*; do echo "${p%%-[0-9]*}"; done)
echo "@@ rt-run"
chroot $r /bin/sh -c 'awk "BEGIN{print 1}"; hello; cxxdemo'
echo "@@ rt-masked"
for p in /usr/include /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus \
	/usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/bin/useradd; do
	if [ -e $r$p ]; then echo "$p present"; else echo "$p missing"; fi
done
echo "@@ sizes"
du -sm /tmp/dev /tmp/rt
echo "@@ end"
"#;

/// The split-usr profile on the stand-in (merged-usr) stage, from the binary packages of
/// the merged-usr profile: the build phase keeps the stage's profile, the roots get the
/// split-usr one.
const SPLIT_SH: &str = r#"set -eu
# The build phase with the stage's own profile: / gets every package of @system, among them
# what the roots' packages need in / (IDEPEND: shadow for the acct-* packages).
echo "@@ split-build"
emerge --emptytree --usepkg --color=n @system @world 2>&1
# The roots' profile: ROOT=... merges take their configuration from the stage's /etc/portage.
ln -sfn ../../var/db/repos/gentoo/profiles/@SPLIT@ /etc/portage/make.profile
# The stage's own / is merged-usr: the profile's profile.bashrc stops every package there.
echo "@@ split-stage"
rc=0; USE=build emerge --oneshot --nodeps --buildpkgonly --color=n sys-apps/baselayout 2>&1 || rc=$?
echo "rc=$rc"
r=/tmp/split
mkdir -p $r/etc
cp -a /etc/portage $r/etc/
echo "@@ split-pick-loose"
ROOT=$r USE=build emerge --pretend --verbose --usepkgonly --oneshot --nodeps --color=n \
	sys-apps/baselayout 2>&1 | grep 'sys-apps/baselayout-' || true
echo "@@ split-pick"
rc=0; ROOT=$r USE=build emerge --pretend --usepkgonly --binpkg-respect-use=y --oneshot --nodeps \
	--color=n sys-apps/baselayout 2>&1 || rc=$?
echo "rc=$rc"
# baselayout[build,split-usr] for this root (its /bin does not exist yet), then the rest.
echo "@@ split-baselayout"
ROOT=$r USE=build emerge --oneshot --nodeps --color=n sys-apps/baselayout 2>&1
echo "@@ split-merge"
ROOT=$r emerge --usepkgonly --binpkg-respect-use=y --root-deps=rdeps --with-bdeps=n --jobs=1 \
	--color=n app-alternatives/sh app-misc/hello virtual/package-manager 2>&1
echo "@@ split-layout"
@LAYOUT_SH@
echo "@@ split-run"
mount --rbind /dev $r/dev
mount -t proc proc $r/proc
chroot $r /bin/sh -c 'hello; emerge --version 2>/dev/null'
umount -l $r/dev
umount $r/proc
readlink $r/bin/sh $r/lib64/ld-linux-x86-64.so.2
echo "@@ split-use"
cat $r/var/db/pkg/sys-apps/baselayout-*/USE
echo "@@ end"
"#;

/// Prints "OWNER PATH" (OWNER: CAT/PF, or "-") for every file and symlink below the root
/// given as argv[1], from the root's /var/db/pkg/*/*/CONTENTS. CONTENTS has the paths a
/// package installed (/bin/bash, /sbin/ldconfig); the walk sees where they are (through
/// the merged-usr links: /usr/bin/bash, /usr/bin/ldconfig).
const OWNERS_PY: &str = r#"
import os, sys
root = sys.argv[1]
owner = {}
def canonical(path):
    parent, name = os.path.split(path)
    real = os.path.relpath(os.path.realpath(root + parent), root)
    return ("" if real == "." else "/" + real) + "/" + name
vdb = os.path.join(root, "var/db/pkg")
for cat in sorted(os.listdir(vdb)):
    for pf in sorted(os.listdir(os.path.join(vdb, cat))):
        with open(os.path.join(vdb, cat, pf, "CONTENTS"), encoding="utf-8") as f:
            for line in f:
                kind, rest = line.rstrip("\n").split(" ", 1)
                if kind == "obj":
                    path = rest.rsplit(" ", 2)[0]
                elif kind == "sym":
                    path = rest.split(" -> ", 1)[0]
                else:
                    continue
                owner[canonical(path)] = cat + "/" + pf
for d, dirs, files in os.walk(root):
    rel = "/" + os.path.relpath(d, root) if d != root else ""
    names = files + [x for x in dirs if os.path.islink(os.path.join(d, x))]
    for n in sorted(names):
        p = rel + "/" + n
        print(owner.get(p, "-"), p)
"#;
