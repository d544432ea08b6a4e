//! [`Engine`]: the llama.cpp model and context, and the scheduler that steps
//! every running generation one batch at a time.
//!
//! Each slot is one KV sequence. A step puts into one batch the last sampled
//! token of every generating slot and a chunk of prompt tokens from slots
//! still reading their prompt, runs one `decode`, samples, and yields. The
//! chunk size adapts so a step stays near `max_step_ms`. A slot remembers
//! the tokens in its cells, so a prompt that extends an earlier one only
//! decodes the new suffix.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    chat_format, prompt, ChatFormat, ChatTemplate, Command, Completion, EngineError, EngineHandle, EngineLoad,
    EngineSettings, FinishReason, GenerationEvent, GenerationRequest, Interest, Message, ModelInfo, NativeToolFormat,
    SamplingParams, Segment, SlotReport, SteeringSource, TextDecoder, Usage,
};
use super::steering::Steering;

/// Smallest and largest prompt chunk one step may decode.
const MIN_CHUNK: usize = 8;
const MAX_CHUNK: usize = 128;
/// Steps are planned at this share of `max_step_ms`: the estimate lags, and
/// later prompt tokens cost more than earlier ones (attention grows).
const STEP_HEADROOM: f64 = 0.8;
/// Yields between two decode steps (a yield costs microseconds).
const YIELDS_PER_STEP: usize = 8;
/// Tokens a penalty sampler looks back over.
const PENALTY_LAST_N: i32 = 64;
/// Candidates the grammar checks at once when the sampled token was
/// rejected. llama.cpp decodes every candidate's text and, per grammar
/// level, reserves vectors the size of the whole array: over a 262k-token
/// vocabulary that was >100 MiB of temporaries the allocator then kept.
/// In chunks, best logits first, it is a few MiB, and usually one chunk.
const GRAMMAR_CHUNK: usize = 4096;

/// How a conversation becomes prompt text.
enum PromptFormat {
    /// The GGUF's own Jinja template (and its `tool_use` variant, for
    /// conversations with tools, when the GGUF has one).
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

/// One queued or running generation.
struct Job {
    /// Admission order: prompt chunks are served oldest first.
    id: u64,
    /// The tokens the slot must hold before the next sample: the prompt, or,
    /// for a job that yielded its slot, the prompt and the reply so far.
    prompt: Vec<LlamaToken>,
    /// Length of the prompt proper (cells kept as cache when the job ends).
    prompt_len: usize,
    /// Set once the job first had a slot (its cached-token count is final).
    started: bool,
    /// A polled stream's reader; None when a client waits on the call.
    interest: Option<Interest>,
    max_tokens: usize,
    sampler: LlamaSampler,
    grammar: Option<GrammarSampler>,
    decoder: TextDecoder,
    /// Sampled but not yet decoded: the input of this job's next step.
    pending: Option<LlamaToken>,
    text: String,
    usage: Usage,
    truncated: bool,
    events: mpsc::UnboundedSender<GenerationEvent>,
    cancel: CancellationToken,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Whether a client is waiting on this job right now: a call always, a
    /// stream while its reader keeps polling.
    fn attended(&self, now: Instant) -> bool {
        self.interest.as_ref().is_none_or(|i| i.attended(now))
    }
}

/// Grammar-constrained sampling by rejection: the normal chain picks a token
/// and the grammar only checks it; the whole vocabulary is masked (slow with
/// a large vocabulary) only when that token is not allowed.
struct GrammarSampler {
    grammar: LlamaSampler,
    /// Picks among the grammar-allowed tokens after a rejection.
    fallback: LlamaSampler,
}

/// One KV sequence and what it holds.
struct Slot {
    seq: i32,
    /// Exactly the tokens whose cells are in this sequence, by position.
    cached: Vec<LlamaToken>,
    job: Option<Job>,
    /// Tick of the last assignment, for least-recently-used choice.
    last_used: u64,
}

/// Adapts the prompt chunk to the measured cost of a token.
struct StepBudget {
    target_ms: f64,
    /// Moving average of milliseconds per batch token.
    ms_per_token: f64,
}

impl StepBudget {
    fn tokens(&self) -> usize {
        ((self.target_ms / self.ms_per_token) as usize).clamp(MIN_CHUNK, MAX_CHUNK)
    }

