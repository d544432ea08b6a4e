//! Random input to every parser that needs no model, property-based: the
//! OpenAI request bodies, every tool's arguments and the controls they
//! carry, the response formats, the tool lists and choices, each native
//! tool-call parser and the generic one, the chat renderer with hostile
//! content, and the config file and environment. In every case: no panic,
//! and either a value or an error that names what is wrong.
//!
//! The cases are the same on every run (CI passes or fails on the code,
//! never on the draw). `ELPIS_PROPTEST_CASES` sets how many (default 2000
//! each); `ELPIS_FUZZ_SEED` picks another set, e.g.
//! `ELPIS_PROPTEST_CASES=200000 cargo test --release --test properties`.
//! The parsers that need the model (the stdio framing at the binary, the
//! schema-to-grammar converter) are fuzzed in `tests/hostile.rs`; the
//! prompt-cache loader and the line classifier in their modules.

mod common;
#[path = "common/arbitrary.rs"]
mod arbitrary;

use elpis::config::Config;
use elpis::prompt::{self, ChatFormat, Message, NativeToolFormat, Renderer, TemplateTexts};
use elpis::server::core::{controls, FunctionCallArgs, GenerateArgs, UpdateEmotionArgs};
use elpis::server::mcp::wire::{parse_args, StreamArgs};
use elpis::server::openai::bodies;
use arbitrary::{awkward_text, json_value, seeded};
use proptest::prelude::*;
use proptest::test_runner::{Config as Cases, TestRunner};
use serde_json::{json, Map, Value};

fn runner() -> TestRunner {
    let cases = std::env::var("ELPIS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    TestRunner::new_with_rng(Cases { cases, failure_persistence: None, ..Cases::default() }, seeded(20261203))
}

/// Run `test` on `strategy`'s cases; a failure panics with the case.
fn check<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    if let Err(e) = runner().run(&strategy, test) {
        panic!("{e}");
    }
}

/// A map over `keys` (the real field names) with random values, sometimes
/// with well-formed messages so validation past the types is reached.
fn fields(keys: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
    let message = (prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("tool"), Just("developer"), Just("wizard")], awkward_text())
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    (proptest::collection::btree_map(proptest::sample::select(keys), json_value(), 0..6), proptest::collection::vec(message, 0..3), any::<bool>())
        .prop_map(|(map, messages, with)| {
            let mut out: Map<String, Value> = map.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if with {
                out.insert("messages".into(), Value::from(messages));
            }
            out
        })
}

const BODY_KEYS: &[&str] = &[
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
    "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repeat_penalty", "tools",
    "tool_choice", "response_format", "echo", "suffix", "best_of", "emotional_modulation", "speculative", "prediction", "user",
];

const ARG_KEYS: &[&str] = &[
    "messages", "max_tokens", "temperature", "emotional_modulation", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "seed", "speculative", "prediction", "logprobs", "top_logprobs", "stop", "response_format", "tools",
    "tool_choice", "stream_id", "event_type", "intensity", "context",
];

#[test]
fn openai_bodies_become_arguments_or_name_the_field() {
    let body = prop_oneof![json_value(), fields(BODY_KEYS).prop_map(Value::Object)];
    check(body, |body| {
        for (route, read) in [("chat", bodies::chat as fn(&Value) -> _), ("completion", bodies::completion)] {
            match read(&body) {
                Ok(parsed) => {
                    // What was read goes on through the same checks MCP's arguments do.
                    validate(&parsed.args);
                    prop_assert_eq!(parsed.args.prompt.is_some(), route == "completion");
                }
                Err(e) => {
                    prop_assert!(!e.param.is_empty() && !e.message.is_empty(), "{route}: {e:?}");
                    prop_assert!(e.param == "body" || BODY_KEYS.contains(&e.param.as_str()), "{route}: an unknown field named: {e:?}");
                }
            }
        }
        Ok(())
    });
}

