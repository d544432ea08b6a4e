//! Layers on a GPU: which devices ggml offers (a CUDA or Vulkan build's
//! GPUs, and RPC workers), how many layers go to them (`model.gpu_layers`:
//! a number, or `auto`: all that fit in free device memory with the KV
//! cache and compute buffers, as llama.cpp's own `--fit` decides), and what
//! `get_capabilities` says about it ([`GpuInfo`]).
//!
//! A count that cannot fit is a clear error naming the sizes and what would
//! fit, never an allocation failure inside llama.cpp; `auto` takes fewer
//! layers with a warning. ggml's device backends do not call the abort
//! callback, so requests are answered inside a step only when
//! [`GpuInfo::offloaded_layers`] is 0.

use std::ffi::CString;
use std::path::Path;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDeviceType};
use serde::{Deserialize, Serialize};

use super::request::EngineError;

/// Free device memory `auto` leaves unused (other programs, the display,
/// allocations llama.cpp cannot foresee): llama.cpp's own default margin.
const AUTO_MARGIN: usize = 1 << 30;

/// `model.gpu_layers`: how many of the model's layers go to the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// All that fit in free device memory (none where there is no GPU).
    #[default]
    Auto,
    /// This many (more than the model has: all of them); 0: the CPU only.
    Count(u32),
}

impl GpuLayers {
    /// `auto`, `all` (every layer), a count, or -1 (llama.cpp's "all").
    pub fn parse(text: &str) -> Option<GpuLayers> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(GpuLayers::Auto),
            "all" | "-1" => Some(GpuLayers::Count(u32::MAX)),
            n => n.parse().ok().map(GpuLayers::Count),
        }
    }
}

impl std::fmt::Display for GpuLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuLayers::Auto => f.write_str("auto"),
            GpuLayers::Count(u32::MAX) => f.write_str("all"),
            GpuLayers::Count(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for GpuLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuLayers::Count(n) if *n != u32::MAX => s.serialize_u32(*n),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let expected = "a number of layers (0: CPU only), \"auto\" (all that fit) or \"all\"";
        match Raw::deserialize(d)? {
            Raw::Number(-1) => Ok(GpuLayers::Count(u32::MAX)),
            Raw::Number(n) => u32::try_from(n)
                .map(GpuLayers::Count)
                .map_err(|_| serde::de::Error::custom(format!("{n} is out of range: expected {expected}"))),
            Raw::Text(t) => GpuLayers::parse(&t).ok_or_else(|| serde::de::Error::custom(format!("{t:?}: expected {expected}"))),
        }
    }
}

/// One device layers can go to, as `get_capabilities` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuDevice {
    /// ggml's name (`Vulkan0`, `CUDA0`, `RPC[host:port]`).
    pub name: String,
    /// What the driver calls it (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub description: String,
    /// `gpu`, `igpu` (integrated, or a CPU-backed device like lavapipe),
    /// `accelerator` or `rpc`.
    pub kind: String,
    pub total_bytes: u64,
    /// Free when the model and its context were loaded (after them).
    pub free_bytes: u64,
}

/// Where the model's layers are (`get_capabilities`' `gpu` object).
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    /// The backend layers go to (`CUDA`, `Vulkan`, `RPC`), or `none`.
    pub backend: String,
    pub devices: Vec<GpuDevice>,
    /// Layers on the devices, as llama.cpp counts them (the output layer
    /// included).
    pub offloaded_layers: u32,
    pub total_layers: u32,
}

/// The layer decision before the model loads.
pub(super) struct Offload {
    /// What llama.cpp is asked for: a count, or -1 (every layer).
    pub n_gpu_layers: i32,
    /// The model's parameters (fitted ones under `auto`).
    pub params: std::pin::Pin<Box<LlamaModelParams>>,
}

/// The non-CPU devices ggml offers now (GPUs, RPC workers).
pub(super) fn devices() -> Vec<GpuDevice> {
    list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| d.backend != "CPU" && !matches!(d.device_type, LlamaBackendDeviceType::Cpu))
        .map(|d| GpuDevice {
            kind: match (d.backend.as_str(), d.device_type) {
                ("RPC", _) => "rpc",
                (_, LlamaBackendDeviceType::Gpu) => "gpu",
                (_, LlamaBackendDeviceType::IntegratedGpu) => "igpu",
                (_, LlamaBackendDeviceType::Accelerator) => "accelerator",
                _ => "unknown",
            }
            .into(),
            name: d.name,
            description: d.description,
            total_bytes: d.memory_total as u64,
            free_bytes: d.memory_free as u64,
        })
        .collect()
}

