//! A real container engine for the tests: Podman's Docker-compatible API service, driven
//! with the docker CLI.
//!
//! If `DOCKER_HOST` is set and answers, that engine is used. Otherwise one
//! `podman system service` is started per test process on a socket in a temp dir. It has no
//! idle timeout (a test may leave it alone for minutes, e.g. during a sandbox build); a small
//! shell watchdog stops it when the test process is gone.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Engine {
    /// `unix:///...` address for DOCKER_HOST.
    pub host: String,
}

impl Engine {
    /// Run the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .env("DOCKER_HOST", &self.host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
    }

    /// Like [`Engine::docker`], but panics with the output when the command fails.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn answers(host: &str) -> bool {
        Command::new("docker")
            .env("DOCKER_HOST", host)
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The engine shared by every test of this process.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        if let Ok(host) = std::env::var("DOCKER_HOST")
            && Engine::answers(&host)
        {
            return Engine { host };
        }
        let dir: PathBuf =
            std::env::temp_dir().join(format!("gentoo-mkimg-test-podman-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the podman socket dir");
        let socket = dir.join("podman.sock");
        let host = format!("unix://{}", socket.display());
        let log = std::fs::File::create(dir.join("service.log")).expect("create service log");
        // Not waited for: the watchdog ends the service after this process ends.
        let watchdog = r#"podman --runtime runc system service --time=0 "$1" & svc=$!
            trap 'kill $svc 2>/dev/null' EXIT
            while kill -0 "$2" 2>/dev/null && kill -0 $svc 2>/dev/null; do sleep 1; done"#;
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", watchdog, "sh", &host])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start `podman system service` (is podman installed? run scripts/setup-host)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Engine::answers(&host) {
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer on {host}; see {}/service.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Engine { host }
    })
}
