//! `gentoo-mkimg load` and `build --load`: images from the store into Docker or Podman,
//! through the Docker Engine API (the one connection of [`crate::net::docker`]), each streamed
//! as a docker-archive into `POST /images/load` by a writer thread (never held in memory nor
//! written to disk), named as in the store; an image the engine has already is not sent.

use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::query_parameters::{ImportImageOptionsBuilder, TagImageOptionsBuilder};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::image::store::Store;
use crate::image::{StoredImage, open_image};
use crate::net::docker::{connect, is_not_found, quick};
use crate::publish::docker_archive;

/// Load the store's images `references` into the engine.
pub fn load(store: &Store, references: &[String]) -> Result<()> {
    let images = references
        .iter()
        .map(|r| open_image(store, r))
        .collect::<Result<Vec<_>>>()?;
    load_images(store, &images)
}

/// Chunks of archive in flight between the writer thread and the request body.
const LOAD_CHUNKS_IN_FLIGHT: usize = 8;

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
    hex == image.config.digest().digest() || hex == image.manifest.digest().digest()
}

/// Make sure `reference` names `image` in the engine, loading it when needed.
pub async fn ensure_engine_image(
    docker: &Docker,
    store: &Store,
    image: &StoredImage,
) -> Result<()> {
    let reference = image.reference.as_str();
    match engine_image_id(docker, reference).await? {
        Some(id) if is_our_image(&id, image) => {
            tracing::debug!("the engine has {reference} ({id})");
            return Ok(());
        }
        Some(id) => tracing::info!(
            "the engine's {reference} is another image ({id}); loading {}",
            image.config.digest()
        ),
        None => tracing::info!("loading {reference} into the engine"),
    }
    let loaded = send_archive(docker, store, image).await?;
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
    let mut sources = vec![image.config.digest().to_string()];
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
        image.config.digest(),
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
async fn send_archive(docker: &Docker, store: &Store, image: &StoredImage) -> Result<Vec<String>> {
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
