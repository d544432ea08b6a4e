//! The one file with `unsafe`: calls that no safe crate makes for us. Each
//! block says why it is sound. Nothing here touches llama.cpp's memory.

/// Hand the heap's free pages back to the operating system.
///
/// glibc keeps memory that was freed (below its mmap threshold, which rises
/// after every large free) in its arenas, so the megabytes of temporaries
/// that sampling and grammar checking over a 262k-token vocabulary use
/// would stay in the process's RSS after the tool that needed them ended.
/// `malloc_trim(0)` returns every whole free page. Other allocators keep
/// their own policy: elsewhere this does nothing.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim takes a plain integer and only walks glibc's
        // own arenas under their locks; it is documented as safe to call at
        // any time from any thread, invalidates no live allocation, and
        // reads no memory of ours.
        unsafe {
            malloc_trim(0);
        }
    }
}
