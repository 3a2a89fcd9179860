//! The checks that make a stage3 or a snapshot trusted, from the companion files Gentoo
//! publishes beside it:
//!
//! | file | companions | trust anchor |
//! |---|---|---|
//! | `stage3-*.tar.*` | `.asc` (detached; none before 2022), `.DIGESTS` (clearsigned; before 2022 plain with a detached `.DIGESTS.asc`), `.sha256` (clearsigned, optional) | signature and signed digests |
//! | `gentoo-*.tar.*`, `portage-*.tar.*` | `.gpgsig` (detached), `.md5sum` (optional, transfer check only) | signature |
//! | `gentoo-*.sqfs` | `sha512sum.txt` in the same directory (clearsigned) | signed digests |
//!
//! Every check must pass, and at least one must be a trust anchor (a signature over the
//! file, or a digest other than MD5 in a signed digest file). Signatures count only when
//! made by a pinned key ([`pgp`]).

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Result, anyhow, bail};

use crate::inputs::digests::{self, Algorithm};
use crate::inputs::pgp::{self, Fingerprint, Keyring, Verified};
use crate::progress::{self, Verbosity};

/// What a companion file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompanionKind {
    /// A detached OpenPGP signature over the file (`.asc`, `.gpgsig`).
    Signature,
    /// A clearsigned digest file (`.DIGESTS`, `.sha256`, `sha512sum.txt`); `default` is the
    /// algorithm of header-less lines.
    SignedDigests { default: Option<Algorithm> },
    /// An unsigned digest file (`.md5sum`): catches transfer errors, trusts nothing.
    TransferDigest,
    /// A detached signature over another companion (`.DIGESTS.asc`, the layout before 2022,
    /// when `.DIGESTS` was not clearsigned): used by that companion's check.
    SignatureOfCompanion,
}

/// One companion of a file: its name (in the same directory), kind, and whether it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companion {
    pub name: String,
    pub kind: CompanionKind,
    pub required: bool,
}

/// The companions Gentoo publishes for the file called `name`, by the kind of file it is.
pub fn companions(name: &str) -> Vec<Companion> {
    let c = |suffix: &str, kind, required| Companion {
        name: format!("{name}{suffix}"),
        kind,
        required,
    };
    let sha512 = CompanionKind::SignedDigests {
        default: Some(Algorithm::Sha512),
    };
    if digests::parse_stage_name(name).is_some() {
        // Since 2022: `.asc` and a clearsigned `.DIGESTS`. Before: only `.DIGESTS` with a
        // detached `.DIGESTS.asc`. Either way the signed DIGESTS anchors the file.
        return vec![
            c(".asc", CompanionKind::Signature, false),
            c(
                ".DIGESTS",
                CompanionKind::SignedDigests { default: None },
                true,
            ),
            c(".DIGESTS.asc", CompanionKind::SignatureOfCompanion, false),
            c(
                ".sha256",
                CompanionKind::SignedDigests {
                    default: Some(Algorithm::Sha256),
                },
                false,
            ),
        ];
    }
    match digests::parse_snapshot_name(name).map(|s| s.kind) {
        Some(digests::SnapshotKind::Tarball) => vec![
            c(".gpgsig", CompanionKind::Signature, true),
            c(".md5sum", CompanionKind::TransferDigest, false),
        ],
        Some(digests::SnapshotKind::Squashfs) => vec![Companion {
            name: "sha512sum.txt".to_string(),
            kind: sha512,
            required: true,
        }],
        // Anything else: whatever of the usual companions is there; at least one anchor.
        None => vec![
            c(".asc", CompanionKind::Signature, false),
            c(".gpgsig", CompanionKind::Signature, false),
            c(".sig", CompanionKind::Signature, false),
            c(
                ".DIGESTS",
                CompanionKind::SignedDigests { default: None },
                false,
            ),
            c(
                ".sha256",
                CompanionKind::SignedDigests {
                    default: Some(Algorithm::Sha256),
                },
                false,
            ),
            c(".sha512", sha512, false),
            c(".md5sum", CompanionKind::TransferDigest, false),
        ],
    }
}

