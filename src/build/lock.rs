//! One lock per TAG of a work dir: `packages/TAG`, `portage/TAG`, `logs/TAG` and
//! `build/TAG` belong to one command at a time. A second `build` or `shell` of the same TAG
//! says whom it waits for and waits; the lock goes with the process (flock), so a killed
//! command never leaves it behind.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Held while a command works on a TAG; released when dropped.
pub struct TagLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl TagLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the lock of `tag` in `work` (`work/build/TAG/lock`) for `what` (e.g. "build"),
/// waiting for the command that holds it, with one line on stderr saying so.
pub fn lock_tag(work: &Path, tag: &str, what: &str) -> Result<TagLock> {
    let dir = work.join("build").join(tag);
    fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join("lock");
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock of TAG {tag}", path.display()))
    };
    let mut file = match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(file) => file,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            eprintln!(
                "gentoo-mkimg: waiting for {} to finish with TAG {tag} in {} (lock {})",
                match holder.trim() {
                    "" => "another command".to_string(),
                    h => h.to_string(),
                },
                work.display(),
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
                anyhow::anyhow!("{}: cannot lock ({errno})", path.display())
            })?
        }
        Err((_, errno)) => {
            anyhow::bail!("{}: cannot lock ({errno})", path.display())
        }
    };
    // Who holds it, for the next one that waits.
    let note = format!("{what} (pid {})\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| file.write_all(note.as_bytes()))
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(TagLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_second_holder_waits_for_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock_tag(tmp.path(), "t1", "build").unwrap();
        assert_eq!(
            fs::read_to_string(first.path()).unwrap(),
            format!("build (pid {})\n", std::process::id())
        );
        // Another TAG is free.
        drop(lock_tag(tmp.path(), "t2", "build").unwrap());

        let work = tmp.path().to_path_buf();
        let started = Instant::now();
        let second = std::thread::spawn(move || {
            let lock = lock_tag(&work, "t1", "shell").unwrap();
            (started.elapsed(), fs::read_to_string(lock.path()).unwrap())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!second.is_finished(), "the second holder did not wait");
        drop(first);
        let (waited, note) = second.join().unwrap();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(note.starts_with("shell (pid "), "{note}");
    }
}
