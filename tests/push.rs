//! `gentoo-mkimg push` against the real distribution registry (Debian's `docker-registry`)
//! on 127.0.0.1, started here with its own config and storage: plain, htpasswd basic auth,
//! and token auth behind a token service of ours; a fault-injecting proxy in between for
//! counting requests and breaking them. Results are checked with skopeo and the registry's
//! API directly, not through the tool.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use gentoo_mkimg::image::StoredImage;
use gentoo_mkimg::image::layer::LayerCompression;
use gentoo_mkimg::image::oci::DescriptorExt;
use gentoo_mkimg::image::store::Store;
use gentoo_mkimg::import::{ImportOptions, import};
use gentoo_mkimg::progress::Verbosity;
use gentoo_mkimg::publish::registry::{self, PushOptions, PushReport, RetryPolicy};

use support::proxy::{Fault, Proxy};
use support::token::TokenServer;
use support::{Registry, RegistryAuth};

/// A temporary work area: a store, two stages (A and B have different layers), and an
/// empty home for the tool (no credentials unless a test writes some).
struct Work {
    tmp: tempfile::TempDir,
    store: Store,
    stage_a: PathBuf,
    stage_b: PathBuf,
}

impl Work {
    fn new(noise_a: usize) -> Work {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("images"));
        let stage_a = tmp.path().join("a.tar");
        let stage_b = tmp.path().join("b.tar");
        support::make_stage(&stage_a, 1, noise_a);
        support::make_stage(&stage_b, 2, 64 << 10);
        Work {
            tmp,
            store,
            stage_a,
            stage_b,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn import(&self, stage: &Path, reference: &str) -> StoredImage {
        import(
            &self.store,
            &ImportOptions {
                stage: stage.to_path_buf(),
                reference: reference.parse().unwrap(),
                compression: LayerCompression::Gzip,
                platform: None,
                source_date_epoch: Some(1_700_000_000),
                verbosity: Verbosity::Quiet,
                stage_digest: None,
            },
        )
        .unwrap_or_else(|e| panic!("import {reference}: {e:#}"))
    }

    /// The tool with `home` as its whole environment for credentials.
    fn tool(&self, home: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
        cmd.arg("--store")
            .arg(self.store.root())
            .env("HOME", home)
            .env("DOCKER_CONFIG", home.join(".docker"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("GENTOO_MKIMG_LOG")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        for v in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(v);
        }
        cmd
    }

    fn push(&self, home: &Path, args: &[&str]) -> Output {
        self.tool(home)
            .arg("push")
            .args(args)
            .output()
            .expect("run gentoo-mkimg push")
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn push_ok(work: &Work, home: &Path, args: &[&str]) -> Output {
    let out = work.push(home, args);
    assert!(
        out.status.success(),
        "push {args:?} failed:\n{}",
        text(&out)
    );
    out
}

/// (uploaded, mounted, skipped, bytes sent) from the tool's report line for `reference`.
fn counts(out: &Output, reference: &str) -> (usize, usize, usize, u64) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("pushed {reference}@")))
        .unwrap_or_else(|| panic!("no report for {reference}:\n{}", text(out)));
    let numbers: Vec<u64> = line
        .rsplit_once(": ")
        .unwrap()
        .1
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 4, "{line}");
    (
        numbers[0] as usize,
        numbers[1] as usize,
        numbers[2] as usize,
        numbers[3],
    )
}

/// `REF DIGEST` lines on stdout.
fn printed(out: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (r, d) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("odd line {l:?}"));
            (r.to_string(), d.to_string())
        })
        .collect()
}

fn assert_no_secret(out: &Output, secrets: &[&str]) {
    let all = text(out);
    for s in secrets {
        assert!(
            !s.is_empty() && !all.contains(s),
            "a secret shows in the output:\n{all}"
        );
    }
}

fn write_json(path: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, value.to_string()).unwrap();
}

/// Does the registry have `repo:tag`? Asked directly (anonymous registries only).
fn manifest_status(reg: &Registry, repo: &str, tag: &str) -> u16 {
    let accept = "application/vnd.oci.image.manifest.v1+json";
    support::http(
        reg.addr,
        "HEAD",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Accept", accept)],
    )
    .map(|r| r.0)
    .unwrap_or(0)
}

fn layer_of(image: &StoredImage) -> String {
    assert_eq!(image.layers.len(), 1);
    image.layers[0].digest().to_string()
}

