//! Shared helpers for the integration tests (`mod common;` in each `tests/*.rs`).
//!
//! Fixtures are built by scripts under `tests/fixtures/` and cached outside the
//! work tree (see each script's header); the helpers here run a script once per
//! test process and hand back the paths it produced.
#![allow(dead_code)] // not every test file uses every helper

pub mod engine;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The tool run as an ordinary user: uid and gid 65534, no supplementary groups.
pub fn mkimg_as_nobody() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_gentoo-mkimg"));
    cmd
}

/// `tests/fixtures` in the source tree.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Runs a fixture build script with bash and returns the single path it prints on
/// stdout. Panics with the script's stderr if it fails.
pub fn run_fixture_script(script: &Path) -> PathBuf {
    let out = Command::new("bash")
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "fixture script {} failed ({}):\n{stderr}",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("{} printed a non-UTF-8 path: {e}", script.display()));
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    let (Some(dir), None) = (lines.next(), lines.next()) else {
        panic!(
            "fixture script {} must print exactly one path, printed {stdout:?}\nstderr:\n{stderr}",
            script.display()
        );
    };
    let dir = PathBuf::from(dir.trim());
    assert!(
        dir.is_absolute() && dir.is_dir(),
        "fixture script {} printed {}, which is not an absolute directory",
        script.display(),
        dir.display()
    );
    dir
}

/// The stand-in Gentoo stage3 built by `tests/fixtures/stage/build-stage.sh`:
/// a Debian rootfs with Portage (from PyPI) in a venv plus hand-made fidelity
/// entries under `./opt/fidelity/`, packed as a tar and four compressed copies.
#[derive(Debug, Clone)]
pub struct Stage {
    pub dir: PathBuf,
}

impl Stage {
    /// Uncompressed `stage.tar` (pax format, with xattrs, numeric owners).
    pub fn tar(&self) -> PathBuf {
        self.dir.join("stage.tar")
    }
    /// `stage.tar.xz`, multi-block (compressed with `xz -T0 --block-size=...`).
    pub fn xz(&self) -> PathBuf {
        self.dir.join("stage.tar.xz")
    }
    pub fn bz2(&self) -> PathBuf {
        self.dir.join("stage.tar.bz2")
    }
    pub fn gz(&self) -> PathBuf {
        self.dir.join("stage.tar.gz")
    }
    pub fn zst(&self) -> PathBuf {
        self.dir.join("stage.tar.zst")
    }
    /// All five archives: `[tar, xz, bz2, gz, zst]`.
    pub fn archives(&self) -> [PathBuf; 5] {
        [self.tar(), self.xz(), self.bz2(), self.gz(), self.zst()]
    }
    pub fn fidelity_list(&self) -> PathBuf {
        self.dir.join("fidelity.list")
    }
    /// Raw bytes of each fidelity path exactly as stored in the archive
    /// (`./opt/fidelity/...`, directories with a trailing `/`), decoded from
    /// `fidelity.list`.
    pub fn fidelity_paths(&self) -> Vec<Vec<u8>> {
        let list = self.fidelity_list();
        let text =
            std::fs::read(&list).unwrap_or_else(|e| panic!("cannot read {}: {e}", list.display()));
        parse_fidelity_list(&text).unwrap_or_else(|e| panic!("malformed {}: {e}", list.display()))
    }
}

/// The stand-in stage3, built (or found in the cache) once per test process.
pub fn stage() -> Stage {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| run_fixture_script(&fixtures_dir().join("stage").join("build-stage.sh")));
    Stage { dir: dir.clone() }
}

/// The stand-in stage3 with a split /usr (real /bin, /sbin, /lib, /lib64, /usr/sbin; make.profile
/// -> [`SPLIT_USR_PROFILE`]), derived from [`stage`] by
/// `tests/fixtures/split-stage/build-split-stage.sh`: its `stage.tar`.
pub fn split_usr_stage() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        run_fixture_script(
            &fixtures_dir()
                .join("split-stage")
                .join("build-split-stage.sh"),
        )
    })
    .join("stage.tar")
}

/// The stand-in stage3 for arm64 (`tests/fixtures/arm64-stage/build-arm64-stage.sh`: the
/// stand-in stage's recipe with mmdebstrap --arch=arm64, make.profile ->
/// `default/linux/arm64/23.0`, CHOST aarch64-unknown-linux-gnu, @world app-misc/hello): its
/// `stage.tar`. Its programs run through binfmt_misc and qemu-user-static.
pub fn arm64_stage() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        run_fixture_script(
            &fixtures_dir()
                .join("arm64-stage")
                .join("build-arm64-stage.sh"),
        )
    })
    .join("stage.tar")
}

