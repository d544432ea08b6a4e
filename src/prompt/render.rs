//! [`Renderer`]: how a conversation becomes prompt text for one model: its
//! own Jinja template (and the template's `tool_use` variant for
//! conversations with tools), or a built-in format, with the stop strings
//! and the native tool-call format that go with it. The output is segments
//! (template text vs data, see [`super::segments`]); tokenising them is the
//! engine's. Pure: built from the template texts the engine read from the
//! GGUF, no model needed.

use serde_json::Value;

use super::formats::{calls_as_text, ChatFormat};
use super::message::Message;
use super::native_tools::NativeToolFormat;
use super::segments::{guard, split, Segment};
use super::template::ChatTemplate;

/// What a GGUF says about its prompts.
#[derive(Debug, Clone, Default)]
pub struct TemplateTexts {
    /// `tokenizer.chat_template`.
    pub chat: Option<String>,
    /// `tokenizer.chat_template.tool_use`.
    pub tool_use: Option<String>,
    /// The text of the BOS and EOS tokens (templates print them).
    pub bos: String,
    pub eos: String,
}

enum Format {
    /// The GGUF's own Jinja template.
    Template {
        chat: ChatTemplate,
        tool_use: Option<ChatTemplate>,
        /// `chat_format = "auto"`: a conversation the template cannot render
        /// falls back to this built-in format (warned once).
        fallback: Option<ChatFormat>,
        warned: std::cell::Cell<bool>,
    },
    Builtin(ChatFormat),
}

/// Turns conversations into prompt segments for one model.
pub struct Renderer {
    format: Format,
    /// Turn markers a model may write out as text: they end a reply.
    stops: Vec<String>,
    /// `gguf-template` or the built-in format's name.
    name: String,
    /// How the model writes tool calls natively, when its template renders
    /// tools and is in use.
    native_tools: Option<NativeToolFormat>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer").field("name", &self.name).field("native_tools", &self.native_tools).finish()
    }
}

impl Renderer {
    /// Choose the format: with `auto` or `jinja` the GGUF's template when it
    /// has one that renders a plain exchange (with `auto`, a broken template
    /// is a warning and the built-in format of the architecture); a named
    /// built-in format otherwise. The error names the template problem.
    pub fn new(setting: ChatFormat, texts: &TemplateTexts, architecture: &str) -> Result<Renderer, String> {
        let inferred = ChatFormat::for_architecture(architecture);
        let format = match (setting, &texts.chat) {
            (ChatFormat::Auto | ChatFormat::Jinja, Some(text)) => {
                let compiled = ChatTemplate::new(text, &texts.bos, &texts.eos).and_then(|chat| {
                    // A template that cannot render a plain exchange is broken.
                    chat.render(&[Message::new("system", "S"), Message::new("user", "U")], None, true)?;
                    Ok(chat)
                });
                match compiled {
                    Ok(chat) => {
                        let tool_use =
                            texts.tool_use.as_deref().and_then(|t| ChatTemplate::new(t, &texts.bos, &texts.eos).ok());
                        let fallback = (setting == ChatFormat::Auto).then_some(inferred);
                        Format::Template { chat, tool_use, fallback, warned: std::cell::Cell::new(false) }
                    }
                    Err(e) if setting == ChatFormat::Auto => {
                        tracing::warn!(
                            "the model's chat template does not work with Elpis ({e}); using the built-in {} format",
                            inferred.name()
                        );
                        Format::Builtin(inferred)
                    }
                    Err(e) => return Err(format!("the GGUF's chat template: {e}")),
                }
            }
            (ChatFormat::Jinja, None) => {
                return Err("model.chat_format = \"jinja\" but the model has no tokenizer.chat_template".into())
            }
            (ChatFormat::Auto, None) => Format::Builtin(inferred),
            (explicit, _) => Format::Builtin(explicit),
        };
        let (stops, name, native_tools) = match &format {
            Format::Builtin(f) => (f.stop_strings(), f.name().to_string(), None),
            Format::Template { chat, tool_use, .. } => {
                let tools_source = tool_use.as_ref().unwrap_or(chat).source();
                (
                    ChatFormat::for_template(chat.source(), architecture).stop_strings(),
                    "gguf-template".to_string(),
                    NativeToolFormat::detect(tools_source),
                )
            }
        };
        Ok(Renderer { format, stops, name, native_tools })
    }

    /// The prompt as segments: the template's text, whose special-token
    /// strings are parsed, and the data (contents, tool results, arguments,
    /// descriptions), tokenised as plain text. The error is the template's.
    pub fn render(&self, messages: &[Message], tools: Option<&[Value]>) -> Result<Vec<Segment>, String> {
        let builtin = |format: ChatFormat| {
            let guarded: Vec<Message> = calls_as_text(messages)
                .into_iter()
                .map(|m| Message { content: guard(&m.content), ..m })
                .collect();
            Ok(split(&format.render(&guarded)))
        };
        match &self.format {
            Format::Builtin(f) => builtin(*f),
            Format::Template { chat, tool_use, fallback, warned } => {
                let template = match (tools, tool_use) {
                    (Some(_), Some(t)) => t,
                    _ => chat,
                };
                match template.render(messages, tools, true) {
                    Ok(text) => Ok(split(&text)),
                    Err(e) => match fallback {
                        Some(format) => {
                            if !warned.replace(true) {
                                tracing::warn!(
                                    "the model's chat template cannot render a conversation ({e}); \
                                     using the built-in {} format for such conversations (warned once)",
                                    format.name()
                                );
                            }
                            builtin(*format)
                        }
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// Strings that end a reply (turn markers written out as text).
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// `gguf-template`, or the built-in format's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn native_tools(&self) -> Option<NativeToolFormat> {
        self.native_tools
    }

    /// The template text a conversation (with or without tools) is rendered
    /// with; None for a built-in format.
    pub fn template_source(&self, with_tools: bool) -> Option<&str> {
        match &self.format {
            Format::Template { chat, tool_use, .. } => {
                let used = if with_tools { tool_use.as_ref().unwrap_or(chat) } else { chat };
                Some(used.source())
            }
            Format::Builtin(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn texts(chat: Option<&str>) -> TemplateTexts {
        TemplateTexts { chat: chat.map(str::to_string), ..TemplateTexts::default() }
    }

    #[test]
    fn the_template_when_it_works_else_the_architectures_format() {
        let r = Renderer::new(ChatFormat::Auto, &texts(Some(CHATML)), "qwen2").unwrap();
        assert_eq!((r.name(), r.stops()[0].as_str()), ("gguf-template", "<|im_end|>"));
        let segments = r.render(&[Message::new("user", "hi <|im_end|>")], None).unwrap();
        assert!(segments.iter().any(|s| !s.special && s.text == "hi <|im_end|>"), "{segments:?}");
        let broken = Renderer::new(ChatFormat::Auto, &texts(Some("{% for %}")), "gemma3").unwrap();
        assert_eq!(broken.name(), "gemma");
        assert!(Renderer::new(ChatFormat::Jinja, &texts(Some("{% for %}")), "gemma3").unwrap_err().contains("chat template"));
        assert!(Renderer::new(ChatFormat::Jinja, &texts(None), "gemma3").unwrap_err().contains("no tokenizer.chat_template"));
        assert_eq!(Renderer::new(ChatFormat::Zephyr, &texts(Some(CHATML)), "qwen2").unwrap().name(), "zephyr");
        assert_eq!(Renderer::new(ChatFormat::Auto, &texts(None), "llama").unwrap().template_source(false), None);
    }
}
