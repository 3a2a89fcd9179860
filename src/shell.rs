//! `gentoo-mkimg shell`: run a command (by default an interactive login shell) inside a
//! stage, with the snapshot, binary packages and distfiles mounted where Portage expects them.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::engine::{self, EngineKind, Mount, Session};
use crate::image::reference::Reference;
use crate::image::store::Store;
use crate::progress::Verbosity;
use crate::snapshot;

/// What `shell` was asked to do, as plain values.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    pub stage: PathBuf,
    pub snapshot: Option<PathBuf>,
    pub tag: Option<String>,
    pub engine: EngineKind,
    /// Extra `NAME=VALUE` for the command's environment.
    pub env: Vec<String>,
    pub command: Vec<String>,
    pub keep: bool,
    /// Where `packages/TAG`, `portage/TAG` and `distfiles/` live.
    pub work_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub store: Store,
    pub verbosity: Verbosity,
}

/// A tag from a stage file name: its release timestamp (`20260214T170533Z`) when it has
/// one, otherwise the name without its tarball extensions.
pub fn tag_from_stage(stage: &Path) -> String {
    let name = stage
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        let rest = &bytes[i..];
        if rest.len() >= 16
            && rest[..8].iter().all(u8::is_ascii_digit)
            && rest[8] == b'T'
            && rest[9..15].iter().all(u8::is_ascii_digit)
            && rest[15] == b'Z'
        {
            return name[i..i + 16].to_string();
        }
    }
    let mut stem = name.as_str();
    for ext in [
        ".xz", ".bz2", ".gz", ".zst", ".tar", ".tgz", ".tbz2", ".txz",
    ] {
        stem = stem.strip_suffix(ext).unwrap_or(stem);
    }
    let tag: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    let tag = tag.trim_start_matches(['.', '-']).to_string();
    if tag.is_empty() {
        "latest".to_string()
    } else {
        tag
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

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}: cannot resolve", path.display()))
}

/// Run the shell session; the command's exit status.
pub fn shell(opts: &ShellOptions) -> Result<i32> {
    if !opts.stage.is_file() {
        bail!("{}: no such stage3 file", opts.stage.display());
    }
    if opts.engine == EngineKind::Sandbox {
        engine::sandbox::check_usable()?;
    }
    let tag = match &opts.tag {
        Some(t) => t.clone(),
        None => tag_from_stage(&opts.stage),
    };
    let raw_reference: Reference = format!("localhost/gentoo-raw:{tag}")
        .parse()
        .with_context(|| format!("--tag {tag:?}"))?;
    let work = absolute(&opts.work_dir)?;
    // packages/TAG and portage/TAG are this session's until it ends (a build waits).
    let _lock = crate::build::lock::lock_tag(&work, &tag, "shell")?;
    let packages = work.join("packages").join(&tag);
    let distfiles = work.join("distfiles");
    for dir in [&packages, &distfiles] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let mut mounts = Vec::new();
    if let Some(snap) = &opts.snapshot {
        let (tree, _) = snapshot::prepare(snap, &work.join("portage").join(&tag), opts.verbosity)?;
        mounts.push(Mount {
            source: absolute(&tree)?,
            target: "/var/db/repos/gentoo".to_string(),
            read_only: true,
        });
    }
    mounts.push(Mount {
        source: packages,
        target: "/var/cache/binpkgs".to_string(),
        read_only: false,
    });
    mounts.push(Mount {
        source: distfiles,
        target: "/var/cache/distfiles".to_string(),
        read_only: false,
    });
    let interactive = opts.command.is_empty();
    let command = if interactive {
        vec!["/bin/bash".to_string(), "--login".to_string()]
    } else {
        opts.command.clone()
    };
    let stage = absolute(&opts.stage)?;
    let stage_digest = crate::archive::digest::sha256_file(&stage)?;
    let session = Session {
        stage,
        stage_digest,
        store: opts.store.clone(),
        raw_reference,
        mounts,
        env: session_env(&opts.env)?,
        command,
        interactive: interactive && std::io::stdin().is_terminal(),
        hostname: format!("gentoo-mkimg-{}", tag.to_ascii_lowercase())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(63)
            .collect(),
        cache_dir: absolute(&opts.cache_dir)?,
        keep: opts.keep,
        verbosity: opts.verbosity,
    };
    engine::run(opts.engine, &session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_from_stage_names() {
        let t = |n: &str| tag_from_stage(Path::new(n));
        assert_eq!(
            t("stage3-amd64-musl-openrc-20260214T170533Z.tar.xz"),
            "20260214T170533Z"
        );
        assert_eq!(
            t("/x/stage3-amd64-musl-20200101T000000Z.tar.bz2"),
            "20200101T000000Z"
        );
        assert_eq!(t("my stage.tar.zst"), "my_stage");
        assert_eq!(t(".tar"), "latest");
    }

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