    fn observe(&mut self, tokens: usize, elapsed_ms: f64) {
        if tokens >= 4 && elapsed_ms.is_finite() && elapsed_ms > 0.0 {
            let sample = elapsed_ms / tokens as f64;
            self.ms_per_token = 0.7 * self.ms_per_token + 0.3 * sample;
        }
    }
}

/// The owner of llama.cpp. `!Send` by construction (see `_not_send`).
pub struct Engine {
    /// The thread that created the engine; every llama call asserts it.
    owner: ThreadId,
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    format: PromptFormat,
    stops: Vec<String>,
    /// Tokens one sequence may hold.
    n_ctx_seq: usize,
    /// Longest byte length of any token: bounds how few tokens a text can be.
    max_token_bytes: usize,
    /// Set when the model uses sliding-window attention and its caches are
    /// not full-size: then a cached prefix cannot be partially kept.
    swa_limited: bool,
    truncate_overflow: bool,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    commands: mpsc::UnboundedReceiver<Command>,
    budget: StepBudget,
    tick: u64,
    next_job_id: u64,
    /// Shared with the handles: generations not yet given a slot.
    waiting: Arc<AtomicUsize>,
    /// Set by a step that decoded something; cleared when the engine, idle
    /// again, has handed the memory its work no longer needs back to the OS.
    worked_since_trim: bool,
    /// Emotion steering: control vectors on the context.
    steering: Steering,
    /// Where the mood's steering coefficients are read.
    steering_source: Option<SteeringSource>,
    /// The server is shutting down: every generation ends as cancelled.
    closing: bool,
    /// Raw pointers are neither Send nor Sync: this makes `Engine` `!Send`.
    _not_send: PhantomData<*const ()>,
}

/// llama.cpp's backend, initialised once for the process (llama.cpp allows
/// one); every engine and measurement in the process shares it.
pub(super) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: std::sync::OnceLock<LlamaBackend> = std::sync::OnceLock::new();
    if let Some(backend) = BACKEND.get() {
        return Ok(backend);
    }
    let backend = LlamaBackend::init().map_err(|e| EngineError::Backend(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| backend))
}

/// Send llama.cpp's and ggml's log lines to `tracing`.
pub fn route_llama_logs() {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}

fn check_model_file(path: &std::path::Path) -> Result<(), EngineError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::ModelNotFound(path.to_path_buf()),
        _ => EngineError::ModelUnreadable { path: path.to_path_buf(), reason: e.to_string() },
    })?;
    if meta.is_dir() {
        return Err(EngineError::ModelIsDirectory(path.to_path_buf()));
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| EngineError::ModelUnreadable { path: path.to_path_buf(), reason: e.to_string() })?;
    if &magic != b"GGUF" {
        return Err(EngineError::ModelUnreadable {
            path: path.to_path_buf(),
            reason: "not a GGUF file (wrong magic bytes)".into(),
        });
    }
    Ok(())
}