fn digest_query(digest: &str) -> String {
    format!("digest={}", digest.replace(':', "%3A"))
}

#[test]
fn plain_registry_mounts_siblings_and_a_second_push_uploads_nothing() {
    let work = Work::new(512 << 10);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let proxy = Proxy::start(reg.addr); // counts requests, breaks nothing
    let host = proxy.addr.to_string();
    let home = work.path("home");
    let names: Vec<String> = ["x-raw", "x-dev", "x-rt"]
        .iter()
        .map(|n| format!("{host}/test/{n}:1"))
        .collect();
    let images: Vec<StoredImage> = names
        .iter()
        .map(|n| work.import(&work.stage_a, n))
        .collect();
    let layer = layer_of(&images[0]);
    assert!(
        images.iter().all(|i| layer_of(i) == layer),
        "raw, dev and rt share their layer"
    );

    let args: Vec<&str> = names.iter().map(String::as_str).collect();
    let out = push_ok(&work, &home, &args);
    let expected: Vec<(String, String)> = images
        .iter()
        .map(|i| (i.reference.clone(), i.manifest.digest().to_string()))
        .collect();
    assert_eq!(printed(&out), expected, "{}", text(&out));
    let layer_size = images[0].layers[0].size();
    let (up, mounted, skipped, bytes) = counts(&out, &names[0]);
    assert_eq!((up, mounted, skipped), (2, 0, 0), "{}", text(&out));
    assert!(bytes >= layer_size, "{}", text(&out));
    for name in &names[1..] {
        let (up, mounted, skipped, bytes) = counts(&out, name);
        assert_eq!((up, mounted, skipped), (1, 1, 0), "{name}: {}", text(&out));
        assert!(
            bytes < 4096,
            "{name}: only the config is sent: {}",
            text(&out)
        );
    }
    // What the registry was asked: the layer went up once, and was mounted twice.
    let seen = proxy.seen();
    let layer_puts = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.query.contains(&digest_query(&layer)))
        .count();
    assert_eq!(layer_puts, 1, "{seen:#?}");
    let mounts: Vec<_> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.query.contains("mount=") && s.status == 201)
        .collect();
    assert_eq!(mounts.len(), 2, "{seen:#?}");
    assert!(
        mounts.iter().all(|s| s
            .query
            .contains(&digest_query(&layer).replace("digest=", "mount="))
            && (s.query.contains("from=test%2Fx-raw") || s.query.contains("from=test%2Fx-dev"))),
        "{mounts:#?}"
    );

    // skopeo, straight to the registry, sees the store's digests.
    for image in &images {
        let direct = image.reference.replace(&host, &reg.host());
        assert_eq!(
            support::skopeo_digest(&direct, None, &home).as_deref(),
            Some(image.manifest.digest().as_ref()),
            "{direct}"
        );
    }

    // Again, in a new process: nothing to upload.
    proxy.clear_seen();
    let out = push_ok(&work, &home, &args);
    assert_eq!(printed(&out), expected);
    for name in &names {
        assert_eq!(counts(&out, name), (0, 0, 2, 0), "{name}: {}", text(&out));
    }
    let writes: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/") && s.method != "HEAD")
        .collect();
    assert!(
        writes.is_empty(),
        "blob requests on the second push: {writes:#?}"
    );

    // --all-tags pushes every tag of the repository; a new image with a new layer uploads it.
    let other = work.import(&work.stage_b, &format!("{host}/test/x-raw:2"));
    proxy.clear_seen();
    let out = push_ok(&work, &home, &["--all-tags", &format!("{host}/test/x-raw")]);
    let got: BTreeSet<String> = printed(&out).into_iter().map(|(r, _)| r).collect();
    assert_eq!(
        got,
        BTreeSet::from([names[0].clone(), other.reference.clone()]),
        "{}",
        text(&out)
    );
    assert_eq!(counts(&out, &names[0]).0, 0);
    assert_eq!(counts(&out, &other.reference).0, 2, "{}", text(&out));
    assert_eq!(
        support::skopeo_digest(&other.reference.replace(&host, &reg.host()), None, &home)
            .as_deref(),
        Some(other.manifest.digest().as_ref())
    );

    // A new repository in a new process: the shared layer is mounted from a repository the
    // store's index names on the same registry.
    let fresh = work.import(&work.stage_a, &format!("{host}/test/x-new:1"));
    let out = push_ok(&work, &home, &[&fresh.reference]);
    assert_eq!(counts(&out, &fresh.reference).1, 1, "{}", text(&out));
    assert_eq!(
        support::skopeo_digest(&fresh.reference.replace(&host, &reg.host()), None, &home)
            .as_deref(),
        Some(fresh.manifest.digest().as_ref())
    );
}

