//! OpenPGP verification in-process (rpgp): detached and clearsigned signatures by pinned keys.
//!
//! No `gpg` binary is involved. The policy is deliberately small and explicit:
//!
//! * A [`Keyring`] holds certificates (transferable public keys). When a certificate is loaded,
//!   every *self*-signature on its primary key (user ID and user attribute bindings, direct-key
//!   signatures, key revocations) must verify, otherwise the certificate is refused.
//!   Third-party certifications are ignored. Subkey binding signatures that do not verify are
//!   ignored; a subkey left without a valid binding cannot be used.
//! * A document signature counts only when ALL of these hold: it is cryptographically good; it
//!   was made by a key (primary or subkey) whose *primary* fingerprint is pinned; that key has the
//!   signing capability (and a signing subkey carries a valid back-signature); neither the primary
//!   nor the signing subkey was expired at the signature's creation time; neither is revoked (any
//!   valid revocation counts, whatever its reason); the hash algorithm is not MD5/SHA-1/RIPEMD-160.
//! * If a document carries several signatures, one that counts is enough; otherwise the most
//!   informative failure is reported.
//!
//! Detached signatures are verified over a reader that is consumed once, in bounded chunks
//! ([`verify_detached`]), so stage3 tarballs of any size never sit in memory.

use std::{
    fmt,
    io::{self, Read},
    path::Path,
    str::FromStr,
    sync::{Arc, mpsc},
};

use ::pgp::{
    armor::{BlockType, Dearmor},
    composed::{CleartextSignedMessage, Deserializable, SignedPublicKey},
    crypto::hash::HashAlgorithm,
    errors::Error as PgpError,
    packet::{
        KeyFlags, Packet, PacketParser, PacketTrait, PublicKey, PublicSubkey, Signature,
        SignatureType, SubpacketData,
    },
    types::{KeyDetails, Tag},
};
use anyhow::{Context, anyhow, bail};

/// An OpenPGP key fingerprint, as upper-case hex (40 hex digits for v4 keys, 64 for v6).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(String);

/// Why a string is not a [`Fingerprint`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FingerprintError(String);

impl Fingerprint {
    /// The upper-case hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn of(key: &impl KeyDetails) -> Fingerprint {
        Fingerprint::from_pgp(&key.fingerprint())
    }

    fn from_pgp(fp: &::pgp::types::Fingerprint) -> Fingerprint {
        Fingerprint(hex::encode_upper(fp.as_bytes()))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    /// Accepts upper or lower case, spaces (as gpg prints them) and an optional `0x` prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let body = trimmed
            .strip_prefix("0x")
            .or_else(|| trimmed.strip_prefix("0X"))
            .unwrap_or(trimmed);
        let hex: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(FingerprintError(format!(
                "{s:?} is not an OpenPGP fingerprint: {bad:?} is not a hex digit"
            )));
        }
        match hex.len() {
            40 | 64 => Ok(Fingerprint(hex.to_ascii_uppercase())),
            8 | 16 => Err(FingerprintError(format!(
                "{s:?} is a key ID, not a fingerprint: give the full fingerprint \
                 (40 hex digits, `gpg --fingerprint` shows it)"
            ))),
            n => Err(FingerprintError(format!(
                "{s:?} is not an OpenPGP fingerprint: it has {n} hex digits instead of 40 (or 64 for v6 keys)"
            ))),
        }
    }
}

/// Gentoo Linux release engineering keys (stage3 signing).
const GENTOO_RELEASE_KEYS: [&str; 2] = [
    "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910",
    "D99EAC7379A850BCE47DA5F29E6438C817072058",
];
/// Gentoo Portage snapshot signing key (its signing subkey
/// E1D6ABB63BFCFB4BA02FDF1CEC590EEAC9189250 counts through this primary).
const GENTOO_SNAPSHOT_KEY: &str = "DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D";

/// The built-in pins: Gentoo's release keys and snapshot key (primary fingerprints).
pub fn gentoo_pins() -> Vec<Fingerprint> {
    GENTOO_RELEASE_KEYS
        .iter()
        .chain([&GENTOO_SNAPSHOT_KEY])
        .map(|s| Fingerprint(s.to_string()))
        .collect()
}

/// What a good signature established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Primary fingerprint of the signer's certificate (the pinned one).
    pub primary: Fingerprint,
    /// The key that made the signature: the primary itself or one of its subkeys.
    pub signing_key: Fingerprint,
    /// Signature creation time, seconds since the Unix epoch.
    pub created: i64,
    /// The certificate's primary user ID, if it has one.
    pub user_id: Option<String>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "good signature")?;
        if let Some(uid) = &self.user_id {
            write!(f, " from \"{uid}\"")?;
        }
        write!(f, " (key {}", self.primary)?;
        if self.signing_key != self.primary {
            write!(f, ", subkey {}", self.signing_key)?;
        }
        write!(f, ") made {}", fmt_utc(self.created))
    }
}

/// Why a signature does not count. The caller prefixes the file name.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no OpenPGP signature found")]
    NoSignature,
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("signed by key {issuer}, which is not in the keyring")]
    UnknownKey { issuer: String },
    #[error("signed by key {fingerprint}, which is not one of the trusted keys")]
    NotPinned { fingerprint: Fingerprint },
    #[error(
        "BAD signature by key {fingerprint}: the data does not match the signature \
         (the file or its signature was modified or corrupted)"
    )]
    Bad { fingerprint: Fingerprint },
    #[error(
        "signed on {} by key {fingerprint}, which had expired on {}",
        fmt_utc(*.signed_at),
        fmt_utc(*.expired_at)
    )]
    Expired {
        fingerprint: Fingerprint,
        expired_at: i64,
        signed_at: i64,
    },
    #[error("the signature itself expired on {}", fmt_utc(*.expired_at))]
    SignatureExpired { expired_at: i64 },
    #[error(
        "signed by key {fingerprint}, which has been revoked{}",
        .reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    Revoked {
        fingerprint: Fingerprint,
        reason: Option<String>,
    },
    #[error("signed by key {fingerprint}, which cannot be used for signing: {reason}")]
    UnusableKey {
        fingerprint: Fingerprint,
        reason: String,
    },
    #[error("signed by key {fingerprint} with {algorithm}, a hash algorithm too weak to trust")]
    WeakHash {
        fingerprint: Fingerprint,
        algorithm: String,
    },
    #[error("cannot read the signed data: {0}")]
    Io(#[from] io::Error),
}

impl VerifyError {
    /// How much a failure tells the user; the highest-ranking one is reported.
    fn rank(&self) -> u8 {
        match self {
            VerifyError::NoSignature => 0,
            VerifyError::Malformed(_) => 1,
            VerifyError::UnknownKey { .. } => 2,
            VerifyError::NotPinned { .. } => 3,
            VerifyError::WeakHash { .. } | VerifyError::UnusableKey { .. } => 4,
            VerifyError::Expired { .. } | VerifyError::SignatureExpired { .. } => 5,
            VerifyError::Revoked { .. } => 6,
            VerifyError::Bad { .. } => 7,
            VerifyError::Io(_) => 8,
        }
    }
}

/// A set of certificates (transferable public keys) whose self-signatures have been checked.
#[derive(Clone, Default)]
pub struct Keyring {
    certs: Vec<Cert>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.certs.iter().map(|c| &c.fingerprint))
            .finish()
    }
}

impl Keyring {
    /// Parse public keys: ASCII-armoured (any number of blocks, each with any number of keys,
    /// text around the blocks is ignored) or binary (`gpg --export` output, old `.gpg` keyrings).
    /// `origin` names the file or URL in error messages.
    pub fn parse(bytes: &[u8], origin: &str) -> anyhow::Result<Keyring> {
        let blobs = decode(bytes, BlockType::PublicKey, "public key")
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        let mut keys = Vec::new();
        for blob in &blobs {
            let packets = key_packets(blob).peekable();
            for key in SignedPublicKey::from_packets(packets) {
                keys.push(key.with_context(|| format!("{origin}: malformed OpenPGP public key"))?);
            }
        }
        if keys.is_empty() {
            bail!("{origin}: no OpenPGP public key found");
        }
        let mut ring = Keyring::default();
        for key in keys {
            ring.insert(key, origin)?;
        }
        Ok(ring)
    }

    /// Read and [`parse`](Keyring::parse) a key file.
    pub fn load(path: &Path) -> anyhow::Result<Keyring> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        Keyring::parse(&bytes, &path.display().to_string())
    }

    /// Add the certificates of `other`; copies of the same certificate are merged (so a
    /// revocation or a renewed expiry from either side applies).
    pub fn extend(&mut self, other: Keyring) {
        for cert in other.certs {
            match self
                .certs
                .iter()
                .position(|c| c.fingerprint == cert.fingerprint)
            {
                None => self.certs.push(cert),
                Some(i) => {
                    let merged = merge(self.certs[i].key.clone(), cert.key);
                    // Both halves passed their checks, so the merge does too; keep ours if not.
                    match Cert::evaluate(merged, "merged keyring") {
                        Ok(c) => self.certs[i] = c,
                        Err(e) => tracing::warn!("cannot merge copies of a key: {e:#}"),
                    }
                }
            }
        }
    }

    /// Primary fingerprints, sorted.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        let mut fps: Vec<_> = self.certs.iter().map(|c| c.fingerprint.clone()).collect();
        fps.sort();
        fps
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Keep only certificates whose primary fingerprint is pinned (used for keys fetched by WKD).
    pub fn retain_pinned(&mut self, pins: &[Fingerprint]) {
        self.certs.retain(|c| pins.contains(&c.fingerprint));
    }

    fn insert(&mut self, key: SignedPublicKey, origin: &str) -> anyhow::Result<()> {
        let fp = Fingerprint::of(&key.primary_key);
        match self.certs.iter().position(|c| c.fingerprint == fp) {
            None => self.certs.push(Cert::evaluate(key, origin)?),
            Some(i) => {
                let merged = merge(self.certs[i].key.clone(), key);
                self.certs[i] = Cert::evaluate(merged, origin)?;
            }
        }
        Ok(())
    }

    /// Every (certificate, component key) that may have issued `sig`.
    fn candidates(&self, sig: &Signature) -> Vec<(&Cert, Component)> {
        let mut out = Vec::new();
        for cert in &self.certs {
            if issued_by(sig, &cert.key.primary_key) {
                out.push((cert, Component::Primary));
            }
            for (i, sub) in cert.key.public_subkeys.iter().enumerate() {
                if issued_by(sig, &sub.key) {
                    out.push((cert, Component::Subkey(i)));
                }
            }
        }
        out
    }
}

