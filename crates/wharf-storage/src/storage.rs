//! The file-system abstraction the log is written against, and its `std::fs` implementation.
//!
//! The trait is deliberately small: exactly the operations whose ordering the log's durability
//! argument depends on (write, fsync, truncate, create/remove, directory fsync). That
//! keeps [`crate::MemStorage`] honest: it can model what survives a power loss for each one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// An open file. Methods take `&self` so readers can `read_at` while the writer appends.
// `is_empty` would be dead weight: the log only ever compares lengths with offsets.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + Sync {
    /// Writes all of `buf` at `offset` (positional; extends the file as needed).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `offset`; `UnexpectedEof` if the file is shorter.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes written data durable (`fdatasync`). Until it returns `Ok`, a power loss may drop
    /// or tear any write since the previous successful sync.
    fn sync(&self) -> io::Result<()>;
    /// Sets the length to `len` (not durable until the next [`StorageFile::sync`]).
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// A directory of files. Creations and removals are durable only after
/// [`Storage::sync_dir`] on the parent directory.
pub trait Storage: Send + Sync {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new, empty file; fails with `AlreadyExists` if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Removes a file (open handles stay readable).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Names of the files in `dir` (not paths), in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes creations and removals in `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// [`Storage`] on the real file system through `std::fs` (Unix: positional I/O via `pread`/`pwrite`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileStorage;

struct FsFile(File);

impl StorageFile for FsFile {
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn sync(&self) -> io::Result<()> {
        // fdatasync still flushes the file size, which is what appends change.
        self.0.sync_data()
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for FileStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(FsFile(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(FsFile(file)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
