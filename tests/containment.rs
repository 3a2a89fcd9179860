//! A hostile stage or build cannot reach host files through symlinks, and the extracted
//! stage is not readable by other users (issue #11, findings 1, 2, 3 and 8).
//!
//! The stages here are tiny tarballs made by each test: the host's static busybox as
//! `/bin/busybox` (and `/bin/sh`), plus the hostile entries. Each test has its own cache and
//! work dirs; the sandbox engine needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BUSYBOX: &str = "/bin/busybox";

struct Workspace {
    tmp: tempfile::TempDir,
    work: PathBuf,
    cache: PathBuf,
    store: PathBuf,
    repo: PathBuf,
}

/// A work dir, a cache dir, a store and a minimal ebuild repository.
fn workspace() -> Workspace {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let cache = tmp.path().join("cache");
    let store = tmp.path().join("store");
    let repo = tmp.path().join("repo");
    fs::create_dir_all(repo.join("profiles")).unwrap();
    fs::create_dir_all(&work).unwrap();
    fs::write(repo.join("profiles/repo_name"), "gentoo\n").unwrap();
    Workspace {
        tmp,
        work,
        cache,
        store,
        repo,
    }
}

fn mkimg(ws: &Workspace) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
    cmd.arg("--store")
        .arg(&ws.store)
        .arg("--work-dir")
        .arg(&ws.work)
        .arg("--cache-dir")
        .arg(&ws.cache)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null());
    cmd
}

fn shell(ws: &Workspace, stage: &Path, extra: &[&str], command: &[&str]) -> Output {
    mkimg(ws)
        .arg("shell")
        .arg(stage)
        .arg("--snapshot")
        .arg(&ws.repo)
        .args(["--tag", "t1", "--no-verify"])
        .args(extra)
        .arg("--")
        .args(command)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Builds a stage tarball entry by entry.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// An entry with a raw name (the tar crate will not write `./` for a symlink itself).
    fn raw(&mut self, mut h: tar::Header, name: &str, data: &[u8]) -> &mut Self {
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(Self::header(tar::EntryType::Directory, 0o755, 0), name, &[])
    }

    /// `name` and every directory above it.
    fn dirs(&mut self, name: &str) -> &mut Self {
        let mut so_far = String::new();
        for part in name.trim_matches('/').split('/') {
            so_far.push_str(part);
            so_far.push('/');
            self.dir(&so_far.clone());
        }
        self
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(
            Self::header(tar::EntryType::Regular, mode, data.len() as u64),
            name,
            data,
        )
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        h.set_link_name(target).unwrap();
        self.raw(h, name, &[])
    }

    /// `/bin/busybox` and `/bin/sh` (a link to it, unless `sh` is given), and a stand-in
    /// `/usr/bin/emerge` for `build`.
    fn busybox(&mut self, sh: Option<&str>) -> &mut Self {
        let busybox = fs::read(BUSYBOX)
            .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (these tests need a static busybox)"));
        self.dirs("bin").file("bin/busybox", 0o755, &busybox);
        match sh {
            Some(script) => self.file("bin/sh", 0o755, script.as_bytes()),
            None => self.symlink("bin/sh", "busybox"),
        };
        self.dirs("usr/bin")
            .file("usr/bin/emerge", 0o755, b"#!/bin/sh\nexit 1\n")
    }

    fn write(&mut self, path: &Path) {
        self.0.finish().unwrap();
        fs::write(path, self.0.get_ref()).unwrap();
    }
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A host directory holding one file, `canary`, that nothing may read or change.
fn host_dir_with_canary(content: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("canary"), content).unwrap();
    dir
}

/// Every file under `dir` whose bytes contain `needle` (blobs are uncompressed here).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if ft.is_file()
            && fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

