//! The Docker Engine API engine: a [`Session`] runs in a container of Docker or Podman (its
//! Docker-compatible service), reached through the one connection of [`crate::net::docker`].
//!
//! The raw image comes from the image store, imported from the stage first when the store
//! lacks it or holds an image of that name from another stage (its `org.gentoo-mkimg.stage`
//! label is not the stage's digest). It is loaded into the engine only when the engine does
//! not already have that very image ([`crate::publish::daemon::ensure_engine_image`]).
//!
//! The container is privileged, on the host's network, with the session's binds, hostname and
//! environment; its output is streamed live (attached before it starts) and its exit status is
//! returned. It is removed whatever happens: after it exits, after an error, and on SIGINT or
//! SIGTERM (stopped first, then the command returns 130 or 143). Each container is named
//! `gentoo-mkimg-<id>` and labelled `org.gentoo-mkimg.session=<id>` and with the process that
//! made it (boot id, pid namespace, pid, start time: see [`crate::net::docker::owner`]). A run
//! killed outright (SIGKILL) cannot remove its container, so every connection to the engine
//! first removes the containers whose maker is gone, and says so in one line.

use std::collections::HashMap;
use std::io::{self, IsTerminal};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ResizeContainerTTYOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::Session;
use crate::image::layer::LayerCompression;
use crate::image::store::{DescriptorExt, Store};
use crate::image::{StoredImage, open_image};
use crate::import::{ImportOptions, STAGE_LABEL, import};
use crate::net::docker::owner::Owner;
use crate::net::docker::{connect, is_not_found, quick, remove_container};
use crate::publish::daemon::ensure_engine_image;

/// The label every container of ours carries; its value is the session id.
pub const SESSION_LABEL: &str = "org.gentoo-mkimg.session";

/// Seconds the container has to end after SIGTERM before it is killed, on our signal.
const STOP_GRACE_SECS: i32 = 3;
/// How long the output may trail behind the container's exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs the command with a clean environment; every stage3 has it (coreutils, or busybox).
const ENV_PROGRAM: &str = "/usr/bin/env";

/// Run `session.command` in a container of the raw image; its exit status (130 after SIGINT,
/// 143 after SIGTERM).
pub fn run(session: &Session) -> Result<i32> {
    if session.command.is_empty() {
        bail!("no command to run");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = run_with(&rt, session);
    // A blocking read of the terminal (interactive sessions) never ends by itself.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Run `session` with the pipes of `exports` mounted, reading them with `read` (see
/// [`super::export`]). The pipe directory is the session's own, in the cache dir.
pub fn run_exporting<T: Send>(
    session: &Session,
    exports: &[&str],
    read: &super::export::ReadExport<'_, T>,
) -> Result<super::export::Outcome<T>> {
    let parent = session.cache_dir.join("exports");
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&parent)
        .with_context(|| format!("{}: cannot create a directory", parent.display()))?;
    // The engine's root (the host's, or the user's for a rootless engine) opens the pipes.
    super::export::with_pipes(&dir.path().join("pipes"), None, exports, read, |mount| {
        let mut session = session.clone();
        session.mounts.push(mount);
        run(&session)
    })
}

fn run_with(rt: &Runtime, session: &Session) -> Result<i32> {
    // Reach the engine first: a long import is wasted when there is none.
    let docker = rt.block_on(connect())?;
    let image = stored_image(session)?;
    let id = session_id();
    let mut guard = ContainerGuard {
        rt,
        docker: None,
        name: format!("gentoo-mkimg-{id}"),
    };
    let result = rt.block_on(run_in_engine(&docker, session, &image, &id, &mut guard));
    let removed = guard.remove();
    match (result, removed) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(also)) => {
            tracing::warn!("{also:#}");
            Err(e)
        }
    }
}

/// Removes the container (force, with its anonymous volumes) once it may exist: explicitly
/// through [`ContainerGuard::remove`], or on drop when an early return or a panic skipped
/// that. It is used outside the runtime, so it can block on it.
struct ContainerGuard<'a> {
    rt: &'a Runtime,
    /// Set just before the container is created.
    docker: Option<Docker>,
    name: String,
}

impl ContainerGuard<'_> {
    fn remove(&mut self) -> Result<()> {
        match self.docker.take() {
            Some(docker) => self.rt.block_on(remove_container(&docker, &self.name)),
            None => Ok(()),
        }
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!("{e:#}");
        }
    }
}

