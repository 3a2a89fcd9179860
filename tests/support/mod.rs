//! Servers for the push tests, all on 127.0.0.1 and started by the tests themselves: the
//! real distribution registry (Debian's `docker-registry`) with its own config and storage
//! in a temporary directory, a fault-injecting proxy and a token service; and a file mirror
//! for the download tests.
#![allow(dead_code)] // not every test uses every helper

pub mod mirror;
pub mod proxy;
pub mod token;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How the registry authenticates.
pub enum RegistryAuth<'a> {
    None,
    /// An htpasswd file (bcrypt, made with `htpasswd -B`).
    Htpasswd(&'a Path),
    /// Tokens from `realm`, signed by the key of `cert` (PEM).
    Token {
        realm: &'a str,
        cert: &'a Path,
    },
}

/// A running `docker-registry serve`, killed on drop.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    child: Child,
}

impl Registry {
    pub fn start(dir: &Path, auth: RegistryAuth) -> Registry {
        Registry::start_tls(dir, auth, None)
    }

    /// With HTTPS, serving `tls` = (certificate chain, key), PEM files.
    pub fn start_tls(dir: &Path, auth: RegistryAuth, tls: Option<(&Path, &Path)>) -> Registry {
        let tls = match tls {
            Some((cert, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let auth = match auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Htpasswd(path) => format!(
                "auth:\n  htpasswd:\n    realm: gentoo-mkimg-test\n    path: {}\n",
                path.display()
            ),
            RegistryAuth::Token { realm, cert } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token::SERVICE,
                token::ISSUER,
                cert.display()
            ),
        };
        // A port picked just before: another process could take it in between, so retry.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: gentoo-mkimg-test-secret\n{tls}{auth}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join("registry.log")).unwrap();
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {REGISTRY_BIN} (apt-get install docker-registry): {e}")
                });
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut registry = Registry {
                addr,
                dir: dir.to_path_buf(),
                child,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = registry.child.try_wait() {
                    break; // exited: port taken, or a bad config
                }
                // Ours answers (not another test's server that took the port first): it
                // logs that it listens, and then something answers there.
                if registry.log().contains(&format!("listening on {addr}"))
                    && http(addr, "GET", "/v2/", &[]).is_some()
                {
                    return registry;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("registry did not start:\n{}", registry.log());
        }
        panic!("could not start {REGISTRY_BIN}");
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request to `addr`: (status, head, body), None if nothing answered.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String, Vec<u8>)> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head, raw[split + 4..].to_vec()))
}

/// The manifest digest `skopeo inspect` sees for `docker://REF` (None if it fails).
pub fn skopeo_digest(reference: &str, creds: Option<&str>, env_home: &Path) -> Option<String> {
    let mut cmd = Command::new("skopeo");
    cmd.arg("inspect").arg("--tls-verify=false");
    if let Some(c) = creds {
        cmd.arg("--creds").arg(c);
    }
    let out = cmd
        .arg(format!("docker://{reference}"))
        .env("HOME", env_home)
        .env("XDG_RUNTIME_DIR", env_home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .expect("run skopeo");
    if !out.status.success() {
        eprintln!(
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["Digest"].as_str().map(str::to_string)
}

/// A CA and a server certificate for IP 127.0.0.1 signed by it, made with the openssl CLI:
/// (CA certificate, server certificate, server key), PEM files in `dir`.
pub fn make_tls_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let f = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "2",
            "-subj",
            "/CN=gentoo-mkimg test CA",
            "-keyout",
            &s(f("ca.key")),
            "-out",
            &s(f("ca.pem")),
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &s(f("server.key")),
            "-out",
            &s(f("server.csr")),
        ],
    ]
    .concat());
    std::fs::write(
        f("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &s(f("server.csr")),
        "-CA",
        &s(f("ca.pem")),
        "-CAkey",
        &s(f("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(f("server.ext")),
        "-out",
        &s(f("server.pem")),
    ]);
    (f("ca.pem"), f("server.pem"), f("server.key"))
}

/// Pseudo-random, incompressible bytes (xorshift), the same for the same seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tiny stage tarball: the host's /bin/true as ./usr/bin/true (so the architecture is
/// found) and `noise_len` random bytes in ./var/noise.
pub fn make_stage(path: &Path, seed: u64, noise_len: usize) {
    let file = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(file);
    let mut dir = |name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        tar.append_data(&mut h, name, std::io::empty()).unwrap();
    };
    for d in ["./", "./usr/", "./usr/bin/", "./var/"] {
        dir(d);
    }
    let mut add = |name: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data).unwrap();
    };
    add(
        "./usr/bin/true",
        0o755,
        &std::fs::read("/bin/true").unwrap(),
    );
    add("./var/noise", 0o644, &noise(seed, noise_len));
    tar.into_inner().unwrap().sync_all().unwrap();
}

/// The 64-byte header of an aarch64 PIE program, padded: all the import reads to learn the
/// stage's platform.
pub fn aarch64_elf() -> Vec<u8> {
    let mut h = vec![0u8; 128];
    h[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    h[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    h[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    h[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    h
}

/// A tiny "arm64 stage": ./usr/bin/true is an aarch64 ELF header, ./usr/bin/emerge a script.
pub fn tiny_arm64_stage(path: &Path) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data).unwrap();
    };
    for d in ["./", "./usr/", "./usr/bin/"] {
        add(d, tar::EntryType::Directory, 0o755, &[]);
    }
    add(
        "./usr/bin/true",
        tar::EntryType::Regular,
        0o755,
        &aarch64_elf(),
    );
    add(
        "./usr/bin/emerge",
        tar::EntryType::Regular,
        0o755,
        b"#!/bin/sh\nexit 1\n",
    );
    tar.into_inner().unwrap().sync_all().unwrap();
}
