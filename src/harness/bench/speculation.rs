//! The bench's speculative-decoding rows: the same greedy request with
//! speculation off and on, in the same run and from the same cache state,
//! for a reply grounded in its input (a code snippet repeated with one
//! edit), a JSON tool call that echoes its input, and free chat: reply
//! tokens per second of each, the share of drafts accepted, and whether the
//! two texts matched.

use serde::Serialize;
use serde_json::{json, Value};

use super::{messages, tool};
use crate::harness::client::McpClient;

/// One kind of reply, off against on.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct SpecRow {
    pub off_tps: f64,
    pub on_tps: f64,
    pub ratio: f64,
    pub acceptance: f64,
    pub draft_tokens: f64,
    /// 1 when the replies were the same text.
    pub same_text: f64,
}

/// ~300 tokens of code to repeat.
const SNIPPET: &str = r#"/// The busy slot whose stream has gone unread the longest, if any is unattended.
fn unattended_slot(&self, now: Instant) -> Option<usize> {
    self.slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let job = s.job.as_ref()?;
            let interest = job.interest.as_ref()?;
            (!interest.attended(now)).then(|| (i, interest.idle_s(now)))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// Keep the first `keep` cells of slot `i`, removing the rest.
pub fn trim(&mut self, i: usize, keep: usize, ctx: &mut LlamaContext) {
    let slot = &mut self.slots[i];
    let seq = slot.seq as u32;
    if keep >= slot.cached.len() {
        return;
    }
    let partial_ok = keep > 0 && !self.swa_limited;
    if partial_ok {
        slot.cached.truncate(keep);
    } else {
        slot.cached.clear();
    }
}
"#;

/// Off, then on, the same request (a first run warms the cache).
async fn row(client: &mut McpClient, tool_name: &str, args: Value) -> anyhow::Result<SpecRow> {
    let with = |on: bool| {
        let mut a = args.clone();
        a["speculative"] = json!(on);
        a
    };
    tool(client, tool_name, with(false)).await?;
    let off = tool(client, tool_name, with(false)).await?;
    let on = tool(client, tool_name, with(true)).await?;
    let tps = |v: &Value| v["timings"]["reply_tokens_per_s"].as_f64().unwrap_or(0.0);
    let text = |v: &Value| if tool_name == "function_call" { v["tool_calls"][0]["function"].clone() } else { v["content"].clone() };
    let drafts = on["usage"]["draft_tokens"].as_f64().unwrap_or(0.0);
    let accepted = on["usage"]["accepted_tokens"].as_f64().unwrap_or(0.0);
    Ok(SpecRow {
        off_tps: tps(&off),
        on_tps: tps(&on),
        ratio: tps(&on) / tps(&off).max(1e-9),
        acceptance: if drafts > 0.0 { accepted / drafts } else { 0.0 },
        draft_tokens: drafts,
        same_text: f64::from(u8::from(text(&off) == text(&on))),
    })
}

/// The three rows: grounded (a code edit), a tool call echoing its input, free chat.
pub async fn rows(client: &mut McpClient) -> anyhow::Result<[SpecRow; 3]> {
    let edit = json!({"messages": messages("You edit code. Reply with the whole code and nothing else.",
        &format!("Rename the function `trim` to `cut_back` in this code, changing nothing else:\n```rust\n{SNIPPET}```")),
        "max_tokens": 400, "temperature": 0});
    let grounded = row(client, "generate", edit).await?;
    let tools = json!([{"type": "function", "function": {"name": "save_note", "description": "Save a note",
        "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 80},
            "body": {"type": "string", "maxLength": 400}}, "required": ["title", "body"]}}}]);
    let note = "Meeting with Ada on Tuesday: review the parser bug in the tokenizer, move the release to Friday, \
                and ask Grace about the benchmark numbers for the two-core machine.";
    let call = json!({"messages": messages("You save notes with the save_note tool.",
        &format!("Save this note with the title 'Tuesday meeting', word for word: {note}")),
        "tools": tools, "tool_choice": "required", "temperature": 0});
    let echo = row(client, "function_call", call).await?;
    let chat = json!({"messages": messages("You are a friendly assistant.", "Tell me about your favourite season and why, in a few sentences."),
        "max_tokens": 160, "temperature": 0});
    let free = row(client, "generate", chat).await?;
    Ok([grounded, echo, free])
}
