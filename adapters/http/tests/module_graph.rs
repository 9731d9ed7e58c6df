//! Every crate of the workspace has modules that depend on each other one way only: this
//! test reads each crate's `src/**/*.rs` (not `src/bin`, not test-only `tests.rs` files),
//! builds its module dependency graph and fails on any cycle, printing it with the lines
//! that make it.
//!
//! Edges:
//! - `use` declarations naming a module of the crate: `crate::a::b::Item`, `super::...`,
//!   `self::...`, or a path starting with a child module (`pub use verify::...` in a
//!   `mod.rs`), groups (`use crate::{a::X, b::{Y, Z}}`) expanded;
//! - `crate::a::b` paths anywhere in the code (outside string literals), comments included:
//!   an intra-doc link (`[`crate::a`]`, `[x](super::a::X)`) is a dependency of the docs,
//!   and one pointing up is how a module starts to know the one above it;
//!
//! A parent declaring a child (`mod x;`) is not an import: a child may use its parent's
//! items (`use super::State`) as long as the parent uses nothing of the child's (no
//! `pub use x::Item`, no call into `x`), else the two import each other.
//!
//! A path resolves to the longest module prefix it names (`crate::a::b::Item` is an edge
//! to `a::b` when that module exists, else to `a`). Edges within one file (its inline
//! `mod tests`) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module: `crate` for `lib.rs`, `a` for `a.rs` or `a/mod.rs`, `a::b` for `a/b.rs`.
type Module = String;

/// Why an edge exists: file and line.
type Why = String;

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    match last.as_str() {
        "lib.rs" if parts.is_empty() => return "crate".to_owned(),
        "mod.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_owned()),
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") && dir.ends_with("src") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            // A module's tests (`#[cfg(test)] mod tests;`) are not part of the crate.
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// `text` with comments and the contents of string and character literals blanked (kept
/// as spaces, newlines kept, so that offsets and line numbers stay).
fn code_only(text: &str) -> String {
    split_comments(text).0
}

/// `text` split in two at the same offsets: its code (comments and literals blanked, as
/// [`code_only`]) and its comments (everything else blanked).
fn split_comments(text: &str) -> (String, String) {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut comments: Vec<u8> = b
        .iter()
        .map(|c| if *c == b'\n' { b'\n' } else { b' ' })
        .collect();
    let keep = |comments: &mut Vec<u8>, from: usize, to: usize| {
        comments[from..to].copy_from_slice(&b[from..to]);
    };
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                keep(&mut comments, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                keep(&mut comments, i, j);
                i = j;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end = text[start..]
                    .find(&close)
                    .map_or(b.len(), |n| start + n + close.len());
                blank(&mut out, start, end.saturating_sub(close.len()).max(start));
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i + 1, j.min(b.len()));
                i = j + 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{7f}'), or a lifetime ('a).
                let end = if b.get(i + 1) == Some(&b'\\') {
                    text[i + 2..].find('\'').map(|n| i + 2 + n)
                } else {
                    let c = text[i + 1..].chars().next().map_or(0, char::len_utf8);
                    (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 1 + c)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i + 1, end);
                        i = end + 1;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(comments).unwrap(),
    )
}

/// Expands a `use` tree (`a::{b, c::{d, self}}`) into its paths (`a::b`, `a::c::d`, `a::c`).
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    expand_into("", &tree, &mut out);
    out
}

fn expand_into(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_owned()
        } else if b == "self" {
            a.to_owned()
        } else {
            format!("{a}::{b}")
        }
    };
    match tree.find('{') {
        None => {
            if !tree.is_empty() {
                out.push(join(prefix, tree.trim_end_matches("::*")));
            }
        }
        Some(open) => {
            let head = tree[..open].trim_end_matches("::");
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let base = join(prefix, head);
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand_into(&base, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand_into(&base, &inner[start..], out);
        }
    }
}

