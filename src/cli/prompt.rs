//! `elpis-server prompt`: show what the model is fed. Reads a JSON array of
//! cases (`{"messages": [...], "tools": [...], "plain": ["text", ...]}`,
//! `tools` and `plain` optional) on stdin and prints, for each, the rendered
//! text, its segments (template text, whose special tokens are parsed, and
//! data, which is plain text), the tokens, the template used, and the
//! vocabulary's control tokens; `plain` strings come back tokenised as plain
//! text. `scripts/template-check.py` and the injection tests read it. (It
//! prints to stdout: it is a person's command, not the server.)

use std::io::Read;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;
use crate::engine::Engine;
use crate::prompt::Message;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    messages: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    plain: Vec<String>,
}

pub fn prompt(config: &Config) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).context("cannot read stdin")?;
    let cases: Vec<Case> = serde_json::from_str(&input)
        .context("stdin must be a JSON array of {\"messages\": [...], \"tools\"?: [...], \"plain\"?: [...]}")?;
    let (mut engine, _handle) = Engine::load(&config.engine_settings(), None)?;
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        out.push(engine.probe().inspect_prompt(&case.messages, case.tools.as_deref(), &case.plain)?);
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
