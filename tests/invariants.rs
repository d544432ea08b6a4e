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

/// The module a source file is (`src/server/core/inference.rs` ->
/// `server::core::inference`, `src/server/mcp/mod.rs` -> `server::mcp`).
fn module_path(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rel = path.strip_prefix(&root).unwrap().with_extension("");
    let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    let parts = match parts.last().map(String::as_str) {
        Some("mod") | Some("lib") | Some("main") => &parts[..parts.len() - 1],
        _ => &parts[..],
    };
    parts.join("::")
}

/// Which files each file imports: `crate::a::b::c` and `super::x` paths,
/// each resolved to the longest module that exists (comments skipped).
fn file_imports() -> Vec<(String, Vec<String>)> {
    let files = sources();
    let modules: Vec<String> = files.iter().map(|(p, _)| module_path(p)).collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| modules.contains(m))
    };
    let parent = |m: &str| m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string());
    let mut out = Vec::new();
    for (path, text) in &files {
        let me = module_path(path);
        let mut to = Vec::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (marker, base) in [("crate::", String::new()), ("super::", parent(&me))] {
                let mut rest = line;
                while let Some(at) = rest.find(marker) {
                    let tail = &rest[at + marker.len()..];
                    let path: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
                    rest = &tail[path.len()..];
                    let path = path.trim_end_matches(':');
                    let full = if base.is_empty() { path.to_string() } else { format!("{base}::{path}") };
                    if let Some(m) = resolve(&full) {
                        // A file's own ancestors (mod.rs hubs) are its home, not an import.
                        if m != me && !me.starts_with(&format!("{m}::")) && !to.contains(&m) {
                            to.push(m);
                        }
                    }
                }
            }
        }
        // A hub's re-exports (`pub use args::{..}` in a mod.rs) lead on to
        // its children: importing the hub imports them.
        if path.file_stem().is_some_and(|s| s == "mod") {
            for line in text.lines() {
                if let Some(rest) = line.trim_start().strip_prefix("pub use ") {
                    let child: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if let Some(m) = resolve(&format!("{me}::{child}")).filter(|m| *m != me && !to.contains(m)) {
                        to.push(m);
                    }
                }
            }
        }
        out.push((me, to));
    }
    out
}

/// No two files of the crate import each other, directly or around a loop.
#[test]
fn no_files_import_each_other_in_a_loop() {
    let edges = file_imports();
    fn visit(n: &str, edges: &[(String, Vec<String>)], path: &mut Vec<String>, done: &mut Vec<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.iter().any(|d| d == n) {
            return None;
        }
        path.push(n.to_string());
        for (_, tos) in edges.iter().filter(|(f, _)| f == n) {
            for to in tos {
                if let Some(cycle) = visit(to, edges, path, done) {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        done.push(n.to_string());
        None
    }
    let reads = |from: &str, to: &str| edges.iter().any(|(m, tos)| m == from && tos.iter().any(|t| t == to));
    assert!(reads("server::core::inference", "server::core::calls") && reads("engine::scheduler", "engine::step"), "the import reader found too little");
    let mut done = Vec::new();
    for (n, _) in &edges {
        if let Some(cycle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            panic!("files import each other in a loop: {}", cycle.join(" -> "));
        }
    }
}

/// The server's rooms: a protocol-free core, two faces over it (MCP and
/// OpenAI), the transports under them and the process's lifetime on top.
/// Each may import only rooms of lower rank (or its own).
#[test]
fn the_server_is_a_core_with_faces_and_transports() {
    let room = |m: &str| -> Option<(u8, String)> {
        let rest = m.strip_prefix("server::")?;
        let first = rest.split("::").next().unwrap_or_default().to_string();
        let rank = match first.as_str() {
            "core" => 0,
            "mcp" | "openai" => 1,
            "transport" | "upstream" => 2,
            "http" | "bridge" => 3,
            "serve" => 4,
            other => panic!("server::{other} has no room: add it to this test and to server/mod.rs's doc"),
        };
        Some((rank, first))
    };
    let mut offenders = Vec::new();
    for (from, tos) in file_imports() {
        let Some((rank, home)) = room(&from) else { continue };
        for to in tos {
            if let Some((to_rank, to_home)) = room(&to) {
                if to_home != home && to_rank >= rank {
                    offenders.push(format!("{from} imports {to}"));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "server imports against core <- faces <- transports <- serve:\n{}", offenders.join("\n"));
}

/// The engine's rooms stay small: no file over about 500 lines.
#[test]
fn the_engine_files_stay_small() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    for path in &files {
        let lines = std::fs::read_to_string(path).unwrap().lines().count();
        assert!(lines <= 520, "{} has {lines} lines: split it by what it owns", path.display());
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