impl Engine {
    /// Load the model and create the context on the calling thread, which
    /// from then on is the only thread that may touch them.
    pub fn load(settings: &EngineSettings) -> Result<(Engine, EngineHandle), EngineError> {
        check_model_file(&settings.model_path)?;
        let backend = backend()?;
        // The model lives as long as the process: leaking it lets the
        // context borrow it for 'static.
        let gpu_offload_supported = backend.supports_gpu_offload();
        let model_params = LlamaModelParams::default().with_n_gpu_layers(settings.gpu_layers);
        let model = LlamaModel::load_from_file(backend, &settings.model_path, &model_params)
            .map_err(|_| EngineError::ModelLoad(settings.model_path.clone()))?;
        let model: &'static LlamaModel = Box::leak(Box::new(model));

        let threads = match settings.n_threads {
            0 => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            n => n,
        };
        let parallel = settings.parallel.max(1);
        let n_ctx = settings.context_length.saturating_mul(parallel);
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch((MAX_CHUNK + 64) as u32)
            .with_n_ubatch(MAX_CHUNK as u32)
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            .with_swa_full(settings.swa_full)
            .with_n_threads(threads as i32)
            .with_n_threads_batch(threads as i32);
        let ctx = model
            .new_context(backend, ctx_params)
            .map_err(|_| EngineError::Context(n_ctx))?;
        let n_ctx_seq = (ctx.n_ctx() / parallel) as usize;

        let architecture = model.meta_val_str("general.architecture").unwrap_or_default();
        let model_name = model.meta_val_str("general.name").unwrap_or_default();
        let sliding_window = model
            .meta_val_str(&format!("{architecture}.attention.sliding_window"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let vocab = model.vocab();
        let source = |name: Option<&str>| model.chat_template(name).ok().and_then(|t| t.to_string().ok());
        let chat_source = source(None);
        let has_chat_template = chat_source.is_some();
        let inferred = ChatFormat::for_architecture(&architecture);
        let format = match (settings.chat_format, chat_source) {
            (ChatFormat::Auto | ChatFormat::Jinja, Some(text)) => {
                let (bos, eos) = (token_text(model, vocab.bos()), token_text(model, vocab.eos()));
                let compiled = ChatTemplate::new(&text, &bos, &eos).and_then(|chat| {
                    // A template that cannot render a plain exchange is broken.
                    chat.render(&[Message::new("system", "S"), Message::new("user", "U")], None, true)?;
                    Ok(chat)
                });
                match compiled {
                    Ok(chat) => {
                        let tool_use = source(Some("tool_use")).and_then(|t| ChatTemplate::new(&t, &bos, &eos).ok());
                        let fallback = (settings.chat_format == ChatFormat::Auto).then_some(inferred);
                        PromptFormat::Template { chat, tool_use, fallback, warned: std::cell::Cell::new(false) }
                    }
                    Err(e) if settings.chat_format == ChatFormat::Auto => {
                        tracing::warn!(
                            "the model's chat template does not work with Elpis ({e}); using the built-in {} format",
                            inferred.name()
                        );
                        PromptFormat::Builtin(inferred)
                    }
                    Err(e) => return Err(EngineError::Template(format!("the GGUF's chat template: {e}"))),
                }
            }
            (ChatFormat::Jinja, None) => {
                return Err(EngineError::Template(
                    "model.chat_format = \"jinja\" but the model has no tokenizer.chat_template".into(),
                ))
            }
            (ChatFormat::Auto, None) => PromptFormat::Builtin(inferred),
            (explicit, _) => PromptFormat::Builtin(explicit),
        };
        let (stops, format_name, native_tools) = match &format {
            PromptFormat::Builtin(f) => (f.stop_strings(), f.name().to_string(), None),
            PromptFormat::Template { chat, tool_use, .. } => {
                let tools_source = tool_use.as_ref().unwrap_or(chat).source();
                (
                    ChatFormat::for_template(chat.source(), &architecture).stop_strings(),
                    "gguf-template".to_string(),
                    NativeToolFormat::detect(tools_source),
                )
            }
        };
        let max_token_bytes = vocab
            .tokens()
            .map(|t| vocab.token_to_piece(t, true, None).len())
            .max()
            .unwrap_or(64)
            .max(1);

        let info = ModelInfo {
            model_path: settings.model_path.display().to_string(),
            model_name,
            architecture,
            context_length: n_ctx_seq as u32,
            context_length_train: model.n_ctx_train(),
            parameters: model.n_params(),
            model_size_bytes: model.size(),
            vocab_size: model.n_vocab(),
            chat_format: format_name,
            has_chat_template,
            native_tools,
            threads,
            gpu_layers: settings.gpu_layers,
            gpu_offload_supported,
            slots: parallel,
            max_step_ms: settings.max_step_ms,
            sliding_window_full: settings.swa_full,
        };
        tracing::info!(?info, "model loaded");
        let steering = Steering::new(settings.steering.clone(), model, &ctx, &settings.model_path, threads as i32);
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let slots = (0..parallel as i32)
            .map(|seq| Slot { seq, cached: Vec::new(), job: None, last_used: 0 })
            .collect();
        let engine = Engine {
            owner: std::thread::current().id(),
            model,
            ctx,
            batch: LlamaBatch::new(MAX_CHUNK + 64, parallel as i32),
            format,
            stops,
            n_ctx_seq,
            max_token_bytes,
            swa_limited: sliding_window > 0 && !settings.swa_full,
            truncate_overflow: settings.truncate_overflow,
            slots,
            queue: VecDeque::new(),
            commands: rx,
            budget: StepBudget { target_ms: settings.max_step_ms as f64 * STEP_HEADROOM, ms_per_token: 2.0 },
            tick: 0,
            next_job_id: 0,
            worked_since_trim: false,
            waiting: Arc::clone(&waiting),
            steering,
            steering_source: None,
            closing: false,
            _not_send: PhantomData,
        };
        Ok((engine, EngineHandle { commands: tx, info: Arc::new(info), waiting }))
    }

    /// The thread invariant: llama.cpp is only ever entered from the thread
    /// that created it. Cheap, always on.
    fn assert_owner_thread(&self) {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "llama.cpp entered from a thread other than the engine's owner"
        );
    }

    /// Serve commands until every handle is dropped. Yields after each step.
    pub async fn run(mut self) {
        loop {
            if self.is_idle() && !self.steering.busy() {
                if std::mem::take(&mut self.worked_since_trim) {
                    // Sampling and grammar temporaries over a large
                    // vocabulary are megabytes each; glibc keeps freed heap
                    // pages, so a finished tool would hold them for good.
                    super::sys::release_free_heap();
                }
                match self.commands.recv().await {
                    Some(command) => self.handle(command),
                    None => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.cancel_all();
                        return;
                    }
                }
            }
            self.reap_cancelled();
            let now = Instant::now();
            self.assign_slots(now);
            if self.steering.busy() {
                self.assert_owner_thread();
                self.steering.setup_slice(self.model);
            }
            if let (true, Some(source)) = (self.steering.is_on(), &self.steering_source) {
                self.steering.apply(source());
            }
            self.step(now);
            // Let every request that arrived during the step run its course
            // (read, dispatch, answer, write) before the next step: each hop
            // is a task woken in turn, and one yield only lets one round run.
            for _ in 0..YIELDS_PER_STEP {
                tokio::task::yield_now().await;
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.job.is_none())
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Generate { request, events, cancel } => {
                if self.closing {
                    // Shutting down: answered at once, as cancelled.
                    cancel.cancel();
                }
                match self.admit(request, events.clone(), cancel) {
                Ok(job) => self.queue.push_back(job),
                Err(e) => {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    let _ = events.send(GenerationEvent::Failed(e));
                }
                }
            }
            Command::Load(reply) => {
                let _ = reply.send(self.load_report());
            }
            Command::SteeringSource(source) => self.steering_source = Some(source),
            Command::CancelAll => {
                self.closing = true;
                self.cancel_all();
            }
            Command::SchemaGrammar(schema, reply) => {
                self.assert_owner_thread();
                let grammar = llama_cpp_2::json_schema_to_grammar(&schema)
                    .map_err(|e| EngineError::Grammar(format!("the tools' JSON schemas cannot be converted ({e})")));
                let _ = reply.send(grammar);
            }
        }
    }

    fn load_report(&self) -> EngineLoad {
        self.assert_owner_thread();
        EngineLoad {
            active: self.slots.iter().filter(|s| s.job.is_some()).count(),
            queued: self.queue.len(),
            cached_tokens: self.slots.iter().filter(|s| s.job.is_none()).map(|s| s.cached.len()).sum(),
            slots: self
                .slots
                .iter()
                .map(|s| SlotReport {
                    seq: s.seq,
                    busy: s.job.is_some(),
                    tokens: s.cached.len(),
                    kv_pos_max: self.ctx.kv_cache_seq_pos_max(s.seq),
                })
                .collect(),
            steering: self.steering.report(),
        }
    }