/// A certificate and what its (verified) self-signatures say about it.
#[derive(Clone)]
struct Cert {
    key: SignedPublicKey,
    fingerprint: Fingerprint,
    user_id: Option<String>,
    revocation: Option<Revocation>,
    /// Absolute expiry time of the primary key, if any.
    expires: Option<i64>,
    /// Whether the primary key may sign data.
    usable: Result<(), String>,
    subkeys: Vec<Subkey>,
}

#[derive(Clone)]
struct Subkey {
    fingerprint: Fingerprint,
    revocation: Option<Revocation>,
    expires: Option<i64>,
    usable: Result<(), String>,
}

#[derive(Clone)]
struct Revocation {
    reason: Option<String>,
}

impl Revocation {
    fn of(sig: &Signature) -> Revocation {
        let code = sig.revocation_reason_code().map(|c| format!("{c:?}"));
        let text = sig
            .revocation_reason_string()
            .map(|b| String::from_utf8_lossy(b).trim().to_string())
            .filter(|s| !s.is_empty());
        let reason = match (code, text) {
            (Some(c), Some(t)) => Some(format!("{c}: {t}")),
            (c, t) => c.or(t),
        };
        Revocation { reason }
    }
}

#[derive(Clone, Copy, Debug)]
enum Component {
    Primary,
    Subkey(usize),
}

impl Cert {
    /// Check the self-signatures of `key` and work out its validity.
    fn evaluate(key: SignedPublicKey, origin: &str) -> anyhow::Result<Cert> {
        let primary = &key.primary_key;
        let fingerprint = Fingerprint::of(primary);
        let fail = |what: String| anyhow!("{origin}: key {fingerprint}: {what}");
        let is_self = |sig: &&Signature| issued_by(sig, primary);

        // User IDs: every self-signature must verify; third-party certifications are ignored.
        let mut bindings: Vec<(&Signature, String)> = Vec::new();
        for user in &key.details.users {
            let name = String::from_utf8_lossy(user.id.id()).into_owned();
            let mut certifications = Vec::new();
            let mut revoked = false;
            for sig in user.signatures.iter().filter(is_self) {
                sig.verify_certification(primary, Tag::UserId, &user.id)
                    .map_err(|e| {
                        fail(format!(
                            "the self-signature on user ID \"{name}\" does not verify: {e}"
                        ))
                    })?;
                if sig.typ() == Some(SignatureType::CertRevocation) {
                    revoked = true;
                } else {
                    certifications.push(sig);
                }
            }
            if !revoked {
                bindings.extend(certifications.into_iter().map(|s| (s, name.clone())));
            }
        }
        for attr in &key.details.user_attributes {
            for sig in attr.signatures.iter().filter(is_self) {
                sig.verify_certification(primary, Tag::UserAttribute, &attr.attr)
                    .map_err(|e| {
                        fail(format!(
                            "the self-signature on a user attribute does not verify: {e}"
                        ))
                    })?;
            }
        }
        let mut direct = Vec::new();
        for sig in key.details.direct_signatures.iter().filter(is_self) {
            if sig.typ() != Some(SignatureType::Key) {
                continue;
            }
            sig.verify_key(primary)
                .map_err(|e| fail(format!("a direct-key self-signature does not verify: {e}")))?;
            direct.push(sig);
        }
        let mut revocation = None;
        for sig in key.details.revocation_signatures.iter().filter(is_self) {
            sig.verify_key(primary)
                .map_err(|e| fail(format!("a revocation signature does not verify: {e}")))?;
            revocation = Some(Revocation::of(sig));
        }
        if bindings.is_empty() && direct.is_empty() && revocation.is_none() {
            return Err(fail(
                "no valid self-signature binds a user ID to it".to_string(),
            ));
        }

        // The binding in force: the newest one on the primary user ID (or on any user ID).
        let uid_binding = bindings
            .iter()
            .filter(|(s, _)| s.is_primary())
            .max_by_key(|(s, _)| s.created())
            .or_else(|| bindings.iter().max_by_key(|(s, _)| s.created()));
        let dks = direct.iter().copied().max_by_key(|s| s.created());
        let in_force: Vec<&Signature> = uid_binding
            .map(|(s, _)| *s)
            .into_iter()
            .chain(dks)
            .collect();
        let created = i64::from(primary.created_at().as_secs());
        let legacy = primary
            .legacy_v3_expiration_days()
            .filter(|d| *d > 0)
            .map(|d| created + i64::from(d) * 86_400);
        let expires = in_force
            .iter()
            .filter_map(|s| expiry(s, created))
            .chain(legacy)
            .min();
        let usable = match in_force.iter().find_map(|s| key_flags(s)) {
            Some(flags) if !flags.sign() => {
                Err("its self-signature does not give it the signing capability".to_string())
            }
            _ => Ok(()),
        };

        let subkeys = key
            .public_subkeys
            .iter()
            .map(|sub| Subkey::evaluate(primary, &sub.key, &sub.signatures))
            .collect();

        Ok(Cert {
            user_id: uid_binding.map(|(_, n)| n.clone()),
            fingerprint,
            revocation,
            expires,
            usable,
            subkeys,
            key,
        })
    }

    fn component_fingerprint(&self, c: Component) -> &Fingerprint {
        match c {
            Component::Primary => &self.fingerprint,
            Component::Subkey(i) => &self.subkeys[i].fingerprint,
        }
    }

    fn component_key(&self, c: Component) -> KeyRef<'_> {
        match c {
            Component::Primary => KeyRef::Primary(&self.key.primary_key),
            Component::Subkey(i) => KeyRef::Subkey(&self.key.public_subkeys[i].key),
        }
    }

    /// Everything but the cryptographic check: revocation, capability, expiry.
    fn policy(&self, c: Component, signed_at: i64) -> Option<VerifyError> {
        let sub = match c {
            Component::Primary => None,
            Component::Subkey(i) => Some(&self.subkeys[i]),
        };
        let fingerprint = self.component_fingerprint(c).clone();
        if let Some(r) = &self.revocation {
            return Some(VerifyError::Revoked {
                fingerprint: self.fingerprint.clone(),
                reason: r.reason.clone(),
            });
        }
        if let Some(r) = sub.and_then(|s| s.revocation.as_ref()) {
            return Some(VerifyError::Revoked {
                fingerprint,
                reason: r.reason.clone(),
            });
        }
        let usable = sub.map_or(&self.usable, |s| &s.usable);
        if let Err(reason) = usable {
            return Some(VerifyError::UnusableKey {
                fingerprint,
                reason: reason.clone(),
            });
        }
        let key_created = i64::from(self.component_key(c).created_at());
        if signed_at < key_created {
            return Some(VerifyError::UnusableKey {
                fingerprint,
                reason: format!(
                    "the signature ({}) is older than the key ({})",
                    fmt_utc(signed_at),
                    fmt_utc(key_created)
                ),
            });
        }
        if let Some(expired_at) = self.expires.filter(|e| signed_at >= *e) {
            return Some(VerifyError::Expired {
                fingerprint: self.fingerprint.clone(),
                expired_at,
                signed_at,
            });
        }
        if let Some(expired_at) = sub.and_then(|s| s.expires).filter(|e| signed_at >= *e) {
            return Some(VerifyError::Expired {
                fingerprint,
                expired_at,
                signed_at,
            });
        }
        None
    }
}

impl Subkey {
    fn evaluate(primary: &PublicKey, key: &PublicSubkey, sigs: &[Signature]) -> Subkey {
        let fingerprint = Fingerprint::of(key);
        let mut bindings = Vec::new();
        let mut revocation = None;
        let mut failure = None;
        for sig in sigs.iter().filter(|s| issued_by(s, primary)) {
            match sig.verify_subkey_binding(primary, key) {
                Err(e) => {
                    tracing::debug!("subkey {fingerprint}: ignoring a bad binding signature: {e}");
                    failure.get_or_insert_with(|| e.to_string());
                }
                Ok(()) if sig.typ() == Some(SignatureType::SubkeyRevocation) => {
                    revocation = Some(Revocation::of(sig));
                }
                Ok(()) => bindings.push(sig),
            }
        }
        let binding = bindings.into_iter().max_by_key(|s| s.created());
        let usable = match binding {
            None => Err(match failure {
                Some(e) => format!("its binding signature does not verify: {e}"),
                None => "it has no binding signature from its primary key".to_string(),
            }),
            Some(b) => match key_flags(b) {
                Some(flags) if !flags.sign() => {
                    Err("its binding signature does not give it the signing capability".to_string())
                }
                _ => match b.embedded_signature() {
                    None => Err("its binding signature lacks the back-signature \
                                 (primary key binding) a signing subkey needs"
                        .to_string()),
                    Some(back) => back
                        .verify_primary_key_binding(key, primary)
                        .map_err(|e| format!("its back-signature does not verify: {e}")),
                },
            },
        };
        let created = i64::from(key.created_at().as_secs());
        Subkey {
            fingerprint,
            revocation,
            expires: binding.and_then(|b| expiry(b, created)),
            usable,
        }
    }
}