#[test]
fn basic_auth_uses_config_files_and_helpers_and_never_shows_the_password() {
    let work = Work::new(64 << 10);
    let user = "pusher";
    let password = "Sekr1t-pw-never-printed";
    let htpasswd = work.path("auth").join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .expect("run htpasswd (apt-get install apache2-utils)");
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = Registry::start(&work.path("registry"), RegistryAuth::Htpasswd(&htpasswd));
    let host = reg.host();
    let raw = work.import(&work.stage_a, &format!("{host}/test/b-raw:1"));
    let dev = work.import(&work.stage_a, &format!("{host}/test/b-dev:1"));
    let rt = work.import(&work.stage_a, &format!("{host}/test/b-rt:1"));
    let auth = BASE64.encode(format!("{user}:{password}"));
    let secrets = [password, auth.as_str()];

    // No credentials anywhere.
    let nobody = work.path("nobody");
    let out = work.push(&nobody, &["-vv", &raw.reference]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("authentication failed for {host}")),
        "{}",
        text(&out)
    );

    // A wrong password.
    let wrong = work.path("wrong");
    write_json(
        &wrong.join(".docker/config.json"),
        serde_json::json!({"auths": {host.clone(): {"auth": BASE64.encode(format!("{user}:nope"))}}}),
    );
    let out = work.push(&wrong, &["-vv", &raw.reference]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("authentication failed for {host}")),
        "{}",
        text(&out)
    );
    assert_no_secret(&out, &secrets);

    // Docker's config.json.
    let docker = work.path("docker");
    write_json(
        &docker.join(".docker/config.json"),
        serde_json::json!({"auths": {format!("https://{host}/v1/"): {"auth": auth}}}),
    );
    let out = push_ok(&work, &docker, &["-vv", &raw.reference]);
    assert_no_secret(&out, &secrets);
    assert_eq!(
        printed(&out),
        [(raw.reference.clone(), raw.manifest.digest().to_string())]
    );

    // Podman's auth.json under XDG_RUNTIME_DIR.
    let podman = work.path("podman");
    write_json(
        &podman.join("run/containers/auth.json"),
        serde_json::json!({"auths": {host.clone(): {"auth": auth}}}),
    );
    let out = push_ok(&work, &podman, &["-vv", &dev.reference]);
    assert_no_secret(&out, &secrets);
    assert_eq!(
        counts(&out, &dev.reference).1,
        1,
        "mounted from b-raw: {}",
        text(&out)
    );

    // A credential helper named by credHelpers.
    let helped = work.path("helped");
    let bin = work.path("helped/bin");
    let helper = bin.join("docker-credential-gmtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\nif [ \"$1\" = get ] && [ \"$server\" = '{host}' ]; then\n  \
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{password}\"}}' \"$server\"\n\
             else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_json(
        &helped.join(".docker/config.json"),
        serde_json::json!({"credHelpers": {host.clone(): "gmtest"}}),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = work
        .tool(&helped)
        .env("PATH", path)
        .args(["push", "-vv", &rt.reference])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_no_secret(&out, &secrets);

    let creds = format!("{user}:{password}");
    for image in [&raw, &dev, &rt] {
        assert_eq!(
            support::skopeo_digest(&image.reference, Some(&creds), &nobody).as_deref(),
            Some(image.manifest.digest().as_ref()),
            "{}",
            image.reference
        );
    }
}

