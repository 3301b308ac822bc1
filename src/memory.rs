//! The process's transparent huge pages (THP): off unless `proxy.transparent_huge_pages`.
//!
//! mimalloc marks its arenas for huge pages (`madvise(MADV_HUGEPAGE)`), so under THP the heap
//! grows 2 MiB at a time, and the request whose allocation first touches a new 2 MiB page
//! waits while the kernel finds and zeroes it. While a cold cache fills at 5 000 misses/s that
//! was a ~3 ms stall every ~0.4 s, the cold path's whole p99.9 (docs/benchmarks.md, "Huge
//! pages"). With 4 KiB pages the same growth is spread over many faults of microseconds. Redis
//! advises turning THP off for the same reason.

use std::io;

/// Allows (`true`) or forbids (`false`) transparent huge pages for the whole process, from
/// now on, whatever the system's THP policy (`prctl(PR_SET_THP_DISABLE)`; Linux only, a no-op
/// elsewhere). Pages already faulted in stay as they are.
pub fn set_transparent_huge_pages(allowed: bool) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_thp_disable(!allowed).map_err(io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = allowed;
        Ok(())
    }
}

/// Whether the process may use transparent huge pages (`false` once THP is disabled for it).
pub fn transparent_huge_pages_allowed() -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::get_thp_disable()
            .map(|disabled| !disabled)
            .map_err(io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(false)
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    use super::*;

    #[test]
    fn the_switch_reads_back_both_ways() {
        // The flag is the whole test process's; other tests only lose or gain huge pages.
        set_transparent_huge_pages(false).unwrap();
        assert!(!transparent_huge_pages_allowed().unwrap());
        set_transparent_huge_pages(true).unwrap();
        assert!(transparent_huge_pages_allowed().unwrap());
    }
}
