//! What the tools do: validate a request, turn it into an engine
//! [`GenerationRequest`] with the mood's sampling, run or stream it, and shape
//! the result object of `shared/docs/wire.md`. The MCP layer only parses
//! arguments and calls one method here; the `chat` command uses it too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ModelConfig, ServerConfig, ToolFormat};
use crate::emotion::EVENTS;
use crate::engine::{self, Completion, EngineHandle, FinishReason, Generation, GenerationEvent, GenerationRequest, Interest, SamplingParams, Speculation};
use crate::prompt::{self, CallGuard, Message, NativeToolFormat, ROLES};
use super::args::{Controls, FunctionCallArgs, GenerateArgs, UpdateEmotionArgs};
use super::calls::{self, ToolUse};
use super::controls;
use super::error::RequestError;
use super::metrics::Metrics;
use super::mood::Mood;
use super::streams::{Owner, StreamEnd, StreamRegistry};

/// The names of the core's readable views (the mood, its events, the
/// metrics): MCP serves them as resources, and capabilities lists them.
pub const EMOTION_STATE_URI: &str = "emotion://state";
pub const EMOTION_EVENTS_URI: &str = "emotion://events";
pub const METRICS_URI: &str = "elpis://metrics";

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
    /// The cumulative figures of `elpis://metrics`.
    metrics: Arc<Metrics>,
}

/// A generation request, validated, and what its result carries beyond text.
struct Prepared {
    request: GenerationRequest,
    used: SamplingParams,
    /// Tools the reply may call (`tools` given).
    tools: Option<ToolUse>,
    /// The reply must be JSON (`response_format`).
    json: bool,
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
            metrics: Arc::default(),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, StreamRegistry> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validate and build the engine request (messages, length, sampling
    /// and the other controls); the sampling actually used comes with it.
    fn request(
        &self,
        messages: Vec<Message>,
        max_tokens: Option<i64>,
        temperature: Option<f64>,
        modulate: bool,
        controls: &Controls,
        stop: Option<&Vec<String>>,
        text: Option<String>,
    ) -> Result<(GenerationRequest, SamplingParams), RequestError> {
        match &text {
            None => validate_messages(&messages)?,
            Some(_) if !messages.is_empty() => return Err(RequestError::invalid("give a prompt or messages, not both")),
            Some(text) if text.is_empty() => return Err(RequestError::invalid("prompt is empty: give the text to continue")),
            Some(_) => {}
        }
        let context = self.engine.info().context_length;
        let max_tokens = match max_tokens {
            None => self.defaults.max_tokens,
            Some(n) if n < 1 => {
                return Err(RequestError::invalid(format!("max_tokens = {n} is invalid: it must be at least 1")));
            }
            // Beyond the context the generation stops at its end anyway.
            Some(n) => n.min(context as i64) as u32,
        };
        let used = controls::sampling(&self.defaults, || self.mood.modulation(), temperature, modulate, controls)?;
        let stop = controls::stops(stop)?;
        let prediction = controls::prediction(controls.prediction.as_ref())?;
        let waiting = self.engine.waiting();
        if waiting >= self.max_queued {
            self.metrics.refused();
            return Err(RequestError::busy(format!(
                "busy: {waiting} generations are already waiting for a slot (server.max_queued = {}): \
                 try again when some have finished",
                self.max_queued
            )));
        }
        let request = GenerationRequest {
            messages,
            text,
            max_tokens,
            sampling: used.clone(),
            grammar: None,
            tools: None,
            interest: None,
            stop,
            speculative: controls.speculative.unwrap_or(true),
            prediction,
            logprobs: controls::logprobs(controls)?,
        };
        Ok((request, used))
    }

    /// `generate` and `generate_stream_start` arguments, validated, with
    /// their tools or JSON constraint set up.
    async fn prepare(&self, args: GenerateArgs) -> Result<Prepared, RequestError> {
        let modulate = args.modulation();
        if args.tools.is_some() && args.response_format.is_some() {
            return Err(RequestError::invalid("tools and response_format cannot be combined: give one of them"));
        }
        if args.tools.is_none() && args.tool_choice.is_some() {
            return Err(RequestError::invalid("tool_choice needs tools: give the tools the model may call"));
        }
        let schema = prompt::response_format::schema(args.response_format.as_ref()).map_err(RequestError::invalid)?;
        let (mut request, used) =
            self.request(args.messages, args.max_tokens, args.temperature, modulate, &args.controls, args.stop.as_ref(), args.prompt)?;
        let tools = match &args.tools {
            Some(tools) => Some(ToolUse::prepare(&self.engine, self.native_tools(), tools, args.tool_choice.as_ref(), &mut request).await?),
            None => None,
        };
        if let Some(schema) = &schema {
            calls::json_reply(&self.engine, schema, &mut request).await?;
        }
        Ok(Prepared { request, used, tools, json: schema.is_some() })
    }

    /// `generate`: run to the end (or until `cancel`), sending progress when asked.
    pub async fn generate(
        &self,
        args: GenerateArgs,
        cancel: CancellationToken,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<Value, RequestError> {
        let Prepared { request, used, tools, json } = self.prepare(args).await?;
        let mut guard = tools.as_ref().map(ToolUse::guard);
        let completion = self.run(request, cancel, progress.as_ref(), guard.as_mut()).await?;
        if completion.finish_reason != FinishReason::Cancelled {
            self.mood.react_to_response(&completion.text);
        }
        let extra = completion_fields(&completion, tools.as_ref(), json);
        if let (Some(g), Some(p)) = (guard.as_mut(), &progress) {
            // Held-back text that was no call after all goes out last.
            let had_calls = extra.get("tool_calls").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
            let rest = g.finish(had_calls);
            if !rest.is_empty() {
                let _ = p.send((completion.usage.completion_tokens, rest));
            }
        }
        let mut out = json!({
            "content": completion.text,
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
        });
        if let Value::Object(map) = &mut out {
            map.extend(extra);
        }
        Ok(out)
    }

    /// Queue `request` and drive it to its end, counted in the metrics.
    async fn run(
        &self,
        request: GenerationRequest,
        cancel: CancellationToken,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
        guard: Option<&mut CallGuard>,
    ) -> Result<Completion, RequestError> {
        self.metrics.queued();
        let result = run_to_end(self.engine.generate(request), cancel, progress, guard).await;
        match &result {
            Ok(c) => self.metrics.ended(c),
            Err(_) => self.metrics.failed(),
        }
        result
    }

    /// `generate_stream_start`: queue the generation, register the stream and
    /// pump its events into the registry in the background.
    pub async fn stream_start(&self, owner: Owner, args: GenerateArgs) -> Result<Value, RequestError> {
        let Prepared { mut request, used, tools, json } = self.prepare(args).await?;
        let cancel = CancellationToken::new();
        let interest = Interest::new(Instant::now());
        request.interest = Some(interest.clone());
        let id = self.streams().start(owner, cancel.clone(), interest.clone(), Instant::now())?;
        self.metrics.queued();
        let pump = StreamPump {
            generation: self.engine.generate(request),
            streams: Arc::clone(&self.streams),
            mood: Arc::clone(&self.mood),
            metrics: Arc::clone(&self.metrics),
            stream_id: id.clone(),
            idle_limit: self.stream_idle,
            interest,
            cancel,
            guard: tools.as_ref().map(ToolUse::guard),
            tools,
            json,
        };
        tokio::spawn(pump.run());
        Ok(json!({
            "stream_id": id,
            "status": "started",
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
        }))
    }

    /// `generate_stream_read`.
    pub fn stream_read(&self, owner: Owner, stream_id: &str) -> Result<Value, RequestError> {
        self.metrics.quick_call();
        let read = self.streams().read(owner, stream_id)?;
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
                StreamEnd::Finished(_, extra) => {
                    if let Value::Object(map) = &mut out {
                        map.extend(extra);
                    }
                }
                StreamEnd::Failed(message) => out["error"] = json!(message),
            }
        }
        Ok(out)
    }

