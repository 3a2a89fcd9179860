//! The Docker Engine API engine: a [`Session`] runs in a container of Docker or Podman (its
//! Docker-compatible service), reached through `DOCKER_HOST` or the default sockets.
//!
//! The raw image comes from the image store, imported from the stage first when the store
//! lacks it or holds an image of that name from another stage (its `org.gentoo-mkimg.stage`
//! label is not the stage's digest). It is loaded into the engine only when the engine does
//! not already have that very image: a docker-archive is streamed from the store into
//! `POST /images/load` by a writer thread, never held in memory nor written to disk.
//!
//! The container is privileged, on the host's network, with the session's binds, hostname and
//! environment; its output is streamed live (attached before it starts) and its exit status is
//! returned. It is removed whatever happens: after it exits, after an error, and on SIGINT or
//! SIGTERM (stopped first, then the command returns 130 or 143). Each container is named
//! `gentoo-mkimg-<id>` and labelled `org.gentoo-mkimg.session=<id>` and with the process that
//! made it (boot id, pid namespace, pid, start time: see [`owner`]). A run killed outright
//! (SIGKILL) cannot remove its container, so every connection to the engine first removes the
//! containers whose maker is gone, and says so in one line.

mod owner;

use std::collections::HashMap;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, ResizeContainerTTYOptionsBuilder,
    StopContainerOptionsBuilder, TagImageOptionsBuilder, WaitContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use tokio::signal::unix::{Signal, SignalKind, signal};

use self::owner::Owner;
use super::Session;
use crate::image::layer::LayerCompression;
use crate::image::store::Store;
use crate::image::{StoredImage, open_image};
use crate::import::{ImportOptions, STAGE_LABEL, import};
use crate::publish::docker_archive;

/// The label every container of ours carries; its value is the session id.
pub const SESSION_LABEL: &str = "org.gentoo-mkimg.session";

/// How long the engine has to answer `GET /_ping` (and the version query).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The client's timeout for a response's headers. Long: loading a big image or waiting for a
/// build answers only at the end; the quick calls have their own shorter timeouts.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Timeout of the quick calls (inspect, create, start, stop, remove).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds the container has to end after SIGTERM before it is killed, on our signal.
const STOP_GRACE_SECS: i32 = 3;
/// How long the output may trail behind the container's exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs the command with a clean environment; every stage3 has it (coreutils, or busybox).
const ENV_PROGRAM: &str = "/usr/bin/env";
/// Chunks of archive in flight between the writer thread and the request body.
const LOAD_CHUNKS_IN_FLIGHT: usize = 8;

const START_HINT: &str = "start Docker, or run `podman system service --time=0 \
                          unix:///run/podman/podman.sock`, or set DOCKER_HOST";

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

async fn remove_container(docker: &Docker, name: &str) -> Result<()> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match quick(docker.remove_container(name, Some(options))).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("cannot remove container {name}")),
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
// The engine

/// The addresses to try: `DOCKER_HOST`, or Docker's then Podman's default sockets.
fn candidate_hosts() -> Vec<String> {
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && !host.trim().is_empty()
    {
        return vec![host.trim().to_string()];
    }
    let mut hosts = vec![
        "unix:///var/run/docker.sock".to_string(),
        "unix:///run/podman/podman.sock".to_string(),
    ];
    if let Ok(dir) = std::env::var("XDG_RUNTIME_DIR")
        && !dir.is_empty()
    {
        hosts.push(format!("unix://{dir}/podman/podman.sock"));
    }
    hosts
}

/// The first engine that answers, its API version negotiated, cleared of the containers of
/// runs that were killed (see [`remove_orphans`]).
async fn connect() -> Result<Docker> {
    let mut tried = Vec::new();
    let from_env = std::env::var("DOCKER_HOST").is_ok_and(|h| !h.trim().is_empty());
    for host in candidate_hosts() {
        match connect_to(&host).await {
            Ok(docker) => {
                tracing::debug!("using the engine at {host}");
                remove_orphans(&docker).await;
                return Ok(docker);
            }
            Err(e) => tried.push(format!("{host} ({})", e.root_cause())),
        }
    }
    let hint = if from_env {
        "start the engine there, or set DOCKER_HOST to one that runs (unset, the default \
         sockets are tried)"
    } else {
        START_HINT
    };
    bail!("no Docker engine answers at {}: {hint}", tried.join(", "))
}

