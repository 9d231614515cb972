//! The wall clock and the local filesystem's free space, in one place so that no stage depends on
//! another for them.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), for heartbeats.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Bytes available to unprivileged users on the filesystem holding `path` (`statvfs`).
///
/// # Errors
/// `statvfs` failed.
pub(crate) fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether `a` and `b` are on one filesystem (the same device). A path that does not exist yet is
/// judged by its nearest existing ancestor (where it will be created).
///
/// # Errors
/// Neither the path nor any of its ancestors can be examined.
pub(crate) fn same_filesystem(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<bool> {
    Ok(device(a)? == device(b)?)
}

fn device(path: &std::path::Path) -> std::io::Result<u64> {
    let abs = std::path::absolute(path)?;
    let mut at = abs.as_path();
    loop {
        match rustix::fs::stat(at) {
            Ok(st) => return Ok(st.st_dev),
            Err(e) => at = at.parent().ok_or(std::io::Error::from(e))?,
        }
    }
}
