//! Registry credentials and the pieces of registry authentication that need no network:
//! where credentials come from, `WWW-Authenticate` challenges, token service requests and
//! answers.
//!
//! Credentials are looked up as Docker and Podman do, first match wins:
//! 1. `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`): `credHelpers` for the host
//!    (`docker-credential-NAME get`), then an `auths` entry (base64 `auth`, or `username` and
//!    `password`, or `identitytoken`), then `credsStore`;
//! 2. Podman's `$REGISTRY_AUTH_FILE`, `${XDG_RUNTIME_DIR}/containers/auth.json` and
//!    `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`, the same format (an `auths` key may
//!    also name a repository, `host/namespace/repo`, which then wins over the host alone).
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show them, so they cannot
//! reach a log line or an error message by accident.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

/// A password or token. Shown as `<redacted>` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret text, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (HTTP basic, also sent to a token service).
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token (`identitytoken`), traded for access tokens at the realm.
    IdentityToken(Secret),
}

impl Credential {
    /// `Basic base64(user:password)` for an `Authorization` header.
    pub fn basic_header(&self) -> Option<Secret> {
        match self {
            Credential::Basic { username, password } => Some(Secret(format!(
                "Basic {}",
                BASE64.encode(format!("{username}:{}", password.expose()))
            ))),
            Credential::IdentityToken(_) => None,
        }
    }
}

/// Credentials found for a registry, and the file or helper they came from (for messages).
#[derive(Debug, Clone)]
pub struct Found {
    pub credential: Credential,
    pub source: String,
}

/// The server name Docker uses for Docker Hub in config files and credential helpers.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

/// The host named by a key of `auths` (`https://host/v1/`, `host`, `host/ns/repo`):
/// (host, repository path or "").
fn split_key(key: &str) -> (String, String) {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.trim_end_matches('/');
    let (host, path) = key.split_once('/').unwrap_or((key, ""));
    let path = match path {
        "v1" | "v2" => "",
        p => p,
    };
    let host = if is_docker_hub(host) {
        "docker.io"
    } else {
        host
    };
    (host.to_string(), path.to_string())
}

/// How well `key` names `host`/`repository`: None when it does not, else the length of the
/// repository prefix it names (longer is more specific).
fn key_match(key: &str, host: &str, repository: &str) -> Option<usize> {
    let host = if is_docker_hub(host) {
        "docker.io"
    } else {
        host
    };
    let (khost, kpath) = split_key(key);
    if khost != host {
        return None;
    }
    if kpath.is_empty() {
        return Some(0);
    }
    let matches = repository == kpath
        || repository
            .strip_prefix(kpath.as_str())
            .is_some_and(|rest| rest.starts_with('/'));
    matches.then_some(kpath.len())
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

fn entry_credential(entry: &AuthEntry, path: &Path, key: &str) -> Result<Option<Credential>> {
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::IdentityToken(Secret::new(token))));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        // Not shown in errors: the value is the secret itself.
        let decoded = BASE64
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            bail!(
                "{}: the \"auth\" entry for {key} is not base64 of \"user:password\"",
                path.display()
            );
        };
        return Ok(Some(Credential::Basic {
            username: user.to_string(),
            password: Secret::new(password),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic {
            username: u.clone(),
            password: Secret::new(p.clone()),
        })),
        _ => Ok(None),
    }
}

