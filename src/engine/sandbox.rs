//! The built-in sandbox engine: no daemon; root, or an ordinary user with subordinate ids.
//!
//! The stage is extracted once per stage digest into `CACHE/stages/<sha256>-ids<base>/rootfs`
//! (owners shifted into the session's id range, modes, xattrs, devices and hard links kept)
//! and never changed afterwards: each session runs on an overlayfs whose upper dir lives in
//! `CACHE/runs/<id>/` and is removed at the end.
//!
//! The command runs as root of a user namespace that maps the stage's ids 0..65535 to host
//! ids `base..base+65535` ([`super::userns`]): it is no root of the host, holds no capability
//! over the host's files, cannot make device nodes, mount over the host's mounts or clear
//! their read-only flags, and runs with no_new_privs (setuid files and file capabilities give
//! nothing). The host directories bound into a session that it may write are handed to its
//! root first (their owners shifted into the range).
//!
//! Process layout:
//! - this process (the tool) spawns a helper — itself, re-executed as `__sandbox-init SPEC` —
//!   with a new pid namespace for its children;
//! - the helper forks the namespace's pid 1, which, still the tool's user, takes new mount,
//!   uts and ipc namespaces, mounts the overlay, the binds, /proc, /sys (read-only), /dev,
//!   writes resolv.conf, sets the hostname and pivots into the new root; then it enters a
//!   new user namespace, whose id maps the helper writes, becomes its root, and runs the
//!   command as its child, reaping until it ends;
//! - when pid 1 exits, the kernel kills whatever else runs in the namespace, and the mounts,
//!   made only inside the private mount namespace, go with it: nothing of the session is left
//!   on the host. pid 1 and the helper die with their parent (PR_SET_PDEATHSIG).
//!
//! Signals: SIGTERM, SIGHUP (and SIGINT for non-interactive sessions) are passed on to the
//! command; a second one, or 10 s without an exit, kills the whole namespace.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde::{Deserialize, Serialize};

use super::{Session, userns};
use crate::archive::ids::IdShift;
use crate::archive::{decompress, extract, pinned};
use crate::progress;

/// The hidden first argument that turns the binary into the sandbox helper.
pub const INIT_ARG: &str = "__sandbox-init";

/// Exit status of pid 1 when setting up the sandbox failed (details in the error file).
const SETUP_FAILED: i32 = 125;

/// What the helper needs, written as JSON into the run directory.
#[derive(Debug, Serialize, Deserialize)]
struct Spec {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
    /// (host source, target inside, read-only)
    mounts: Vec<(PathBuf, String, bool)>,
    env: Vec<(String, String)>,
    command: Vec<String>,
    hostname: String,
    resolv_conf: Option<Vec<u8>>,
    /// Setup errors are written here for the tool to report.
    error_file: PathBuf,
    /// The host ids of the stage's ids.
    ids: IdShift,
    /// The tool itself runs in a user namespace: overlayfs keeps its bookkeeping in `user.*`
    /// attributes, and sysfs cannot be mounted anew.
    userxattr: bool,
}

/// Fail early, in one line, when the sandbox cannot work here.
pub fn check_usable() -> Result<()> {
    userns::session_shift().map(|_| ())
}

/// Run `session` in the sandbox; the command's exit status.
pub fn run(session: &Session) -> Result<i32> {
    let ids = userns::session_shift()?;
    with_run_dir(session, |run_dir| run_session(session, run_dir, ids))
}

/// Run `session` with the pipes of `exports` mounted, reading them with `read` (see
/// [`super::export`]). The pipes are in the session's run directory, owned by its root.
pub fn run_exporting<T: Send>(
    session: &Session,
    exports: &[&str],
    read: &super::export::ReadExport<'_, T>,
) -> Result<super::export::Outcome<T>> {
    let ids = userns::session_shift()?;
    let owner = ids.to_host(0)?;
    with_run_dir(session, |run_dir| {
        let pipes = run_dir.join("export");
        super::export::with_pipes(&pipes, Some(owner), exports, read, |mount| {
            let mut session = session.clone();
            session.mounts.push(mount);
            run_session(&session, run_dir, ids)
        })
    })
}

