//! Pushing one image's blobs: each checked with `HEAD`, cross-mounted or uploaded (one
//! streaming `PUT`, or `PATCH` chunks for very large blobs, resumed where the registry says
//! it stands), its bytes checked against the digest while they are sent.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use reqwest::header::{self};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::image::StoredImage;
use crate::image::store::{CorruptBlob, Descriptor, DescriptorExt, Digest, Found, Store};
use crate::net::{Failure, Retries, Tried};

use super::client::*;
use super::*;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub(super) uploaded: usize,
    pub(super) mounted: usize,
    pub(super) skipped: usize,
    /// The registry answered the manifest's `PUT` with `OCI-Subject`.
    pub(super) subject_kept: bool,
}

pub(super) enum BlobOutcome {
    Skipped,
    Mounted,
    Uploaded,
}

/// Pushing one image.
pub(super) struct ImagePush<'a> {
    pub(super) registry: &'a Registry,
    pub(super) store: &'a Store,
    pub(super) opts: &'a PushOptions,
    pub(super) image: &'a StoredImage,
    pub(super) repository: &'a str,
    pub(super) tag: &'a str,
    pub(super) sources: BTreeMap<Digest, Vec<String>>,
    pub(super) bars: Option<&'a MultiProgress>,
    pub(super) sent: Arc<AtomicU64>,
}

/// The check of one blob's upload: its bytes hashed in order, once, however often retries
/// and resumed chunks read them again. The reader that reaches the blob's end gets the
/// verdict before it sends the last bytes, so a wrong blob never completes an upload.
pub(super) struct UploadCheck {
    pub(super) path: PathBuf,
    pub(super) digest: Digest,
    pub(super) size: u64,
    pub(super) state: Mutex<CheckState>,
}

pub(super) struct CheckState {
    pub(super) hasher: Sha256,
    /// Bytes hashed so far (from the start of the blob).
    pub(super) hashed: u64,
    /// Set once the blob turned out wrong.
    pub(super) corrupt: Option<CorruptBlob>,
}

impl UploadCheck {
    pub(super) fn new(path: PathBuf, digest: Digest, size: u64) -> Self {
        UploadCheck {
            path,
            digest,
            size,
            state: Mutex::new(CheckState {
                hasher: Sha256::new(),
                hashed: 0,
                corrupt: None,
            }),
        }
    }

