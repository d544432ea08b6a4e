//! The threading promise, checked on the source: only the engine imports
//! llama.cpp, and nothing in `src/` moves work to another thread.

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
    let serve = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/serve.rs")).unwrap();
    assert!(serve.contains("new_current_thread()"));
    assert!(!serve.contains("new_multi_thread"));
}