async fn connect_to(host: &str) -> Result<Docker> {
    let timeout = RESPONSE_TIMEOUT.as_secs();
    let version = bollard::API_DEFAULT_VERSION;
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        if !std::path::Path::new(path).exists() {
            bail!("no such socket");
        }
        Docker::connect_with_unix(host, timeout, version)?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, timeout, version)?
    } else {
        bail!("unsupported address: use unix:///PATH or tcp://HOST:PORT");
    };
    let answered = tokio::time::timeout(CONNECT_TIMEOUT, async {
        docker.ping().await?;
        docker.negotiate_version().await
    })
    .await;
    match answered {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(anyhow!(e)),
        Err(_) => bail!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
    }
}

/// Remove the containers whose maker is gone (a run killed before it could remove them), and
/// say so in one line. Containers without maker labels, or of another host, boot or pid
/// namespace, are left alone. A failure here only warns: it does not stop this run.
async fn remove_orphans(docker: &Docker) {
    let me = match Owner::current() {
        Ok(me) => me,
        Err(e) => {
            tracing::warn!("cannot look for containers of killed runs: {e:#}");
            return;
        }
    };
    let filters = HashMap::from([("label", vec![owner::PID_LABEL])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let containers = match quick(docker.list_containers(Some(options))).await {
        Ok(containers) => containers,
        Err(e) => {
            tracing::warn!("cannot list containers to remove those of killed runs: {e}");
            return;
        }
    };
    let mut removed = Vec::new();
    for container in containers {
        let (Some(id), Some(labels)) = (container.id, container.labels) else {
            continue;
        };
        if !Owner::from_labels(&labels).is_some_and(|o| o.is_gone(&me)) {
            continue;
        }
        let name = container
            .names
            .and_then(|n| n.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.clone());
        match remove_container(docker, &id).await {
            Ok(()) => removed.push(name),
            Err(e) => tracing::warn!("{name}, left by a killed run: {e:#}"),
        }
    }
    if !removed.is_empty() {
        tracing::warn!(
            "removed {} container(s) left by killed gentoo-mkimg runs: {}",
            removed.len(),
            removed.join(", ")
        );
    }
}

/// A quick call, bounded by [`CALL_TIMEOUT`].
async fn quick<T>(call: impl Future<Output = Result<T, EngineError>>) -> Result<T, EngineError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or(Err(EngineError::RequestTimeoutError))
}

fn is_not_found(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
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
        .manifests
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
            image.reference, image.config.digest
        )
    })?;
    Ok(config["config"]["Labels"][STAGE_LABEL]
        .as_str()
        .map(str::to_string))
}

/// The engine's image id for `reference`, or `None` when it has no such image.
async fn engine_image_id(docker: &Docker, reference: &str) -> Result<Option<String>> {
    match quick(docker.inspect_image(reference)).await {
        Ok(info) => Ok(info.id),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("cannot inspect image {reference}")),
    }
}

/// Whether the engine's image id is this image: the config digest (Docker's classic store,
/// Podman) or the manifest digest (Docker's containerd image store).
fn is_our_image(id: &str, image: &StoredImage) -> bool {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex == image.config.digest.hex() || hex == image.manifest.digest.hex()
}

