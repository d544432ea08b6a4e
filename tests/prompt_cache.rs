//! The prompt cache through the real binary: a restarted server reads a
//! known prompt from disk; corrupt, truncated and foreign entries are
//! skipped (with a warning) and removed, never loaded; the disk bound
//! holds; a save cut short leaves nothing that is ever loaded; a
//! conversation that lost its slot gets its prefix back from RAM; and the
//! KV cache can be quantized.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn cache_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("elpis-prompt-cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn server(dir: &Path, extra: &[(&str, &str)]) -> Server {
    let dir = dir.display().to_string();
    let mut env = vec![("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_CACHE_DIR", dir.as_str()), ("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "256")];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// A long system prompt (a few hundred tokens), as Psyche's is.
fn system(n: usize) -> String {
    (0..40).map(|i| format!("Rule {i} of persona {n}: answer kindly and briefly about topic {i}. ")).collect()
}

fn ask(s: &mut Server, persona: usize, user: &str) -> Value {
    let messages = json!([{"role": "system", "content": system(persona)}, {"role": "user", "content": user}]);
    s.tool("generate", json!({"messages": messages, "max_tokens": 4, "temperature": 0})).ok()
}

/// The saved entries (`.kv` files) under the cache, and any temporary file.
fn entries(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut kv = Vec::new();
    let mut partial = Vec::new();
    for model in std::fs::read_dir(dir.join("prompt-cache")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(model.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "kv") {
                kv.push(p);
            } else {
                partial.push(p);
            }
        }
    }
    kv.sort();
    (kv, partial)
}

fn cached(out: &Value) -> u64 {
    out["usage"]["cached_tokens"].as_u64().unwrap()
}

#[test]
fn a_restarted_server_reads_a_known_prompt_from_disk() {
    let dir = cache_dir("restart");
    let mut first = server(&dir, &[]);
    let cold = ask(&mut first, 1, "Hello.");
    assert_eq!(cached(&cold), 0, "{cold}");
    first.shutdown();
    let (kv, partial) = entries(&dir);
    assert_eq!((kv.len(), partial.len()), (1, 0), "one entry, written whole: {kv:?} {partial:?}");
    let mut second = server(&dir, &[]);
    let warm = ask(&mut second, 1, "Good morning.");
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&warm) > prompt / 2, "the system prompt came from disk: {warm}");
    let caps = second.tool("get_capabilities", json!({})).ok();
    assert!(caps["prompt_cache"]["disk_entries"].as_u64().unwrap() >= 1, "{caps}");
    second.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_truncated_and_foreign_entries_are_skipped_and_removed() {
    let dir = cache_dir("bad");
    let mut first = server(&dir, &[]);
    ask(&mut first, 2, "Hello.");
    first.shutdown();
    let (kv, _) = entries(&dir);
    assert_eq!(kv.len(), 1);
    let good = std::fs::read(&kv[0]).unwrap();
    let folder = kv[0].parent().unwrap().to_path_buf();
    // A payload byte flipped (the header still reads), and a file cut short.
    let mut flipped = good.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x5a;
    std::fs::write(&kv[0], &flipped).unwrap();
    std::fs::write(folder.join("0123456789abcdef0123456789abcdef.kv"), &good[..good.len() / 2]).unwrap();
    std::fs::write(folder.join("not-even-a-header.kv"), b"hello").unwrap();
    let mut second = server(&dir, &[]);
    let out = ask(&mut second, 2, "Hello again.");
    assert!(cached(&out) < 16, "a corrupt entry was loaded: {out}");
    let log = second.stderr_all();
    assert!(log.contains("checksum does not match") && log.contains("truncated"), "{log}");
    second.shutdown();
    let (kv, partial) = entries(&dir);
    assert!(!kv.iter().any(|p| std::fs::read(p).unwrap() == flipped), "the corrupt entry is gone");
    assert!(!folder.join("0123456789abcdef0123456789abcdef.kv").exists() && !folder.join("not-even-a-header.kv").exists());
    assert!(partial.is_empty(), "{partial:?}");
    // Other settings (context length, KV type): a saved entry is not theirs.
    let before = entries(&dir).0.len();
    assert!(before >= 1);
    let mut other = server(&dir, &[("ELPIS_MODEL_CONTEXT_LENGTH", "2048")]);
    let out = ask(&mut other, 2, "Hello.");
    assert!(cached(&out) < 16, "an entry of other settings was loaded: {out}");
    assert!(other.stderr_all().contains("another model, context or build"), "{}", other.stderr_all());
    other.shutdown();
    // And an entry copied into another model's folder is foreign there.
    let smollm2 = instruct_model_path("smollm2");
    let mut third = server(&dir, &[("ELPIS_MODEL_PATH", smollm2.as_str())]);
    ask(&mut third, 2, "Hello.");
    third.shutdown();
    let (kv, _) = entries(&dir);
    let gemma_entry = kv.iter().find(|p| p.parent() == Some(folder.as_path())).expect("a Gemma entry").clone();
    let smollm2_folder = kv.iter().map(|p| p.parent().unwrap().to_path_buf()).find(|f| *f != folder).expect("smollm2 saved too");
    let foreign = smollm2_folder.join("ffffffffffffffffffffffffffffffff.kv");
    std::fs::copy(&gemma_entry, &foreign).unwrap();
    let mut fourth = server(&dir, &[("ELPIS_MODEL_PATH", smollm2.as_str())]);
    fourth.tool("get_emotion", json!({})).ok();
    assert!(fourth.stderr_all().contains("another model, context or build"), "{}", fourth.stderr_all());
    fourth.shutdown();
    assert!(!foreign.exists(), "the foreign entry was removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_disk_bound_holds_and_a_cut_save_is_never_loaded() {
    let dir = cache_dir("bound");
    // Each entry here is over 10 MiB: a 30 MiB bound keeps two of four.
    for persona in 0..4 {
        let mut s = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "30")]);
        ask(&mut s, 10 + persona, "Hello.");
        s.shutdown();
        let (kv, partial) = entries(&dir);
        let total: u64 = kv.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
        assert!(total <= 30 << 20, "{total} bytes over the 30 MiB bound: {kv:?}");
        assert!(!kv.is_empty(), "the newest entry fits");
        assert!(partial.is_empty(), "{partial:?}");
    }
    assert!(entries(&dir).0.len() < 4, "least recently used entries went");
    // A save cut short by a kill: the temporary file of a process that is
    // gone is never loaded, and removed at the next start.
    let (kv, _) = entries(&dir);
    let folder = kv[0].parent().unwrap().to_path_buf();
    let cut = folder.join(format!(".{}.999999999.partial", kv[0].file_name().unwrap().to_string_lossy()));
    let bytes = std::fs::read(&kv[0]).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let mut s = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "30")]);
    ask(&mut s, 99, "Hello.");
    s.shutdown();
    assert!(!cut.exists(), "a dead writer's temporary file stayed");
    // Killed outright right after its work (perhaps while saving): what it
    // leaves is whole or nothing.
    let mut k = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "30")]);
    ask(&mut k, 98, "Hello.");
    k.kill_signal("KILL");
    let _ = k.wait_exit(std::time::Duration::from_secs(60));
    let mut s = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "30")]);
    let out = ask(&mut s, 98, "Hello again.");
    assert!(!s.stderr_all().contains("checksum does not match"), "{}", s.stderr_all());
    eprintln!("after a kill: {} cached tokens", cached(&out));
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A disk that refuses the save (here a file-size limit, whose EFBIG takes
/// the same path as ENOSPC): a warning, no entry and no temporary file
/// left, and serving goes on.
#[test]
fn a_full_disk_while_saving_is_a_warning_and_serving_goes_on() {
    let dir = cache_dir("full");
    let path = dir.display().to_string();
    // Writes past 1 MiB fail (SIGXFSZ ignored, so they fail rather than kill).
    let wrapper = ["sh", "-c", "trap '' XFSZ; exec prlimit --fsize=1048576 \"$0\" \"$@\""];
    let env = [("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_CACHE_DIR", path.as_str()), ("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "256")];
    let mut s = Server::start_under(&wrapper, &env);
    for persona in 0..3 {
        let out = ask(&mut s, 40 + persona, "Hello.");
        assert!(out["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{out}");
    }
    // Whatever saves have run so far failed.
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["prompt_cache"]["disk_entries"], 0, "{caps}");
    let again = ask(&mut s, 40, "Hello.");
    assert!(cached(&again) > 0, "the RAM tier still serves: {again}");
    s.close_stdin();
    let status = s.wait_exit(std::time::Duration::from_secs(120));
    let stderr = s.stderr_all();
    assert!(status.success(), "{status:?}\n{stderr}");
    let warning = stderr.lines().find(|l| l.contains("cannot save a prompt"));
    let warning = warning.unwrap_or_else(|| panic!("no warning for the refused save:\n{stderr}"));
    eprintln!("{warning}");
    let (kv, partial) = entries(&dir);
    assert!(kv.is_empty() && partial.is_empty(), "a refused save left files: {kv:?} {partial:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three conversations on two slots: the one that lost its slot gets its
/// prefix back from RAM when it returns.
#[test]
fn three_conversations_on_two_slots_come_back_from_ram() {
    let dir = cache_dir("ram");
    let mut s = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0")]);
    let first: Vec<Value> = (0..3).map(|p| ask(&mut s, 20 + p, "Round one.")).collect();
    for out in &first {
        assert!(cached(out) < 16, "{out}");
    }
    for p in 0..3 {
        let out = ask(&mut s, 20 + p, "Round two.");
        let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(cached(&out) > prompt / 2, "conversation {p} came back cold: {out}");
    }
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert!(caps["prompt_cache"]["ram_entries"].as_u64().unwrap() >= 1, "{caps}");
    assert_eq!(caps["prompt_cache"]["disk_entries"], 0, "{caps}");
    for slot in caps["slot_states"].as_array().unwrap() {
        assert_eq!(slot["kv_pos_max"].as_i64().unwrap(), slot["tokens"].as_i64().unwrap() - 1, "{slot}");
    }
    s.shutdown();
    assert!(entries(&dir).0.is_empty(), "nothing on disk with the disk tier off");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The RAM tier gives way to the rest of the process: the server reports
/// its ceiling (model + KV + the tier's cap + 64 MiB), the tier never holds
/// more than its cap, and the process stays near the ceiling (or the tier
/// has given up everything).
#[test]
fn the_ram_tier_keeps_the_process_under_its_ceiling() {
    let dir = cache_dir("ceiling");
    let mut s = server(&dir, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0"), ("ELPIS_SERVER_PROMPT_CACHE_RAM_MIB", "160")]);
    for persona in 0..8 {
        ask(&mut s, 60 + persona, "Hello.");
    }
    let caps = s.tool("get_capabilities", json!({})).ok();
    let cache = &caps["prompt_cache"];
    let fixed = caps["model_size_bytes"].as_u64().unwrap() + caps["kv_bytes"].as_u64().unwrap();
    assert_eq!(cache["ram_cap_mib"], 160, "{cache}");
    assert_eq!(cache["ceiling_mib"].as_u64().unwrap(), (fixed + (160 << 20) + (64 << 20)) >> 20, "{caps}");
    assert!(cache["ram_mib"].as_f64().unwrap() <= 160.0, "{cache}");
    let rss_mib = s.rss_kib() >> 10;
    let ceiling = cache["ceiling_mib"].as_u64().unwrap();
    eprintln!("RSS {rss_mib} MiB, ceiling {ceiling} MiB, the RAM tier {cache}");
    assert!(rss_mib <= ceiling + 64 || cache["ram_entries"] == 0, "RSS {rss_mib} MiB over the ceiling {ceiling} MiB with entries kept: {cache}");
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_quantized_kv_cache_serves() {
    let dir = cache_dir("q8");
    let mut sizes = Vec::new();
    for kind in ["f16", "q8_0", "q4_0"] {
        let mut s = server(&dir, &[("ELPIS_MODEL_KV_CACHE_TYPE", kind)]);
        let caps = s.tool("get_capabilities", json!({})).ok();
        assert_eq!(caps["kv_cache_type"], kind, "{caps}");
        sizes.push(caps["kv_bytes"].as_u64().unwrap());
        let out = s.tool("generate", greedy_args("Name a colour.", 8)).ok();
        assert!(out["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{out}");
        s.shutdown();
    }
    // The reported size follows the type: q8_0 about half of f16, q4_0 about a quarter.
    assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2] && sizes[2] > 0, "kv_bytes f16, q8_0, q4_0: {sizes:?}");
    assert!((sizes[1] as f64 / sizes[0] as f64 - 34.0 / 64.0).abs() < 0.01, "{sizes:?}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_elpis-server"))
        .env("ELPIS_MODEL_PATH", model_path())
        .env("ELPIS_MODEL_KV_CACHE_TYPE", "q3")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("model.kv_cache_type"));
    let _ = std::fs::remove_dir_all(&dir);
}
