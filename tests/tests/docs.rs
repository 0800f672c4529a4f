//! The documentation's links work as written: every relative link in the README, the
//! contributor notes, docs/ and the chart's README names a file that exists, and every
//! `#anchor` a heading of that file (GitHub's rules: lowercase, punctuation dropped, spaces
//! to '-').

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use fleetlet_testenv::repo_root;

/// The Markdown files users read.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut out = vec![root.join("README.md"), root.join("CONTRIBUTING.md")];
    for dir in ["docs", "examples", "helm", "helm/fleetlet", "scripts"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "md") {
                    out.push(e.path());
                }
            }
        }
    }
    out.retain(|p| p.exists());
    out
}

/// Lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut seen = BTreeSet::new();
    for line in prose(&text) {
        let Some(h) = line.strip_prefix('#') else {
            continue;
        };
        let h = h.trim_start_matches('#');
        if !h.starts_with(' ') {
            continue;
        }
        // Links in headings keep only their text.
        let text: String = h.replace(['[', ']'], "");
        let base = slug(text.split("](").next().unwrap_or(&text));
        let mut a = base.clone();
        let mut n = 1;
        while seen.contains(&a) {
            a = format!("{base}-{n}");
            n += 1;
        }
        seen.insert(a);
    }
    seen
}

/// `(target, line number)` of every inline link `](target)` outside code.
fn links(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Inline code spans are not links.
        let plain: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            out.push((after[..end].trim().to_owned(), i + 1));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            let at = format!("{}:{line}: {target}", doc.display());
            if !path.exists() {
                broken.push(format!("{at}: no such file"));
                continue;
            }
            if let Some(a) = anchor
                && path.extension().is_some_and(|x| x == "md")
                && !anchors(&path).contains(a)
            {
                broken.push(format!("{at}: no heading with that anchor"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the scan broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_finds_what_it_should() {
    assert_eq!(
        slug("Isolation: an account per device"),
        "isolation-an-account-per-device"
    );
    assert_eq!(slug("`--once` and friends"), "--once-and-friends");
    let text = "see [a](docs/x.md#y) and `[not](a link)`\n```\n[no](code)\n```\n[b](#c)";
    let found: Vec<String> = links(text).into_iter().map(|(t, _)| t).collect();
    assert_eq!(found, ["docs/x.md#y", "#c"]);
    // The chart's README and every guide are among the documents checked.
    let docs = documents();
    for d in [
        "README.md",
        "helm/README.md",
        "docs/raspberry-pi.md",
        "docs/gitops.md",
    ] {
        assert!(docs.contains(&repo_root().join(d)), "{d} is not checked");
    }
}