/// The extracted stage for `session` and its run in a fresh run directory.
fn run_session(session: &Session, run_dir: &Path, ids: IdShift) -> Result<i32> {
    let rootfs = prepare_stage(
        &session.stage,
        &session.stage_digest,
        &session.cache_dir,
        session.verbosity,
        ids,
    )?;
    // A foreign stage runs only through a binfmt_misc handler: one line saying what to
    // install, rather than the kernel's "Exec format error" from inside the session.
    super::binfmt::check_rootfs_runnable(&session.stage, &rootfs)?;
    run_in(session, &rootfs, run_dir, ids)
}

/// Run `f` with a fresh run directory (0700, under the cache dir), removed afterwards unless
/// the session keeps it.
fn with_run_dir<R>(session: &Session, f: impl FnOnce(&Path) -> Result<R>) -> Result<R> {
    let runs = session.cache_dir.join("runs");
    fs::create_dir_all(&runs).with_context(|| format!("{}: cannot create", runs.display()))?;
    remove_stale_runs(&runs);
    // 0700: the upper dir gets whatever the session makes (setuid files, devices).
    let run_dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(&runs)
        .with_context(|| format!("{}: cannot create a run directory", runs.display()))?;
    let result = f(run_dir.path());
    if session.keep {
        let kept = run_dir.keep();
        eprintln!(
            "gentoo-mkimg: kept the session's files in {}",
            kept.display()
        );
    } else {
        let path = run_dir.path().to_path_buf();
        if let Err(e) = run_dir.close() {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
    result
}

fn run_in(session: &Session, rootfs: &Path, run_dir: &Path, ids: IdShift) -> Result<i32> {
    let spec = Spec {
        lower: rootfs.to_path_buf(),
        upper: run_dir.join("upper"),
        work: run_dir.join("work"),
        merged: run_dir.join("merged"),
        mounts: session
            .mounts
            .iter()
            .map(|m| (m.source.clone(), m.target.clone(), m.read_only))
            .collect(),
        env: session.env.clone(),
        command: session.command.clone(),
        hostname: session.hostname.clone(),
        resolv_conf: fs::read("/etc/resolv.conf").ok(),
        error_file: run_dir.join("setup-error"),
        ids,
        userxattr: ids == IdShift::NONE,
    };
    for dir in [&spec.upper, &spec.work, &spec.merged] {
        fs::create_dir(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    // The session's root directory is the upper dir's: the stage root's owner and mode.
    let top = fs::symlink_metadata(rootfs)
        .with_context(|| format!("{}: cannot read", rootfs.display()))?;
    std::os::unix::fs::lchown(&spec.upper, Some(top.uid()), Some(top.gid()))
        .with_context(|| format!("{}: cannot set the owner", spec.upper.display()))?;
    fs::set_permissions(&spec.upper, fs::Permissions::from_mode(top.mode() & 0o7777))
        .with_context(|| format!("{}: cannot set the mode", spec.upper.display()))?;
    for (source, _, read_only) in &spec.mounts {
        if !source.is_dir() {
            bail!(
                "{}: not a directory, cannot mount it in the sandbox",
                source.display()
            );
        }
        if !read_only {
            adopt(source, ids)?;
        }
    }
    let spec_path = run_dir.join("spec.json");
    fs::write(&spec_path, serde_json::to_vec(&spec)?)
        .with_context(|| format!("{}: cannot write", spec_path.display()))?;

    let exe = std::env::current_exe().context("cannot find the gentoo-mkimg executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(INIT_ARG).arg(&spec_path);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
        });
    }
    let signals = SignalWatch::install(!session.interactive)?;
    let child = cmd.spawn().map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            anyhow!("the sandbox engine cannot create namespaces here ({e}); use --engine docker")
        } else {
            anyhow!("cannot start the sandbox helper: {e}")
        }
    })?;
    let status = wait_forwarding(Pid::from_raw(child.id() as i32), &signals);
    drop(signals);
    let status = status?;
    let error = fs::read_to_string(&spec.error_file).unwrap_or_default();
    if !error.trim().is_empty() {
        bail!("sandbox: {}", error.trim());
    }
    Ok(status)
}

