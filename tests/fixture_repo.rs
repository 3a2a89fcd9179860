//! The test ebuild repository (tests/fixtures/repo) on the stand-in stage, with the real
//! Portage, through `gentoo-mkimg shell` (sandbox engine):
//! - `emerge --info` shows the repository's profile;
//! - `emerge --emptytree --usepkg @system @world` with FEATURES=buildpkg compiles
//!   everything (a real shared library, a real ELF linked against it, a build-only tool)
//!   into gpkg binary packages; a second run would only take binary packages;
//! - `ROOT=/tmp/r emerge -eK @system @world` makes a root in which /bin/sh, hello and
//!   emerge run, Portage builds and installs a package, and every file belongs to a
//!   package.

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
fn emerge_info_shows_the_repository_profile() {
    let ws = workspace();
    let out = ws.session_ok(&[], &["emerge", "--info"]);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Portage 3.0.83 (") && first.contains(common::REPO_PROFILE),
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

    // The profile resolves every package of @system and @world, from this repository.
    let out = ws.session_ok(
        &[],
        &[
            "emerge",
            "--pretend",
            "--emptytree",
            "--nodeps",
            "@system",
            "@world",
        ],
    );
    for package in [
        "sys-apps/baselayout",
        "virtual/libc",
        "virtual/package-manager",
        "app-misc/hello",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("[ebuild") && l.contains(package)),
            "{package} is not in @system/@world:\n{out}"
        );
    }
}