/// The test ebuild repository `tests/fixtures/repo`: a plain directory that stands in for
/// ::gentoo (`profiles/repo_name` is `gentoo`); pass it as the snapshot. With the stand-in
/// stage it is a small real system: see `tests/fixture_repo.rs` and the repository's
/// `profiles/` (the profile [`REPO_PROFILE`], its @system) and `eclass/stage-files.eclass`.
pub fn repo() -> PathBuf {
    fixtures_dir().join("repo")
}

/// The test repository packed as Gentoo packs snapshots: `out` (a `.tar.xz`) holding one
/// top-level directory `top` (e.g. `gentoo-20260101`).
pub fn snapshot_tarball(out: &Path, top: &str) {
    let staging = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo())
        .arg(staging.path().join(top))
        .status()
        .unwrap();
    assert!(status.success(), "cp of the test repository failed");
    let status = Command::new("tar")
        .arg("-cJf")
        .arg(out)
        .arg("-C")
        .arg(staging.path())
        .arg(top)
        .status()
        .unwrap();
    assert!(status.success(), "tar of the test repository failed");
}

/// The test repository as a squashfs image (what `snapshots/squashfs/` holds), made by
/// squashfs-tools.
pub fn snapshot_squashfs(out: &Path) {
    let status = Command::new("mksquashfs")
        .arg(repo())
        .arg(out)
        .args(["-comp", "xz", "-noappend", "-quiet", "-no-progress"])
        .status()
        .unwrap();
    assert!(status.success(), "mksquashfs failed");
}

/// The test repository's profile; the stand-in stage's `/etc/portage/make.profile` is a
/// symlink to `../../var/db/repos/gentoo/profiles/` + this, and `emerge --info` names it.
/// Like ::gentoo's `default/linux/amd64/23.0`: merged-usr (bin, sbin -> usr/bin, usr/sbin
/// -> bin, lib -> usr/lib, lib64 -> usr/lib64, made by sys-apps/baselayout[build]).
pub const REPO_PROFILE: &str = "default/linux/amd64/23.0";

/// The split-usr profile of the test repository (USE=split-usr forced): real /bin, /sbin,
/// /lib, /lib64 and /usr/sbin. Its releases/23.0 profile.bashrc, like ::gentoo's, stops
/// every package in pkg_setup whose ROOT's /bin does not match the profile: on the
/// stand-in stage (merged-usr, like a real stage3) only ROOTs other than / can use it.
pub const SPLIT_USR_PROFILE: &str = "default/linux/amd64/23.0/split-usr";

/// The line `hello` (app-misc/hello, the text comes from sys-libs/libdemo) prints.
pub const HELLO_LINE: &str = "Hello from gentoo-mkimg";

/// The first line `extra` (app-misc/extra) prints; it then runs `hello`.
pub const EXTRA_LINE: &str = "Extra from gentoo-mkimg";

/// The line `cxxdemo` (app-misc/cxxdemo, a C++ program: needs libstdc++.so.6 from
/// sys-devel/gcc) prints.
pub const CXXDEMO_LINE: &str = "C++ demo from gentoo-mkimg";

/// The accounts of the test repository's acct-* packages: (name, uid or gid). The users'
/// primary groups are the groups of the same name.
pub const ACCT_USERS: &[(&str, u32)] = &[("portage", 250), ("demo", 777)];
pub const ACCT_GROUPS: &[(&str, u32)] = &[("portage", 250), ("demo", 778)];

/// The stand-in stage's @world (`/var/lib/portage/world`).
pub const WORLD_PACKAGES: &[&str] = &["app-misc/hello", "app-misc/depdemo"];

/// Every package `emerge --emptytree @system @world` builds on the stand-in stage with the
/// test repository (so: one binary package each, two for dev-libs/slotted; baselayout gets
/// a second one when built again with USE=build), as `cat/pn`. A dev root made with
/// `ROOT=... emerge -K --root-deps @system @world` has all of these, with headers and docs
/// ([`BUILD_ONLY_PACKAGES`] too: --root-deps puts build dependencies into ROOT).
pub const BUILT_PACKAGES: &[&str] = &[
    "acct-group/demo",
    "acct-group/portage",
    "acct-user/demo",
    "acct-user/portage",
    "app-alternatives/awk",
    "app-alternatives/sh",
    "app-arch/bzip2",
    "app-arch/gzip",
    "app-arch/lz4",
    "app-arch/tar",
    "app-arch/xz-utils",
    "app-arch/zstd",
    "app-misc/anyof-a",
    "app-misc/depdemo",
    "app-misc/hello",
    "app-misc/pax-utils",
    "app-shells/bash",
    "dev-build/make",
    "dev-lang/python",
    "dev-lang/python-exec",
    "dev-libs/expat",
    "dev-libs/gmp",
    "dev-libs/isl",
    "dev-libs/jansson",
    "dev-libs/libffi",
    "dev-libs/libpcre2",
    "dev-libs/mpc",
    "dev-libs/mpfr",
    "dev-libs/slotted",
    "dev-util/devtool",
    "sys-apps/acl",
    "sys-apps/attr",
    "sys-apps/baselayout",
    "sys-apps/coreutils",
    "sys-apps/findutils",
    "sys-apps/grep",
    "sys-apps/mawk",
    "sys-apps/openrc",
    "sys-apps/portage",
    "sys-apps/sed",
    "sys-apps/shadow",
    "sys-apps/util-linux",
    "sys-devel/binutils",
    "sys-devel/gcc",
    "sys-devel/patch",
    "sys-kernel/linux-headers",
    "sys-libs/glibc",
    "sys-libs/libcap-ng",
    "sys-libs/libdemo",
    "sys-libs/libselinux",
    "sys-libs/libsemanage",
    "sys-libs/libsepol",
    "sys-libs/libxcrypt",
    "sys-libs/ncurses",
    "sys-libs/pam",
    "sys-libs/zlib",
    "sys-process/audit",
    "virtual/libc",
    "virtual/package-manager",
    "virtual/service-manager",
];