/// Wait for the helper, passing signals on: the first as SIGTERM, a second one (or 10 s of
/// waiting after the first) as SIGKILL, which takes the whole namespace down.
fn wait_forwarding(helper: Pid, signals: &SignalWatch) -> Result<i32> {
    let mut forwarded = 0;
    let mut first_at: Option<Instant> = None;
    loop {
        match waitpid(helper, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(anyhow!("cannot wait for the sandbox: {e}")),
        }
        let seen = signals.count();
        if seen > forwarded {
            if forwarded == 0 {
                let _ = kill(helper, Signal::SIGTERM);
                first_at = Some(Instant::now());
            } else {
                let _ = kill(helper, Signal::SIGKILL);
            }
            forwarded = seen;
        }
        if first_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            let _ = kill(helper, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static SIGNALS_SEEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst);
}

/// Counts SIGTERM, SIGHUP (and SIGINT) while a session runs; restores the old handlers when
/// dropped.
struct SignalWatch {
    old: Vec<(Signal, SigAction)>,
}

impl SignalWatch {
    fn install(with_sigint: bool) -> Result<Self> {
        SIGNALS_SEEN.store(0, Ordering::SeqCst);
        let mut list = vec![Signal::SIGTERM, Signal::SIGHUP];
        let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        let count = SigAction::new(
            SigHandler::Handler(count_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        if with_sigint {
            list.push(Signal::SIGINT);
        } else {
            // Interactive: Ctrl-C belongs to the shell in the sandbox, not to us.
            // SAFETY: installing a plain ignore disposition.
            old.push((Signal::SIGINT, unsafe {
                sigaction(Signal::SIGINT, &ignore)?
            }));
        }
        for sig in list {
            // SAFETY: the handler only touches an atomic.
            old.push((sig, unsafe { sigaction(sig, &count)? }));
        }
        Ok(SignalWatch { old })
    }

    fn count(&self) -> usize {
        SIGNALS_SEEN.load(Ordering::SeqCst)
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        for (sig, action) in &self.old {
            // SAFETY: restoring what was there before.
            let _ = unsafe { sigaction(*sig, action) };
        }
    }
}

/// Remove run directories left by sessions whose process is gone (killed with SIGKILL).
fn remove_stale_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Hand the host directory `dir`, bound writable into a session, to the session's root: every
/// entry owned by an id outside the session's range gets the shifted owner (its own id if
/// below 65536, else root's), so the stage's root and users can write what they wrote in an
/// earlier session or another engine. Nothing is followed: the walk goes by directory fd.
fn adopt(dir: &Path, ids: IdShift) -> Result<()> {
    if ids == IdShift::NONE {
        return Ok(());
    }
    fn walk(dir: &pinned::Dir, ids: IdShift) -> Result<()> {
        use nix::fcntl::AtFlags;
        use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstatat};
        for name in std::iter::once(b".".to_vec()).chain(dir.names()?) {
            let st = fstatat(dir.fd(), name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| anyhow!("{}: cannot read: {e}", dir.display(&name)))?;
            let shift = |id: u32| match ids.to_inside(id) {
                Some(_) => id,
                None => ids.to_host(u64::from(id)).unwrap_or(ids.base),
            };
            let (uid, gid) = (shift(st.st_uid), shift(st.st_gid));
            if (uid, gid) != (st.st_uid, st.st_gid) {
                nix::unistd::fchownat(
                    dir.fd(),
                    name.as_slice(),
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| anyhow!("{}: cannot change the owner: {e}", dir.display(&name)))?;
                let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                if kind != SFlag::S_IFLNK && st.st_mode & 0o6000 != 0 {
                    // chown cleared setuid and setgid (a setgid DISTDIR keeps its group so).
                    fchmodat(
                        dir.fd(),
                        name.as_slice(),
                        Mode::from_bits_truncate(st.st_mode & 0o7777),
                        FchmodatFlags::NoFollowSymlink,
                    )
                    .map_err(|e| anyhow!("{}: cannot set the mode: {e}", dir.display(&name)))?;
                }
            }
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if name != b"." && kind == SFlag::S_IFDIR {
                let sub = dir
                    .child(&name)
                    .map_err(|e| anyhow!("{}: cannot open: {e}", dir.display(&name)))?;
                walk(&sub, ids)?;
            }
        }
        Ok(())
    }
    walk(&pinned::Dir::open(dir)?, ids)
        .with_context(|| format!("{}: cannot hand it to the sandbox's root", dir.display()))
}

/// The extracted stage for `stage`: `CACHE/stages/<sha256>-ids<base>/rootfs`, extracted on
/// first use with its owners shifted by `ids`.
pub fn prepare_stage(
    stage: &Path,
    stage_digest: &str,
    cache_dir: &Path,
    verbosity: progress::Verbosity,
    ids: IdShift,
) -> Result<PathBuf> {
    let digest = format!("{stage_digest}-ids{}", ids.base);
    let stages = cache_dir.join("stages");
    fs::create_dir_all(&stages).with_context(|| format!("{}: cannot create", stages.display()))?;
    let done = stages.join(&digest);
    let rootfs = done.join("rootfs");
    // 0700, root only: the stage holds setuid binaries and device nodes (made 0755 before).
    let private = || fs::Permissions::from_mode(0o700);
    let lock_path = stages.join(format!("{digest}.lock"));
    let _lock = crate::image::store::lock_file(&lock_path, "the extracted stage")?;
    if done.join(".complete").is_file() {
        fs::set_permissions(&done, private())
            .with_context(|| format!("{}: cannot make it private", done.display()))?;
        return Ok(rootfs);
    }
    let _ = fs::remove_dir_all(&done);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{digest}-"))
        .permissions(private())
        .tempdir_in(&stages)
        .with_context(|| format!("{}: cannot create a temporary dir", stages.display()))?;
    let tmp_root = tmp.path().join("rootfs");
    fs::create_dir(&tmp_root).with_context(|| format!("{}: cannot create", tmp_root.display()))?;
    // The stage's root, if its archive has no `./` entry to say otherwise.
    let root_id = ids.to_host(0)?;
    std::os::unix::fs::lchown(&tmp_root, Some(root_id), Some(root_id))
        .with_context(|| format!("{}: cannot set the owner", tmp_root.display()))?;
    let input = decompress::open(stage)?;
    let bar = progress::Bar::new(verbosity, "extracting stage", input.size);
    let consumed = input.consumed.clone();
    // No shift: the tool runs in a user namespace (see userns::session_shift).
    let unprivileged = ids == IdShift::NONE;
    let extracted = extract::extract(
        input.reader,
        &tmp_root,
        extract::ExtractOptions {
            ids,
            unprivileged,
            ..Default::default()
        },
        || bar.set(consumed.load(Ordering::Relaxed)),
    )
    .with_context(|| format!("{}: cannot extract", stage.display()))?;
    bar.finish();
    if extracted.skipped > 0 {
        tracing::info!(
            "{}: left out {} device nodes and trusted.* attributes (a user namespace cannot \
             make them; sessions get their own /dev)",
            stage.display(),
            extracted.skipped
        );
    }
    fs::write(tmp.path().join(".complete"), stage.as_os_str().as_bytes())
        .context("cannot mark the extracted stage complete")?;
    let kept = tmp.keep();
    fs::rename(&kept, &done)
        .with_context(|| format!("{}: cannot move into place", done.display()))?;
    Ok(rootfs)
}

// ---------------------------------------------------------------------------------------
// Inside: the helper and pid 1. These run in a freshly exec'd, single-threaded process.
// ---------------------------------------------------------------------------------------

static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_term(_: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

fn set_forwarding(signals: &[Signal]) -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(forward_term),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in signals {
        // SAFETY: the handler only reads an atomic and calls kill.
        unsafe { sigaction(*sig, &action)? };
    }
    Ok(())
}

/// Entry point of `gentoo-mkimg __sandbox-init SPEC`: returns the exit status.
pub fn init_main(spec_path: &Path) -> i32 {
    let spec: Spec = match fs::read(spec_path)
        .map_err(anyhow::Error::from)
        .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "gentoo-mkimg: sandbox: cannot read {}: {e}",
                spec_path.display()
            );
            return SETUP_FAILED;
        }
    };
    let error_file = match File::create(&spec.error_file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gentoo-mkimg: sandbox: {}: {e}", spec.error_file.display());
            return SETUP_FAILED;
        }
    };
    // SAFETY: ignoring SIGINT; the helper is single-threaded here.
    let _ = unsafe {
        sigaction(
            Signal::SIGINT,
            &SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty()),
        )
    };
    // pid 1 says when it has entered its user namespace (ready), and waits for the maps (go).
    let pipes = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .and_then(|ready| Ok((ready, nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)));
    let ((ready_r, ready_w), (go_r, go_w)) = match pipes {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(&error_file, "cannot make a pipe: {e}");
            return SETUP_FAILED;
        }
    };
    // SAFETY: this process is single-threaded (freshly exec'd, no threads started).
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop((ready_w, go_r));
            FORWARD_TO.store(child.as_raw(), Ordering::SeqCst);
            let _ = set_forwarding(&[Signal::SIGTERM, Signal::SIGHUP]);
            let mut byte = [0u8; 1];
            if File::from(ready_r).read(&mut byte).unwrap_or(0) == 1 {
                // This helper is in the host's mount namespace: /proc/PID is pid 1's.
                let proc_dir = PathBuf::from(format!("/proc/{}", child.as_raw()));
                match userns::write_maps(&proc_dir, spec.ids) {
                    Ok(()) => {
                        let _ = File::from(go_w).write_all(b"1");
                    }
                    Err(e) => {
                        let _ = writeln!(&error_file, "{e:#}");
                        drop(go_w); // pid 1 ends on EOF
                    }
                }
            }
            wait_for(child)
        }
        Ok(ForkResult::Child) => {
            drop((ready_r, go_w));
            let code = pid1(&spec, &error_file, ready_w, go_r);
            std::process::exit(code)
        }
        Err(e) => {
            let _ = writeln!(&error_file, "cannot fork: {e}");
            SETUP_FAILED
        }
    }
}

