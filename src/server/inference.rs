//! What the tools do: validate a request, turn it into an engine
//! [`GenerationRequest`] with the mood's sampling, run or stream it, and shape
//! the result object of `shared/docs/wire.md`. The MCP layer only parses
//! arguments and calls one method here; the `chat` command uses it too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ModelConfig, ServerConfig, ToolFormat};
use crate::emotion::{Modulation, EVENTS};
use crate::engine::{
    self, Completion, EngineHandle, FinishReason, Generation, GenerationEvent, GenerationRequest, Grammar, Interest,
    SamplingParams,
};
use crate::prompt::{self, Message, NativeToolFormat, ROLES};
use crate::server::mood::Mood;
use crate::server::streams::{StreamEnd, StreamRegistry};
use crate::server::wire::{FunctionCallArgs, GenerateArgs, UpdateEmotionArgs};

/// A failure reported to the client as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);

impl From<engine::EngineError> for ToolError {
    fn from(e: engine::EngineError) -> Self {
        ToolError(e.to_string())
    }
}

impl From<crate::server::streams::StreamError> for ToolError {
    fn from(e: crate::server::streams::StreamError) -> Self {
        ToolError(e.to_string())
    }
}

/// One progress update of a running `generate`: tokens so far, new text.
pub type Progress = (u32, String);

/// Most tokens a `function_call` reply may use.
const FUNCTION_CALL_MAX_TOKENS: u32 = 512;

pub struct Inference {
    engine: EngineHandle,
    mood: Arc<Mood>,
    streams: Arc<Mutex<StreamRegistry>>,
    /// Sampling and length defaults from `[model]`.
    defaults: ModelConfig,
    /// A stream nobody reads this long is abandoned (`server.stream_idle_s`).
    stream_idle: Duration,
    /// Generations that may wait for a slot (`server.max_queued`).
    max_queued: usize,
}

