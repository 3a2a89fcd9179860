//! The sandbox engine run by an ordinary user (issue #11, finding 4): the tool maps the
//! user's subordinate ids (`/etc/subuid`, `/etc/subgid`) with newuidmap/newgidmap, as rootless
//! Podman does, and builds the fixture images without root.
//!
//! The user is `gentoo-mkimg-test`, made by `scripts/setup-host` with 65536 subordinate ids.
//! Everything it uses is copied (or hard-linked) into a directory it owns: the fixtures live
//! under root's home, which it cannot read.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const USER: &str = "gentoo-mkimg-test";

struct User {
    uid: u32,
    gid: u32,
    /// The first of the user's subordinate uids and gids.
    sub_uid: u32,
    sub_gid: u32,
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, USER]).output().unwrap();
    assert!(
        out.status.success(),
        "no user {USER}: run scripts/setup-host (it makes the user and its /etc/subuid range)"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn sub_start(file: &str, uid: u32) -> u32 {
    let text = fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 3 && (f[0] == USER || f[0] == uid.to_string()))
                .then(|| f[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{file} has no range for {USER}: run scripts/setup-host"))
}

fn user() -> User {
    let (uid, gid) = (id("-u"), id("-g"));
    User {
        uid,
        gid,
        sub_uid: sub_start("/etc/subuid", uid),
        sub_gid: sub_start("/etc/subgid", uid),
    }
}

/// A directory owned by the user, with the fixture stage and the tool in it (the build tree
/// may be where the user cannot reach it, under /root say).
struct Home {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    stage: PathBuf,
    tool: PathBuf,
}

fn home(user: &User) -> Home {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    let stage = dir.join("stage3.tar");
    let fixture = common::stage().tar();
    if fs::hard_link(&fixture, &stage).is_err() {
        fs::copy(&fixture, &stage).unwrap();
    }
    let tool = dir.join("gentoo-mkimg");
    fs::copy(env!("CARGO_BIN_EXE_gentoo-mkimg"), &tool).unwrap();
    Home {
        _tmp: tmp,
        dir,
        stage,
        tool,
    }
}

/// The tool as the user, with its HOME (and so its cache) in `home`.
fn mkimg(user: &User, home: &Home) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--init-groups", "--"])
        .arg(&home.tool)
        .arg("--work-dir")
        .arg(home.dir.join("work"))
        .arg("--store")
        .arg(home.dir.join("images"))
        .env("HOME", &home.dir)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("SOURCE_DATE_EPOCH")
        .current_dir(&home.dir)
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_ordinary_user_runs_a_session_in_its_subordinate_ids() {
    let user = user();
    let home = home(&user);
    let out = mkimg(&user, &home)
        .arg("shell")
        .arg(&home.stage)
        .args(["--tag", "t1", "--no-verify", "--"])
        .args([
            "sh",
            "-c",
            "id -u; touch /var/cache/binpkgs/by-root /var/cache/binpkgs/by-portage; \
             chown portage:portage /var/cache/binpkgs/by-portage; \
             mknod /blockdev b 8 0 && echo MKNOD-WORKED; \
             touch /sys/kernel/probe || echo SYS-REFUSED; \
             unshare --net --pid --fork --mount --mount-proc true && echo NESTED-OK",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().next(), Some("0"), "{}", text(&out));
    assert!(!stdout.contains("MKNOD-WORKED"), "{}", text(&out));
    assert!(stdout.contains("SYS-REFUSED"), "{}", text(&out));
    // Portage's namespace sandboxes need this.
    assert!(stdout.contains("NESTED-OK"), "{}", text(&out));
    // Root inside is the user; the stage's portage user (250) is a subordinate id.
    let packages = home.dir.join("work/packages/t1");
    let by_root = fs::metadata(packages.join("by-root")).unwrap();
    assert_eq!((by_root.uid(), by_root.gid()), (user.uid, user.gid));
    let by_portage = fs::metadata(packages.join("by-portage")).unwrap();
    assert_eq!(
        (by_portage.uid(), by_portage.gid()),
        (user.sub_uid + 249, user.sub_gid + 249)
    );
    // The extracted stage is the user's, with the stage's owners shifted likewise: nothing
    // in it belongs to host root.
    let stages = home.dir.join(".cache/gentoo-mkimg/stages");
    let root_owned = Command::new("find")
        .arg(&stages)
        .args(["-uid", "0", "-print", "-quit"])
        .output()
        .unwrap();
    assert!(root_owned.status.success());
    assert_eq!(String::from_utf8_lossy(&root_owned.stdout), "");
}

/// `build --engine sandbox` as the user: the fixture images, with the stage's own owners in
/// their layers (no subordinate id leaks into an image).
#[test]
fn an_ordinary_user_builds_the_fixture_images() {
    let user = user();
    let home = home(&user);
    let snapshot = home.dir.join("gentoo-20260101.tar.xz");
    common::snapshot_tarball(&snapshot, "gentoo-20260101");
    std::os::unix::fs::chown(&snapshot, Some(user.uid), Some(user.gid)).unwrap();
    let out = mkimg(&user, &home)
        .arg("build")
        .arg(&home.stage)
        .arg(&snapshot)
        .args(["localhost", "rootless", "t1", "--engine", "sandbox"])
        .args(["--no-verify", "--compression", "none", "--rt-packages"])
        .arg(common::RT_PACKAGES.join(" "))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let store = home.dir.join("images");
    for name in ["localhost/rootless-dev:t1", "localhost/rootless-rt:t1"] {
        let entries = layer_entries(&store, name);
        assert!(
            entries.iter().any(|(path, _, _)| path == "etc/passwd"),
            "{name} has no /etc/passwd"
        );
        let strangers: Vec<_> = entries
            .iter()
            .filter(|(_, uid, gid)| *uid >= 65536 || *gid >= 65536)
            .collect();
        assert!(
            strangers.is_empty(),
            "{name}: entries owned by host ids: {:?}",
            &strangers[..strangers.len().min(5)]
        );
        let passwd = entries
            .iter()
            .find(|(path, _, _)| path == "etc/passwd")
            .unwrap();
        assert_eq!((passwd.1, passwd.2), (0, 0), "{name}: /etc/passwd's owner");
    }
    // The build's files are the user's: the tool can be run again on them, and the user
    // can read its images.
    let index = fs::metadata(store.join("index.json")).unwrap();
    assert_eq!(index.uid(), user.uid);
}

/// (path, uid, gid) of every entry of `name`'s single layer in the OCI store at `store`.
fn layer_entries(store: &Path, name: &str) -> Vec<(String, u64, u64)> {
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    };
    let blob = |digest: &str| {
        store
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = json(store.join("index.json"));
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the store"));
    let manifest = json(blob(manifest["digest"].as_str().unwrap()));
    let layers = manifest["layers"].as_array().unwrap();
    let mut entries = Vec::new();
    for layer in layers {
        let out = Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(blob(layer["digest"].as_str().unwrap()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // drwxr-xr-x 0/0 0 2026-01-01 00:00 ./etc/
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (uid, gid) = fields[1].split_once('/').unwrap();
            let path = fields[5].trim_start_matches("./").trim_end_matches('/');
            let path = path.to_string();
            entries.push((path, uid.parse().unwrap(), gid.parse().unwrap()));
        }
    }
    entries
}
