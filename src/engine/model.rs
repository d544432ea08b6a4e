//! Loading: the model file checked, llama.cpp's backend, the model and its
//! context created with the configured settings, and the facts about the
//! model ([`ModelInfo`]) the server reports.

use std::cell::Cell;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::prompt::{ChatFormat, NativeToolFormat, Renderer, TemplateTexts};

use super::affinity::PinThreads;
use super::gpu::{GpuInfo, GpuLayers};
use super::huge_pages::Advice;
use super::planner::{self, CHUNK, MAX_BATCH};
use super::request::EngineError;
use super::speculative::Speculation;
use super::steering::SteeringSettings;

/// Settings the engine is built from (the `[model]` section, resolved).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub model_path: PathBuf,
    pub context_length: u32,
    /// Layers on the GPU (or RPC workers): a count, or all that fit.
    pub gpu_layers: GpuLayers,
    /// 0 = one per available core.
    pub n_threads: u32,
    pub chat_format: ChatFormat,
    pub parallel: u32,
    pub max_step_ms: u32,
    pub swa_full: bool,
    /// Drop old turns instead of refusing a prompt that does not fit.
    pub truncate_overflow: bool,
    /// Speculative decoding from the text (`model.speculative`).
    pub speculative: Speculation,
    pub steering: SteeringSettings,
    /// The cache folder (`~/.cache/elpis`): the model's identity memo, its
    /// vectors, its saved prompts.
    pub cache_dir: PathBuf,
    /// Bounds of the prompt cache's tiers, in MiB (0 turns a tier off).
    pub prompt_cache_ram_mib: usize,
    pub prompt_cache_disk_mib: usize,
    /// The KV cache's type: `f16`, `q8_0` or `q4_0`.
    pub kv_cache_type: KvType,
    /// ggml RPC workers (`host:port`) that take `gpu_layers` layers.
    pub rpc_servers: Vec<String>,
    /// Q5_0 matrices loaded as Q8_0 where every layer is on the CPU
    /// (`model.wide_weights`; see `widen`).
    pub wide_weights: bool,
    /// Weights read into memory advised for huge pages where every layer is
    /// on the CPU (`model.huge_pages`; see `huge_pages`).
    pub huge_pages: bool,
    /// Compute threads held one to a CPU (`model.pin_threads`; see `affinity`).
    pub pin_threads: PinThreads,
}

/// How the KV cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub fn parse(name: &str) -> Option<KvType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            "q4_0" => Some(KvType::Q4_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Bytes one cached value takes (quantized blocks included).
    pub fn bytes_per_element(self) -> f64 {
        match self {
            KvType::F16 => 2.0,
            KvType::Q8_0 => 34.0 / 32.0,
            KvType::Q4_0 => 18.0 / 32.0,
        }
    }

    fn ggml(self) -> KvCacheType {
        match self {
            KvType::F16 => KvCacheType::F16,
            KvType::Q8_0 => KvCacheType::Q8_0,
            KvType::Q4_0 => KvCacheType::Q4_0,
        }
    }
}

/// Memory in 2 MiB pages (`model.huge_pages`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HugePages {
    /// The buffers the weights were read into, advised for huge pages (0:
    /// the weights are mapped from the file).
    pub advised_bytes: u64,
    /// The process's memory held in huge pages once the model had loaded
    /// (the kernel gives them where it finds free 2 MiB runs).
    pub held_bytes: u64,
}

