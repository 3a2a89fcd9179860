//! The Docker Engine API engine (`engine::docker::run`) against a real engine: a private
//! Podman service (`podman system service`) on a socket in a temp dir, driven through the
//! library; the docker CLI only looks at what is left in the engine.
//!
//! The stage is made here: a tar of the host's static busybox (Debian's busybox-static) with
//! its applets linked in /bin. Some checks run the library in a child process (this test
//! binary again, see `child_session`): to read its stdout, to interrupt it, and to give it an
//! environment of its own.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use gentoo_mkimg::engine::docker::{SESSION_LABEL, run};
use gentoo_mkimg::engine::{Mount, Session};
use gentoo_mkimg::image::reference::Reference;
use gentoo_mkimg::image::store::Store;
use gentoo_mkimg::progress::Verbosity;

/// The image name every session here uses (removed from the engine before the first run).
/// Without a registry: Podman names such an image `localhost/...` when it loads it.
const REF: &str = "gentoo-mkimg-test/engine-docker:busybox";
/// How the engine shows [`REF`]'s repository in `docker ps` (Podman adds `localhost/`).
const REPOSITORY: &str = "gentoo-mkimg-test/engine-docker";
/// Set in a child process: run one session described by the `CHILD_*` variables.
const CHILD_VAR: &str = "GENTOO_MKIMG_TEST_DOCKER_CHILD";
/// The line a child prints on stdout just before the session starts.
const OUTPUT_MARK: &str = "@@gentoo-mkimg-session-output@@";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The private Podman service and the stages, shared by the tests of this process.
struct World {
    /// `unix:///...` of the service.
    host: String,
    /// The stage tarball.
    stage: PathBuf,
    /// Same content, other mtimes: another image under the same name.
    other_stage: PathBuf,
    _service: Child,
}

/// One test at a time: they share the engine and look at all its containers.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // Under target/: the stages are rewritten (the same bytes) by every run, and each
        // run's service gets a directory that goes once its socket is gone.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("engine_docker");
        fs::create_dir_all(&base).expect("create the test dir");
        remove_ended_service_dirs(&base);
        let stage = base.join("stage.tar");
        let other_stage = base.join("other-stage.tar");
        make_stage(&stage, 1_700_000_000);
        make_stage(&other_stage, 1_600_000_000);
        let dir = base.join(format!("service-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create the service dir");
        let host = format!("unix://{}", dir.join("podman.sock").display());
        let log_path = dir.join("service.log");
        let log = fs::File::create(&log_path).expect("service log");
        let service = Command::new("podman")
            .args(["--runtime", "runc", "system", "service", "--time=60", &host])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start `podman system service` (is podman installed? scripts/setup-host)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !docker_cli(&host, &["version", "--format", "{{.Server.Version}}"])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer on {host} within 30 s:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // SAFETY: set once, under the `serial` lock every test takes before `world()`, so no
        // other test thread reads the environment meanwhile.
        unsafe { std::env::set_var("DOCKER_HOST", &host) };
        // Start from an engine without the image (nor containers of it left by a killed
        // run), so that the first session loads it.
        for name in session_containers_at(&host, false) {
            docker_cli(&host, &["rm", "-f", &name]);
        }
        docker_cli(&host, &["rmi", "-f", REF]);
        World {
            host,
            stage,
            other_stage,
            _service: service,
        }
    })
}