/// The result of one check.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked, e.g. `signature (stage3-….tar.xz.asc)` or `SHA512 (….DIGESTS)`.
    pub what: String,
    /// `Ok(detail)` or `Err(reason)`.
    pub outcome: std::result::Result<String, String>,
    /// Whether passing this check makes the file trusted.
    pub anchor: bool,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Ok(detail) => write!(f, "ok      {}: {detail}", self.what),
            Err(reason) => write!(f, "FAILED  {}: {reason}", self.what),
        }
    }
}

/// What the checks need besides the file.
pub struct Trust<'a> {
    pub keyring: &'a Keyring,
    pub pins: &'a [Fingerprint],
    pub verbosity: Verbosity,
}

/// Run every check on `file` (named `name`, which is how digest files list it) with the
/// companions' contents (`None`: missing). Never stops at the first failure: the caller
/// reports all checks ([`ensure_trusted`] turns them into one error).
pub fn check_file(
    file: &Path,
    name: &str,
    companions: &[(Companion, Option<Vec<u8>>)],
    trust: &Trust,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut wanted: Vec<(String, bool, Vec<digests::DigestLine>)> = Vec::new();
    for (companion, content) in companions {
        let Some(content) = content else {
            if companion.required {
                checks.push(Check {
                    what: format!("companion {}", companion.name),
                    outcome: Err("missing (it must sit beside the file or on the mirror)".into()),
                    anchor: false,
                });
            }
            continue;
        };
        match companion.kind {
            CompanionKind::Signature => {
                let what = format!("signature ({})", companion.name);
                let outcome = File::open(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))
                    .and_then(|f| {
                        let bar = progress::Bar::new(
                            trust.verbosity,
                            &format!("checking {}", companion.name),
                            f.metadata().map(|m| m.len()).unwrap_or(0),
                        );
                        let reader = progress::Reading::new(BufReader::new(f), &bar);
                        pgp::verify_detached(trust.keyring, trust.pins, reader, content)
                            .map(|v| signer(&v))
                            .map_err(|e| e.to_string())
                    });
                checks.push(Check {
                    what,
                    outcome,
                    anchor: true,
                });
            }
            CompanionKind::SignatureOfCompanion => {}
            CompanionKind::SignedDigests { default } => {
                let text = String::from_utf8_lossy(content);
                let detached = format!("{}.asc", companion.name);
                let detached = companions
                    .iter()
                    .find(|(c, content)| c.name == detached && content.is_some());
                let clearsigned = text.contains("-----BEGIN PGP SIGNED MESSAGE-----");
                let (what, verified) = match detached {
                    Some((sig, Some(sig_bytes))) if !clearsigned => (
                        format!("signature ({})", sig.name),
                        pgp::verify_detached(trust.keyring, trust.pins, &content[..], sig_bytes)
                            .map(|v| (text.to_string(), v)),
                    ),
                    _ => (
                        format!("signature ({})", companion.name),
                        pgp::verify_cleartext(trust.keyring, trust.pins, &text),
                    ),
                };
                match verified {
                    Ok((payload, v)) => {
                        checks.push(Check {
                            what,
                            outcome: Ok(signer(&v)),
                            anchor: false,
                        });
                        let parsed = digests::parse(&payload, default);
                        take_digests(parsed, &companion.name, true, &mut wanted, &mut checks);
                    }
                    Err(e) => checks.push(Check {
                        what,
                        outcome: Err(e.to_string()),
                        anchor: false,
                    }),
                }
            }
            CompanionKind::TransferDigest => {
                let parsed = digests::parse(&String::from_utf8_lossy(content), None);
                take_digests(parsed, &companion.name, false, &mut wanted, &mut checks);
            }
        }
    }
    if wanted.is_empty() {
        return checks;
    }
    // One pass over the file for every algorithm any digest file lists for it.
    let listed: Vec<&digests::DigestLine> = wanted
        .iter()
        .flat_map(|(_, _, lines)| digests::for_file(lines, name))
        .collect();
    let algs = digests::algorithms(&listed);
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = progress::Bar::new(trust.verbosity, &format!("hashing {name}"), size);
    let hashes = match digests::hash_file(file, &algs, |done| bar.set(done)) {
        Ok(h) => h,
        Err(e) => {
            checks.push(Check {
                what: "digests".into(),
                outcome: Err(format!("{e:#}")),
                anchor: false,
            });
            return checks;
        }
    };
    bar.finish();
    for (source, signed, lines) in &wanted {
        let Ok(results) = digests::check(&digests::for_file(lines, name), &hashes) else {
            checks.push(Check {
                what: format!("digests ({source})"),
                outcome: Err(format!("{name} is not listed")),
                anchor: false,
            });
            continue;
        };
        for r in results {
            checks.push(Check {
                what: format!("{} ({source})", r.algorithm),
                outcome: if r.ok {
                    Ok(if *signed {
                        "matches the signed digest".into()
                    } else {
                        "matches (transfer check only: this file is not signed)".into()
                    })
                } else {
                    Err(format!(
                        "mismatch: expected {}, got {}",
                        r.expected,
                        r.actual.as_deref().unwrap_or("nothing")
                    ))
                },
                anchor: *signed && r.algorithm.trust_anchor(),
            });
        }
    }
    checks
}

