//! `gentoo-mkimg shell` with the sandbox engine on the stand-in stage: mounts, isolation,
//! exit status, and nothing left behind after normal exit, failure or SIGTERM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Workspace {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    cache: PathBuf,
    repo: PathBuf,
}

/// A work dir, a cache dir and a minimal ebuild repository.
fn workspace() -> Workspace {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let cache = tmp.path().join("cache");
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("profiles")).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(repo.join("profiles/repo_name"), "gentoo\n").unwrap();
    Workspace {
        _tmp: tmp,
        work,
        cache,
        repo,
    }
}

fn shell(ws: &Workspace, stage: &Path, extra: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
    cmd.arg("--work-dir")
        .arg(&ws.work)
        .arg("--cache-dir")
        .arg(&ws.cache)
        .arg("shell")
        .arg(stage)
        .arg("--snapshot")
        .arg(&ws.repo)
        .args(["--tag", "t1"])
        .args(extra)
        .arg("--")
        .args(command)
        .stdin(Stdio::null());
    cmd
}

/// The engine is shared by the tests of this file, which run in parallel: a test that checks
/// that no session container is left holds this while it uses the engine.
fn engine_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(ws: &Workspace, stage: &Path, command: &[&str]) -> Output {
    shell(ws, stage, &[], command).output().unwrap()
}

