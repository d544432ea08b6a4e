//! Emotion steering on a real model (SmolLM2, the smallest): `elpis-server
//! vectors` writes the four quadrant files; a server with them reports
//! steering on, its layers and strength; strength 0 writes exactly what no
//! steering writes; a strong mood changes the reply; steering off and
//! another model's vectors are reported with the reason; an interrupted
//! computation leaves no file behind.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{instruct_model_path, model_path, Server};
use serde_json::{json, Value};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("elpis-steering-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn vectors_command(model: &str, dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elpis-server"));
    cmd.arg("vectors")
        .env("ELPIS_MODEL_PATH", model)
        .env("ELPIS_EMOTION_VECTORS_PATH", dir)
        .env("ELPIS_MODEL_N_THREADS", "1")
        .env_remove("ELPIS_QUIET")
        .stdin(Stdio::null());
    cmd
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn steering(server: &mut Server) -> Value {
    server.tool("get_capabilities", json!({})).ok()
}

fn reply(server: &mut Server, text: &str) -> String {
    let r = server.tool("generate", json!({"messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0}));
    r.ok()["content"].as_str().unwrap().to_string()
}

#[test]
fn vectors_are_computed_loaded_reported_and_steer() {
    let model = instruct_model_path("smollm2");
    let dir = temp_dir("vectors");
    let out = vectors_command(&model, &dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vectors failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(files(&dir), ["calm.gguf", "depleted.gguf", "excited.gguf", "frustrated.gguf"]);
    assert!(stdout.contains("mean projection") && stdout.contains("excited"), "{stdout}");
    let dir_s = dir.display().to_string();

    // On, with the default layers and the configured strength.
    let mut on = Server::start(&[
        ("ELPIS_MODEL_PATH", model.as_str()),
        ("ELPIS_EMOTION_STEERING", "auto"),
        ("ELPIS_EMOTION_VECTORS_PATH", dir_s.as_str()),
    ]);
    let caps = steering(&mut on);
    assert_eq!(caps["emotional_steering"], true, "{caps}");
    assert_eq!(caps["steering"]["state"], "on");
    assert_eq!(caps["steering_strength"], 1.0);
    let layers = caps["steering"]["layers"].as_array().unwrap().clone();
    assert!(layers[0].as_u64().unwrap() >= 1 && layers[0].as_u64() <= layers[1].as_u64(), "{caps}");
    let prompt = "Describe your morning in two sentences.";
    // A strongly negative mood, then a strongly positive one: the replies differ.
    for _ in 0..3 {
        on.tool("update_emotion", json!({"event_type": "frustration", "intensity": 2.0})).ok();
    }
    let low = reply(&mut on, prompt);
    on.tool("reset_emotion", json!({})).ok();
    for _ in 0..3 {
        on.tool("update_emotion", json!({"event_type": "insight", "intensity": 2.0})).ok();
    }
    let high = reply(&mut on, prompt);
    assert_ne!(low, high, "the mood did not change the greedy reply");
    let applied = steering(&mut on)["steering"]["applied"].clone();
    assert!(applied[0].as_f64().unwrap() > 0.5, "excited coefficient not applied: {applied}");
    on.shutdown();

    // Strength 0 is exactly no steering; the layers can be chosen.
    let mut zero = Server::start(&[
        ("ELPIS_MODEL_PATH", model.as_str()),
        ("ELPIS_EMOTION_STEERING", "auto"),
        ("ELPIS_EMOTION_VECTORS_PATH", dir_s.as_str()),
        ("ELPIS_EMOTION_STEERING_STRENGTH", "0"),
        ("ELPIS_EMOTION_STEERING_LAYERS", "3-5"),
    ]);
    let caps = steering(&mut zero);
    assert_eq!((caps["emotional_steering"].clone(), caps["steering_strength"].clone()), (json!(true), json!(0.0)));
    assert_eq!(caps["steering"]["layers"], json!([3, 5]));
    let zero_reply = reply(&mut zero, prompt);
    zero.shutdown();
    let mut off = Server::start(&[("ELPIS_MODEL_PATH", model.as_str()), ("ELPIS_EMOTION_STEERING", "off")]);
    let caps = steering(&mut off);
    assert_eq!(caps["emotional_steering"], false);
    assert!(caps["steering"]["reason"].as_str().unwrap().contains("off"), "{caps}");
    assert_eq!(reply(&mut off, prompt), zero_reply, "strength 0 changed the greedy reply");
    off.shutdown();

    // Another model's vectors are refused, naming both shapes.
    let gemma = model_path().display().to_string();
    let mut other = Server::start(&[
        ("ELPIS_MODEL_PATH", gemma.as_str()),
        ("ELPIS_EMOTION_STEERING", "auto"),
        ("ELPIS_EMOTION_VECTORS_PATH", dir_s.as_str()),
    ]);
    let caps = steering(&mut other);
    assert_eq!(caps["emotional_steering"], false);
    let reason = caps["steering"]["reason"].as_str().unwrap();
    assert!(reason.contains("n_embd 576") && reason.contains("n_embd 640"), "{reason}");
    other.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The files a computation left in `dir`: each one must be a complete,
/// loadable vector file under its final name (a write is a temporary file
/// renamed when complete), never a partial one.
fn only_complete_files(dir: &std::path::Path) -> Vec<String> {
    let names = files(dir);
    for name in &names {
        assert!(
            ["calm.gguf", "depleted.gguf", "excited.gguf", "frustrated.gguf"].contains(&name.as_str()),
            "a partial or foreign file was left behind: {name} in {names:?}"
        );
        elpis::engine::read_gguf(&dir.join(name)).unwrap_or_else(|e| panic!("{name} is not a complete vector file: {e}"));
    }
    names
}

/// Killed in the middle of computing, `elpis-server vectors` leaves no file;
/// a server computing them in the background answers quick calls meanwhile.
/// Each is shown only when the kill (or the quick call) provably landed
/// while the computation ran: a run that finished first (a fast machine)
/// shows nothing and is tried again.
#[test]
fn an_interrupted_computation_leaves_no_file() {
    let model = instruct_model_path("smollm2");
    let mut shown = false;
    for attempt in 1..=3 {
        let dir = temp_dir(&format!("interrupted-{attempt}"));
        let log = dir.with_extension("stderr");
        let mut child = vectors_command(&model, &dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Once it reports its first texts read, it is computing: kill it.
        let deadline = Instant::now() + Duration::from_secs(300);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("texts read") && child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no progress from `vectors`");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let left = only_complete_files(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&log);
        if status.success() {
            eprintln!("attempt {attempt}: the computation finished before the kill landed");
            continue;
        }
        assert!(left.is_empty(), "killed while computing, it left {left:?}");
        shown = true;
        break;
    }
    assert!(shown, "in three tries `vectors` always finished before it could be killed");

    // A server computing missing vectors in the background answers quick
    // calls meanwhile; stopping it leaves no partial file either.
    let mut shown = false;
    for attempt in 1..=3 {
        let cache = temp_dir(&format!("cache-{attempt}"));
        let cache_s = cache.display().to_string();
        let mut server = Server::start(&[
            ("ELPIS_MODEL_PATH", model.as_str()),
            ("ELPIS_EMOTION_STEERING", "auto"),
            ("ELPIS_CACHE_DIR", cache_s.as_str()),
        ]);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut state = steering(&mut server)["steering"]["state"].as_str().unwrap().to_string();
        while state == "identifying" {
            assert!(Instant::now() < deadline, "still identifying the model");
            std::thread::sleep(Duration::from_millis(50));
            state = steering(&mut server)["steering"]["state"].as_str().unwrap().to_string();
        }
        let computing_before = state == "computing";
        server.tool("get_emotion", json!({})).ok();
        let computing_after = steering(&mut server)["steering"]["state"] == "computing";
        server.shutdown();
        let vectors = cache.join("vectors");
        if let Ok(entries) = std::fs::read_dir(&vectors) {
            for entry in entries {
                only_complete_files(&entry.unwrap().path());
            }
        }
        let _ = std::fs::remove_dir_all(&cache);
        if computing_before && computing_after {
            shown = true;
            break;
        }
        eprintln!("attempt {attempt}: the computation was over before the quick call could be checked against it");
    }
    assert!(shown, "in three tries no quick call was answered while the vectors were computing");
}