/// Directories of earlier runs whose service has ended (it removes its socket when it does).
fn remove_ended_service_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_service_dir = entry.file_name().to_string_lossy().starts_with("service-");
        if is_service_dir && !path.join("podman.sock").exists() {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn docker_cli(host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_HOST", host)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker_cli(&world().host, args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names of the engine's containers made by a session from our image.
fn session_containers(running_only: bool) -> Vec<String> {
    session_containers_at(&world().host, running_only)
}

fn session_containers_at(host: &str, running_only: bool) -> Vec<String> {
    let label = format!("label={SESSION_LABEL}");
    let mut args = vec!["ps", "-a", "--filter", &label];
    if running_only {
        args.extend(["--filter", "status=running"]);
    }
    args.extend(["--format", "{{.Names}} {{.Image}}"]);
    let out = docker_cli(host, &args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("{REPOSITORY}:")))
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

/// The first thing of each test that uses the engine: the lock, the world, and the session
/// containers that were there before (left by another test that failed).
fn begin() -> (MutexGuard<'static, ()>, &'static World, BTreeSet<String>) {
    let lock = serial();
    let world = world();
    (lock, world, session_containers(false).into_iter().collect())
}

/// `docker ps -a --filter label=org.gentoo-mkimg.session` shows none of ours but `before`.
fn assert_no_session_container(before: &BTreeSet<String>) {
    let left: Vec<_> = session_containers(false)
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    assert!(
        elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "expected a 64-bit little-endian ELF"
    );
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]) == 3 // PT_INTERP
    })
}

/// A stage tarball: the host's static busybox as /bin/busybox, every applet linked in /bin,
/// and the usual empty directories; all entries dated `mtime`.
fn make_stage(dest: &Path, mtime: u64) {
    let busybox = Path::new("/bin/busybox");
    let bytes = fs::read(busybox).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; install busybox-static (apt-get install busybox-static)",
            busybox.display()
        )
    });
    assert!(
        !has_interpreter(&bytes),
        "/bin/busybox is dynamically linked; install busybox-static"
    );
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let applets = String::from_utf8(list.stdout).expect("applet names");
    let dir = dest.parent().expect("the stage's directory");
    let tmp = tempfile::NamedTempFile::new_in(dir).expect("create the stage");
    let mut tar = tar::Builder::new(tmp);
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h
    };
    for dir in [
        "bin", "etc", "root", "tmp", "usr", "usr/bin", "var", "var/tmp",
    ] {
        let mode = if dir.ends_with("tmp") { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, format!("./{dir}/"), std::io::empty())
            .expect("append a directory");
    }
    let mut h = header(tar::EntryType::Regular, 0o755, bytes.len() as u64);
    tar.append_data(&mut h, "./bin/busybox", bytes.as_slice())
        .expect("append busybox");
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("./bin/{applet}"), "busybox")
            .expect("append an applet link");
    }
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    tar.append_link(&mut h, "./usr/bin/env", "../../bin/busybox")
        .expect("append /usr/bin/env");
    let tmp = tar.into_inner().expect("finish the stage");
    tmp.persist(dest).expect("put the stage in place");
}

/// Host directories for one session: the store, a read-only "Portage tree", a read-write
/// "binpkgs", a cache dir.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        for d in ["store", "repo", "binpkgs", "cache"] {
            fs::create_dir(root.path().join(d)).expect("create a dir");
        }
        fs::write(root.path().join("repo/profile"), "default/linux/amd64\n").expect("write");
        Dirs { root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn root(&self) -> &Path {
        self.root.path()
    }
}

/// A session of `command` on `stage`, with the store, mounts and cache under `dirs` (see
/// [`Dirs`]).
fn session(stage: &Path, dirs: &Path, command: &[&str]) -> Session {
    Session {
        stage: stage.to_path_buf(),
        // Some tests name a stage that is never read (the engine is checked first).
        stage_digest: gentoo_mkimg::archive::digest::sha256_file(stage).unwrap_or_default(),
        store: Store::new(dirs.join("store")),
        raw_reference: REF.parse::<Reference>().expect("reference"),
        mounts: vec![
            Mount {
                source: dirs.join("repo"),
                target: "/var/db/repos/gentoo".to_string(),
                read_only: true,
            },
            Mount {
                source: dirs.join("binpkgs"),
                target: "/var/cache/binpkgs".to_string(),
                read_only: false,
            },
        ],
        env: vec![
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("FEATURES".to_string(), "-sandbox buildpkg".to_string()),
            ("ODD".to_string(), "a=b c\"d".to_string()),
        ],
        command: command.iter().map(|s| s.to_string()).collect(),
        interactive: false,
        hostname: "gentoo-mkimg-test".to_string(),
        cache_dir: dirs.join("cache"),
        keep: false,
        verbosity: Verbosity::Quiet,
    }
}