/// Lines of the host's mountinfo that mention `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(marker) && !text.contains("gentoo-mkimg") {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn assert_nothing_left(ws: &Workspace, marker: &str) {
    assert_eq!(
        mounts_under(&ws.cache),
        Vec::<String>::new(),
        "mounts left on the host"
    );
    assert_eq!(
        processes_with(marker),
        Vec::<String>::new(),
        "processes left"
    );
    let runs: Vec<_> = std::fs::read_dir(ws.cache.join("runs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(runs.is_empty(), "run dirs left: {runs:?}");
}

#[test]
fn sandbox_isolates_the_session_and_keeps_binary_packages() {
    let stage = common::stage();
    let ws = workspace();
    let script = "echo pkg > /var/cache/binpkgs/made-inside; \
                  echo x > /root-scribble; \
                  if touch /var/db/repos/gentoo/nope 2>/dev/null; then echo WRITABLE; fi; \
                  cat /var/db/repos/gentoo/profiles/repo_name; \
                  hostname; test -c /dev/null && test -d /proc/self && echo devproc; \
                  env | sort | tr '\\n' ' '";
    let out = run(&ws, &stage.xz(), &["/bin/sh", "-c", script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "shell failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("WRITABLE"),
        "the snapshot was writable: {stdout}"
    );
    assert!(
        stdout.contains("gentoo\n"),
        "snapshot not mounted: {stdout}"
    );
    assert!(stdout.contains("devproc"), "no /dev or /proc: {stdout}");
    assert!(
        stdout.contains("gentoo-mkimg-t1"),
        "hostname not set: {stdout}"
    );
    // A clean environment: only what the tool sets.
    for var in ["HOME=/root", "PATH=/usr/local/sbin:", "LANG="] {
        assert!(stdout.contains(var), "{var} missing: {stdout}");
    }
    assert!(
        !stdout.contains("CARGO"),
        "host environment leaked: {stdout}"
    );

    let pkg = ws.work.join("packages/t1/made-inside");
    assert_eq!(std::fs::read_to_string(&pkg).unwrap(), "pkg\n");
    // The write to / is gone, and never reached the cached stage.
    let stages: Vec<PathBuf> = std::fs::read_dir(ws.cache.join("stages"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("rootfs").is_dir())
        .collect();
    assert_eq!(stages.len(), 1, "{stages:?}");
    assert!(!stages[0].join("rootfs/root-scribble").exists());
    assert!(!Path::new("/root-scribble").exists());
    assert!(stages[0].join("rootfs/usr/bin/emerge").exists());
    assert_nothing_left(&ws, "root-scribble");

    // A second session sees a fresh root.
    let out = run(
        &ws,
        &stage.xz(),
        &["/bin/sh", "-c", "test ! -e /root-scribble"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exit_status_is_the_commands_and_failures_leave_nothing() {
    let stage = common::stage();
    let ws = workspace();
    let out = run(
        &ws,
        &stage.xz(),
        &["sh", "-c", "sleep 0.1; exit 3 # status-marker"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&ws, "status-marker");

    let out = run(&ws, &stage.xz(), &["/no/such/program"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/program"), "{stderr}");
    assert_nothing_left(&ws, "/no/such/program");
}

/// A shell on a TAG whose work dirs a build holds waits for it, saying for whom, touching
/// nothing of the TAG, and runs once the build is done.
#[test]
fn a_shell_waits_for_the_build_of_its_tag() {
    let stage = common::stage();
    let ws = workspace();
    let held = gentoo_mkimg::build::lock::lock_tag(&ws.work, "t1", "build").unwrap();
    let mut child = shell(&ws, &stage.xz(), &[], &["sh", "-c", "echo @@ ran"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the shell did not wait"
    );
    assert!(
        !ws.work.join("packages/t1").exists(),
        "the waiting shell made packages/t1"
    );
    drop(held);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("@@ ran"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "waiting for build (pid {}) to finish with TAG t1",
            std::process::id()
        )),
        "{stderr}"
    );
}

/// The command starts with no signal ignored: `yes | head` ends `yes` by SIGPIPE, as on any
/// shell, instead of making it report write errors (the tool itself ignores SIGPIPE).
#[test]
fn commands_start_with_default_signal_handling() {
    let stage = common::stage();
    let ws = workspace();
    let script = "grep '^SigIgn:' /proc/self/status; \
                  (yes; echo \"yes ended with $?\" >&2) | head -n 1 >/dev/null";
    let out = run(&ws, &stage.xz(), &["sh", "-c", script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ignored = stdout
        .trim()
        .strip_prefix("SigIgn:")
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SigIgn line: {stdout}"));
    // Signals 32 and 33 (bits 31 and 32) belong to the C library, which keeps them from us.
    assert_eq!(ignored & !(0b11 << 31), 0, "ignored signals: {ignored:#x}");
    assert!(stderr.contains("yes ended with 141"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

#[test]
fn sigterm_from_outside_leaves_no_mount_and_no_process() {
    let stage = common::stage();
    let ws = workspace();
    // Warm the stage cache so the session starts at once.
    let out = run(&ws, &stage.xz(), &["true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let marker = "4242.5";
    let mut child = shell(
        &ws,
        &stage.xz(),
        &[],
        &["sh", "-c", &format!("sleep {marker}; sleep {marker}")],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "the session never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Mounts are made in the session's own mount namespace: none shows on the host even now.
    assert_eq!(mounts_under(&ws.cache), Vec::<String>::new());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "a killed session must not report success"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gentoo-mkimg did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The kernel tears the namespace down as its last process goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_nothing_left(&ws, marker);
}

/// An ordinary user without subordinate ids (uid 65534 has none) cannot have the 65536 ids
/// a stage needs: one line naming /etc/subuid and the docker engine, before the stage is read.
#[test]
fn users_without_subordinate_ids_get_one_line_pointing_at_the_docker_engine() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let stage = tmp.path().join("stage3.tar.xz");
    std::fs::write(&stage, b"not read before the check").unwrap();
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = common::mkimg_as_nobody()
        .arg("--work-dir")
        .arg(tmp.path())
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .args(["shell", "--engine", "sandbox"])
        .arg(&stage)
        .args(["--", "true"])
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/etc/subuid") && stderr.contains("--engine docker"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `shell --engine docker` through Podman's Docker-compatible API: same mounts, exit status,
/// and no container left.
#[test]
fn docker_engine_runs_the_same_session() {
    let stage = common::stage();
    let ws = workspace();
    let engine = common::engine::engine();
    let _engine = engine_lock();
    let store = ws.work.join("images");
    let run_docker = |command: &[&str]| {
        shell(&ws, &stage.xz(), &["--engine", "docker"], command)
            .env("DOCKER_HOST", &engine.host)
            .env("GENTOO_MKIMG_STORE", &store)
            .output()
            .unwrap()
    };
    let out = run_docker(&["sh", "-c", "exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = "echo pkg > /var/cache/binpkgs/from-docker; \
                  if touch /var/db/repos/gentoo/nope 2>/dev/null; then echo WRITABLE; fi; \
                  cat /var/db/repos/gentoo/profiles/repo_name";
    let out = run_docker(&["/bin/sh", "-c", script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("WRITABLE"), "{stdout}");
    assert!(stdout.contains("gentoo"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(ws.work.join("packages/t1/from-docker")).unwrap(),
        "pkg\n"
    );
    let left = engine.docker_ok(&[
        "ps",
        "-a",
        "--filter",
        "label=org.gentoo-mkimg.session",
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(left.trim(), "", "containers left: {left}");
}

/// Issue #11, finding 11: `kill -9` of `shell --engine docker` leaves its privileged
/// container running; the next `shell` removes it and says so in one line.
#[test]
fn docker_engine_removes_the_container_of_a_killed_shell() {
    let stage = common::stage();
    let ws = workspace();
    let engine = common::engine::engine();
    let _engine = engine_lock();
    let store = ws.work.join("images");
    let run_docker = |command: &[&str]| {
        let mut cmd = shell(&ws, &stage.xz(), &["--engine", "docker"], command);
        cmd.env("DOCKER_HOST", &engine.host)
            .env("GENTOO_MKIMG_STORE", &store);
        cmd
    };
    // The image in the engine first, so the session starts fast.
    let out = run_docker(&["true"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tool = run_docker(&["sh", "-c", "sleep 120"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let made_by_tool = format!("label=org.gentoo-mkimg.pid={}", tool.id());
    let containers = |running: &str| {
        let filter = format!("status={running}");
        let names = engine.docker_ok(&[
            "ps",
            "-a",
            "--filter",
            &made_by_tool,
            "--filter",
            &filter,
            "--format",
            "{{.Names}}",
        ]);
        names
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = loop {
        let running = containers("running");
        if !running.is_empty() {
            break running;
        }
        assert!(tool.try_wait().unwrap().is_none(), "the shell ended");
        assert!(Instant::now() < deadline, "no running container after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    tool.kill().unwrap(); // SIGKILL
    tool.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        containers("running"),
        running,
        "the container did not outlive the tool"
    );
    let out = run_docker(&["true"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("left by killed gentoo-mkimg runs"))
        .collect();
    assert!(
        said.len() == 1 && said[0].contains(running[0].as_str()),
        "{stderr}"
    );
    for status in ["running", "exited", "created"] {
        assert_eq!(containers(status), Vec::<String>::new(), "{status}");
    }
}

/// Issue #11, finding 7: the store's raw image of the tag was imported from another stage (a
/// static busybox and a marker file); `shell --engine docker` imports and runs its own stage
/// instead, and says why in one line.
#[test]
fn docker_engine_does_not_run_another_stages_raw_image() {
    let stage = common::stage();
    let ws = workspace();
    let engine = common::engine::engine();
    let _engine = engine_lock();
    let store = ws.work.join("images");
    let impostor = ws.work.join("impostor.tar");
    write_impostor(&impostor);
    let out = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
        .arg("--store")
        .arg(&store)
        .arg("import")
        .arg(&impostor)
        .arg("localhost/gentoo-raw:t1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = "if test -e /IMPOSTOR; then echo IMPOSTOR; fi; \
                  command -v emerge >/dev/null && echo REAL-STAGE";
    let out = shell(
        &ws,
        &stage.xz(),
        &["--engine", "docker"],
        &["/bin/sh", "-c", script],
    )
    .env("DOCKER_HOST", &engine.host)
    .env("GENTOO_MKIMG_STORE", &store)
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("REAL-STAGE") && !stdout.contains("IMPOSTOR"),
        "{stdout}"
    );
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("localhost/gentoo-raw:t1 in the store was not imported from"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
}

/// A stage of the host's static busybox as /bin/busybox, /bin/sh and /usr/bin/env, and an
/// empty file /IMPOSTOR.
fn write_impostor(dest: &Path) {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut tar = tar::Builder::new(std::fs::File::create(dest).unwrap());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_500_000_000);
        h
    };
    for dir in ["./bin/", "./usr/", "./usr/bin/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, dir, std::io::empty()).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut h, "./bin/busybox", busybox.as_slice())
        .unwrap();
    for (link, target) in [
        ("./bin/sh", "busybox"),
        ("./usr/bin/env", "../../bin/busybox"),
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, link, target).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o644, 0);
    tar.append_data(&mut h, "./IMPOSTOR", std::io::empty())
        .unwrap();
    tar.into_inner().unwrap();
}

/// `emerge --info` in the stage shows the snapshot's profile, with either engine.
#[test]
fn emerge_info_sees_the_snapshot_profile_with_each_engine() {
    let stage = common::stage();
    let engine = common::engine::engine();
    let _engine = engine_lock();
    for kind in ["sandbox", "docker"] {
        let ws = workspace();
        let out = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
            .arg("--work-dir")
            .arg(&ws.work)
            .arg("--cache-dir")
            .arg(&ws.cache)
            .arg("--store")
            .arg(ws.work.join("images"))
            .args(["shell", "--engine", kind])
            .arg(stage.xz())
            .arg("--snapshot")
            .arg(common::repo())
            .args(["--tag", "info", "--", "emerge", "--info"])
            .env("DOCKER_HOST", &engine.host)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{kind}: emerge --info failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(common::REPO_PROFILE),
            "{kind}: the profile {} is not in emerge --info: {stdout}",
            common::REPO_PROFILE
        );
    }
}

/// A squashfs snapshot (`gentoo-YYYYMMDD.xz.sqfs`, made here by squashfs-tools) is unpacked
/// once into portage/TAG and Portage in the stage reads the tree from it.
#[test]
fn squashfs_snapshot_is_unpacked_once_and_used_by_portage() {
    let stage = common::stage();
    let ws = workspace();
    let sqfs = ws.work.join("gentoo-20260101.xz.sqfs");
    common::snapshot_squashfs(&sqfs);
    let emerge_info = || {
        Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
            .arg("--work-dir")
            .arg(&ws.work)
            .arg("--cache-dir")
            .arg(&ws.cache)
            .arg("shell")
            .arg(stage.xz())
            .arg("--snapshot")
            .arg(&sqfs)
            .args(["--tag", "sq", "--", "emerge", "--info"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = emerge_info();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "emerge --info failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(common::REPO_PROFILE),
        "the profile {} is not in emerge --info: {stdout}",
        common::REPO_PROFILE
    );
    let tree = ws.work.join("portage/sq");
    let repo_name = std::fs::read_to_string(tree.join("profiles/repo_name")).unwrap();
    let original = std::fs::read_to_string(common::repo().join("profiles/repo_name")).unwrap();
    assert_eq!(repo_name, original);
    // A second session finds the marker and does not extract again.
    let stamp = tree.join("profiles/.unpacked-once");
    std::fs::write(&stamp, "").unwrap();
    let out = emerge_info();
    assert!(out.status.success(), "second emerge --info failed");
    assert!(stamp.exists(), "portage/sq was extracted again");
}
