//! The two system calls durability depends on, behind a trait so that tests can make them fail the
//! way disks do (`EIO` on `fdatasync`, `ENOSPC` on `write`, unsynced pages dropped) or hang.

use std::fs::File;
use std::io::{self, Write};

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
}

/// The real thing.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsIo;

impl SegmentIo for OsIo {}