/// The core's checks of a generation's arguments: each is a value or an
/// error that names the argument (a word of its message is the field).
fn validate(args: &GenerateArgs) {
    let defaults = Config::default().model;
    let mood = || elpis::emotion::Modulation { temperature: 0.7, top_p: 0.9 };
    let named = |e: &elpis::server::core::RequestError| {
        assert!(ARG_KEYS.iter().chain(&["prompt"]).any(|k| e.message.contains(k)), "an error that names no argument: {}", e.message);
    };
    for result in [
        controls::sampling(&defaults, mood, args.temperature, args.modulation(), &args.controls).map(|_| ()),
        controls::stops(args.stop.as_ref()).map(|_| ()),
        controls::logprobs(&args.controls).map(|_| ()),
        controls::prediction(args.controls.prediction.as_ref()).map(|_| ()),
    ] {
        if let Err(e) = result {
            named(&e);
        }
    }
    if let Err(e) = prompt::response_format::schema(args.response_format.as_ref()) {
        assert!(e.contains("response_format"), "{e}");
    }
    if let Some(tools) = &args.tools {
        if let Ok(specs) = prompt::parse_tools(tools) {
            let _ = prompt::apply_tool_choice(specs, args.tool_choice.as_ref());
        }
    }
}

#[test]
fn every_tools_arguments_parse_or_name_the_argument() {
    const TOOLS: [&str; 6] = ["generate", "generate_stream_start", "generate_stream_read", "function_call", "update_emotion", "no_such_tool"];
    check((proptest::sample::select(&TOOLS[..]), fields(ARG_KEYS)), |(tool, args)| {
        let given = Some(args);
        let outcome = match tool {
            "generate" | "generate_stream_start" => parse_args::<GenerateArgs>(tool, given).map(|a| validate(&a)),
            "generate_stream_read" => parse_args::<StreamArgs>(tool, given).map(|_| ()),
            "function_call" => parse_args::<FunctionCallArgs>(tool, given).map(|a| {
                if let Ok(specs) = prompt::parse_tools(&a.tools) {
                    let _ = prompt::apply_tool_choice(specs, a.tool_choice.as_ref());
                }
            }),
            "update_emotion" => parse_args::<UpdateEmotionArgs>(tool, given).map(|_| ()),
            _ => parse_args::<Value>(tool, given).map(|_| ()),
        };
        if let Err(e) = outcome {
            prop_assert!(e.contains(tool) && (ARG_KEYS.iter().any(|k| e.contains(k)) || e.contains("missing") || e.contains("invalid")), "{e}");
        }
        Ok(())
    });
}

fn tool_specs() -> Vec<prompt::ToolSpec> {
    let tool = |name: &str, param: &str| json!({"type": "function", "function": {"name": name, "parameters":
        {"type": "object", "properties": {param: {"type": "string"}}, "required": [param]}}});
    prompt::parse_tools(&[tool("get_weather", "city"), tool("get_time", "timezone")]).unwrap()
}