    /// Render, tokenize and check a request; build its sampler.
    fn admit(
        &mut self,
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
        cancel: CancellationToken,
    ) -> Result<Job, EngineError> {
        self.assert_owner_thread();
        let limit = self.n_ctx_seq.saturating_sub(1);
        let mut messages = request.messages;
        let mut truncated = false;
        let prompt = loop {
            let segments = self.render(&messages, request.tools.as_deref())?;
            let text_len: usize = segments.iter().map(|s| s.text.len()).sum();
            // A text longer than this cannot fit, whatever its tokens: refuse
            // it before spending time tokenising megabytes.
            let too_long_for_sure = text_len > limit.saturating_mul(self.max_token_bytes);
            let tokens = if too_long_for_sure { None } else { Some(self.tokenize(&segments)) };
            match tokens {
                Some(tokens) if tokens.len() <= limit => break tokens,
                _ if self.truncate_overflow && droppable(&messages).is_some() => {
                    // Drop, in one cut, the oldest turns that hold the
                    // excess, each measured once (not one turn per render
                    // and tokenisation of the whole conversation). Usually
                    // one more render then fits; at worst a second cut,
                    // with the markup's share then known, does.
                    let total = tokens.as_ref().map(Vec::len);
                    let cut = self.turns_covering(&messages, limit, total);
                    if let Some(first) = droppable(&messages) {
                        // Never the last message.
                        messages.drain(first..(first + cut).min(messages.len() - 1));
                    }
                    truncated = true;
                }
                tokens => {
                    let prompt = tokens.map(|t| t.len()).unwrap_or(text_len / self.max_token_bytes);
                    return Err(EngineError::PromptTooLong {
                        prompt,
                        limit,
                        context: self.n_ctx_seq as u32,
                    });
                }
            }
        };
        let sampler = self.sampler(&request.sampling);
        let grammar = match request.grammar.as_ref() {
            Some(g) => Some(GrammarSampler {
                grammar: if g.triggers.is_empty() {
                    LlamaSampler::grammar(self.model, &g.gbnf, "root")
                } else {
                    LlamaSampler::grammar_lazy_patterns(self.model, &g.gbnf, "root", &g.triggers, &[])
                }
                .map_err(|e| EngineError::Grammar(format!("llama.cpp rejected the grammar ({e})")))?,
                fallback: if request.sampling.temperature <= 0.0 {
                    LlamaSampler::greedy()
                } else {
                    LlamaSampler::chain_simple([
                        LlamaSampler::temp(request.sampling.temperature as f32),
                        LlamaSampler::dist(request.sampling.seed),
                    ])
                },
            }),
            None => None,
        };
        let id = self.next_job_id;
        self.next_job_id += 1;
        Ok(Job {
            id,
            usage: Usage { prompt_tokens: prompt.len() as u32, ..Usage::default() },
            prompt_len: prompt.len(),
            prompt,
            started: false,
            interest: request.interest,
            max_tokens: request.max_tokens.max(1) as usize,
            sampler,
            grammar,
            decoder: TextDecoder::new(self.stops.clone()),
            pending: None,
            text: String::new(),
            truncated,
            events,
            cancel,
        })
    }

