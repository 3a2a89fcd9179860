//! HTTP client pieces shared by publishing (registries) and inputs (mirrors): the TLS
//! configuration with the system's CA roots, and one-line descriptions of request errors.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

/// Roots for verified TLS: the system's bundle, plus `SSL_CERT_FILE`, `SSL_CERT_DIR` and
/// `extra` files.
pub fn tls_config(extra: &[PathBuf]) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    const SYSTEM_BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    let mut files: Vec<PathBuf> = SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .into_iter()
        .collect();
    if let Some(file) = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        let file = PathBuf::from(file);
        if !file.is_file() {
            bail!("SSL_CERT_FILE={}: no such file", file.display());
        }
        files.push(file);
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR").filter(|v| !v.is_empty()) {
        for dir in std::env::split_paths(&dirs) {
            // The system bundle is made from the certificates of its own directory.
            if files.first().and_then(|f| f.parent()) == Some(dir.as_path()) {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
            }
        }
    }
    files.extend(extra.iter().cloned());
    // Each file once (SSL_CERT_FILE is often the system bundle itself; hash links).
    let mut seen = BTreeSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    let mut certs = Vec::new();
    for file in &files {
        let iter = CertificateDer::pem_file_iter(file)
            .with_context(|| format!("{}: cannot read certificates", file.display()))?;
        certs.extend(iter.flatten());
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    tracing::debug!(
        "{added} CA certificates ({ignored} unusable) from {} files",
        files.len()
    );
    if roots.is_empty() {
        tracing::warn!("no CA certificates found: TLS registries will not be trusted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A reqwest error with its causes, on one line (URLs carry no secrets).
pub fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether `err` is TLS refusing the server (its certificate, its protocol versions): no
/// use trying again.
pub fn is_tls_refusal(err: &reqwest::Error) -> bool {
    // io::Error hides the error it wraps from `source()`: look inside it too.
    fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => is_rustls(inner),
            None => false,
        }
    }
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if is_rustls(s) {
            return true;
        }
        source = s.source();
    }
    false
}

/// The server's `Retry-After`, in seconds (the HTTP-date form is not honoured).
pub fn retry_after(resp: &reqwest::Response) -> Option<std::time::Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}