/// Decide how many layers go to the devices, before the model loads.
/// `ctx_params` builds the context's parameters (the fit accounts for its
/// KV cache and compute buffers).
pub(super) fn plan(
    layers: GpuLayers,
    model_path: &Path,
    ctx_params: &dyn Fn() -> LlamaContextParams,
    kv_bytes_per_element: f64,
    backend: &LlamaBackend,
) -> Result<Offload, EngineError> {
    let fixed = |n: i32| Offload { n_gpu_layers: n, params: Box::pin(LlamaModelParams::default().with_n_gpu_layers(n.max(0) as u32)) };
    let all = |n: u32| if n == u32::MAX { -1 } else { n.min(i32::MAX as u32) as i32 };
    let devices = devices();
    let gpus: Vec<&GpuDevice> = devices.iter().filter(|d| d.kind != "rpc").collect();
    // One layer's keys larger than any device: llama.cpp's fit itself
    // would abort (a tensor no device buffer can hold), so it is not asked.
    if !gpus.is_empty() && layers != GpuLayers::Count(0) {
        let n_ctx = ctx_params().n_ctx().map_or(0, |n| n.get()) as f64;
        let largest = gpus.iter().map(|d| d.total_bytes).max().unwrap_or(0);
        if let Some(width) = kv_width(backend, model_path) {
            let layer_keys = n_ctx * width as f64 * kv_bytes_per_element;
            // A device must also take the layer as one tensor (Vulkan's
            // storage-buffer range), or ggml's scheduler aborts.
            let beyond = if layer_keys > largest as f64 {
                Some("the largest device holds")
            } else {
                let one_buffer = gpus.iter().any(|d| super::sys::device_holds(&d.name, layer_keys as u64) != Some(false));
                (!one_buffer).then_some("a device takes in one buffer")
            };
            if let Some(beyond) = beyond {
                let why = format!(
                    "one layer's KV cache keys for {n_ctx} tokens take {} MiB, more than {beyond} ({})",
                    (layer_keys as u64) >> 20,
                    describe(&gpus)
                );
                if layers == GpuLayers::Auto {
                    tracing::warn!("model.gpu_layers = auto: {why}; every layer runs on the CPU");
                    return Ok(fixed(0));
                }
                return Err(EngineError::Offload(format!(
                    "model.gpu_layers = {layers} does not fit: {why}; no layers would fit: lower model.context_length \
                     or model.parallel, or set model.gpu_layers = 0"
                )));
            }
        }
    }
    match layers {
        GpuLayers::Count(0) => Ok(fixed(0)),
        // RPC workers only: the count as given (their memory is the
        // workers' RAM, and the workers were probed).
        GpuLayers::Count(n) if gpus.is_empty() && devices.iter().any(|d| d.kind == "rpc") => Ok(fixed(all(n))),
        GpuLayers::Count(_) if gpus.is_empty() => {
            tracing::warn!(
                "model.gpu_layers = {layers}, but {}: every layer runs on the CPU",
                if cfg!(any(feature = "cuda", feature = "vulkan")) {
                    "no GPU was found (the driver is missing, or the device is not visible)"
                } else {
                    "this build has no GPU backend (build with --features cuda or --features vulkan)"
                }
            );
            Ok(fixed(0))
        }
        GpuLayers::Auto if gpus.is_empty() => Ok(fixed(0)),
        GpuLayers::Auto => {
            let mut params = Box::pin(LlamaModelParams::default());
            match fit(&mut params, model_path, ctx_params, AUTO_MARGIN) {
                Ok(n) => {
                    if n >= 0 {
                        tracing::warn!(
                            "model.gpu_layers = auto: {n} layers fit in free device memory ({}), the rest run on the CPU",
                            describe(&gpus)
                        );
                    }
                    Ok(Offload { n_gpu_layers: n, params })
                }
                Err(why) => {
                    tracing::warn!("model.gpu_layers = auto: {why}; every layer runs on the CPU");
                    Ok(fixed(0))
                }
            }
        }
        GpuLayers::Count(n) => {
            // The fit with no margin: what llama.cpp could allocate at most.
            let mut probe = Box::pin(LlamaModelParams::default());
            let fits = fit(&mut probe, model_path, ctx_params, 0);
            let would = match fits {
                Ok(k) if k < 0 || all(n) >= 0 && all(n) <= k => return Ok(fixed(all(n))),
                Ok(k) => k.to_string(),
                Err(_) => "no".into(),
            };
            let size = std::fs::metadata(model_path).map(|m| m.len() >> 20).unwrap_or(0);
            Err(EngineError::Offload(format!(
                "model.gpu_layers = {layers} does not fit: the model ({size} MiB on disk) with its KV cache and compute \
                 buffers needs more than the devices have free ({}); {would} layers would fit: set model.gpu_layers \
                 to that, or to \"auto\", or lower model.context_length or model.parallel",
                describe(&gpus)
            )))
        }
    }
}

