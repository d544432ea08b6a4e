//! The bench's prompt-cache rows: time to first token after a restart
//! (Psyche's kind of system prompt and a user turn) against a cold server
//! whose cache was removed, a conversation returning to a server that gave
//! its slot to others, and the KV cache quantized (`q8_0`) against `f16`:
//! memory, decode speed, and whether greedy replies change.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::{generate_timed, tool, tps_between_marks};
use crate::harness::client::McpClient;

/// A system prompt the size and shape of the one Psyche's core builds (its
/// base prompt, the reasoning section and the tool section: about 900
/// tokens on the default model).
fn psyche_system() -> String {
    let mut s = String::from(
        "You are Psyche, a thoughtful assistant with a memory, moods and tools. You remember what the user told you, \
         you notice how they feel, and you answer honestly and briefly. When you are unsure, you say so.\n\n\
         ## How to reason\nThink step by step before you answer. Break a hard question into parts, answer each part, \
         then put the parts together. Check your answer against what the user asked. Prefer plain words.\n\n\
         ## Tools\nYou can call a tool by writing a fenced block tagged tool_call holding {\"name\": ..., \"arguments\": ...}, \
         and then STOP. The result comes back in the next message. The tools:\n",
    );
    let tools = [
        ("read_file", "Read a file from the user's workspace", "path: the file's path relative to the workspace"),
        ("write_file", "Write a file in the user's workspace", "path: where; content: the whole new text"),
        ("list_directory", "List the files of a folder", "path: the folder"),
        ("search_files", "Find text in the workspace's files", "pattern: a regular expression; path: where to look"),
        ("run_command", "Run a shell command and read its output", "command: the command line; timeout: seconds"),
        ("recall_memory", "Search your long-term memory", "query: what to look for; limit: how many memories"),
        ("store_memory", "Remember something for later", "content: what to remember; importance: 0 to 1"),
        ("web_search", "Search the web", "query: the words to search for"),
        ("fetch_url", "Read a web page", "url: the page's address"),
        ("get_time", "The current date and time", "timezone: an IANA name"),
    ];
    for (name, what, args) in tools {
        s.push_str(&format!(
            "- {name}: {what}. Arguments: {args}. Use it when the user's request needs it, not otherwise; explain \
             what you found in your own words afterwards.\n"
        ));
    }
    s.push_str(
        "\n## Style\nBe warm but not effusive. Use short paragraphs. Quote code in fenced blocks with the language named. \
         Never invent a tool result: wait for it. If a tool fails, say what failed and what you will try instead.\n",
    );
    s
}

fn turn(system: &str, user: &str) -> Value {
    json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}], "max_tokens": 1, "temperature": 0})
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct CacheRows {
    pub restart_cold_ms: f64,
    pub restart_warm_ms: f64,
    pub restart_ratio: f64,
    pub restart_prompt_tokens: f64,
    pub returning_cold_ms: f64,
    pub returning_ms: f64,
    pub returning_ratio: f64,
    pub kv_f16_mib: f64,
    pub kv_q8_mib: f64,
    pub kv_ratio: f64,
    pub decode_f16_tps: f64,
    pub decode_q8_tps: f64,
    pub decode_q8_ratio: f64,
    /// 1 when the greedy replies were the same text.
    pub q8_same_text: f64,
}

