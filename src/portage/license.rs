//! A package's `LICENSE` (Gentoo's licence names and dependency syntax) as an SPDX licence
//! expression.
//!
//! Gentoo writes `LICENSE="GPL-2+ LGPL-2.1 || ( MIT BSD ) ssl? ( openssl )"`: names
//! side by side all apply (SPDX `AND`), `|| ( … )` is a choice (`OR`), `flag? ( … )` and
//! `!flag? ( … )` apply when the package was built with (without) USE flag `flag`, and
//! `( … )` groups. The vdb's `LICENSE` is written as the ebuild has it, so the conditionals
//! are resolved here with the package's own `USE`.
//!
//! Gentoo's names are mapped to SPDX identifiers where the licence text is the same (Gentoo's
//! `BSD` is the 3-clause licence, `BSD-2` the 2-clause, `Artistic` Perl's artistic licence);
//! any other name becomes `LicenseRef-Gentoo-NAME` (characters SPDX does not allow in an
//! id replaced, `+` by `-plus`), which the caller defines in the document. A `LICENSE` that
//! does not parse (unbalanced parentheses, `||` without a group), or that leaves nothing
//! once the conditionals are resolved, is `NOASSERTION`.

use std::collections::BTreeSet;

/// Gentoo licence name → SPDX licence id, for names whose text is the SPDX licence's.
const SPDX_OF_GENTOO: &[(&str, &str)] = &[
    ("AFL-2.1", "AFL-2.1"),
    ("AGPL-3", "AGPL-3.0-only"),
    ("AGPL-3+", "AGPL-3.0-or-later"),
    ("Apache-1.1", "Apache-1.1"),
    ("Apache-2.0", "Apache-2.0"),
    ("Artistic", "Artistic-1.0-Perl"),
    ("Artistic-2", "Artistic-2.0"),
    ("BSD", "BSD-3-Clause"),
    ("BSD-1", "BSD-1-Clause"),
    ("BSD-2", "BSD-2-Clause"),
    ("BSD-4", "BSD-4-Clause"),
    ("Boost-1.0", "BSL-1.0"),
    ("BZIP2", "bzip2-1.0.6"),
    ("CC-BY-3.0", "CC-BY-3.0"),
    ("CC-BY-4.0", "CC-BY-4.0"),
    ("CC-BY-SA-3.0", "CC-BY-SA-3.0"),
    ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    ("CC0-1.0", "CC0-1.0"),
    ("CDDL", "CDDL-1.0"),
    ("EPL-1.0", "EPL-1.0"),
    ("EPL-2.0", "EPL-2.0"),
    ("FDL-1.1", "GFDL-1.1-only"),
    ("FDL-1.1+", "GFDL-1.1-or-later"),
    ("FDL-1.2", "GFDL-1.2-only"),
    ("FDL-1.2+", "GFDL-1.2-or-later"),
    ("FDL-1.3", "GFDL-1.3-only"),
    ("FDL-1.3+", "GFDL-1.3-or-later"),
    ("FTL", "FTL"),
    ("GPL-1", "GPL-1.0-only"),
    ("GPL-1+", "GPL-1.0-or-later"),
    ("GPL-2", "GPL-2.0-only"),
    ("GPL-2+", "GPL-2.0-or-later"),
    ("GPL-3", "GPL-3.0-only"),
    ("GPL-3+", "GPL-3.0-or-later"),
    ("HPND", "HPND"),
    ("ISC", "ISC"),
    ("LGPL-2", "LGPL-2.0-only"),
    ("LGPL-2+", "LGPL-2.0-or-later"),
    ("LGPL-2.1", "LGPL-2.1-only"),
    ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("LGPL-3", "LGPL-3.0-only"),
    ("LGPL-3+", "LGPL-3.0-or-later"),
    ("MIT", "MIT"),
    ("MPL-1.0", "MPL-1.0"),
    ("MPL-1.1", "MPL-1.1"),
    ("MPL-2.0", "MPL-2.0"),
    ("OFL-1.1", "OFL-1.1"),
    ("openssl", "OpenSSL"),
    ("PSF-2", "PSF-2.0"),
    ("Ruby", "Ruby"),
    ("Sleepycat", "Sleepycat"),
    ("UoI-NCSA", "NCSA"),
    ("Unlicense", "Unlicense"),
    ("Vim", "Vim"),
    ("WTFPL-2", "WTFPL"),
    ("X11", "X11"),
    ("ZLIB", "Zlib"),
    ("ZPL", "ZPL-2.1"),
    ("curl", "curl"),
];

