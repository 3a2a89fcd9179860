//! How a session hands trees back, the same way in both engines: the command writes each
//! export as a tar stream into a named pipe, `EXPORT_DIR/NAME`, and the tool reads it while
//! the command runs.
//!
//! Why pipes and not a walk of the session's files or the Engine API's archive download:
//! - the host never reads a tree that the session made: a hostile build cannot leave a
//!   symlink, a special file or a moved directory for the host to follow; all it can send is
//!   bytes, which the reader parses as tar and nothing more;
//! - both engines give the same stream (the stage's own `tar`), so the same layers;
//! - the layer is compressed while the command goes on (dev while rt is made);
//! - Podman's archive download drops group ownership, and an ordinary user cannot read a
//!   root-owned tree from a bind mount.
//!
//! The pipe directory is mounted read-only: the command can write into the pipes (a FIFO
//! stays writable on a read-only mount) but cannot replace them. Even so the tool opens each
//! pipe by the descriptor it pinned when it made it, never by its name.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::Mount;

/// Where a session finds its export pipes.
pub const EXPORT_DIR: &str = "/var/tmp/gentoo-mkimg/export";

/// Reads one export: its name and the tar stream. Runs on a thread of its own while the
/// session runs.
pub type ReadExport<'a, T> = dyn Fn(&str, &mut dyn BufRead) -> Result<T> + Sync + 'a;

/// One export as read, with the time its reading took.
#[derive(Debug)]
pub struct Exported<T> {
    pub name: String,
    pub value: T,
    pub took: Duration,
}

/// A session's exit status and its exports. A session that ended before writing an export
/// (it failed) gives fewer exports; a reader that failed gives its error.
#[derive(Debug)]
pub struct Outcome<T> {
    pub status: i32,
    pub exports: Result<Vec<Exported<T>>>,
}

/// Make a pipe for each of `names` in `dir` (created here, removed by the caller), owned by
/// `owner` (host uid and gid of the session's root) when given; run `run` with the mount that
/// puts `dir` at [`EXPORT_DIR`], reading the exports meanwhile with `read`, in order.
pub(crate) fn with_pipes<T: Send>(
    dir: &Path,
    owner: Option<u32>,
    names: &[&str],
    read: &ReadExport<'_, T>,
    run: impl FnOnce(Mount) -> Result<i32>,
) -> Result<Outcome<T>> {
    let pipes = make_pipes(dir, owner, names)?;
    let mount = Mount {
        source: dir.to_path_buf(),
        target: EXPORT_DIR.into(),
        read_only: true,
    };
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("export-reader".into())
            .spawn_scoped(scope, || read_all(&pipes, read))
            .context("cannot start the export reader")?;
        let status = run(mount);
        // However the session ended, the reader must not wait for ever on a pipe that no
        // one will open: open each write end once (without blocking) until it is done.
        while !reader.is_finished() {
            for pipe in &pipes {
                let _ = pipe.open(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let exports = reader
            .join()
            .map_err(|_| anyhow!("the export reader panicked"))?;
        Ok(Outcome {
            status: status?,
            exports,
        })
    })
}

/// A pipe made for the session, held by an `O_PATH` descriptor from its making on: the
/// reader and the unblocker open it through `/proc/self/fd`, never by its name again, so a
/// session that put something else in its place would only write into that.
struct Pipe {
    path: PathBuf,
    pinned: OwnedFd,
}

impl Pipe {
    fn open(&self, write: bool) -> std::io::Result<fs::File> {
        let fd = format!("/proc/self/fd/{}", self.pinned.as_raw_fd());
        if write {
            fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fd)
        } else {
            fs::File::open(fd)
        }
    }
}

fn make_pipes(dir: &Path, owner: Option<u32>, names: &[&str]) -> Result<Vec<Pipe>> {
    fs::create_dir(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let chown = |path: &Path| -> Result<()> {
        if let Some(id) = owner {
            std::os::unix::fs::lchown(path, Some(id), Some(id))
                .with_context(|| format!("{}: cannot set the owner", path.display()))?;
        }
        Ok(())
    };
    chown(dir)?;
    let mut pipes = Vec::new();
    for name in names {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("{name:?}: not a name for an export");
        }
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("{}: cannot create a pipe", path.display()))?;
        chown(&path)?;
        let pinned = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        pipes.push(Pipe {
            path,
            pinned: pinned.into(),
        });
    }
    Ok(pipes)
}