/// This test binary again, running `child_session` with `command` against `host`.
fn child(host: &str, dirs: &Dirs, stage: &Path, command: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "child_session",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_VAR, "1")
    .env("DOCKER_HOST", host)
    .env("CHILD_DIRS", dirs.root.path())
    .env("CHILD_STAGE", stage)
    .env("CHILD_COMMAND", command.join("\x1f"))
    .stdin(Stdio::null());
    cmd
}

/// Not a test by itself: the body of the child processes (see [`child`]). Exits with the
/// session's status, or 97 with the error on stderr.
#[test]
fn child_session() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let filter = std::env::var("GENTOO_MKIMG_LOG").unwrap_or_else(|_| "warn".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let command = var("CHILD_COMMAND");
    let command: Vec<&str> = command.split('\x1f').collect();
    let session = session(
        Path::new(&var("CHILD_STAGE")),
        Path::new(&var("CHILD_DIRS")),
        &command,
    );
    let session = Session {
        interactive: std::env::var_os("CHILD_INTERACTIVE").is_some(),
        ..session
    };
    // The test harness has printed its own lines on stdout: mark where the session's begin.
    println!("\n{OUTPUT_MARK}");
    match run(&session) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("CHILD-ERROR: {e:#}");
            std::process::exit(97);
        }
    }
}

/// `args` quoted for `sh -c`.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A child's stdout from the session on (without the test harness's lines), and its stderr.
fn output_text(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let session_out = match stdout.split_once(OUTPUT_MARK) {
        Some((_, after)) => after.trim_start_matches(['\r', '\n']).to_string(),
        None => format!("(no output mark) {stdout}"),
    };
    (
        session_out,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn exit_status_and_first_load() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    let s = session(&world.stage, dirs.root(), &["/bin/sh", "-c", "exit 3"]);
    assert_eq!(run(&s).expect("run"), 3);
    // The stage was imported into the empty store and loaded under its name.
    let stored = gentoo_mkimg::image::open_image(&s.store, REF).expect("the store has the image");
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", REF]);
    assert_eq!(id.trim(), stored.config.digest().as_ref());
    assert_no_session_container(&before);
    // Again, with the image already there.
    let s = session(&world.stage, dirs.root(), &["/bin/sh", "-c", "exit 0"]);
    assert_eq!(run(&s).expect("run"), 0);
    // A program that is not there: 127, as a shell says it.
    let s = session(&world.stage, dirs.root(), &["/no/such/program"]);
    assert_eq!(run(&s).expect("run"), 127);
    assert_no_session_container(&before);
}

#[test]
fn a_container_that_cannot_start_is_an_error_and_is_removed() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    // A file bound over a directory: the engine creates the container, the runtime cannot
    // set it up.
    fs::write(dirs.path("a-file"), "not a directory\n").expect("write");
    let mut s = session(&world.stage, dirs.root(), &["/bin/true"]);
    s.mounts.push(Mount {
        source: dirs.path("a-file"),
        target: "/etc".to_string(),
        read_only: false,
    });
    let error = run(&s).expect_err("the session ran");
    let text = format!("{error:#}");
    assert!(text.contains("gentoo-mkimg-"), "{text}");
    assert_no_session_container(&before);
}

