//! The engine driven directly (the library API, on one current_thread
//! runtime as the server runs it) with the real model, for paths no MCP
//! request can reach: a grammar no token of the vocabulary can continue.

mod common;

use elpis::config::Config;
use elpis::engine::{Engine, GenerationEvent, GenerationRequest, Grammar, SamplingParams};
use elpis::prompt::Message;

fn request(grammar: Option<&str>, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        text: None,
        messages: vec![Message::new("user", "Say anything.")],
        max_tokens,
        sampling: SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 40, min_p: 0.0, repeat_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, seed: 1 },
        grammar: grammar.map(|g| Grammar { gbnf: g.to_string(), triggers: Vec::new() }),
        tools: None,
        interest: None,
        stop: Vec::new(),
        speculative: true,
        prediction: None,
        logprobs: None,
    }
}

/// llama.cpp aborts the whole process (GGML_ABORT) when a grammar accepts a
/// token it did not allow; the engine used to accept end-of-generation when
/// nothing was allowed. A grammar that wants a NUL character can never be
/// continued (llama.cpp rejects every token whose text starts with one): the
/// job must end with a clear error, and the engine go on serving.
#[test]
fn a_grammar_no_token_can_continue_ends_the_job_not_the_process() {
    let env = vec![
        ("ELPIS_MODEL_PATH".to_string(), common::model_path().display().to_string()),
        ("ELPIS_MODEL_N_THREADS".to_string(), "1".to_string()),
        ("ELPIS_EMOTION_STEERING".to_string(), "off".to_string()),
        ("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB".to_string(), "0".to_string()),
    ];
    let (config, _) = Config::load_with_env(None, &env).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    let (engine, handle) = Engine::load(&config.engine_settings(), None).unwrap();
    let over = tokio_util::sync::CancellationToken::new();
    let done = over.clone();
    // The session is a task; this thread drives the engine, as the server does.
    let session = local.spawn_local(async move {
        let mut stuck = handle.generate(request(Some(r#"root ::= "\x00""#), 8));
        let error = loop {
            match stuck.events.recv().await {
                Some(GenerationEvent::Failed(e)) => break e.to_string(),
                Some(GenerationEvent::Done(c)) => panic!("a reply no grammar allows: {c:?}"),
                Some(_) => continue,
                None => panic!("the engine stopped"),
            }
        };
        assert!(error.contains("no token of the model's vocabulary can continue"), "{error}");
        let mut next = handle.generate(request(None, 2));
        loop {
            match next.events.recv().await {
                Some(GenerationEvent::Done(c)) => {
                    assert!(c.usage.completion_tokens >= 1, "{c:?}");
                    break;
                }
                Some(GenerationEvent::Failed(e)) => panic!("{e}"),
                Some(_) => continue,
                None => panic!("the engine stopped"),
            }
        }
        let load = handle.load().await.unwrap();
        for slot in &load.slots {
            assert_eq!(slot.kv_pos_max, slot.tokens as i32 - 1, "{slot:?}");
        }
        done.cancel();
    });
    engine.drive(&runtime, &local, &over);
    local.block_on(&runtime, session).unwrap();
}
