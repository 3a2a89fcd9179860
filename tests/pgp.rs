//! Interoperability of `inputs::pgp` with real GnuPG output: keys, detached and clearsigned
//! signatures made by `gpg` (the tests use gpg; the product never does).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use gentoo_mkimg::inputs::pgp::{
    Fingerprint, Keyring, VerifyError, gentoo_pins, verify_cleartext, verify_detached,
};

/// A throw-away GNUPGHOME; its gpg-agent is stopped on drop.
struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    fn new() -> Gpg {
        // scripts/setup-host installs gnupg: a missing gpg is a broken test host, not a skip.
        assert!(
            Command::new("gpg").arg("--version").output().is_ok(),
            "gpg is not installed (scripts/setup-host installs gnupg)"
        );
        // Short path: the agent's socket lives in it.
        let home = tempfile::Builder::new()
            .prefix("gpg")
            .tempdir_in("/tmp")
            .unwrap();
        Gpg { home }
    }

    /// Run gpg non-interactively (empty passphrase), optionally at a faked time; stdout.
    fn run_at(&self, time: Option<&str>, args: &[&str]) -> Vec<u8> {
        let mut cmd = Command::new("gpg");
        cmd.arg("--homedir")
            .arg(self.home.path())
            .args(["--batch", "--no-tty", "--pinentry-mode", "loopback"])
            .args(["--passphrase", ""]);
        if let Some(t) = time {
            cmd.args(["--faked-system-time", t]);
        }
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn run(&self, args: &[&str]) -> Vec<u8> {
        self.run_at(None, args)
    }

    /// Fingerprints (primary first, then subkeys) of the key matching `who`.
    fn fingerprints(&self, who: &str) -> Vec<Fingerprint> {
        let out = self.run(&["--with-colons", "--list-keys", who]);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("fpr:"))
            .map(|l| l.split(':').nth(9).unwrap().parse().unwrap())
            .collect()
    }

    fn gen_key(&self, time: Option<&str>, uid: &str, algo: &str, usage: &str, expire: &str) {
        self.run_at(time, &["--quick-gen-key", uid, algo, usage, expire]);
    }

    fn export_armored(&self, who: &[&str]) -> Vec<u8> {
        let mut args = vec!["--armor", "--export"];
        args.extend(who);
        self.run(&args)
    }

    /// Detached signature of `file` by `who` with extra gpg options; the signature bytes.
    fn detach_sign(&self, time: Option<&str>, who: &str, file: &Path, extra: &[&str]) -> Vec<u8> {
        let out = file.with_extension(format!("sig{}", rand_suffix()));
        let mut args = vec!["--local-user", who, "--detach-sign"];
        args.extend(extra);
        args.extend(["--output", out.to_str().unwrap(), file.to_str().unwrap()]);
        self.run_at(time, &args);
        fs::read(out).unwrap()
    }

    fn clearsign(&self, who: &str, file: &Path) -> String {
        let out = file.with_extension(format!("asc{}", rand_suffix()));
        self.run(&[
            "--local-user",
            who,
            "--clearsign",
            "--output",
            out.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        fs::read_to_string(out).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// Shaped like Gentoo's DIGESTS / latest-stage3 files, plus lines that need dash-escaping.
const DIGESTS: &str = "# BLAKE2B HASH\n\
    1f0e4d1c2b3a49586776a5b4c3d2e1f0ffeeddccbbaa99887766554433221100\
    1f0e4d1c2b3a49586776a5b4c3d2e1f0ffeeddccbbaa99887766554433221100  stage3-amd64-musl-20250105T170325Z.tar.xz\n\
    # SHA512 HASH\n\
    00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\
    00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff  stage3-amd64-musl-20250105T170325Z.tar.xz\n\
    - dashed\n\
    -----BEGIN PGP SIGNATURE-----\n\
    --\n";

/// Some binary data to sign: 3 MiB, so that it spans many read chunks.
fn data() -> Vec<u8> {
    (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

fn assert_bad(e: VerifyError) {
    assert!(
        matches!(e, VerifyError::Bad { .. }),
        "expected Bad, got {e:?}: {e}"
    );
}

fn assert_not_pinned(e: VerifyError, fp: &Fingerprint) {
    match &e {
        VerifyError::NotPinned { fingerprint } => assert_eq!(fingerprint, fp),
        other => panic!("expected NotPinned, got {other:?}: {e}"),
    }
}

/// Detached (armoured, binary, text mode) and clearsigned, for one key.
fn check_key(gpg: &Gpg, who: &str, uid: &str, ring: &Keyring, fp: &Fingerprint) {
    let pins = [fp.clone()];
    let data = data();
    let file = gpg.path("stage3.tar.xz");
    fs::write(&file, &data).unwrap();

    let armored = gpg.detach_sign(None, who, &file, &["--armor"]);
    assert!(armored.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
    let binary = gpg.detach_sign(None, who, &file, &[]);
    assert!(binary[0] & 0x80 != 0);
    for sig in [&armored, &binary] {
        let v = verify_detached(ring, &pins, &data[..], sig).unwrap();
        assert_eq!(&v.primary, fp);
        assert_eq!(&v.signing_key, fp);
        assert_eq!(v.user_id.as_deref(), Some(uid));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((v.created - now).abs() < 600, "{v:?}");
        // Also straight from the file, as the product reads it.
        verify_detached(ring, &pins, fs::File::open(&file).unwrap(), sig).unwrap();

        assert_not_pinned(
            verify_detached(ring, &gentoo_pins(), &data[..], sig).unwrap_err(),
            fp,
        );
        let mut changed = data.clone();
        changed[1_234_567] ^= 0x01;
        assert_bad(verify_detached(ring, &pins, &changed[..], sig).unwrap_err());
        assert_bad(verify_detached(ring, &pins, &data[..data.len() - 1], sig).unwrap_err());
    }
    // One byte of the signature changed (inside the signature value at the end of the packet).
    let mut sig = binary.clone();
    let n = sig.len();
    sig[n - 3] ^= 0x10;
    let e = verify_detached(ring, &pins, &data[..], &sig).unwrap_err();
    assert!(
        matches!(e, VerifyError::Bad { .. } | VerifyError::Malformed(_)),
        "{e:?}"
    );

    // Text mode: line endings do not matter.
    let text = gpg.path("notes.txt");
    fs::write(&text, "one\ntwo\n").unwrap();
    let sig = gpg.detach_sign(None, who, &text, &["--armor", "--textmode"]);
    verify_detached(ring, &pins, &b"one\r\ntwo\r\n"[..], &sig).unwrap();
    assert_bad(verify_detached(ring, &pins, &b"one\ntwo!\n"[..], &sig).unwrap_err());

    // Clearsigned DIGESTS.
    let digests = gpg.path("DIGESTS");
    fs::write(&digests, DIGESTS).unwrap();
    let doc = gpg.clearsign(who, &digests);
    assert!(doc.contains("\n- - dashed\n"), "gpg dash-escapes:\n{doc}");
    let (payload, v) = verify_cleartext(ring, &pins, &doc).unwrap();
    // The line break before the signature belongs to the framework, not to the signed text.
    assert_eq!(payload, DIGESTS.strip_suffix('\n').unwrap());
    assert_eq!(&v.primary, fp);
    assert_not_pinned(
        verify_cleartext(ring, &gentoo_pins(), &doc).unwrap_err(),
        fp,
    );
    let forged = doc.replacen("1f0e4d1c", "1f0e4d1d", 1);
    assert_ne!(forged, doc);
    assert_bad(verify_cleartext(ring, &pins, &forged).unwrap_err());
    let forged = doc.replace("- - dashed", "- - dashes");
    assert_bad(verify_cleartext(ring, &pins, &forged).unwrap_err());
}

#[test]
fn gnupg_ed25519_and_rsa_keys() {
    let gpg = Gpg::new();
    gpg.gen_key(None, "Test <t@example.org>", "ed25519", "sign", "1y");
    gpg.gen_key(None, "Rsa <r@example.org>", "rsa2048", "sign", "1y");
    let ed = gpg.fingerprints("t@example.org")[0].clone();
    let rsa = gpg.fingerprints("r@example.org")[0].clone();

    // Both keys in one armour block, loaded from a file.
    let keys = gpg.path("keys.asc");
    fs::write(&keys, gpg.export_armored(&[ed.as_str(), rsa.as_str()])).unwrap();
    let ring = Keyring::load(&keys).unwrap();
    let mut want = vec![ed.clone(), rsa.clone()];
    want.sort();
    assert_eq!(ring.fingerprints(), want);
    // Binary export too.
    let bin = gpg.run(&["--export", ed.as_str(), rsa.as_str()]);
    assert_eq!(
        Keyring::parse(&bin, "keys.gpg").unwrap().fingerprints(),
        want
    );

    check_key(&gpg, "t@example.org", "Test <t@example.org>", &ring, &ed);
    check_key(&gpg, "r@example.org", "Rsa <r@example.org>", &ring, &rsa);

    // Signed by the other key in the keyring, which is not pinned.
    let file = gpg.path("f");
    fs::write(&file, b"x").unwrap();
    let sig = gpg.detach_sign(None, "r@example.org", &file, &["--armor"]);
    assert_not_pinned(
        verify_detached(&ring, std::slice::from_ref(&ed), &b"x"[..], &sig).unwrap_err(),
        &rsa,
    );
    // Only the signer's key loaded: the other is unknown.
    let only_ed = Keyring::parse(&gpg.export_armored(&[ed.as_str()]), "ed.asc").unwrap();
    match verify_detached(&only_ed, &[ed.clone(), rsa.clone()], &b"x"[..], &sig).unwrap_err() {
        VerifyError::UnknownKey { issuer } => assert_eq!(issuer, rsa.as_str()),
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    // SHA-1 is not trusted, even by a pinned RSA key.
    let sig = gpg.detach_sign(None, "r@example.org", &file, &["--digest-algo", "SHA1"]);
    match verify_detached(&ring, std::slice::from_ref(&rsa), &b"x"[..], &sig).unwrap_err() {
        VerifyError::WeakHash { algorithm, .. } => assert_eq!(algorithm, "SHA1"),
        other => panic!("expected WeakHash, got {other:?}"),
    }
}

#[test]
fn gnupg_signing_subkey() {
    let gpg = Gpg::new();
    gpg.gen_key(None, "Snap <s@example.org>", "ed25519", "cert", "never");
    let primary = gpg.fingerprints("s@example.org")[0].clone();
    gpg.run(&["--quick-add-key", primary.as_str(), "ed25519", "sign", "1y"]);
    let fps = gpg.fingerprints("s@example.org");
    assert_eq!(fps.len(), 2);
    let sub = fps[1].clone();
    let ring = Keyring::parse(&gpg.export_armored(&[primary.as_str()]), "snap.asc").unwrap();
    assert_eq!(ring.fingerprints(), vec![primary.clone()]);

    let file = gpg.path("portage-latest.tar.xz");
    let data = data();
    fs::write(&file, &data).unwrap();
    let sig = gpg.detach_sign(None, "s@example.org", &file, &["--armor"]);
    let v = verify_detached(&ring, std::slice::from_ref(&primary), &data[..], &sig).unwrap();
    assert_eq!(v.primary, primary);
    assert_eq!(v.signing_key, sub);
    assert_not_pinned(
        verify_detached(&ring, std::slice::from_ref(&sub), &data[..], &sig).unwrap_err(),
        &primary,
    );
}

#[test]
fn gnupg_expired_key() {
    let gpg = Gpg::new();
    // Created 2020-01-01 00:00, valid for one day.
    gpg.gen_key(
        Some("20200101T000000"),
        "Old <o@example.org>",
        "ed25519",
        "sign",
        "1d",
    );
    let fp = gpg.fingerprints("o@example.org")[0].clone();
    let pins = [fp.clone()];
    let file = gpg.path("f");
    fs::write(&file, b"old data").unwrap();
    let early = gpg.detach_sign(
        Some("20200101T120000"),
        "o@example.org",
        &file,
        &["--armor"],
    );
    let old_key = Keyring::parse(&gpg.export_armored(&[fp.as_str()]), "old.asc").unwrap();
    // Made while the key was valid: good, although the key has expired since.
    verify_detached(&old_key, &pins, &b"old data"[..], &early).unwrap();

    // gpg refuses to sign with an expired key, so extend it (at 2020-01-05) and sign then;
    // against the copy of the key from before the extension, that signature is after expiry.
    gpg.run_at(
        Some("20200105T000000"),
        &["--quick-set-expire", fp.as_str(), "10d"],
    );
    let late = gpg.detach_sign(
        Some("20200105T000000"),
        "o@example.org",
        &file,
        &["--armor"],
    );
    let e = verify_detached(&old_key, &pins, &b"old data"[..], &late).unwrap_err();
    match &e {
        VerifyError::Expired {
            fingerprint,
            expired_at,
            signed_at,
        } => {
            assert_eq!(fingerprint, &fp);
            assert_eq!(*expired_at, 1_577_923_200); // 2020-01-02 00:00:00 UTC
            assert_eq!(*signed_at, 1_578_182_400); // 2020-01-05 00:00:00 UTC
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!(
            "signed on 2020-01-05 00:00:00 UTC by key {fp}, which had expired on 2020-01-02 00:00:00 UTC"
        )
    );
    // With the extended key, both signatures are good.
    let new_key = Keyring::parse(&gpg.export_armored(&[fp.as_str()]), "new.asc").unwrap();
    verify_detached(&new_key, &pins, &b"old data"[..], &late).unwrap();
    verify_detached(&new_key, &pins, &b"old data"[..], &early).unwrap();
    // And if both copies are around, the newer self-signature wins.
    let mut both = old_key.clone();
    both.extend(new_key);
    verify_detached(&both, &pins, &b"old data"[..], &late).unwrap();
}

#[test]
fn gnupg_revoked_key() {
    let gpg = Gpg::new();
    gpg.gen_key(None, "Gone <g@example.org>", "ed25519", "sign", "1y");
    let fp = gpg.fingerprints("g@example.org")[0].clone();
    let file = gpg.path("f");
    fs::write(&file, b"data").unwrap();
    let sig = gpg.detach_sign(None, "g@example.org", &file, &["--armor"]);
    let before = Keyring::parse(&gpg.export_armored(&[fp.as_str()]), "k.asc").unwrap();
    verify_detached(&before, std::slice::from_ref(&fp), &b"data"[..], &sig).unwrap();

    // The revocation certificate gpg made at key generation, "armed" by removing the colon.
    let rev = gpg.path(&format!("openpgp-revocs.d/{fp}.rev"));
    let armed = fs::read_to_string(&rev)
        .unwrap()
        .replace(":-----BEGIN", "-----BEGIN");
    let armed_path = gpg.path("armed.rev");
    fs::write(&armed_path, armed).unwrap();
    gpg.run(&["--import", armed_path.to_str().unwrap()]);
    let after = Keyring::parse(&gpg.export_armored(&[fp.as_str()]), "k.asc").unwrap();
    let e = verify_detached(&after, std::slice::from_ref(&fp), &b"data"[..], &sig).unwrap_err();
    match &e {
        VerifyError::Revoked { fingerprint, .. } => assert_eq!(fingerprint, &fp),
        other => panic!("expected Revoked, got {other:?}"),
    }
    assert!(e.to_string().contains("has been revoked"), "{e}");
    // A keyring that still has the old copy learns of the revocation when merged.
    let mut merged = before.clone();
    merged.extend(after);
    assert!(matches!(
        verify_detached(&merged, std::slice::from_ref(&fp), &b"data"[..], &sig).unwrap_err(),
        VerifyError::Revoked { .. }
    ));
}
