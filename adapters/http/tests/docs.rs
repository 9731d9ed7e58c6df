//! The repository's Markdown pages stay true to the tree: every relative link resolves to
//! a file or folder inside the repository (a clone from a registry or a Git host has
//! nothing beside it) and, with an anchor, to one of its headings; ARCHITECTURE.md names every crate of the workspace.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// The Markdown pages a reader meets: the top-level ones, `docs/`, and each crate's.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut look = |dir: &Path| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    };
    look(root);
    look(&root.join("docs"));
    look(&root.join("core"));
    for dir in std::fs::read_dir(root.join("adapters")).unwrap().flatten() {
        look(&dir.path());
    }
    out.sort();
    out
}

/// The targets of the inline links and images of `text` (`[x](target)`), with the line
/// each is on; code spans and fenced blocks are skipped.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans hold no links.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
            plain.push(' ');
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push((n + 1, target.to_owned()));
            rest = &after[end..];
        }
    }
    out
}

/// The anchors of a Markdown page's headings, as GitHub writes them: lower case, spaces
/// as hyphens, punctuation other than `-` and `_` left out. Not Markdown: none.
fn anchors(file: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim();
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        out.push(slug);
    }
    out
}

/// Whether `target` is a link to somewhere else on the web.
fn leaves_the_tree(target: &str) -> bool {
    target.starts_with("https://") || target.starts_with("http://") || target.starts_with("mailto:")
}

#[test]
fn every_relative_link_in_the_docs_stays_in_the_repository() {
    let root = root();
    let pages = pages(&root);
    assert!(
        pages.iter().any(|p| p.ends_with("README.md")),
        "the pages were found: {pages:?}"
    );
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let dir = page.parent().unwrap();
        for (line, target) in link_targets(&text) {
            if leaves_the_tree(&target) {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                Ok(page.clone())
            } else {
                dir.join(path).canonicalize()
            };
            let found = match resolved {
                Ok(file) if file.starts_with(&root) => {
                    anchor.is_empty() || anchors(&file).iter().any(|a| a == anchor)
                }
                _ => false,
            };
            if !found {
                let page = page.strip_prefix(&root).unwrap().display();
                broken.push(format!("{page}:{line}: {target}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links that point to nothing or outside the repository:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_architecture_page_names_every_crate_of_the_workspace() {
    let root = root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("the workspace lists its members");
    let members: Vec<&str> = members.split('"').skip(1).step_by(2).collect();
    assert!(members.len() >= 10, "members were read: {members:?}");
    let page = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let missing: Vec<&&str> = members
        .iter()
        .filter(|m| !page.contains(&format!("]({m}/)")))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not link these crates: {missing:?}"
    );
}

#[test]
fn headings_give_github_s_anchors() {
    let dir = std::env::temp_dir().join(format!("docs-anchors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("p.md");
    std::fs::write(&page, "# Stopping, deploying and upgrading\n```\n# not a heading\n```\n## Using the core from a `no_std` program\n").unwrap();
    assert_eq!(
        anchors(&page),
        [
            "stopping-deploying-and-upgrading",
            "using-the-core-from-a-no_std-program"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn links_are_read_outside_code_only() {
    let text =
        "see [a](docs/a.md) and `[b](nowhere)`\n```\n[c](nor-here)\n```\n[d](#x) ![i](p.png \"t\")";
    let targets: Vec<String> = link_targets(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(targets, ["docs/a.md", "#x", "p.png"]);
}
