//! The exclusive lock on a data directory: one broker per directory.
//!
//! Two brokers on one directory would each append to the same log and each delete the
//! other's segments at checkpoints: both confirm, and after a restart one's confirmed messages
//! are gone. So the broker takes an advisory `flock` on `DATA_DIR/LOCK` before it opens
//! anything else there, and holds it until it has stopped (the kernel drops it when the
//! process dies, even by `kill -9`). A second broker finds it taken and exits at once, having
//! written nothing in the directory. The file holds the holder's pid, for the error message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// A held lock on a data directory; released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// The locked directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "the data directory {} is in use by another wharf broker{}: \
         two brokers on one data directory would lose each other's confirmed messages",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, when its lock file says.
        holder: Option<u32>,
    },
    /// The directory or its lock file cannot be created or opened.
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl From<LockError> for std::io::Error {
    fn from(err: LockError) -> Self {
        let kind = match &err {
            LockError::InUse { .. } => std::io::ErrorKind::ResourceBusy,
            LockError::Io { source, .. } => source.kind(),
        };
        std::io::Error::new(kind, err)
    }
}

/// Creates `dir` if needed and locks it. Opening the lock file of a directory another broker
/// holds changes nothing in it: the pid is written only once the lock is ours.
pub fn lock(dir: &Path) -> Result<DirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let dir = std::path::absolute(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    // `File::try_lock` is std's `flock(LOCK_EX | LOCK_NB)` (Rust 1.89).
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(LockError::InUse { dir, holder });
        }
        Err(TryLockError::Error(source)) => return Err(io(source)),
    }
    // Ours: say who holds it (not fsynced: only an error message reads it).
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DirLock { _file: file, dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_directory_refuses_a_second_lock_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let before = std::fs::read(dir.path().join(LOCK_FILE)).unwrap();
        let err = lock(dir.path()).unwrap_err();
        match &err {
            LockError::InUse { dir: named, holder } => {
                assert_eq!(named, held.dir());
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other}"),
        }
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        assert_eq!(
            std::fs::read(dir.path().join(LOCK_FILE)).unwrap(),
            before,
            "the refused lock wrote nothing"
        );
        drop(held);
        lock(dir.path()).expect("free again once dropped");
    }
}
