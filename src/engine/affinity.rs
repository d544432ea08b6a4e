//! Compute threads held one to a CPU.
//!
//! ggml's CPU backend computes a graph with `threads` OpenMP threads that
//! meet at a barrier after every node (hundreds per token), spinning while
//! they wait. Where those threads are as many as the CPUs the process may
//! use and other work keeps every CPU busy, the kernel's balancer can leave
//! two of them on one CPU: each then spins away its time slice waiting for
//! the other, which cannot run meanwhile, and every barrier costs a slice.
//! Measured here (2 CPUs, two busy processes beside, Qwen 0.5B): decode fell
//! from about 10 to 0.37 tokens/s and stayed there, in most server starts
//! (llama-server stalls the same way, less often); the kernel sees two busy
//! threads per CPU either way, so it never moves them apart. Held one to a
//! CPU (ggml's own thread pool with a strict CPU mask, as llama.cpp's
//! `--cpu-strict` does), they cannot meet on one: 8-12 tokens/s in every run.
//!
//! `model.pin_threads`: `auto` holds them where they are as many as the
//! CPUs the process may run on and every layer is on the CPU (pinning
//! fewer threads than CPUs would keep them off idle ones); `on` always;
//! `off` never.

/// `model.pin_threads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinThreads {
    #[default]
    Auto,
    On,
    Off,
}

impl PinThreads {
    pub fn parse(name: &str) -> Option<PinThreads> {
        match name {
            "auto" => Some(PinThreads::Auto),
            "on" => Some(PinThreads::On),
            "off" => Some(PinThreads::Off),
            _ => None,
        }
    }
}

/// The CPUs ggml's thread mask can name (`GGML_MAX_N_THREADS`).
pub const MASK_CPUS: usize = 512;

/// The CPUs this process may run on (its affinity mask), ascending; empty
/// where it cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        use rustix::thread::{sched_getaffinity, CpuSet};
        sched_getaffinity(None).map(|set| (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect()).unwrap_or_default()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Vec::new()
    }
}

/// The CPU each compute thread is held on, in thread order (thread 0 is the
/// engine's own); empty: the threads go where the kernel puts them. Threads
/// beyond the CPUs (`on` only) take them again in order, as ggml's strict
/// mask assigns them.
pub fn plan(mode: PinThreads, threads: usize, allowed: &[usize], all_on_cpu: bool) -> Vec<usize> {
    let pin = match mode {
        PinThreads::Off => false,
        PinThreads::On => true,
        // One thread meets no other at a barrier.
        PinThreads::Auto => all_on_cpu && threads > 1 && threads == allowed.len(),
    };
    if !pin || allowed.is_empty() || allowed.iter().any(|&c| c >= MASK_CPUS) {
        return Vec::new();
    }
    allowed.iter().copied().cycle().take(threads).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_only_as_many_threads_as_cpus_all_on_the_cpu() {
        assert_eq!(plan(PinThreads::Auto, 2, &[0, 1], true), [0, 1]);
        assert_eq!(plan(PinThreads::Auto, 4, &[2, 3, 6, 7], true), [2, 3, 6, 7]);
        // Fewer threads than CPUs: the idle ones stay theirs to move to.
        assert!(plan(PinThreads::Auto, 2, &[0, 1, 2, 3], true).is_empty());
        // More threads than CPUs, one thread, layers on a device: not pinned.
        assert!(plan(PinThreads::Auto, 4, &[0, 1], true).is_empty());
        assert!(plan(PinThreads::Auto, 1, &[0], true).is_empty());
        assert!(plan(PinThreads::Auto, 2, &[0, 1], false).is_empty());
    }

    #[test]
    fn on_and_off_are_obeyed_within_ggmls_mask() {
        assert_eq!(plan(PinThreads::On, 3, &[4, 5], false), [4, 5, 4]);
        assert_eq!(plan(PinThreads::On, 1, &[0, 1, 2, 3], true), [0]);
        assert!(plan(PinThreads::Off, 2, &[0, 1], true).is_empty());
        assert!(plan(PinThreads::On, 2, &[], true).is_empty());
        assert!(plan(PinThreads::On, 2, &[0, MASK_CPUS], true).is_empty());
    }

    #[test]
    fn names_parse() {
        for (name, mode) in [("auto", PinThreads::Auto), ("on", PinThreads::On), ("off", PinThreads::Off)] {
            assert_eq!(PinThreads::parse(name), Some(mode));
        }
        assert_eq!(PinThreads::parse("yes"), None);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        #[cfg(target_os = "linux")]
        assert!(!allowed_cpus().is_empty());
    }
}