    /// The prompt as segments: the template's text, whose special-token
    /// strings are parsed, and the data (contents, tool results, arguments,
    /// descriptions), tokenised as plain text. See [`prompt`].
    fn render(&self, messages: &[Message], tools: Option<&[serde_json::Value]>) -> Result<Vec<Segment>, EngineError> {
        let builtin = |format: ChatFormat| {
            let guarded: Vec<Message> = chat_format::calls_as_text(messages)
                .into_iter()
                .map(|m| Message { content: prompt::guard(&m.content), ..m })
                .collect();
            Ok(prompt::split(&format.render(&guarded)))
        };
        match &self.format {
            PromptFormat::Builtin(f) => builtin(*f),
            PromptFormat::Template { chat, tool_use, fallback, warned } => {
                let template = match (tools, tool_use) {
                    (Some(_), Some(t)) => t,
                    _ => chat,
                };
                match template.render(messages, tools, true) {
                    Ok(text) => Ok(prompt::split(&text)),
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
                        None => Err(EngineError::Template(e)),
                    },
                }
            }
        }
    }

    /// How many of the oldest droppable messages to drop so the prompt fits
    /// in `limit` tokens. Each message's text is tokenised once; the
    /// template's markup is shared out evenly from the whole prompt's `total`
    /// tokens when known (else guessed, for a prompt too long to tokenise).
    fn turns_covering(&self, messages: &[Message], limit: usize, total: Option<usize>) -> usize {
        const GUESSED_MARKUP_TOKENS: usize = 6;
        let Some(first) = droppable(messages) else { return 0 };
        let vocab = self.model.vocab();
        let sizes: Vec<usize> = messages.iter().map(|m| vocab.tokenize(m.content.as_bytes(), false, false).len()).collect();
        let text_tokens: usize = sizes.iter().sum();
        let markup = match total {
            Some(total) => total.saturating_sub(text_tokens).div_ceil(messages.len().max(1)),
            None => GUESSED_MARKUP_TOKENS,
        };
        let mut estimate = total.unwrap_or(text_tokens + markup * messages.len());
        let mut count = 0;
        for size in &sizes[first..messages.len() - 1] {
            if estimate <= limit {
                break;
            }
            estimate = estimate.saturating_sub(size + markup);
            count += 1;
        }
        count.max(1)
    }

    /// `elpis-server vectors`: compute the four quadrant sets for the loaded
    /// model now, write them (each file atomically), and steer with them.
    /// `progress(done, all)` is called after every text.
    pub fn compute_vectors(
        &mut self,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(std::path::PathBuf, Vec<(usize, Vec<super::vectors::Reduction>)>), String> {
        self.settle_steering();
        let unavailable = || format!("steering is unavailable: {}", self.steering.report().reason.unwrap_or_default());
        let dir = self.steering.folder().ok_or_else(unavailable)?.to_path_buf();
        let (model_ptr, threads) = self.steering.job_parts().ok_or_else(unavailable)?;
        let mut job = super::steering::VectorJob::new(self.model, model_ptr, threads, dir.clone())?;
        while !job.slice()? {
            let (done, all) = job.progress();
            progress(done, all);
        }
        let (sets, reports) = job.finish()?;
        self.steering.install(sets, dir.clone());
        Ok((dir, reports))
    }

    /// Finish steering's setup now (identify the model, load its vectors),
    /// for one-shot commands that do not run the engine loop. Computing
    /// missing vectors only happens when the settings ask for it.
    pub fn settle_steering(&mut self) {
        self.assert_owner_thread();
        while self.steering.busy() {
            self.steering.setup_slice(self.model);
        }
    }

    /// Steering now (for `get_capabilities` and the measurements).
    pub fn steering_report(&self) -> super::SteeringReport {
        self.steering.report()
    }

    /// For measurements: set the blend of `coefficients` on the context now
    /// (None: no control vector at all).
    pub fn set_steering(&mut self, coefficients: Option<[f32; 4]>) -> Result<(), String> {
        self.assert_owner_thread();
        match coefficients {
            Some(c) if self.steering.is_on() => {
                self.steering.apply(c);
                self.steering.is_on().then_some(()).ok_or_else(|| "steering turned off".to_string())
            }
            Some(_) => Err(format!("steering is off: {}", self.steering.report().reason.unwrap_or_default())),
            None => self.steering.clear(),
        }
    }

    /// For measurements: the next-token logits after `text` (plain text,
    /// BOS first), decoded on slot 0's sequence, which is emptied after.
    pub fn next_token_logits(&mut self, text: &str) -> Result<Vec<f32>, String> {
        self.assert_owner_thread();
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, false);
        let logits = self.decode_alone(&tokens, 0)?.0;
        Ok(logits)
    }

    /// The first token of `text` as plain text (no BOS).
    pub fn first_token(&self, text: &str) -> Option<i32> {
        self.model.vocab().tokenize(text.as_bytes(), false, false).first().map(|t| t.0)
    }

    /// For measurements: greedy decode speed (tokens per second over `n`
    /// tokens after `text`) on slot 0's sequence, emptied after.
    pub fn decode_speed(&mut self, text: &str, n: usize) -> Result<f64, String> {
        self.assert_owner_thread();
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, false);
        Ok(self.decode_alone(&tokens, n)?.1)
    }

    /// Decode `prompt` on sequence 0, then `extra` greedy tokens one at a
    /// time; returns the prompt's last logits and the decode speed.
    fn decode_alone(&mut self, prompt: &[LlamaToken], extra: usize) -> Result<(Vec<f32>, f64), String> {
        let seq = self.slots[0].seq;
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        self.slots[0].cached.clear();
        let mut batch = LlamaBatch::new(prompt.len().max(1), 1);
        for (i, t) in prompt.iter().enumerate() {
            batch.add(*t, i as i32, &[seq], i + 1 == prompt.len()).map_err(|e| e.to_string())?;
        }
        self.ctx.decode(&mut batch).map_err(|e| e.to_string())?;
        let logits = self.ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
        let mut last = argmax(&logits);
        let started = Instant::now();
        for i in 0..extra {
            batch.clear();
            batch.add(last, (prompt.len() + i) as i32, &[seq], true).map_err(|e| e.to_string())?;
            self.ctx.decode(&mut batch).map_err(|e| e.to_string())?;
            last = argmax(self.ctx.get_logits_ith(0));
        }
        let speed = extra as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        Ok((logits, speed))
    }

    /// What the model is fed for a conversation, for `elpis-server prompt`:
    /// the text, its segments, the tokens, and the vocabulary's control
    /// tokens (their text) to test injection with.
    pub fn inspect_prompt(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        plain: &[String],
    ) -> Result<serde_json::Value, EngineError> {
        self.assert_owner_thread();
        let segments = self.render(messages, tools)?;
        let tokens = self.tokenize(&segments);
        let vocab = self.model.vocab();
        let control: Vec<LlamaToken> = vocab.tokens().filter(|&t| vocab.is_control(t)).collect();
        let template = match &self.format {
            PromptFormat::Template { chat, tool_use, .. } => {
                let used = if tools.is_some() { tool_use.as_ref().unwrap_or(chat) } else { chat };
                Some(used.source().to_string())
            }
            PromptFormat::Builtin(_) => None,
        };
        Ok(serde_json::json!({
            "template": template,
            "bos_token": token_text(self.model, vocab.bos()),
            "eos_token": token_text(self.model, vocab.eos()),
            "text": prompt::joined(&segments),
            "segments": segments.iter().map(|s| serde_json::json!({"text": s.text, "special": s.special})).collect::<Vec<_>>(),
            "tokens": tokens.iter().map(|t| t.0).collect::<Vec<_>>(),
            "control_tokens": control.iter().map(|&t| token_text(self.model, t)).filter(|t| !t.is_empty()).collect::<Vec<_>>(),
            "control_token_ids": control.iter().map(|t| t.0).collect::<Vec<_>>(),
            "plain_tokens": plain.iter().map(|p| vocab.tokenize(p.as_bytes(), false, false).iter().map(|t| t.0).collect::<Vec<_>>()).collect::<Vec<_>>(),
        }))
    }

    /// Tokenise a prompt: special-token strings are parsed in the
    /// template's segments only; BOS (when the model wants one) first.
    fn tokenize(&self, segments: &[Segment]) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            tokens.extend(vocab.tokenize(segment.text.as_bytes(), i == 0, segment.special));
        }
        // A template that writes the BOS text itself would double it.
        if tokens.len() >= 2 && tokens[0] == vocab.bos() && tokens[1] == vocab.bos() {
            tokens.remove(0);
        }
        tokens
    }

    fn sampler(&self, p: &SamplingParams) -> LlamaSampler {
        let mut chain = Vec::new();
        if (p.repeat_penalty - 1.0).abs() > f64::EPSILON {
            chain.push(LlamaSampler::penalties(self.model.n_vocab(), PENALTY_LAST_N, p.repeat_penalty as f32, 0.0, 0.0));
        }
        if p.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(p.top_k as i32));
            }
            chain.push(LlamaSampler::top_p(p.top_p as f32, 1));
            if p.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(p.min_p as f32, 1));
            }
            chain.push(LlamaSampler::temp(p.temperature as f32));
            chain.push(LlamaSampler::dist(p.seed));
        }
        LlamaSampler::chain_simple(chain)
    }

    /// Stop cancelled jobs (queued or running) and free their reply cells.
    fn reap_cancelled(&mut self) {
        let waiting = &self.waiting;
        self.queue.retain(|job| {
            if job.cancelled() {
                if !job.started {
                    waiting.fetch_sub(1, Ordering::Relaxed);
                }
                let _ = job.events.send(GenerationEvent::Done(cancelled_completion(job)));
                false
            } else {
                true
            }
        });
        for i in 0..self.slots.len() {
            let cancelled = self.slots[i].job.as_ref().is_some_and(Job::cancelled);
            if cancelled {
                let prompt_len = self.slots[i].job.as_ref().map_or(0, |j| j.prompt_len);
                self.trim_slot(i, prompt_len.min(self.slots[i].cached.len()));
                if let Some(mut job) = self.slots[i].job.take() {
                    let tail = job.decoder.finish();
                    job.text.push_str(&tail);
                    let _ = job.events.send(GenerationEvent::Done(cancelled_completion(&job)));
                }
            }
        }
    }

    fn cancel_all(&mut self) {
        for job in self.queue.drain(..) {
            job.cancel.cancel();
        }
        for slot in &mut self.slots {
            if let Some(job) = &slot.job {
                job.cancel.cancel();
            }
        }
        self.reap_cancelled();
    }

    /// Keep the first `keep` cells of slot `i`, removing the rest. Falls back
    /// to clearing the whole sequence when llama.cpp cannot cut it there.
    fn trim_slot(&mut self, i: usize, keep: usize) {
        self.assert_owner_thread();
        let seq = self.slots[i].seq as u32;
        if keep >= self.slots[i].cached.len() {
            return;
        }
        let partial_ok = keep > 0
            && !self.swa_limited
            && matches!(self.ctx.clear_kv_cache_seq(Some(seq), Some(keep as u32), None), Ok(true));
        if partial_ok {
            self.slots[i].cached.truncate(keep);
        } else {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
            self.slots[i].cached.clear();
        }
    }

    /// Give queued jobs slots, those a client waits on first: the free slot
    /// whose cells share the longest prefix with the prompt, else the least
    /// recently used. When none is free, a job a client waits on takes the
    /// slot of a stream nobody is reading, which yields (see [`Self::park`]).
    fn assign_slots(&mut self, now: Instant) {
        loop {
            let Some(q) = self.queue.iter().position(|j| j.attended(now)).or((!self.queue.is_empty()).then_some(0)) else {
                return;
            };
            let best = {
                let job = &self.queue[q];
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.job.is_none())
                    .max_by_key(|(_, s)| (common_prefix(&s.cached, &job.prompt), std::cmp::Reverse(s.last_used)))
                    .map(|(i, _)| i)
            };
            let i = match best {
                Some(i) => i,
                None if self.queue[q].attended(now) => match self.unattended_slot(now) {
                    Some(i) => {
                        self.park(i);
                        i
                    }
                    None => return,
                },
                None => return,
            };
            // The parked job went to the back of the queue: `q` still points at ours.
            let Some(mut job) = self.queue.remove(q) else { return };
            // Keep at least one prompt token to decode: its logits start the reply.
            let reuse = common_prefix(&self.slots[i].cached, &job.prompt).min(job.prompt.len() - 1);
            self.trim_slot(i, reuse);
            if !job.started {
                job.usage.cached_tokens = self.slots[i].cached.len() as u32;
                job.started = true;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.tick += 1;
            let slot = &mut self.slots[i];
            slot.last_used = self.tick;
            tracing::debug!(seq = slot.seq, prompt = job.prompt.len(), cached = slot.cached.len(), "generation starts");
            slot.job = Some(job);
        }
    }

    /// The busy slot whose stream has gone unread the longest, if any is unattended.
    fn unattended_slot(&self, now: Instant) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let job = s.job.as_ref()?;
                let interest = job.interest.as_ref()?;
                (!interest.attended(now)).then(|| (i, interest.idle_s(now)))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    /// Take slot `i`'s job off it and queue it again, resumable: its cells
    /// stay as cache, and its prompt becomes everything decoded so far plus
    /// the token it sampled last, so it continues exactly where it stopped
    /// (sampler, grammar and decoder state travel with it).
    fn park(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(mut job) = slot.job.take() else { return };
        if let Some(token) = job.pending.take() {
            let mut tokens = slot.cached.clone();
            tokens.push(token);
            job.prompt = tokens;
        }
        tracing::debug!(seq = slot.seq, tokens = job.prompt.len(), "an unread stream yields its slot");
        self.queue.push_back(job);
    }

    /// One decode: a token from each generating slot, then prompt chunks.
    /// While any work a client waits on exists, streams nobody reads pause
    /// (their tokens would only slow the batch down).
    fn step(&mut self, now: Instant) {
        self.assert_owner_thread();
        self.batch.clear();
        // Per slot: whether its job is attended (None: no job).
        let attended: Vec<Option<bool>> = self.slots.iter().map(|s| s.job.as_ref().map(|j| j.attended(now))).collect();
        let urgent = attended.contains(&Some(true)) || self.queue.iter().any(|j| j.attended(now));
        let paused: Vec<bool> = attended.iter().map(|a| urgent && *a == Some(false)).collect();
        // (slot index, batch index) of every position whose logits we sample.
        let mut sample_at: Vec<(usize, i32)> = Vec::new();
        let mut generating = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if paused[i] {
                continue;
            }
            let Some(job) = slot.job.as_mut() else { continue };
            let Some(token) = job.pending.take() else { continue };
            let pos = slot.cached.len() as i32;
            if self.batch.add(token, pos, &[slot.seq], true).is_err() {
                job.pending = Some(token);
                continue;
            }
            slot.cached.push(token);
            sample_at.push((i, self.batch.n_tokens() - 1));
            generating += 1;
        }
        let mut budget = self.budget.tokens().saturating_sub(generating).max(MIN_CHUNK);
        let mut prefilling: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !paused[*i])
            .filter_map(|(i, s)| {
                s.job.as_ref().filter(|j| j.pending.is_none() && s.cached.len() < j.prompt.len()).map(|j| (j.id, i))
            })
            .collect();
        prefilling.sort_unstable();
        let mut prompt_tokens = 0;
        for (_, i) in prefilling {
            if budget == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let Some(job) = slot.job.as_ref() else { continue };
            let start = slot.cached.len();
            let end = job.prompt.len().min(start + budget);
            for pos in start..end {
                let last = pos + 1 == job.prompt.len();
                if self.batch.add(job.prompt[pos], pos as i32, &[slot.seq], last).is_err() {
                    break;
                }
                slot.cached.push(job.prompt[pos]);
                if last {
                    sample_at.push((i, self.batch.n_tokens() - 1));
                }
            }
            let fed = slot.cached.len() - start;
            prompt_tokens += fed;
            budget = budget.saturating_sub(fed);
        }
        let n_tokens = self.batch.n_tokens() as usize;
        if n_tokens == 0 {
            return;
        }
        self.worked_since_trim = true;
        let started = Instant::now();
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            tracing::error!("decode failed: {e}");
            self.fail_batch_slots(&e.to_string());
            return;
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::trace!(n_tokens, prompt_tokens, elapsed_ms, "decode step");
        if prompt_tokens > 0 {
            self.budget.observe(n_tokens, elapsed_ms);
        }
        for (i, batch_index) in sample_at {
            self.sample_slot(i, batch_index);
        }
    }

    /// A decode failed: every running job's cells are suspect. Fail them and
    /// clear their sequences.
    fn fail_batch_slots(&mut self, reason: &str) {
        for i in 0..self.slots.len() {
            if let Some(job) = self.slots[i].job.take() {
                let _ = job.events.send(GenerationEvent::Failed(EngineError::Decode(reason.to_string())));
                self.trim_slot(i, 0);
            }
        }
    }

    fn sample_slot(&mut self, i: usize, batch_index: i32) {
        let vocab = self.model.vocab();
        let n_ctx_seq = self.n_ctx_seq;
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.as_mut() else { return };
        let mut token = job.sampler.sample(&self.ctx, batch_index);
        if let Some(g) = job.grammar.as_mut() {
            let mut probe = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
            probe.apply_sampler(&mut g.grammar);
            if !probe.data[0].logit().is_finite() {
                let logits = self.ctx.get_logits_ith(batch_index);
                match grammar_fallback(logits, g) {
                    Some(allowed) => token = allowed,
                    None => {
                        // Accepting a token the grammar did not allow aborts
                        // the process inside llama.cpp: end the job instead.
                        let prompt_len = job.prompt_len;
                        if let Some(job) = slot.job.take() {
                            let _ = job.events.send(GenerationEvent::Failed(EngineError::Grammar(
                                "no token of the model's vocabulary can continue the grammar-constrained reply \
                                 (the grammar needs text this model cannot write)"
                                    .into(),
                            )));
                        }
                        self.trim_slot(i, prompt_len);
                        return;
                    }
                }
            }
            g.grammar.accept(token);
        }
        job.usage.completion_tokens += 1;
        let _ = job.events.send(GenerationEvent::Tokens(job.usage.completion_tokens));
        let finish = if vocab.is_eog(token) {
            Some(FinishReason::Stop)
        } else {
            let piece = vocab.token_to_piece(token, true, None);
            let decoded = job.decoder.push(&piece);
            if !decoded.text.is_empty() {
                job.text.push_str(&decoded.text);
                let _ = job.events.send(GenerationEvent::Text(decoded.text));
            }
            if decoded.stopped {
                Some(FinishReason::Stop)
            } else if job.usage.completion_tokens as usize >= job.max_tokens || slot.cached.len() >= n_ctx_seq {
                Some(FinishReason::Length)
            } else {
                job.pending = Some(token);
                None
            }
        };
        if let Some(reason) = finish {
            if let Some(mut job) = slot.job.take() {
                let tail = job.decoder.finish();
                if !tail.is_empty() {
                    job.text.push_str(&tail);
                    let _ = job.events.send(GenerationEvent::Text(tail));
                }
                let completion = Completion {
                    text: job.text,
                    finish_reason: reason,
                    usage: job.usage,
                    truncated: job.truncated,
                };
                tracing::info!(
                    prompt_tokens = completion.usage.prompt_tokens,
                    cached_tokens = completion.usage.cached_tokens,
                    completion_tokens = completion.usage.completion_tokens,
                    finish_reason = ?completion.finish_reason,
                    "generation finished"
                );
                let _ = job.events.send(GenerationEvent::Done(completion));
            }
        }
    }
}