/// A companion's digest lines (`signed`: read from a verified signature) go to `wanted`; a
/// companion that cannot be read is a failed check.
fn take_digests(
    parsed: Result<Vec<digests::DigestLine>>,
    companion: &str,
    signed: bool,
    wanted: &mut Vec<(String, bool, Vec<digests::DigestLine>)>,
    checks: &mut Vec<Check>,
) {
    match parsed {
        Ok(lines) => wanted.push((companion.to_string(), signed, lines)),
        Err(e) => checks.push(Check {
            what: format!("contents ({companion})"),
            outcome: Err(format!("{e:#}")),
            anchor: false,
        }),
    }
}

fn signer(v: &Verified) -> String {
    v.to_string()
}

/// Ok when every check passed and at least one is a trust anchor; else an error naming the
/// file and the first failing check.
pub fn ensure_trusted(file_name: &str, checks: &[Check]) -> Result<()> {
    if let Some(bad) = checks.iter().find(|c| !c.passed()) {
        let reason = bad.outcome.as_ref().err().cloned().unwrap_or_default();
        bail!("{file_name}: {} failed: {reason}", bad.what);
    }
    if !checks.iter().any(|c| c.anchor) {
        return Err(anyhow!(
            "{file_name}: not verified: no signature or signed digest covers it \
             (put its .asc/.DIGESTS/.gpgsig/sha512sum.txt beside it, or use --no-verify)"
        ));
    }
    Ok(())
}

/// A short account of passed checks: the signatures' signers and the digests that matched.
pub fn summary(checks: &[Check]) -> String {
    let mut signers: Vec<&str> = Vec::new();
    let mut digests: Vec<String> = Vec::new();
    for check in checks {
        let Ok(detail) = &check.outcome else { continue };
        if check.what.starts_with("signature") {
            if !signers.contains(&detail.as_str()) {
                signers.push(detail);
            }
        } else if let Some((alg, _)) = check.what.split_once(' ') {
            let alg = alg.to_string();
            if !digests.contains(&alg) {
                digests.push(alg);
            }
        }
    }
    let mut parts: Vec<String> = signers.iter().map(|s| s.to_string()).collect();
    if !digests.is_empty() {
        parts.push(format!("{} match", digests.join(", ")));
    }
    parts.join("; ")
}
