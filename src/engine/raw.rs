//! The floor for the benchmark: a minimal llama-cpp-2 loop (no MCP, no
//! scheduler, no yields) on the same model, its weights held as the server
//! holds them (widened, in huge pages), and thread count. Prompt speed is
//! one batch per chunk of the widest size the server uses there; decode
//! speed is one token per `decode`, greedy.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use serde::Serialize;

use crate::prompt::{segments, Message, Renderer};

use super::planner::{self, CHUNK};
use super::{EngineError, EngineSettings};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RawSpeed {
    pub prompt_tokens: usize,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
}

/// Read `prompt` (in the server's widest chunks); then, from an empty
/// cache, read `short` (rendered with the model's own template, as the
/// server would) and decode `decode_tokens` after it.
pub fn raw_speed(settings: &EngineSettings, prompt: &str, short: &[Message], decode_tokens: usize) -> Result<RawSpeed, EngineError> {
    let backend = super::model::backend()?;
    let threads = super::model::threads(settings.n_threads) as i32;
    let params = |chunk: usize| {
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(settings.context_length))
            .with_n_batch(chunk.max(1) as u32)
            .with_n_ubatch(chunk.max(1) as u32)
            .with_swa_full(settings.swa_full)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
    };
    // The layers where the server puts them (on a GPU: as many as it offloads).
    let bytes = settings.kv_cache_type.bytes_per_element();
    let offload = super::gpu::plan(settings.gpu_layers, &settings.model_path, &|| params(CHUNK), bytes, backend)?;
    let all_on_cpu = super::gpu::all_on_cpu(offload.n_gpu_layers, &settings.rpc_servers);
    let chunk = planner::chunk(all_on_cpu);
    let (path, _) = super::model::weights_file(settings, all_on_cpu, &mut || {});
    let (weights, _) = super::model::weight_params(offload.params, settings.huge_pages && all_on_cpu, &path, None);
    let model = LlamaModel::load_from_file(backend, &path, &weights)
        .map_err(|_| EngineError::ModelLoad(settings.model_path.clone()))?;
    let mut ctx = model.new_context(&backend, params(chunk)).map_err(|_| EngineError::Context(settings.context_length))?;
    // Threads held to CPUs as the server holds them.
    super::model::pin_threads(settings.pin_threads, &model, &ctx, threads as u32, all_on_cpu);
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(chunk.max(1), 1);
    let started = Instant::now();
    for (c, piece) in tokens.chunks(chunk.max(1)).enumerate() {
        batch.clear();
        for (i, &t) in piece.iter().enumerate() {
            let pos = c * chunk + i;
            let last = pos + 1 == tokens.len();
            batch.add(t, pos as i32, &[0], last).map_err(|e| EngineError::Decode(e.to_string()))?;
        }
        ctx.decode(&mut batch).map_err(|e| EngineError::Decode(e.to_string()))?;
    }
    let prompt_s = started.elapsed().as_secs_f64();
    // Decode speed after a short prompt, as the server is measured.
    ctx.clear_kv_cache();
    let texts = super::model::template_texts(&model);
    let architecture = model.meta_val_str("general.architecture").unwrap_or_default();
    let renderer = Renderer::new(settings.chat_format, &texts, &architecture).map_err(EngineError::Template)?;
    let short_text = segments::joined(&renderer.render(short, None).map_err(EngineError::Template)?);
    let short = model.vocab().tokenize(short_text.as_bytes(), true, true);
    batch.clear();
    for (i, &t) in short.iter().enumerate() {
        batch.add(t, i as i32, &[0], i + 1 == short.len()).map_err(|e| EngineError::Decode(e.to_string()))?;
    }
    ctx.decode(&mut batch).map_err(|e| EngineError::Decode(e.to_string()))?;
    let mut sampler = LlamaSampler::greedy();
    let mut pos = short.len();
    let mut last_index = batch.n_tokens() - 1;
    let started = Instant::now();
    for _ in 0..decode_tokens {
        let token = sampler.sample(&ctx, last_index);
        batch.clear();
        batch.add(token, pos as i32, &[0], true).map_err(|e| EngineError::Decode(e.to_string()))?;
        ctx.decode(&mut batch).map_err(|e| EngineError::Decode(e.to_string()))?;
        pos += 1;
        last_index = 0;
    }
    let decode_s = started.elapsed().as_secs_f64();
    Ok(RawSpeed {
        prompt_tokens: tokens.len(),
        prompt_tokens_per_s: tokens.len() as f64 / prompt_s,
        decode_tokens,
        decode_tokens_per_s: decode_tokens as f64 / decode_s,
    })
}
