//! Package names and versions: `CAT/PF` split into `CAT/PN` and `PVR`, and the packages a
//! dependency string (`RDEPEND` of the vdb) names.

/// `PF` (`PN-PV[-rN]`) split into `PN` and `PVR` (`PV[-rN]`), at the first `-` after which
/// a valid version follows.
pub fn split_pf(pf: &str) -> Option<(&str, &str)> {
    pf.match_indices('-')
        .map(|(i, _)| i)
        .find(|&i| i > 0 && is_version(&pf[i + 1..]))
        .map(|i| (&pf[..i], &pf[i + 1..]))
}

/// `CAT/PF` split into `CAT/PN` and `PVR`.
pub fn split_cpf(cpf: &str) -> Option<(String, &str)> {
    let (cat, pf) = cpf.split_once('/')?;
    let (pn, pvr) = split_pf(pf)?;
    (!cat.is_empty()).then(|| (format!("{cat}/{pn}"), pvr))
}

/// A PMS version with an optional revision: `1.2.3b_rc1_p2-r3`.
fn is_version(v: &str) -> bool {
    let v = match v.rsplit_once("-r") {
        Some((v, r)) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) => v,
        _ => v,
    };
    let mut parts = v.split('_');
    let Some(main) = parts.next() else {
        return false;
    };
    let main = main
        .strip_suffix(|c: char| c.is_ascii_lowercase())
        .unwrap_or(main);
    if main.is_empty()
        || !main
            .split('.')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    parts.all(|s| {
        ["alpha", "beta", "pre", "rc", "p"].iter().any(|suffix| {
            s.strip_prefix(suffix)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// One package a dependency string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    /// `CAT/PN`.
    pub name: String,
    /// The slot the atom asks for (`:SLOT` or `:SLOT/SUB`, without `=` or `*`), if any.
    pub slot: Option<String>,
}

/// The packages a dependency string names, in order: every atom, whatever `||` group or
/// USE conditional it is in (the vdb's `RDEPEND` has the conditionals resolved already);
/// blockers (`!atom`, `!!atom`) are left out.
pub fn deps(text: &str) -> Vec<Dep> {
    text.split_whitespace()
        .filter(|t| !matches!(*t, "||" | "(" | ")") && !t.ends_with('?') && !t.starts_with('!'))
        .filter_map(atom)
        .collect()
}

/// The package an atom such as `>=sys-libs/zlib-1.3:0/1=[abi_x86_64(-)]::gentoo` names.
fn atom(text: &str) -> Option<Dep> {
    let text = text.split_once('[').map_or(text, |(a, _)| a);
    let text = text.split_once("::").map_or(text, |(a, _)| a);
    let (text, slot) = match text.split_once(':') {
        Some((a, s)) => {
            let s = s.trim_end_matches(['=', '*']);
            (a, (!s.is_empty()).then(|| s.to_string()))
        }
        None => (text, None),
    };
    let unversioned = text.trim_start_matches(['<', '>', '=', '~']);
    let name = if unversioned.len() == text.len() {
        unversioned.to_string()
    } else {
        split_cpf(unversioned.trim_end_matches('*'))?.0
    };
    let (cat, pn) = name.split_once('/')?;
    (!cat.is_empty() && !pn.is_empty() && !pn.contains('/')).then_some(Dep { name, slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pf_splits_at_the_version() {
        assert_eq!(split_pf("sed-4.9"), Some(("sed", "4.9")));
        assert_eq!(split_pf("musl-1.2.5-r3"), Some(("musl", "1.2.5-r3")));
        assert_eq!(split_pf("bash-5.2_p37"), Some(("bash", "5.2_p37")));
        assert_eq!(
            split_pf("gcc-14.2.1_p20250301"),
            Some(("gcc", "14.2.1_p20250301"))
        );
        assert_eq!(
            split_pf("font-misc-1.0b-r1"),
            Some(("font-misc", "1.0b-r1"))
        );
        assert_eq!(split_pf("libc-1-r1"), Some(("libc", "1-r1")));
        assert_eq!(split_pf("x-2-3"), Some(("x-2", "3")));
        assert_eq!(split_pf("noversion"), None);
        assert_eq!(split_pf("bad-1.x"), None);
        assert_eq!(
            split_cpf("sys-libs/musl-1.2.5-r3"),
            Some(("sys-libs/musl".to_string(), "1.2.5-r3"))
        );
    }

    #[test]
    fn deps_name_every_atom_but_blockers() {
        let text = ">=sys-libs/zlib-1.3:0/1=[abi_x86_64(-)] || ( app-shells/bash:0 \
                    sys-apps/busybox ) !app-misc/old =dev-lang/perl-5.40*:0/5.40= \
                    ~sys-libs/ncurses-6.4::gentoo !!x/y virtual/libc";
        let got: Vec<(String, Option<String>)> =
            deps(text).into_iter().map(|d| (d.name, d.slot)).collect();
        let want = [
            ("sys-libs/zlib", Some("0/1")),
            ("app-shells/bash", Some("0")),
            ("sys-apps/busybox", None),
            ("dev-lang/perl", Some("0/5.40")),
            ("sys-libs/ncurses", None),
            ("virtual/libc", None),
        ]
        .map(|(n, s)| (n.to_string(), s.map(str::to_string)));
        assert_eq!(got, want);
    }
}
