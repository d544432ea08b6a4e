//! The built-in prompt formats: chat messages to the text a model was
//! trained on, for models without a usable template of their own (or when
//! `chat_format` names one). With `auto`, the format is inferred from the
//! model's architecture. Pure; no model needed.

use super::message::Message;

/// A prompt format: the model's own template or a built-in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// Use the GGUF's template, else infer from the architecture.
    Auto,
    /// The GGUF's Jinja template, required: a model without one, or a
    /// template that fails, is an error instead of a fallback.
    Jinja,
    Gemma,
    ChatMl,
    Llama3,
    Mistral,
    Phi3,
    /// Llama 2 chat: `[INST] <<SYS>> ... <</SYS>> ... [/INST]`.
    Llama2,
    /// `### Instruction:` / `### Response:` blocks.
    Alpaca,
    /// `USER: ... ASSISTANT: ...`.
    Vicuna,
    /// `<|system|>`, `<|user|>`, `<|assistant|>` turns ended by `</s>`.
    Zephyr,
    /// Messages joined as plain text with role labels (for base models).
    Raw,
}

/// llama-cpp-python's chat format names that have no built-in here (the
/// predecessor documented them): accepted, with a warning, as `auto`.
const FOREIGN_FORMATS: [&str; 24] = [
    "oasst_llama",
    "baichuan",
    "baichuan-2",
    "openbuddy",
    "redpajama-incite",
    "snoozy",
    "phind",
    "intel",
    "open-orca",
    "mistrallite",
    "pygmalion",
    "chatglm3",
    "openchat",
    "saiga",
    "functionary",
    "functionary-v1",
    "functionary-v2",
    "llava-1-5",
    "llava-1-6",
    "obsidian",
    "moondream2",
    "nanollava",
    "llama-3-vision-alpha",
    "minicpm-v-2.6",
];

