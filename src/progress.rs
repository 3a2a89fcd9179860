//! Progress on stderr for long work: shown only when stderr is a terminal and not `-q`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How chatty the tool is, from `-q` / `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verbosity {
    Quiet,
    #[default]
    Normal,
    Verbose,
}

/// A byte-count progress bar, or nothing.
pub struct Bytes {
    bar: Option<ProgressBar>,
}

impl Bytes {
    /// A bar for `total` bytes labelled `what`, drawn only on a terminal.
    pub fn new(verbosity: Verbosity, what: &str, total: u64) -> Self {
        if verbosity == Verbosity::Quiet || !std::io::stderr().is_terminal() {
            return Bytes { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Bytes { bar: Some(bar) }
    }

    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A count-of-items progress bar (entries of an archive whose byte size says little), or
/// nothing.
pub struct Count {
    bar: Option<ProgressBar>,
}

impl Count {
    /// A bar labelled `what`; its total is given with each update.
    pub fn new(verbosity: Verbosity, what: &str) -> Self {
        if verbosity == Verbosity::Quiet || !std::io::stderr().is_terminal() {
            return Count { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Count { bar: Some(bar) }
    }

    pub fn set(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A reader that moves a [`Bytes`] bar as it is read.
pub struct Reading<'a, R> {
    inner: R,
    bar: &'a Bytes,
    done: u64,
}

impl<'a, R> Reading<'a, R> {
    pub fn new(inner: R, bar: &'a Bytes) -> Self {
        Reading {
            inner,
            bar,
            done: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Reading<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.bar.set(self.done);
        Ok(n)
    }
}

/// Bytes as a short human size (binary units).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