fn wait_for(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return SETUP_FAILED,
        }
    }
}

/// pid 1 of the session's pid namespace.
fn pid1(spec: &Spec, error_file: &File, ready: OwnedFd, go: OwnedFd) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let entered =
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
            .context("cannot create namespaces")
            .and_then(|()| setup_root(spec))
            .and_then(|()| enter_user_namespace(ready, go));
    if let Err(e) = entered {
        let _ = writeln!(&*error_file, "{e:#}");
        return SETUP_FAILED;
    }
    // The command gets default signal handling back (SIGINT was ignored above).
    // SAFETY: single-threaded; plain default disposition.
    let _ = unsafe {
        sigaction(
            Signal::SIGINT,
            &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()),
        )
    };
    let (program, argv, envp) = match exec_args(spec) {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(&*error_file, "{e:#}");
            return SETUP_FAILED;
        }
    };
    // SAFETY: single-threaded.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // Every signal at its default, as a command expects: ignored dispositions survive
            // execve, and this binary ignores SIGPIPE (Rust's runtime does), so without this
            // `yes | head` would see EPIPE errors instead of ending quietly.
            // Real-time signals too; the ones the C library keeps for itself, SIGKILL and
            // SIGSTOP refuse the change, which is fine.
            for sig in 1..=libc::SIGRTMAX() {
                // SAFETY: signal(2) is async-signal-safe; a plain default disposition.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
            // Nothing the command runs gains privileges: no setuid, no file capabilities.
            if let Err(e) = nix::sys::prctl::set_no_new_privs() {
                let _ = writeln!(&*error_file, "cannot set no_new_privs: {e}");
                // SAFETY: exit without running the parent's destructors in the forked child.
                unsafe { libc::_exit(SETUP_FAILED) }
            }
            let err = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
            let _ = writeln!(
                &*error_file,
                "cannot run {}: {err}",
                spec.command.first().map(String::as_str).unwrap_or("")
            );
            // SAFETY: exit without running the parent's destructors in the forked child.
            unsafe { libc::_exit(127) }
        }
        Ok(ForkResult::Parent { child }) => {
            FORWARD_TO.store(child.as_raw(), Ordering::SeqCst);
            let _ = set_forwarding(&[Signal::SIGTERM, Signal::SIGHUP]);
            // Reap everything; end with the command.
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                        return 128 + sig as i32;
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return SETUP_FAILED,
                }
            }
        }
        Err(e) => {
            let _ = writeln!(&*error_file, "cannot fork: {e}");
            SETUP_FAILED
        }
    }
}

