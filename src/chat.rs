//! `elpis-server chat "message"`: a person trying Elpis out. Streams a reply
//! through the same engine and inference path the server uses, then prints
//! the emotional state.

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::engine::Message;
use crate::inference::Inference;
use crate::wire::GenerateArgs;

pub async fn chat(
    inference: &Inference,
    message: String,
    system: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message { role: "system".into(), content: system });
    }
    messages.push(Message { role: "user".into(), content: message });
    let args = GenerateArgs { messages, max_tokens, temperature, emotional_modulation: Some(true) };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::inference::Progress>();
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        while let Some((_, text)) = rx.recv().await {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    });
    let result = inference.generate(args, CancellationToken::new(), Some(tx)).await;
    let _ = printer.await;
    let result = result.map_err(|e| anyhow::anyhow!(e.0))?;
    println!();
    println!();
    println!("finish: {}  usage: {}", result["finish_reason"], result["usage"]);
    println!("sampling: {}", result["modulated_params"]);
    println!("emotional state: {}", serde_json::to_string_pretty(&result["emotional_state"])?);
    Ok(())
}