/// `tree` without its `as alias` parts (an alias only renames the last segment).
fn without_aliases(tree: &str) -> String {
    let mut out = String::new();
    let mut rest = tree;
    while let Some(n) = rest.find(" as ") {
        out.push_str(&rest[..n]);
        let after = rest[n + 4..].trim_start();
        let alias = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        rest = &after[alias..];
    }
    out.push_str(rest);
    out
}

/// The `use` trees of `code` (comments and strings already blanked), with their offsets.
fn use_trees(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(n) = code[from..].find("use ") {
        let at = from + n;
        from = at + 4;
        let boundary = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !boundary {
            continue;
        }
        let Some(end) = code[at..].find(';') else {
            break;
        };
        out.push((at, without_aliases(&code[at + 4..at + end])));
        from = at + end;
    }
    out
}

/// `crate::a::b` paths in `code`, with their offsets.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    paths_from(code, "crate::")
}

/// The module paths of comments: `crate::`, `super::` and `self::` paths (intra-doc links
/// and their targets), with their offsets.
fn comment_paths(comments: &str) -> Vec<(usize, String)> {
    let mut out = paths_from(comments, "crate::");
    out.extend(paths_from(comments, "super::"));
    out.extend(paths_from(comments, "self::"));
    out.retain(|(_, p)| p != "super" && p != "self");
    out
}

/// Paths starting with `start` (`crate::`, `super::`, `self::`) in `text`, with their
/// offsets; one inside a longer path (`a::super::b`) is not one.
fn paths_from(text: &str, start: &str) -> Vec<(usize, String)> {
    let code = text;
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(n) = code[from..].find(start) {
        let at = from + n;
        from = at + start.len();
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || matches!(bytes[at - 1], b'_' | b':'))
        {
            continue;
        }
        let rest = &code[at..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let path = rest[..len].trim_end_matches(':');
        // `crate::{...}` is a `use` group, read by `use_trees`.
        if path != "crate" && !path.is_empty() {
            out.push((at, path.to_owned()));
        }
    }
    out
}

/// The inline modules (`mod name {`) open at each offset of `code`: their names, outermost
/// first.
fn inline_modules_at(code: &str) -> impl Fn(usize) -> Vec<String> {
    // (start, end, name) of each inline module's braces.
    let mut spans = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(n) = code[from..].find("mod ") {
        let at = from + n;
        from = at + 4;
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let rest = code[at + 4..].trim_start();
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let after = rest[name.len()..].trim_start();
        if !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0;
        let mut close = code.len();
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        spans.push((open, close, name));
    }
    move |offset| {
        spans
            .iter()
            .filter(|(open, close, _)| *open < offset && offset < *close)
            .map(|(_, _, name)| name.clone())
            .collect()
    }
}

/// The module `path` (split on `::`) names, seen from `here` (the file's module, then its
/// inline modules): the longest prefix that is a module of the crate.
/// The names each module imports: (module, name) to the module of this crate the `use`
/// names, or `None` for another crate.
type Imports = BTreeMap<(Module, String), Option<Module>>;

fn resolve(
    path: &str,
    here: &Module,
    inline: &[String],
    modules: &BTreeSet<Module>,
    imports: &Imports,
) -> Option<Module> {
    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = if here == "crate" {
        Vec::new()
    } else {
        here.split("::").map(str::to_owned).collect()
    };
    base.extend(inline.iter().cloned());
    let (mut at, rest): (Vec<String>, &[&str]) = match segments.first().copied() {
        Some("crate") => (Vec::new(), &segments[1..]),
        Some("self") => (base, &segments[1..]),
        Some("super") => {
            let mut at = base;
            let mut i = 0;
            while segments.get(i) == Some(&"super") {
                at.pop();
                i += 1;
            }
            (at, &segments[i..])
        }
        Some(first) => {
            // A child module of the file's module, else an outside crate.
            let mut child = base.clone();
            child.push(first.to_owned());
            if !modules.contains(&child.join("::")) {
                return None;
            }
            (base, &segments[..])
        }
        None => return None,
    };
    let name = |at: &[String]| {
        if at.is_empty() {
            "crate".to_owned()
        } else {
            at.join("::")
        }
    };
    // Inline modules are part of their file.
    while !at.is_empty() && !modules.contains(&name(&at)) {
        at.pop();
    }
    let mut found = name(&at);
    let mut item = None;
    for segment in rest {
        at.push((*segment).to_owned());
        if modules.contains(&name(&at)) {
            found = name(&at);
        } else {
            item = Some(*segment);
            break;
        }
    }
    // An item the module only imports (a re-export at the crate root, say) is a dependency
    // on the module that defines it.
    // One from another crate is no dependency within this one.
    let mut seen = BTreeSet::new();
    while let Some(defined) = item.and_then(|i| imports.get(&(found.clone(), i.to_owned()))) {
        let defined = defined.as_ref()?;
        if !seen.insert(defined.clone()) {
            break;
        }
        found = defined.clone();
    }
    Some(found)
}