fn read_all<T>(pipes: &[Pipe], read: &ReadExport<'_, T>) -> Result<Vec<Exported<T>>> {
    let mut out = Vec::new();
    for (i, pipe) in pipes.iter().enumerate() {
        let path = &pipe.path;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Blocks until the session opens the pipe to write (or with_pipes does, at its end).
        let file = pipe
            .open(false)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        match input.fill_buf() {
            // Nothing written: the session ended before this export.
            Ok([]) => break,
            Ok(_) => {}
            Err(e) => bail!("{}: cannot read: {e}", path.display()),
        }
        let started = Instant::now();
        // The rest of the stream is read too (tar pads its archive past the end-of-archive
        // marker, to a whole record), so the writer never finds the pipe closed under it:
        // SIGPIPE would fail the session after all its work was done.
        let value = read(name, &mut input).and_then(|value| {
            std::io::copy(&mut input, &mut std::io::sink())
                .with_context(|| format!("{}: cannot read to its end", path.display()))?;
            Ok(value)
        });
        match value {
            Ok(value) => out.push(Exported {
                name: name.to_string(),
                value,
                took: started.elapsed(),
            }),
            Err(e) => {
                // The session would wait for ever to write the exports not read yet: take
                // them and throw them away, so that it ends.
                drop(input);
                for rest in &pipes[i + 1..] {
                    if let Ok(mut f) = rest.open(false) {
                        let _ = std::io::copy(&mut f, &mut std::io::sink());
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    fn write_to(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
        fs::OpenOptions::new()
            .write(true)
            .open(dir.join(name))?
            .write_all(data)
    }

    /// A writer that pads its stream past a pipe's capacity (as tar's record padding can
    /// outlast what the pipe holds) must see every byte taken, not EPIPE; each export gets
    /// its own stream, in order.
    #[test]
    fn every_export_is_read_to_the_end_of_its_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("export");
        let read = |name: &str, input: &mut dyn BufRead| -> Result<String> {
            let mut head = [0u8; 5];
            input.read_exact(&mut head)?;
            Ok(format!("{name}:{}", String::from_utf8_lossy(&head)))
        };
        let outcome = with_pipes(&dir, None, &["dev", "rt"], &read, |mount| {
            assert_eq!(mount.target, EXPORT_DIR);
            assert!(mount.read_only);
            let mut dev = b"first".to_vec();
            dev.extend(std::iter::repeat_n(0u8, 256 * 1024));
            write_to(&mount.source, "dev", &dev)?;
            write_to(&mount.source, "rt", b"second")?;
            Ok(0)
        })
        .unwrap();
        assert_eq!(outcome.status, 0);
        let got: Vec<_> = outcome
            .exports
            .unwrap()
            .into_iter()
            .map(|e| e.value)
            .collect();
        assert_eq!(got, ["dev:first", "rt:secon"]);
    }

    /// A session that ends before it writes (it failed) leaves the reader waiting on no
    /// pipe: the outcome has its status and the exports it wrote.
    #[test]
    fn a_session_that_writes_nothing_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("export");
        let read = |_: &str, input: &mut dyn BufRead| -> Result<usize> {
            Ok(std::io::copy(input, &mut std::io::sink())? as usize)
        };
        let outcome = with_pipes(&dir, None, &["dev", "rt"], &read, |mount| {
            write_to(&mount.source, "dev", b"only dev")?;
            Ok(3)
        })
        .unwrap();
        assert_eq!(outcome.status, 3);
        let got: Vec<_> = outcome
            .exports
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(got, ["dev"]);
    }

    /// When the first export cannot be read, the reader still takes the second off the
    /// session (which would otherwise block for ever on opening its pipe) and reports the
    /// first one's error.
    #[test]
    fn an_export_that_cannot_be_read_does_not_block_the_session() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("export");
        let read =
            |name: &str, _: &mut dyn BufRead| -> Result<()> { bail!("{name} is not a tar stream") };
        let (done, finished) = mpsc::channel();
        let outcome = with_pipes(&dir, None, &["dev", "rt"], &read, |mount| {
            let _ = write_to(&mount.source, "dev", &[b'x'; 4096]);
            let rt = write_to(&mount.source, "rt", &[0u8; 100 * 1024]);
            let _ = done.send(rt.is_ok());
            Ok(0)
        })
        .unwrap();
        let wrote_rt = finished
            .recv_timeout(Duration::from_secs(30))
            .expect("the session is still blocked on the rt pipe");
        assert!(wrote_rt, "the rt pipe was closed under the session");
        let err = format!("{:#}", outcome.exports.unwrap_err());
        assert!(err.contains("dev is not a tar stream"), "{err}");
    }

    /// A pipe replaced by something else (here a symlink to a file of the host) is not read:
    /// the reader reads the pipe it made, which no one wrote.
    #[test]
    fn a_replaced_pipe_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("export");
        let secret = tmp.path().join("secret");
        fs::write(&secret, "host data").unwrap();
        let read = |_: &str, input: &mut dyn BufRead| -> Result<String> {
            let mut s = String::new();
            input.read_to_string(&mut s)?;
            Ok(s)
        };
        let outcome = with_pipes(&dir, None, &["dev"], &read, |mount| {
            fs::remove_file(mount.source.join("dev"))?;
            std::os::unix::fs::symlink(&secret, mount.source.join("dev"))?;
            Ok(0)
        })
        .unwrap();
        let exports = outcome.exports.unwrap();
        assert!(exports.is_empty(), "read {:?}", exports[0].value);
    }
}
