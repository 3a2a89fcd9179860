//! Owners inside a stage and owners on the host: the sandbox runs a stage in a user namespace
//! where the stage's ids 0..65535 are host ids `base..base+65535`, so its root is no root of
//! the host. Files of the stage are written to the host with shifted owners ([`IdShift::to_host`])
//! and read back unshifted ([`IdShift::to_inside`]).
//!
//! `base` 0 is no shift: the docker engine, and the sandbox of an ordinary user, whose whole
//! process already runs in a user namespace that maps its subordinate ids.

use anyhow::{Result, bail};

/// Inside id `n` is host id `base + n`, for `n < COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdShift {
    pub base: u32,
}

impl IdShift {
    /// No shift: ids are the host's.
    pub const NONE: IdShift = IdShift { base: 0 };
    /// How many ids a stage gets: as many as `/etc/subuid` ranges usually hold.
    pub const COUNT: u32 = 65536;

    /// The host id of the stage's id `id`.
    pub fn to_host(self, id: u64) -> Result<u32> {
        if self.base == 0 {
            return u32::try_from(id).or_else(|_| bail!("owner id {id} is out of range"));
        }
        if id >= u64::from(Self::COUNT) {
            bail!(
                "owner id {id} is beyond the {} ids the sandbox maps",
                Self::COUNT
            );
        }
        Ok(self.base + id as u32)
    }

    /// The stage's id of the host id `host`, if it is one of the stage's.
    pub fn to_inside(self, host: u32) -> Option<u32> {
        if self.base == 0 {
            return Some(host);
        }
        host.checked_sub(self.base).filter(|id| *id < Self::COUNT)
    }
}

/// The first range of `/etc/subuid` or `/etc/subgid` (`text`) for the user `name` or `id`
/// with at least `count` ids: its start.
pub fn subordinate_start(text: &str, name: &str, id: u32, count: u32) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let (owner, start, len) = (parts.next()?, parts.next()?, parts.next()?);
        if owner != name && owner.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let start: u32 = start.trim().parse().ok()?;
        let len: u32 = len.trim().parse().ok()?;
        (len >= count && start.checked_add(count).is_some()).then_some(start)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_and_unshifts_within_the_range_only() {
        let ids = IdShift { base: 100_000 };
        assert_eq!(ids.to_host(0).unwrap(), 100_000);
        assert_eq!(ids.to_host(250).unwrap(), 100_250);
        assert!(ids.to_host(65536).is_err());
        assert_eq!(ids.to_inside(100_250), Some(250));
        assert_eq!(ids.to_inside(0), None);
        assert_eq!(ids.to_inside(100_000 + 65536), None);
        assert_eq!(IdShift::NONE.to_host(70_000).unwrap(), 70_000);
        assert_eq!(IdShift::NONE.to_inside(5), Some(5));
    }

    #[test]
    fn finds_a_subordinate_range_by_name_or_id() {
        let text = "alice:100000:65536\n1001:200000:1000\n1001:300000:65536\n";
        assert_eq!(subordinate_start(text, "alice", 1000, 65536), Some(100_000));
        assert_eq!(subordinate_start(text, "bob", 1001, 65536), Some(300_000));
        assert_eq!(subordinate_start(text, "carol", 1002, 65536), None);
    }
}
