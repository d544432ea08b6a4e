//! Weights held in 2 MiB pages.
//!
//! A decode step reads every weight once. Mapped from the model file, the
//! weights sit in 4 KiB pages of the page cache (the kernel does not back a
//! read-only file mapping with huge pages), so one step walks some 150,000
//! of them for the default model and misses the TLB all the way. Read into
//! anonymous memory the kernel is asked (`madvise(MADV_HUGEPAGE)`) to back
//! with transparent huge pages, they take 512 times fewer entries. Measured
//! on this project's 2-core AVX-512 host (Qwen2.5-0.5B, 2 threads, widened
//! weights, alternating with llama-server, which maps the file): decode 52.0
//! tokens/s against 48.4 mapped (llama-server 51.1), prompts unchanged; the
//! same in llama-bench (`--load-mode none` with glibc's huge-page tunable
//! against `mmap`: 53.6 against 51.3 tokens/s, higher in 5 pairs of 5).
//!
//! llama.cpp allocates the weights' buffer before it reads the first tensor
//! (and calls the load's progress callback then): the mappings that appeared
//! since the load began are that buffer, advised before any page of it is
//! touched, so each page is faulted in huge, with no copy. Linux only, and
//! only where the kernel offers transparent huge pages (`always` or
//! `madvise`), and where the weights take at most half the memory available;
//! elsewhere, or with `model.huge_pages = false`, the file is mapped as
//! before (shared with other processes, paged in lazily).

use super::sys;

/// A huge page: advising less than one can win nothing.
const HUGE_PAGE: usize = 2 << 20;

/// Whether the kernel backs advised memory with transparent huge pages.
pub fn offered() -> bool {
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    // The setting in use is bracketed: "always [madvise] never".
    ["[always]", "[madvise]"].iter().any(|s| setting.contains(s))
}

/// Whether `bytes` of weights read into memory leave room: at most half of
/// what the system could give now without swapping (mapped, a model larger
/// than memory still loads, paged in and out as it is read).
pub fn room_for(bytes: u64) -> bool {
    match super::meminfo::available() {
        Some(available) if bytes > available / 2 => {
            let (available_mib, weights_mib) = (available >> 20, bytes >> 20);
            tracing::info!(available_mib, weights_mib, "huge pages: not enough memory to read the weights in; the file is mapped");
            false
        }
        _ => true,
    }
}

/// An anonymous, private, writable mapping of this process: [start, end).
fn anonymous_mappings() -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines().filter_map(parse_anonymous).collect()
}

/// "start-end perms offset dev inode [path]": the range when the line is an
/// anonymous private writable mapping (inode 0, no path).
fn parse_anonymous(line: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let (range, perms) = (fields.next()?, fields.next()?);
    let inode = fields.nth(2)?;
    if fields.next().is_some() || inode != "0" || !perms.starts_with("rw") || !perms.ends_with('p') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some((usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?))
}

/// The parts of `range` no mapping in `before` covers (a new buffer can be
/// merged with an older neighbour into one mapping).
fn new_parts((start, end): (usize, usize), before: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut parts = vec![(start, end)];
    for &(b0, b1) in before {
        parts = parts
            .into_iter()
            .flat_map(|(s, e)| {
                if b1 <= s || e <= b0 {
                    return vec![(s, e)];
                }
                [(s, b0.max(s)), (b1.min(e), e)].into_iter().filter(|(a, b)| a < b).collect()
            })
            .collect();
    }
    parts
}

/// Advice for the buffers a model load allocates: the process's anonymous
/// mappings as the load began, and what was advised since.
pub struct Advice {
    before: Vec<(usize, usize)>,
    advised: usize,
}

impl Advice {
    pub fn before_load() -> Advice {
        Advice { before: anonymous_mappings(), advised: 0 }
    }

    /// Advise every anonymous mapping of at least a huge page that appeared
    /// since the load began (its buffers, allocated and not yet touched).
    pub fn advise_new(&mut self) {
        let now = anonymous_mappings();
        for &range in &now {
            for (start, end) in new_parts(range, &self.before) {
                if end - start < HUGE_PAGE {
                    continue;
                }
                #[cfg(target_os = "linux")]
                let advised = sys::advise_huge_pages(start, end - start);
                #[cfg(not(target_os = "linux"))]
                let advised: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
                match advised {
                    Ok(()) => self.advised += end - start,
                    Err(e) => tracing::debug!("huge pages not advised for {start:#x}-{end:#x}: {e}"),
                }
            }
        }
        self.before = now;
    }

    /// Bytes advised so far.
    pub fn advised(&self) -> usize {
        self.advised
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_private_writable_mappings_are_read_from_maps() {
        let line = "7f9532200000-7f954f6a3000 rw-p 00000000 00:00 0 ";
        assert_eq!(parse_anonymous(line), Some((0x7f9532200000, 0x7f954f6a3000)));
        // A file, a shared mapping, a read-only one, the stack: not ours to advise.
        assert_eq!(parse_anonymous("7f95-7f96 r--s 00000000 fe:00 10117190   /root/model.gguf"), None);
        assert_eq!(parse_anonymous("7f95-7f96 rw-s 00000000 00:01 0"), None);
        assert_eq!(parse_anonymous("7f95-7f96 r--p 00000000 00:00 0"), None);
        assert_eq!(parse_anonymous("7ffd-7ffe rw-p 00000000 00:00 0                          [stack]"), None);
    }

    #[test]
    fn only_the_parts_no_earlier_mapping_covered_are_new() {
        assert_eq!(new_parts((10, 20), &[]), vec![(10, 20)]);
        assert_eq!(new_parts((10, 20), &[(10, 20)]), vec![]);
        // A buffer merged with the mapping before it, and one inside.
        assert_eq!(new_parts((10, 40), &[(10, 15), (20, 25)]), vec![(15, 20), (25, 40)]);
        assert_eq!(new_parts((10, 20), &[(0, 12), (18, 30)]), vec![(12, 18)]);
    }

    #[test]
    fn weights_beyond_half_the_memory_available_are_mapped() {
        assert!(room_for(0));
        if let Some(available) = super::super::meminfo::available() {
            // Twice what is available now: mapped however memory moves meanwhile.
            assert!(!room_for(available.saturating_mul(2)), "twice {available} bytes");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_new_buffer_is_advised() {
        let mut advice = Advice::before_load();
        // Allocated, not touched: what llama.cpp's weight buffer is at the
        // first progress callback. Above glibc's largest threshold for
        // mapping a block of its own (32 MiB), so it is a new mapping.
        let new: Vec<u8> = Vec::with_capacity(32 * HUGE_PAGE);
        advice.advise_new();
        std::hint::black_box(&new);
        if offered() {
            assert!(advice.advised() >= 31 * HUGE_PAGE, "advised {} bytes", advice.advised());
        }
        drop(new);
    }
}
