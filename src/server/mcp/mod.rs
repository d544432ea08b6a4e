//! The MCP surface (rmcp): the nine tools and two resources of
//! `shared/docs/wire.md`. Handlers are thin: parse typed arguments, call one
//! [`Inference`] method, wrap the JSON object in one text block (with
//! `isError: true` on failure).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
// MCP's logging capability is deprecated in newer protocol versions (SEP-2577)
// but current clients and the Inspector still use it.
#[allow(deprecated)]
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam, SetLevelRequestParams};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::server::core::{EMOTION_EVENTS_URI, EMOTION_STATE_URI, METRICS_URI, FunctionCallArgs, GenerateArgs, Inference, Owner, Progress, RequestError, UpdateEmotionArgs};
use crate::session::Recorder;

pub mod wire;
use wire::{input_schema, output_schema, parse_args, StreamArgs};

/// The server handler; cheap to clone (rmcp runs each request in its own task).
#[derive(Clone)]
pub struct ElpisServer {
    inference: Arc<Inference>,
    /// Notes stream ids in the session file when ELPIS_RECORD is set.
    recorder: Option<Arc<Recorder>>,
    /// One of several HTTP sessions (None: the one stdio session).
    session: Option<Arc<SessionGuard>>,
}

/// One HTTP session, alive as long as rmcp holds its handler: when it goes
/// (DELETE, idle timeout), its generations are cancelled and its streams
/// dropped.
pub struct SessionGuard {
    id: u64,
    /// Cancels the session's calls in flight.
    cancel: CancellationToken,
    inference: Arc<Inference>,
    /// Sessions open, for `server.max_sessions`.
    open: Arc<AtomicUsize>,
}