/// The server name to hand a credential helper for `host`.
fn helper_server(host: &str) -> String {
    if is_docker_hub(host) {
        DOCKER_HUB_SERVER.to_string()
    } else {
        host.to_string()
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// `docker-credential-NAME get` with the server on stdin; None when it has nothing for it.
fn run_helper(name: &str, server: &str, helper_dir: Option<&Path>) -> Result<Option<Credential>> {
    let program = format!("docker-credential-{name}");
    let executable = match helper_dir {
        Some(dir) => dir.join(&program),
        None => PathBuf::from(&program),
    };
    let mut child = Command::new(&executable)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run the credential helper {program}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("{program} get: cannot read its answer"))?;
    if !out.status.success() {
        // Helpers print "credentials not found in native keychain" on stdout for a miss.
        let said = String::from_utf8_lossy(&out.stdout).to_lowercase();
        if said.contains("credentials not found") || said.trim().is_empty() && out.stderr.is_empty()
        {
            return Ok(None);
        }
        let first = String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        bail!(
            "{program} get for {server} failed ({}): {first}",
            out.status
        );
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{program} get for {server}: the answer is not JSON"))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    if answer.username == "<token>" {
        return Ok(Some(Credential::IdentityToken(Secret::new(answer.secret))));
    }
    Ok(Some(Credential::Basic {
        username: answer.username,
        password: Secret::new(answer.secret),
    }))
}

fn read_config(path: &Path) -> Result<Option<ConfigFile>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{}: not a valid credentials file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Credentials for `host`/`repository` in one config file, Docker's order.
/// `helper_dir`: where credential helpers are (None: on PATH).
fn lookup_in(
    path: &Path,
    host: &str,
    repository: &str,
    helper_dir: Option<&Path>,
) -> Result<Option<Found>> {
    let Some(config) = read_config(path)? else {
        return Ok(None);
    };
    let best_key = |keys: &mut dyn Iterator<Item = &String>| {
        keys.filter_map(|k| key_match(k, host, repository).map(|score| (score, k.clone())))
            .max_by_key(|(score, _)| *score)
            .map(|(_, k)| k)
    };
    if let Some(key) = best_key(&mut config.cred_helpers.keys())
        && let Some(helper) = config.cred_helpers.get(&key)
        && let Some(credential) = run_helper(helper, &helper_server(host), helper_dir)?
    {
        return Ok(Some(Found {
            credential,
            source: format!(
                "docker-credential-{helper} (credHelpers in {})",
                path.display()
            ),
        }));
    }
    let with_creds: Vec<&String> = config
        .auths
        .iter()
        .filter(|(_, e)| {
            e.auth.as_deref().is_some_and(|a| !a.is_empty())
                || e.identitytoken.as_deref().is_some_and(|a| !a.is_empty())
                || e.username.is_some()
        })
        .map(|(k, _)| k)
        .collect();
    if let Some(key) = best_key(&mut with_creds.into_iter())
        && let Some(entry) = config.auths.get(&key)
        && let Some(credential) = entry_credential(entry, path, &key)?
    {
        return Ok(Some(Found {
            credential,
            source: path.display().to_string(),
        }));
    }
    if let Some(store) = config.creds_store.as_deref().filter(|s| !s.is_empty())
        && let Some(credential) = run_helper(store, &helper_server(host), helper_dir)?
    {
        return Ok(Some(Found {
            credential,
            source: format!(
                "docker-credential-{store} (credsStore in {})",
                path.display()
            ),
        }));
    }
    Ok(None)
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The credential files consulted, in order.
pub fn config_files() -> Vec<PathBuf> {
    let home = env_path("HOME");
    let mut files = Vec::new();
    match env_path("DOCKER_CONFIG") {
        Some(dir) => files.push(dir.join("config.json")),
        None => files.extend(home.as_ref().map(|h| h.join(".docker/config.json"))),
    }
    files.extend(env_path("REGISTRY_AUTH_FILE"));
    files.extend(env_path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    match env_path("XDG_CONFIG_HOME") {
        Some(dir) => files.push(dir.join("containers/auth.json")),
        None => files.extend(home.map(|h| h.join(".config/containers/auth.json"))),
    }
    files
}

/// Credentials for `host` (as in the image reference, e.g. `registry.example:5000` or
/// `docker.io`) and `repository`, from the first file that has some.
pub fn find_credential(host: &str, repository: &str) -> Result<Option<Found>> {
    for path in config_files() {
        if let Some(found) = lookup_in(&path, host, repository, None)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// One challenge of a `WWW-Authenticate` header: the scheme (lowercase) and its parameters
/// (names lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parse `WWW-Authenticate` (RFC 7235): `Bearer realm="…",service="…",scope="…"`, `Basic
/// realm="…"`, several challenges separated by commas.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && !matches!(s[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        String::from_utf8_lossy(&s[start..*i]).into_owned()
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        // `word=` is a parameter of the current challenge; a bare word starts a new one.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i += 1; // closing quote
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            if let Some(last) = out.last_mut() {
                last.params.insert(word.to_ascii_lowercase(), value);
            }
        } else if word.is_empty() {
            i += 1; // a stray '='
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// The scope asking for `actions` on repository `name`.
pub fn repository_scope(name: &str, actions: &str) -> String {
    format!("repository:{name}:{actions}")
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// The access token in a token service's JSON answer (`token`, else `access_token`).
pub fn parse_token_answer(body: &[u8]) -> Result<Secret> {
    // The body holds the token: never quote it in an error.
    let answer: TokenAnswer = serde_json::from_slice(body)
        .map_err(|_| anyhow::anyhow!("the token service's answer is not the expected JSON"))?;
    match answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token.filter(|t| !t.is_empty()))
    {
        Some(t) => Ok(Secret::new(t)),
        None => bail!("the token service's answer holds no token"),
    }
}

/// `application/x-www-form-urlencoded` for an OAuth2 refresh-token request.
pub fn refresh_token_form(
    refresh_token: &Secret,
    service: Option<&str>,
    scopes: &[String],
) -> Secret {
    let mut url = reqwest::Url::parse("http://form.invalid/").expect("a constant URL parses");
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("grant_type", "refresh_token");
        q.append_pair("client_id", "gentoo-mkimg");
        q.append_pair("refresh_token", refresh_token.expose());
        if let Some(service) = service {
            q.append_pair("service", service);
        }
        if !scopes.is_empty() {
            q.append_pair("scope", &scopes.join(" "));
        }
    }
    Secret::new(url.query().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.example/token");
        assert_eq!(c[0].params["service"], "registry.example");
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
        let c = parse_challenges(r#"Basic realm="Registry Realm", Bearer realm=x"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry Realm");
        assert_eq!(c[1].params["realm"], "x");
        assert!(parse_challenges("").is_empty());
    }

    #[test]
    fn keys_match_hosts_and_repositories() {
        assert_eq!(
            key_match("https://index.docker.io/v1/", "docker.io", "library/x"),
            Some(0)
        );
        assert_eq!(
            key_match("registry.example:5000", "registry.example:5000", "a/b"),
            Some(0)
        );
        assert_eq!(
            key_match(
                "http://registry.example:5000/v2/",
                "registry.example:5000",
                "a"
            ),
            Some(0)
        );
        assert_eq!(
            key_match("registry.example", "registry.example:5000", "a/b"),
            None
        );
        assert_eq!(
            key_match("registry.example/a", "registry.example", "a/b"),
            Some(1)
        );
        assert_eq!(
            key_match("registry.example/a", "registry.example", "ab/c"),
            None
        );
    }

    #[test]
    fn secrets_do_not_show() {
        let c = Credential::Basic {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", c.basic_header()).contains(&BASE64.encode("u:hunter2")));
        assert_eq!(
            c.basic_header().map(|h| h.expose().to_string()),
            Some(format!("Basic {}", BASE64.encode("u:hunter2")))
        );
    }

    #[test]
    fn config_file_entries_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let helper = bin.join("docker-credential-fake");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\nif [ \"$host\" = helped.example ]; then\n  echo '{\"ServerURL\":\"helped.example\",\"Username\":\"hu\",\"Secret\":\"hs\"}'\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::json!({
                "auths": {
                    "plain.example": {"auth": BASE64.encode("pu:pp")},
                    "plain.example/special": {"auth": BASE64.encode("su:sp")},
                    "https://index.docker.io/v1/": {"auth": BASE64.encode("du:dp")},
                    "token.example": {"identitytoken": "tok"},
                    "empty.example": {}
                },
                "credHelpers": {"helped.example": "fake", "missing.example": "fake"}
            })
            .to_string(),
        )
        .unwrap();
        let get = |host: &str, repo: &str| {
            lookup_in(&config, host, repo, Some(&bin))
                .unwrap()
                .map(|f| f.credential)
        };
        let basic = |u: &str, p: &str| Credential::Basic {
            username: u.into(),
            password: Secret::new(p),
        };
        assert_eq!(get("plain.example", "a/b"), Some(basic("pu", "pp")));
        assert_eq!(get("plain.example", "special/x"), Some(basic("su", "sp")));
        assert_eq!(get("docker.io", "library/x"), Some(basic("du", "dp")));
        assert_eq!(get("helped.example", "x"), Some(basic("hu", "hs")));
        assert_eq!(get("missing.example", "x"), None);
        assert_eq!(get("empty.example", "x"), None);
        assert_eq!(
            get("token.example", "x"),
            Some(Credential::IdentityToken(Secret::new("tok")))
        );
        assert_eq!(get("other.example", "x"), None);
    }

    #[test]
    fn token_answers() {
        assert_eq!(
            parse_token_answer(br#"{"token":"a","access_token":"b"}"#).unwrap(),
            Secret::new("a")
        );
        assert_eq!(
            parse_token_answer(br#"{"access_token":"b"}"#).unwrap(),
            Secret::new("b")
        );
        let err = parse_token_answer(br#"{"nope":"secret-ish"}"#).unwrap_err();
        assert!(!format!("{err:#}").contains("secret-ish"));
        let form = refresh_token_form(&Secret::new("r t"), Some("svc"), &["a:b:pull".into()]);
        assert_eq!(
            form.expose(),
            "grant_type=refresh_token&client_id=gentoo-mkimg&refresh_token=r+t&service=svc&scope=a%3Ab%3Apull"
        );
    }
}
