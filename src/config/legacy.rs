//! The predecessor's values: what its documented settings mean here.

use super::ModelConfig;
use crate::engine::GpuLayers;

/// `model.hardware_backend` values the predecessor documented.
pub(super) const HARDWARE_BACKENDS: [&str; 8] = ["auto", "cpu", "cuda", "rocm", "hip", "metal", "mps", "vulkan"];

/// Keys of the predecessor's transformers backend: accepted and ignored.
pub(super) const TRANSFORMERS_KEYS: &[&str] = &[
    "backend",
    "model_name",
    "torch_dtype",
    "device",
    "device_map",
    "load_in_8bit",
    "load_in_4bit",
    "trust_remote_code",
    "quantization",
    "use_flash_attention",
    "attn_implementation",
    "revision",
    "cache_dir",
];

/// What `model.hardware_backend` means for this build, as a warning when
/// the value cannot be honoured: `cpu` keeps every layer on the CPU, a GPU
/// backend this build cannot drive says so and runs on the CPU. AMD cards
/// (`rocm`, `hip`) are served by the Vulkan build, as is any GPU.
pub(super) fn hardware_backend_meaning(m: &mut ModelConfig) -> Option<String> {
    let built = if cfg!(feature = "cuda") {
        Some("cuda")
    } else if cfg!(feature = "vulkan") {
        Some("vulkan")
    } else {
        None
    };
    let on_cpu = |m: &mut ModelConfig, why: String| {
        m.gpu_layers = GpuLayers::Count(0);
        Some(format!("{why}: every layer runs on the CPU"))
    };
    match (m.hardware_backend.as_str(), built) {
        ("auto", _) => None,
        ("cpu", _) if matches!(m.gpu_layers, GpuLayers::Count(n) if n > 0) => {
            let layers = m.gpu_layers;
            on_cpu(m, format!("model.hardware_backend = \"cpu\": model.gpu_layers = {layers} is ignored"))
        }
        ("cpu", _) => {
            m.gpu_layers = GpuLayers::Count(0);
            None
        }
        ("cuda", Some("cuda")) | ("vulkan", Some("vulkan")) => None,
        ("rocm" | "hip", Some("vulkan")) => Some(format!(
            "model.hardware_backend = {:?}: AMD GPUs are driven through Vulkan in this build",
            m.hardware_backend
        )),
        ("cuda", Some("vulkan")) => Some(
            "model.hardware_backend = \"cuda\" in a Vulkan build: NVIDIA GPUs are driven through Vulkan \
             (build with --features cuda for CUDA)"
                .into(),
        ),
        (wanted, built) => {
            let build = match built {
                Some(b) => format!("this build offloads through {b} only"),
                None => "this build has no GPU backend (build with --features cuda, or --features vulkan for any GPU \
                         including AMD)"
                    .into(),
            };
            on_cpu(m, format!("model.hardware_backend = {wanted:?} is not supported: {build}"))
        }
    }
}
