//! `elpis-server chat "message"`: stream a reply on the terminal through the
//! same engine and inference path the server uses, then print the emotional
//! state. (It prints to stdout: it is a person's command, not the server.)

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::prompt::Message;
use crate::server::core::{GenerateArgs, Inference, Progress};

pub async fn chat(
    inference: &Inference,
    message: String,
    system: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", message));
    let args = GenerateArgs {
        prompt: None,
        messages,
        max_tokens,
        temperature,
        emotional_modulation: Some(true),
        controls: Default::default(),
        stop: None,
        response_format: None,
        tools: None,
        tool_choice: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        while let Some((_, text)) = rx.recv().await {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    });
    let result = inference.generate(args, CancellationToken::new(), Some(tx)).await;
    let _ = printer.await;
    let result = result.map_err(|e| anyhow::anyhow!(e.message))?;
    let summary = format!(
        "\n\nfinish: {}  usage: {}\nsampling: {}\nemotional state: {}\n",
        result["finish_reason"],
        result["usage"],
        result["modulated_params"],
        serde_json::to_string_pretty(&result["emotional_state"])?
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(summary.as_bytes());
    Ok(())
}
