//! The predecessor's values: what its documented settings mean here.

use super::ModelConfig;

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
/// the value cannot be honoured; `cpu` (and a GPU this build cannot drive)
/// keep every layer on the CPU.
pub(super) fn hardware_backend_meaning(m: &mut ModelConfig) -> Option<String> {
    let cuda_built = cfg!(feature = "cuda");
    match m.hardware_backend.as_str() {
        "auto" => None,
        "cpu" if m.gpu_layers > 0 => {
            let layers = std::mem::take(&mut m.gpu_layers);
            Some(format!("model.hardware_backend = \"cpu\": model.gpu_layers = {layers} is ignored, every layer runs on the CPU"))
        }
        "cpu" => None,
        "cuda" if cuda_built => None,
        "cuda" => Some(
            "model.hardware_backend = \"cuda\", but this build has no CUDA support (build with --features cuda): \
             running on the CPU"
                .into(),
        ),
        other => {
            m.gpu_layers = 0;
            Some(format!(
                "model.hardware_backend = {other:?} is not supported by this build (Elpis offloads to NVIDIA GPUs \
                 through a CUDA build only): running on the CPU"
            ))
        }
    }
}