/// A token's text as the vocabulary stores it (empty when it has none).
fn token_text(model: &LlamaModel, token: LlamaToken) -> String {
    model.vocab().text(token).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn argmax(logits: &[f32]) -> LlamaToken {
    LlamaToken(logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as i32).unwrap_or(0))
}

/// The token the grammar allows with the best chance, sampled by the job's
/// fallback among the allowed ones of the first chunk (by logit) that has
/// any; None when no token of the vocabulary is allowed.
fn grammar_fallback(logits: &[f32], g: &mut GrammarSampler) -> Option<LlamaToken> {
    let mut scratch: Vec<(f32, i32)> = logits.iter().enumerate().map(|(id, &logit)| (logit, id as i32)).collect();
    let mut rest: &mut [(f32, i32)] = &mut scratch;
    while !rest.is_empty() {
        let n = GRAMMAR_CHUNK.min(rest.len());
        if n < rest.len() {
            rest.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
        }
        let (chunk, tail) = rest.split_at_mut(n);
        let data = chunk.iter().map(|&(logit, id)| LlamaTokenData::new(LlamaToken(id), logit, 0.0)).collect();
        let mut candidates = LlamaTokenDataArray::new(data, false);
        candidates.apply_sampler(&mut g.grammar);
        if candidates.data.iter().any(|d| d.logit().is_finite()) {
            candidates.apply_sampler(&mut g.fallback);
            return candidates.selected_token();
        }
        rest = tail;
    }
    None
}

