//! The `gentoo-mkimg` binary: parse the command line, run the library, report errors as one
//! line and an exit status.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use gentoo_mkimg::cli::{Cli, Command};
use gentoo_mkimg::config::InputSettings;
use gentoo_mkimg::image::reference::Reference;
use gentoo_mkimg::image::store::Store;
use gentoo_mkimg::inputs::{self, InputOptions, Inputs, Source, VerifyMode};
use gentoo_mkimg::progress::Verbosity;
use gentoo_mkimg::{audit, build, config, engine, images, import, inspect, publish, shell};

fn main() -> ExitCode {
    // The sandbox engine re-executes this binary as its helper inside new namespaces.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == engine::sandbox::INIT_ARG {
        let code = engine::sandbox::init_main(std::path::Path::new(&args[2]));
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    // An ordinary user's sandbox runs this binary again in a user namespace (see
    // engine::userns): that second run enters it here, before anything else.
    if let Err(err) = engine::userns::enter_if_reexecuted() {
        eprintln!("gentoo-mkimg: error: {err:#}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else if cli.verbose > 0 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    init_logging(verbosity, cli.verbose);
    match run(cli, verbosity) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("gentoo-mkimg: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn init_logging(verbosity: Verbosity, level: u8) {
    let filter = match (verbosity, level) {
        (Verbosity::Quiet, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GENTOO_MKIMG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// The cache directory: --cache-dir, else $XDG_CACHE_HOME/gentoo-mkimg, else
/// ~/.cache/gentoo-mkimg.
fn cache_dir(cli: &Cli) -> Result<std::path::PathBuf> {
    if let Some(dir) = &cli.cache_dir {
        return Ok(dir.clone());
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(std::path::PathBuf::from(xdg).join("gentoo-mkimg"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(std::path::PathBuf::from(home).join(".cache/gentoo-mkimg")),
        None => anyhow::bail!("neither --cache-dir, XDG_CACHE_HOME nor HOME is set"),
    }
}

/// The inputs step, set up from the merged settings.
fn inputs(cli: &Cli, settings: InputSettings, verbosity: Verbosity) -> Result<Inputs> {
    let mut opts = InputOptions::new(cache_dir(cli)?, verbosity);
    opts.verify = match settings.verify() {
        Some(true) => VerifyMode::Always,
        Some(false) => VerifyMode::Never,
        None => VerifyMode::Auto,
    };
    if let Some(mirror) = settings.mirror {
        opts.mirror = mirror;
    }
    opts.keyring = settings.keyring;
    if let Some(keys) = settings.trusted_keys.filter(|k| !k.is_empty()) {
        opts.pins = keys
            .iter()
            .map(|k| {
                k.parse()
                    .map_err(|e| anyhow::anyhow!("trusted key {k:?}: {e}"))
            })
            .collect::<Result<_>>()?;
    }
    Ok(Inputs::new(opts))
}

fn local(inputs: &Inputs, spec: &str, what: &str) -> Result<std::path::PathBuf> {
    let source = Source::parse(spec)?;
    Ok(inputs
        .get(&source)
        .map_err(|e| e.context(format!("the {what}")))?
        .path)
}

fn run(cli: Cli, verbosity: Verbosity) -> Result<ExitCode> {
    let store = Store::new(&cli.store);
    match &cli.command {
        Command::Shell(args) => {
            if args.engine == engine::EngineKind::Sandbox {
                if let Some(code) = engine::userns::reexec_for_user()? {
                    return Ok(exit_code(code));
                }
                engine::sandbox::check_usable()?; // before anything is downloaded
            }
            let inputs = inputs(&cli, args.inputs.clone(), verbosity)?;
            let opts = shell::ShellOptions {
                stage: local(&inputs, &args.stage3, "stage3")?,
                snapshot: args
                    .snapshot
                    .as_deref()
                    .map(|s| local(&inputs, s, "snapshot"))
                    .transpose()?,
                tag: args.tag.clone(),
                engine: args.engine,
                env: args.env.clone(),
                command: args.command.clone(),
                keep: args.keep,
                work_dir: cli.work_dir.clone(),
                cache_dir: cache_dir(&cli)?,
                store,
                verbosity,
            };
            let code = shell::shell(&opts)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Command::Build(args) => {
            let file = match &args.config {
                Some(path) => config::ConfigFile::load(path)?,
                None => config::ConfigFile::default(),
            };
            let mut given = args.settings.clone();
            given.tag = given.tag.or(args.tag_option.clone());
            let settings = given.or(file.settings);
            // Refuse an unusable engine or settings before anything is downloaded.
            if settings.engine() == engine::EngineKind::Sandbox {
                if let Some(code) = engine::userns::reexec_for_user()? {
                    return Ok(exit_code(code));
                }
                engine::sandbox::check_usable()?;
            }
            let (stage3, snapshot) = settings.sources()?;
            let platform_sources = match settings.platforms()?.len() {
                0 | 1 => Vec::new(),
                _ => settings.platform_sources()?,
            };
            let inputs = inputs(&cli, args.inputs.clone().or(file.inputs), verbosity)?;
            let resolving = std::time::Instant::now();
            let mut stages = Vec::new();
            for (platform, source) in &platform_sources {
                let path = inputs
                    .get(source)
                    .with_context(|| format!("the stage3 of {platform}"))?
                    .path;
                stages.push((platform.clone(), path));
            }
            let stage3 = match stages.first() {
                Some((_, path)) => path.clone(),
                None => inputs.get(&stage3).context("the stage3")?.path,
            };
            let snapshot = inputs.get(&snapshot).context("the snapshot")?.path;
            let inputs_took = resolving.elapsed();
            let plan = settings.into_plan(stage3, snapshot)?;
            let opts = build::BuildOptions {
                plan,
                work_dir: cli.work_dir.clone(),
                cache_dir: cache_dir(&cli)?,
                store,
                verbosity,
                source_date_epoch: import::source_date_epoch()?,
                force: args.force,
                fresh_packages: args.fresh_packages,
                snapshot_tag: None,
                stage_digest: None,
            };
            // What is published: the images of one platform, or the indexes of several (and,
            // in an archive, which holds no index, every platform's images by their names).
            let (names, archived) = if stages.is_empty() {
                let mut summary = build::build(&opts)?;
                summary
                    .phases
                    .insert(0, ("inputs (fetch, verify)".to_string(), inputs_took));
                if verbosity != Verbosity::Quiet {
                    print!("{}", summary.render());
                }
                let names = vec![
                    summary.dev.image.reference.clone(),
                    summary.rt.image.reference.clone(),
                ];
                (
                    names,
                    vec![summary.raw, summary.dev.image, summary.rt.image],
                )
            } else {
                let summary = build::platforms::build_platforms(&opts, &stages)?;
                if verbosity != Verbosity::Quiet {
                    println!(
                        "inputs (fetch, verify)         {:>7.1}s",
                        inputs_took.as_secs_f64()
                    );
                    print!("{}", summary.render());
                }
                let names = summary.indexes[1..]
                    .iter()
                    .map(|(name, _)| name.clone())
                    .collect();
                let archived = summary
                    .builds
                    .into_iter()
                    .flat_map(|(_, b)| [b.raw, b.dev.image, b.rt.image])
                    .collect();
                (names, archived)
            };
            if let Some(path) = &args.archive {
                publish::docker_archive::write(&opts.store, &archived, path)?;
            }
            if args.load {
                publish::daemon::load(&opts.store, &names)?;
            }
            if args.push {
                let push = publish::registry::PushOptions {
                    insecure_registries: args.insecure_registries.clone(),
                    verbosity,
                    ..Default::default()
                };
                let mut pusher = publish::registry::Pusher::new(&opts.store, push)?;
                for name in &names {
                    let report = pusher.push(name)?;
                    println!("{} {}", report.reference, report.digest);
                }
            }
        }
        Command::Import(args) => {
            let inputs = inputs(&cli, args.inputs.clone(), verbosity)?;
            let reference: Reference = args.reference.parse()?;
            let mut opts = import::ImportOptions {
                stage: std::path::PathBuf::new(),
                reference,
                compression: args.compression,
                platform: None,
                source_date_epoch: import::source_date_epoch()?,
                verbosity,
                stage_digest: None,
            };
            if let [stage3] = args.stage3.as_slice() {
                opts.stage = local(&inputs, stage3, "stage3")?;
                opts.platform = args.platform.as_deref().map(str::parse).transpose()?;
                let image = import::import(&store, &opts)?;
                if let Some(path) = &args.archive {
                    publish::docker_archive::write(&store, std::slice::from_ref(&image), path)?;
                }
                if verbosity != Verbosity::Quiet {
                    println!("{} {}", image.reference, image.manifest.digest());
                }
                return Ok(ExitCode::SUCCESS);
            }
            // Several stages: one per platform, in the order --platform lists them.
            let platforms = match &args.platform {
                Some(list) => gentoo_mkimg::image::config::Platform::parse_list(list)?,
                None => Vec::new(),
            };
            if platforms.len() != args.stage3.len() {
                anyhow::bail!(
                    "{} stages need --platform with as many platforms, in their order \
                     (got {})",
                    args.stage3.len(),
                    platforms.len()
                );
            }
            let mut stages = Vec::new();
            for (platform, spec) in platforms.into_iter().zip(&args.stage3) {
                stages.push((platform, local(&inputs, spec, "stage3")?));
            }
            opts.stage = stages[0].1.clone();
            let imported = import::import_platforms(&store, &opts, &stages, &|_, _| Ok(()))?;
            let images: Vec<_> = imported
                .images
                .iter()
                .map(|(_, i)| i.image.clone())
                .collect();
            if let Some(path) = &args.archive {
                publish::docker_archive::write(&store, &images, path)?;
            }
            if verbosity != Verbosity::Quiet {
                for ((platform, _), image) in imported.images.iter().zip(&images) {
                    println!("{} {} {platform}", image.reference, image.manifest.digest());
                }
                println!("{} {}", opts.reference, imported.index.digest());
            }
        }
        Command::Fetch(args) => {
            let inputs = inputs(&cli, args.inputs.clone(), verbosity)?;
            for spec in &args.sources {
                let got = inputs.get(&Source::parse(spec)?)?;
                if verbosity == Verbosity::Verbose {
                    for check in &got.checks {
                        eprintln!("  {check}");
                    }
                }
                println!("{}", got.path.display());
            }
        }
        Command::Verify(args) => {
            let settings = InputSettings {
                keyring: args.keyring.clone(),
                trusted_keys: Some(args.trusted_keys.clone()),
                verify: Some(true),
                ..Default::default()
            };
            let inputs = inputs(&cli, settings, verbosity)?;
            let mut failed = false;
            for file in &args.files {
                let checks = inputs.check_local(file)?;
                let name = file.display();
                let verdict = inputs::verify::ensure_trusted(&name.to_string(), &checks);
                println!("{name}:");
                for check in &checks {
                    println!("  {check}");
                }
                match verdict {
                    Ok(()) => println!("  verified"),
                    Err(e) => {
                        println!("  NOT VERIFIED: {e:#}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Gc(args) => {
            print!("{}", gentoo_mkimg::image::gc::gc(&store, args.dry_run)?);
        }
        Command::Load(args) => {
            publish::daemon::load(&store, &args.references)?;
        }
        Command::Check(args) => {
            let mut failed = false;
            for reference in &args.references {
                let report = audit::audit_image(&store, reference)
                    .with_context(|| format!("cannot check {reference}"))?;
                for problem in &report.problems {
                    println!("{reference}: {problem}");
                }
                failed |= !report.problems.is_empty();
                if verbosity != Verbosity::Quiet {
                    eprintln!("{reference}: {}", report.summary());
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Push(args) => {
            let opts = publish::registry::PushOptions {
                insecure_registries: args.insecure_registries.clone(),
                verbosity,
                ..Default::default()
            };
            let refs =
                publish::registry::expand_references(&store, &args.references, args.all_tags)?;
            let mut pusher = publish::registry::Pusher::new(&store, opts)?;
            for reference in &refs {
                let report = pusher.push(reference)?;
                println!("{} {}", report.reference, report.digest);
                if verbosity != Verbosity::Quiet {
                    eprintln!("{report}");
                }
            }
        }
        Command::Index(args) => {
            let opts = publish::registry::PushOptions {
                insecure_registries: args.insecure_registries.clone(),
                verbosity,
                ..Default::default()
            };
            let report = publish::index::assemble(&args.target, &args.sources, &opts)?;
            println!("{} {}", report.reference, report.digest);
            if verbosity != Verbosity::Quiet {
                eprintln!("{report}");
            }
        }
        Command::Inspect(args) => {
            let platform = args.platform.as_deref().map(str::parse).transpose()?;
            let report = if args.remote {
                let opts = publish::registry::PushOptions {
                    insecure_registries: args.insecure_registries.clone(),
                    verbosity,
                    ..Default::default()
                };
                let mut puller = publish::pull::Puller::new(opts)?;
                inspect::inspect_remote(&mut puller, &args.reference, platform.as_ref())
            } else {
                inspect::inspect_store(&store, &args.reference, platform.as_ref())
            }
            .with_context(|| format!("cannot inspect {}", args.reference))?;
            if args.json {
                println!("{}", report.to_json()?);
            } else {
                print!("{}", report.render_table());
            }
        }
        Command::Tag(args) => {
            let source: Reference = args.source.parse()?;
            let target: Reference = args.target.parse()?;
            let manifest = store.resolve(&source.to_string())?;
            store.tag(&target.to_string(), manifest)?;
        }
        Command::Images => {
            let rows = images::list(&store)?;
            let width = rows
                .iter()
                .map(|r| r.reference.len())
                .max()
                .unwrap_or(9)
                .max(9);
            println!(
                "{:width$}  {:19}  {:>10}  {:20}  PLATFORMS",
                "REFERENCE", "DIGEST", "SIZE", "CREATED"
            );
            for row in rows {
                println!(
                    "{:width$}  {:19}  {:>10}  {:20}  {}",
                    row.reference,
                    &row.digest.as_str()[..19],
                    gentoo_mkimg::progress::human_size(row.size),
                    row.created,
                    row.platforms.join(",")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