/// In pid 1, after the root is built: enter a new user namespace, have the helper write its
/// id maps, and become its root. From here on nothing of the host is this process's.
fn enter_user_namespace(ready: OwnedFd, go: OwnedFd) -> Result<()> {
    unshare(CloneFlags::CLONE_NEWUSER).context("cannot create a user namespace")?;
    File::from(ready)
        .write_all(b"1")
        .context("cannot signal the helper")?;
    let mut byte = [0u8; 1];
    if File::from(go).read(&mut byte).unwrap_or(0) != 1 {
        bail!("the helper did not map the session's ids");
    }
    userns::become_root()?;
    // A change of credentials clears the parent-death signal.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("cannot set the death signal")?;
    Ok(())
}

/// Resolve the program (PATH of the session's environment, inside the new root) and build
/// argv and envp.
fn exec_args(spec: &Spec) -> Result<(CString, Vec<CString>, Vec<CString>)> {
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| anyhow!("a NUL byte in {s:?}"));
    let first = spec.command.first().ok_or_else(|| anyhow!("no command"))?;
    let program = if first.contains('/') {
        first.clone()
    } else {
        let path = spec
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .map(|dir| format!("{dir}/{first}"))
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| anyhow!("{first}: command not found in the stage (PATH={path})"))?
    };
    let argv = spec
        .command
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    Ok((cstr(program.as_bytes())?, argv, envp))
}

