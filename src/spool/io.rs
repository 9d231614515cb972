//! The system calls durability depends on, behind a trait so that tests can make them fail the
//! way disks do (`EIO` on `fdatasync`, `ENOSPC` on `write`, unsynced pages dropped) or hang, and
//! the free space the writer waits for after `ENOSPC`.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// How the writer writes and syncs segment files.
pub trait SegmentIo: Send + Sync + 'static {
    /// Appends `buf` at the end of `file`.
    ///
    /// # Errors
    /// As `write(2)`.
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }

    /// Makes what was written to `file` durable (`fdatasync`).
    ///
    /// # Errors
    /// As `fdatasync(2)`. After an error the file's unsynced data may be lost for good: the caller
    /// must not sync it again and believe it.
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    /// Bytes free for the spool on the filesystem holding `dir` (`statvfs`).
    ///
    /// # Errors
    /// As `statvfs(2)`.
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        crate::clock::free_bytes(dir)
    }
}

/// Whether `e` says the filesystem has no room (`ENOSPC`, or `EDQUOT` for a quota).
pub fn is_no_room(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// The real thing.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsIo;

impl SegmentIo for OsIo {}