/// Facts about the loaded model, for `get_capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub model_path: String,
    pub model_name: String,
    pub architecture: String,
    /// Tokens one generation may use (prompt + reply).
    pub context_length: u32,
    pub context_length_train: u32,
    pub parameters: u64,
    pub model_size_bytes: u64,
    pub vocab_size: i32,
    pub chat_format: String,
    /// The GGUF carries its own chat template (used when `chat_format` is auto).
    pub has_chat_template: bool,
    /// How the model writes tool calls natively, when its template renders
    /// tools and is in use; None: the generic JSON-array path.
    #[serde(skip)]
    pub native_tools: Option<NativeToolFormat>,
    pub threads: u32,
    /// Layers on the GPU or RPC workers (`gpu.offloaded_layers`).
    pub gpu_layers: u32,
    pub gpu_offload_supported: bool,
    /// The devices and the layers on them.
    pub gpu: GpuInfo,
    /// The CPU features ggml was built with and uses here (AVX2, AVX512...).
    pub cpu_features: Vec<String>,
    /// Q5_0 matrices held as Q8_0 (0: the file's own types).
    pub wide_weights: usize,
    pub huge_pages: HugePages,
    /// The CPU each compute thread is held on, in thread order (empty: not
    /// held; see `affinity`).
    pub pinned_cpus: Vec<usize>,
    pub slots: u32,
    pub max_step_ms: u32,
    pub sliding_window_full: bool,
    pub kv_cache_type: KvType,
    /// The KV cache's size (keys and values for every cell of every slot),
    /// from the model's shape; 0 where its shape cannot be read.
    pub kv_bytes: u64,
    /// Speculative decoding (prompt lookup; off on a cut sliding-window
    /// cache, which cannot drop rejected cells).
    pub speculative: Speculation,
}


/// The features set to 1 in the CPU backend's part of llama.cpp's
/// system-info line: what the loaded ggml uses (AVX2, AVX512...).
fn cpu_features(info: &str) -> Vec<String> {
    let mut features = Vec::new();
    for field in info.split('|') {
        let field = field.rsplit(':').next().unwrap_or(field);
        if let Some((name, value)) = field.split_once('=') {
            let name = name.trim();
            if value.trim() == "1" && !name.is_empty() && !features.iter().any(|f| f == name) {
                features.push(name.to_string());
            }
        }
    }
    features
}

#[cfg(test)]
#[test]
fn the_system_info_line_names_the_features_in_use() {
    let line = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 | OPENMP = 1 | REPACK = 1 | ";
    assert_eq!(cpu_features(line), ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "OPENMP", "REPACK"]);
    assert!(cpu_features("").is_empty());
}

/// llama.cpp's backend, initialised once for the process (llama.cpp allows
/// one); every engine and measurement in the process shares it.
pub(super) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: std::sync::OnceLock<LlamaBackend> = std::sync::OnceLock::new();
    if let Some(backend) = BACKEND.get() {
        return Ok(backend);
    }
    // A portable build's CPU backends are modules: the variant for this CPU
    // is loaded before the backend starts.
    #[cfg(feature = "portable")]
    llama_cpp_2::llama_backend::load_backends();
    let backend = LlamaBackend::init().map_err(|e| EngineError::Backend(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| backend))
}

/// Send llama.cpp's and ggml's log lines to `tracing`.
pub fn route_llama_logs() {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}