impl ChatFormat {
    pub const NAMES: [&'static str; 12] =
        ["auto", "jinja", "gemma", "chatml", "llama-3", "mistral", "phi-3", "llama-2", "alpaca", "vicuna", "zephyr", "raw"];

    /// A llama-cpp-python format name without a built-in equivalent.
    pub fn is_foreign(name: &str) -> bool {
        FOREIGN_FORMATS.contains(&name.trim().to_ascii_lowercase().as_str())
    }

    pub fn parse(name: &str) -> Option<ChatFormat> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => ChatFormat::Auto,
            "jinja" | "template" | "gguf" => ChatFormat::Jinja,
            "gemma" | "gemma2" | "gemma3" => ChatFormat::Gemma,
            "chatml" | "qwen" | "chatml-function-calling" => ChatFormat::ChatMl,
            "llama-3" | "llama3" => ChatFormat::Llama3,
            "mistral" | "mistral-instruct" => ChatFormat::Mistral,
            "phi-3" | "phi3" => ChatFormat::Phi3,
            "llama-2" | "llama2" => ChatFormat::Llama2,
            "alpaca" => ChatFormat::Alpaca,
            "vicuna" => ChatFormat::Vicuna,
            "zephyr" => ChatFormat::Zephyr,
            "raw" | "none" => ChatFormat::Raw,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ChatFormat::Auto => "auto",
            ChatFormat::Jinja => "jinja",
            ChatFormat::Gemma => "gemma",
            ChatFormat::ChatMl => "chatml",
            ChatFormat::Llama3 => "llama-3",
            ChatFormat::Mistral => "mistral",
            ChatFormat::Phi3 => "phi-3",
            ChatFormat::Llama2 => "llama-2",
            ChatFormat::Alpaca => "alpaca",
            ChatFormat::Vicuna => "vicuna",
            ChatFormat::Zephyr => "zephyr",
            ChatFormat::Raw => "raw",
        }
    }

    /// The format a model of `architecture` (GGUF `general.architecture`) most
    /// likely expects.
    pub fn for_architecture(architecture: &str) -> ChatFormat {
        let arch = architecture.to_ascii_lowercase();
        if arch.starts_with("gemma") {
            ChatFormat::Gemma
        } else if arch.starts_with("llama") {
            ChatFormat::Llama3
        } else if arch.starts_with("phi3") {
            ChatFormat::Phi3
        } else if arch.starts_with("mistral") {
            ChatFormat::Mistral
        } else {
            ChatFormat::ChatMl
        }
    }

    /// The built-in format whose turn markers a template text uses (for its
    /// stop strings), else the architecture's.
    pub fn for_template(source: &str, architecture: &str) -> ChatFormat {
        if source.contains("<|im_start|>") {
            ChatFormat::ChatMl
        } else if source.contains("<start_of_turn>") {
            ChatFormat::Gemma
        } else if source.contains("<|start_header_id|>") {
            ChatFormat::Llama3
        } else if source.contains("[INST]") {
            ChatFormat::Mistral
        } else if source.contains("<|end|>") {
            ChatFormat::Phi3
        } else {
            ChatFormat::for_architecture(architecture)
        }
    }

    /// Strings that end a reply in this format: a turn marker the model might
    /// write out as text.
    pub fn stop_strings(self) -> Vec<String> {
        let stops: &[&str] = match self {
            ChatFormat::Gemma => &["<end_of_turn>", "<start_of_turn>"],
            ChatFormat::ChatMl => &["<|im_end|>", "<|im_start|>"],
            ChatFormat::Llama3 => &["<|eot_id|>", "<|start_header_id|>"],
            ChatFormat::Mistral => &["</s>", "[INST]"],
            ChatFormat::Phi3 => &["<|end|>", "<|user|>", "<|assistant|>"],
            ChatFormat::Llama2 => &["</s>", "[INST]"],
            ChatFormat::Alpaca => &["### Instruction:", "### Response:"],
            ChatFormat::Vicuna => &["</s>", "USER:"],
            ChatFormat::Zephyr => &["</s>", "<|user|>"],
            ChatFormat::Raw | ChatFormat::Auto | ChatFormat::Jinja => &["\nUser:", "\nSystem:"],
        };
        stops.iter().map(|s| s.to_string()).collect()
    }

    /// Render `messages` with the assistant's turn opened at the end. The BOS
    /// token is not included (the tokenizer adds it).
    pub fn render(self, messages: &[Message]) -> String {
        let mut out = String::new();
        match self {
            ChatFormat::Gemma => {
                // Gemma has no system role: the system text opens the first user turn.
                let mut system = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" => {
                            system.push_str(&m.content);
                            system.push_str("\n\n");
                        }
                        "assistant" => {
                            out.push_str(&format!("<start_of_turn>model\n{}<end_of_turn>\n", m.content));
                        }
                        _ => {
                            let prefix = std::mem::take(&mut system);
                            out.push_str(&format!("<start_of_turn>user\n{prefix}{}<end_of_turn>\n", m.content));
                        }
                    }
                }
                if !system.is_empty() {
                    out.push_str(&format!("<start_of_turn>user\n{}<end_of_turn>\n", system.trim_end()));
                }
                out.push_str("<start_of_turn>model\n");
            }
            ChatFormat::ChatMl => {
                for m in messages {
                    out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
                }
                out.push_str("<|im_start|>assistant\n");
            }
            ChatFormat::Llama3 => {
                for m in messages {
                    let role = if m.role == "tool" { "ipython" } else { m.role.as_str() };
                    out.push_str(&format!("<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>", m.content));
                }
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
            ChatFormat::Mistral => {
                let mut system = String::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" => {
                            system.push_str(&m.content);
                            system.push_str("\n\n");
                        }
                        "assistant" => out.push_str(&format!(" {}</s>", m.content)),
                        _ => {
                            let prefix = std::mem::take(&mut system);
                            out.push_str(&format!("[INST] {prefix}{} [/INST]", m.content));
                        }
                    }
                }
                if !system.is_empty() {
                    out.push_str(&format!("[INST] {} [/INST]", system.trim_end()));
                }
            }
            ChatFormat::Phi3 => tagged_turns(&mut out, messages, "<|end|>"),
            ChatFormat::Llama2 => {
                let system = system_text(messages);
                let mut first = true;
                for m in messages.iter().filter(|m| m.role != "system") {
                    if m.role == "assistant" {
                        out.push_str(&format!(" {} </s><s>", m.content));
                        continue;
                    }
                    out.push_str("[INST] ");
                    if first && !system.is_empty() {
                        out.push_str(&format!("<<SYS>>\n{system}\n<</SYS>>\n\n"));
                    }
                    first = false;
                    out.push_str(&format!("{} [/INST]", m.content));
                }
                if first {
                    out.push_str(&format!("[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]"));
                }
            }
            ChatFormat::Alpaca => {
                let system = system_text(messages);
                if !system.is_empty() {
                    out.push_str(&format!("{system}\n\n"));
                }
                for m in messages.iter().filter(|m| m.role != "system") {
                    let label = if m.role == "assistant" { "### Response:" } else { "### Instruction:" };
                    out.push_str(&format!("{label}\n{}\n\n", m.content));
                }
                out.push_str("### Response:\n");
            }
            ChatFormat::Vicuna => {
                let system = system_text(messages);
                if !system.is_empty() {
                    out.push_str(&format!("{system} "));
                }
                for m in messages.iter().filter(|m| m.role != "system") {
                    if m.role == "assistant" {
                        out.push_str(&format!("ASSISTANT: {}</s>", m.content));
                    } else {
                        out.push_str(&format!("USER: {} ", m.content));
                    }
                }
                out.push_str("ASSISTANT:");
            }
            ChatFormat::Zephyr => tagged_turns(&mut out, messages, "</s>"),
            ChatFormat::Raw | ChatFormat::Auto | ChatFormat::Jinja => {
                for m in messages {
                    out.push_str(&format!("{}: {}\n", capitalise(&m.role), m.content));
                }
                out.push_str("Assistant:");
            }
        }
        out
    }
}