/// `<pid>-<time>-<n>` in hex: unique on this host.
fn session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    format!(
        "{:x}-{:x}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// The image

/// The raw image from the store, imported from the stage first when the store lacks it or
/// holds an image under that name that was not imported from this very stage (its
/// [`STAGE_LABEL`] is not the stage's digest).
fn stored_image(session: &Session) -> Result<StoredImage> {
    let reference = session.raw_reference.to_string();
    let stage = session.stage.display();
    let index = session.store.read_index()?;
    if index
        .manifests()
        .iter()
        .any(|d| d.ref_name() == Some(reference.as_str()))
    {
        let image = open_image(&session.store, &reference)?;
        let want = format!("sha256:{}", session.stage_digest);
        match stage_of(&session.store, &image)? {
            Some(found) if found == want => return Ok(image),
            found => tracing::warn!(
                "{reference} in the store was not imported from {stage} ({want}) but from {}; \
                 importing it again",
                found.as_deref().unwrap_or("an unknown stage")
            ),
        }
    } else {
        tracing::info!("{reference} is not in the store; importing {stage}");
    }
    let opts = ImportOptions {
        stage: session.stage.clone(),
        reference: session.raw_reference.clone(),
        compression: LayerCompression::Gzip,
        platform: None,
        source_date_epoch: crate::import::source_date_epoch()?,
        verbosity: session.verbosity,
        stage_digest: Some(session.stage_digest.clone()),
    };
    import(&session.store, &opts).with_context(|| format!("cannot import {stage} as {reference}"))
}

/// The stage `image` was imported from, as its config's [`STAGE_LABEL`] says.
fn stage_of(store: &Store, image: &StoredImage) -> Result<Option<String>> {
    let bytes = store.read_descriptor(&image.config)?;
    let config: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: the config {} is not valid JSON",
            image.reference,
            image.config.digest()
        )
    })?;
    Ok(config["config"]["Labels"][STAGE_LABEL]
        .as_str()
        .map(str::to_string))
}

// ---------------------------------------------------------------------------------------------
// The container

/// `source:target[:ro]` for each mount.
fn binds(session: &Session) -> Result<Vec<String>> {
    session
        .mounts
        .iter()
        .map(|m| {
            let source = m
                .source
                .to_str()
                .with_context(|| format!("mount source {}: not UTF-8", m.source.display()))?;
            if !m.source.is_absolute() || !m.target.starts_with('/') {
                bail!(
                    "mount {source} at {}: both paths must be absolute",
                    m.target
                );
            }
            if source.contains(':') || m.target.contains(':') {
                bail!(
                    "mount {source} at {}: a path with ':' cannot be bound by the engine",
                    m.target
                );
            }
            let mut bind = format!("{source}:{}", m.target);
            if m.read_only {
                bind.push_str(":ro");
            }
            Ok(bind)
        })
        .collect()
}

/// `NAME=VALUE` for each variable of the session, checked.
fn env_list(session: &Session) -> Result<Vec<String>> {
    session
        .env
        .iter()
        .map(|(name, value)| {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                bail!("environment variable {name:?}: not a valid name or value");
            }
            Ok(format!("{name}={value}"))
        })
        .collect()
}

/// The session label, and the maker's labels when this process can tell them.
fn labels(id: &str) -> HashMap<String, String> {
    let mut labels = HashMap::from([(SESSION_LABEL.to_string(), id.to_string())]);
    match Owner::current() {
        Ok(me) => labels.extend(me.labels()),
        Err(e) => tracing::warn!(
            "the container is not labelled with this process, so a later run cannot remove \
             it if this one is killed: {e:#}"
        ),
    }
    labels
}

