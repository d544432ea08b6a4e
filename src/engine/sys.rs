//! The one file with `unsafe`: calls that no safe crate makes for us. Each
//! block says why it is sound. Besides `malloc_trim`, these are the llama.cpp
//! calls llama-cpp-2 does not wrap (control vectors, the eval callback, a
//! context that has one, and the callback ggml's CPU backend makes between
//! graph nodes), reached through raw pointers recovered from llama-cpp-2's
//! types and checked against its safe API before any use; ggml's thread pool;
//! ggml's RPC backend (workers on other hosts) with its abort hook; and the
//! advice that asks the kernel for huge pages.

/// Hand the heap's free pages back to the operating system: glibc keeps
/// freed memory (sampling's temporaries, a dropped prompt-cache entry) in
/// its arenas, in the RSS. Other allocators keep their own policy.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" { fn malloc_trim(pad: usize) -> i32; }
        // SAFETY: malloc_trim takes a plain integer and only walks glibc's
        // own arenas under their locks; it is documented as safe to call at
        // any time from any thread, invalidates no live allocation, and
        // reads no memory of ours.
        unsafe { malloc_trim(0) };
    }
}

/// Ask the kernel to back `len` bytes at `start` (a mapping of this
/// process's, as /proc/self/maps lists it) with transparent huge pages.
#[cfg(target_os = "linux")]
pub fn advise_huge_pages(start: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: MADV_HUGEPAGE changes no byte and no mapping, only the size of pages faulted in
    // later; a range that is no longer mapped is refused (ENOMEM), which is not unsound.
    unsafe { rustix::mm::madvise(start as *mut c_void, len, rustix::mm::Advice::LinuxHugepage) }.map_err(Into::into)
}

