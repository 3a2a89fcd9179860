//! `inputs::fetch` through the library, against the test mirror on 127.0.0.1: caching,
//! resuming (in the same call and in the next one), verification, expected sizes,
//! conditional requests for small files, missing files, faulty servers.

mod support;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use gentoo_mkimg::inputs::fetch::{FetchError, FetchOptions, Fetched, Fetcher};
use gentoo_mkimg::net::RetryPolicy;
use gentoo_mkimg::progress::Verbosity;

use support::mirror::{Mirror, Request, http_date, parse_http_date};
use support::noise;

/// A served directory, a cache, and the mirror.
struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cache: PathBuf,
    mirror: Mirror,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mirror");
        let cache = dir.path().join("cache");
        std::fs::create_dir_all(root.join("releases")).unwrap();
        let mirror = Mirror::start(&root);
        Env {
            _dir: dir,
            root,
            cache,
            mirror,
        }
    }

    /// Put `data` on the mirror at `path` (e.g. "/releases/x"); its URL.
    fn put(&self, path: &str, data: &[u8]) -> String {
        std::fs::write(self.root.join(path.trim_start_matches('/')), data).unwrap();
        format!("{}{path}", self.mirror.url())
    }

    fn fetcher(&self, tries: u32) -> Fetcher {
        self.fetcher_with(FetchOptions {
            retry: RetryPolicy {
                tries,
                ..quick().retry
            },
            ..quick()
        })
    }

    fn fetcher_with(&self, opts: FetchOptions) -> Fetcher {
        Fetcher::with_options(&self.cache, opts).unwrap()
    }

    fn dest(&self, name: &str) -> PathBuf {
        self.cache.join(name)
    }

    fn part(&self, name: &str) -> PathBuf {
        self.cache.join(format!("{name}.part"))
    }
}

/// Options with short delays and timeouts for tests.
fn quick() -> FetchOptions {
    FetchOptions {
        verbosity: Verbosity::Quiet,
        retry: RetryPolicy {
            tries: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        idle_timeout: Duration::from_secs(10),
        ..FetchOptions::default()
    }
}

fn ok(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// (status, range) of each GET.
fn gets(log: &[Request]) -> Vec<(u16, Option<String>)> {
    log.iter()
        .filter(|r| r.method == "GET")
        .map(|r| (r.status, r.range.clone()))
        .collect()
}

const ART: &str = "/releases/stage3.tar.xz";
const ART_NAME: &str = "stage3.tar.xz";

#[test]
fn first_fetch_downloads_then_the_cached_file_needs_no_request() {
    let env = Env::new();
    let data = noise(1, 300_000);
    let url = env.put(ART, &data);
    let verified = Cell::new(0);
    let got = env
        .fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), Some(data.len() as u64), |p| {
            verified.set(verified.get() + 1);
            assert_eq!(p, env.part(ART_NAME), "verify sees the .part");
            assert_eq!(std::fs::read(p)?, data);
            Ok(())
        })
        .unwrap();
    assert_eq!(
        got,
        Fetched {
            path: env.dest(ART_NAME),
            downloaded: data.len() as u64,
            resumed_from: None
        }
    );
    assert_eq!(verified.get(), 1);
    assert_eq!(std::fs::read(env.dest(ART_NAME)).unwrap(), data);
    assert!(!env.part(ART_NAME).exists());
    let log = env.mirror.requests();
    assert_eq!(gets(&log), vec![(200, None)], "{log:?}");
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].body_bytes, data.len() as u64);
    let ua = log[0].user_agent.clone().unwrap_or_default();
    assert!(ua.starts_with("gentoo-mkimg/"), "User-Agent {ua:?}");

    // The next run: the file is there, verified before.
    env.mirror.clear_log();
    let again = env
        .fetcher(3)
        .fetch_verified(&url, &env.dest(ART_NAME), Some(data.len() as u64), |_| {
            Err(anyhow!("verify must not run for a cached file"))
        })
        .unwrap();
    assert_eq!(again.path, env.dest(ART_NAME));
    assert_eq!(again.downloaded, 0);
    assert_eq!(env.mirror.requests(), vec![]);
}

#[test]
fn a_cut_transfer_resumes_with_a_range_request_in_the_same_call() {
    let env = Env::new();
    let data = noise(2, 1_000_000);
    let url = env.put(ART, &data);
    env.mirror.cut_after(ART, 400_000);
    let got = env
        .fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), Some(data.len() as u64), ok)
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.resumed_from, Some(400_000));
    assert_eq!(got.downloaded, data.len() as u64);
    let log = env.mirror.requests();
    assert_eq!(
        gets(&log),
        vec![(200, None), (206, Some("bytes=400000-".to_string()))],
        "{log:?}"
    );
    assert_eq!(log[0].body_bytes, 400_000);
    assert_eq!(log[1].body_bytes, 600_000);
}

