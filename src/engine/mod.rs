//! Where a build runs: a [`Session`] (stage, mounts, environment, command) and the two
//! engines that can run one.
//!
//! - [`sandbox`]: built in, no daemon. The stage is extracted once per stage digest into a
//!   cache and each session runs on an overlayfs view of it, in new mount, pid, uts and ipc
//!   namespaces, as the root of a user namespace that is no root of the host.
//! - [`docker`]: the Docker Engine API, for Docker and Podman alike. The raw image comes from
//!   the image store and is loaded into the engine when it lacks it.
//!
//! Both give the command the same view: the mounts at the same places, /proc, /sys, /dev,
//! the host's network and resolv.conf, a hostname, a clean environment, and its exit status.

pub mod binfmt;
pub mod docker;
pub mod export;
pub mod sandbox;
pub mod userns;

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::image::reference::Reference;
use crate::image::store::Store;
use crate::progress::Verbosity;

/// Which engine runs a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Built-in sandbox: namespaces, a user namespace, overlayfs (root, or a user with
    /// /etc/subuid ids; no daemon).
    Sandbox,
    /// Docker or Podman through the Docker Engine API (DOCKER_HOST or the default socket).
    Docker,
}

/// A host directory made visible inside the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute host path (must exist).
    pub source: PathBuf,
    /// Absolute path inside the stage, e.g. `/var/db/repos/gentoo`.
    pub target: String,
    pub read_only: bool,
}

/// Everything an engine needs to run one command in a stage, as plain values.
#[derive(Debug, Clone)]
pub struct Session {
    /// The stage3 tarball.
    pub stage: PathBuf,
    /// Its SHA-256 (hex), hashed once by whoever made the session: it names the extracted
    /// stage (sandbox) and is checked against the raw image's label (docker).
    pub stage_digest: String,
    /// The image store, where the docker engine finds (or imports) the raw image.
    pub store: Store,
    /// Name of the raw image made from `stage` (the docker engine's image).
    pub raw_reference: Reference,
    pub mounts: Vec<Mount>,
    /// The whole environment of the command (nothing is inherited from the host).
    pub env: Vec<(String, String)>,
    /// The command and its arguments; never empty.
    pub command: Vec<String>,
    /// Attach the terminal (stdin, tty) for an interactive command.
    pub interactive: bool,
    pub hostname: String,
    /// Cache directory of the tool (extracted stages, per-run dirs).
    pub cache_dir: PathBuf,
    /// Keep the per-run directories (sandbox upper dir) for inspection.
    pub keep: bool,
    pub verbosity: Verbosity,
}

/// Run `session` with the chosen engine; the command's exit status (128+N for a signal).
pub fn run(kind: EngineKind, session: &Session) -> Result<i32> {
    match kind {
        EngineKind::Sandbox => sandbox::run(session),
        EngineKind::Docker => docker::run(session),
    }
}

/// Run `session`, reading the trees it hands back with `read` while it runs: the command
/// writes each of `exports`, in that order, as a tar stream into the named pipe
/// [`export::EXPORT_DIR`]`/NAME` (see [`export`]; the same in both engines).
pub fn run_exporting<T: Send>(
    kind: EngineKind,
    session: &Session,
    exports: &[&str],
    read: &export::ReadExport<'_, T>,
) -> Result<export::Outcome<T>> {
    match kind {
        EngineKind::Sandbox => sandbox::run_exporting(session, exports, read),
        EngineKind::Docker => docker::run_exporting(session, exports, read),
    }
}

/// The command's environment: a clean PATH, HOME, TERM and LANG plus `extra`.
pub fn session_env(extra: &[String]) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOME".to_string(), "/root".to_string()),
        (
            "TERM".to_string(),
            std::env::var("TERM").unwrap_or_else(|_| "dumb".to_string()),
        ),
        (
            "LANG".to_string(),
            std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".to_string()),
        ),
    ];
    for item in extra {
        let Some((name, value)) = item.split_once('=') else {
            bail!("-e {item:?}: expected NAME=VALUE");
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("-e {item:?}: {name:?} is not a valid variable name");
        }
        env.retain(|(k, _)| k != name);
        env.push((name.to_string(), value.to_string()));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_is_clean_plus_extras() {
        let env = session_env(&["USE=-X".into(), "PATH=/bin".into()]).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("USE"), Some("-X"));
        assert_eq!(get("HOME"), Some("/root"));
        assert!(session_env(&["NOVALUE".into()]).is_err());
        assert!(session_env(&["BAD NAME=1".into()]).is_err());
    }
}
