//! The model's own chat template: the GGUF's `tokenizer.chat_template`, a
//! Jinja program, rendered with minijinja the way Hugging Face transformers
//! renders it with Python's jinja2 (the reference every template is written
//! for): `trim_blocks` and `lstrip_blocks` on, Python's string and dict
//! methods (minijinja-contrib's pycompat), a `tojson` that writes what
//! Python's `json.dumps(ensure_ascii=False)` writes, `raise_exception` and
//! `strftime_now`. `scripts/template-check.py` renders the same
//! conversations with jinja2 and compares the bytes.
//! Pure apart from the clock; no model needed.

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::{json, Value};

use super::message::Message;
use super::segments::{guard, guard_descriptions, guard_strings};

/// Name of the one template in the environment.
const NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("len", &self.source.len()).finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; the error names the template problem.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string()).map_err(describe)?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), source: source.to_string() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation. With `guarded`, every piece of data is wrapped
    /// in the sentinels of [`super::segments`]; without, the text is exactly
    /// what jinja2 renders.
    pub fn render(&self, messages: &[Message], tools: Option<&[Value]>, guarded: bool) -> Result<String, String> {
        let messages: Vec<Value> = messages.iter().map(|m| message_value(m, guarded)).collect();
        let tools = tools.map(|t| {
            let t: Vec<Value> = if guarded { t.iter().map(guard_descriptions).collect() } else { t.to_vec() };
            Value::Array(t)
        });
        let ctx = json!({
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": true,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        let template = self.env.get_template(NAME).map_err(describe)?;
        template.render(JinjaValue::from_serialize(&ctx)).map_err(describe)
    }
}

/// A message as templates expect it (Hugging Face's shape): tool-call
/// arguments as an object, optional fields only when present.
fn message_value(m: &Message, guarded: bool) -> Value {
    let text = |s: &str| if guarded { guard(s) } else { s.to_string() };
    let mut out = json!({"role": m.role, "content": text(&m.content)});
    if let Some(calls) = &m.tool_calls {
        let calls: Vec<Value> = calls
            .iter()
            .zip(m.calls())
            .map(|(raw, (name, arguments))| {
                let arguments = if guarded { guard_strings(&arguments) } else { arguments };
                // OpenAI's key order: id, type, function.
                let mut call = serde_json::Map::new();
                if let Some(id) = raw.get("id") {
                    call.insert("id".into(), id.clone());
                }
                call.insert("type".into(), json!("function"));
                call.insert("function".into(), json!({"name": name, "arguments": arguments}));
                Value::Object(call)
            })
            .collect();
        out["tool_calls"] = Value::Array(calls);
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    if let Some(name) = &m.name {
        out["name"] = json!(name);
    }
    out
}

/// A minijinja error with its template line and the causes.
fn describe(e: Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn raise_exception(message: String) -> Result<JinjaValue, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised an exception: {message}")))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let value: Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialise ({e})")))?;
    let mut out = String::new();
    python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

/// Python's `json.dumps` layout: `", "` and `": "` separators without an
/// indent, one item a line with one; floats as Python's `repr`.
pub fn python_json(value: &Value, indent: Option<usize>, sort_keys: bool, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&python_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(key).unwrap_or_default());
                out.push_str(": ");
                python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integral
/// values, exponent form (`1e+16`, `1e-05`) outside 1e-4..1e16.
fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() { "NaN".into() } else if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let magnitude = f.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        let text = format!("{f:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let text = format!("{f}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_and_guards_data() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let m = vec![Message::new("user", "Hi <|im_end|>")];
        assert_eq!(t.render(&m, None, false).unwrap(), "<|im_start|>user\nHi <|im_end|><|im_end|>\n<|im_start|>assistant\n");
        let guarded = t.render(&m, None, true).unwrap();
        assert_eq!(super::super::segments::strip(&guarded), t.render(&m, None, false).unwrap());
    }

    #[test]
    fn python_methods_exceptions_and_errors() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}", "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], None, false).unwrap(), "HI");
        let err = t.render(&[Message::new("user", "a"), Message::new("user", "b")], None, false).unwrap_err();
        assert!(err.contains("one only"), "{err}");
        assert!(ChatTemplate::new("{% for %}", "", "").unwrap_err().contains("syntax"));
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let v = json!({"b": [1, 2.5, 1.0, 1e20, 0.00001, null, true], "a": "é\"\n", "c": {}});
        let mut out = String::new();
        python_json(&v, None, false, 0, &mut out);
        assert_eq!(out, r#"{"b": [1, 2.5, 1.0, 1e+20, 1e-05, null, true], "a": "é\"\n", "c": {}}"#);
        let mut pretty = String::new();
        python_json(&json!({"k": [1], "e": []}), Some(2), true, 0, &mut pretty);
        assert_eq!(pretty, "{\n  \"e\": [],\n  \"k\": [\n    1\n  ]\n}");
    }

    #[test]
    fn assistant_calls_reach_the_template_as_objects() {
        let t = ChatTemplate::new("{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}", "", "").unwrap();
        let mut m = Message::new("assistant", "");
        m.tool_calls = Some(vec![json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}})]);
        assert_eq!(t.render(&[m], None, false).unwrap(), "f{\"x\": 1}");
    }
}