type Graph = BTreeMap<Module, BTreeMap<Module, Why>>;

/// The module `name` would be as a child of `parent`.
fn child_of(parent: &str, name: &str) -> Module {
    if parent == "crate" {
        name.to_owned()
    } else {
        format!("{parent}::{name}")
    }
}

fn build_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    // First the names every module imports (`use` trees, aliases read as the name itself).
    let mut imports = Imports::new();
    for file in &files {
        let here = module_of(src, file);
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        let inline_at = inline_modules_at(&code);
        for (offset, tree) in use_trees(&code) {
            if !inline_at(offset).is_empty() {
                continue;
            }
            for path in expand(&tree) {
                let Some((head, name)) = path.rsplit_once("::") else {
                    continue;
                };
                if name == "*" || name == "self" {
                    continue;
                }
                let key = (here.clone(), name.to_owned());
                match resolve(head, &here, &[], &modules, &Imports::new()) {
                    Some(to) if to != here && !modules.contains(&child_of(&to, name)) => {
                        imports.insert(key, Some(to));
                    }
                    Some(_) => {}
                    None => {
                        imports.insert(key, None);
                    }
                }
            }
        }
    }
    for file in &files {
        let here = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let (code, comments) = split_comments(&text);
        let inline_at = inline_modules_at(&code);
        let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
        let rel = file
            .strip_prefix(src.parent().unwrap())
            .unwrap()
            .display()
            .to_string();
        let add = |offset: usize, path: &str, graph: &mut Graph| {
            let inline = inline_at(offset);
            if let Some(to) = resolve(path, &here, &inline, &modules, &imports)
                && to != here
            {
                graph
                    .get_mut(&here)
                    .unwrap()
                    .entry(to)
                    .or_insert_with(|| format!("{rel}:{}: {path}", line_of(offset)));
            }
        };
        for (offset, tree) in use_trees(&code) {
            for path in expand(&tree) {
                add(offset, &path, &mut graph);
            }
        }
        for (offset, path) in crate_paths(&code) {
            add(offset, &path, &mut graph);
        }
        for (offset, path) in comment_paths(&comments) {
            add(offset, &path, &mut graph);
        }
    }
    graph
}