#[test]
fn without_retries_a_cut_transfer_leaves_the_part_and_the_next_call_resumes() {
    let env = Env::new();
    let data = noise(3, 1_000_000);
    let url = env.put(ART, &data);
    env.mirror.cut_after(ART, 400_000);
    let verified = Cell::new(false);
    let err = env
        .fetcher(1)
        .fetch_verified(&url, Path::new(ART_NAME), Some(data.len() as u64), |_| {
            verified.set(true);
            Ok(())
        })
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&url), "{text}");
    assert!(
        text.contains(&env.part(ART_NAME).display().to_string()),
        "{text}"
    );
    assert!(!verified.get());
    assert!(!env.dest(ART_NAME).exists());
    assert_eq!(std::fs::read(env.part(ART_NAME)).unwrap(), &data[..400_000]);
    assert_eq!(gets(&env.mirror.requests()), vec![(200, None)]);

    env.mirror.clear_log();
    let got = env
        .fetcher(1)
        .fetch_verified(&url, Path::new(ART_NAME), Some(data.len() as u64), ok)
        .unwrap();
    assert_eq!(got.resumed_from, Some(400_000));
    assert_eq!(got.downloaded, 600_000);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert!(!env.part(ART_NAME).exists());
    assert_eq!(
        gets(&env.mirror.requests()),
        vec![(206, Some("bytes=400000-".to_string()))]
    );
}

/// A `.part` of an older version of the file (a moving name like gentoo-latest) is not
/// spliced onto the new one: the resume asks `If-Range` and gets the new file whole.
#[test]
fn a_part_of_a_file_that_changed_since_is_not_resumed() {
    let env = Env::new();
    let old = noise(5, 1_000_000);
    let url = env.put(ART, &old);
    env.mirror.cut_after(ART, 400_000);
    let size = Some(old.len() as u64);
    env.fetcher(1)
        .fetch_verified(&url, Path::new(ART_NAME), size, ok)
        .unwrap_err();
    assert_eq!(std::fs::read(env.part(ART_NAME)).unwrap(), &old[..400_000]);

    std::thread::sleep(std::time::Duration::from_millis(20)); // a new mtime, a new ETag
    let new = noise(6, 1_000_000);
    env.put(ART, &new);
    env.mirror.clear_log();
    let got = env
        .fetcher(1)
        .fetch_verified(&url, Path::new(ART_NAME), size, ok)
        .unwrap();
    assert!(
        std::fs::read(&got.path).unwrap() == new,
        "old and new bytes spliced"
    );
    assert_eq!(got.resumed_from, None);
    let log = env.mirror.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].if_range.is_some(), "no If-Range sent: {log:?}");
    assert_eq!(log[0].status, 200);
}

#[test]
fn a_failed_verification_keeps_nothing_and_is_returned() {
    let env = Env::new();
    let data = noise(4, 200_000);
    let url = env.put(ART, &data);
    let err = env
        .fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), None, |_| {
            Err(anyhow!("BAD SIGNATURE"))
        })
        .unwrap_err();
    // The verifier's message (which names the file and the check) is the whole error.
    assert_eq!(format!("{err:#}"), "BAD SIGNATURE");
    assert!(!env.dest(ART_NAME).exists());
    assert!(!env.part(ART_NAME).exists());

    // Nothing is resumed: the next call downloads from the start.
    env.mirror.clear_log();
    env.fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), None, ok)
        .unwrap();
    assert_eq!(gets(&env.mirror.requests()), vec![(200, None)]);
    assert_eq!(std::fs::read(env.dest(ART_NAME)).unwrap(), data);
}

#[test]
fn an_unexpected_size_keeps_nothing() {
    let env = Env::new();
    let data = noise(5, 100_000);
    let url = env.put(ART, &data);
    for expected in [data.len() as u64 + 1, data.len() as u64 - 1] {
        let verified = Cell::new(false);
        let err = env
            .fetcher(3)
            .fetch_verified(&url, Path::new(ART_NAME), Some(expected), |_| {
                verified.set(true);
                Ok(())
            })
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(&expected.to_string()), "{text}");
        assert!(text.contains(&url), "{text}");
        assert!(!verified.get());
        assert!(!env.dest(ART_NAME).exists());
        assert!(!env.part(ART_NAME).exists());
    }
    // Not retried: a size mismatch does not go away.
    assert_eq!(gets(&env.mirror.requests()).len(), 2);
}