async fn spawn(binary: &Path, env: &[(String, String)], cache: &Path, model: &Path, extra: &[(&str, &str)]) -> anyhow::Result<McpClient> {
    let mut env = env.to_vec();
    env.push(("ELPIS_CACHE_DIR".into(), cache.display().to_string()));
    env.push(("ELPIS_MODEL_PATH".into(), model.display().to_string()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut client = McpClient::spawn(binary, &[], &env, None)?;
    client.initialize(Duration::from_secs(120)).await.map_err(anyhow::Error::msg)?;
    Ok(client)
}

async fn ttft_ms(client: &mut McpClient, args: Value) -> anyhow::Result<(f64, Value)> {
    let t = Instant::now();
    let out = tool(client, "generate", args).await?;
    Ok((t.elapsed().as_secs_f64() * 1000.0, out))
}

async fn stop(mut client: McpClient) {
    client.close_stdin();
    client.wait_exit(Duration::from_secs(60)).await;
}

fn fresh_dir(name: &str, model_cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("elpis-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The model's identity memo and vectors are not what is measured: share them.
    for sub in ["identity", "vectors"] {
        let from = model_cache.join(sub);
        if from.exists() {
            copy_dir(&from, &dir.join(sub))?;
        }
    }
    Ok(dir)
}

/// MiB of the saved prompt states (`*.kv`) below `dir`.
fn saved_mib(dir: &Path) -> f64 {
    let mut bytes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "kv") {
                bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    bytes as f64 / (1024.0 * 1024.0)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

pub async fn rows(binary: &Path, env: &[(String, String)], model: &Path, model_cache: &Path) -> anyhow::Result<CacheRows> {
    let mut r = CacheRows::default();
    let system = psyche_system();

    // Restart: one server works and stops; the next starts warm. Cold: the cache removed.
    let warm_dir = fresh_dir("restart", model_cache)?;
    let mut first = spawn(binary, env, &warm_dir, model, &[]).await?;
    ttft_ms(&mut first, turn(&system, "Good evening. How was your day?")).await?;
    stop(first).await;
    let mut second = spawn(binary, env, &warm_dir, model, &[]).await?;
    let (warm, out) = ttft_ms(&mut second, turn(&system, "Good morning. What shall we work on today?")).await?;
    stop(second).await;
    let cold_dir = fresh_dir("cold", model_cache)?;
    let mut cold = spawn(binary, env, &cold_dir, model, &[]).await?;
    let (cold_ms, _) = ttft_ms(&mut cold, turn(&system, "Good morning. What shall we work on today?")).await?;
    stop(cold).await;
    (r.restart_warm_ms, r.restart_cold_ms) = (warm, cold_ms);
    r.restart_ratio = warm / cold_ms;
    r.restart_prompt_tokens = out["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);

    // Three conversations alternating on two slots.
    let mut s = spawn(binary, env, &cold_dir, model, &[("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0")]).await?;
    let systems: Vec<String> = (0..3).map(|k| format!("Conversation {k}: {system}")).collect();
    let (mut cold_sum, mut back_sum) = (0.0, 0.0);
    for (k, sys) in systems.iter().enumerate() {
        cold_sum += ttft_ms(&mut s, turn(sys, &format!("First turn of conversation {k}."))).await?.0;
    }
    for (k, sys) in systems.iter().enumerate() {
        back_sum += ttft_ms(&mut s, turn(sys, &format!("Second turn of conversation {k}."))).await?.0;
    }
    stop(s).await;
    (r.returning_cold_ms, r.returning_ms) = (cold_sum / 3.0, back_sum / 3.0);
    r.returning_ratio = r.returning_ms / r.returning_cold_ms;

    // f16 against q8_0: the KV's memory once a long prompt fills it, decode speed, the greedy text.
    let long = (0..110).map(|i| format!("Note {i}: the garden, a parser bug and a book about stars on day {}. ", i % 30)).collect::<String>();
    let story = json!({"messages": [{"role": "system", "content": "You are a storyteller."},
        {"role": "user", "content": "Write a long story about a lighthouse keeper."}], "max_tokens": 128, "temperature": 0});
    let mut kv = Vec::new();
    for kind in ["f16", "q8_0"] {
        // The KV cells' own size: the state the server saves at shutdown
        // for the same prompt and reply (RSS growth would count compute
        // buffers and the allocator too).
        let dir = fresh_dir(&format!("kv-{kind}"), model_cache)?;
        let mut s = spawn(binary, env, &dir, model, &[("ELPIS_MODEL_KV_CACHE_TYPE", kind)]).await?;
        tool(&mut s, "generate", turn(&long, "What do you remember?")).await?;
        let (out, _, marks) = generate_timed(&mut s, story.clone(), kind).await?;
        stop(s).await;
        kv.push((saved_mib(&dir.join("prompt-cache")), tps_between_marks(&marks), out["content"].clone()));
        let _ = std::fs::remove_dir_all(&dir);
    }
    r.kv_f16_mib = kv[0].0;
    r.kv_q8_mib = kv[1].0;
    r.kv_ratio = r.kv_q8_mib / r.kv_f16_mib.max(1e-9);
    (r.decode_f16_tps, r.decode_q8_tps) = (kv[0].1, kv[1].1);
    r.decode_q8_ratio = r.decode_q8_tps / r.decode_f16_tps.max(1e-9);
    r.q8_same_text = f64::from(u8::from(kv[0].2 == kv[1].2));
    let _ = std::fs::remove_dir_all(&warm_dir);
    let _ = std::fs::remove_dir_all(&cold_dir);
    Ok(r)
}