#[test]
fn repository_builds_packages_and_a_usable_root() {
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

    // hello: a real ELF that needs libdemo.so.1, built with devtool, docs under USE=doc.
    let hello = &found["app-misc/hello"][0];
    let meta = gpkg_inner(hello, "metadata");
    let text = |key: &str| {
        String::from_utf8_lossy(&meta[&format!("metadata/{key}")].1)
            .trim()
            .to_string()
    };
    assert!(
        text("NEEDED.ELF.2").contains("/usr/bin/hello;;;libdemo.so.1,libc.so.6;"),
        "{}",
        text("NEEDED.ELF.2")
    );
    assert_eq!(text("BDEPEND"), "dev-util/devtool");
    assert!(
        text("USE").split_whitespace().any(|u| u == "doc"),
        "{}",
        text("USE")
    );
    assert_eq!(text("CHOST"), "x86_64-pc-linux-gnu");
    let image = gpkg_inner(hello, "image");
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
    let libdemo = &found["sys-libs/libdemo"][0];
    let meta = gpkg_inner(libdemo, "metadata");
    let provides = String::from_utf8_lossy(&meta["metadata/PROVIDES"].1).into_owned();
    assert!(provides.contains("libdemo.so.1"), "{provides}");
    let image = gpkg_inner(libdemo, "image");
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

    // 2. A root from the binary packages: it runs /bin/sh, hello and emerge, Portage in it
    //    builds and installs a package, and every file in it belongs to a package.
    let script = format!(
        r#"set -eu
r=/tmp/r
mkdir -p $r/var/lib/portage
cp /var/lib/portage/world $r/var/lib/portage/world   # @world of ROOT is ROOT's world file
SECONDS=0
ROOT=$r emerge --emptytree --usepkgonly --quiet --jobs={jobs} @system @world
echo "@@ emerge-K-seconds"
echo $SECONDS
echo "@@ files"
python3 - $r <<'PY'
{OWNERS_PY}
PY
# What a container made from the root would have: /dev, /proc, the repository, the
# binary packages and /etc/portage (the tool copies it into dev roots).
mount --rbind /dev $r/dev
mount -t proc proc $r/proc
mkdir -p $r/var/db/repos/gentoo $r/var/cache/binpkgs
mount --bind /var/db/repos/gentoo $r/var/db/repos/gentoo
mount --bind /var/cache/binpkgs $r/var/cache/binpkgs
cp -a /etc/portage/. $r/etc/portage/
echo "@@ hello"
chroot $r /usr/bin/hello
echo "@@ sh"
chroot $r /bin/sh -c 'hello --version; slotted-1; slotted-2; emerge --version 2>&1'
echo "@@ build-in-root"
chroot $r /usr/bin/env FEATURES=buildpkg emerge --buildpkgonly --quiet-build=y --oneshot app-misc/extra 2>&1
echo "@@ install-in-root"
chroot $r emerge --usepkgonly --oneshot app-misc/extra 2>&1
echo "@@ extra"
chroot $r extra
echo "@@ end"
"#,
        OWNERS_PY = OWNERS_PY
    );
    let out = ws.session_ok(&[], &["bash", "-c", &script]);
    let sec = sections(&out);
    let get = |name: &str| {
        sec.get(name)
            .unwrap_or_else(|| panic!("no section {name} in:\n{}", tail(&out, 60)))
            .as_str()
    };
    assert_eq!(get("hello"), format!("{}\n", common::HELLO_LINE));
    let sh = get("sh");
    for want in [
        "hello 1.0 (devtool 1.0, libdemo 1.0)",
        "slotted 1.0 (slot 1)",
        "slotted 2.0 (slot 2)",
        "Portage 3.0.83 (python 3.11",
    ] {
        assert!(sh.contains(want), "{want} missing:\n{sh}");
    }
    assert!(
        get("build-in-root").contains(">>> Emerging (1 of 1) app-misc/extra-1.0"),
        "{}",
        get("build-in-root")
    );
    assert!(
        get("install-in-root").contains(">>> Emerging binary (1 of 1) app-misc/extra-1.0"),
        "{}",
        get("install-in-root")
    );
    assert_eq!(
        get("extra"),
        format!("{}\n{}\n", common::EXTRA_LINE, common::HELLO_LINE)
    );
    let extra = common::binpkgs(&ws.pkgdir());
    assert_eq!(
        extra["app-misc/extra"].len(),
        1,
        "built in the root: {extra:?}"
    );

    // Every file of the root comes from a package, except the state Portage keeps.
    let mut owner_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut unowned = Vec::new();
    for line in get("files").lines() {
        let (owner, path) = line.split_once(' ').unwrap();
        if owner == "-" {
            unowned.push(path);
        } else {
            owner_of.insert(path, owner);
        }
    }
    let generated = [
        "/etc/ld.so.cache",
        "/etc/profile.env",
        "/etc/csh.env",
        "/etc/environment.d/10-gentoo-env.conf",
        "/var/lib/portage/world",
    ];
    let state_dirs = [
        "/var/db/pkg/",
        "/var/cache/",
        "/var/lib/portage/",
        "/var/log/",
    ];
    let stray: Vec<_> = unowned
        .iter()
        .filter(|p| !generated.contains(p) && !state_dirs.iter().any(|d| p.starts_with(d)))
        .collect();
    assert!(stray.is_empty(), "files of no package: {stray:?}");
    for (path, package) in [
        ("/usr/bin/hello", "app-misc/hello-1.0"),
        ("/usr/lib/libdemo.so.1.0.0", "sys-libs/libdemo-1.0"),
        ("/usr/include/demo.h", "sys-libs/libdemo-1.0"),
        ("/usr/lib/libdemo.a", "sys-libs/libdemo-1.0"),
        ("/usr/lib/libdemo.la", "sys-libs/libdemo-1.0"),
        ("/usr/share/man/man1/hello.1.bz2", "app-misc/hello-1.0"),
        ("/usr/share/doc/hello-1.0/README", "app-misc/hello-1.0"),
        ("/usr/bin/bash", "app-shells/bash-5.2.15"),
        ("/usr/bin/sh", "app-shells/bash-5.2.15"),
        ("/bin", "sys-apps/baselayout-2.17"),
        ("/etc/passwd", "sys-apps/baselayout-2.17"),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", "sys-libs/glibc-2.36"),
        ("/usr/lib64/ld-linux-x86-64.so.2", "sys-libs/glibc-2.36"),
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
        !owner_of
            .keys()
            .any(|p| p.contains("devtool") || p.starts_with("/usr/share/anyof/b")),
        "a build-only or unchosen package is in the root"
    );
    eprintln!(
        "[fixture_repo] emerge -e: {:.0}s; emerge -eK: {}s; {} files in the root",
        emerge_e.as_secs_f64(),
        get("emerge-K-seconds").trim(),
        owner_of.len() + unowned.len()
    );

    // 3. A second emerge takes only binary packages.
    let out = ws.session_ok(
        &["FEATURES=buildpkg"],
        &[
            "emerge",
            "--pretend",
            "--emptytree",
            "--usepkg",
            "@system",
            "@world",
        ],
    );
    let merges: Vec<&str> = out.lines().filter(|l| l.starts_with('[')).collect();
    assert!(
        merges.len() >= common::BUILT_PACKAGES.len() - common::BUILD_ONLY_PACKAGES.len(),
        "{out}"
    );
    assert!(
        merges.iter().all(|l| l.starts_with("[binary")),
        "not all binary:\n{out}"
    );
}

/// Prints "OWNER PATH" (OWNER: CAT/PF, or "-") for every file and symlink below the root
/// given as argv[1], from the root's /var/db/pkg/*/*/CONTENTS.
const OWNERS_PY: &str = r#"
import os, sys
root = sys.argv[1]
owner = {}
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
                owner[path] = cat + "/" + pf
for d, dirs, files in os.walk(root):
    rel = "/" + os.path.relpath(d, root) if d != root else ""
    names = files + [x for x in dirs if os.path.islink(os.path.join(d, x))]
    for n in sorted(names):
        p = rel + "/" + n
        print(owner.get(p, "-"), p)
"#;
