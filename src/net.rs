//! HTTP client pieces shared by publishing (registries) and inputs (mirrors): the TLS
//! configuration with the system's CA roots, one-line descriptions of request errors, and
//! the redaction of credentials in URLs (`http://user:password@host/`) for messages and paths.

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

/// A reqwest error with its causes, on one line, credentials in URLs redacted.
pub fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    redact(&text)
}

/// `text` with the credentials of every URL in it (`scheme://user:password@host`) replaced
/// by `***`: what messages, logs and cache paths may show of a URL.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                &tail[at..]
            }
            None => tail,
        };
    }
    out.push_str(rest);
    out
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_in_urls_are_redacted() {
        let table = [
            ("http://u:p@h/x", "http://***@h/x"),
            ("https://user@h:8080", "https://***@h:8080"),
            (
                "cannot get http://a:b%40c@h/x (from https://t0k3n@h2/y?q=a@b): refused",
                "cannot get http://***@h/x (from https://***@h2/y?q=a@b): refused",
            ),
            (
                "http://h/a@b and mail@example.org",
                "http://h/a@b and mail@example.org",
            ),
            ("no url: a@b", "no url: a@b"),
        ];
        for (text, want) in table {
            assert_eq!(redact(text), want, "{text}");
        }
    }
}