/// llama.cpp's fit of `params` to free device memory less `margin` bytes a
/// device: the layers that fit (-1: all of them).
fn fit(
    params: &mut std::pin::Pin<Box<LlamaModelParams>>,
    model_path: &Path,
    ctx_params: &dyn Fn() -> LlamaContextParams,
    margin: usize,
) -> Result<i32, String> {
    let path = CString::new(model_path.as_os_str().as_encoded_bytes()).map_err(|_| "the model path holds a NUL byte".to_string())?;
    let mut cparams = ctx_params();
    let mut margins = vec![margin; llama_cpp_2::max_devices().max(1)];
    params
        .as_mut()
        .fit_params(&path, &mut cparams, &mut margins, 0, llama_cpp_sys_2::GGML_LOG_LEVEL_WARN)
        .map_err(|e| format!("llama.cpp's fit failed ({e})"))?;
    Ok(params.n_gpu_layers())
}

/// Values a KV cache row holds per layer for one of keys or values (the
/// key heads times their width), read off the GGUF without its weights.
fn kv_width(backend: &LlamaBackend, model_path: &Path) -> Option<u64> {
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = llama_cpp_2::model::LlamaModel::load_from_file(backend, model_path, &params).ok()?;
    kv_width_of(&model)
}

/// As [`kv_width`], for a model already loaded.
pub(super) fn kv_width_of(model: &llama_cpp_2::model::LlamaModel) -> Option<u64> {
    let arch = model.meta_val_str("general.architecture").ok()?;
    let meta = |key: &str| model.meta_val_str(&format!("{arch}.{key}")).ok().and_then(|v| v.trim().parse::<u64>().ok());
    let heads = meta("attention.head_count")?;
    let kv_heads = meta("attention.head_count_kv").unwrap_or(heads);
    let head_width = meta("attention.key_length").or_else(|| Some(meta("embedding_length")? / heads.max(1)))?;
    Some(kv_heads * head_width)
}

fn describe(devices: &[&GpuDevice]) -> String {
    devices
        .iter()
        .map(|d| format!("{} {}: {} MiB free of {} MiB", d.name, d.description, d.free_bytes >> 20, d.total_bytes >> 20))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every layer stays on the CPU, the one backend that calls the abort
/// callback (requests are answered inside a step): no layer asked for, or
/// no device to take one, and no RPC workers. The same as
/// [`GpuInfo::offloaded_layers`] being 0 without workers.
pub(super) fn all_on_cpu(n_gpu_layers: i32, rpc_servers: &[String]) -> bool {
    rpc_servers.is_empty() && (n_gpu_layers == 0 || devices().is_empty())
}

/// What `get_capabilities` says after loading: the devices now (their free
/// memory after the model), and the layers on them.
pub(super) fn info(n_gpu_layers: i32, n_layer: u32) -> GpuInfo {
    let devices = devices();
    let total_layers = n_layer + 1;
    let offloaded_layers = if devices.is_empty() {
        0
    } else if n_gpu_layers < 0 {
        total_layers
    } else {
        (n_gpu_layers as u32).min(total_layers)
    };
    let backend = match devices.iter().find(|d| d.kind != "rpc").or(devices.first()) {
        Some(d) if d.kind == "rpc" => "RPC".to_string(),
        Some(d) => d.name.trim_end_matches(|c: char| c.is_ascii_digit()).to_string(),
        None => "none".into(),
    };
    GpuInfo { backend, devices, offloaded_layers, total_layers }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_layers_reads_numbers_auto_and_all() {
        assert_eq!(GpuLayers::parse("auto"), Some(GpuLayers::Auto));
        assert_eq!(GpuLayers::parse(" 35 "), Some(GpuLayers::Count(35)));
        assert_eq!(GpuLayers::parse("ALL"), Some(GpuLayers::Count(u32::MAX)));
        assert_eq!(GpuLayers::parse("-1"), Some(GpuLayers::Count(u32::MAX)));
        assert_eq!(GpuLayers::parse("-2"), None);
        assert_eq!(GpuLayers::parse("many"), None);
        let v: toml::Value = toml::from_str("a = 99").unwrap();
        let n: GpuLayers = v["a"].clone().try_into().unwrap();
        assert_eq!(n, GpuLayers::Count(99));
        assert_eq!(toml::Value::try_from(GpuLayers::Count(99)).unwrap(), toml::Value::Integer(99));
        assert_eq!(toml::Value::try_from(GpuLayers::Auto).unwrap(), toml::Value::String("auto".into()));
    }
}