    /// `generate_stream_cancel`.
    pub fn stream_cancel(&self, owner: Owner, stream_id: &str) -> Result<Value, RequestError> {
        self.metrics.quick_call();
        self.streams().cancel(owner, stream_id)?;
        Ok(json!({"status": "cancelled", "stream_id": stream_id}))
    }

    /// `max_tokens` when a request gives none (the config's).
    /// The loaded model's facts.
    pub fn model_info(&self) -> &engine::ModelInfo {
        self.engine.info()
    }

    pub fn default_max_tokens(&self) -> u32 {
        self.defaults.max_tokens
    }

    /// Open streams (for capabilities and tests).
    pub fn open_streams(&self) -> usize {
        self.streams().len()
    }

    /// A session ended: its streams stop and go.
    pub fn end_session(&self, owner: Owner) {
        self.streams().cancel_owned(owner);
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
    pub async fn function_call(&self, args: FunctionCallArgs, cancel: CancellationToken) -> Result<Value, RequestError> {
        validate_messages(&args.messages)?;
        let max_tokens = FUNCTION_CALL_MAX_TOKENS.min(self.defaults.max_tokens);
        let (mut request, used) =
            self.request(args.messages, Some(max_tokens as i64), args.temperature, true, &args.controls, None, None)?;
        let tools = ToolUse::prepare(&self.engine, self.native_tools(), &args.tools, args.tool_choice.as_ref(), &mut request).await?;
        let completion = self.run(request, cancel, None, None).await?;
        let mut out = json!({
            "emotional_state": self.mood.snapshot(),
            "modulated_params": used,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
            "timings": completion.timings,
        });
        if let Value::Object(map) = &mut out {
            map.extend(tools.read(&completion));
        }
        Ok(out)
    }

    /// `update_emotion`.
    pub fn update_emotion(&self, args: UpdateEmotionArgs) -> Result<Value, RequestError> {
        self.metrics.quick_call();
        let intensity = args.intensity.unwrap_or(1.0);
        if !intensity.is_finite() {
            return Err(RequestError::invalid(format!("intensity = {intensity} is invalid: give a number (clamped to 0..2)")));
        }
        if !crate::emotion::is_known_event(&args.event_type) {
            tracing::info!(event_type = %args.event_type, "unknown emotional event: small arousal rise");
        }
        tracing::info!(event_type = %args.event_type, intensity, context = args.context.as_deref().unwrap_or(""), "update_emotion");
        Ok(json!(self.mood.update(&args.event_type, intensity)))
    }

    pub fn reset_emotion(&self) -> Value {
        self.metrics.quick_call();
        json!(self.mood.reset())
    }

    pub fn get_emotion(&self) -> Value {
        self.metrics.quick_call();
        json!(self.mood.snapshot())
    }

    /// `emotion://events`: event name to `[valence_delta, arousal_delta]`.
    pub fn emotion_events() -> Value {
        Value::Object(EVENTS.iter().map(|(name, (dv, da))| (name.to_string(), json!([dv, da]))).collect())
    }

    /// `elpis://metrics`: the totals since start, with the engine's load now.
    pub async fn metrics(&self) -> Value {
        let (totals, uptime_s) = self.metrics.snapshot();
        let load = self.engine.load().await.unwrap_or_default();
        self.metrics.load_read(load.from_last_turn);
        let cells: usize = load.slots.iter().map(|s| s.tokens).sum();
        let mut out = json!(totals);
        out["uptime_s"] = json!(uptime_s);
        out["busy_slots"] = json!(load.active);
        out["queued_generations"] = json!(load.queued);
        out["kv_cells_in_use"] = json!(cells);
        out["active_streams"] = json!(self.open_streams());
        out["engine_tokens_generated"] = json!(load.tokens_generated);
        out
    }

    /// `get_capabilities`.
    pub async fn capabilities(&self) -> Value {
        let info = self.engine.info();
        let load = self.engine.load().await.unwrap_or_default();
        self.metrics.load_read(load.from_last_turn);
        let mut out = json!({
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
            "gpu": info.gpu,
            "cpu_features": info.cpu_features,
            "wide_weights": info.wide_weights,
            "huge_pages": info.huge_pages,
            "pinned_cpus": info.pinned_cpus,
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
        });
        // (In two parts: one json! of all of it is past the macro's recursion limit.)
        let more = json!({
            "kv_cache_type": info.kv_cache_type,
            "kv_bytes": info.kv_bytes,
            "prompt_cache": load.prompt_cache,
            "speculative": {
                "enabled": info.speculative != Speculation::Off,
                "mode": info.speculative,
                "sources": if info.speculative == Speculation::Off { json!([]) } else { json!(["prompt-lookup", "prediction"]) },
                "draft_model": null,
            },
            "generation_controls": ["stop", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "seed", "response_format", "tools", "tool_choice", "speculative", "prediction",
                "logprobs", "top_logprobs"],
            "resources": [EMOTION_STATE_URI, EMOTION_EVENTS_URI, METRICS_URI],
        });
        if let (Value::Object(out), Value::Object(more)) = (&mut out, more) {
            out.extend(more);
        }
        out
    }
}

/// What a finished reply's result carries besides its text: the
/// completion's facts, and its calls or JSON reading.
fn completion_fields(completion: &Completion, tools: Option<&ToolUse>, json: bool) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("finish_reason".into(), json!(completion.finish_reason));
    if let Some(stop) = &completion.stop_sequence {
        out.insert("stop_sequence".into(), json!(stop));
    }
    out.insert("usage".into(), json!(completion.usage));
    out.insert("timings".into(), json!(completion.timings));
    out.insert("truncated".into(), json!(completion.truncated));
    if let Some(logprobs) = &completion.logprobs {
        out.insert("logprobs".into(), json!({"content": logprobs}));
    }
    if let Some(tools) = tools {
        out.extend(tools.read(completion));
    }
    if json {
        if let Some(problem) = calls::json_problem(completion) {
            out.insert("parse_error".into(), json!(problem));
        }
    }
    out
}