/// Built for the build only (BDEPEND of app-misc/hello): in a dev root only because
/// `--root-deps` adds build dependencies to ROOT; never in an rt root.
pub const BUILD_ONLY_PACKAGES: &[&str] = &["dev-util/devtool"];

/// In the repository but never built by `emerge -e @system @world`: the second
/// alternative of depdemo's `|| ( )`, and the packages for dev/rt container tests
/// (app-misc/extra: a script; app-misc/cxxdemo: a C++ program, a header, a dir owned by
/// the acct user demo).
pub const UNBUILT_PACKAGES: &[&str] = &["app-misc/anyof-b", "app-misc/extra", "app-misc/cxxdemo"];

/// A runtime package set for the fixtures: the names of the tool's default rt set
/// (`config::DEFAULT_RT_PACKAGES`) that the test repository has (it has no iputils, rsync,
/// wget, file, gawk, kbd, less, procps, psmisc or which), plus hello. With their
/// runtime dependencies they give a root that runs /bin/sh (app-alternatives/sh), awk
/// (app-alternatives/awk), hello, C++ programs (libstdc++ from sys-devel/gcc), `useradd`
/// for acct-* packages (sys-apps/shadow), `mount` for Portage's pid-sandbox
/// (sys-apps/util-linux) and `emerge -K`.
pub const RT_PACKAGES: &[&str] = &[
    "sys-apps/baselayout",
    "app-alternatives/sh",
    "app-alternatives/awk",
    "app-arch/bzip2",
    "app-arch/gzip",
    "app-arch/tar",
    "app-arch/xz-utils",
    "app-shells/bash",
    "sys-apps/coreutils",
    "sys-apps/findutils",
    "sys-apps/grep",
    "sys-apps/openrc",
    "sys-apps/sed",
    "sys-apps/shadow",
    "sys-apps/util-linux",
    "sys-devel/gcc",
    "virtual/libc",
    "virtual/package-manager",
    "virtual/service-manager",
    "app-misc/hello",
];

/// The binary packages under a PKGDIR (`packages/TAG`) in Portage's default layout
/// (FEATURES=binpkg-multi-instance: `CAT/PN/PF-BUILDID.gpkg.tar` or `.xpak`), as
/// `cat/pn` -> file paths (sorted). Panics on other files that look like packages.
pub fn binpkgs(pkgdir: &Path) -> std::collections::BTreeMap<String, Vec<PathBuf>> {
    let mut found: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    let read = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    for cat in read(pkgdir).into_iter().filter(|p| p.is_dir()) {
        for pn in read(&cat) {
            if !pn.is_dir() {
                panic!("{}: not in the binpkg-multi-instance layout", pn.display());
            }
            for file in read(&pn) {
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                if name.ends_with(".gpkg.tar") || name.ends_with(".xpak") {
                    let key = format!(
                        "{}/{}",
                        cat.file_name().unwrap().to_string_lossy(),
                        pn.file_name().unwrap().to_string_lossy()
                    );
                    found.entry(key).or_default().push(file);
                }
            }
        }
    }
    found
}

/// Decodes `fidelity.list`: one path per line; `#` lines and empty lines are
/// skipped; `\xNN` (two hex digits) stands for the byte 0xNN; any other byte
/// stands for itself; a `\` not starting `\xNN` is an error.
pub fn parse_fidelity_list(text: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut paths = Vec::new();
    for (no, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        let mut path = Vec::with_capacity(line.len());
        let mut i = 0;
        while i < line.len() {
            if line[i] == b'\\' {
                let hex = line
                    .get(i + 1..i + 4)
                    .filter(|h| h[0] == b'x' && h[1..].iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(&h[1..]).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("line {}: bad escape", no + 1))?;
                path.push(hex);
                i += 4;
            } else {
                path.push(line[i]);
                i += 1;
            }
        }
        paths.push(path);
    }
    Ok(paths)
}