/// Absolute key expiry set by a binding signature (`None`: never).
fn expiry(sig: &Signature, key_created: i64) -> Option<i64> {
    sig.key_expiration_time()
        .map(|d| d.as_secs())
        .filter(|s| *s > 0)
        .map(|s| key_created + i64::from(s))
}

/// Key flags from the hashed area, if the signature has them at all.
fn key_flags(sig: &Signature) -> Option<KeyFlags> {
    sig.config()?
        .hashed_subpackets()
        .find_map(|p| match &p.data {
            SubpacketData::KeyFlags(f) => Some(f.clone()),
            _ => None,
        })
}

/// Does `sig` name `key` as its issuer? (A signature naming no issuer may be from anyone.)
fn issued_by(sig: &Signature, key: &impl KeyDetails) -> bool {
    let fps = sig.issuer_fingerprint();
    let ids = sig.issuer_key_id();
    if fps.is_empty() && ids.is_empty() {
        return true;
    }
    let fp = key.fingerprint();
    let id = key.legacy_key_id();
    fps.iter().any(|f| **f == fp) || ids.iter().any(|i| **i == id)
}

fn issuer_description(sig: &Signature) -> String {
    if let Some(fp) = sig.issuer_fingerprint().first() {
        hex::encode_upper(fp.as_bytes())
    } else if let Some(id) = sig.issuer_key_id().first() {
        hex::encode_upper(id.as_ref())
    } else {
        "(the signature names no issuer)".to_string()
    }
}

/// Merge two copies of the same certificate (union of their signatures and components).
fn merge(mut a: SignedPublicKey, b: SignedPublicKey) -> SignedPublicKey {
    fn union(into: &mut Vec<Signature>, from: Vec<Signature>) {
        for s in from {
            if !into.contains(&s) {
                into.push(s);
            }
        }
    }
    union(
        &mut a.details.revocation_signatures,
        b.details.revocation_signatures,
    );
    union(
        &mut a.details.direct_signatures,
        b.details.direct_signatures,
    );
    for u in b.details.users {
        match a.details.users.iter_mut().find(|x| x.id == u.id) {
            Some(x) => union(&mut x.signatures, u.signatures),
            None => a.details.users.push(u),
        }
    }
    for u in b.details.user_attributes {
        match a
            .details
            .user_attributes
            .iter_mut()
            .find(|x| x.attr == u.attr)
        {
            Some(x) => union(&mut x.signatures, u.signatures),
            None => a.details.user_attributes.push(u),
        }
    }
    for s in b.public_subkeys {
        let fp = s.key.fingerprint();
        match a
            .public_subkeys
            .iter_mut()
            .find(|x| x.key.fingerprint() == fp)
        {
            Some(x) => union(&mut x.signatures, s.signatures),
            None => a.public_subkeys.push(s),
        }
    }
    a
}

/// Packets of a key file, without the ones that carry no key material (GnuPG trust packets,
/// markers, padding) and skipping what rpgp flags as safe to ignore (as its own parser does).
fn key_packets(bytes: &[u8]) -> impl Iterator<Item = ::pgp::errors::Result<Packet>> + '_ {
    PacketParser::new(bytes).filter(|p| match p {
        Ok(Packet::Trust(_) | Packet::Marker(_) | Packet::Padding(_)) => false,
        Ok(_) => true,
        Err(e) => !ignorable(e),
    })
}

fn ignorable(e: &PgpError) -> bool {
    match e {
        PgpError::Unsupported { .. } | PgpError::PacketIncomplete { .. } => true,
        PgpError::InvalidPacketContent { source } => matches!(
            **source,
            PgpError::Unsupported { .. } | PgpError::EllipticCurve { .. }
        ),
        _ => false,
    }
}

/// Binary OpenPGP data from `bytes`: binary input as is, or the decoded ASCII-armour blocks
/// (all of which must be of type `want`). Returns nothing for empty input.
fn decode(bytes: &[u8], want: BlockType, what: &str) -> Result<Vec<Vec<u8>>, String> {
    match bytes.iter().position(|b| !b.is_ascii_whitespace()) {
        None => return Ok(Vec::new()),
        // A binary packet header always has its top bit set; armour is ASCII.
        Some(i) if bytes[i] & 0x80 != 0 => return Ok(vec![bytes[i..].to_vec()]),
        Some(_) => {}
    }
    let mut blocks = Vec::new();
    let mut start = None;
    let mut pos = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let t = line.trim_ascii();
        match start {
            None if t.starts_with(b"-----BEGIN PGP ") => start = Some(pos),
            Some(s) if t.starts_with(b"-----END PGP ") => {
                blocks.push(&bytes[s..pos + line.len()]);
                start = None;
            }
            _ => {}
        }
        pos += line.len();
    }
    if start.is_some() {
        return Err("truncated ASCII armour (no -----END line)".to_string());
    }
    if blocks.is_empty() {
        return Err(format!(
            "not an OpenPGP {what} (neither ASCII-armoured nor binary)"
        ));
    }
    let mut out = Vec::new();
    for block in blocks {
        // rpgp's default reads no CRC24: RFC 9580 says to ignore it (and rpgp 0.21's opt-in
        // check is broken: it updates a copy of its hasher, so every non-empty block fails).
        let mut dearmor = Dearmor::new(block);
        dearmor
            .read_header()
            .map_err(|e| format!("bad ASCII armour: {e}"))?;
        match dearmor.typ {
            Some(t) if t == want => {}
            Some(BlockType::PrivateKey) => {
                return Err(
                    "this is a PRIVATE key; give the public key instead (gpg --export --armor)"
                        .to_string(),
                );
            }
            Some(t) => return Err(format!("expected an OpenPGP {what}, found a {t}")),
            None => return Err("bad ASCII armour".to_string()),
        }
        let mut bin = Vec::new();
        dearmor
            .read_to_end(&mut bin)
            .map_err(|e| format!("bad ASCII armour: {e}"))?;
        out.push(bin);
    }
    Ok(out)
}

/// The signature packets of a detached signature file.
fn parse_signatures(bytes: &[u8]) -> Result<Vec<Signature>, VerifyError> {
    let blobs = decode(bytes, BlockType::Signature, "signature").map_err(VerifyError::Malformed)?;
    let mut sigs = Vec::new();
    let mut unsupported = None;
    for blob in &blobs {
        for p in PacketParser::new(&blob[..]) {
            match p {
                Ok(Packet::Signature(s)) => sigs.push(s),
                Ok(Packet::Marker(_) | Packet::Padding(_)) => {}
                Ok(other) => {
                    return Err(VerifyError::Malformed(format!(
                        "expected a detached signature, found a {:?} packet",
                        other.tag()
                    )));
                }
                Err(e) if ignorable(&e) => unsupported = Some(e.to_string()),
                Err(e) => return Err(VerifyError::Malformed(e.to_string())),
            }
        }
    }
    if sigs.is_empty() {
        return Err(match unsupported {
            Some(e) => VerifyError::Malformed(format!("unsupported signature: {e}")),
            None => VerifyError::NoSignature,
        });
    }
    Ok(sigs)
}

/// A component key to verify with.
#[derive(Clone, Copy)]
enum KeyRef<'a> {
    Primary(&'a PublicKey),
    Subkey(&'a PublicSubkey),
}

impl KeyRef<'_> {
    fn created_at(&self) -> u32 {
        match self {
            KeyRef::Primary(k) => k.created_at().as_secs(),
            KeyRef::Subkey(k) => k.created_at().as_secs(),
        }
    }

    /// Cryptographic check of `sig` over `data`; rpgp hashes `data` as it reads it.
    fn check(&self, sig: &Signature, data: impl Read) -> Result<(), String> {
        match self {
            KeyRef::Primary(k) => sig.verify(*k, data),
            KeyRef::Subkey(k) => sig.verify(*k, data),
        }
        .map_err(|e| e.to_string())
    }
}

/// One cryptographic check to run: a signature against a candidate key.
struct Job<'a> {
    sig: &'a Signature,
    key: KeyRef<'a>,
}