/// For the built-in formats, which have no tool-call markup: an assistant
/// message's calls appended to its text as the generic path's JSON array
/// (what the model wrote, if it came from the generic path).
pub fn calls_as_text(messages: &[Message]) -> Vec<Message> {
    messages
        .iter()
        .map(|m| {
            let calls = m.calls();
            if calls.is_empty() {
                return m.clone();
            }
            let array: Vec<serde_json::Value> =
                calls.into_iter().map(|(name, arguments)| serde_json::json!({"name": name, "arguments": arguments})).collect();
            let json = serde_json::Value::Array(array).to_string();
            let content = if m.content.is_empty() { json } else { format!("{}\n{json}", m.content) };
            Message { content, tool_calls: None, ..m.clone() }
        })
        .collect()
}

/// `<|role|>` turns closed by `end` (Phi-3, Zephyr); tool results speak as
/// the user; the assistant's turn is opened at the end.
fn tagged_turns(out: &mut String, messages: &[Message], end: &str) {
    for m in messages {
        let role = if m.role == "tool" { "user" } else { m.role.as_str() };
        out.push_str(&format!("<|{role}|>\n{}{end}\n", m.content));
    }
    out.push_str("<|assistant|>\n");
}

/// The system messages' text, joined (formats with one system slot).
fn system_text(messages: &[Message]) -> String {
    messages.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n")
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(r, *c)).collect()
    }

    #[test]
    fn gemma_folds_system_into_first_user_turn() {
        let text = ChatFormat::Gemma.render(&msgs(&[("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]));
        assert_eq!(
            text,
            "<start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_system_only() {
        let text = ChatFormat::Gemma.render(&msgs(&[("system", "Think.")]));
        assert_eq!(text, "<start_of_turn>user\nThink.<end_of_turn>\n<start_of_turn>model\n");
    }

    #[test]
    fn chatml_and_llama3() {
        let m = msgs(&[("system", "S"), ("user", "U")]);
        assert_eq!(ChatFormat::ChatMl.render(&m), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
        assert!(ChatFormat::Llama3.render(&m).ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn a_prompt_that_grows_extends_the_previous_one() {
        // The prompt cache depends on this: appending turns only appends text.
        let short = msgs(&[("system", "S"), ("user", "U1")]);
        let mut long = short.clone();
        long.extend(msgs(&[("assistant", "A1"), ("user", "U2")]));
        for format in [ChatFormat::Gemma, ChatFormat::ChatMl, ChatFormat::Llama3, ChatFormat::Phi3] {
            let a = format.render(&short);
            let b = format.render(&long);
            let open = a.len() - format.render(&[]).len();
            assert!(b.starts_with(&a[..open]), "{format:?}");
        }
    }

    #[test]
    fn llama2_alpaca_vicuna_zephyr() {
        let m = msgs(&[("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]);
        assert_eq!(ChatFormat::Llama2.render(&m), "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");
        assert_eq!(ChatFormat::Alpaca.render(&m), "S\n\n### Instruction:\nU1\n\n### Response:\nA1\n\n### Instruction:\nU2\n\n### Response:\n");
        assert_eq!(ChatFormat::Vicuna.render(&m), "S USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:");
        assert_eq!(
            ChatFormat::Zephyr.render(&m),
            "<|system|>\nS</s>\n<|user|>\nU1</s>\n<|assistant|>\nA1</s>\n<|user|>\nU2</s>\n<|assistant|>\n"
        );
        assert!(ChatFormat::is_foreign("Saiga") && !ChatFormat::is_foreign("zephyr"));
        assert_eq!(ChatFormat::parse("LLAMA-2"), Some(ChatFormat::Llama2));
    }

    #[test]
    fn names_round_trip_and_architectures() {
        for name in ChatFormat::NAMES {
            assert_eq!(ChatFormat::parse(name).unwrap().name(), name);
        }
        assert_eq!(ChatFormat::parse("bogus"), None);
        assert_eq!(ChatFormat::for_architecture("gemma3"), ChatFormat::Gemma);
        assert_eq!(ChatFormat::for_architecture("qwen2"), ChatFormat::ChatMl);
    }
}