/// llama.cpp's system-info line ("CPU : SSE3 = 1 | AVX = 1 | ...").
pub fn system_info() -> String {
    // SAFETY: takes no argument; returns null or a NUL-terminated string in
    // a static buffer of llama.cpp's, copied at once on the engine's thread.
    let ptr = unsafe { llama_cpp_sys_2::llama_print_system_info() };
    // SAFETY: as above, and checked for null first.
    (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Control vectors and the eval callback: llama.cpp calls that llama-cpp-2
// 0.1.160 does not wrap. Everything below runs on the engine's thread.
// ---------------------------------------------------------------------------

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as ffi;

/// The raw model pointer inside a [`LlamaModel`], checked.
///
/// `LlamaModel` is `#[repr(transparent)]` over a `#[repr(transparent)]`
/// wrapper of `NonNull<llama_model>` in llama-cpp-2 0.1.160, so its bytes
/// are the pointer. The size is checked first (a different layout fails
/// here, not in llama.cpp), then the pointer's answers against the safe API's.
pub fn model_ptr(model: &LlamaModel) -> Result<NonNull<ffi::llama_model>, String> {
    if std::mem::size_of::<LlamaModel>() != std::mem::size_of::<*mut ffi::llama_model>() {
        return Err(format!("llama-cpp-2's LlamaModel is {} bytes, not one pointer: its layout changed", std::mem::size_of::<LlamaModel>()));
    }
    // SAFETY: the size check above proves the struct is exactly one pointer
    // wide, and llama-cpp-2 declares it (and its `Ptr`) `repr(transparent)`
    // over `NonNull<llama_model>`: reading it as a pointer reads that field.
    // `model` is a live reference, so the read is in bounds and aligned.
    let raw = unsafe { *(model as *const LlamaModel as *const *mut ffi::llama_model) };
    let ptr = NonNull::new(raw).ok_or("the model pointer is null")?;
    // SAFETY: `ptr` is the model's own pointer (above), alive as long as
    // `model`; these getters only read its hyperparameters.
    let (n_embd, n_layer) = unsafe { (ffi::llama_model_n_embd(ptr.as_ptr()), ffi::llama_model_n_layer(ptr.as_ptr())) };
    let (embd, layer) = (model.n_embd(), model.n_layer());
    if n_embd != embd || n_layer as u32 != layer {
        return Err(format!("the recovered model pointer answers n_embd {n_embd}, n_layer {n_layer}; the model says {embd}, {layer}"));
    }
    Ok(ptr)
}

/// The raw context pointer inside a [`LlamaContext`], checked.
///
/// `LlamaContext` (llama-cpp-2 0.1.160) holds the context pointer, an empty
/// `Vec` of backend samplers (Elpis adds none) and zero-sized markers; its
/// field order is the compiler's. Of its pointer-sized words, the empty
/// `Vec` contributes a dangling pointer (its alignment), 0 and 0: exactly
/// one word is anything else, and that is the candidate. It is accepted only
/// if the struct has the expected size and llama.cpp, asked through it,
/// reports the context size and model the safe API reports.
pub fn context_ptr(ctx: &LlamaContext, model: NonNull<ffi::llama_model>) -> Result<NonNull<ffi::llama_context>, String> {
    const WORD: usize = std::mem::size_of::<usize>();
    let size = std::mem::size_of::<LlamaContext>();
    if size != 4 * WORD {
        return Err(format!("llama-cpp-2's LlamaContext is {size} bytes, not 4 words: its layout changed"));
    }
    // SAFETY: `ctx` is a live reference to a `size`-byte struct; reading it
    // as `size / WORD` aligned words (its alignment is a word: it holds
    // pointers) stays inside it. Padding cannot occur: every field is a
    // word or zero-sized, so every byte read is initialised.
    let words: [usize; 4] = unsafe { std::ptr::read(ctx as *const LlamaContext as *const [usize; 4]) };
    let dangling = std::mem::align_of::<usize>();
    let candidates: Vec<usize> = words.iter().copied().filter(|&w| w != 0 && w != dangling).collect();
    let [raw] = candidates[..] else {
        return Err(format!("cannot tell the context pointer among LlamaContext's words ({} candidates)", candidates.len()));
    };
    let ptr = NonNull::new(raw as *mut ffi::llama_context).ok_or("the context pointer is null")?;
    // SAFETY: `raw` is the only word of the struct that is neither zero nor
    // the empty Vec's dangling pointer, so it is the `NonNull<llama_context>`
    // field; the two getters only read fields of the context it points to.
    let (n_ctx, owner) = unsafe { (ffi::llama_n_ctx(ptr.as_ptr()), ffi::llama_get_model(ptr.as_ptr())) };
    if n_ctx != ctx.n_ctx() || owner != model.as_ptr().cast_const() {
        return Err(format!("the recovered context pointer answers n_ctx {n_ctx}, the context says {}; or its model differs", ctx.n_ctx()));
    }
    Ok(ptr)
}

/// The raw pointers of the engine's model and context, recovered and
/// checked once at load (see [`model_ptr`], [`context_ptr`]).
#[derive(Debug, Clone, Copy)]
pub struct RawPtrs {
    pub model: NonNull<ffi::llama_model>,
    pub ctx: NonNull<ffi::llama_context>,
}

impl RawPtrs {
    pub fn recover(model: &LlamaModel, ctx: &LlamaContext) -> Result<RawPtrs, String> {
        model_ptr(model).and_then(|model| Ok(RawPtrs { model, ctx: context_ptr(ctx, model)? }))
    }
}

/// Set a control vector on the context: `data` holds `n_embd` floats per
/// layer from layer 1 on (llama.cpp's layout), applied to layers
/// `il_start..=il_end`. `None` clears it.
pub fn set_control_vector(ctx: NonNull<ffi::llama_context>, data: Option<&[f32]>, n_embd: i32, il_start: i32, il_end: i32) -> Result<(), String> {
    let (ptr, len) = data.map_or((std::ptr::null(), 0), |d| (d.as_ptr(), d.len()));
    // SAFETY: `ctx` was checked by `context_ptr` and lives as long as the
    // engine, which calls this on its own thread between decodes. llama.cpp
    // copies `len` floats out of `ptr` (a live slice, or null to clear)
    // before returning and keeps no reference to it.
    let rc = unsafe { ffi::llama_set_adapter_cvec(ctx.as_ptr(), ptr, len, n_embd, il_start, il_end) };
    (rc == 0).then_some(()).ok_or_else(|| format!("llama_set_adapter_cvec failed ({rc})"))
}

/// Hidden states read during a decode: each layer's output (`l_out-N`) at the batch's last token.
struct Capture {
    n_embd: usize,
    /// Indexed by layer; empty until the layer's output was seen.
    layers: Vec<Vec<f32>>,
}

/// llama.cpp's eval callback: asked whether to observe each graph node, then handed those observed.
extern "C" fn capture_layer(t: *mut ffi::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    // SAFETY: llama.cpp passes a valid tensor for the node being scheduled,
    // and `user_data` is the `Capture` that `CaptureContext::decode` set up
    // and keeps alive, on this same thread, for the whole decode.
    let (tensor, capture) = unsafe { (&*t, &mut *(user_data as *mut Capture)) };
    // SAFETY: a ggml tensor's name is a NUL-terminated array of 64 chars.
    let name = unsafe { CStr::from_ptr(tensor.name.as_ptr()) }.to_bytes();
    let Some(layer) = name.strip_prefix(b"l_out-").and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok()) else {
        return !ask;
    };
    if ask {
        return true;
    }
    let width = tensor.ne[0] as usize;
    if tensor.type_ != ffi::GGML_TYPE_F32 || width != capture.n_embd || layer >= capture.layers.len() {
        return true;
    }
    let rows = tensor.ne[1].max(1) as usize;
    let mut last = vec![0f32; width];
    // SAFETY: the tensor is computed (ask == false) and f32, `rows` columns
    // of `nb[1]` bytes each: the last column's `width` floats lie inside it;
    // `last` has room for exactly those bytes.
    unsafe {
        ffi::ggml_backend_tensor_get(t, last.as_mut_ptr().cast(), (rows - 1) * tensor.nb[1], width * 4);
    }
    capture.layers[layer] = last;
    true
}

/// A second, small context on the loaded model with the eval callback set:
/// decodes one text at a time and returns every layer's output at its last
/// token. Freed on drop.
pub struct CaptureContext {
    ctx: NonNull<ffi::llama_context>,
    capture: Box<Capture>,
    n_ctx: usize,
}

impl CaptureContext {
    pub fn new(model: NonNull<ffi::llama_model>, n_ctx: u32, threads: i32) -> Result<CaptureContext, String> {
        // SAFETY: `model` was checked by `model_ptr`; reading n_embd/n_layer only reads it.
        let (n_embd, n_layer) = unsafe { (ffi::llama_model_n_embd(model.as_ptr()), ffi::llama_model_n_layer(model.as_ptr())) };
        let mut capture = Box::new(Capture { n_embd: n_embd as usize, layers: vec![Vec::new(); n_layer as usize] });
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { ffi::llama_context_default_params() };
        (params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max) = (n_ctx, n_ctx, n_ctx, 1);
        (params.n_threads, params.n_threads_batch) = (threads, threads);
        params.cb_eval = Some(capture_layer);
        params.cb_eval_user_data = (&mut *capture as *mut Capture).cast();
        // SAFETY: `model` is alive for the process (the engine leaks it);
        // the callback and its user data (boxed: its address is stable, and
        // it lives in `self` until `llama_free` in drop) stay valid for the
        // context's whole life.
        let ctx = unsafe { ffi::llama_init_from_model(model.as_ptr(), params) };
        let ctx = NonNull::new(ctx).ok_or_else(|| format!("llama.cpp could not create a {n_ctx}-token capture context"))?;
        Ok(CaptureContext { ctx, capture, n_ctx: n_ctx as usize })
    }

    /// Decode `tokens` from an empty memory, `between` run between graph
    /// nodes; each layer's output at the last token (layers whose output was
    /// not seen are empty).
    pub fn hidden_states(&mut self, tokens: &[LlamaToken], between: &mut dyn FnMut()) -> Result<Vec<Vec<f32>>, String> {
        if tokens.is_empty() || tokens.len() > self.n_ctx {
            return Err(format!("a capture text must be 1 to {} tokens, not {}", self.n_ctx, tokens.len()));
        }
        self.capture.layers.iter_mut().for_each(Vec::clear);
        let mut ids: Vec<ffi::llama_token> = tokens.iter().map(|t| t.0).collect();
        // SAFETY: the context is ours and alive; clearing its memory and
        // decoding a batch that borrows `ids` (alive across the call) are
        // ordinary uses; the callback writes into `self.capture`, which no
        // other reference touches during the decode.
        let ctx = self.ctx;
        let rc = decode_between_nodes(ctx, between, || unsafe {
            ffi::llama_memory_clear(ffi::llama_get_memory(ctx.as_ptr()), true);
            let batch = ffi::llama_batch_get_one(ids.as_mut_ptr(), ids.len() as i32);
            ffi::llama_decode(ctx.as_ptr(), batch)
        });
        if rc != 0 {
            return Err(format!("capture decode failed ({rc})"));
        }
        Ok(self.capture.layers.clone())
    }
}

impl Drop for CaptureContext {
    fn drop(&mut self) {
        // SAFETY: the context was created by `llama_init_from_model` and is
        // freed exactly once, here; the callback's data outlives the call.
        unsafe { ffi::llama_free(self.ctx.as_ptr()) }
    }
}

// ---------------------------------------------------------------------------
// Work between graph nodes: ggml's CPU backend calls a context's "abort
// callback" on the thread that called `llama_decode` (its first worker)
// after every node of the graph. Elpis never aborts; it uses the call to
// answer requests in the middle of a long step (see `step`).
// ---------------------------------------------------------------------------

/// What runs between graph nodes during one decode, and a panic it raised
/// (carried out of the C callback, raised again after the decode).
struct BetweenNodes<'a> {
    work: &'a mut dyn FnMut(),
    panic: Option<Box<dyn std::any::Any + Send>>,
}

