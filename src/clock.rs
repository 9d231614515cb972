//! The clocks and the local filesystem's free space, in one place so that no stage depends on
//! another for them.
//!
//! Two clocks, for two questions: the wall clock ([`now_secs`]) says *when* — Huggy's time, when an
//! event was received, how old the oldest undelivered one is; the monotonic clock
//! ([`monotonic_millis`]) says *how long* — heartbeats, stall checks and deadlines, which a wall
//! clock stepped by NTP or an operator must not move (a forward jump would make every stage look
//! stuck, a backward one would hide a stage that is).

use std::sync::OnceLock;
use std::time::Instant;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    secs.saturating_add(seam::wall_shift_ms() / 1000)
}

/// Milliseconds on the monotonic clock since the process first read it, plus one (so that 0 can
/// mean "never"): for heartbeats and stall checks.
pub(crate) fn monotonic_millis() -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let elapsed = EPOCH.get_or_init(Instant::now).elapsed();
    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX).saturating_add(1).saturating_add(seam::monotonic_shift_ms())
}

/// Bytes available to unprivileged users on the filesystem holding `path` (`statvfs`).
///
/// # Errors
/// `statvfs` failed.
pub(crate) fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Lets a unit test step the clocks of its own thread: the wall clock jumps (as NTP or an operator
/// steps it), the monotonic clock only moves forward. Nothing outside tests shifts anything.
#[cfg(test)]
pub(crate) mod seam {
    use std::cell::Cell;

    thread_local! {
        static WALL: Cell<i64> = const { Cell::new(0) };
        static MONOTONIC: Cell<i64> = const { Cell::new(0) };
    }

    /// Steps this thread's wall clock by `ms` (either way).
    pub(crate) fn jump_wall(ms: i64) {
        WALL.with(|w| w.set(w.get() + ms));
    }

    /// Lets `ms` pass on this thread's monotonic clock.
    pub(crate) fn advance_monotonic(ms: u32) {
        MONOTONIC.with(|m| m.set(m.get() + i64::from(ms)));
    }

    pub(super) fn wall_shift_ms() -> i64 {
        WALL.with(Cell::get)
    }

    pub(super) fn monotonic_shift_ms() -> i64 {
        MONOTONIC.with(Cell::get)
    }
}

#[cfg(not(test))]
mod seam {
    pub(super) fn wall_shift_ms() -> i64 {
        0
    }

    pub(super) fn monotonic_shift_ms() -> i64 {
        0
    }
}
