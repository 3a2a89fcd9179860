//! User namespaces for the sandbox: which host ids a stage's ids become, and how an ordinary
//! user gets the 65536 ids a stage needs.
//!
//! - Run as root (the initial user namespace), a session's stage gets the host ids
//!   `base..base+65535`: the range of the user `gentoo-mkimg` in `/etc/subuid` and
//!   `/etc/subgid` if there is one, else [`DEFAULT_BASE`]. Its root is that `base`, which owns
//!   nothing on the host.
//! - Run as an ordinary user, the whole tool first re-executes itself in a user namespace that
//!   maps root to the user and ids 1..65535 to the user's subordinate range
//!   (`newuidmap`/`newgidmap`, as rootless Podman does); there it is root over its own files
//!   and the stage's ids need no shift ([`IdShift::NONE`]).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, unshare};

use crate::archive::ids::{IdShift, subordinate_start};

/// The host ids of a root-run sandbox's stage when `/etc/subuid` has no range for
/// `gentoo-mkimg`: 2^31 - 131072, far above the ranges `useradd` hands out.
pub const DEFAULT_BASE: u32 = 2_147_352_576;

/// The user whose `/etc/subuid` and `/etc/subgid` range a root-run sandbox uses.
pub const RANGE_OWNER: &str = "gentoo-mkimg";

/// The environment variable that marks the re-executed tool (its value: the fds to sync on).
const REEXEC_ENV: &str = "GENTOO_MKIMG_USERNS_SYNC";

/// `(inside, outside, count)` lines of a `/proc/.../uid_map` or `gid_map`.
fn read_map(path: &str) -> Result<Vec<(u64, u64, u64)>> {
    let text = fs::read_to_string(path).with_context(|| format!("{path}: cannot read"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let n: Vec<u64> = l
                .split_whitespace()
                .map(|f| f.parse::<u64>())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("{path}: {l:?}: {e}"))?;
            match n[..] {
                [a, b, c] => Ok((a, b, c)),
                _ => bail!("{path}: {l:?}: not three numbers"),
            }
        })
        .collect()
}

/// Whether this process is in the initial user namespace (all 2^32 ids its own).
pub fn in_initial_namespace() -> bool {
    matches!(
        read_map("/proc/self/uid_map").as_deref(),
        Ok([(0, 0, 4_294_967_295)])
    )
}

/// Whether `map` maps every id in `0..count` (in one or more lines).
fn covers(map: &[(u64, u64, u64)], count: u64) -> bool {
    let mut next = 0;
    let mut lines = map.to_vec();
    lines.sort();
    for (inside, _, len) in lines {
        if inside <= next {
            next = next.max(inside + len);
        }
    }
    next >= count
}

/// The shift of a sandbox session's ids, or why this process cannot run one. Never
/// [`IdShift::NONE`] in the initial user namespace, always in any other: `NONE` says the tool
/// itself runs in a user namespace.
pub fn session_shift() -> Result<IdShift> {
    if in_initial_namespace() {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "the sandbox engine needs root, or a range of 65536 ids in /etc/subuid and \
                 /etc/subgid for this user (see the README); or use --engine docker"
            );
        }
        return root_base();
    }
    let count = u64::from(IdShift::COUNT);
    if !nix::unistd::geteuid().is_root()
        || !covers(&read_map("/proc/self/uid_map")?, count)
        || !covers(&read_map("/proc/self/gid_map")?, count)
    {
        bail!(
            "the sandbox engine runs in a user namespace that must map ids 0..65535 to this \
             process (root in it); this one does not; use --engine docker"
        );
    }
    Ok(IdShift::NONE)
}

