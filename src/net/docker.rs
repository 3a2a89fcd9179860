//! The Docker Engine API connection, one for Docker and Podman alike, used by the engine
//! (sessions in containers) and by publishing (`load`): the first engine that answers at
//! `DOCKER_HOST` or the default sockets, its API version negotiated, and cleared of the
//! containers of runs that were killed (their makers are told by the [`owner`] labels).

pub mod owner;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};

use self::owner::Owner;

/// How long the engine has to answer `GET /_ping` (and the version query).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The client's timeout for a response's headers. Long: loading a big image or waiting for a
/// build answers only at the end; the quick calls have their own shorter timeouts.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Timeout of the quick calls (inspect, create, start, stop, remove).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

const START_HINT: &str = "start Docker, or run `podman system service --time=0 \
                          unix:///run/podman/podman.sock`, or set DOCKER_HOST";

pub async fn remove_container(docker: &Docker, name: &str) -> Result<()> {
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
pub async fn connect() -> Result<Docker> {
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
pub async fn quick<T>(
    call: impl Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or(Err(EngineError::RequestTimeoutError))
}

pub fn is_not_found(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}
