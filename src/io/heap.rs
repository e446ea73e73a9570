//! Gives the heap freed after a burst of calls back to the kernel. zbus serves each call in a task
//! of its own, so many callers at once take heap for each of them, and glibc keeps what is freed
//! for reuse (what the trim gives back: docs/performance.md, "The heap after a burst"). A daemon
//! that lives for months on a host full of VMs should not keep its worst burst's footprint.

/// Concurrent calls that count as a burst worth trimming after (an ordinary Kick is one).
pub const BURST: usize = 64;

/// How long the callers must stay away after a burst before the heap is trimmed: long enough for
/// the tasks that served it to end and the replies queued for the bus to be written and freed,
/// and for a burst that only paused to come back first.
pub const TRIM_AFTER_BURST: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns free heap pages to the kernel (`malloc_trim(3)`); a no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and shrinks glibc's own arenas; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
