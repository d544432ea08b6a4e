//! Prompts, pure: everything between a conversation on the wire and the
//! text a model reads, and between the text a model writes and the tool
//! calls in it. Nothing here touches llama.cpp (the engine tokenises and
//! decodes); everything is unit-tested without a model. `engine` and
//! `server` import this module; it imports neither.
//!
//! - [`message`]: chat messages and their roles.
//! - [`render`]: a model's [`Renderer`]: its own Jinja template
//!   ([`template`]) or a built-in format ([`formats`]), its stop strings and
//!   tool-call format.
//! - [`segments`]: data kept apart from template text, so content cannot
//!   forge a turn.
//! - [`tools`]: tool specs from the wire, and the generic JSON-array call
//!   format (prompt, schema, parser); [`native_tools`]: the model's own call
//!   formats (Hermes, Llama 3, Mistral), their grammars and parsers;
//!   [`call_guard`]: what of a reply that may call tools can stream as text.
//! - [`response_format`]: a reply that must be JSON (OpenAI's shape), and
//!   the check that its schema is one the grammar enforces.

pub mod call_guard;
pub mod formats;
pub mod message;
pub mod native_tools;
pub mod render;
pub mod response_format;
pub mod segments;
pub mod template;
pub mod tools;

pub use call_guard::CallGuard;
pub use formats::ChatFormat;
pub use message::{Message, ROLES};
pub use native_tools::{call_schema, reply_grammar, template_tools, triggers, NativeReply, NativeToolFormat};
pub use render::{Renderer, TemplateTexts};
pub use segments::Segment;
pub use template::ChatTemplate;
pub use tools::{apply_tool_choice, openai_call, parse_reply, parse_tools, reply_schema, tools_prompt, ToolSpec};

/// Parse a native reply (see [`native_tools`]).
pub fn parse_native(format: NativeToolFormat, text: &str, tools: &[ToolSpec]) -> Result<NativeReply, String> {
    native_tools::parse(format, text, tools)
}