/// The SPDX id of Gentoo licence `name`, when SPDX has the same licence.
pub fn spdx_id(name: &str) -> Option<&'static str> {
    SPDX_OF_GENTOO
        .iter()
        .find(|(g, _)| *g == name)
        .map(|(_, s)| *s)
}

/// `LicenseRef-Gentoo-NAME` for a Gentoo licence SPDX has no id for: `+` becomes `-plus`
/// and any other character outside `[A-Za-z0-9.-]` a `-`.
pub fn license_ref(name: &str) -> String {
    let mut id = String::from("LicenseRef-Gentoo-");
    for c in name.chars() {
        match c {
            '+' => id.push_str("-plus"),
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => id.push(c),
            _ => id.push('-'),
        }
    }
    id
}

/// A resolved licence expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    /// A Gentoo licence name.
    Name(String),
    All(Vec<Expr>),
    Any(Vec<Expr>),
}

/// The SPDX expression of `LICENSE` for a package built with `use_flags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The expression, or `NOASSERTION`.
    pub expression: String,
    /// The Gentoo names it uses that SPDX has no id for (each is a `LicenseRef-Gentoo-…`
    /// of the expression), sorted.
    pub unmapped: BTreeSet<String>,
}

/// `license` (the vdb's `LICENSE`) as an SPDX expression, conditionals resolved with
/// `use_flags` (the vdb's `USE`, space-separated).
pub fn to_spdx(license: &str, use_flags: &str) -> Mapped {
    let enabled: BTreeSet<&str> = use_flags.split_whitespace().collect();
    let tokens: Vec<&str> = license.split_whitespace().collect();
    let mut pos = 0;
    let parsed = parse_list(&tokens, &mut pos, &enabled).filter(|_| pos == tokens.len());
    let Some(items) = parsed else {
        return Mapped {
            expression: "NOASSERTION".into(),
            unmapped: BTreeSet::new(),
        };
    };
    match simplify(Expr::All(items)) {
        None => Mapped {
            expression: "NOASSERTION".into(),
            unmapped: BTreeSet::new(),
        },
        Some(expr) => {
            let mut unmapped = BTreeSet::new();
            let expression = render(&expr, true, &mut unmapped);
            Mapped {
                expression,
                unmapped,
            }
        }
    }
}

/// Items up to a `)` (not consumed) or the end; `None` if malformed. Conditionals whose
/// flag does not hold are dropped.
fn parse_list(tokens: &[&str], pos: &mut usize, enabled: &BTreeSet<&str>) -> Option<Vec<Expr>> {
    let mut items = Vec::new();
    while let Some(&tok) = tokens.get(*pos) {
        if tok == ")" {
            break;
        }
        *pos += 1;
        if tok == "||" {
            let group = parse_group(tokens, pos, enabled)?;
            items.push(Expr::Any(group));
        } else if tok == "(" {
            *pos -= 1;
            let group = parse_group(tokens, pos, enabled)?;
            items.push(Expr::All(group));
        } else if let Some(flag) = tok.strip_suffix('?') {
            let group = parse_group(tokens, pos, enabled)?;
            let (negated, flag) = match flag.strip_prefix('!') {
                Some(f) => (true, f),
                None => (false, flag),
            };
            if flag.is_empty() {
                return None;
            }
            if enabled.contains(flag) != negated {
                items.push(Expr::All(group));
            }
        } else if tok.contains(['(', ')', '|', '?']) {
            return None;
        } else {
            items.push(Expr::Name(tok.to_string()));
        }
    }
    Some(items)
}

/// `( items )` at `pos`.
fn parse_group(tokens: &[&str], pos: &mut usize, enabled: &BTreeSet<&str>) -> Option<Vec<Expr>> {
    if tokens.get(*pos) != Some(&"(") {
        return None;
    }
    *pos += 1;
    let items = parse_list(tokens, pos, enabled)?;
    if tokens.get(*pos) != Some(&")") {
        return None;
    }
    *pos += 1;
    Some(items)
}

/// Empty groups dropped, one-item groups unwrapped, nested groups of the same kind merged.
fn simplify(expr: Expr) -> Option<Expr> {
    let (any, items) = match expr {
        Expr::Name(n) => return Some(Expr::Name(n)),
        Expr::All(items) => (false, items),
        Expr::Any(items) => (true, items),
    };
    let mut out: Vec<Expr> = Vec::new();
    for item in items.into_iter().filter_map(simplify) {
        match item {
            Expr::Any(inner) if any => out.extend(inner),
            Expr::All(inner) if !any => out.extend(inner),
            other => {
                if !out.contains(&other) {
                    out.push(other)
                }
            }
        }
    }
    match out.len() {
        0 => None,
        1 => out.pop(),
        _ if any => Some(Expr::Any(out)),
        _ => Some(Expr::All(out)),
    }
}