#[test]
fn a_server_ignoring_the_range_makes_the_download_start_over() {
    // .parts that do not even match the file, shorter and longer than it: thrown away, not
    // appended to nor overwritten in place.
    for part_len in [100_000usize, 700_000] {
        let env = Env::new();
        let data = noise(6, 500_000);
        let url = env.put(ART, &data);
        std::fs::create_dir_all(&env.cache).unwrap();
        std::fs::write(env.part(ART_NAME), vec![0xAA; part_len]).unwrap();
        env.mirror.set_ignore_range(true);
        let got = env
            .fetcher(3)
            .fetch_verified(&url, Path::new(ART_NAME), None, ok)
            .unwrap();
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        assert_eq!(got.resumed_from, None);
        assert_eq!(got.downloaded, data.len() as u64);
        assert_eq!(
            gets(&env.mirror.requests()),
            vec![(200, Some(format!("bytes={part_len}-")))]
        );
    }
}

#[test]
fn a_cut_transfer_from_a_server_ignoring_ranges_still_ends_right() {
    let env = Env::new();
    let data = noise(7, 600_000);
    let url = env.put(ART, &data);
    env.mirror.set_ignore_range(true);
    env.mirror.cut_after(ART, 250_000);
    let got = env
        .fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), None, ok)
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.resumed_from, None);
    assert_eq!(
        gets(&env.mirror.requests()),
        vec![(200, None), (200, Some("bytes=250000-".to_string()))]
    );
}

#[test]
fn a_complete_part_answered_416_is_verified_without_downloading() {
    for expected in [true, false] {
        let env = Env::new();
        let data = noise(8, 50_000);
        let url = env.put(ART, &data);
        std::fs::create_dir_all(&env.cache).unwrap();
        std::fs::write(env.part(ART_NAME), &data).unwrap();
        let verified = Cell::new(false);
        let got = env
            .fetcher(3)
            .fetch_verified(
                &url,
                Path::new(ART_NAME),
                expected.then_some(data.len() as u64),
                |p| {
                    verified.set(std::fs::read(p)? == data);
                    Ok(())
                },
            )
            .unwrap();
        assert!(verified.get());
        assert_eq!(got.downloaded, 0);
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        assert_eq!(
            gets(&env.mirror.requests()),
            vec![(416, Some("bytes=50000-".to_string()))]
        );
    }
}

#[test]
fn a_part_longer_than_the_file_starts_over() {
    let env = Env::new();
    let data = noise(9, 50_000);
    let url = env.put(ART, &data);
    std::fs::create_dir_all(&env.cache).unwrap();
    std::fs::write(env.part(ART_NAME), vec![1u8; 70_000]).unwrap();
    let got = env
        .fetcher(1)
        .fetch_verified(&url, Path::new(ART_NAME), None, ok)
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(
        gets(&env.mirror.requests()),
        vec![(416, Some("bytes=70000-".to_string())), (200, None)]
    );
}

#[test]
fn server_errors_are_retried_then_given_up() {
    let env = Env::new();
    let data = noise(10, 10_000);
    let url = env.put(ART, &data);
    env.mirror.fail_next(ART, 503);
    env.mirror.fail_next(ART, 500);
    let got = env
        .fetcher(3)
        .fetch_verified(&url, Path::new(ART_NAME), None, ok)
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(
        gets(&env.mirror.requests()),
        vec![(503, None), (500, None), (200, None)]
    );

    env.mirror.clear_log();
    std::fs::remove_file(&got.path).unwrap();
    env.mirror.fail_next(ART, 502);
    env.mirror.fail_next(ART, 502);
    let err = env
        .fetcher(2)
        .fetch_verified(&url, Path::new(ART_NAME), None, ok)
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("502"), "{text}");
    assert!(text.contains("2 tries"), "{text}");
    assert_eq!(gets(&env.mirror.requests()), vec![(502, None), (502, None)]);
    assert!(!env.dest(ART_NAME).exists());
}

#[test]
fn a_stalled_transfer_times_out_and_resumes() {
    let env = Env::new();
    let data = noise(11, 400_000);
    let url = env.put(ART, &data);
    env.mirror.stall_after(ART, 150_000, Duration::from_secs(5));
    let f = env.fetcher_with(FetchOptions {
        retry: RetryPolicy {
            tries: 2,
            ..quick().retry
        },
        idle_timeout: Duration::from_millis(1500),
        ..quick()
    });
    let got = f
        .fetch_verified(&url, Path::new(ART_NAME), Some(data.len() as u64), ok)
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(got.resumed_from, Some(150_000));
    let g = gets(&env.mirror.requests());
    assert_eq!(g.len(), 2, "{g:?}");
    assert_eq!(g[1], (206, Some("bytes=150000-".to_string())));
}

