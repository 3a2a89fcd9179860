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
        None => crate::inputs::tag_from_stage(&opts.stage),
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
        env: engine::session_env(&opts.env)?,
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