fn container_config(
    session: &Session,
    image: &StoredImage,
    id: &str,
) -> Result<ContainerCreateBody> {
    let interactive = session.interactive;
    let env = env_list(session)?;
    // The engines add variables of their own (HOSTNAME; Podman also `container` and TERM,
    // Docker HOME when missing): `env -i` gives the command exactly the session's. It reads
    // its NAME=VALUE arguments up to the first one without '=', the command.
    if session.command.first().is_some_and(|c| c.contains('=')) {
        bail!(
            "command {:?}: a program name with '=' cannot be run",
            session.command[0]
        );
    }
    let mut entrypoint = vec![ENV_PROGRAM.to_string(), "-i".to_string(), "--".to_string()];
    entrypoint.extend(env.iter().cloned());
    Ok(ContainerCreateBody {
        image: Some(image.reference.clone()),
        entrypoint: Some(entrypoint),
        cmd: Some(session.command.clone()),
        env: Some(env),
        hostname: Some(session.hostname.clone()),
        working_dir: Some("/".to_string()),
        labels: Some(labels(id)),
        tty: Some(interactive),
        open_stdin: Some(interactive),
        stdin_once: Some(interactive),
        attach_stdin: Some(interactive),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(HostConfig {
            privileged: Some(true),
            network_mode: Some("host".to_string()),
            binds: Some(binds(session)?),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Everything in the engine: the image, the container, its run. The container is removed by
/// the caller's guard.
async fn run_in_engine(
    docker: &Docker,
    session: &Session,
    image: &StoredImage,
    id: &str,
    guard: &mut ContainerGuard<'_>,
) -> Result<i32> {
    let mut signals = Signals::new()?;
    tokio::select! {
        loaded = ensure_engine_image(docker, &session.store, image) => loaded?,
        code = signals.recv() => {
            tracing::warn!("interrupted while loading the image");
            return Ok(code);
        }
    }
    let config = container_config(session, image, id)?;
    let name = guard.name.clone();
    // The image's own platform, so that the engine runs a stage of another architecture as
    // that one (through its binfmt_misc handler) instead of refusing or guessing.
    let image_config = session.store.read_descriptor(&image.config)?;
    let platform = crate::image::oci::config_platform(&image_config)
        .map(|p| crate::image::oci::platform_text(&p))
        .with_context(|| format!("{}: its config", image.reference))?;
    let options = CreateContainerOptionsBuilder::new()
        .name(&name)
        .platform(&platform)
        .build();
    guard.docker = Some(docker.clone());
    quick(docker.create_container(Some(options), config))
        .await
        .with_context(|| format!("cannot create container {name} from {}", image.reference))?;
    // A signal that came during the create is still pending and is seen below.
    let code = tokio::select! {
        code = attach_start_wait(docker, &name, session.interactive) => code?,
        code = signals.recv() => {
            tracing::warn!("stopping container {name}");
            let options = StopContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
            tokio::select! {
                stopped = quick(docker.stop_container(&name, Some(options))) => {
                    if let Err(e) = stopped && !is_not_found(&e) {
                        tracing::warn!("cannot stop container {name}: {e}");
                    }
                }
                _ = signals.recv() => {} // a second signal: straight to removal
            }
            code
        }
    };
    Ok(code)
}

/// SIGINT and SIGTERM, as the exit status they give (130, 143).
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => 128 + libc::SIGINT,
            _ = self.term.recv() => 128 + libc::SIGTERM,
        }
    }
}

async fn attach_start_wait(docker: &Docker, name: &str, interactive: bool) -> Result<i32> {
    let options = AttachContainerOptionsBuilder::new()
        .stream(true)
        .stdin(interactive)
        .stdout(true)
        .stderr(true)
        .build();
    let attached = quick(docker.attach_container(name, Some(options)))
        .await
        .with_context(|| format!("cannot attach to container {name}"))?;
    let mut output = attached.output;
    let copy_out = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    stdout.write_all(&message).await?;
                    stdout.flush().await?;
                }
                Ok(LogOutput::StdErr { message }) => {
                    stderr.write_all(&message).await?;
                    stderr.flush().await?;
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => return Err(anyhow!(e).context("the container's output broke off")),
            }
        }
        Ok::<(), anyhow::Error>(())
    });
    let terminal = if interactive {
        let mut input = attached.input;
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let _ = tokio::io::copy(&mut stdin, &mut input).await;
            let _ = input.shutdown().await;
        });
        RawTerminal::enter()
    } else {
        None
    };
    quick(docker.start_container(name, None))
        .await
        .with_context(|| format!("cannot start container {name}"))?;
    let code = if interactive {
        let mut resized = signal(SignalKind::window_change()).ok();
        resize(docker, name).await;
        let wait = wait_exit(docker, name);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                code = &mut wait => break code?,
                Some(()) = async {
                    match resized.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => resize(docker, name).await,
            }
        }
    } else {
        wait_exit(docker, name).await?
    };
    drop(terminal);
    match tokio::time::timeout(DRAIN_TIMEOUT, copy_out).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("{e:#}"),
        Ok(Err(e)) => tracing::warn!("the output copier failed: {e}"),
        Err(_) => tracing::warn!("the container's output did not end after it exited"),
    }
    Ok(code)
}

/// The container's exit status, once it is not running.
async fn wait_exit(docker: &Docker, name: &str) -> Result<i32> {
    let options = WaitContainerOptionsBuilder::new()
        .condition("not-running")
        .build();
    let mut waits = docker.wait_container(name, Some(options));
    match waits.next().await {
        Some(Ok(response)) => Ok(response.status_code as i32),
        // bollard reports a non-zero status as an error; it is the command's status here.
        Some(Err(EngineError::DockerContainerWaitError { code, .. })) => Ok(code as i32),
        Some(Err(e)) => {
            Err(anyhow!(e)).with_context(|| format!("cannot wait for container {name}"))
        }
        None => bail!("the engine ended the wait for container {name} without a status"),
    }
}

/// Give the container's tty the size of ours.
async fn resize(docker: &Docker, name: &str) {
    let Some((rows, cols)) = terminal_size() else {
        return;
    };
    let options = ResizeContainerTTYOptionsBuilder::new()
        .h(i32::from(rows))
        .w(i32::from(cols))
        .build();
    if let Err(e) = quick(docker.resize_container_tty(name, options)).await {
        tracing::debug!("cannot resize the tty of {name}: {e}");
    }
}

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);

fn terminal_size() -> Option<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize it is given; the fd is open for the call.
    unsafe { tiocgwinsz(stdout.as_raw_fd(), &mut size) }.ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Our terminal in raw mode while attached to the container's tty; restored on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