#[test]
fn bearer_tokens_ask_for_the_needed_scopes_only() {
    let work = Work::new(64 << 10);
    let user = "token-user";
    let password = "T0ken-pass-never-printed";
    let tokens = TokenServer::start(&work.path("token"), &[(user, password)]);
    let realm = tokens.realm();
    let reg = Registry::start(
        &work.path("registry"),
        RegistryAuth::Token {
            realm: &realm,
            cert: &tokens.cert_pem,
        },
    );
    let host = reg.host();
    let names: Vec<String> = ["t-raw", "t-dev", "t-rt"]
        .iter()
        .map(|n| format!("{host}/test/{n}:1"))
        .collect();
    let images: Vec<StoredImage> = names
        .iter()
        .map(|n| work.import(&work.stage_a, n))
        .collect();
    let args: Vec<&str> = std::iter::once("-vv")
        .chain(names.iter().map(String::as_str))
        .collect();

    // Without credentials the token service refuses.
    let out = work.push(&work.path("nobody"), &args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("authentication failed for {host}")),
        "{}",
        text(&out)
    );
    assert!(tokens.requests().iter().all(|r| !r.granted));

    tokens.clear();
    let home = work.path("home");
    let auth = BASE64.encode(format!("{user}:{password}"));
    write_json(
        &home.join(".docker/config.json"),
        serde_json::json!({"auths": {host.clone(): {"auth": auth}}}),
    );
    let out = push_ok(&work, &home, &args);
    for (name, image) in names.iter().zip(&images) {
        assert!(
            printed(&out).contains(&(name.clone(), image.manifest.digest().to_string())),
            "{}",
            text(&out)
        );
    }
    assert_eq!(
        counts(&out, &names[1]).1,
        1,
        "dev's layer mounted: {}",
        text(&out)
    );
    assert_eq!(
        counts(&out, &names[2]).1,
        1,
        "rt's layer mounted: {}",
        text(&out)
    );

    // Each repository got one token: push on itself, pull on its siblings (mount sources:
    // the store's images on this registry, and what this process pushed).
    let requests = tokens.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.granted && r.service == support::token::SERVICE)
    );
    let asked: BTreeSet<BTreeSet<String>> = requests
        .iter()
        .map(|r| r.scopes.iter().cloned().collect())
        .collect();
    let scope = |repo: &str, actions: &str| format!("repository:test/{repo}:{actions}");
    let expected: BTreeSet<BTreeSet<String>> = [
        ("t-raw", ["t-dev", "t-rt"]),
        ("t-dev", ["t-raw", "t-rt"]),
        ("t-rt", ["t-raw", "t-dev"]),
    ]
    .iter()
    .map(|(target, sources)| {
        std::iter::once(scope(target, "pull,push"))
            .chain(sources.iter().map(|s| scope(s, "pull")))
            .collect()
    })
    .collect();
    assert_eq!(asked, expected, "{requests:#?}");
    assert_eq!(requests.len(), 3, "one token per repository: {requests:#?}");

    let issued = tokens.issued();
    assert!(!issued.is_empty());
    let mut secrets: Vec<&str> = issued.iter().map(String::as_str).collect();
    secrets.push(password);
    secrets.push(&auth);
    assert_no_secret(&out, &secrets);

    let creds = format!("{user}:{password}");
    for image in &images {
        assert_eq!(
            support::skopeo_digest(&image.reference, Some(&creds), &work.path("nobody")).as_deref(),
            Some(image.manifest.digest().as_ref())
        );
    }
}

/// Quick retries, so fault tests take seconds.
fn impatient() -> PushOptions {
    PushOptions {
        verbosity: Verbosity::Quiet,
        retry: RetryPolicy {
            tries: 4,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        },
        stall_timeout: Duration::from_secs(4),
        ..Default::default()
    }
}

fn check_pushed(
    reg: &Registry,
    home: &Path,
    report: &PushReport,
    image: &StoredImage,
    proxy: &Proxy,
) {
    assert_eq!(report.digest, image.manifest.blob().unwrap());
    let direct = image
        .reference
        .replace(&proxy.addr.to_string(), &reg.host());
    assert_eq!(
        support::skopeo_digest(&direct, None, home).as_deref(),
        Some(image.manifest.digest().as_ref()),
        "{direct}"
    );
}