#[test]
fn mounts_are_bound_read_only_or_read_write_and_the_root_stays_inside() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    let root_file = format!("/root-file-{}", std::process::id());
    let script = format!(
        "echo hi > /var/cache/binpkgs/f; \
         touch {root_file} && test -f {root_file} && echo yes > /var/cache/binpkgs/root-ok; \
         cat /var/db/repos/gentoo/profile > /var/cache/binpkgs/profile; \
         touch /var/db/repos/gentoo/x"
    );
    let code = run(&session(
        &world.stage,
        dirs.root(),
        &["/bin/sh", "-c", &script],
    ))
    .expect("run");
    assert_ne!(code, 0, "touching a file in the read-only mount succeeded");
    assert_eq!(
        fs::read_to_string(dirs.path("binpkgs/f")).expect("binpkgs/f"),
        "hi\n"
    );
    assert_eq!(
        fs::read_to_string(dirs.path("binpkgs/profile")).expect("binpkgs/profile"),
        "default/linux/amd64\n"
    );
    assert!(
        dirs.path("binpkgs/root-ok").exists(),
        "{root_file} was not writable inside"
    );
    assert!(
        !Path::new(&root_file).exists(),
        "{root_file} reached the host"
    );
    assert!(
        !dirs.path("repo/x").exists(),
        "the read-only mount was written"
    );
    // The read-only write alone fails; the read-write one alone succeeds.
    let ro = session(
        &world.stage,
        dirs.root(),
        &["/bin/sh", "-c", "touch /var/db/repos/gentoo/y"],
    );
    assert_ne!(run(&ro).expect("run"), 0);
    let rw = session(
        &world.stage,
        dirs.root(),
        &["/bin/sh", "-c", "touch /var/cache/binpkgs/y"],
    );
    assert_eq!(run(&rw).expect("run"), 0);
    assert!(dirs.path("binpkgs/y").exists());
    assert_no_session_container(&before);
}

#[test]
fn environment_is_exactly_the_sessions_and_hostname_is_set() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    // Without a shell in between: `env` prints exactly what the command got.
    let out = child(&world.host, &dirs, &world.stage, &["/usr/bin/env"])
        .output()
        .expect("run the child");
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let got: BTreeSet<&str> = stdout.lines().collect();
    let want: BTreeSet<&str> = [
        "PATH=/usr/bin:/bin",
        "HOME=/root",
        "FEATURES=-sandbox buildpkg",
        "ODD=a=b c\"d",
    ]
    .into();
    assert_eq!(got, want, "stderr:\n{stderr}");
    // Through the rw mount too, and the hostname.
    let s = session(
        &world.stage,
        dirs.root(),
        &[
            "/bin/sh",
            "-c",
            "/usr/bin/env > /var/cache/binpkgs/env; hostname > /var/cache/binpkgs/hostname",
        ],
    );
    assert_eq!(run(&s).expect("run"), 0);
    let env = fs::read_to_string(dirs.path("binpkgs/env")).expect("env file");
    let got: BTreeSet<&str> = env.lines().collect();
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    // The shell exports PWD and SHLVL of its own; nothing else may appear.
    assert!(
        missing.is_empty()
            && extra
                .iter()
                .all(|l| l.starts_with("PWD=") || l.starts_with("SHLVL=")),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(
        fs::read_to_string(dirs.path("binpkgs/hostname")).expect("hostname file"),
        "gentoo-mkimg-test\n"
    );
    assert_no_session_container(&before);
}

#[test]
fn output_goes_live_to_stdout_and_stderr() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    let out = child(
        &world.host,
        &dirs,
        &world.stage,
        &["/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
    )
    .output()
    .expect("run the child");
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("to-out\n") && !stdout.contains("to-err"),
        "stdout: {stdout}"
    );
    assert!(
        stderr.contains("to-err\n") && !stderr.contains("to-out"),
        "stderr: {stderr}"
    );
    assert_no_session_container(&before);
}

#[test]
fn interactive_session_has_a_tty_and_our_input() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    // `script` gives the child a terminal; what we write to it is typed there.
    let inner = child(&world.host, &dirs, &world.stage, &["/bin/sh"]);
    let argv: Vec<String> = std::iter::once(inner.get_program())
        .chain(inner.get_args())
        .map(|a| a.to_str().expect("UTF-8 argument").to_string())
        .collect();
    let mut script = Command::new("script");
    script
        .args(["-qec", &shell_words(&argv), "/dev/null"])
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("CHILD_INTERACTIVE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut running = script.spawn().expect("run script (bsdutils)");
    let mut stdin = running.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"echo hi-$((6*7)); tty; exit 5\n").expect("type");
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = running.kill();
            panic!("the interactive session did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    let out = running.wait_with_output().expect("output");
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(5),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("hi-42"), "stdout:\n{stdout}");
    assert!(stdout.contains("/dev/pts/"), "no tty inside:\n{stdout}");
    assert_no_session_container(&before);
}