extern "C" fn between_nodes(data: *mut c_void) -> bool {
    // SAFETY: `data` is the `BetweenNodes` that `decode_between_nodes` lent
    // for the length of one decode, on this same thread (ggml's first
    // worker is the thread that called `llama_decode`); nothing else refers
    // to it meanwhile.
    let hook = unsafe { &mut *(data as *mut BetweenNodes) };
    if hook.panic.is_none() {
        // A panic must not unwind through C: keep it for later.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (hook.work)())) {
            hook.panic = Some(panic);
        }
    }
    false
}

std::thread_local!(static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// Whether this thread is inside a decode (its tasks run between graph
/// nodes): nothing may touch a context then.
pub fn decoding() -> bool {
    DECODING.with(|d| d.get())
}

/// Clears the hook and the decoding mark however the decode ends, unwinding
/// included (the context must never keep a pointer into a dead frame).
struct HookGuard(NonNull<ffi::llama_context>);

impl Drop for HookGuard {
    fn drop(&mut self) {
        // SAFETY: the context outlives the decode this guard spans (see
        // `decode_between_nodes`); clearing leaves it without a callback.
        unsafe { ffi::llama_set_abort_callback(self.0.as_ptr(), None, std::ptr::null_mut()) };
        DECODING.with(|d| d.set(false));
    }
}

/// Run `decode` (a `llama_decode` on `ctx`, or on a context `ctx` stands
/// for) with `work` called between its graph nodes, on this thread. A
/// nested call (from `work`) is refused: it would alias the hook's data.
pub fn decode_between_nodes<T>(ctx: NonNull<ffi::llama_context>, work: &mut dyn FnMut(), decode: impl FnOnce() -> T) -> T {
    assert!(!decoding(), "a decode was started from inside another decode's hook");
    let mut hook = BetweenNodes { work, panic: None };
    DECODING.with(|d| d.set(true));
    let guard = HookGuard(ctx);
    // SAFETY: `ctx` is a live context of the engine's, checked by
    // `context_ptr` (or created by `CaptureContext`); the callback and its
    // data (`hook`, on this stack frame) stay valid until `guard` removes
    // the callback, after the decode has returned or unwound.
    unsafe { ffi::llama_set_abort_callback(ctx.as_ptr(), Some(between_nodes), (&mut hook as *mut BetweenNodes).cast()) };
    let out = decode();
    drop(guard);
    if let Some(panic) = hook.panic {
        std::panic::resume_unwind(panic);
    }
    out
}

// ---------------------------------------------------------------------------
// Compute threads held one to a CPU (see `affinity`): ggml's thread pool, found
// through the CPU backend's registry (backends may load at run time), never freed.
// ---------------------------------------------------------------------------

/// Give `ctx` a pool of one thread per entry of `cpus`, thread i held on `cpus[i]`.
pub fn pin_compute_threads(ctx: NonNull<ffi::llama_context>, cpus: &[usize]) -> Result<(), String> {
    type NewPool = unsafe extern "C" fn(*mut ffi::ggml_threadpool_params) -> *mut ffi::ggml_threadpool;
    // SAFETY: the first call returns a plain struct of ggml's defaults; the
    // lookups read ggml's static registry (null where absent) by a C literal.
    let (mut params, address) = unsafe {
        let dev = ffi::ggml_backend_dev_by_type(ffi::GGML_BACKEND_DEVICE_TYPE_CPU);
        let reg = if dev.is_null() { std::ptr::null_mut() } else { ffi::ggml_backend_dev_backend_reg(dev) };
        let address = if reg.is_null() { std::ptr::null_mut() } else { ffi::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_new".as_ptr()) };
        (ffi::ggml_threadpool_params_default(cpus.len() as i32), address)
    };
    let address = NonNull::new(address).ok_or("the CPU backend offers no ggml_threadpool_new")?;
    for &cpu in cpus {
        *params.cpumask.get_mut(cpu).ok_or_else(|| format!("CPU {cpu} is beyond ggml's thread mask"))? = true;
    }
    params.strict_cpu = true;
    // SAFETY: the CPU backend answers that name with `ggml_threadpool_new`,
    // whose signature `NewPool` is; it reads `params` (live, initialised)
    // during the call only.
    let pool = NonNull::new(unsafe { std::mem::transmute::<*mut c_void, NewPool>(address.as_ptr())(&mut params) }).ok_or("ggml_threadpool_new failed")?;
    // SAFETY: `ctx` is the engine's live context (checked by `context_ptr`);
    // `pool` is never freed, so the pointer the context keeps stays valid.
    // One pool serves one-row and batch steps (both use as many threads).
    unsafe { ffi::llama_attach_threadpool(ctx.as_ptr(), pool.as_ptr(), pool.as_ptr()) };
    Ok(())
}

// ---------------------------------------------------------------------------
// A sequence's KV state as bytes, for the prompt cache: llama-cpp-2 only
// offers it as an opaque value or through unsafe calls.
// ---------------------------------------------------------------------------

/// The KV state of sequence `seq` (its cells: positions and keys/values);
/// None when `room`, told its size before any byte is allocated, declines.
pub fn seq_state(ctx: NonNull<ffi::llama_context>, seq: i32, room: &mut dyn FnMut(usize) -> bool) -> Result<Option<Vec<u8>>, String> {
    // SAFETY: `ctx` is the engine's live context (checked by `context_ptr`),
    // used on its thread between decodes; the size call only reads it.
    let size = unsafe { ffi::llama_state_seq_get_size(ctx.as_ptr(), seq) };
    if !room(size) {
        return Ok(None);
    }
    let mut bytes = vec![0u8; size];
    // SAFETY: as above; llama.cpp writes at most `size` bytes into `bytes`,
    // which has exactly that length.
    let written = unsafe { ffi::llama_state_seq_get_data(ctx.as_ptr(), bytes.as_mut_ptr(), size, seq) };
    (written == size).then_some(Some(bytes)).ok_or_else(|| format!("llama.cpp wrote {written} bytes of a {size}-byte sequence state"))
}

/// Load `bytes` (a state from [`seq_state`] of this same model, context
/// settings and build: the caller checks) into the empty sequence `seq`.
pub fn set_seq_state(ctx: NonNull<ffi::llama_context>, seq: i32, bytes: &[u8]) -> Result<(), String> {
    // SAFETY: `ctx` is the engine's live context, on its thread between
    // decodes; llama.cpp reads at most `bytes.len()` bytes from the slice,
    // validates the layout it finds (layers, cell counts, types) and
    // returns 0 on a mismatch instead of loading it.
    let read = unsafe { ffi::llama_state_seq_set_data(ctx.as_ptr(), bytes.as_ptr(), bytes.len(), seq) };
    (read == bytes.len()).then_some(()).ok_or_else(|| format!("llama.cpp took {read} of {} bytes of the saved state", bytes.len()))
}

/// Whether the ggml device named `name` can hold one tensor of `bytes`
/// bytes where ggml's scheduler will run it (None: no such device). ggml
/// aborts when a tensor allocated on a device sits where that device cannot
/// run it: Vulkan refuses tensors past its storage-buffer range (128 MiB on
/// lavapipe), so a layer's KV cache past it must never be asked for.
pub fn device_holds(name: &str, bytes: u64) -> Option<bool> {
    let name = CString::new(name).ok()?;
    // SAFETY: ggml's device registry is static; the handle it returns (or
    // null) lives for the process. The context holds only tensor metadata
    // (no_alloc; sized from ggml's own overhead), a 1-D I8 tensor of any
    // length is valid, `supports_op` reads the tensor's shape and op
    // (NONE), and the context is freed before returning.
    unsafe {
        let dev = ffi::ggml_backend_dev_by_name(name.as_ptr());
        let params = ffi::ggml_init_params { mem_size: ffi::ggml_tensor_overhead(), mem_buffer: std::ptr::null_mut(), no_alloc: true };
        let ctx = if dev.is_null() { std::ptr::null_mut() } else { ffi::ggml_init(params) };
        if ctx.is_null() {
            return None;
        }
        let t = ffi::ggml_new_tensor_1d(ctx, ffi::GGML_TYPE_I8, bytes.min(i64::MAX as u64) as i64);
        let holds = !t.is_null() && ffi::ggml_backend_dev_supports_op(dev, t);
        ffi::ggml_free(ctx);
        Some(holds)
    }
}

// ---------------------------------------------------------------------------
// ggml RPC: workers on other hosts. `ggml-rpc.h` is not in llama-cpp-sys-2's
// bindings; its functions are linked from libggml-rpc.a, which the build
// makes because `.cargo/config.toml` sets GGML_RPC=ON.
// ---------------------------------------------------------------------------

use std::ffi::{c_char, CString};

extern "C" {
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> ffi::ggml_backend_reg_t;
    fn ggml_backend_rpc_start_server(endpoint: *const c_char, cache_dir: *const c_char, n_threads: usize, n_devices: usize, devices: *mut ffi::ggml_backend_dev_t);
}

/// A device an RPC worker offers, as ggml names it.
#[derive(Debug, Clone)]
pub struct RpcDevice {
    pub name: String,
    pub description: String,
    pub free_bytes: usize,
    pub total_bytes: usize,
}

/// Connect to the RPC worker at `endpoint` (`host:port`) and register its
/// devices with ggml, so a model loaded afterwards can put layers there.
/// ggml aborts the process if it cannot connect: probe the worker first.
pub fn add_rpc_server(endpoint: &str) -> Result<Vec<RpcDevice>, String> {
    let c_endpoint = CString::new(endpoint).map_err(|_| format!("{endpoint:?} has a NUL byte"))?;
    // SAFETY: the endpoint is a valid NUL-terminated string that outlives
    // the call (ggml copies it). The call returns a registry entry owned by
    // ggml for the process's life (one per endpoint, reused on a second
    // call), or null; registering it hands ggml a pointer it already owns.
    let reg = unsafe { ggml_backend_rpc_add_server(c_endpoint.as_ptr()) };
    if reg.is_null() {
        return Err(format!("ggml could not add the RPC worker at {endpoint}"));
    }
    // SAFETY: `reg` is the non-null registry entry just returned; the
    // device handles it lists live as long as it does (the process), and
    // the strings ggml returns for them are NUL-terminated and ggml-owned.
    unsafe {
        ffi::ggml_backend_register(reg);
        let count = ffi::ggml_backend_reg_dev_count(reg);
        let mut devices = Vec::with_capacity(count);
        for i in 0..count {
            let dev = ffi::ggml_backend_reg_dev_get(reg, i);
            if dev.is_null() { continue; }
            let text = |p: *const c_char| if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() };
            let (mut free_bytes, mut total_bytes) = (0usize, 0usize);
            ffi::ggml_backend_dev_memory(dev, &mut free_bytes, &mut total_bytes);
            let (name, description) = (text(ffi::ggml_backend_dev_name(dev)), text(ffi::ggml_backend_dev_description(dev)));
            devices.push(RpcDevice { name, description, free_bytes, total_bytes });
        }
        Ok(devices)
    }
}

/// Serve this machine's CPU backend to other Elpis servers at `endpoint`,
/// forever (ggml's RPC server loop; one client at a time). ggml prints its
/// banner with printf: stdout is pointed at stderr first, so it stays clean.
pub fn serve_rpc(endpoint: &str, threads: usize) -> Result<(), String> {
    extern "C" { fn dup2(oldfd: i32, newfd: i32) -> i32; }
    let c_endpoint = CString::new(endpoint).map_err(|_| format!("{endpoint:?} has a NUL byte"))?;
    // SAFETY: dup2 takes two plain descriptors; 2 and 1 are the process's
    // stderr and stdout, open for its life. Pointing 1 at 2's file touches no
    // memory of ours; Rust's own stdout handle writes to descriptor 1 as well.
    if unsafe { dup2(2, 1) } < 0 {
        return Err("cannot point stdout at stderr".into());
    }
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            static mut stdout: *mut c_void;
            fn setvbuf(stream: *mut c_void, buf: *mut c_char, mode: i32, size: usize) -> i32;
        }
        const LINE_BUFFERED: i32 = 1; // _IOLBF in glibc and musl
        // SAFETY: `stdout` is libc's FILE* for descriptor 1, valid for the
        // process's life; nothing has been written through it yet, which is
        // when setvbuf may be called. A null buffer lets libc allocate.
        // Each ggml line (its banner, "Accepted client connection") then
        // reaches the log as it is printed.
        unsafe { setvbuf(stdout, std::ptr::null_mut(), LINE_BUFFERED, 0) };
    }
    // SAFETY: a parameterless lookup in ggml's static registry; the device
    // it returns (or null) is ggml-owned for the process's life.
    let mut cpu = unsafe { ffi::ggml_backend_dev_by_type(ffi::GGML_BACKEND_DEVICE_TYPE_CPU) };
    (!cpu.is_null()).then_some(()).ok_or("ggml has no CPU device")?;
    // SAFETY: the endpoint string outlives the call, no cache folder is
    // given (null is documented as none), and the one device pointer is
    // valid; ggml reads the array during setup only. The call returns when
    // the listening socket cannot be made (after printing why).
    unsafe { ggml_backend_rpc_start_server(c_endpoint.as_ptr(), std::ptr::null(), threads.max(1), 1, &mut cpu) };
    Err(format!("the RPC server at {endpoint} stopped (is the address in use, or not this machine's?)"))
}

/// What runs when ggml aborts (a lost RPC worker, a failed assertion),
/// given ggml's message, before the process ends.
static ON_ABORT: std::sync::OnceLock<Box<dyn Fn(&str) + Send + Sync>> = std::sync::OnceLock::new();

unsafe extern "C" fn ggml_aborting(message: *const c_char) {
    // SAFETY: ggml passes its NUL-terminated message buffer (or null), alive for the call.
    let message = if message.is_null() { String::new() } else { unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned() };
    if let Some(hook) = ON_ABORT.get() {
        hook(&message);
    }
}

/// Have `hook` hear ggml's message when it aborts (set once; later calls
/// keep the first). ggml calls it on the thread that fails, then aborts.
pub fn on_ggml_abort(hook: Box<dyn Fn(&str) + Send + Sync>) {
    if ON_ABORT.set(hook).is_ok() {
        // SAFETY: `ggml_aborting` has the signature ggml expects and only
        // reads the message it is given; the hook it calls is 'static.
        unsafe { ffi::ggml_set_abort_callback(Some(ggml_aborting)) };
    }
}