#[test]
fn push_survives_errors_drops_and_stalls() {
    let work = Work::new(3 << 20);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let proxy = Proxy::start(reg.addr);
    let host = proxy.addr.to_string();
    let image = work.import(&work.stage_a, &format!("{host}/test/f-raw:1"));
    let layer = layer_of(&image);
    assert!(
        image.layers[0].size() > 2 << 20,
        "the layer is big enough to cut in half"
    );

    // 503 with Retry-After to the first two upload starts, the first upload of the layer
    // cut half-way, slow blob checks, and a manifest answer that stalls past the timeout.
    proxy.rule(
        "POST",
        "/blobs/uploads/",
        Fault::Status {
            code: 503,
            retry_after: Some(1),
        },
        Some(2),
    );
    proxy.rule_q(
        "PUT",
        "/blobs/uploads/",
        &digest_query(&layer),
        Fault::DropMidBody,
        Some(1),
    );
    proxy.rule(
        "HEAD",
        "/blobs/",
        Fault::Delay(Duration::from_millis(200)),
        Some(3),
    );
    proxy.rule(
        "PUT",
        "/manifests/",
        Fault::Delay(Duration::from_secs(10)),
        Some(1),
    );
    let started = Instant::now();
    let report = registry::push(&work.store, &image.reference, &impatient())
        .unwrap_or_else(|e| panic!("push failed: {e:#}\n{:#?}", proxy.seen()));
    let took = started.elapsed();
    check_pushed(&reg, &work.path("home"), &report, &image, &proxy);

    let seen = proxy.seen();
    let faults = |kind: &str| {
        seen.iter()
            .filter(|s| s.fault.as_deref().is_some_and(|f| f.starts_with(kind)))
            .count()
    };
    assert_eq!(faults("Status"), 2, "{seen:#?}");
    assert_eq!(faults("DropMidBody"), 1, "{seen:#?}");
    assert_eq!(faults("Delay"), 4, "{seen:#?}");
    let layer_puts: Vec<u16> = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.query.contains(&digest_query(&layer)))
        .map(|s| s.status)
        .collect();
    assert_eq!(layer_puts, [0, 201], "cut, then uploaded again: {seen:#?}");
    let manifest_puts = seen
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/manifests/"))
        .count();
    assert!(
        manifest_puts >= 2,
        "the stalled manifest put was tried again: {seen:#?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After: 1 was honoured ({took:?})"
    );
    assert_eq!(report.uploaded, 2);
    assert!(report.bytes_sent > image.layers[0].size(), "{report:?}");
}

#[test]
fn chunked_upload_resumes_where_the_registry_stands() {
    let work = Work::new(3 << 20);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let proxy = Proxy::start(reg.addr);
    let host = proxy.addr.to_string();
    let image = work.import(&work.stage_a, &format!("{host}/test/c-raw:1"));
    let size = image.layers[0].size();
    let chunk = 512u64 << 10;
    let chunks = size.div_ceil(chunk) as usize;
    assert!(chunks >= 4);
    // The second chunk is refused before it reaches the registry: the upload goes on from
    // the offset the registry reports, not from the start.
    proxy.rule_nth(
        "PATCH",
        "/blobs/uploads/",
        "",
        1,
        Fault::Status {
            code: 502,
            retry_after: None,
        },
        Some(1),
    );
    let opts = PushOptions {
        chunk_threshold: 1 << 20,
        chunk_size: chunk,
        ..impatient()
    };
    let report = registry::push(&work.store, &image.reference, &opts)
        .unwrap_or_else(|e| panic!("push failed: {e:#}\n{:#?}", proxy.seen()));
    check_pushed(&reg, &work.path("home"), &report, &image, &proxy);
    let seen = proxy.seen();
    let patches = seen.iter().filter(|s| s.method == "PATCH").count();
    let starts = seen.iter().filter(|s| s.method == "POST").count();
    let status_checks = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("/blobs/uploads/"))
        .count();
    assert_eq!(patches, chunks + 1, "one chunk sent twice: {seen:#?}");
    assert_eq!(
        starts, 2,
        "no restart (one upload for the layer, one for the config): {seen:#?}"
    );
    assert_eq!(status_checks, 1, "{seen:#?}");
    assert_eq!(
        report.bytes_sent,
        size + chunk + image.config.size(),
        "{report:?}"
    );
}

