//! Which process made a container, as labels on it, and whether that process is gone.
//!
//! A container records its maker: the host's boot id, the maker's pid namespace, its pid and
//! its start time (clock ticks after boot, from `/proc/PID/stat`). The maker is gone when it
//! ran on this host, in this boot and this pid namespace, and no process with that pid and
//! start time is alive (or it is a zombie). Containers of another host, boot or pid namespace
//! are never judged: their maker cannot be seen from here.

use std::collections::HashMap;

use anyhow::{Context, Result};

/// The host's boot id (`/proc/sys/kernel/random/boot_id`).
pub const HOST_LABEL: &str = "org.gentoo-mkimg.host";
/// The maker's pid namespace (`/proc/self/ns/pid`, e.g. `pid:[4026531836]`).
pub const PIDNS_LABEL: &str = "org.gentoo-mkimg.pidns";
/// The maker's pid.
pub const PID_LABEL: &str = "org.gentoo-mkimg.pid";
/// The maker's start time, in clock ticks after boot.
pub const START_LABEL: &str = "org.gentoo-mkimg.start";

/// The process that made a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub pidns: String,
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Result<Owner> {
        let boot = "/proc/sys/kernel/random/boot_id";
        let host = std::fs::read_to_string(boot).with_context(|| format!("{boot}: cannot read"))?;
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .context("/proc/self/ns/pid: cannot read")?
            .to_string_lossy()
            .into_owned();
        let pid = std::process::id();
        let (start, _) =
            process_start(pid).with_context(|| format!("/proc/{pid}/stat: cannot read"))?;
        Ok(Owner {
            host: host.trim().to_string(),
            pidns,
            pid,
            start,
        })
    }

    pub fn labels(&self) -> [(String, String); 4] {
        [
            (HOST_LABEL.to_string(), self.host.clone()),
            (PIDNS_LABEL.to_string(), self.pidns.clone()),
            (PID_LABEL.to_string(), self.pid.to_string()),
            (START_LABEL.to_string(), self.start.to_string()),
        ]
    }

    /// The owner a container's labels name; `None` when one is missing or malformed.
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Owner> {
        Some(Owner {
            host: labels.get(HOST_LABEL)?.clone(),
            pidns: labels.get(PIDNS_LABEL)?.clone(),
            pid: labels.get(PID_LABEL)?.parse().ok()?,
            start: labels.get(START_LABEL)?.parse().ok()?,
        })
    }

    /// Whether this owner is known to have ended, judged by `me` (this process).
    pub fn is_gone(&self, me: &Owner) -> bool {
        if self.host != me.host || self.pidns != me.pidns {
            return false;
        }
        match process_start(self.pid) {
            Some((start, state)) => start != self.start || state == 'Z',
            None => true,
        }
    }
}

/// The start time and state of process `pid`, from `/proc/PID/stat`; `None` when there is no
/// such process.
fn process_start(pid: u32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses; the fields after it
    // are plain. The start time is field 22, the 20th after COMM.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_this_process_is_alive() {
        let me = Owner::current().expect("this process");
        let labels: HashMap<String, String> = me.labels().into_iter().collect();
        assert_eq!(Owner::from_labels(&labels), Some(me.clone()));
        assert!(!me.is_gone(&me));
        let mut missing = labels.clone();
        missing.remove(START_LABEL);
        assert_eq!(Owner::from_labels(&missing), None);
    }

    #[test]
    fn an_ended_or_other_process_is_gone_and_other_hosts_are_not_judged() {
        let me = Owner::current().expect("this process");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let (start, _) = process_start(pid).expect("the child's stat");
        let owner = Owner {
            pid,
            start,
            ..me.clone()
        };
        child.wait().expect("wait");
        assert!(owner.is_gone(&me), "an ended process");
        let restarted = Owner {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(restarted.is_gone(&me), "another process under the same pid");
        for other in [
            Owner {
                host: "another-boot".to_string(),
                ..owner.clone()
            },
            Owner {
                pidns: "pid:[1]".to_string(),
                ..owner.clone()
            },
        ] {
            assert!(!other.is_gone(&me), "{other:?}");
        }
    }
}