#[test]
fn a_missing_file_is_not_found_and_not_retried() {
    let env = Env::new();
    let url = format!("{}/releases/nope.tar.xz", env.mirror.url());
    let err = env
        .fetcher(3)
        .fetch_verified(&url, Path::new("nope.tar.xz"), None, ok)
        .unwrap_err();
    match err.downcast_ref::<FetchError>() {
        Some(FetchError::NotFound { url: u }) => assert_eq!(u, &url),
        other => panic!("not NotFound: {other:?} ({err:#})"),
    }
    assert!(!env.dest("nope.tar.xz").exists());
    assert!(!env.part("nope.tar.xz").exists(), "an empty .part is left");
    assert_eq!(gets(&env.mirror.requests()), vec![(404, None)]);

    let err = env
        .fetcher(3)
        .fetch_small(&format!("{url}.asc"), Path::new("nope.tar.xz.asc"), true)
        .unwrap_err();
    match err.downcast_ref::<FetchError>() {
        Some(FetchError::NotFound { url: u }) => assert_eq!(u, &format!("{url}.asc")),
        other => panic!("not NotFound: {other:?} ({err:#})"),
    }
    assert!(err.to_string().contains(&format!("{url}.asc")), "{err}");
    assert!(!env.dest("nope.tar.xz.asc").exists());
}

#[test]
fn a_small_file_is_revalidated_with_a_conditional_request() {
    let env = Env::new();
    let path = "/releases/latest-stage3.txt";
    let url = env.put(path, b"first version\n");
    let f = env.fetcher(3);
    let name = Path::new("latest-stage3.txt");
    assert_eq!(f.fetch_small(&url, name, true).unwrap(), b"first version\n");
    let log = env.mirror.requests();
    assert_eq!(gets(&log), vec![(200, None)]);
    assert_eq!(log[0].if_none_match, None);

    env.mirror.clear_log();
    assert_eq!(f.fetch_small(&url, name, true).unwrap(), b"first version\n");
    let log = env.mirror.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].status, 304);
    assert_eq!(log[0].body_bytes, 0);
    assert!(log[0].if_none_match.is_some(), "{log:?}");
    assert!(log[0].if_modified_since.is_some(), "{log:?}");

    // Changed on the mirror (another size: another ETag even within the same second).
    env.mirror.clear_log();
    env.put(path, b"second, longer version\n");
    assert_eq!(
        f.fetch_small(&url, name, true).unwrap(),
        b"second, longer version\n"
    );
    let log = env.mirror.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].status, 200);
    assert!(log[0].if_none_match.is_some());
    assert_eq!(
        std::fs::read(env.dest("latest-stage3.txt")).unwrap(),
        b"second, longer version\n"
    );

    // And a fresh fetcher (the next run) revalidates from the sidecar.
    env.mirror.clear_log();
    assert_eq!(
        env.fetcher(3).fetch_small(&url, name, true).unwrap(),
        b"second, longer version\n"
    );
    assert_eq!(gets(&env.mirror.requests()), vec![(304, None)]);
}

#[test]
fn a_cached_small_file_without_refresh_needs_no_request() {
    let env = Env::new();
    let url = env.put("/releases/x.asc", b"signature");
    let f = env.fetcher(3);
    // Not cached yet: fetched even without refresh.
    assert_eq!(
        f.fetch_small(&url, Path::new("x.asc"), false).unwrap(),
        b"signature"
    );
    assert_eq!(gets(&env.mirror.requests()), vec![(200, None)]);
    env.mirror.clear_log();
    env.put("/releases/x.asc", b"changed");
    assert_eq!(
        f.fetch_small(&url, Path::new("x.asc"), false).unwrap(),
        b"signature"
    );
    assert_eq!(env.mirror.requests(), vec![]);
}

#[test]
fn small_files_are_retried_and_size_limited() {
    let env = Env::new();
    let url = env.put("/releases/DIGESTS", &noise(12, 3000));
    env.mirror.fail_next("/releases/DIGESTS", 503);
    let f = env.fetcher(3);
    assert_eq!(
        f.fetch_small(&url, Path::new("DIGESTS"), true).unwrap(),
        noise(12, 3000)
    );
    assert_eq!(gets(&env.mirror.requests()), vec![(503, None), (200, None)]);

    let small = env.fetcher_with(FetchOptions {
        small_limit: 2999,
        ..quick()
    });
    std::fs::remove_file(env.dest("DIGESTS")).unwrap();
    let err = small
        .fetch_small(&url, Path::new("DIGESTS"), true)
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<FetchError>(),
            Some(FetchError::TooLarge { limit: 2999, .. })
        ),
        "{err:#}"
    );
    assert!(!env.dest("DIGESTS").exists());
}

#[test]
fn mirror_dates() {
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(
        parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
}