#[test]
fn a_registry_that_keeps_failing_gets_a_bounded_number_of_tries_and_no_tag() {
    let work = Work::new(64 << 10);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let proxy = Proxy::start(reg.addr);
    let host = proxy.addr.to_string();
    let image = work.import(&work.stage_a, &format!("{host}/test/dead:1"));
    for method in ["POST", "PUT", "PATCH"] {
        proxy.rule(
            method,
            "/v2/",
            Fault::Status {
                code: 500,
                retry_after: None,
            },
            None,
        );
    }
    let opts = impatient();
    let started = Instant::now();
    let err = registry::push(&work.store, &image.reference, &opts).expect_err("push must fail");
    let took = started.elapsed();
    let msg = format!("{err:#}");
    assert!(msg.contains("gave up after 4 tries"), "{msg}");
    assert!(msg.contains("500"), "{msg}");
    assert!(msg.contains(&image.reference), "{msg}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let seen = proxy.seen();
    let posts = seen.iter().filter(|s| s.method == "POST").count();
    assert_eq!(
        posts,
        2 * 4,
        "each of the two blobs tried 4 times: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|s| s.path.contains("/manifests/")),
        "no manifest was put: {seen:#?}"
    );
    assert_eq!(
        manifest_status(&reg, "test/dead", "1"),
        404,
        "the tag does not exist"
    );

    // The same through the command, with its default bound: a clear one-line error.
    let opts_default = PushOptions::default();
    assert_eq!(opts_default.retry.tries, 5);
    proxy.clear_seen();
    let out = work.push(&work.path("home"), &["-q", &image.reference]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gave up after 5 tries") && stderr.contains("HTTP 500"),
        "{}",
        text(&out)
    );
    assert_eq!(manifest_status(&reg, "test/dead", "1"), 404);
}

#[test]
fn tls_is_verified_unless_the_host_is_insecure() {
    let work = Work::new(64 << 10);
    let (ca, cert, key) = support::make_tls_certs(&work.path("tls"));
    let reg = Registry::start_tls(
        &work.path("registry"),
        RegistryAuth::None,
        Some((&cert, &key)),
    );
    let host = reg.host();
    let image = work.import(&work.stage_a, &format!("{host}/test/tls:1"));
    // Verified TLS (loopback treated like any host): the test CA is unknown, so no push,
    // at once (no retries), and no fallback to plain HTTP.
    let strict = PushOptions {
        loopback_insecure: false,
        ..impatient()
    };
    let started = Instant::now();
    let err =
        registry::push(&work.store, &image.reference, &strict).expect_err("untrusted certificate");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("certificate") && !msg.contains("gave up"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = reg.log();
    assert!(
        !log.contains("/v2/test/tls/"),
        "nothing reached the registry's API:\n{log}"
    );

    // Trusting the CA: verified, pushed.
    let trusting = PushOptions {
        ca_files: vec![ca],
        ..strict
    };
    let report = registry::push(&work.store, &image.reference, &trusting)
        .unwrap_or_else(|e| panic!("push with the CA trusted: {e:#}"));
    assert_eq!(report.digest, image.manifest.blob().unwrap());
    assert_eq!(
        support::skopeo_digest(&image.reference, None, &work.path("home")).as_deref(),
        Some(image.manifest.digest().as_ref())
    );
    // Loopback hosts are insecure by default: unverified TLS works (nothing left to send).
    let report = registry::push(&work.store, &image.reference, &impatient()).unwrap();
    assert_eq!((report.uploaded, report.skipped), (0, 2));
}

/// `skopeo inspect` of `reference` (with `--raw`: the manifest's bytes; `arch`: the image
/// for that architecture; `extra` options, e.g. `--config`); None if skopeo fails.
fn skopeo_inspect(
    reference: &str,
    home: &Path,
    raw: bool,
    arch: Option<&str>,
    extra: &[&str],
) -> Option<Vec<u8>> {
    let mut cmd = Command::new("skopeo");
    if let Some(arch) = arch {
        cmd.arg("--override-arch").arg(arch);
    }
    cmd.arg("inspect").arg("--tls-verify=false");
    if raw {
        cmd.arg("--raw");
    }
    let out = cmd
        .args(extra)
        .arg(format!("docker://{reference}"))
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home)
        .output()
        .expect("run skopeo");
    out.status.success().then_some(out.stdout)
}

#[test]
fn index_joins_images_pushed_separately_one_manifest_per_platform() {
    let work = Work::new(64 << 10);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let host = reg.host();
    let home = work.path("home");
    // As two build machines would: each pushes its platform's image under its own name (the
    // arm64 one in another repository, which index must mount from).
    let amd = format!("{host}/gentoo/multi:1-amd64");
    let arm = format!("{host}/gentoo/multi-arm64:1");
    let amd_image = work.import(&work.stage_a, &amd);
    let arm_image = import(
        &work.store,
        &ImportOptions {
            stage: work.stage_b.clone(),
            reference: arm.parse().unwrap(),
            compression: LayerCompression::Gzip,
            platform: Some("linux/arm64".parse().unwrap()),
            source_date_epoch: Some(1_700_000_000),
            verbosity: Verbosity::Quiet,
            stage_digest: None,
        },
    )
    .unwrap();
    push_ok(&work, &home, &[&amd, &arm]);

    let target = format!("{host}/gentoo/multi:1");
    let out = work
        .tool(&home)
        .args(["index", &target, &amd, &arm])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let raw_bytes = skopeo_inspect(&target, &home, true, None, &[]).expect("the index is served");
    let raw: serde_json::Value = serde_json::from_slice(&raw_bytes).unwrap();
    assert_eq!(
        raw["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{raw:#}"
    );
    let entries: Vec<(String, String)> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap(),
                    m["platform"]["architecture"].as_str().unwrap()
                ),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let amd_digest = amd_image.manifest.digest().to_string();
    let arm_digest = arm_image.manifest.digest().to_string();
    assert_eq!(
        entries,
        vec![
            ("linux/amd64".to_string(), amd_digest.clone()),
            ("linux/arm64".to_string(), arm_digest.clone())
        ],
        "{raw:#}"
    );
    let printed = printed(&out);
    assert_eq!(printed.len(), 1, "{}", text(&out));
    assert_eq!(printed[0].0, target);
    assert_eq!(
        gentoo_mkimg::image::store::Digest::of(&raw_bytes).to_string(),
        printed[0].1,
        "the printed digest is the index's"
    );
    // Each platform resolves to its own image's config, in the target's repository.
    for (arch, image) in [("amd64", &amd_image), ("arm64", &arm_image)] {
        let config = skopeo_inspect(&target, &home, true, Some(arch), &["--config"])
            .expect("skopeo inspect --config");
        assert_eq!(
            gentoo_mkimg::image::store::Digest::of(&config).to_string(),
            image.config.digest().to_string(),
            "{arch}"
        );
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], arch, "{config:#}");
    }

    // Two images of one platform: an error naming both, and no tag.
    let again = format!("{host}/gentoo/multi:2");
    let out = work
        .tool(&home)
        .args(["index", &again, &amd, &target])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&amd) && err.contains(&target) && err.contains("linux/amd64"),
        "{err}"
    );
    assert!(
        skopeo_inspect(&again, &home, true, None, &[]).is_none(),
        "{again} was tagged"
    );
}