fn cancelled_completion(job: &Job) -> Completion {
    Completion {
        text: job.text.clone(),
        finish_reason: FinishReason::Cancelled,
        usage: job.usage,
        truncated: job.truncated,
    }
}

/// Index of the oldest message that truncation may drop: not a leading
/// system message, not the last message.
fn droppable(messages: &[Message]) -> Option<usize> {
    let first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    (first + 1 < messages.len()).then_some(first)
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether llama.cpp can apply the GGUF's template (it recognises a fixed set).
#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str) -> Message {
        Message::new(role, "x")
    }

    #[test]
    fn truncation_keeps_system_and_last_message() {
        assert_eq!(droppable(&[msg("system"), msg("user"), msg("assistant"), msg("user")]), Some(1));
        assert_eq!(droppable(&[msg("user"), msg("assistant"), msg("user")]), Some(0));
        assert_eq!(droppable(&[msg("system"), msg("user")]), None);
        assert_eq!(droppable(&[msg("user")]), None);
    }

    #[test]
    fn step_budget_adapts_to_measured_speed() {
        let mut b = StepBudget { target_ms: 50.0, ms_per_token: 2.0 };
        assert_eq!(b.tokens(), 25);
        for _ in 0..50 {
            b.observe(100, 50.0); // 0.5 ms a token
        }
        assert!((95..=100).contains(&b.tokens()), "{}", b.tokens());
        for _ in 0..50 {
            b.observe(10, 1000.0);
        }
        assert_eq!(b.tokens(), MIN_CHUNK);
    }
}