impl SessionGuard {
    pub fn new(inference: &Arc<Inference>, open: &Arc<AtomicUsize>) -> Arc<SessionGuard> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        open.fetch_add(1, Ordering::Relaxed);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = id, "HTTP session opened");
        Arc::new(SessionGuard { id, cancel: CancellationToken::new(), inference: Arc::clone(inference), open: Arc::clone(open) })
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        tracing::info!(session = self.id, "HTTP session ended: its generations stop, its streams go");
        self.cancel.cancel();
        self.inference.end_session(Some(self.id));
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ElpisServer {
    pub fn new(inference: Arc<Inference>, recorder: Option<Arc<Recorder>>) -> Self {
        ElpisServer { inference, recorder, session: None }
    }

    /// The handler of one HTTP session.
    pub fn for_session(inference: Arc<Inference>, session: Arc<SessionGuard>) -> Self {
        ElpisServer { inference, recorder: None, session: Some(session) }
    }

    /// Whose streams this handler sees.
    fn owner(&self) -> Owner {
        self.session.as_ref().map(|s| s.id)
    }

    /// A request's cancellation: its own, and its session's end. Hold the
    /// guard for the call: its drop ends the task that joins the two.
    fn cancel_token(&self, ctx: &RequestContext<RoleServer>) -> (CancellationToken, Option<DropGuard>) {
        let Some(session) = &self.session else { return (ctx.ct.clone(), None) };
        let both = session.cancel.child_token();
        let (request, watch) = (ctx.ct.clone(), both.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = request.cancelled() => watch.cancel(),
                _ = watch.cancelled() => {}
            }
        });
        (both.clone(), Some(both.drop_guard()))
    }

    pub fn inference(&self) -> &Arc<Inference> {
        &self.inference
    }

    async fn dispatch(&self, request: CallToolRequestParams, ctx: RequestContext<RoleServer>) -> Result<Value, RequestError> {
        let inference = &self.inference;
        let name = request.name.as_ref();
        let args = request.arguments;
        match name {
            "generate" => {
                let args: GenerateArgs = parse_args(name, args).map_err(RequestError::invalid)?;
                let (progress, forwarder) = progress_forwarder(&ctx).unzip();
                let (cancel, _call) = self.cancel_token(&ctx);
                let result = inference.generate(args, cancel, progress).await;
                // Every progress notification goes out before the response.
                if let Some(forwarder) = forwarder {
                    let _ = forwarder.await;
                }
                result
            }
            "generate_stream_start" => {
                let started = inference.stream_start(self.owner(), parse_args(name, args).map_err(RequestError::invalid)?).await;
                if let (Some(recorder), Ok(result)) = (&self.recorder, &started) {
                    let id = serde_json::to_value(&ctx.id).unwrap_or(Value::Null);
                    recorder.stream_started(id, result["stream_id"].as_str().unwrap_or_default());
                }
                started
            }
            "generate_stream_read" => {
                let args: StreamArgs = parse_args(name, args).map_err(RequestError::invalid)?;
                inference.stream_read(self.owner(), &args.stream_id)
            }
            "generate_stream_cancel" => {
                let args: StreamArgs = parse_args(name, args).map_err(RequestError::invalid)?;
                inference.stream_cancel(self.owner(), &args.stream_id)
            }
            "function_call" => {
                let args: FunctionCallArgs = parse_args(name, args).map_err(RequestError::invalid)?;
                let (cancel, _call) = self.cancel_token(&ctx);
                inference.function_call(args, cancel).await
            }
            "update_emotion" => {
                let args: UpdateEmotionArgs = parse_args(name, args).map_err(RequestError::invalid)?;
                inference.update_emotion(args)
            }
            "reset_emotion" => Ok(inference.reset_emotion()),
            "get_emotion" => Ok(inference.get_emotion()),
            "get_capabilities" => Ok(inference.capabilities().await),
            other => Err(RequestError::invalid(format!(
                "unknown tool {other:?}: the tools are {}",
                TOOLS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// When the request carries a progress token, a channel whose updates are
/// sent as `notifications/progress` (message = the new text), and the task
/// sending them (it ends when the channel's sender is dropped). While a
/// notification waits on a slow reader, the updates that arrive meanwhile
/// are coalesced into the next one, so nothing piles up per token.
fn progress_forwarder(
    ctx: &RequestContext<RoleServer>,
) -> Option<(mpsc::UnboundedSender<Progress>, tokio::task::JoinHandle<()>)> {
    let token = ctx.meta.get_progress_token()?;
    let peer = ctx.peer.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let task = tokio::spawn(async move {
        let mut count = 0.0;
        while let Some((mut tokens, mut text)) = rx.recv().await {
            while let Ok((more_tokens, more_text)) = rx.try_recv() {
                tokens = more_tokens;
                text.push_str(&more_text);
            }
            // Progress must increase with every notification.
            count = f64::max(count + 1.0, tokens as f64);
            let param = ProgressNotificationParam::new(token.clone(), count).with_message(text);
            if peer.notify_progress(param).await.is_err() {
                break;
            }
        }
    });
    Some((tx, task))
}

/// One tool as `tools/list` shows it.
struct ToolDoc {
    name: &'static str,
    title: &'static str,
    description: &'static str,
    read_only: bool,
    idempotent: bool,
    destructive: bool,
}

/// Every tool, in `tools/list` order.
const TOOLS: [ToolDoc; 9] = [
    ToolDoc { name: "generate", title: "Generate a reply", description: "Generate a reply to a conversation. Returns {content, emotional_state, modulated_params}.", read_only: false, idempotent: false, destructive: false },
    ToolDoc { name: "generate_stream_start", title: "Start a streamed reply", description: "Start generating a reply in the background. Returns {stream_id, status, emotional_state}; poll generate_stream_read.", read_only: false, idempotent: false, destructive: false },
    ToolDoc { name: "generate_stream_read", title: "Read a stream", description: "Read the text a stream produced since the last read: {new_content, is_complete, total_tokens}; once complete also full_content and emotional_state.", read_only: true, idempotent: false, destructive: false },
    ToolDoc { name: "generate_stream_cancel", title: "Cancel a stream", description: "Stop a stream and free its resources.", read_only: false, idempotent: true, destructive: true },
    ToolDoc { name: "function_call", title: "Call a tool", description: "Let the model call one of the given OpenAI-format tools. Returns {tool_calls, emotional_state}.", read_only: false, idempotent: false, destructive: false },
    ToolDoc { name: "update_emotion", title: "Apply an emotional event", description: "Apply an emotional event (success, failure, insight, ...) at an intensity 0..2. Returns the emotional state.", read_only: false, idempotent: false, destructive: false },
    ToolDoc { name: "reset_emotion", title: "Reset the emotional state", description: "Return the emotional state to its baseline.", read_only: false, idempotent: true, destructive: true },
    ToolDoc { name: "get_emotion", title: "Get the emotional state", description: "The current emotional state (valence, arousal, quadrant, trajectory).", read_only: true, idempotent: true, destructive: false },
    ToolDoc { name: "get_capabilities", title: "Get the server's capabilities", description: "Model and server facts: context_length, max_tokens, backend, model_path, sampling defaults.", read_only: true, idempotent: true, destructive: false },
];

fn tool_list(default_max_tokens: u32) -> Vec<Tool> {
    TOOLS
        .iter()
        .map(|t| {
            let annotations = ToolAnnotations::with_title(t.title)
                .read_only(t.read_only)
                .destructive(t.destructive)
                .idempotent(t.idempotent)
                .open_world(false);
            Tool::new(t.name, t.description, Arc::new(input_schema(t.name, default_max_tokens)))
                .with_title(t.title)
                .with_raw_output_schema(Arc::new(output_schema(t.name)))
                .with_annotations(annotations)
        })
        .collect()
}

/// A result: the object as one text block (what Psyche reads) and, when it
/// succeeded, the same object as structured content.
fn tool_result(value: Value, is_error: bool) -> CallToolResult {
    if is_error {
        CallToolResult::error(vec![ContentBlock::text(value.to_string())])
    } else {
        CallToolResult::structured(value)
    }
}

impl ServerHandler for ElpisServer {
    #[allow(deprecated)]
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().enable_logging().build())
            .with_server_info(Implementation::new("elpis-server", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Elpis: local LLM inference with an emotional state. Tools return one JSON text block; \
                 failures are {\"error\": ...}.",
            )
    }

    /// `logging/setLevel`: from now on, log events at that level and above
    /// (as far as `logging.level` lets them through) go to the client as
    /// `notifications/message`.
    #[allow(deprecated)]
    async fn set_level(&self, request: SetLevelRequestParams, ctx: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        let level = match request.level {
            LoggingLevel::Debug => tracing::Level::DEBUG,
            LoggingLevel::Info | LoggingLevel::Notice => tracing::Level::INFO,
            LoggingLevel::Warning => tracing::Level::WARN,
            _ => tracing::Level::ERROR,
        };
        let mut events = crate::logging::client_log_events();
        let peer = ctx.peer.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let level = match event.level {
                    tracing::Level::ERROR => LoggingLevel::Error,
                    tracing::Level::WARN => LoggingLevel::Warning,
                    tracing::Level::INFO => LoggingLevel::Info,
                    _ => LoggingLevel::Debug,
                };
                let param = LoggingMessageNotificationParam::new(level, json!(event.message)).with_logger(event.target);
                if peer.notify_logging_message(param).await.is_err() {
                    return;
                }
            }
        });
        crate::logging::set_client_level(level);
        tracing::info!(?level, "the client set its log level");
        Ok(())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tool_list(self.inference.default_max_tokens())))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tool = request.name.to_string();
        let result = match self.dispatch(request, ctx).await {
            Ok(value) => tool_result(value, false),
            Err(e) => {
                tracing::info!(tool, error = %e, "tool failed");
                tool_result(json!({"error": e.message}), true)
            }
        };
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let resource = |uri: &str, name: &str, description: &str| {
            let mut r = Resource::new(uri, name);
            r.description = Some(description.into());
            r.mime_type = Some("application/json".into());
            r
        };
        Ok(ListResourcesResult::with_all_items(vec![
            resource(EMOTION_STATE_URI, "emotional-state", "The current emotional state object"),
            resource(EMOTION_EVENTS_URI, "emotional-events", "Event name to [valence_delta, arousal_delta]"),
            resource(METRICS_URI, "metrics", "The server's cumulative figures: generations, tokens, seconds, refusals, and its load now"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let value = match request.uri.as_str() {
            EMOTION_STATE_URI => self.inference.get_emotion(),
            EMOTION_EVENTS_URI => Inference::emotion_events(),
            METRICS_URI => self.inference.metrics().await,
            other => {
                return Err(ErrorData::resource_not_found(
                    format!("resource {other:?} not found: the resources are {EMOTION_STATE_URI}, {EMOTION_EVENTS_URI} and {METRICS_URI}"),
                    None,
                ))
            }
        };
        let contents = ResourceContents::text(value.to_string(), request.uri.clone()).with_mime_type("application/json");
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}
