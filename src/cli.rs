//! Command-line definitions (clap). Parsing only: the commands live in their own modules.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::EngineKind;
use crate::image::layer::LayerCompression;

/// Build Gentoo container images (musl stages first of all) from a stage3 tarball and a
/// Portage snapshot, without a Docker daemon.
///
/// Images are kept in an OCI image layout directory (the store, ./images by default), from
/// which they can be written as a docker-archive, loaded into Docker or Podman, or pushed.
#[derive(Debug, Parser)]
#[command(name = "gentoo-mkimg", version, propagate_version = true)]
pub struct Cli {
    /// The image store: an OCI image layout directory.
    #[arg(long, global = true, env = "GENTOO_MKIMG_STORE", default_value = "images")]
    pub store: PathBuf,

    /// Where `packages/TAG` (binary packages), `portage/TAG` (the extracted snapshot) and
    /// `distfiles/` are kept.
    #[arg(long, global = true, env = "GENTOO_MKIMG_WORK_DIR", default_value = ".")]
    pub work_dir: PathBuf,

    /// Cache for extracted stages and per-run files
    /// [default: $XDG_CACHE_HOME/gentoo-mkimg or ~/.cache/gentoo-mkimg].
    #[arg(long, global = true, env = "GENTOO_MKIMG_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Say more (repeat for debug output).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn a stage3 tarball into a one-layer image in the store (what `docker import` did).
    Import(ImportArgs),
    /// List the images in the store.
    Images,
    /// Run a command (default: a login shell) inside a stage, with the snapshot at
    /// /var/db/repos/gentoo (read-only), packages/TAG at /var/cache/binpkgs and distfiles/
    /// at /var/cache/distfiles.
    Shell(ShellArgs),
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The stage3 tarball.
    pub stage3: PathBuf,

    /// Portage tree: a directory or a snapshot tarball (extracted once into portage/TAG).
    #[arg(long)]
    pub snapshot: Option<PathBuf>,

    /// Tag naming packages/TAG and portage/TAG [default: the stage's timestamp or name].
    #[arg(long)]
    pub tag: Option<String>,

    /// Where the command runs.
    #[arg(long, value_enum, default_value_t = EngineKind::Sandbox)]
    pub engine: EngineKind,

    /// Set NAME=VALUE in the command's environment (repeatable).
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,

    /// Keep the session's scratch files (the sandbox's upper dir) for inspection.
    #[arg(long)]
    pub keep: bool,

    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The stage3 tarball (xz, bzip2, gzip, zstd or plain tar; detected from its content).
    pub stage3: PathBuf,

    /// Name for the image, e.g. localhost/gentoo-musl-raw:20260214 (tag defaults to latest).
    pub reference: String,

    /// Compression of the image layer.
    #[arg(long, value_enum, default_value_t = LayerCompression::Gzip)]
    pub compression: LayerCompression,

    /// Also write the image as a docker-archive (for `docker load` / `podman load`).
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,

    /// Set the platform (e.g. linux/arm/v7) instead of reading it from the stage's binaries.
    #[arg(long)]
    pub platform: Option<String>,
}