fn mnt(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, target, fstype, flags, data).with_context(|| {
        format!(
            "cannot mount {} on {} ({})",
            source.map(|s| s.display().to_string()).unwrap_or_default(),
            target.display(),
            fstype.unwrap_or("bind")
        )
    })
}

/// Mount onto `target`, a directory pinned inside the new root (through its
/// `/proc/self/fd/N`, so nothing is resolved again); `name` is its path in the stage.
fn mnt_at(
    source: Option<&Path>,
    target: &pinned::Dir,
    name: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, &target.proc_path(), fstype, flags, data).with_context(|| {
        format!(
            "cannot mount {} on {name} in the stage ({})",
            source.map(|s| s.display().to_string()).unwrap_or_default(),
            fstype.unwrap_or("bind")
        )
    })
}

/// Inside the new namespaces: build the root and pivot into it.
///
/// Every path inside the new root is resolved inside it ([`pinned::Dir::in_root`]): the
/// stage's symlinks are followed as they will be after `pivot_root`, never to the host
/// (a stage whose `etc` points at a host directory gets its resolv.conf inside the stage),
/// and never into a mount made here (those are host directories).
fn setup_root(spec: &Spec) -> Result<()> {
    let none: Option<&Path> = None;
    mnt(
        none,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let mut options = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.lower.display(),
        spec.upper.display(),
        spec.work.display()
    );
    if spec.userxattr {
        options.push_str(",userxattr");
    }
    mnt(
        Some(Path::new("overlay")),
        &spec.merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(&options),
    )?;
    let root = pinned::Dir::open(&spec.merged)?;
    let make = |target: &str| {
        root.in_root(target, true, false)
            .with_context(|| format!("cannot create {target} in the stage"))
    };
    for (source, target, read_only) in &spec.mounts {
        let at = make(target)?;
        mnt_at(
            Some(source),
            &at,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        if *read_only {
            // The same path again, now onto the bind mount: checked to be the source.
            let top = root.in_root(target, false, true)?;
            let source_stat = nix::sys::stat::stat(source)
                .with_context(|| format!("{}: cannot stat", source.display()))?;
            if !pinned::same_file(&top.stat()?, &source_stat) {
                bail!("{target}: the bind mount of {} moved", source.display());
            }
            mnt_at(
                none,
                &top,
                target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(&top),
                None,
            )?;
        }
    }
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt_at(
        Some(Path::new("proc")),
        &make("/proc")?,
        "/proc",
        Some("proc"),
        nosuid,
        None,
    )?;
    let sys = make("/sys")?;
    if mnt_at(
        Some(Path::new("sysfs")),
        &sys,
        "/sys",
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None,
    )
    .is_err()
    {
        // In a user namespace sysfs cannot be mounted anew: the host's, read-only.
        mnt_at(
            Some(Path::new("/sys")),
            &sys,
            "/sys",
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        let top = root.in_root("/sys", false, true)?;
        mnt_at(
            none,
            &top,
            "/sys",
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid | kept_flags(&top),
            None,
        )?;
    }
    setup_dev(&root)?;
    if let Some(resolv) = &spec.resolv_conf {
        write_resolv_conf(&make("/etc")?, resolv)
            .context("cannot write /etc/resolv.conf in the stage")?;
    }
    nix::unistd::sethostname(&spec.hostname).context("cannot set the hostname")?;
    nix::unistd::fchdir(root.fd()).context("cannot enter the new root")?;
    nix::unistd::pivot_root(".", ".").context("pivot_root failed")?;
    umount2(".", MntFlags::MNT_DETACH).context("cannot detach the old root")?;
    std::env::set_current_dir("/").context("cannot enter /")?;
    Ok(())
}

/// The flags of the mount at `dir` that a bind remount must repeat: in a user namespace the
/// kernel refuses a remount that would drop them (they are locked).
fn kept_flags(dir: &pinned::Dir) -> MsFlags {
    use nix::sys::statvfs::{FsFlags, fstatvfs};
    let Ok(st) = fstatvfs(dir.fd()) else {
        return MsFlags::empty();
    };
    let mut flags = MsFlags::empty();
    for (have, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(have) {
            flags |= keep;
        }
    }
    flags
}

/// Replace `resolv.conf` in the (pinned) `etc` with a new file holding `content`; a
/// symlink there is replaced, not followed.
fn write_resolv_conf(etc: &pinned::Dir, content: &[u8]) -> Result<()> {
    use nix::fcntl::OFlag;
    let name = "resolv.conf";
    match nix::unistd::unlinkat(etc.fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => bail!("cannot replace it: {e}"),
    }
    let fd = nix::fcntl::openat(
        etc.fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?;
    File::from(fd).write_all(content)?;
    Ok(())
}

/// A minimal /dev: a tmpfs with the host's null, zero, full, random, urandom and tty bound
/// in, a private devpts, /dev/shm and the usual symlinks.
fn setup_dev(root: &pinned::Dir) -> Result<()> {
    let at = root
        .in_root("/dev", true, false)
        .context("cannot create /dev in the stage")?;
    mnt_at(
        Some(Path::new("tmpfs")),
        &at,
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755,size=65536k"),
    )?;
    // The new tmpfs, found through the same path: it is ours and empty, so plain paths
    // below its /proc/self/fd/N are safe.
    let top = root.in_root("/dev", false, true)?;
    let fs = nix::sys::statfs::fstatfs(top.fd()).context("cannot stat /dev")?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        bail!("/dev in the stage is not the tmpfs just mounted there");
    }
    let dev = top.proc_path();
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let at = dev.join(node);
        File::create(&at).with_context(|| format!("cannot create /dev/{node}"))?;
        let host = Path::new("/dev").join(node);
        mnt(Some(&host), &at, None, MsFlags::MS_BIND, None)?;
    }
    let own_filesystems = [
        (
            "pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (name, fstype, flags, data) in own_filesystems {
        let at = dev.join(name);
        fs::create_dir(&at).with_context(|| format!("cannot create /dev/{name}"))?;
        mnt(
            Some(Path::new(fstype)),
            &at,
            Some(fstype),
            flags,
            Some(data),
        )?;
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .with_context(|| format!("cannot create /dev/{name}"))?;
    }
    Ok(())
}