/// A cycle of `graph`, if it has one.
fn find_cycle(graph: &Graph) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        m: &Module,
        graph: &Graph,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        marks.insert(m.clone(), Mark::Open);
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flat_map(|e| e.keys()) {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(m.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in graph.keys() {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(m, graph, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn describe(graph: &Graph, cycle: &[Module]) -> String {
    let mut text = format!("module cycle: {}\n", cycle.join(" -> "));
    for pair in cycle.windows(2) {
        text += &format!(
            "  {} -> {}: {}\n",
            pair[0], pair[1], graph[&pair[0]][&pair[1]]
        );
    }
    text
}

/// The `src` folder of every library crate of the workspace (the fuzz crate, outside it,
/// included).
fn workspace_sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut crates = vec![root.join("core"), root.join("benches"), root.join("fuzz")];
    let mut adapters: Vec<PathBuf> = std::fs::read_dir(root.join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    adapters.sort();
    crates.extend(adapters);
    crates
        .into_iter()
        .map(|c| c.join("src"))
        .filter(|src| src.is_dir())
        .collect()
}

#[test]
fn the_http_module_graph_is_read_and_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = build_graph(&src);
    let edges: usize = graph.values().map(BTreeMap::len).sum();
    // The graph was read: the layout's known edges are in it.
    for (from, to) in [
        ("crate", "routes"),
        ("routes::sessions", "extract"),
        ("extract", "tenants"),
        ("extract", "error"),
        ("tenants", "webhooks::secrets"),
        ("webhooks::verify", "webhooks::secrets"),
        ("webhooks", "webhooks::verify"),
        ("error", "request_id"),
        ("doc", "routes::ws"),
        ("observe", "state"),
        ("state", "extract"),
    ] {
        assert!(
            graph[from].contains_key(to),
            "expected an edge {from} -> {to}; read: {graph:#?}"
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("{}", describe(&graph, &cycle));
    }
    eprintln!("{} modules, {edges} edges, no cycle", graph.len());
}

#[test]
fn every_crate_s_module_graph_has_no_cycle() {
    let sources = workspace_sources();
    assert!(sources.len() >= 10, "the workspace was found: {sources:?}");
    let mut cycles = String::new();
    for src in &sources {
        let graph = build_graph(src);
        if let Some(cycle) = find_cycle(&graph) {
            cycles += &format!("{}: {}", src.display(), describe(&graph, &cycle));
        }
    }
    assert!(cycles.is_empty(), "{cycles}");
}

#[test]
fn use_trees_are_expanded_and_literals_ignored() {
    let code = code_only(
        "use crate::{a::X, b::{self, c::Y}};\n\
         // use crate::commented::Out;\n\
         let s = \"crate::in_a_string\"; let c = '\"'; fn f<'a>(x: &'a str) {}\n\
         pub(crate) use super::d as e;\n\
         let v = crate::f::g(1);\n",
    );
    let trees = use_trees(&code);
    let paths: Vec<String> = trees.iter().flat_map(|(_, t)| expand(t)).collect();
    assert_eq!(
        paths,
        ["crate::a::X", "crate::b", "crate::b::c::Y", "super::d"]
    );
    let code_paths: Vec<String> = crate_paths(&code).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        code_paths,
        ["crate::f::g"],
        "the comment and the string are not code; groups are read as `use` trees"
    );
}

#[test]
fn doc_links_in_comments_are_edges() {
    let (code, comments) = split_comments(
        "//! Served by [`crate::observe`] and [`Id`](super::ids::Id).\n\
         /// See [`self::inner::X`], not a::super::b, nor \"crate::quoted\".\n\
         let s = \"crate::in_a_string\";\n",
    );
    assert!(crate_paths(&code).is_empty(), "comments are not code");
    let mut paths: Vec<String> = comment_paths(&comments)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "crate::observe",
            "crate::quoted",
            "self::inner::X",
            "super::ids::Id"
        ],
        "a path in a comment counts, one in a string literal of code does not"
    );
}

#[test]
fn a_cycle_is_found_and_described() {
    fn edge(graph: &mut Graph, a: &str, b: &str) {
        graph
            .entry(a.to_owned())
            .or_default()
            .insert(b.to_owned(), format!("{a}.rs:1"));
        graph.entry(b.to_owned()).or_default();
    }
    let mut graph: Graph = BTreeMap::new();
    edge(&mut graph, "api", "auth");
    edge(&mut graph, "auth", "webhooks");
    edge(&mut graph, "webhooks", "views");
    assert_eq!(find_cycle(&graph), None);
    edge(&mut graph, "webhooks", "api");
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(cycle, ["api", "auth", "webhooks", "api"]);
    assert!(describe(&graph, &cycle).contains("webhooks -> api: webhooks.rs:1"));
}