/// Text shaped like each format's calls, cut and spliced with noise.
fn call_text() -> impl Strategy<Value = String> {
    let call = prop_oneof![
        Just(r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#),
        Just(r#"<|python_tag|>{"name": "get_time", "parameters": {"timezone": "UTC"}}"#),
        Just(r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]"#),
        Just(r#"[{"name": "get_weather", "arguments": {"city": "Rome"}}]"#),
    ];
    (call, awkward_text(), any::<proptest::sample::Index>(), awkward_text()).prop_map(|(call, noise, cut, tail)| {
        let at = cut.index(call.len() + 1);
        let at = (0..=at).rev().find(|i| call.is_char_boundary(*i)).unwrap_or(0);
        format!("{noise}{}{tail}", &call[..at])
    })
}

#[test]
fn tool_call_parsers_read_calls_or_say_why() {
    let specs = tool_specs();
    check(prop_oneof![call_text(), awkward_text()], |text| {
        for format in [NativeToolFormat::Hermes, NativeToolFormat::Llama3, NativeToolFormat::Mistral] {
            if let Ok(reply) = prompt::parse_native(format, &text, &specs) {
                for (name, _) in &reply.calls {
                    prop_assert!(specs.iter().any(|s| &s.name == name), "{format:?} read a call of an unknown tool {name:?} from {text:?}");
                }
            }
        }
        if let Ok(calls) = prompt::parse_reply(&text, &specs) {
            for (name, args) in &calls {
                prop_assert!(specs.iter().any(|s| &s.name == name) && args.is_object(), "{name:?} {args}");
            }
        }
        Ok(())
    });
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// How often `marker` occurs in the template's own text (the segments
/// whose special tokens are parsed).
fn in_markup(segments: &[prompt::Segment], marker: &str) -> usize {
    segments.iter().filter(|s| s.special).map(|s| s.text.matches(marker).count()).sum()
}

#[test]
fn hostile_content_never_becomes_the_templates_markup() {
    let texts = TemplateTexts { chat: Some(CHATML.into()), bos: "<s>".into(), eos: "</s>".into(), ..TemplateTexts::default() };
    let renderers: Vec<Renderer> = [
        ChatFormat::Jinja, ChatFormat::ChatMl, ChatFormat::Gemma, ChatFormat::Llama3, ChatFormat::Mistral, ChatFormat::Phi3,
        ChatFormat::Llama2, ChatFormat::Alpaca, ChatFormat::Vicuna, ChatFormat::Zephyr, ChatFormat::Raw,
    ]
    .into_iter()
    .map(|f| Renderer::new(f, &texts, "qwen2").unwrap())
    .collect();
    let markers = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<|eot_id|>", "[INST]", "<|user|>", "<|assistant|>", "</s>", "<s>"];
    let roles = prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool")];
    check(proptest::collection::vec((roles, awkward_text()), 1..5), |turns| {
        let hostile: Vec<Message> = turns.iter().map(|(role, text)| Message::new(role, text.clone())).collect();
        let benign: Vec<Message> = turns.iter().map(|(role, _)| Message::new(role, "x")).collect();
        for renderer in &renderers {
            match (renderer.render(&hostile, None), renderer.render(&benign, None)) {
                (Ok(h), Ok(b)) => {
                    for marker in markers {
                        // The content adds no turn: the markup is what the same turns say with plain text.
                        prop_assert_eq!(in_markup(&h, marker), in_markup(&b, marker), "{} forged {:?} from {:?}", renderer.name(), marker, turns);
                    }
                }
                // A conversation a format cannot say is an error for either content.
                (Err(e), _) => prop_assert!(!e.is_empty()),
                (Ok(_), Err(e)) => prop_assert!(false, "{} refused plain text but took hostile text: {e}", renderer.name()),
            }
        }
        Ok(())
    });
}

const CONFIG_KEYS: &[(&str, &str)] = &[
    ("model", "path"), ("model", "context_length"), ("model", "gpu_layers"), ("model", "n_threads"), ("model", "temperature"),
    ("model", "chat_format"), ("model", "parallel"), ("model", "kv_cache_type"), ("model", "speculative"), ("model", "rpc_servers"),
    ("emotion", "baseline_valence"), ("emotion", "decay_rate"), ("emotion", "steering_strength"), ("logging", "level"),
    ("server", "max_streams"), ("server", "http"), ("server", "http_token"), ("server", "max_line_bytes"), ("server", "stream_idle_s"),
    ("server", "prompt_cache_ram_mib"), ("bogus", "key"),
];

#[test]
fn the_config_file_and_environment_load_or_say_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("elpis-config-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("elpis.toml");
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "\\PC{0,16}".prop_map(|s| format!("{s:?}")),
        Just("[1, \"a\"]".to_string()),
        Just("{ x = 1 }".to_string()),
        "\\PC{0,12}",
    ];
    let entry = (proptest::sample::select(CONFIG_KEYS), value);
    let env = proptest::collection::vec((proptest::sample::select(CONFIG_KEYS), "\\PC{0,12}"), 0..3);
    check((proptest::collection::vec(entry, 0..6), env, awkward_text()), |(entries, env, noise)| {
        let mut text = String::new();
        for ((section, key), value) in &entries {
            text.push_str(&format!("[{section}]\n{key} = {value}\n"));
        }
        if noise.len() % 3 == 0 {
            text.push_str(&noise);
        }
        std::fs::write(&path, &text).unwrap();
        let env: Vec<(String, String)> = env.into_iter().map(|((s, k), v)| (format!("ELPIS_{}_{}", s, k).to_uppercase(), v)).collect();
        if let Err(e) = Config::load_with_env(Some(&path), &env) {
            let message = e.to_string();
            prop_assert!(!message.is_empty() && message.len() < 4000, "{message}");
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}