    pub(super) fn corrupt(&self, found: Found) -> CorruptBlob {
        CorruptBlob {
            path: self.path.clone(),
            digest: self.digest.clone(),
            size: Some(self.size),
            found,
        }
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was found wrong with the blob, if anything yet.
    pub(super) fn failure(&self) -> Option<CorruptBlob> {
        self.state().corrupt.clone()
    }

    pub(super) fn fail(&self, found: Found) -> CorruptBlob {
        let mut state = self.state();
        state
            .corrupt
            .get_or_insert_with(|| self.corrupt(found))
            .clone()
    }

    /// Take `data`, read from `file` at `at`: hash what is new, and once the whole blob is
    /// hashed, judge it (a blob longer than its descriptor says is wrong too).
    pub(super) fn feed(
        &self,
        file: &std::fs::File,
        at: u64,
        data: &[u8],
    ) -> Result<(), CorruptBlob> {
        use std::os::unix::fs::FileExt;
        let mut state = self.state();
        if let Some(c) = &state.corrupt {
            return Err(c.clone());
        }
        if at > state.hashed {
            // A resumed upload skipped bytes no reader of ours read: hash them from the file.
            let mut gap = vec![0u8; (at - state.hashed) as usize];
            if file.read_exact_at(&mut gap, state.hashed).is_err() {
                let found = Found::Size(file.metadata().map(|m| m.len()).unwrap_or(0));
                return Err(state.corrupt.insert(self.corrupt(found)).clone());
            }
            state.hasher.update(&gap);
            state.hashed = at;
        }
        let end = at + data.len() as u64;
        if end > state.hashed {
            let new = &data[(state.hashed - at) as usize..];
            state.hasher.update(new);
            state.hashed = end;
            if end == self.size {
                let mut probe = [0u8; 1];
                let found = if file.read_at(&mut probe, self.size).is_ok_and(|n| n > 0) {
                    Some(Found::Longer)
                } else {
                    let got = Digest::from_sha256(state.hasher.clone().finalize().as_slice());
                    (got != self.digest).then_some(Found::Content(self.size, got))
                };
                if let Some(found) = found {
                    return Err(state.corrupt.insert(self.corrupt(found)).clone());
                }
            }
        }
        Ok(())
    }
}

/// Read `len` bytes of `path` from `offset` on a blocking thread, a few chunks ahead of the
/// network, as a request body; `check` sees every byte, and a blob that is not what it
/// should be ends the body with an error instead of its last bytes.
pub(super) fn file_body(
    check: &Arc<UploadCheck>,
    offset: u64,
    len: u64,
    activity: Activity,
    sent: Arc<AtomicU64>,
    bar: Option<ProgressBar>,
) -> Result<reqwest::Body> {
    pub(super) const CHUNK: u64 = 1 << 20;
    let path = &check.path;
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open blob", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("{}: cannot seek", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let shown = path.display().to_string();
    let check = check.clone();
    std::thread::Builder::new()
        .name("blob-reader".into())
        .spawn(move || {
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                let mut buf = vec![0u8; n];
                let item = match file.read_exact(&mut buf) {
                    Ok(()) => check
                        .feed(&file, at, &buf)
                        .map(|()| Bytes::from(buf))
                        .map_err(std::io::Error::other),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
                        Err(std::io::Error::other(check.fail(Found::Size(on_disk))))
                    }
                    Err(e) => Err(std::io::Error::new(
                        e.kind(),
                        format!("{shown}: cannot read: {e}"),
                    )),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return; // the request is gone, or we told it why
                }
                at += n as u64;
            }
        })
        .context("cannot start a reader thread")?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .map(move |item| {
        if let Ok(chunk) = &item {
            activity.touch();
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let Some(bar) = &bar {
                bar.inc(chunk.len() as u64);
            }
        }
        item
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

impl ImagePush<'_> {
    pub(super) async fn run(&self) -> Result<Counts> {
        let registry = self.registry;
        let repo = self.repository;
        let mut all_sources: Vec<String> = Vec::new();
        for list in self.sources.values() {
            for s in list.iter().take(self.opts.max_mount_sources) {
                if !all_sources.contains(s) {
                    all_sources.push(s.clone());
                }
            }
        }
        all_sources.truncate(16);
        registry.set_scopes(repo, &all_sources);

        // Layers first, the config last, a few at a time.
        let blobs: Vec<&Descriptor> = self
            .image
            .layers
            .iter()
            .chain(std::iter::once(&self.image.config))
            .collect();
        let results: Vec<Result<BlobOutcome>> = futures_util::stream::iter(blobs.iter())
            .map(|d| self.ensure_blob(d))
            .buffer_unordered(self.opts.concurrency.max(1))
            .collect()
            .await;
        let mut counts = Counts::default();
        for r in results {
            match r? {
                BlobOutcome::Skipped => counts.skipped += 1,
                BlobOutcome::Mounted => counts.mounted += 1,
                BlobOutcome::Uploaded => counts.uploaded += 1,
            }
        }
        // Every blob is confirmed before the tag can point at them.
        for d in &blobs {
            if !registry.has_blob(repo, &d.blob()?).await? {
                bail!(
                    "{}: blob {} is not in {repo} after its upload; the manifest was not pushed",
                    registry.host,
                    d.digest()
                );
            }
        }
        let bytes = self.store.read_descriptor(&self.image.manifest)?;
        let (reported, subject_kept) = registry
            .put_manifest(
                repo,
                self.tag,
                self.image.manifest.kind(),
                Bytes::from(bytes),
            )
            .await?;
        if let Some(reported) = reported
            && reported != self.image.manifest.digest().to_string()
        {
            bail!(
                "{}: the registry stored the manifest as {reported}, not {}",
                registry.host,
                self.image.manifest.digest()
            );
        }
        counts.subject_kept = subject_kept;
        known()
            .entry(registry.host.clone())
            .or_default()
            .entry(repo.to_string())
            .or_default()
            .extend(blobs.iter().filter_map(|d| d.blob().ok()));
        tracing::info!(
            "{}/{repo}:{} is {}",
            registry.host,
            self.tag,
            self.image.manifest.digest()
        );
        Ok(counts)
    }

    /// Make sure the repository has blob `desc`: skip, mount or upload it.
    pub(super) async fn ensure_blob(&self, desc: &Descriptor) -> Result<BlobOutcome> {
        let registry = self.registry;
        let repo = self.repository;
        let digest = &desc.blob()?;
        if registry.has_blob(repo, digest).await? {
            tracing::info!("{repo}: {digest} is there already");
            return Ok(BlobOutcome::Skipped);
        }
        let mut session: Option<Url> = None;
        let sources = self.sources.get(digest).cloned().unwrap_or_default();
        for from in sources.iter().take(self.opts.max_mount_sources) {
            if let Some(old) = session.take() {
                registry.cancel_upload(repo, old).await;
            }
            match registry.start_upload(repo, digest, Some(from)).await? {
                None => {
                    tracing::info!("{repo}: mounted {digest} from {from}");
                    return Ok(BlobOutcome::Mounted);
                }
                Some(location) => session = Some(location),
            }
        }
        self.upload(desc, session).await?;
        Ok(BlobOutcome::Uploaded)
    }

    pub(super) fn bar(&self, desc: &Descriptor) -> Option<ProgressBar> {
        let multi = self.bars?;
        let bar = multi.add(ProgressBar::new(desc.size()));
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!(
            "push {}",
            desc.digest().digest().get(..12).unwrap_or("")
        ));
        Some(bar)
    }

    /// Upload blob `desc` from the store, starting over (or resuming, chunked) after a
    /// failure, `retry.tries` times at most.
    pub(super) async fn upload(&self, desc: &Descriptor, mut session: Option<Url>) -> Result<()> {
        let registry = self.registry;
        let repo = self.repository;
        let digest = &desc.blob()?;
        let path = self.store.blob_path(digest);
        let on_disk = std::fs::metadata(&path)
            .with_context(|| format!("{}: cannot read blob {digest}", path.display()))?
            .len();
        let check = Arc::new(UploadCheck::new(path, digest.clone(), desc.size()));
        if on_disk != desc.size() {
            return Err(check.fail(Found::Size(on_disk)).into());
        }
        let bar = self.bar(desc);
        let chunked = desc.size() >= self.opts.chunk_threshold && self.opts.chunk_size > 0;
        let mut retries = Retries::new(&registry.retry);
        let what = format!("{}: upload of {digest} to {repo}", registry.host);
        // (session URL, bytes the registry has) of an upload in progress.
        let mut resume: Option<(Url, u64)> = None;
        loop {
            let (mut location, mut offset) = match resume.take() {
                Some(r) => r,
                None => match session.take() {
                    Some(s) => (s, 0),
                    None => match registry.start_upload(repo, digest, None).await? {
                        Some(s) => (s, 0),
                        None => bail!("internal error: an upload started as a mount"),
                    },
                },
            };
            if let Some(bar) = &bar {
                bar.set_position(offset);
            }
            let result = if chunked {
                self.send_chunks(desc, &check, &mut location, &mut offset, bar.clone())
                    .await
            } else {
                self.send_whole(desc, &check, &location, bar.clone()).await
            };
            // A corrupt blob is what failed the request (or would fail every retry).
            if let Some(corrupt) = check.failure() {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                registry.cancel_upload(repo, location).await;
                return Err(corrupt.into());
            }
            match result {
                Ok(()) => {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    tracing::info!("{repo}: uploaded {digest} ({} bytes)", desc.size());
                    return Ok(());
                }
                Err(failure) => {
                    let delay = match retries.judge(&what, failure) {
                        Ok(delay) => delay,
                        Err(e) => {
                            // No session is left open at the registry.
                            registry.cancel_upload(repo, location).await;
                            return Err(e);
                        }
                    };
                    tokio::time::sleep(delay).await;
                    if chunked {
                        resume = self.upload_status(&location).await;
                        if let Some((_, at)) = &resume {
                            tracing::info!("{repo}: resuming the upload of {digest} at byte {at}");
                        }
                    }
                    if resume.is_none() {
                        registry.cancel_upload(repo, location).await;
                    }
                }
            }
        }
    }

    /// Where an interrupted upload stands, if the registry still has it consistent.
    pub(super) async fn upload_status(&self, location: &Url) -> Option<(Url, u64)> {
        let registry = self.registry;
        let activity = Activity::new();
        let Ok(resp) = registry
            .attempt(
                Some(self.repository),
                registry.client.get(location.clone()),
                &activity,
            )
            .await
        else {
            return None;
        };
        if resp.status() != StatusCode::NO_CONTENT {
            return None;
        }
        let range = resp.headers().get(header::RANGE)?.to_str().ok()?;
        let end: u64 = range.split_once('-')?.1.trim().parse().ok()?;
        let next = registry.location(&resp, "upload status").ok()?;
        Some((next, end + 1))
    }

    /// One streaming `PUT` of the whole blob to the session at `location`.
    pub(super) async fn send_whole(
        &self,
        desc: &Descriptor,
        check: &Arc<UploadCheck>,
        location: &Url,
        bar: Option<ProgressBar>,
    ) -> Tried<()> {
        let registry = self.registry;
        let mut url = location.clone();
        url.query_pairs_mut()
            .append_pair("digest", desc.digest().as_ref());
        let activity = Activity::new();
        let body = file_body(
            check,
            0,
            desc.size(),
            activity.clone(),
            self.sent.clone(),
            bar,
        )?;
        let req = registry
            .client
            .put(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, desc.size())
            .body(body);
        self.put_blob(req, &activity).await
    }

    /// `PATCH` the rest of the blob from `offset` in chunks, then the closing `PUT`.
    pub(super) async fn send_chunks(
        &self,
        desc: &Descriptor,
        check: &Arc<UploadCheck>,
        location: &mut Url,
        offset: &mut u64,
        bar: Option<ProgressBar>,
    ) -> Tried<()> {
        let registry = self.registry;
        while *offset < desc.size() {
            let len = (desc.size() - *offset).min(self.opts.chunk_size);
            let activity = Activity::new();
            let body = file_body(
                check,
                *offset,
                len,
                activity.clone(),
                self.sent.clone(),
                bar.clone(),
            )?;
            let req = registry
                .client
                .patch(location.clone())
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .header(
                    header::CONTENT_RANGE,
                    format!("{}-{}", *offset, *offset + len - 1),
                )
                .body(body);
            let outcome = registry
                .attempt(Some(self.repository), req, &activity)
                .await;
            let resp = self
                .finished(outcome, StatusCode::ACCEPTED, "PATCH blob")
                .await?;
            *location = registry.location(&resp, "PATCH blob")?;
            *offset += len;
        }
        let mut url = location.clone();
        url.query_pairs_mut()
            .append_pair("digest", desc.digest().as_ref());
        let activity = Activity::new();
        let req = registry.client.put(url).header(header::CONTENT_LENGTH, "0");
        self.put_blob(req, &activity).await
    }

    /// The `PUT` that ends an upload (with the whole blob, or empty after the chunks).
    async fn put_blob(&self, req: reqwest::RequestBuilder, activity: &Activity) -> Tried<()> {
        let outcome = self
            .registry
            .attempt(Some(self.repository), req, activity)
            .await;
        self.finished(outcome, StatusCode::CREATED, "PUT blob")
            .await
            .map(|_| ())
    }

    /// Judge the answer to an upload request.
    pub(super) async fn finished(
        &self,
        outcome: Tried<reqwest::Response>,
        expected: StatusCode,
        what: &str,
    ) -> Tried<reqwest::Response> {
        let registry = self.registry;
        let resp = match outcome {
            Ok(resp) => resp,
            Err(Failure::Retry { err, after }) => {
                return Err(Failure::Retry {
                    err: anyhow!("{what}: {err:#}"),
                    after,
                });
            }
            Err(fatal) => return Err(fatal),
        };
        let status = resp.status();
        if status == expected {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            // A token that expired during a long upload: a new one, and start over.
            registry
                .take_challenge(&resp, Some(self.repository))
                .await?;
            return Err(Failure::Retry {
                err: anyhow!("{what}: HTTP 401, authenticated again"),
                after: Some(Duration::ZERO),
            });
        }
        let text = body_text(resp, registry.stall).await;
        if matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::RANGE_NOT_SATISFIABLE
        ) {
            // The session is gone or out of step: start over.
            return Err(Failure::retry(anyhow!("{what}: {text}")));
        }
        if status == StatusCode::FORBIDDEN {
            return Err(Failure::Fatal(
                registry.auth_failed(format!("{what}: access denied ({text})")),
            ));
        }
        Err(Failure::Fatal(anyhow!(
            "{}: {what} {} to {}: {text}",
            registry.host,
            self.image.reference,
            self.repository
        )))
    }
}