fn render(expr: &Expr, top: bool, unmapped: &mut BTreeSet<String>) -> String {
    let (op, items) = match expr {
        Expr::Name(n) => {
            return match spdx_id(n) {
                Some(id) => id.to_string(),
                None => {
                    unmapped.insert(n.clone());
                    license_ref(n)
                }
            };
        }
        Expr::All(items) => (" AND ", items),
        Expr::Any(items) => (" OR ", items),
    };
    let text = items
        .iter()
        .map(|i| render(i, false, unmapped))
        .collect::<Vec<_>>()
        .join(op);
    if top { text } else { format!("({text})") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spdx(license: &str, use_flags: &str) -> String {
        to_spdx(license, use_flags).expression
    }

    #[test]
    fn names_map_to_spdx_ids_and_lists_are_and() {
        assert_eq!(spdx("GPL-2", ""), "GPL-2.0-only");
        assert_eq!(spdx("GPL-2+", ""), "GPL-2.0-or-later");
        assert_eq!(
            spdx("MIT LGPL-2.1+ GPL-2", ""),
            "MIT AND LGPL-2.1-or-later AND GPL-2.0-only"
        );
        assert_eq!(
            spdx("BSD ZLIB PSF-2", ""),
            "BSD-3-Clause AND Zlib AND PSF-2.0"
        );
        assert_eq!(spdx("GPL-2 GPL-2", ""), "GPL-2.0-only");
    }

    #[test]
    fn any_of_is_or_and_groups_nest() {
        assert_eq!(
            spdx(
                "GPL-3+ LGPL-3+ || ( GPL-3+ libgcc libstdc++ gcc-runtime-library-exception-3.1 )",
                ""
            ),
            "GPL-3.0-or-later AND LGPL-3.0-or-later AND (GPL-3.0-or-later OR \
             LicenseRef-Gentoo-libgcc OR LicenseRef-Gentoo-libstdc-plus-plus OR \
             LicenseRef-Gentoo-gcc-runtime-library-exception-3.1)"
        );
        assert_eq!(
            spdx("|| ( MIT ( GPL-2 BSD ) )", ""),
            "MIT OR (GPL-2.0-only AND BSD-3-Clause)"
        );
        assert_eq!(spdx("|| ( MIT )", ""), "MIT");
        assert_eq!(
            spdx("|| ( MIT || ( BSD ISC ) )", ""),
            "MIT OR BSD-3-Clause OR ISC"
        );
    }

    #[test]
    fn use_conditionals_follow_the_packages_use() {
        let license = "GPL-2 ssl? ( openssl ) !static? ( LGPL-2.1 ) doc? ( FDL-1.3 )";
        assert_eq!(
            spdx(license, "amd64 ssl"),
            "GPL-2.0-only AND OpenSSL AND LGPL-2.1-only"
        );
        assert_eq!(
            spdx(license, "static doc"),
            "GPL-2.0-only AND GFDL-1.3-only"
        );
        assert_eq!(
            spdx("|| ( MIT gpl? ( GPL-2 ) )", "gpl"),
            "MIT OR GPL-2.0-only"
        );
        assert_eq!(spdx("|| ( MIT gpl? ( GPL-2 ) )", ""), "MIT");
        // Nothing left once resolved.
        assert_eq!(spdx("doc? ( FDL-1.3 )", ""), "NOASSERTION");
    }

    #[test]
    fn unmapped_names_are_license_refs_and_reported() {
        let m = to_spdx("public-domain metapackage || ( MIT free-noncomm )", "");
        assert_eq!(
            m.expression,
            "LicenseRef-Gentoo-public-domain AND LicenseRef-Gentoo-metapackage AND \
             (MIT OR LicenseRef-Gentoo-free-noncomm)"
        );
        let names: Vec<&str> = m.unmapped.iter().map(String::as_str).collect();
        assert_eq!(names, ["free-noncomm", "metapackage", "public-domain"]);
        assert_eq!(license_ref("a_b+c"), "LicenseRef-Gentoo-a-b-plusc");
    }

    #[test]
    fn what_does_not_parse_is_noassertion() {
        for bad in [
            "",
            "|| MIT",
            "( MIT",
            "MIT )",
            "ssl? MIT",
            "? ( MIT )",
            "|| ( MIT",
            "MIT(",
        ] {
            assert_eq!(spdx(bad, "ssl"), "NOASSERTION", "{bad:?}");
        }
    }
}
