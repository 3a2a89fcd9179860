//! Command-line definitions (clap). Parsing only: the commands live in their own modules.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{InputSettings, Settings};
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
    #[arg(
        long,
        global = true,
        env = "GENTOO_MKIMG_STORE",
        default_value = "images"
    )]
    pub store: PathBuf,

    /// Where `packages/TAG` (binary packages), `portage/TAG` (the extracted snapshot) and
    /// `distfiles/` are kept.
    #[arg(
        long,
        global = true,
        env = "GENTOO_MKIMG_WORK_DIR",
        default_value = "."
    )]
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
    /// The whole job: the raw, dev and rt images from a stage3 and a Portage snapshot
    /// (`emerge -e @system @world` in the stage, then dev = everything, rt = the runtime
    /// closure of a base package set without headers and docs).
    Build(Box<BuildArgs>),
    /// List the images in the store.
    Images,
    /// Give an image of the store another name (e.g. a registry's, before `push`).
    Tag(TagArgs),
    /// Run a command (default: a login shell) inside a stage, with the snapshot at
    /// /var/db/repos/gentoo (read-only), packages/TAG at /var/cache/binpkgs and distfiles/
    /// at /var/cache/distfiles.
    Shell(ShellArgs),
    /// Push images from the store to the registries their names say (OCI distribution API).
    Push(PushArgs),
    /// Join images already pushed (one per platform, e.g. built on separate machines) into
    /// one multi-platform image index in their registry, named TARGET.
    Index(IndexArgs),
    /// Load images from the store into Docker or Podman (Docker Engine API: DOCKER_HOST or
    /// the default socket), named as in the store.
    Load(LoadArgs),
    /// Check that everything in an image can run: every ELF's interpreter and libraries,
    /// every script's #! interpreter, and /bin/sh are in the image (what `build` checks on
    /// rt). One line per problem, with the package that owns the file; exit status 1 if any.
    Check(CheckArgs),
    /// Download stage3s and snapshots into the cache and verify them, without building.
    Fetch(FetchArgs),
    /// Check local stage3s and snapshots against the companion files beside them
    /// (signatures by Gentoo's pinned keys, DIGESTS, .sha256, .md5sum, sha512sum.txt).
    Verify(VerifyArgs),
    /// Remove from the store every blob no image uses (and temporary files of killed runs),
    /// printing what went and the bytes freed.
    Gc(GcArgs),
    /// Show an image's platform, layers and installed packages (from its own /var/db/pkg:
    /// CAT/PF, SLOT, USE, LICENSE, size, repository), read from the layers without
    /// extracting them; from the store, or from its registry with --remote.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Sources: stage3:VARIANT[@TIMESTAMP], snapshot:latest, snapshot:YYYYMMDD,
    /// snapshot:sqfs:latest, or URLs.
    #[arg(required = true, value_name = "SOURCE")]
    pub sources: Vec<String>,
    #[command(flatten)]
    pub inputs: InputSettings,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Local stage3 tarballs or snapshots, with their companion files beside them.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// OpenPGP keys to verify with (as for build).
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Trust signatures by this key (as for build).
    #[arg(long = "trusted-key", value_name = "FINGERPRINT")]
    pub trusted_keys: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    /// An image in the store.
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Its new name; an image of that name is replaced (it stays in the store until `gc`).
    #[arg(value_name = "TARGET")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only print what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Images in the store.
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Images in the store.
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Images in the store, e.g. registry.example/gentoo/musl-rt:1 (no host: docker.io).
    #[arg(required = true, value_name = "REF")]
    pub references: Vec<String>,

    /// Push every image in the store of each REF's repository, whatever its tag.
    #[arg(long)]
    pub all_tags: bool,

    /// Allow plain HTTP and unverified TLS for HOST or HOST:PORT (repeatable; loopback
    /// hosts are always allowed).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The index to put, e.g. registry.example/gentoo/musl-rt:1.
    #[arg(value_name = "TARGET")]
    pub target: String,

    /// Images in TARGET's registry, one per platform, e.g.
    /// registry.example/gentoo/musl-rt:1-arm64; an index adds all its entries.
    #[arg(required = true, value_name = "SOURCE")]
    pub sources: Vec<String>,

    /// Allow plain HTTP and unverified TLS for HOST or HOST:PORT (repeatable; loopback
    /// hosts are always allowed).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub settings: Settings,
    /// A TOML config file (see examples/gentoo-mkimg.toml): the keys are the settings'
    /// option names; options here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Tag (same as the TAG argument).
    #[arg(long = "tag", value_name = "TAG", conflicts_with = "tag")]
    pub tag_option: Option<String>,
    /// Build even when nothing changed. Without it, a build whose inputs (stage, snapshot,
    /// repositories, settings, binary packages, the tool's version) are those of the dev and
    /// rt images in the store keeps them and builds nothing.
    #[arg(long)]
    pub force: bool,
    /// Start a new TAG's packages/TAG empty. Without it, a new TAG starts with hard links of
    /// the binary packages of the newest earlier TAG built for the same profile, and
    /// Portage rebuilds only those whose USE flags or dependencies changed.
    #[arg(long)]
    pub fresh_packages: bool,
    /// Push the dev and rt images to their registry afterwards (as `push`).
    #[arg(long)]
    pub push: bool,
    /// Load the dev and rt images into Docker or Podman afterwards (as `load`).
    #[arg(long)]
    pub load: bool,
    /// Also write the raw, dev and rt images as one docker-archive.
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
    /// Allow plain HTTP for this registry when pushing (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    #[command(flatten)]
    pub inputs: InputSettings,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The stage3: a tarball, a URL or stage3:VARIANT[@TIMESTAMP].
    pub stage3: String,

    /// Portage tree: a directory, a snapshot tarball or a squashfs snapshot (extracted once
    /// into portage/TAG), a URL, or snapshot:latest etc.
    #[arg(long)]
    pub snapshot: Option<String>,

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

    #[command(flatten)]
    pub inputs: InputSettings,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The stage3 tarball (xz, bzip2, gzip, zstd or plain tar; detected from its content),
    /// a URL or stage3:VARIANT[@TIMESTAMP]. Several, one per platform of --platform: each
    /// becomes REF:TAG-ARCH, and REF:TAG an image index of them.
    #[arg(required = true, num_args = 1..)]
    pub stage3: Vec<String>,

    /// Name for the image, e.g. localhost/gentoo-musl-raw:20260214 (tag defaults to latest).
    #[arg(required = true)]
    pub reference: String,

    /// Compression of the image layer.
    #[arg(long, value_enum, default_value_t = LayerCompression::Gzip)]
    pub compression: LayerCompression,

    /// Also write the image as a docker-archive (for `docker load` / `podman load`).
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,

    /// Set the platform (e.g. linux/arm/v7) instead of reading it from the stage's binaries.
    /// With several stages: each one's platform, comma-separated in their order (each stage
    /// must be its platform, as its binaries say).
    #[arg(long, value_name = "PLATFORM[,PLATFORM...]")]
    pub platform: Option<String>,

    #[command(flatten)]
    pub inputs: InputSettings,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image, e.g. localhost/gentoo-musl-rt:20260214 (no tag: latest).
    #[arg(value_name = "REF")]
    pub reference: String,

    /// Read the image from the registry its name says instead of the store (an index
    /// resolves to this host's platform, or --platform's).
    #[arg(long)]
    pub remote: bool,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// When the name is an image index of several platforms: the platform whose image to
    /// inspect, e.g. linux/arm64 [default: this host's].
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,

    /// With --remote: allow plain HTTP and unverified TLS for HOST or HOST:PORT (repeatable;
    /// loopback hosts are always allowed).
    #[arg(long = "insecure-registry", value_name = "HOST", requires = "remote")]
    pub insecure_registries: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of the definitions (ids that `conflicts_with` names exist, ...), and
    /// `--tag` is the TAG argument's other spelling.
    #[test]
    fn the_definitions_are_consistent_and_tag_has_two_spellings() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["gentoo-mkimg", "build", "s", "n", "--tag", "t1"]).unwrap();
        let Command::Build(build) = cli.command else {
            panic!("not a build");
        };
        assert_eq!(build.tag_option.as_deref(), Some("t1"));
        let both = [
            "gentoo-mkimg",
            "build",
            "s",
            "n",
            "r",
            "b",
            "t1",
            "--tag",
            "t2",
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }

    /// `--use "-X ipv6"`, the help's own example: a value that starts with "-" is the value,
    /// not an unknown option.
    #[test]
    fn use_flags_may_start_with_a_minus() {
        for args in [
            ["gentoo-mkimg", "build", "--use", "-X ipv6"],
            ["gentoo-mkimg", "build", "--use", "-extras"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Build(build) = cli.command else {
                panic!("not a build");
            };
            assert_eq!(build.settings.use_flags.as_deref(), Some(args[3]));
        }
    }
}
