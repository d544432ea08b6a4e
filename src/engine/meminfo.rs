//! Memory facts Linux reports in /proc as "Field:   1234 kB" lines: what the
//! system could give, what this process holds, and how much of it in huge
//! pages. None (or 0) where the file or field is missing (other systems).

/// The `field` line of `path` ("Field:   1234 kB"), in bytes.
fn proc_bytes(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib << 10)
}

/// Memory the system could give now without swapping.
pub fn available() -> Option<u64> {
    proc_bytes("/proc/meminfo", "MemAvailable")
}

/// This process's resident memory.
pub fn resident() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmRSS")
}

/// This process's memory held in transparent huge pages (0 where unknown).
pub fn in_huge_pages() -> u64 {
    proc_bytes("/proc/self/smaps_rollup", "AnonHugePages").unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_fields_are_read_in_bytes() {
        let resident = super::resident().unwrap();
        // A running test process holds at least a megabyte, and the
        // system it runs on has some memory to give.
        assert!(resident >= 1 << 20, "{resident}");
        assert!(super::available().unwrap() > 0);
        assert_eq!(super::proc_bytes("/proc/self/status", "NoSuchField"), None);
    }
}