/// Drive a generation to its end, forwarding progress (text a tool call's
/// `guard` lets through); `cancel` stops it.
async fn run_to_end(
    mut generation: Generation,
    cancel: CancellationToken,
    progress: Option<&mpsc::UnboundedSender<Progress>>,
    mut guard: Option<&mut CallGuard>,
) -> Result<Completion, RequestError> {
    let mut tokens = 0;
    loop {
        let event = tokio::select! {
            event = generation.events.recv() => event,
            _ = cancel.cancelled() => {
                generation.cancel.cancel();
                return Err(RequestError::invalid("request cancelled"));
            }
        };
        match event {
            Some(GenerationEvent::Text(text)) => {
                let text = match &mut guard {
                    Some(g) => g.push(&text),
                    None => text,
                };
                if let (Some(p), false) = (progress, text.is_empty()) {
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

/// A stream's generation, pumped into the registry: text as it comes (what
/// a tool call's guard lets through), abandonment when nobody reads, and
/// the ending with its result's fields.
struct StreamPump {
    generation: Generation,
    streams: Arc<Mutex<StreamRegistry>>,
    mood: Arc<Mood>,
    metrics: Arc<Metrics>,
    stream_id: String,
    idle_limit: Duration,
    interest: Interest,
    cancel: CancellationToken,
    tools: Option<ToolUse>,
    guard: Option<CallGuard>,
    json: bool,
}

impl StreamPump {
    async fn run(mut self) {
        let stream_cancel = self.generation.cancel.clone();
        let mut abandoned = false;
        // Cancelled (by its reader, its session's end or shutdown): the
        // generation is told to stop, and its end is still waited for, so
        // the metrics count it.
        let mut cancelled = false;
        // Checks whether anybody still reads the stream (an interval keeps
        // its tick when another branch wins, unlike a fresh sleep per event).
        let mut watch = tokio::time::interval(self.idle_limit.div_f64(4.0).min(Duration::from_secs(1)));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                event = self.generation.events.recv() => event,
                _ = self.cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    stream_cancel.cancel();
                    continue;
                }
                _ = watch.tick(), if !abandoned => {
                    // Nobody read it for the idle limit: stop generating for nobody.
                    if self.interest.idle_s(Instant::now()) >= self.idle_limit.as_secs_f64() {
                        tracing::info!(stream_id = %self.stream_id, "stream unread for {:.1} s: abandoned, generation stopped", self.idle_limit.as_secs_f64());
                        abandoned = true;
                        stream_cancel.cancel();
                    }
                    continue;
                }
            };
            let mut registry = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            match event {
                Some(GenerationEvent::Text(text)) => {
                    let text = match &mut self.guard {
                        Some(g) => g.push(&text),
                        None => text,
                    };
                    registry.push_text(&self.stream_id, &text);
                }
                Some(GenerationEvent::Tokens(n)) => registry.set_tokens(&self.stream_id, n),
                Some(GenerationEvent::Done(mut completion)) => {
                    if abandoned && completion.finish_reason == FinishReason::Cancelled {
                        completion.finish_reason = FinishReason::Abandoned;
                    }
                    self.metrics.ended(&completion);
                    let extra = completion_fields(&completion, self.tools.as_ref(), self.json);
                    if let Some(g) = &mut self.guard {
                        let had_calls = extra.get("tool_calls").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
                        registry.push_text(&self.stream_id, &g.finish(had_calls));
                    }
                    let finished = completion.finish_reason != FinishReason::Cancelled;
                    let text = completion.text.clone();
                    registry.end(&self.stream_id, StreamEnd::Finished(completion, extra));
                    drop(registry);
                    if finished {
                        self.mood.react_to_response(&text);
                    }
                    return;
                }
                Some(GenerationEvent::Failed(e)) => {
                    self.metrics.failed();
                    registry.end(&self.stream_id, StreamEnd::Failed(e.to_string()));
                    return;
                }
                None => {
                    registry.end(&self.stream_id, StreamEnd::Failed(engine::EngineError::Stopped.to_string()));
                    return;
                }
            }
        }
    }
}

fn validate_messages(messages: &[Message]) -> Result<(), RequestError> {
    if messages.is_empty() {
        return Err(RequestError::invalid("messages is empty: give at least one {\"role\", \"content\"} message"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(RequestError::invalid(format!(
                "messages[{i}].role {:?} is unknown: expected one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
        for (j, call) in m.tool_calls.iter().flatten().enumerate() {
            let function = call.get("function").unwrap_or(call);
            if !function.get("name").is_some_and(Value::is_string) {
                return Err(RequestError::invalid(format!(
                    "messages[{i}].tool_calls[{j}] has no function name: expected \
                     {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": \"{{...}}\"}}}}"
                )));
            }
        }
    }
    Ok(())
}
