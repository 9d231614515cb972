//! The exclusive lock on `spool.dir`: one process at a time reads or writes a spool.
//!
//! An advisory `flock` on `spool.dir/LOCK`, taken before anything else in the directory is read and
//! held for the life of the handle; the kernel drops it when the process dies (SIGKILL included), so
//! a stale lock never blocks a restart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the directory.
    #[error(
        "spool directory {0} is in use by another huggy-bridge process (a running daemon or a spool command); \
         each replica needs its own spool.dir"
    )]
    Held(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("cannot lock spool directory {path}")]
    Io {
        /// The spool directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting.
    ///
    /// # Errors
    /// [`LockError::Held`] when another process holds it.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let io_err = |source| LockError::Io { path: dir.to_owned(), source };
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK")).map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held(dir.to_owned())),
            Err(TryLockError::Error(e)) => Err(io_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(DirLock::acquire(dir.path()), Err(LockError::Held(_))));
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
