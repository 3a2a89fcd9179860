//! Image references: `[HOST[:PORT]/]PATH[:TAG]`, as Docker and Podman spell them.
//!
//! The store names images by the full reference text, so a reference is checked and
//! normalised once here (a missing tag becomes `latest`). Digest references (`@sha256:`)
//! are not image names in the store and are refused.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::image::config::Platform;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (with port), when the first component names one.
    pub registry: Option<String>,
    /// Repository path below the registry, e.g. `gentoo/musl-raw`.
    pub repository: String,
    pub tag: String,
}

impl Reference {
    /// The last path component, e.g. `musl-raw` for `localhost/gentoo/musl-raw:1`.
    pub fn name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

impl Reference {
    /// The name of one platform's image among the images of several platforms that `self`
    /// names as an index: the tag gets the architecture, and for 32-bit ARM the variant too
    /// (`:1-amd64`, `:1-arm64`, `:1-arm-v7`).
    pub fn for_platform(&self, platform: &Platform) -> Result<Reference> {
        let mut tag = format!("{}-{}", self.tag, platform.architecture);
        if platform.architecture == "arm"
            && let Some(variant) = &platform.variant
        {
            tag.push('-');
            tag.push_str(variant);
        }
        if !is_tag(&tag) {
            bail!("{self}: the tag {tag:?} of its {platform} image is not a valid tag");
        }
        Ok(Reference {
            tag,
            ..self.clone()
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host) = &self.registry {
            write!(f, "{host}/")?;
        }
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

fn is_path_component(s: &str) -> bool {
    // lowercase alphanumerics separated by `.`, `_`, `__` or runs of `-`
    let bytes = s.as_bytes();
    if bytes.is_empty()
        || !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
    {
        return false;
    }
    bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && !s.contains("..")
        && !s.contains("___")
}

fn is_tag(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_host(s: &str) -> bool {
    s == "localhost" || s.contains('.') || s.contains(':') || s.starts_with('[')
}

impl FromStr for Reference {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        if text.contains('@') {
            bail!("image reference {text:?}: digest references cannot name an image here");
        }
        let (rest, tag) = match text.rfind(':') {
            Some(i) if !text[i + 1..].contains('/') => (&text[..i], &text[i + 1..]),
            _ => (text, "latest"),
        };
        if !is_tag(tag) {
            bail!(
                "image reference {text:?}: tag {tag:?} is not valid (letters, digits, '.', '_', '-'; at most 128)"
            );
        }
        let mut parts: Vec<&str> = rest.split('/').collect();
        let registry = if parts.len() > 1 && is_host(parts[0]) {
            Some(parts.remove(0).to_string())
        } else {
            None
        };
        if parts.is_empty() || !parts.iter().all(|p| is_path_component(p)) {
            bail!(
                "image reference {text:?}: the name must be lowercase letters, digits and \
                 separators (. _ -), in components separated by '/'"
            );
        }
        Ok(Reference {
            registry,
            repository: parts.join("/"),
            tag: tag.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let r: Reference = "localhost:5000/gentoo/musl-raw:20260214T170533Z"
            .parse()
            .unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost:5000"));
        assert_eq!(r.repository, "gentoo/musl-raw");
        assert_eq!(r.tag, "20260214T170533Z");
        assert_eq!(r.name(), "musl-raw");
        assert_eq!(
            r.to_string(),
            "localhost:5000/gentoo/musl-raw:20260214T170533Z"
        );
        let r: Reference = "myrepo/base-dev".parse().unwrap();
        assert_eq!(r.registry, None);
        assert_eq!(r.to_string(), "myrepo/base-dev:latest");
    }

    #[test]
    fn each_platform_has_its_own_tag() {
        let r: Reference = "localhost/g-rt:1".parse().unwrap();
        let tag = |p: &str| r.for_platform(&p.parse().unwrap()).unwrap().to_string();
        assert_eq!(tag("linux/amd64"), "localhost/g-rt:1-amd64");
        assert_eq!(tag("linux/arm64/v8"), "localhost/g-rt:1-arm64");
        assert_eq!(tag("linux/arm/v7"), "localhost/g-rt:1-arm-v7");
        let long: Reference = format!("a/b:{}", "t".repeat(126)).parse().unwrap();
        assert!(long.for_platform(&"linux/amd64".parse().unwrap()).is_err());
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "Upper/case:1",
            "a/b:",
            "a//b",
            "a/b@sha256:00",
            "a/-b",
            "a/b:t@g",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} accepted");
        }
    }
}