impl Inference {
    pub fn new(engine: EngineHandle, mood: Arc<Mood>, defaults: ModelConfig, limits: &ServerConfig) -> Self {
        let streams = StreamRegistry::new(limits.max_streams, Duration::from_secs_f64(limits.stream_max_age_s));
        Inference {
            engine,
            mood,
            streams: Arc::new(Mutex::new(streams)),
            defaults,
            stream_idle: Duration::from_secs_f64(limits.stream_idle_s),
            max_queued: limits.max_queued,
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, StreamRegistry> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validate and build the engine request; returns the sampling actually used.
    fn request(
        &self,
        messages: Vec<Message>,
        max_tokens: Option<i64>,
        temperature: Option<f64>,
        modulate: bool,
    ) -> Result<(GenerationRequest, Modulation), ToolError> {
        validate_messages(&messages)?;
        let context = self.engine.info().context_length;
        let max_tokens = match max_tokens {
            None => self.defaults.max_tokens,
            Some(n) if n < 1 => {
                return Err(ToolError(format!("max_tokens = {n} is invalid: it must be at least 1")));
            }
            // Beyond the context the generation stops at its end anyway.
            Some(n) => n.min(context as i64) as u32,
        };
        let used = match temperature {
            Some(t) if !t.is_finite() || !(0.0..=2.0).contains(&t) => {
                return Err(ToolError(format!("temperature = {t} is out of range: expected 0 to 2 (0 = greedy)")));
            }
            Some(t) => Modulation { temperature: t, top_p: self.defaults.top_p },
            None if modulate => self.mood.modulation(),
            None => Modulation { temperature: self.defaults.temperature, top_p: self.defaults.top_p },
        };
        let waiting = self.engine.waiting();
        if waiting >= self.max_queued {
            return Err(ToolError(format!(
                "busy: {waiting} generations are already waiting for a slot (server.max_queued = {}): \
                 try again when some have finished",
                self.max_queued
            )));
        }
        let seed = self.defaults.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u128() as u32);
        let sampling = SamplingParams {
            temperature: used.temperature,
            top_p: used.top_p,
            top_k: self.defaults.top_k,
            min_p: self.defaults.min_p,
            repeat_penalty: self.defaults.repeat_penalty,
            seed,
        };
        Ok((GenerationRequest { messages, max_tokens, sampling, grammar: None, tools: None, interest: None }, used))
    }

    /// `generate`: run to the end (or until `cancel`), sending progress when asked.
    pub async fn generate(
        &self,
        args: GenerateArgs,
        cancel: CancellationToken,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<Value, ToolError> {
        let modulate = args.modulation();
        let (request, used) = self.request(args.messages, args.max_tokens, args.temperature, modulate)?;
        let generation = self.engine.generate(request);
        let completion = run_to_end(generation, cancel, progress).await?;
        if completion.finish_reason != FinishReason::Cancelled {
            self.mood.react_to_response(&completion.text);
        }
        Ok(json!({
            "content": completion.text,
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
            "truncated": completion.truncated,
        }))
    }

    /// `generate_stream_start`: queue the generation, register the stream and
    /// pump its events into the registry in the background.
    pub fn stream_start(&self, args: GenerateArgs) -> Result<Value, ToolError> {
        let modulate = args.modulation();
        let (mut request, used) = self.request(args.messages, args.max_tokens, args.temperature, modulate)?;
        let cancel = CancellationToken::new();
        let interest = Interest::new(Instant::now());
        request.interest = Some(interest.clone());
        let id = self.streams().start(cancel.clone(), interest.clone(), Instant::now())?;
        let mut generation = self.engine.generate(request);
        let stream_cancel = generation.cancel.clone();
        let streams = Arc::clone(&self.streams);
        let mood = Arc::clone(&self.mood);
        let stream_id = id.clone();
        let idle_limit = self.stream_idle;
        tokio::spawn(async move {
            let mut abandoned = false;
            // Checks whether anybody still reads the stream (an interval keeps
            // its tick when another branch wins, unlike a fresh sleep per event).
            let mut watch = tokio::time::interval(idle_limit.div_f64(4.0).min(Duration::from_secs(1)));
            watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let event = tokio::select! {
                    event = generation.events.recv() => event,
                    _ = cancel.cancelled() => {
                        stream_cancel.cancel();
                        return;
                    }
                    _ = watch.tick(), if !abandoned => {
                        // Nobody read it for the idle limit: stop generating for nobody.
                        if interest.idle_s(Instant::now()) >= idle_limit.as_secs_f64() {
                            tracing::info!(stream_id = %stream_id, "stream unread for {:.1} s: abandoned, generation stopped", idle_limit.as_secs_f64());
                            abandoned = true;
                            stream_cancel.cancel();
                        }
                        continue;
                    }
                };
                let mut registry = streams.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    Some(GenerationEvent::Text(text)) => registry.push_text(&stream_id, &text),
                    Some(GenerationEvent::Tokens(n)) => registry.set_tokens(&stream_id, n),
                    Some(GenerationEvent::Done(mut completion)) => {
                        if abandoned && completion.finish_reason == FinishReason::Cancelled {
                            completion.finish_reason = FinishReason::Abandoned;
                        }
                        let finished = completion.finish_reason != FinishReason::Cancelled;
                        let text = completion.text.clone();
                        registry.end(&stream_id, StreamEnd::Finished(completion));
                        drop(registry);
                        if finished {
                            mood.react_to_response(&text);
                        }
                        return;
                    }
                    Some(GenerationEvent::Failed(e)) => {
                        registry.end(&stream_id, StreamEnd::Failed(e.to_string()));
                        return;
                    }
                    None => {
                        registry.end(&stream_id, StreamEnd::Failed(engine::EngineError::Stopped.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(json!({
            "stream_id": id,
            "status": "started",
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
        }))
    }

    /// `generate_stream_read`.
    pub fn stream_read(&self, stream_id: &str) -> Result<Value, ToolError> {
        let read = self.streams().read(stream_id)?;
        let mut out = json!({
            "stream_id": stream_id,
            "new_content": read.new_content,
            "is_complete": read.end.is_some(),
            "total_tokens": read.total_tokens,
        });
        if let Some((full, end)) = read.end {
            out["full_content"] = json!(full);
            out["emotional_state"] = json!(self.mood.snapshot());
            match end {
                StreamEnd::Finished(c) => {
                    out["finish_reason"] = json!(c.finish_reason);
                    out["usage"] = json!(c.usage);
                    out["truncated"] = json!(c.truncated);
                }
                StreamEnd::Failed(message) => out["error"] = json!(message),
            }
        }
        Ok(out)
    }

    /// `generate_stream_cancel`.
    pub fn stream_cancel(&self, stream_id: &str) -> Result<Value, ToolError> {
        self.streams().cancel(stream_id)?;
        Ok(json!({"status": "cancelled", "stream_id": stream_id}))
    }

    /// `max_tokens` when a request gives none (the config's).
    pub fn default_max_tokens(&self) -> u32 {
        self.defaults.max_tokens
    }

    /// Open streams (for capabilities and tests).
    pub fn open_streams(&self) -> usize {
        self.streams().len()
    }

    /// Stop every stream and every generation (shutdown): running replies
    /// end as `cancelled`, so their requests are answered.
    pub fn cancel_all(&self) {
        self.streams().cancel_all();
        self.engine.cancel_all();
    }

    /// The native tool-call format in use, if any (`[model] tool_format`).
    fn native_tools(&self) -> Option<NativeToolFormat> {
        match self.defaults.tool_format {
            ToolFormat::Generic => None,
            ToolFormat::Auto => self.engine.info().native_tools,
        }
    }

    /// `function_call`: a grammar-constrained reply parsed into OpenAI calls:
    /// in the model's own format when it has one (the tools go to its
    /// template; with `tool_choice: "auto"` it may answer in text, returned as
    /// `content`), else as a generic JSON array.
    pub async fn function_call(&self, args: FunctionCallArgs, cancel: CancellationToken) -> Result<Value, ToolError> {
        let tools = prompt::parse_tools(&args.tools).map_err(ToolError)?;
        let (tools, required) = prompt::apply_tool_choice(tools, args.tool_choice.as_ref()).map_err(ToolError)?;
        let mut messages = args.messages;
        validate_messages(&messages)?;
        let native = self.native_tools();
        let grammar = match native {
            Some(format) => {
                let call = self.engine.schema_grammar(&prompt::call_schema(format, &tools)).await?;
                Grammar {
                    gbnf: prompt::reply_grammar(format, &call),
                    triggers: if required { Vec::new() } else { prompt::triggers(format, &tools) },
                }
            }
            None => {
                let instructions = prompt::tools_prompt(&tools);
                match messages.first_mut() {
                    Some(first) if first.role == "system" => {
                        first.content = format!("{}\n\n{instructions}", first.content);
                    }
                    _ => messages.insert(0, Message::new("system", instructions)),
                }
                Grammar { gbnf: self.engine.schema_grammar(&prompt::reply_schema(&tools, required)).await?, triggers: Vec::new() }
            }
        };
        let max_tokens = FUNCTION_CALL_MAX_TOKENS.min(self.defaults.max_tokens);
        let (mut request, used) = self.request(messages, Some(max_tokens as i64), args.temperature, true)?;
        request.grammar = Some(grammar);
        if native.is_some() {
            request.tools = Some(prompt::template_tools(&tools));
        }
        let completion = run_to_end(self.engine.generate(request), cancel, None).await?;
        let mut out = json!({
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
        });
        let parsed = match native {
            Some(format) => prompt::parse_native(format, &completion.text, &tools).map(|r| (r.content, r.calls)),
            None => prompt::parse_reply(&completion.text, &tools).map(|calls| (String::new(), calls)),
        };
        // A constrained reply cut by the token limit is a runaway (a string
        // or array the model never closed), not a call: say so plainly.
        let parsed = match parsed {
            Err(_) if completion.finish_reason == FinishReason::Length => Err(format!(
                "the reply hit the token limit ({} tokens) inside a call, before the JSON was complete: \
                 the model ran away (for example an unbounded string or array); retry, lower the temperature, \
                 or bound the schema (maxLength, maxItems)",
                completion.usage.completion_tokens
            )),
            other => other,
        };
        match parsed {
            Ok((content, calls)) => {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|(name, arguments)| {
                        let id = format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]);
                        prompt::openai_call(id, name, arguments)
                    })
                    .collect();
                out["tool_calls"] = json!(calls);
                if !content.is_empty() {
                    out["content"] = json!(content);
                }
            }
            Err(parse_error) => {
                out["tool_calls"] = json!([]);
                out["raw_content"] = json!(completion.text);
                out["parse_error"] = json!(parse_error);
            }
        }
        Ok(out)
    }

    /// `update_emotion`.
    pub fn update_emotion(&self, args: UpdateEmotionArgs) -> Result<Value, ToolError> {
        let intensity = args.intensity.unwrap_or(1.0);
        if !intensity.is_finite() {
            return Err(ToolError(format!("intensity = {intensity} is invalid: give a number (clamped to 0..2)")));
        }
        if !crate::emotion::is_known_event(&args.event_type) {
            tracing::info!(event_type = %args.event_type, "unknown emotional event: small arousal rise");
        }
        tracing::info!(event_type = %args.event_type, intensity, context = args.context.as_deref().unwrap_or(""), "update_emotion");
        Ok(json!(self.mood.update(&args.event_type, intensity)))
    }

    pub fn reset_emotion(&self) -> Value {
        json!(self.mood.reset())
    }

    pub fn get_emotion(&self) -> Value {
        json!(self.mood.snapshot())
    }

    /// `emotion://events`: event name to `[valence_delta, arousal_delta]`.
    pub fn emotion_events() -> Value {
        Value::Object(EVENTS.iter().map(|(name, (dv, da))| (name.to_string(), json!([dv, da]))).collect())
    }

    /// `get_capabilities`.
    pub async fn capabilities(&self) -> Value {
        let info = self.engine.info();
        let load = self.engine.load().await.unwrap_or_default();
        json!({
            "context_length": info.context_length,
            "max_tokens": self.defaults.max_tokens,
            "backend": "llama-cpp",
            "model_path": info.model_path,
            "temperature": self.defaults.temperature,
            "top_p": self.defaults.top_p,
            "top_k": self.defaults.top_k,
            "min_p": self.defaults.min_p,
            "repeat_penalty": self.defaults.repeat_penalty,
            "model_name": info.model_name,
            "architecture": info.architecture,
            "parameters": info.parameters,
            "model_size_bytes": info.model_size_bytes,
            "context_length_train": info.context_length_train,
            "chat_format": info.chat_format,
            "threads": info.threads,
            "gpu_layers": info.gpu_layers,
            "gpu_offload_supported": info.gpu_offload_supported,
            "slots": info.slots,
            "max_step_ms": info.max_step_ms,
            "streaming": true,
            "function_calling": true,
            "tool_call_format": self.native_tools().map(|f| f.name()).unwrap_or("generic"),
            "emotional_modulation": true,
            "emotional_steering": load.steering.enabled,
            "emotional_steering_reason": load.steering.reason,
            "steering": load.steering,
            "steering_strength": self.mood.strength(),
            "active_streams": self.open_streams(),
            "active_generations": load.active,
            "queued_generations": load.queued,
            "cached_tokens": load.cached_tokens,
            "slot_states": load.slots,
        })
    }
}

/// Drive a generation to its end, forwarding progress; `cancel` stops it.
async fn run_to_end(
    mut generation: Generation,
    cancel: CancellationToken,
    progress: Option<mpsc::UnboundedSender<Progress>>,
) -> Result<Completion, ToolError> {
    let mut tokens = 0;
    loop {
        let event = tokio::select! {
            event = generation.events.recv() => event,
            _ = cancel.cancelled() => {
                generation.cancel.cancel();
                return Err(ToolError("request cancelled".into()));
            }
        };
        match event {
            Some(GenerationEvent::Text(text)) => {
                if let Some(p) = &progress {
                    let _ = p.send((tokens, text));
                }
            }
            Some(GenerationEvent::Tokens(n)) => tokens = n,
            Some(GenerationEvent::Done(c)) => return Ok(c),
            Some(GenerationEvent::Failed(e)) => return Err(e.into()),
            None => return Err(engine::EngineError::Stopped.into()),
        }
    }
}

fn validate_messages(messages: &[Message]) -> Result<(), ToolError> {
    if messages.is_empty() {
        return Err(ToolError("messages is empty: give at least one {\"role\", \"content\"} message".into()));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ToolError(format!(
                "messages[{i}].role {:?} is unknown: expected one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
        for (j, call) in m.tool_calls.iter().flatten().enumerate() {
            let function = call.get("function").unwrap_or(call);
            if !function.get("name").is_some_and(Value::is_string) {
                return Err(ToolError(format!(
                    "messages[{i}].tool_calls[{j}] has no function name: expected \
                     {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": \"{{...}}\"}}}}"
                )));
            }
        }
    }
    Ok(())
}