/// Finding 1: a build that replaces its dev root with a link to a host directory must not
/// get that directory into the dev image. Roots leave a session only as tar written into
/// the pipes the tool made, so the hostile build tries what is left: to put a link to a host
/// file where its dev pipe is, and to hand back a dev root that is such a link. The pipes
/// are on a read-only mount and the tool reads the pipe it made, not the name: nothing of
/// the host reaches the store, and the build fails for want of a dev root.
#[test]
fn an_export_replaced_by_a_symlink_is_refused() {
    let ws = workspace();
    let secret = "host secret 6d1f2c";
    let host = host_dir_with_canary(secret);
    let canary = host.path().join("canary");
    let script = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /var/tmp/gentoo-mkimg/rt /var/log/gentoo-mkimg\n\
         echo '{{\"phases\":[],\"clamp\":1700000000,\"failed\":null}}' \
         > /var/log/gentoo-mkimg/result.json\n\
         /bin/busybox ln -s {host} /var/tmp/gentoo-mkimg/dev\n\
         /bin/busybox rm -f /var/tmp/gentoo-mkimg/export/dev 2> /var/log/gentoo-mkimg/rm.err\n\
         /bin/busybox ln -sf {canary} /var/tmp/gentoo-mkimg/export/dev\n\
         exit 0\n",
        host = host.path().display(),
        canary = canary.display(),
    );
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new().dir("./").busybox(Some(&script)).write(&stage);

    let out = mkimg(&ws)
        .arg("build")
        .arg(&stage)
        .arg(&ws.repo)
        .args(["localhost", "hostile", "t1", "--engine", "sandbox"])
        .args(["--no-check", "--no-verify", "--compression", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the build passed:\n{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not hand back the dev root"),
        "the failure does not say the dev root is missing:\n{}",
        text(&out)
    );
    let rm_err = fs::read_to_string(ws.work.join("logs/t1/rm.err")).unwrap_or_default();
    assert!(
        rm_err.contains("Read-only file system"),
        "the session could remove its pipe: {rm_err:?}"
    );
    assert_eq!(
        files_containing(&ws.store, secret.as_bytes()),
        Vec::<PathBuf>::new(),
        "the host file reached the store"
    );
    assert_eq!(listing(host.path()), ["canary"]);
}

/// The same stand-in build handing back a real dev root as tar (the control for the test
/// above): the export is taken, with its symlinks as symlinks.
#[test]
fn a_real_export_dir_becomes_the_dev_layer() {
    let ws = workspace();
    let script = "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /var/tmp/gentoo-mkimg/rt /var/tmp/gentoo-mkimg/dev/etc \
         /var/log/gentoo-mkimg\n\
         echo '{\"phases\":[],\"clamp\":1700000000,\"failed\":null}' \
         > /var/log/gentoo-mkimg/result.json\n\
         echo dev root $((40 + 2))x > /var/tmp/gentoo-mkimg/dev/etc/motd\n\
         /bin/busybox ln -s /root /var/tmp/gentoo-mkimg/dev/home\n\
         for r in dev rt; do\n\
         /bin/busybox tar -cf /var/tmp/gentoo-mkimg/export/$r -C /var/tmp/gentoo-mkimg/$r . \
         || exit 1\n\
         done\n\
         exit 0\n";
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new().dir("./").busybox(Some(script)).write(&stage);
    let out = mkimg(&ws)
        .arg("build")
        .arg(&stage)
        .arg(&ws.repo)
        .args(["localhost", "fine", "t1", "--engine", "sandbox"])
        .args(["--no-check", "--no-verify", "--compression", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let layers = files_containing(&ws.store.join("blobs"), b"dev root 42x");
    assert_eq!(layers.len(), 1, "{layers:?}");
    let bytes = fs::read(&layers[0]).unwrap();
    let mut names = Vec::new();
    for entry in tar::Archive::new(&bytes[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        names.push((
            String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
            link,
        ));
    }
    assert!(
        names.contains(&("home".to_string(), Some(b"/root".to_vec()))),
        "{names:?}"
    );
    assert!(names.iter().any(|(n, _)| n == "etc/motd"), "{names:?}");
}

/// Finding 2: the stage's `etc` and `var` are links to host directories; the resolv.conf
/// and the mount points the sandbox makes land inside the stage, not there.
#[test]
fn the_stages_symlinks_are_resolved_inside_the_stage() {
    let ws = workspace();
    let host_etc = host_dir_with_canary("etc canary");
    fs::write(
        host_etc.path().join("resolv.conf"),
        "nameserver 192.0.2.99\n",
    )
    .unwrap();
    let host_var = host_dir_with_canary("var canary");
    let etc = host_etc.path().to_str().unwrap();
    let var = host_var.path().to_str().unwrap();
    let stage = ws.tmp.path().join("stage.tar");
    // The links' targets also exist inside the stage, so the session can run there.
    Tar::new()
        .dir("./")
        .busybox(None)
        .symlink("etc", etc)
        .symlink("var", var)
        .dirs(etc.trim_start_matches('/'))
        .dirs(var.trim_start_matches('/'))
        .write(&stage);

    let out = shell(
        &ws,
        &stage,
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /etc/resolv.conf; echo made > /var/cache/binpkgs/inside; \
             /bin/busybox ls /var/cache",
        ],
    );
    // The host directories first: what the old code damaged.
    assert_eq!(
        fs::read_to_string(host_etc.path().join("resolv.conf")).unwrap(),
        "nameserver 192.0.2.99\n",
        "the host directory's resolv.conf was replaced"
    );
    assert_eq!(listing(host_etc.path()), ["canary", "resolv.conf"]);
    assert_eq!(
        listing(host_var.path()),
        ["canary"],
        "mount points were made in the host directory"
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(
        stdout.contains(host_resolv.trim()),
        "the session has no resolv.conf:\n{}",
        text(&out)
    );
    assert!(stdout.contains("binpkgs"), "{}", text(&out));
    // The bind mount worked: what the session wrote is in packages/TAG on the host.
    assert!(ws.work.join("packages/t1/inside").is_file());
}

/// Finding 2, when the link's target is not in the stage: the session does not start, and
/// the message names the path.
#[test]
fn a_stage_link_to_a_missing_dir_stops_the_session() {
    let ws = workspace();
    let host_var = host_dir_with_canary("var canary");
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new()
        .dir("./")
        .busybox(None)
        .symlink("var", host_var.path().to_str().unwrap())
        .write(&stage);
    let out = shell(&ws, &stage, &[], &["/bin/busybox", "true"]);
    assert_eq!(listing(host_var.path()), ["canary"], "{}", text(&out));
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/var") && stderr.contains("symlink to a missing directory"),
        "{}",
        text(&out)
    );
}

/// Finding 3: a stage whose `./` is a link to a host directory is refused before anything
/// is written there, and no session runs on it.
#[test]
fn a_stage_whose_root_is_a_symlink_is_refused() {
    let ws = workspace();
    let host = host_dir_with_canary("root canary");
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new()
        .symlink("./", host.path().to_str().unwrap())
        .busybox(None)
        .write(&stage);

    let out = shell(&ws, &stage, &[], &["/bin/busybox", "true"]);
    assert!(!out.status.success(), "the session ran:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("would replace the extraction root"),
        "{}",
        text(&out)
    );
    assert_eq!(
        listing(host.path()),
        ["canary"],
        "written into the host dir"
    );
    let stages = ws.cache.join("stages");
    for entry in fs::read_dir(&stages).unwrap().flatten() {
        let rootfs = entry.path().join("rootfs");
        assert!(
            !rootfs.exists() && fs::symlink_metadata(&rootfs).is_err(),
            "a cached stage was left: {}",
            rootfs.display()
        );
    }
}

/// Finding 3, import: a tarball whose root is a symlink does not become an image.
#[test]
fn import_refuses_a_root_that_is_a_symlink() {
    let ws = workspace();
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new()
        .symlink("./", "/root")
        .busybox(None)
        .write(&stage);
    let out = mkimg(&ws)
        .arg("import")
        .arg(&stage)
        .arg("localhost/hostile-raw:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("root (./) is not a directory") && stderr.contains("stage.tar"),
        "{}",
        text(&out)
    );
    let blobs = ws.store.join("blobs/sha256");
    assert!(
        !blobs.exists() || listing(&blobs).is_empty(),
        "blobs left: {:?}",
        listing(&blobs)
    );
}

/// Finding 8: the extracted stage and a session's files are root's only.
#[test]
fn the_extracted_stage_and_run_dirs_are_private() {
    let ws = workspace();
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new().dir("./").busybox(None).write(&stage);
    let out = shell(&ws, &stage, &["--keep"], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", text(&out));

    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let stages: Vec<PathBuf> = fs::read_dir(ws.cache.join("stages"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(stages.len(), 1, "{stages:?}");
    assert_eq!(mode(&stages[0]), 0o700, "{}", stages[0].display());
    let runs: Vec<PathBuf> = fs::read_dir(ws.cache.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(runs.len(), 1, "kept run dirs: {runs:?}");
    assert_eq!(mode(&runs[0]), 0o700, "{}", runs[0].display());

    // An ordinary user cannot reach the stage's files (the tempdir above is 0700 too, so
    // open up the path to the cache as a user-writable location would be).
    for dir in [ws.tmp.path(), &ws.cache, &ws.cache.join("stages")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let busybox = stages[0].join("rootfs/bin/busybox");
    assert!(busybox.is_file());
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BUSYBOX)
        .arg("stat")
        .arg(&busybox)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "uid 65534 can reach the stage:\n{}",
        text(&out)
    );
    let _ = fs::remove_dir_all(&runs[0]);
}

/// Finding 4: inside a session the stage's root is no root of the host. Its user namespace
/// maps 0 to an unprivileged range; it cannot make a block device or write /sys; it runs
/// with no_new_privs; what it writes into a bound host directory belongs to that range.
#[test]
fn the_sessions_root_is_no_root_of_the_host() {
    let ws = workspace();
    let stage = ws.tmp.path().join("stage.tar");
    Tar::new().dir("./").busybox(None).write(&stage);
    let out = shell(
        &ws,
        &stage,
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /proc/self/uid_map; \
             /bin/busybox grep NoNewPrivs /proc/self/status; \
             /bin/busybox mknod /blockdev b 8 0 && echo MKNOD-WORKED; \
             /bin/busybox touch /sys/kernel/probe 2>&1 || echo SYS-REFUSED; \
             /bin/busybox touch /var/cache/binpkgs/by-root; \
             /bin/busybox chown 250:250 /var/cache/binpkgs/by-root; \
             echo done",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("done"), "{}", text(&out));
    let map: Vec<u64> = stdout
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(map.len(), 3, "{}", text(&out));
    assert_eq!(map[0], 0, "{}", text(&out));
    assert_ne!(map[1], 0, "root inside is the host's root:\n{}", text(&out));
    assert_eq!(map[2], 65536, "{}", text(&out));
    assert!(stdout.contains("NoNewPrivs:\t1"), "{}", text(&out));
    assert!(!stdout.contains("MKNOD-WORKED"), "{}", text(&out));
    assert!(
        stdout.contains("Read-only file system") && stdout.contains("SYS-REFUSED"),
        "{}",
        text(&out)
    );
    // On the host, the file is owned by the range's id 250, not by root or the portage user.
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(ws.work.join("packages/t1/by-root")).unwrap();
    assert_eq!(u64::from(meta.uid()), map[1] + 250);
    assert_eq!(u64::from(meta.gid()), map[1] + 250);
}