/// Decide on `sigs`: policy checks here, cryptographic checks by `crypto` (one result per job,
/// in order; it may fail as a whole, e.g. when the data cannot be read).
fn decide<'a>(
    keyring: &'a Keyring,
    pins: &[Fingerprint],
    sigs: &'a [Signature],
    crypto: impl FnOnce(&[Job<'a>]) -> Result<Vec<Result<(), String>>, VerifyError>,
) -> Result<Verified, VerifyError> {
    // Each candidate is hashed on its own thread: a crafted file with thousands of signature
    // packets naming a pinned key must not become thousands of threads.
    if sigs.len() > MAX_SIGNATURES {
        return Err(VerifyError::Malformed(format!(
            "{} signatures in one file; at most {MAX_SIGNATURES} are accepted",
            sigs.len()
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut failures = Vec::new();
    let mut jobs = Vec::new();
    let mut pending = Vec::new();
    for sig in sigs {
        match sig.typ() {
            Some(SignatureType::Binary | SignatureType::Text) => {}
            other => {
                failures.push(VerifyError::Malformed(match other {
                    Some(t) => format!("a {t:?} signature is not a signature over a document"),
                    None => format!("unsupported signature version {:?}", sig.version()),
                }));
                continue;
            }
        }
        let Some(created) = sig.created() else {
            failures.push(VerifyError::Malformed(
                "the signature has no creation time".to_string(),
            ));
            continue;
        };
        let signed_at = i64::from(created.as_secs());
        // The signature's own lifetime (RFC 9580 5.2.3.18), as gpg honours it.
        if let Some(expired_at) = sig
            .signature_expiration_time()
            .map(|d| d.as_secs())
            .filter(|s| *s > 0)
            .map(|s| signed_at + i64::from(s))
            .filter(|at| *at <= now)
        {
            failures.push(VerifyError::SignatureExpired { expired_at });
            continue;
        }
        if let Some(h) = sig.hash_alg().filter(|h| h.new_hasher().is_err()) {
            failures.push(VerifyError::Malformed(format!(
                "unsupported hash algorithm {h}"
            )));
            continue;
        }
        let candidates = keyring.candidates(sig);
        if candidates.is_empty() {
            failures.push(VerifyError::UnknownKey {
                issuer: issuer_description(sig),
            });
            continue;
        }
        for (cert, c) in candidates {
            if !pins.contains(&cert.fingerprint) {
                failures.push(VerifyError::NotPinned {
                    fingerprint: cert.fingerprint.clone(),
                });
                continue;
            }
            let signing_key = cert.component_fingerprint(c).clone();
            // Never good enough, whatever the key; no need to hash (Ed25519 would refuse anyway).
            if let Some(h) = sig.hash_alg().filter(|h| {
                matches!(
                    h,
                    HashAlgorithm::Md5 | HashAlgorithm::Sha1 | HashAlgorithm::Ripemd160
                )
            }) {
                failures.push(VerifyError::WeakHash {
                    fingerprint: signing_key,
                    algorithm: h.to_string(),
                });
                continue;
            }
            let verified = Verified {
                primary: cert.fingerprint.clone(),
                signing_key,
                created: signed_at,
                user_id: cert.user_id.clone(),
            };
            jobs.push(Job {
                sig,
                key: cert.component_key(c),
            });
            pending.push((verified, cert.policy(c, signed_at)));
        }
    }
    let results = if jobs.is_empty() {
        Vec::new()
    } else {
        crypto(&jobs)?
    };
    for ((verified, policy), result) in pending.into_iter().zip(results) {
        match (result, policy) {
            (Err(e), _) => {
                tracing::debug!("signature by {} does not verify: {e}", verified.signing_key);
                failures.push(VerifyError::Bad {
                    fingerprint: verified.signing_key,
                });
            }
            (Ok(()), Some(e)) => failures.push(e),
            (Ok(()), None) => return Ok(verified),
        }
    }
    // The first of the most informative failures.
    Err(failures
        .into_iter()
        .rev()
        .max_by_key(VerifyError::rank)
        .unwrap_or(VerifyError::NoSignature))
}

/// Verify a detached signature (ASCII-armoured or binary, as in `.asc` / `.gpgsig` files) over
/// `data`. `data` is read exactly once, in 64 KiB chunks, each handed to one hashing thread per
/// candidate signature through a bounded channel: memory does not grow with the data. Nothing is
/// read when no signature could count anyway (unknown or unpinned signer).
pub fn verify_detached(
    keyring: &Keyring,
    pins: &[Fingerprint],
    data: impl Read,
    signature: &[u8],
) -> Result<Verified, VerifyError> {
    let sigs = parse_signatures(signature)?;
    decide(keyring, pins, &sigs, |jobs| hash_streaming(jobs, data))
}

/// Verify a cleartext-signed (clearsigned) document and return ONLY the signed text: dash-escaping
/// undone, trailing whitespace trimmed and line endings made `\n` (the canonical form that was
/// signed, as rpgp reconstructs it). Text around the signed block is not accepted.
pub fn verify_cleartext(
    keyring: &Keyring,
    pins: &[Fingerprint],
    text: &str,
) -> Result<(String, Verified), VerifyError> {
    if !text.contains("-----BEGIN PGP SIGNED MESSAGE-----") {
        return Err(VerifyError::NoSignature);
    }
    let (msg, _headers) = CleartextSignedMessage::from_string(text).map_err(|e| {
        VerifyError::Malformed(format!("not a well-formed clearsigned document: {e}"))
    })?;
    let signed = msg.signed_text();
    let verified = decide(keyring, pins, msg.signatures(), |jobs| {
        Ok(jobs
            .iter()
            .map(|j| j.key.check(j.sig, signed.as_bytes()))
            .collect())
    })?;
    Ok((signed.replace("\r\n", "\n"), verified))
}

/// Signature packets accepted in one file (Gentoo's carry one).
const MAX_SIGNATURES: usize = 16;

/// Size of the chunks `data` is read in.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per hashing thread.
const IN_FLIGHT: usize = 4;

/// Run the cryptographic checks of `jobs` over `data`, read once: the calling thread reads,
/// each job hashes on its own thread from a bounded channel (so memory stays at about
/// jobs × IN_FLIGHT × CHUNK). rpgp's `Signature::verify` consumes its reader incrementally
/// (`io::copy` into the hasher; text-mode normalisation is a streaming reader too).
fn hash_streaming(
    jobs: &[Job<'_>],
    mut data: impl Read,
) -> Result<Vec<Result<(), String>>, VerifyError> {
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for job in jobs {
            let (tx, rx) = mpsc::sync_channel::<Arc<[u8]>>(IN_FLIGHT);
            senders.push(Some(tx));
            let worker = std::thread::Builder::new()
                .name("pgp-hash".into())
                .spawn_scoped(scope, move || job.key.check(job.sig, ChunkReader::new(rx)))?;
            workers.push(worker);
        }
        let mut buf = vec![0u8; CHUNK];
        let read = loop {
            let n = match data.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            let chunk: Arc<[u8]> = Arc::from(&buf[..n]);
            for slot in &mut senders {
                // A worker that gave up early (e.g. unsupported algorithm) drops its receiver.
                if slot
                    .as_ref()
                    .is_some_and(|tx| tx.send(chunk.clone()).is_err())
                {
                    *slot = None;
                }
            }
            if senders.iter().all(Option::is_none) {
                break Ok(());
            }
        };
        drop(senders); // end of data for the workers
        let results = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("the verification thread panicked".to_string()))
            })
            .collect();
        read.map(|()| results).map_err(VerifyError::Io)
    })
}

/// `Read` over the chunks arriving on a channel; end of data when the sender is gone.
struct ChunkReader {
    rx: mpsc::Receiver<Arc<[u8]>>,
    chunk: Arc<[u8]>,
    pos: usize,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<Arc<[u8]>>) -> Self {
        ChunkReader {
            rx,
            chunk: Arc::from(&[][..]),
            pos: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// WKD (Web Key Directory) URLs for an e-mail address: the advanced method first, then the
/// direct method. The hash is the z-base-32 encoded SHA-1 of the lower-cased local part.
pub fn wkd_urls(email: &str) -> anyhow::Result<[String; 2]> {
    let email = email.trim();
    let Some((local, domain)) = email.rsplit_once('@') else {
        bail!("{email:?} is not an e-mail address");
    };
    let domain_ok = !domain.is_empty()
        && !domain.starts_with(['.', '-'])
        && !domain.ends_with(['.', '-'])
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if local.is_empty() || local.contains('@') || local.chars().any(char::is_whitespace) {
        bail!("{email:?} is not an e-mail address");
    }
    if !domain_ok {
        bail!("{email:?} is not an e-mail address with a plain DNS domain");
    }
    let domain = domain.to_ascii_lowercase();
    let digest = HashAlgorithm::Sha1
        .digest(local.to_ascii_lowercase().as_bytes())
        .map_err(|e| anyhow!("SHA-1 of {local:?}: {e}"))?;
    let hash = zbase32(&digest);
    let l = percent_encode(local);
    Ok([
        format!("https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/hu/{hash}?l={l}"),
        format!("https://{domain}/.well-known/openpgpkey/hu/{hash}?l={l}"),
    ])
}

fn zbase32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";
    let mut out = String::with_capacity(data.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the Unix epoch.
fn fmt_utc(secs: i64) -> String {
    // `2020-01-05T00:00:00Z` → `2020-01-05 00:00:00 UTC`: easier to read in a message.
    match crate::image::config::rfc3339(secs) {
        Ok(iso) => format!("{} UTC", iso.trim_end_matches('Z').replacen('T', " ", 1)),
        Err(_) => format!("{secs} s after 1970"),
    }
}

#[cfg(test)]
mod tests {
    //! Keys are made with rpgp itself, deterministically from seeds (rpgp's key generator needs a
    //! `rand` 0.8 RNG, which this crate does not depend on), so that creation times, expiry,
    //! flags, back-signatures and revocations are all under the test's control.

    use ::pgp::{
        bytes::Bytes,
        composed::{
            ArmorOptions, DetachedSignature, SignedKeyDetails, SignedPublicSubKey, SignedSecretKey,
        },
        crypto::{ed25519, public_key::PublicKeyAlgorithm},
        packet::{
            PubKeyInner, RevocationCode, SecretKey, SecretSubkey, SignatureConfig, Subpacket,
            UserId,
        },
        ser::Serialize,
        types::{
            Duration as PgpDuration, KeyVersion, Password, PlainSecretParams, PublicParams,
            SecretParams, SignedUser, SigningKey, Timestamp,
        },
    };

    use super::*;

    /// 2020-09-13 12:26:40 UTC
    const T0: u32 = 1_600_000_000;
    const DAY: u32 = 86_400;

    fn seed(label: &str) -> [u8; 32] {
        HashAlgorithm::Sha256
            .digest(label.as_bytes())
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn ed25519_params(label: &str) -> (PlainSecretParams, PublicParams) {
        let sk = ed25519::SecretKey::try_from_bytes(seed(label), ed25519::Mode::Ed25519).unwrap();
        let plain = PlainSecretParams::Ed25519(sk);
        let public = PublicParams::try_from(&plain).unwrap();
        (plain, public)
    }

    fn inner(public: PublicParams, created: u32) -> PubKeyInner {
        PubKeyInner::new(
            KeyVersion::V4,
            PublicKeyAlgorithm::Ed25519,
            Timestamp::from_secs(created),
            None,
            public,
        )
        .unwrap()
    }

    fn primary_key(label: &str, created: u32) -> SecretKey {
        let (plain, public) = ed25519_params(label);
        let key = PublicKey::from_inner(inner(public, created)).unwrap();
        SecretKey::new(key, SecretParams::Plain(plain)).unwrap()
    }

    fn sub_key(label: &str, created: u32) -> SecretSubkey {
        let (plain, public) = ed25519_params(label);
        let key = PublicSubkey::from_inner(inner(public, created)).unwrap();
        SecretSubkey::new(key, SecretParams::Plain(plain)).unwrap()
    }

    /// A v4 signature config with creation time and issuer subpackets for `issuer`.
    fn config(
        typ: SignatureType,
        issuer: &impl KeyDetails,
        hash: HashAlgorithm,
        created: u32,
        extra: Vec<SubpacketData>,
    ) -> SignatureConfig {
        let mut c = SignatureConfig::v4(typ, issuer.algorithm(), hash);
        c.hashed_subpackets = [
            SubpacketData::SignatureCreationTime(Timestamp::from_secs(created)),
            SubpacketData::IssuerFingerprint(issuer.fingerprint()),
        ]
        .into_iter()
        .chain(extra)
        .map(|d| Subpacket::regular(d).unwrap())
        .collect();
        c.unhashed_subpackets =
            vec![Subpacket::regular(SubpacketData::IssuerKeyId(issuer.legacy_key_id())).unwrap()];
        c
    }

    fn flags(certify: bool, sign: bool) -> KeyFlags {
        let mut f = KeyFlags::default();
        f.set_certify(certify);
        f.set_sign(sign);
        f
    }

    fn pw() -> Password {
        Password::empty()
    }

    fn uid_binding(
        primary: &SecretKey,
        uid: &UserId,
        created: u32,
        key_flags: KeyFlags,
        expires_in: Option<u32>,
    ) -> Signature {
        let mut extra = vec![SubpacketData::KeyFlags(key_flags)];
        extra.extend(
            expires_in.map(|d| SubpacketData::KeyExpirationTime(PgpDuration::from_secs(d))),
        );
        config(
            SignatureType::CertPositive,
            primary,
            HashAlgorithm::Sha256,
            created,
            extra,
        )
        .sign_certification(primary, primary.public_key(), &pw(), Tag::UserId, uid)
        .unwrap()
    }

    fn subkey_binding(
        primary: &SecretKey,
        sub: &SecretSubkey,
        created: u32,
        key_flags: KeyFlags,
        backsig: bool,
        expires_in: Option<u32>,
    ) -> Signature {
        let mut extra = vec![SubpacketData::KeyFlags(key_flags)];
        extra.extend(
            expires_in.map(|d| SubpacketData::KeyExpirationTime(PgpDuration::from_secs(d))),
        );
        if backsig {
            let back = config(
                SignatureType::KeyBinding,
                sub,
                HashAlgorithm::Sha256,
                created,
                vec![],
            )
            .sign_primary_key_binding(sub, sub.public_key(), &pw(), primary.public_key())
            .unwrap();
            extra.push(SubpacketData::EmbeddedSignature(Box::new(back)));
        }
        config(
            SignatureType::SubkeyBinding,
            primary,
            HashAlgorithm::Sha256,
            created,
            extra,
        )
        .sign_subkey_binding(primary, primary.public_key(), &pw(), sub.public_key())
        .unwrap()
    }

    fn reason(text: &'static str) -> SubpacketData {
        SubpacketData::RevocationReason(
            RevocationCode::KeyRetired,
            Bytes::from_static(text.as_bytes()),
        )
    }

    fn key_revocation(primary: &SecretKey, created: u32) -> Signature {
        config(
            SignatureType::KeyRevocation,
            primary,
            HashAlgorithm::Sha256,
            created,
            vec![reason("retired")],
        )
        .sign_key(primary, &pw(), primary.public_key())
        .unwrap()
    }

    fn subkey_revocation(primary: &SecretKey, sub: &SecretSubkey, created: u32) -> Signature {
        config(
            SignatureType::SubkeyRevocation,
            primary,
            HashAlgorithm::Sha256,
            created,
            vec![reason("lost")],
        )
        .sign_subkey_binding(primary, primary.public_key(), &pw(), sub.public_key())
        .unwrap()
    }

    /// A certificate under construction.
    struct TestCert {
        primary: SecretKey,
        uid: UserId,
        uid_sigs: Vec<Signature>,
        revocations: Vec<Signature>,
        subkeys: Vec<(SecretSubkey, Vec<Signature>)>,
    }

    impl TestCert {
        /// Primary key created at T0 that may certify and sign, with one user ID, no expiry.
        fn new(label: &str) -> TestCert {
            TestCert::with(label, flags(true, true), None)
        }

        fn with(label: &str, key_flags: KeyFlags, expires_in: Option<u32>) -> TestCert {
            let primary = primary_key(label, T0);
            let uid =
                UserId::from_str(Default::default(), format!("{label} <{label}@example.org>"))
                    .unwrap();
            let sig = uid_binding(&primary, &uid, T0, key_flags, expires_in);
            TestCert {
                primary,
                uid,
                uid_sigs: vec![sig],
                revocations: vec![],
                subkeys: vec![],
            }
        }

        /// Add a subkey created at T0 and bound at T0 with `key_flags`.
        fn add_subkey(&mut self, label: &str, key_flags: KeyFlags, backsig: bool) -> usize {
            let sub = sub_key(label, T0);
            let sig = subkey_binding(&self.primary, &sub, T0, key_flags, backsig, None);
            self.subkeys.push((sub, vec![sig]));
            self.subkeys.len() - 1
        }

        fn public(&self) -> SignedPublicKey {
            SignedPublicKey::new(
                self.primary.public_key().clone(),
                SignedKeyDetails::new(
                    self.revocations.clone(),
                    vec![],
                    vec![SignedUser::new(self.uid.clone(), self.uid_sigs.clone())],
                    vec![],
                ),
                self.subkeys
                    .iter()
                    .map(|(k, sigs)| SignedPublicSubKey::new(k.public_key().clone(), sigs.clone()))
                    .collect(),
            )
        }

        fn armored(&self) -> String {
            self.public()
                .to_armored_string(ArmorOptions::default())
                .unwrap()
        }

        fn keyring(&self) -> Keyring {
            Keyring::parse(self.armored().as_bytes(), "test").unwrap()
        }

        fn fp(&self) -> Fingerprint {
            Fingerprint::of(self.primary.public_key())
        }

        fn sub_fp(&self, i: usize) -> Fingerprint {
            Fingerprint::of(self.subkeys[i].0.public_key())
        }
    }

    /// A binary data signature with SHA-512 (as Gentoo uses) made at `created`.
    fn sign(key: &impl SigningKey, data: &[u8], created: u32) -> Signature {
        sign_with(
            key,
            data,
            created,
            SignatureType::Binary,
            HashAlgorithm::Sha512,
        )
    }

    fn sign_with(
        key: &impl SigningKey,
        data: &[u8],
        created: u32,
        typ: SignatureType,
        hash: HashAlgorithm,
    ) -> Signature {
        config(typ, key, hash, created, vec![])
            .sign(key, &pw(), data)
            .unwrap()
    }

    fn armored(sig: &Signature) -> Vec<u8> {
        DetachedSignature::new(sig.clone())
            .to_armored_bytes(ArmorOptions::default())
            .unwrap()
    }

    fn binary(sig: &Signature) -> Vec<u8> {
        DetachedSignature::new(sig.clone()).to_bytes().unwrap()
    }

    fn clearsign(key: &impl SigningKey, text: &str, created: u32) -> String {
        let c = config(
            SignatureType::Text,
            key,
            HashAlgorithm::Sha512,
            created,
            vec![],
        );
        CleartextSignedMessage::new(text, c, key, &pw())
            .unwrap()
            .to_armored_string(ArmorOptions::default())
            .unwrap()
    }

    const DATA: &[u8] = b"stage3-amd64-musl-20250101T000000Z.tar.xz\x00\x01\xff binary \r\n bytes";

    #[test]
    fn fingerprint_parsing() {
        let fp: Fingerprint = "0x13eb bdbe de7a 1277 5dfd  b1ba bb57 2e0e 2d18 2910"
            .parse()
            .unwrap();
        assert_eq!(fp.to_string(), "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910");
        assert_eq!(fp.as_str(), "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910");
        assert_eq!(fp, gentoo_pins()[0]);
        let v6 = "ab".repeat(32).parse::<Fingerprint>().unwrap();
        assert_eq!(v6.as_str(), "AB".repeat(32));

        let e = "BB572E0E2D182910".parse::<Fingerprint>().unwrap_err();
        assert!(e.to_string().contains("key ID"), "{e}");
        let e = "13EBBDBEDE7A12775DFDB1BABB572E0E2D18291G"
            .parse::<Fingerprint>()
            .unwrap_err();
        assert!(e.to_string().contains("'G'"), "{e}");
        assert!(
            "13EBBDBEDE7A12775DFDB1BABB572E0E2D1829"
                .parse::<Fingerprint>()
                .is_err()
        );
        assert!("".parse::<Fingerprint>().is_err());

        let mut pins = gentoo_pins();
        assert_eq!(pins.len(), 3);
        for p in &pins {
            assert_eq!(&p.as_str().parse::<Fingerprint>().unwrap(), p);
        }
        assert!(pins.contains(&"DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D".parse().unwrap()));
        assert!(pins.contains(&"D99EAC7379A850BCE47DA5F29E6438C817072058".parse().unwrap()));
        // The snapshot key's signing subkey is not a pin: it counts through its primary.
        assert!(!pins.contains(&"E1D6ABB63BFCFB4BA02FDF1CEC590EEAC9189250".parse().unwrap()));
        pins.sort();
        assert_eq!(pins[0].as_str(), "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910");
        assert_eq!(pins[2].as_str(), "DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D");
    }

    #[test]
    fn expired_signatures_and_floods_of_signatures_are_refused() {
        let a = TestCert::new("alice");
        let ring = a.keyring();
        let with_life = |secs: u32| {
            let life = pgp::types::Duration::try_from(std::time::Duration::from_secs(secs.into()))
                .unwrap();
            config(
                SignatureType::Binary,
                &a.primary,
                HashAlgorithm::Sha512,
                T0 + 100,
                vec![SubpacketData::SignatureExpirationTime(life)],
            )
            .sign(&a.primary, &pw(), DATA)
            .unwrap()
        };
        // Lived one day in 2020: expired now.
        let err =
            verify_detached(&ring, &[a.fp()], DATA, &armored(&with_life(86_400))).unwrap_err();
        assert!(matches!(err, VerifyError::SignatureExpired { .. }), "{err}");
        assert!(err.to_string().contains("2020-09-14"), "{err}");
        // Valid for 100 years: still counts.
        verify_detached(
            &ring,
            &[a.fp()],
            DATA,
            &armored(&with_life(100 * 365 * 86_400)),
        )
        .unwrap();

        let sig = sign(&a.primary, DATA, T0 + 100);
        let mut many = Vec::new();
        for _ in 0..=MAX_SIGNATURES {
            many.extend(binary(&sig));
        }
        let err = verify_detached(&ring, &[a.fp()], DATA, &many).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed(_)), "{err}");
        let few: Vec<u8> = (0..MAX_SIGNATURES).flat_map(|_| binary(&sig)).collect();
        verify_detached(&ring, &[a.fp()], DATA, &few).unwrap();
    }

    #[test]
    fn good_detached_armoured_and_binary() {
        let a = TestCert::new("alice");
        let ring = a.keyring();
        assert_eq!(ring.fingerprints(), vec![a.fp()]);
        let sig = sign(&a.primary, DATA, T0 + 100);
        for bytes in [armored(&sig), binary(&sig)] {
            let v = verify_detached(&ring, &[a.fp()], DATA, &bytes).unwrap();
            assert_eq!(v.primary, a.fp());
            assert_eq!(v.signing_key, a.fp());
            assert_eq!(v.created, i64::from(T0 + 100));
            assert_eq!(v.user_id.as_deref(), Some("alice <alice@example.org>"));
            let shown = v.to_string();
            assert!(shown.contains("2020-09-13 12:28:20 UTC"), "{shown}");
        }
    }

    #[test]
    fn text_mode_detached_signature_ignores_line_endings() {
        let a = TestCert::new("alice");
        let sig = sign_with(
            &a.primary,
            b"a\nb\n",
            T0 + 1,
            SignatureType::Text,
            HashAlgorithm::Sha256,
        );
        let ring = a.keyring();
        verify_detached(&ring, &[a.fp()], &b"a\r\nb\r\n"[..], &armored(&sig)).unwrap();
        let e = verify_detached(&ring, &[a.fp()], &b"a\r\nc\r\n"[..], &armored(&sig)).unwrap_err();
        assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
    }

    #[test]
    fn tampered_data_or_signature_is_bad() {
        let a = TestCert::new("alice");
        let ring = a.keyring();
        let sig = sign(&a.primary, DATA, T0 + 100);
        let mut data = DATA.to_vec();
        data[7] ^= 1;
        let e = verify_detached(&ring, &[a.fp()], &data[..], &armored(&sig)).unwrap_err();
        match &e {
            VerifyError::Bad { fingerprint } => assert_eq!(fingerprint, &a.fp()),
            other => panic!("expected Bad, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("BAD signature") && msg.contains(a.fp().as_str()),
            "{msg}"
        );
        // Truncated data.
        let e = verify_detached(&ring, &[a.fp()], &DATA[1..], &binary(&sig)).unwrap_err();
        assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
        // A flipped bit in the signature value itself.
        let mut bytes = binary(&sig);
        *bytes.last_mut().unwrap() ^= 0x40;
        let e = verify_detached(&ring, &[a.fp()], DATA, &bytes).unwrap_err();
        assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
    }

    #[test]
    fn good_clearsigned_returns_exact_payload() {
        let a = TestCert::new("alice");
        let text = "# BLAKE2B HASH\n\
                    0123abcd  stage3-amd64-musl.tar.xz\n\
                    - dashed\n\
                    -----BEGIN PGP SIGNATURE-----\n\
                    --\n\
                    last line\n";
        let doc = clearsign(&a.primary, text, T0 + 5);
        assert!(doc.contains("\n- - dashed\n"), "dash-escaped:\n{doc}");
        assert!(doc.contains("\n- -----BEGIN PGP SIGNATURE-----\n"), "{doc}");
        let (payload, v) = verify_cleartext(&a.keyring(), &[a.fp()], &doc).unwrap();
        assert_eq!(payload, text);
        assert_eq!(v.primary, a.fp());
        assert_eq!(v.created, i64::from(T0 + 5));
        // CRLF transport does not matter for a text signature.
        let (payload, _) =
            verify_cleartext(&a.keyring(), &[a.fp()], &doc.replace('\n', "\r\n")).unwrap();
        assert_eq!(payload, text);
    }

    #[test]
    fn tampered_clearsigned_payload_is_bad() {
        let a = TestCert::new("alice");
        let doc = clearsign(&a.primary, "0123abcd  stage3.tar.xz\n", T0 + 5);
        let forged = doc.replace("0123abcd", "0123abce");
        assert_ne!(forged, doc);
        let e = verify_cleartext(&a.keyring(), &[a.fp()], &forged).unwrap_err();
        assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
        // Lines outside the signed block are refused rather than ignored.
        let e = verify_cleartext(&a.keyring(), &[a.fp()], &format!("evil  x\n{doc}")).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
        let e = verify_cleartext(&a.keyring(), &[a.fp()], &format!("{doc}evil  x\n")).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
        let e = verify_cleartext(&a.keyring(), &[a.fp()], "0123abcd  stage3.tar.xz\n").unwrap_err();
        assert!(matches!(e, VerifyError::NoSignature), "{e}");
    }

    #[test]
    fn unpinned_and_unknown_keys() {
        let a = TestCert::new("alice");
        let b = TestCert::new("bob");
        let sig = armored(&sign(&a.primary, DATA, T0 + 1));

        let e = verify_detached(&a.keyring(), &[b.fp()], DATA, &sig).unwrap_err();
        match &e {
            VerifyError::NotPinned { fingerprint } => assert_eq!(fingerprint, &a.fp()),
            other => panic!("expected NotPinned, got {other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "signed by key {}, which is not one of the trusted keys",
                a.fp()
            )
        );
        let e = verify_detached(&a.keyring(), &gentoo_pins(), DATA, &sig).unwrap_err();
        assert!(matches!(e, VerifyError::NotPinned { .. }), "{e}");

        let e = verify_detached(&b.keyring(), &[a.fp(), b.fp()], DATA, &sig).unwrap_err();
        match &e {
            VerifyError::UnknownKey { issuer } => assert_eq!(issuer, a.fp().as_str()),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        assert!(e.to_string().contains("not in the keyring"), "{e}");

        let doc = clearsign(&a.primary, "x\n", T0 + 1);
        let e = verify_cleartext(&a.keyring(), &[b.fp()], &doc).unwrap_err();
        assert!(matches!(e, VerifyError::NotPinned { .. }), "{e}");
    }

    #[test]
    fn expiry_is_judged_at_signing_time() {
        // Key created at T0, valid for one day.
        let mut a = TestCert::with("alice", flags(true, true), Some(DAY));
        let ring = a.keyring();
        let pins = [a.fp()];
        // Made while the key was valid: good, although the key has long expired by now.
        let early = sign(&a.primary, DATA, T0 + 3600);
        verify_detached(&ring, &pins, DATA, &armored(&early)).unwrap();

        let late = sign(&a.primary, DATA, T0 + 2 * DAY);
        let e = verify_detached(&ring, &pins, DATA, &armored(&late)).unwrap_err();
        match &e {
            VerifyError::Expired {
                fingerprint,
                expired_at,
                signed_at,
            } => {
                assert_eq!(fingerprint, &a.fp());
                assert_eq!(*expired_at, i64::from(T0 + DAY));
                assert_eq!(*signed_at, i64::from(T0 + 2 * DAY));
            }
            other => panic!("expected Expired, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("signed on 2020-09-15 12:26:40 UTC")
                && msg.contains("expired on 2020-09-14 12:26:40 UTC"),
            "{msg}"
        );
        // Exactly at the expiry instant the key is no longer valid.
        let edge = sign(&a.primary, DATA, T0 + DAY);
        let e = verify_detached(&ring, &pins, DATA, &armored(&edge)).unwrap_err();
        assert!(matches!(e, VerifyError::Expired { .. }), "{e}");

        // A newer self-signature extending the validity applies (as with GnuPG).
        let uid = a.uid.clone();
        a.uid_sigs.push(uid_binding(
            &a.primary,
            &uid,
            T0 + 3 * DAY,
            flags(true, true),
            Some(10 * DAY),
        ));
        verify_detached(&a.keyring(), &pins, DATA, &armored(&late)).unwrap();
    }

    #[test]
    fn expired_subkey() {
        let mut a = TestCert::with("alice", flags(true, false), None);
        let sub = sub_key("alice-sign", T0);
        let binding = subkey_binding(&a.primary, &sub, T0, flags(false, true), true, Some(DAY));
        a.subkeys.push((sub, vec![binding]));
        let ring = a.keyring();
        let sig = sign(&a.subkeys[0].0, DATA, T0 + 2 * DAY);
        let e = verify_detached(&ring, &[a.fp()], DATA, &armored(&sig)).unwrap_err();
        match e {
            VerifyError::Expired { fingerprint, .. } => assert_eq!(fingerprint, a.sub_fp(0)),
            other => panic!("expected Expired, got {other:?}"),
        }
        let sig = sign(&a.subkeys[0].0, DATA, T0 + 10);
        verify_detached(&ring, &[a.fp()], DATA, &armored(&sig)).unwrap();
    }

    #[test]
    fn revoked_key_and_subkey() {
        let mut a = TestCert::new("alice");
        let s = a.add_subkey("alice-sign", flags(false, true), true);
        let by_primary = armored(&sign(&a.primary, DATA, T0 + 10));
        let by_sub = armored(&sign(&a.subkeys[s].0, DATA, T0 + 10));
        verify_detached(&a.keyring(), &[a.fp()], DATA, &by_sub).unwrap();

        // Subkey revoked: its signatures no longer count, the primary's still do.
        let rev = subkey_revocation(&a.primary, &a.subkeys[s].0, T0 + 20);
        a.subkeys[s].1.push(rev);
        let ring = a.keyring();
        let e = verify_detached(&ring, &[a.fp()], DATA, &by_sub).unwrap_err();
        match &e {
            VerifyError::Revoked {
                fingerprint,
                reason,
            } => {
                assert_eq!(fingerprint, &a.sub_fp(s));
                assert_eq!(reason.as_deref(), Some("KeyRetired: lost"));
            }
            other => panic!("expected Revoked, got {other:?}"),
        }
        assert!(
            e.to_string()
                .contains("has been revoked (KeyRetired: lost)"),
            "{e}"
        );
        verify_detached(&ring, &[a.fp()], DATA, &by_primary).unwrap();

        // Primary revoked (even after the signature was made): nothing counts.
        a.revocations.push(key_revocation(&a.primary, T0 + 30));
        let ring = a.keyring();
        for sig in [&by_primary, &by_sub] {
            let e = verify_detached(&ring, &[a.fp()], DATA, sig).unwrap_err();
            match e {
                VerifyError::Revoked { fingerprint, .. } => assert_eq!(fingerprint, a.fp()),
                other => panic!("expected Revoked, got {other:?}"),
            }
        }
        let doc = clearsign(&a.primary, "x\n", T0 + 10);
        let e = verify_cleartext(&ring, &[a.fp()], &doc).unwrap_err();
        assert!(matches!(e, VerifyError::Revoked { .. }), "{e}");
    }

    #[test]
    fn signing_subkey_counts_through_its_primary() {
        let mut a = TestCert::with("alice", flags(true, false), None);
        let s = a.add_subkey("alice-sign", flags(false, true), true);
        let ring = a.keyring();
        let sig = armored(&sign(&a.subkeys[s].0, DATA, T0 + 10));
        let v = verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap();
        assert_eq!(v.primary, a.fp());
        assert_eq!(v.signing_key, a.sub_fp(s));
        assert_ne!(v.primary, v.signing_key);
        assert!(v.to_string().contains(&format!("subkey {}", a.sub_fp(s))));
        // Pinning the subkey itself is not how pins work.
        let e = verify_detached(&ring, &[a.sub_fp(s)], DATA, &sig).unwrap_err();
        match e {
            VerifyError::NotPinned { fingerprint } => assert_eq!(fingerprint, a.fp()),
            other => panic!("expected NotPinned, got {other:?}"),
        }
        // The primary lacks the signing flag: its own signatures do not count.
        let own = armored(&sign(&a.primary, DATA, T0 + 10));
        let e = verify_detached(&ring, &[a.fp()], DATA, &own).unwrap_err();
        match &e {
            VerifyError::UnusableKey {
                fingerprint,
                reason,
            } => {
                assert_eq!(fingerprint, &a.fp());
                assert!(reason.contains("signing capability"), "{reason}");
            }
            other => panic!("expected UnusableKey, got {other:?}"),
        }
    }

    #[test]
    fn unusable_subkeys_are_rejected() {
        let mut a = TestCert::with("alice", flags(true, false), None);
        let no_back = a.add_subkey("no-backsig", flags(false, true), false);
        let no_flag = a.add_subkey("no-sign-flag", flags(false, false), true);
        // A binding signature claiming to be from the primary, made by another key.
        let mallory = primary_key("mallory", T0);
        let forged_sub = sub_key("forged", T0);
        let forged = config(
            SignatureType::SubkeyBinding,
            a.primary.public_key(),
            HashAlgorithm::Sha256,
            T0,
            vec![SubpacketData::KeyFlags(flags(false, true))],
        )
        .sign_subkey_binding(
            &mallory,
            a.primary.public_key(),
            &pw(),
            forged_sub.public_key(),
        )
        .unwrap();
        a.subkeys.push((forged_sub, vec![forged]));
        let bad_binding = a.subkeys.len() - 1;
        let ring = a.keyring();

        for (i, expect) in [
            (no_back, "back-signature"),
            (no_flag, "signing capability"),
            (bad_binding, "binding signature does not verify"),
        ] {
            let sig = armored(&sign(&a.subkeys[i].0, DATA, T0 + 10));
            let e = verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap_err();
            match &e {
                VerifyError::UnusableKey {
                    fingerprint,
                    reason,
                } => {
                    assert_eq!(fingerprint, &a.sub_fp(i));
                    assert!(reason.contains(expect), "{reason}");
                }
                other => panic!("expected UnusableKey for {expect}, got {other:?}"),
            }
        }
    }

    #[test]
    fn signature_older_than_the_key_is_rejected() {
        let a = TestCert::new("alice");
        let sig = armored(&sign(&a.primary, DATA, T0 - 100));
        let e = verify_detached(&a.keyring(), &[a.fp()], DATA, &sig).unwrap_err();
        assert!(
            matches!(&e, VerifyError::UnusableKey { reason, .. } if reason.contains("older than the key")),
            "{e}"
        );
    }

    #[test]
    fn certificates_with_bad_self_signatures_are_refused() {
        let mut a = TestCert::new("alice");
        let mallory = primary_key("mallory", T0);
        // Claims to be alice's self-signature, made by mallory.
        let forged = config(
            SignatureType::CertPositive,
            a.primary.public_key(),
            HashAlgorithm::Sha256,
            T0 + 1,
            vec![SubpacketData::KeyFlags(flags(true, true))],
        )
        .sign_certification(&mallory, a.primary.public_key(), &pw(), Tag::UserId, &a.uid)
        .unwrap();
        a.uid_sigs.push(forged);
        let e = Keyring::parse(a.armored().as_bytes(), "keys.asc").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("keys.asc: key ")
                && msg.contains(a.fp().as_str())
                && msg.contains("does not verify"),
            "{msg}"
        );

        // A forged key revocation is no better.
        let mut b = TestCert::new("bob");
        let forged = config(
            SignatureType::KeyRevocation,
            b.primary.public_key(),
            HashAlgorithm::Sha256,
            T0 + 1,
            vec![],
        )
        .sign_key(&mallory, &pw(), b.primary.public_key())
        .unwrap();
        b.revocations.push(forged);
        let e = Keyring::parse(b.armored().as_bytes(), "keys.asc").unwrap_err();
        assert!(
            format!("{e:#}").contains("revocation signature does not verify"),
            "{e:#}"
        );
    }

    #[test]
    fn third_party_certifications_are_ignored() {
        let mut a = TestCert::new("alice");
        let carol = primary_key("carol", T0);
        let cert = config(
            SignatureType::CertGeneric,
            carol.public_key(),
            HashAlgorithm::Sha256,
            T0 + 1,
            vec![],
        )
        .sign_certification_third_party(&carol, &pw(), a.primary.public_key(), Tag::UserId, &a.uid)
        .unwrap();
        a.uid_sigs.push(cert);
        // Also one that does not verify (it certifies another user ID): not ours to judge.
        let other = UserId::from_str(Default::default(), "someone else").unwrap();
        let broken = config(
            SignatureType::CertGeneric,
            carol.public_key(),
            HashAlgorithm::Sha256,
            T0 + 1,
            vec![],
        )
        .sign_certification_third_party(&carol, &pw(), a.primary.public_key(), Tag::UserId, &other)
        .unwrap();
        a.uid_sigs.push(broken);
        let ring = a.keyring();
        let sig = armored(&sign(&a.primary, DATA, T0 + 10));
        verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap();
    }

    #[test]
    fn keyring_parsing_formats_and_merging() {
        let a = TestCert::new("alice");
        let b = TestCert::new("bob");
        let c = TestCert::new("carol");
        let mut want = vec![a.fp(), b.fp(), c.fp()];
        want.sort();

        // Several armour blocks with text around them, one block holding two keys.
        let mut two = Vec::new();
        let keys = [b.public(), c.public()];
        ::pgp::armor::write(&&keys[..], BlockType::PublicKey, &mut two, None, true).unwrap();
        let text = format!(
            "Gentoo keys\n\n{}\nsome text between\n{}trailing\n",
            a.armored(),
            String::from_utf8(two).unwrap()
        );
        let ring = Keyring::parse(text.as_bytes(), "keys.asc").unwrap();
        assert_eq!(ring.fingerprints(), want);
        assert!(!ring.is_empty());

        // Binary, several keys back to back.
        let mut bin = a.public().to_bytes().unwrap();
        bin.extend(b.public().to_bytes().unwrap());
        bin.extend(c.public().to_bytes().unwrap());
        assert_eq!(
            Keyring::parse(&bin, "keys.gpg").unwrap().fingerprints(),
            want
        );

        let mut pinned = ring.clone();
        pinned.retain_pinned(&[b.fp(), gentoo_pins()[0].clone()]);
        assert_eq!(pinned.fingerprints(), vec![b.fp()]);
        pinned.retain_pinned(&gentoo_pins());
        assert!(pinned.is_empty());

        // Copies of one certificate merge: a revocation on either copy applies.
        let mut revoked = TestCert::new("alice");
        revoked
            .revocations
            .push(key_revocation(&revoked.primary, T0 + 50));
        let sig = armored(&sign(&a.primary, DATA, T0 + 10));
        let mut ring = a.keyring();
        verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap();
        ring.extend(revoked.keyring());
        assert_eq!(ring.fingerprints(), vec![a.fp()]);
        let e = verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap_err();
        assert!(matches!(e, VerifyError::Revoked { .. }), "{e}");
        let both = format!("{}{}", a.armored(), revoked.armored());
        let ring = Keyring::parse(both.as_bytes(), "both").unwrap();
        assert_eq!(ring.fingerprints(), vec![a.fp()]);
        let e = verify_detached(&ring, &[a.fp()], DATA, &sig).unwrap_err();
        assert!(matches!(e, VerifyError::Revoked { .. }), "{e}");
    }

    #[test]
    fn keyring_errors() {
        for (input, expect) in [
            (&b""[..], "no OpenPGP public key"),
            (b"hello world\n", "neither ASCII-armoured nor binary"),
            (
                b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQ==\n",
                "truncated",
            ),
        ] {
            let e = Keyring::parse(input, "k.asc").unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.starts_with("k.asc: ") && msg.contains(expect), "{msg}");
        }
        let a = TestCert::new("alice");
        let secret = SignedSecretKey::new(a.primary.clone(), a.public().details, vec![], vec![]);
        let e = Keyring::parse(
            secret
                .to_armored_string(ArmorOptions::default())
                .unwrap()
                .as_bytes(),
            "k.asc",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("PRIVATE key"), "{e:#}");
        let sig = armored(&sign(&a.primary, DATA, T0));
        let e = Keyring::parse(&sig, "k.asc").unwrap_err();
        assert!(
            format!("{e:#}").contains("expected an OpenPGP public key"),
            "{e:#}"
        );
    }

    #[test]
    fn malformed_and_missing_signatures() {
        let a = TestCert::new("alice");
        let ring = a.keyring();
        let pins = [a.fp()];
        for input in [&b""[..], b"  \n"] {
            let e = verify_detached(&ring, &pins, DATA, input).unwrap_err();
            assert!(matches!(e, VerifyError::NoSignature), "{e}");
        }
        for input in [
            &b"not a signature\n"[..],
            a.armored().as_bytes(),
            &[0xff, 0x00, 0x12],
        ] {
            let e = verify_detached(&ring, &pins, DATA, input).unwrap_err();
            assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
        }
        // A binary public key is not a signature either.
        let e = verify_detached(&ring, &pins, DATA, &a.public().to_bytes().unwrap()).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
    }

    #[test]
    fn several_signatures_one_good_is_enough() {
        let a = TestCert::new("alice");
        let b = TestCert::new("bob");
        let mut ring = a.keyring();
        ring.extend(b.keyring());
        let pins = [a.fp(), b.fp()];
        let good_a = sign(&a.primary, DATA, T0 + 1);
        let bad_a = sign(&a.primary, b"other data", T0 + 1);
        let good_b = sign(&b.primary, DATA, T0 + 1);
        let bad_b = sign(&b.primary, b"other data", T0 + 1);
        let stranger = sign(&primary_key("stranger", T0), DATA, T0 + 1);

        let cat = |sigs: &[&Signature], armour: bool| -> Vec<u8> {
            sigs.iter()
                .flat_map(|s| if armour { armored(s) } else { binary(s) })
                .collect()
        };
        for armour in [true, false] {
            // Two pinned candidates hashed in one pass: the bad one does not spoil the good one.
            let v = verify_detached(&ring, &pins, DATA, &cat(&[&bad_a, &good_b], armour)).unwrap();
            assert_eq!(v.primary, b.fp());
            let v =
                verify_detached(&ring, &pins, DATA, &cat(&[&stranger, &good_a], armour)).unwrap();
            assert_eq!(v.primary, a.fp());
            // Most informative failure: Bad beats UnknownKey and NotPinned.
            let e = verify_detached(&ring, &pins, DATA, &cat(&[&stranger, &bad_a], armour))
                .unwrap_err();
            assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
            let e = verify_detached(&ring, &[b.fp()], DATA, &cat(&[&good_a, &bad_b], armour))
                .unwrap_err();
            assert!(
                matches!(&e, VerifyError::Bad { fingerprint } if *fingerprint == b.fp()),
                "{e}"
            );
            let e = verify_detached(&ring, &[b.fp()], DATA, &cat(&[&stranger, &good_a], armour))
                .unwrap_err();
            assert!(matches!(e, VerifyError::NotPinned { .. }), "{e}");
        }
    }

    /// Produces `len` bytes of a position-dependent pattern without holding them.
    struct Pattern {
        pos: u64,
        len: u64,
        block: Vec<u8>,
    }

    impl Pattern {
        fn new(len: u64) -> Pattern {
            let block = (0..4093u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            Pattern { pos: 0, len, block }
        }
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let off = (self.pos % self.block.len() as u64) as usize;
            let n = buf
                .len()
                .min(self.block.len() - off)
                .min((self.len - self.pos) as usize);
            buf[..n].copy_from_slice(&self.block[off..off + n]);
            self.pos += n as u64;
            Ok(n)
        }
    }

    fn peak_rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn detached_verification_streams_large_data() {
        const LEN: u64 = 256 << 20;
        let a = TestCert::new("alice");
        let ring = a.keyring();
        // rpgp's signing hashes its reader incrementally too.
        let sig = config(
            SignatureType::Binary,
            &a.primary,
            HashAlgorithm::Sha512,
            T0 + 1,
            vec![],
        )
        .sign(&a.primary, &pw(), Pattern::new(LEN))
        .unwrap();
        let sig = armored(&sig);
        let before = peak_rss_kib();
        verify_detached(&ring, &[a.fp()], Pattern::new(LEN), &sig).unwrap();
        if let (Some(before), Some(after)) = (before, peak_rss_kib()) {
            // Holding the data would add 256 MiB to the peak.
            assert!(
                after.saturating_sub(before) < 64 << 10,
                "peak RSS grew from {before} KiB to {after} KiB"
            );
        }
        let e = verify_detached(&ring, &[a.fp()], Pattern::new(LEN - 1), &sig).unwrap_err();
        assert!(matches!(e, VerifyError::Bad { .. }), "{e}");
    }

    #[test]
    fn read_errors_are_not_bad_signatures() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(b'x');
                self.0 -= n;
                Ok(n)
            }
        }
        let a = TestCert::new("alice");
        let sig = armored(&sign(&a.primary, DATA, T0 + 1));
        let e = verify_detached(&a.keyring(), &[a.fp()], Failing(200_000), &sig).unwrap_err();
        assert!(matches!(e, VerifyError::Io(_)), "{e}");
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }

    #[test]
    fn wkd_urls_follow_the_draft() {
        // Test vector from draft-koch-openpgp-webkey-service.
        let [advanced, direct] = wkd_urls("Joe.Doe@Example.ORG").unwrap();
        assert_eq!(
            advanced,
            "https://openpgpkey.example.org/.well-known/openpgpkey/example.org/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe"
        );
        assert_eq!(
            direct,
            "https://example.org/.well-known/openpgpkey/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe"
        );
        let [advanced, _] = wkd_urls("releng+x@gentoo.org").unwrap();
        assert!(advanced.ends_with("?l=releng%2Bx"), "{advanced}");
        for bad in [
            "joe",
            "@example.org",
            "joe@",
            "jo e@example.org",
            "joe@exa mple.org",
            "joe@-x.org",
            "joe@x..org",
        ] {
            assert!(wkd_urls(bad).is_err(), "{bad}");
        }
        assert_eq!(zbase32(&[]), "");
        assert_eq!(zbase32(&[0xff]), "9h");
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_utc(i64::from(T0)), "2020-09-13 12:26:40 UTC");
        assert_eq!(fmt_utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
        assert_eq!(fmt_utc(-1), "1969-12-31 23:59:59 UTC");
    }
}