/// The base of a root-run sandbox: `gentoo-mkimg`'s subordinate range, or [`DEFAULT_BASE`].
fn root_base() -> Result<IdShift> {
    let find = |file: &str| -> Option<u32> {
        let text = fs::read_to_string(file).ok()?;
        subordinate_start(&text, RANGE_OWNER, u32::MAX, IdShift::COUNT)
    };
    match (find("/etc/subuid"), find("/etc/subgid")) {
        // A range at 0 would make the stage's root the host's.
        (Some(0), _) | (_, Some(0)) => {
            bail!("/etc/subuid or /etc/subgid gives {RANGE_OWNER} a range starting at id 0")
        }
        (Some(u), Some(g)) if u == g => Ok(IdShift { base: u }),
        (None, None) => Ok(IdShift { base: DEFAULT_BASE }),
        (u, g) => bail!(
            "/etc/subuid and /etc/subgid give {RANGE_OWNER} different ranges ({u:?}, {g:?}); \
             the sandbox needs one start for both"
        ),
    }
}

/// Write the maps of a session's (new) user namespace, through the proc directory of its
/// first process (`/proc/PID`): ids 0..65535 to `base..base+65535`. With no shift (this
/// process is itself in a user namespace), the same ids, one line per line of this
/// process's own map: the kernel takes a line only if it lies within one line of the parent's.
pub fn write_maps(proc_dir: &std::path::Path, ids: IdShift) -> Result<()> {
    for name in ["uid_map", "gid_map"] {
        let text = if ids == IdShift::NONE {
            let own = read_map(&format!("/proc/self/{name}"))?;
            identity_lines(&own, u64::from(IdShift::COUNT))
        } else {
            format!("0 {} {}\n", ids.base, IdShift::COUNT)
        };
        let path = proc_dir.join(name);
        fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `id id count` lines mapping `0..count` onto themselves, split where `parent`'s lines split.
fn identity_lines(parent: &[(u64, u64, u64)], count: u64) -> String {
    let mut lines: Vec<(u64, u64)> = parent
        .iter()
        .filter(|(inside, _, _)| *inside < count)
        .map(|&(inside, _, len)| (inside, len.min(count - inside)))
        .collect();
    lines.sort();
    lines
        .iter()
        .map(|(first, len)| format!("{first} {first} {len}\n"))
        .collect()
}

/// For an ordinary user in the initial user namespace: run this same command again in a new
/// user namespace mapping root to the user and ids 1..65535 to the user's subordinate ranges.
/// Returns the command's exit status. `None` when no re-execution is needed (root, or
/// already in a user namespace).
pub fn reexec_for_user() -> Result<Option<i32>> {
    if nix::unistd::geteuid().is_root() || !in_initial_namespace() {
        return Ok(None);
    }
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let need = IdShift::COUNT - 1;
    let range = |file: &str, id: u32| -> Result<u32> {
        let text = fs::read_to_string(file).with_context(|| {
            format!(
                "{file}: cannot read; the sandbox engine needs a range of {need} subordinate \
                 ids for {name} there (or run as root, or use --engine docker)"
            )
        })?;
        subordinate_start(&text, &name, id, need).ok_or_else(|| {
            anyhow!(
                "{file} has no range of {need} ids for {name} (uid {id}); the sandbox engine \
                 needs one, as rootless Podman does (e.g. `usermod --add-subuids \
                 100000-165535 --add-subgids 100000-165535 {name}`), or use --engine docker"
            )
        })
    };
    let sub_uid = range("/etc/subuid", uid.as_raw())?;
    let sub_gid = range("/etc/subgid", gid.as_raw())?;
    for tool in ["newuidmap", "newgidmap"] {
        which(tool).ok_or_else(|| {
            anyhow!(
                "{tool} not found: the sandbox engine needs it to map this user's subordinate \
                 ids (Debian and Ubuntu: package uidmap); or run as root, or use --engine docker"
            )
        })?;
    }

    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot make a pipe");
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let exe = std::env::current_exe().context("cannot find the gentoo-mkimg executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1));
    cmd.env(
        REEXEC_ENV,
        format!("{},{}", ready_w.as_raw_fd(), go_r.as_raw_fd()),
    );
    let (keep_a, keep_b) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    // SAFETY: only fcntl and prctl between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [keep_a, keep_b] {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot re-run gentoo-mkimg in a user namespace")?;
    // Ctrl-C reaches the child directly (same process group): wait for it to end. SIGTERM
    // and SIGHUP are passed on, so the child cleans up as it would when run directly.
    FORWARD_TO.store(child.id() as i32, Ordering::SeqCst);
    // SAFETY: a plain ignore disposition, and a handler that only calls kill.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
    }
    drop(ready_w);
    drop(go_r);
    let mut byte = [0u8; 1];
    let unshared = fs::File::from(ready_r).read(&mut byte).unwrap_or(0) == 1;
    if unshared {
        let pid = child.id().to_string();
        let map = |tool: &str, id: u32, sub: u32| -> Result<()> {
            let out = Command::new(tool)
                .args([&pid, "0", &id.to_string(), "1", "1", &sub.to_string()])
                .arg(need.to_string())
                .output()
                .with_context(|| format!("cannot run {tool}"))?;
            if !out.status.success() {
                bail!(
                    "{tool} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let mapped = map("newuidmap", uid.as_raw(), sub_uid)
            .and_then(|()| map("newgidmap", gid.as_raw(), sub_gid));
        match mapped {
            Ok(()) => {
                let _ = fs::File::from(go_w).write_all(b"1");
            }
            Err(e) => {
                drop(go_w); // the child ends on EOF
                let _ = child.wait();
                return Err(e.context("cannot map this user's subordinate ids"));
            }
        }
    } else {
        drop(go_w);
    }
    let status = child.wait().context("cannot wait for gentoo-mkimg")?;
    use std::os::unix::process::ExitStatusExt;
    Ok(Some(
        status
            .code()
            .or(status.signal().map(|s| 128 + s))
            .unwrap_or(1),
    ))
}

/// In the re-executed tool (see [`reexec_for_user`]): enter the new user namespace, wait for
/// the maps, become its root. Does nothing in a process that was not re-executed.
pub fn enter_if_reexecuted() -> Result<()> {
    let Some(fds) = std::env::var_os(REEXEC_ENV) else {
        return Ok(());
    };
    // SAFETY: single-threaded at this point (called first thing in main).
    unsafe { std::env::remove_var(REEXEC_ENV) };
    let parse = || -> Option<(i32, i32)> {
        let s = fds.to_str()?;
        let (a, b) = s.split_once(',')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (ready, go) = parse().ok_or_else(|| anyhow!("{REEXEC_ENV}: malformed"))?;
    // SAFETY: the parent passed these two fds for us alone.
    let (ready, go): (OwnedFd, OwnedFd) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(ready), OwnedFd::from_raw_fd(go))
    };
    unshare(CloneFlags::CLONE_NEWUSER).context("cannot create a user namespace")?;
    fs::File::from(ready)
        .write_all(b"1")
        .context("cannot signal the parent")?;
    let mut byte = [0u8; 1];
    if fs::File::from(go).read(&mut byte).unwrap_or(0) != 1 {
        bail!("the user namespace was not set up (see the message above)");
    }
    become_root()
}

/// Become root of the user namespace this process just entered (its maps written).
pub fn become_root() -> Result<()> {
    let zero_g = nix::unistd::Gid::from_raw(0);
    let zero_u = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(zero_g, zero_g, zero_g).context("cannot become root's group")?;
    // Supplementary groups of the host mean nothing inside; setgroups may be denied.
    let _ = nix::unistd::setgroups(&[]);
    nix::unistd::setresuid(zero_u, zero_u, zero_u).context("cannot become root")?;
    Ok(())
}

static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_identity_map_follows_the_parents_lines() {
        let parent = [(0, 1000, 1), (1, 100_000, 65535)];
        assert_eq!(identity_lines(&parent, 65536), "0 0 1\n1 1 65535\n");
        assert_eq!(
            identity_lines(&[(0, 0, 4_294_967_295)], 65536),
            "0 0 65536\n"
        );
    }

    #[test]
    fn a_map_covers_the_ids_in_one_or_more_lines() {
        assert!(covers(&[(0, 1000, 1), (1, 100_000, 65535)], 65536));
        assert!(covers(&[(0, 0, 4_294_967_295)], 65536));
        assert!(!covers(&[(0, 1000, 1)], 65536));
        assert!(!covers(&[(0, 1000, 1), (2, 100_000, 65534)], 65536));
    }
}
