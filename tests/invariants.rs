//! The threading promise, checked on the source: only the engine imports
//! llama.cpp, and nothing in `src/` moves work to another thread; and the
//! layout's promise: imports between modules run one way.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 5, "found too few sources under {}", root.display());
    files.into_iter().map(|p| {
        let text = std::fs::read_to_string(&p).unwrap();
        (p, text)
    }).collect()
}

#[test]
fn only_the_engine_imports_llama_cpp() {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let offenders: Vec<_> = sources()
        .into_iter()
        .filter(|(p, text)| !p.starts_with(&engine) && text.contains("llama_cpp_2"))
        .map(|(p, _)| p)
        .collect();
    assert!(offenders.is_empty(), "llama_cpp_2 used outside src/engine: {offenders:?}");
}

#[test]
fn no_work_leaves_the_runtime_thread() {
    let forbidden = ["spawn_blocking", "std::thread::spawn", "thread::Builder", "block_in_place"];
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        for (n, line) in text.lines().enumerate() {
            if forbidden.iter().any(|f| line.contains(f)) {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "thread escapes:\n{}", offenders.join("\n"));
}

#[test]
fn the_runtime_is_current_thread() {
    let cli = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli/mod.rs")).unwrap();
    assert!(cli.contains("new_current_thread()"));
    for (path, text) in sources() {
        assert!(!text.contains("new_multi_thread"), "{} builds a multi-thread runtime", path.display());
    }
}

/// The top-level module a source file belongs to (`src/server/mcp.rs` -> `server`).
fn module_of(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = path.strip_prefix(&root).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// Imports run one way: main -> cli -> server / harness -> engine, emotion,
/// config -> prompt. Each module may use only those of lower rank (or its own).
#[test]
fn imports_run_one_way() {
    let rank = |m: &str| match m {
        "main" | "lib" => 6,
        "cli" => 5,
        "server" | "harness" => 4,
        "session" | "logging" => 3,
        "config" => 2,
        "engine" | "emotion" => 1,
        "prompt" => 0,
        other => panic!("module {other} has no place in the layering: add it to this test and to lib.rs's # Layout"),
    };
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        let from = module_of(&path);
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                let tail = &rest[at + "crate::".len()..];
                let to: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &tail[to.len()..];
                if to.is_empty() || to == from {
                    continue;
                }
                if rank(&to) >= rank(&from) {
                    offenders.push(format!("{}:{}: {from} uses {to}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "imports against the layering:\n{}", offenders.join("\n"));
}

/// The engine's rooms: no file over about 500 lines, and no two of its
/// files that import each other, directly or around a loop.
#[test]
fn the_engine_is_split_without_cycles() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let name = |p: &Path| p.file_stem().unwrap().to_string_lossy().to_string();
    let names: Vec<String> = files.iter().map(|p| name(p)).collect();
    let mut edges: Vec<(String, String)> = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let lines = text.lines().count();
        assert!(lines <= 520, "{} has {lines} lines: split it by what it owns", path.display());
        let from = name(path);
        for line in text.lines() {
            let mut rest = line;
            while let Some(at) = rest.find("super::") {
                let tail = &rest[at + "super::".len()..];
                let to: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &tail[to.len()..];
                if names.contains(&to) && to != from && from != "mod" {
                    edges.push((from.clone(), to));
                }
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(n: &str, edges: &[(String, String)], path: &mut Vec<String>, done: &mut Vec<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            return Some(path[at..].to_vec());
        }
        if done.iter().any(|d| d == n) {
            return None;
        }
        path.push(n.to_string());
        for (_, to) in edges.iter().filter(|(f, _)| f == n) {
            if let Some(cycle) = visit(to, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.push(n.to_string());
        None
    }
    let mut done = Vec::new();
    for n in &names {
        if let Some(cycle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            panic!("engine files import each other in a loop: {}", cycle.join(" -> "));
        }
    }
}

/// The prompt cache names the llama.cpp build its saved states come from:
/// that name must be the build Cargo.lock pins (a state of another build
/// is never loaded, so a stale name would load one).
#[test]
fn the_prompt_cache_names_the_locked_llama_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let at = lock.find("name = \"llama-cpp-sys-2\"").expect("llama-cpp-sys-2 in Cargo.lock");
    let version = lock[at..].lines().nth(1).unwrap().trim().trim_start_matches("version = ").trim_matches('"');
    let cache = std::fs::read_to_string(root.join("src/engine/prompt_cache.rs")).unwrap();
    assert!(cache.contains(&format!("\"llama-cpp-sys-2 {version}\"")), "src/engine/prompt_cache.rs's LLAMA_BUILD is not llama-cpp-sys-2 {version}");
}