#[test]
fn sigint_and_sigterm_stop_and_remove_the_container() {
    use nix::sys::signal::Signal;
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    // The image must be in the engine already, so the session starts fast.
    assert_eq!(
        run(&session(&world.stage, dirs.root(), &["/bin/true"])).expect("run"),
        0
    );
    for (signal, want) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 143)] {
        let mut child = child(
            &world.host,
            &dirs,
            &world.stage,
            &["/bin/sh", "-c", "sleep 60"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(60);
        while session_containers(true).is_empty() {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("the child ended before its container ran: {status}");
            }
            assert!(Instant::now() < deadline, "no running container after 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        let sent = Instant::now();
        nix::sys::signal::kill(pid, signal).expect("kill");
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if sent.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child did not end within 60 s of {signal}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        assert_eq!(status.code(), Some(want), "{signal}; stderr:\n{stderr}");
        assert_no_session_container(&before);
    }
}

#[test]
fn another_image_under_the_same_name_is_replaced() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    assert_eq!(
        run(&session(&world.stage, dirs.root(), &["/bin/true"])).expect("run"),
        0
    );
    // The same name from another stage (other mtimes): another config digest.
    let other = Dirs::new();
    let s = session(&world.other_stage, other.root(), &["/bin/true"]);
    assert_eq!(run(&s).expect("run"), 0);
    let stored = gentoo_mkimg::image::open_image(&s.store, REF).expect("stored");
    let first =
        gentoo_mkimg::image::open_image(&Store::new(dirs.path("store")), REF).expect("stored");
    assert_ne!(stored.config.digest(), first.config.digest());
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", REF]);
    assert_eq!(id.trim(), stored.config.digest().as_ref());
    assert_no_session_container(&before);
    // And back, leaving the engine as the other tests expect it, without the other image.
    assert_eq!(
        run(&session(&world.stage, dirs.root(), &["/bin/true"])).expect("run"),
        0
    );
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", REF]);
    assert_eq!(id.trim(), first.config.digest().as_ref());
    docker_ok(&["rmi", stored.config.digest().as_ref()]);
    assert_no_session_container(&before);
}

/// The session containers running now that are not in `known`, waited for while `child`
/// runs (60 s at most).
fn new_running_containers(child: &mut Child, known: &BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let new: Vec<String> = session_containers(true)
            .into_iter()
            .filter(|c| !known.contains(c))
            .collect();
        if !new.is_empty() {
            return new;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the child ended before its container ran: {status}");
        }
        assert!(Instant::now() < deadline, "no running container after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue #11, finding 11: a run killed with SIGKILL cannot remove its privileged container.
/// The next run does, and says so in one line; it leaves alone the container of a run that
/// is still going.
#[test]
fn the_container_of_a_killed_run_is_removed_by_the_next_run() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    // The image must be in the engine already, so the sessions start fast.
    assert_eq!(
        run(&session(&world.stage, dirs.root(), &["/bin/true"])).expect("run"),
        0
    );
    let spawn = || {
        child(
            &world.host,
            &dirs,
            &world.stage,
            &["/bin/sh", "-c", "sleep 120"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child")
    };
    let mut killed = spawn();
    let killed_containers = new_running_containers(&mut killed, &before);
    let mut known = before.clone();
    known.extend(killed_containers.iter().cloned());
    let mut alive = spawn();
    let alive_containers = new_running_containers(&mut alive, &known);
    killed.kill().expect("SIGKILL"); // Child::kill sends SIGKILL
    killed.wait().expect("wait");
    // The finding: the container outlives the tool.
    std::thread::sleep(Duration::from_secs(1));
    let running = session_containers(true);
    for c in killed_containers.iter().chain(&alive_containers) {
        assert!(running.contains(c), "{c} is not running: {running:?}");
    }
    // The next run removes the killed run's container, not the running one's.
    let out = child(&world.host, &dirs, &world.stage, &["/bin/true"])
        .output()
        .expect("run the child");
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("left by killed gentoo-mkimg runs"))
        .collect();
    assert_eq!(said.len(), 1, "stderr:\n{stderr}");
    for c in &killed_containers {
        assert!(said[0].contains(c.as_str()), "{c} not named: {}", said[0]);
    }
    let all = session_containers(false);
    for c in &killed_containers {
        assert!(!all.contains(c), "{c} is still there");
    }
    for c in &alive_containers {
        assert!(all.contains(c), "{c}, of a running run, was removed");
        assert!(!said[0].contains(c.as_str()), "{}", said[0]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(alive.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    alive.wait().expect("wait");
    assert_no_session_container(&before);
}

/// Issue #11, finding 7: the store holds an image of another stage under the raw name (a
/// session on another stage with the same name came first). The session runs its own stage,
/// imported again; after that the stored image is this stage's and is used as it is.
#[test]
fn a_stored_image_of_another_stage_under_the_name_is_not_used() {
    let (_serial, world, before) = begin();
    let dirs = Dirs::new();
    let s = session(&world.other_stage, dirs.root(), &["/bin/true"]);
    assert_eq!(run(&s).expect("run"), 0);
    let other = gentoo_mkimg::image::open_image(&s.store, REF).expect("stored");
    // The stage's busybox is dated 1_700_000_000, the other stage's 1_600_000_000.
    let check = [
        "/bin/sh",
        "-c",
        "test \"$(stat -c %Y /bin/busybox)\" = 1700000000",
    ];
    let s = session(&world.stage, dirs.root(), &check);
    assert_eq!(run(&s).expect("run"), 0, "the other stage's image ran");
    let stored = gentoo_mkimg::image::open_image(&s.store, REF).expect("stored");
    assert_ne!(stored.manifest.digest(), other.manifest.digest());
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", REF]);
    assert_eq!(id.trim(), stored.config.digest().as_ref());
    // Now it is this stage's: not imported again (the store's index is not rewritten).
    let index = dirs.path("store/index.json");
    let modified = || {
        fs::metadata(&index)
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let written = modified();
    assert_eq!(run(&s).expect("run"), 0);
    assert_eq!(modified(), written, "imported again");
    docker_ok(&["rmi", other.config.digest().as_ref()]);
    assert_no_session_container(&before);
}

#[test]
fn an_unreachable_engine_is_one_clear_error_naming_the_socket() {
    let _serial = serial();
    let dirs = Dirs::new();
    let stage = dirs.path("no-stage.tar"); // never reached: the engine is checked first
    let missing = dirs.path("missing/docker.sock");
    let host = format!("unix://{}", missing.display());
    // A socket file nobody listens on, and a TCP port that refuses.
    let dead = dirs.path("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
    let dead_host = format!("unix://{}", dead.display());
    for host in [host.as_str(), dead_host.as_str(), "tcp://127.0.0.1:9"] {
        let started = Instant::now();
        let out = child(host, &dirs, &stage, &["/bin/true"])
            .output()
            .expect("run the child");
        let (_, stderr) = output_text(&out);
        assert_eq!(out.status.code(), Some(97), "stderr:\n{stderr}");
        // One line, and nothing else on stderr.
        let error: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            error.len() == 1 && error[0].starts_with("CHILD-ERROR: "),
            "stderr:\n{stderr}"
        );
        assert!(error[0].contains(host), "{host} not named: {}", error[0]);
        assert!(error[0].contains("DOCKER_HOST"), "no hint: {}", error[0]);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }
}
