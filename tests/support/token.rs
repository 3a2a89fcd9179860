//! A token service for the distribution registry's `auth: token` mode, on loopback.
//!
//! `GET /token?service=S&scope=repository:NAME:ACTIONS...` with HTTP basic credentials
//! answers `{"token": JWT}`: an ES256 JWT signed by a key whose self-signed certificate
//! (made with the openssl CLI) is the registry's `rootcertbundle`, carried in the `x5c`
//! header as the registry expects, granting every requested scope. Every request is
//! logged (scopes, user) and every token issued is kept, so tests can check what the tool
//! asked for and that no token leaks into its output.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

pub const ISSUER: &str = "gentoo-mkimg-test-issuer";
pub const SERVICE: &str = "gentoo-mkimg-test-registry";

#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub scopes: Vec<String>,
    pub service: String,
    pub user: Option<String>,
    pub granted: bool,
}

struct State {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    users: Vec<(String, String)>,
    log: Mutex<Vec<TokenRequest>>,
    issued: Mutex<Vec<String>>,
    counter: AtomicU64,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    /// The certificate to give the registry as `rootcertbundle`.
    pub cert_pem: PathBuf,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TokenServer {
    /// Start on a free port; `users` are the accepted (user, password) pairs.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> TokenServer {
        let key_pem = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        let key_der = dir.join("token-key.p8");
        let cert_der = dir.join("token-cert.der");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gentoo-mkimg test token issuer",
            "-keyout",
            &s(&key_pem),
            "-out",
            &s(&cert_pem),
        ]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &s(&key_pem),
            "-outform",
            "DER",
            "-out",
            &s(&key_der),
        ]);
        openssl(&[
            "x509",
            "-in",
            &s(&cert_pem),
            "-outform",
            "DER",
            "-out",
            &s(&cert_der),
        ]);
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &std::fs::read(&key_der).unwrap(),
            &rng,
        )
        .expect("an EC P-256 PKCS#8 key");
        let state = Arc::new(State {
            key,
            cert_der: std::fs::read(&cert_der).unwrap(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            log: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        TokenServer {
            addr,
            cert_pem,
            state,
            stop,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
    }

    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
}

fn serve(mut conn: TcpStream, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut scopes = Vec::new();
    let mut service = String::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "scope" => scopes.extend(percent_decode(v).split(' ').map(str::to_string)),
            "service" => service = percent_decode(v),
            _ => {}
        }
    }
    scopes.retain(|s| !s.is_empty());
    let basic = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Basic ").map(str::to_string))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let user = basic.as_deref().and_then(|b| {
        let (u, p) = b.split_once(':')?;
        state
            .users
            .iter()
            .any(|(uu, pp)| uu == u && pp == p)
            .then(|| u.to_string())
    });
    let granted = user.is_some();
    state.log.lock().unwrap().push(TokenRequest {
        scopes: scopes.clone(),
        service: service.clone(),
        user: user.clone(),
        granted,
    });
    if !granted {
        respond(
            &mut conn,
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"token\"\r\n",
            r#"{"details":"bad or missing credentials"}"#,
        );
        return Ok(());
    }
    let token = jwt(state, user.as_deref().unwrap_or(""), &service, &scopes);
    state.issued.lock().unwrap().push(token.clone());
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    respond(&mut conn, "200 OK", "", &body);
    Ok(())
}

fn jwt(state: &State, user: &str, service: &str, scopes: &[String]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            // repository:NAME:ACTIONS (NAME has no ':')
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&state.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("t{}-{}", now, state.counter.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = state
        .key
        .sign(&rng, input.as_bytes())
        .expect("sign the token");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}