/// Make sure `reference` names `image` in the engine, loading it when needed.
async fn ensure_engine_image(docker: &Docker, store: &Store, image: &StoredImage) -> Result<()> {
    let reference = image.reference.as_str();
    match engine_image_id(docker, reference).await? {
        Some(id) if is_our_image(&id, image) => {
            tracing::debug!("the engine has {reference} ({id})");
            return Ok(());
        }
        Some(id) => tracing::info!(
            "the engine's {reference} is another image ({id}); loading {}",
            image.config.digest
        ),
        None => tracing::info!("loading {reference} into the engine"),
    }
    let loaded = load(docker, store, image).await?;
    if let Some(id) = engine_image_id(docker, reference).await?
        && is_our_image(&id, image)
    {
        return Ok(());
    }
    // Podman names a loaded image as it likes (docker.io/..., localhost/...): name it ours.
    let (repo, tag) = reference
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .unwrap_or((reference, "latest"));
    let mut sources = vec![image.config.digest.to_string()];
    sources.extend(loaded);
    let mut last_error = None;
    for source in &sources {
        let options = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
        match quick(docker.tag_image(source, Some(options))).await {
            Ok(()) => {
                if let Some(id) = engine_image_id(docker, reference).await?
                    && is_our_image(&id, image)
                {
                    return Ok(());
                }
            }
            Err(e) => last_error = Some(e),
        }
    }
    let why = last_error.map(|e| format!(": {e}")).unwrap_or_default();
    bail!(
        "the engine loaded {} but does not name it {reference} (tried tagging {}){why}",
        image.config.digest,
        sources.join(", ")
    )
}

/// Load `images` from the store into the engine (DOCKER_HOST or the default sockets), each
/// under its own name; an image the engine already has is not sent again.
pub fn load_images(store: &Store, images: &[StoredImage]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let docker = connect().await?;
        for image in images {
            ensure_engine_image(&docker, store, image)
                .await
                .with_context(|| format!("cannot load {} into the engine", image.reference))?;
        }
        Ok(())
    })
}

/// A `Write` that hands its bytes to the request body, in chunks, through a bounded channel.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Stream `image` as a docker-archive into `POST /images/load`; what the engine said it
/// loaded (names or ids), for tagging.
async fn load(docker: &Docker, store: &Store, image: &StoredImage) -> Result<Vec<String>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(LOAD_CHUNKS_IN_FLIGHT);
    let writer = {
        let store = store.clone();
        let images = vec![image.clone()];
        std::thread::Builder::new()
            .name("docker-archive".to_string())
            .spawn(move || -> Result<()> {
                let out = BufWriter::with_capacity(1 << 20, ChannelWriter { tx: tx.clone() });
                let written = docker_archive::write_to(&store, &images, out)
                    .and_then(|mut out| out.flush().context("cannot send the archive"));
                if let Err(e) = &written {
                    // Make the request fail rather than end as if the archive were complete.
                    let _ = tx.blocking_send(Err(io::Error::other(format!("{e:#}"))));
                }
                written
            })
            .context("cannot start the docker-archive writer")?
    };
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let options = ImportImageOptionsBuilder::new().quiet(true).build();
    let mut responses = docker.import_image(options, bollard::body_try_stream(body), None);
    let mut loaded = Vec::new();
    let mut failure = None;
    while let Some(item) = responses.next().await {
        match item {
            Ok(info) => {
                for line in [info.stream, info.status].into_iter().flatten() {
                    tracing::debug!("load: {}", line.trim_end());
                    loaded.extend(loaded_names(&line));
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(responses);
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| anyhow!("the docker-archive writer failed: {e}"))?
        .map_err(|_| anyhow!("the docker-archive writer panicked"))?;
    let what = format!("cannot load {} into the engine", image.reference);
    match (written, failure) {
        // The archive's own error explains the engine's.
        (Err(e), _) => Err(e).context(what),
        (Ok(()), Some(e)) => Err(anyhow!(e)).context(what),
        (Ok(()), None) => Ok(loaded),
    }
}

/// Names and ids from a load message: `Loaded image: NAME`, `Loaded image(s): A,B`,
/// `Loaded image ID: sha256:...`.
fn loaded_names(line: &str) -> Vec<String> {
    let line = line.trim();
    let Some((head, rest)) = line.split_once(": ") else {
        return Vec::new();
    };
    if !head.starts_with("Loaded image") {
        return Vec::new();
    }
    rest.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
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
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_messages_give_names_and_ids() {
        assert_eq!(
            loaded_names("Loaded image: localhost/a-raw:1\n"),
            ["localhost/a-raw:1"]
        );
        assert_eq!(
            loaded_names("Loaded image(s): docker.io/x/a:1,localhost/b:2"),
            ["docker.io/x/a:1", "localhost/b:2"]
        );
        assert_eq!(loaded_names("Loaded image ID: sha256:abc"), ["sha256:abc"]);
        assert!(loaded_names("Getting image source signatures").is_empty());
    }
}