/// The store's index.json entries: reference -> (media type, digest).
fn store_entries(store: &Store) -> std::collections::BTreeMap<String, (String, String)> {
    store
        .read_index()
        .unwrap()
        .manifests()
        .iter()
        .filter_map(|d| {
            let name = d.ref_name()?.to_string();
            Some((name, (d.kind().to_string(), d.digest().to_string())))
        })
        .collect()
}

/// (OS/ARCH[/VARIANT], digest) of each entry of an image index's JSON.
fn index_platforms(index: &serde_json::Value) -> Vec<(String, String)> {
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not an index: {index:#}"))
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut name = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                name = format!("{name}/{v}");
            }
            (name, m["digest"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Stages of two platforms under one name (#14): `import STAGE... REF --platform ...` stores
/// each platform's image as REF-ARCH and an OCI image index tagged REF, which skopeo reads and
/// copies whole from the store; `images` and `inspect` show its platforms and `inspect`
/// picks one; `push` sends it whole, and from the registry each platform resolves to its own
/// config. A stage of another platform than named is refused, and nothing is left tagged.
#[test]
fn stages_of_two_platforms_make_an_index_that_skopeo_copies_and_push_sends_whole() {
    let work = Work::new(64 << 10);
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let host = reg.host();
    let home = work.path("home");
    let arm_stage = work.path("stages").join("arm64.tar");
    support::tiny_arm64_stage(&arm_stage);
    let name = format!("{host}/gentoo/multi-raw:1");

    let out = work
        .tool(&home)
        .args(["import", "--platform", "linux/amd64,linux/arm64"])
        .arg(&work.stage_a)
        .arg(&arm_stage)
        .arg(&name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let entries = store_entries(&work.store);
    let amd = &entries[&format!("{name}-amd64")];
    let arm = &entries[&format!("{name}-arm64")];
    let index = &entries[&name];
    assert_eq!(index.0, "application/vnd.oci.image.index.v1+json");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("{name}-amd64 {} linux/amd64", amd.1),
            format!("{name}-arm64 {} linux/arm64/v8", arm.1),
            format!("{name} {}", index.1),
        ],
        "{}",
        text(&out)
    );

    // skopeo reads the index from the store, and copies it with both images.
    let oci = format!("oci:{}:{name}", work.store.root().display());
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", &oci])
        .output()
        .unwrap();
    assert!(raw.status.success(), "{}", text(&raw));
    let raw: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        index_platforms(&raw),
        [
            ("linux/amd64".to_string(), amd.1.clone()),
            ("linux/arm64/v8".to_string(), arm.1.clone())
        ]
    );
    let copy = work.path("copy");
    let out = Command::new("skopeo")
        .args(["copy", "--all", "--quiet", &oci])
        .arg(format!("oci:{}:copied", copy.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let copied = Store::new(&copy);
    let copied_index = copied.resolve("copied").unwrap();
    assert_eq!(
        copied_index.digest().to_string(),
        index.1,
        "copied as it is"
    );
    for digest in [&amd.1, &arm.1] {
        let hex = digest.strip_prefix("sha256:").unwrap();
        assert!(copy.join("blobs/sha256").join(hex).is_file(), "{digest}");
    }

    // images lists the platforms; inspect picks the host's, or the one asked for.
    let out = work.tool(&home).arg("images").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.ends_with("  linux/amd64,linux/arm64/v8"), "{row}");
    let inspect_in = |remote: bool, platform: Option<&str>| -> serde_json::Value {
        let mut cmd = work.tool(&home);
        cmd.args(["inspect", "--json", &name]);
        if remote {
            cmd.arg("--remote");
        }
        if let Some(p) = platform {
            cmd.args(["--platform", p]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let inspect = |platform: Option<&str>| inspect_in(false, platform);
    let host_entry = inspect(None);
    assert_eq!(host_entry["digest"], amd.1.as_str(), "{host_entry:#}");
    assert_eq!(host_entry["index"]["digest"], index.1.as_str());
    assert_eq!(
        host_entry["index"]["platforms"][1]["architecture"], "arm64",
        "{host_entry:#}"
    );
    let arm_entry = inspect(Some("linux/arm64"));
    assert_eq!(arm_entry["digest"], arm.1.as_str(), "{arm_entry:#}");
    assert_eq!(arm_entry["platform"]["architecture"], "arm64");

    // push sends the index whole: both images, then the index under the tag.
    let out = push_ok(&work, &home, &[&name]);
    assert_eq!(printed(&out), [(name.clone(), index.1.clone())]);
    let served = skopeo_inspect(&name, &home, true, None, &[]).expect("the index is served");
    assert_eq!(
        gentoo_mkimg::image::store::Digest::of(&served).to_string(),
        index.1,
        "the registry serves the store's bytes"
    );
    // inspect --remote reads the index from the registry as inspect reads the store's
    for platform in [None, Some("linux/arm64")] {
        let local = inspect_in(false, platform);
        let remote = inspect_in(true, platform);
        assert_eq!(remote["source"], "registry");
        for field in ["digest", "platform", "index", "layers", "packages"] {
            assert_eq!(
                remote[field], local[field],
                "{field} of {platform:?}: {remote:#}"
            );
        }
    }
    for (arch, digest) in [("amd64", &amd.1), ("arm64", &arm.1)] {
        let manifest = work
            .store
            .read_manifest(&work.store.resolve(&format!("{name}-{arch}")).unwrap())
            .unwrap();
        let config = skopeo_inspect(&name, &home, true, Some(arch), &["--config"])
            .unwrap_or_else(|| panic!("no {arch} config"));
        assert_eq!(
            gentoo_mkimg::image::store::Digest::of(&config).to_string(),
            manifest.config().digest().to_string(),
            "{arch} ({digest})"
        );
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], arch, "{config:#}");
    }

    // A stage of another platform than named: refused, naming it, and nothing left tagged.
    let before = store_entries(&work.store);
    let wrong = format!("{host}/gentoo/multi-raw:2");
    let refused = |platforms: &str| -> String {
        let out = work
            .tool(&home)
            .args(["import", "--platform", platforms])
            .arg(&work.stage_b)
            .arg(&arm_stage)
            .arg(&wrong)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("linux/amd64,linux/amd64");
    assert!(
        err.contains("platform linux/amd64 is listed twice"),
        "{err}"
    );
    let err = refused("linux/amd64,linux/riscv64");
    assert!(
        err.contains(&format!(
            "stage3 {} is linux/arm64/v8, not linux/riscv64",
            arm_stage.display()
        )),
        "{err}"
    );
    assert_eq!(
        store_entries(&work.store),
        before,
        "the amd64 image was untagged again"
    );
}