/// A clear error for a path that is not a readable GGUF file, before
/// llama.cpp sees it.
fn check_model_file(path: &Path) -> Result<(), EngineError> {
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

/// The threads llama.cpp computes with: the setting, or one per core.
pub(super) fn threads(n_threads: u32) -> u32 {
    match n_threads {
        0 => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        n => n,
    }
}

/// A model and its context, loaded, with what was read off the GGUF.
pub(super) struct Loaded {
    pub model: &'static LlamaModel,
    pub ctx: LlamaContext<'static>,
    pub renderer: Renderer,
    pub info: ModelInfo,
    /// Tokens one sequence may hold.
    pub n_ctx_seq: usize,
    /// The model uses sliding-window attention and its caches are not
    /// full-size: then a cached prefix cannot be partially kept.
    pub swa_limited: bool,
    /// Every layer on the CPU ([`super::gpu::all_on_cpu`]).
    pub all_on_cpu: bool,
}

/// Load the model and create its context (one KV sequence per slot).
/// `between` runs, on this thread, at each step of reading the weights
/// (llama.cpp's progress callback), so that a listener can answer while
/// the model loads.
pub(super) fn load(settings: &EngineSettings, mut between: Option<Box<dyn FnMut()>>) -> Result<Loaded, EngineError> {
    check_model_file(&settings.model_path)?;
    let backend = backend()?;
    super::rpc::attach(&settings.rpc_servers, settings.gpu_layers)?;
    let threads = threads(settings.n_threads);
    let parallel = settings.parallel.max(1);
    let n_ctx = settings.context_length.saturating_mul(parallel);
    let ctx_params = |chunk| context_params(settings, n_ctx, parallel, threads, chunk);
    let bytes = settings.kv_cache_type.bytes_per_element();
    let offload = super::gpu::plan(settings.gpu_layers, &settings.model_path, &|| ctx_params(CHUNK), bytes, backend)?;
    // Every layer on the CPU: requests are answered inside a step, and its
    // prompt chunk is wide (the scheduler's planner agrees).
    let all_on_cpu = super::gpu::all_on_cpu(offload.n_gpu_layers, &settings.rpc_servers);
    let chunk = planner::chunk(all_on_cpu);
    let (path, wide_weights) = weights_file(settings, all_on_cpu, &mut || {
        if let Some(between) = between.as_mut() {
            between();
        }
    });
    let (params, advised) = weight_params(offload.params, settings.huge_pages && all_on_cpu, &path, between);
    let loaded = LlamaModel::load_from_file(backend, &path, &params);
    let (model, wide_weights) = match loaded {
        Ok(model) => (model, wide_weights),
        // A widened copy llama.cpp refuses (damaged on disk): it goes, and
        // the model file is read as it is.
        Err(e) if wide_weights > 0 => {
            tracing::warn!("wide weights: {} did not load ({e}); removed, the model is loaded as it is", path.display());
            let _ = std::fs::remove_file(&path);
            (LlamaModel::load_from_file(backend, &settings.model_path, &params).map_err(|_| EngineError::ModelLoad(settings.model_path.clone()))?, 0)
        }
        Err(_) => return Err(EngineError::ModelLoad(settings.model_path.clone())),
    };
    // The model lives as long as the process: leaking it lets the context
    // borrow it for 'static.
    let model: &'static LlamaModel = Box::leak(Box::new(model));
    let mut ctx = model.new_context(backend, ctx_params(chunk)).map_err(|_| EngineError::Context(n_ctx))?;
    // Zeroing the KV buffer makes it resident now: the memory the server
    // holds is known from the start (the prompt cache's ceiling counts all
    // of it), rather than growing as cells are first written.
    ctx.clear_kv_cache();
    let pinned_cpus = pin_threads(settings.pin_threads, model, &ctx, threads, all_on_cpu);
    let huge_pages = HugePages { advised_bytes: advised.get(), held_bytes: super::meminfo::in_huge_pages() };
    let n_ctx_seq = (ctx.n_ctx() / parallel) as usize;

    let architecture = model.meta_val_str("general.architecture").unwrap_or_default();
    let model_name = model.meta_val_str("general.name").unwrap_or_default();
    let sliding_window = model
        .meta_val_str(&format!("{architecture}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let texts = template_texts(model);
    let gpu = super::gpu::info(offload.n_gpu_layers, model.n_layer());
    let renderer = Renderer::new(settings.chat_format, &texts, &architecture).map_err(EngineError::Template)?;
    let info = ModelInfo {
        model_path: settings.model_path.display().to_string(),
        model_name,
        architecture,
        context_length: n_ctx_seq as u32,
        context_length_train: model.n_ctx_train(),
        parameters: model.n_params(),
        model_size_bytes: model.size(),
        vocab_size: model.n_vocab(),
        chat_format: renderer.name().to_string(),
        has_chat_template: texts.chat.is_some(),
        native_tools: renderer.native_tools(),
        threads,
        gpu_layers: gpu.offloaded_layers,
        // Somewhere to put layers: a GPU here, or RPC workers (a build with
        // the RPC backend "supports offload" even with neither).
        gpu_offload_supported: backend.supports_gpu_offload() && !gpu.devices.is_empty(),
        gpu,
        cpu_features: cpu_features(&super::sys::system_info()),
        wide_weights,
        huge_pages,
        pinned_cpus,
        slots: parallel,
        max_step_ms: settings.max_step_ms,
        sliding_window_full: settings.swa_full,
        kv_cache_type: settings.kv_cache_type,
        // Keys and values, every layer, every cell of every slot.
        kv_bytes: super::gpu::kv_width_of(model).map_or(0, |width| {
            (2.0 * f64::from(model.n_layer()) * f64::from(ctx.n_ctx()) * width as f64 * settings.kv_cache_type.bytes_per_element()) as u64
        }),
        speculative: if sliding_window > 0 && !settings.swa_full { Speculation::Off } else { settings.speculative },
    };
    tracing::info!(?info, "model loaded");
    Ok(Loaded { model, ctx, renderer, info, n_ctx_seq, swa_limited: sliding_window > 0 && !settings.swa_full, all_on_cpu })
}

/// The load's parameters: the weights of `path` read into buffers advised
/// for huge pages (at the load's first progress call: allocated, not yet
/// touched; see `huge_pages`) where `huge`, the kernel offers them and
/// memory has room, else mapped from the file; `between` run at each step
/// of reading. Also the bytes advised, as the load goes.
pub(super) fn weight_params(
    params: Pin<Box<LlamaModelParams>>,
    huge: bool,
    path: &Path,
    mut between: Option<Box<dyn FnMut()>>,
) -> (Pin<Box<LlamaModelParams>>, Rc<Cell<u64>>) {
    let size = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
    let huge = huge && super::huge_pages::offered() && super::huge_pages::room_for(size);
    let mut advice = huge.then(Advice::before_load);
    let advised = Rc::new(Cell::new(0));
    let counted = advised.clone();
    let params = Pin::into_inner(params).with_use_mmap(!huge).with_progress_callback(move |progress| {
        if let (0.0, Some(advice)) = (progress, advice.as_mut()) {
            advice.advise_new();
            counted.set(advice.advised() as u64);
        }
        if let Some(between) = between.as_mut() {
            between();
        }
        true
    });
    (Box::pin(params), advised)
}

/// The file the weights are read from, and how many of its matrices were
/// widened: where every layer is on the CPU (a device has fast kernels for
/// Q5_0, and would hold the wider copy in its smaller memory), the copy
/// with Q5_0 matrices as Q8_0 (`widen`); else the model file.
pub(super) fn weights_file(settings: &EngineSettings, all_on_cpu: bool, between: &mut dyn FnMut()) -> (PathBuf, usize) {
    if settings.wide_weights && all_on_cpu {
        super::widen::prepare(&settings.model_path, &settings.cache_dir, between)
    } else {
        (settings.model_path.clone(), 0)
    }
}

/// Hold the context's compute threads one to a CPU where `mode` says so
/// (see `affinity`); the CPUs they are held on, or none.
pub(super) fn pin_threads(mode: PinThreads, model: &LlamaModel, ctx: &LlamaContext, threads: u32, all_on_cpu: bool) -> Vec<usize> {
    let cpus = super::affinity::plan(mode, threads as usize, &super::affinity::allowed_cpus(), all_on_cpu);
    if cpus.is_empty() {
        return cpus;
    }
    let pinned = super::sys::RawPtrs::recover(model, ctx).and_then(|ptrs| super::sys::pin_compute_threads(ptrs.ctx, &cpus));
    match pinned {
        Ok(()) => cpus,
        Err(e) => {
            tracing::warn!("compute threads not held to CPUs: {e}");
            Vec::new()
        }
    }
}

/// The context's parameters: one KV sequence per slot in one unified cache,
/// prompts read `chunk` rows at a time.
fn context_params(settings: &EngineSettings, n_ctx: u32, parallel: u32, threads: u32, chunk: usize) -> LlamaContextParams {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(MAX_BATCH as u32)
        .with_n_ubatch(chunk as u32)
        .with_n_seq_max(parallel)
        .with_kv_unified(true)
        .with_swa_full(settings.swa_full)
        .with_type_k(settings.kv_cache_type.ggml())
        .with_type_v(settings.kv_cache_type.ggml())
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    // A quantized V cache needs flash attention (llama.cpp refuses it otherwise).
    if settings.kv_cache_type == KvType::F16 {
        params
    } else {
        params.with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED)
    }
}

/// What the GGUF says about its prompts: its templates and the text of its
/// BOS and EOS tokens.
pub(super) fn template_texts(model: &LlamaModel) -> TemplateTexts {
    let vocab = model.vocab();
    let source = |name: Option<&str>| model.chat_template(name).ok().and_then(|t| t.to_string().ok());
    TemplateTexts {
        chat: source(None),
        tool_use: source(Some("tool_use")),
        bos: token_text(model, vocab.bos()),
        eos: token_text(model, vocab.eos()),
    }
}

/// A token's text as the vocabulary stores it (empty when it has none).
pub(super) fn token_text(model: &LlamaModel, token: LlamaToken) -> String {
    model.vocab().text(token).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}
