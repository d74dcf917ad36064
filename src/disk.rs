//! Low-level file helpers: durable writes and renames, writeback, preallocation, free space.
//!
//! The ground floor of the crate: everything above it speaks of snapshots and downloads, this
//! module speaks of files. Every `unsafe` call into `libc` in the crate lives here, each with the
//! reason it is sound. Every function returns a plain `io::Result`; callers attach the path and
//! classify the error for their own error types.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Takes the advisory lock (flock) that keeps other processes out of a directory, on `file`:
/// the directory itself, or a lock file in it (created if missing). `Ok(None)` when another
/// process holds it; the lock goes with the file handle.
pub(crate) fn lock_exclusive(file: &Path, create: bool) -> io::Result<Option<File>> {
    let handle = if create {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(file)?
    } else {
        File::open(file)?
    };
    match handle.try_lock() {
        Ok(()) => Ok(Some(handle)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Makes a rename, creation or unlink in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if FAIL_DIR_SYNC.with(|f| f.replace(false)) {
        return Err(io::Error::other(
            "injected: the directory could not be synced",
        ));
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next [`sync_dir`] fail (a test's injected fault).
    pub(crate) static FAIL_DIR_SYNC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Writes `bytes` to `path` (created or truncated) and fsyncs the file.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replaces `path` with `bytes` atomically: writes `<path>.tmp`, fsyncs it, renames it over
/// `path` and fsyncs the directory. After a crash `path` holds the old bytes or the new ones.
pub(crate) fn replace_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads the file at `path` if it exists and holds at most `max` bytes (`None` when there is no
/// file; an error when it is longer).
pub(crate) fn read_bounded(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {max} bytes"),
        ));
    }
    Ok(Some(bytes))
}

/// Removes a file or a directory tree; a path that does not exist is not an error.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Gives `file` exactly `len` bytes, reserving the disk space where the file system allows, so
/// that a disk too small fails now rather than half-way through a download. The bytes it holds
/// stay.
pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if len > 0 {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        // SAFETY: fallocate reads only its integer arguments; the descriptor is owned by `file`,
        // which outlives the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // File systems without fallocate get a sparse file; a full disk is an error.
            if e.kind() != io::ErrorKind::Unsupported && e.raw_os_error() != Some(libc::EOPNOTSUPP)
            {
                return Err(e);
            }
        }
    }
    file.set_len(len)
}

/// Bytes available to this process on the file system holding `path`.
pub(crate) fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: `statvfs` writes only into the struct it is given, which is a valid, owned,
    // zero-initialized value; `c` is a valid NUL-terminated string for the length of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Asks the kernel to start writing back `len` bytes of `file` from `offset` (Linux
/// `sync_file_range`), without waiting. A failure is harmless: a later fsync writes everything.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range reads only its integer arguments; the descriptor is owned by
        // `file`, which outlives the call.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// A file written sequentially that starts writeback of every [`WRITEBACK_BYTES`] as it goes, so
/// that the final fsync finds little left to do and the disk works while data is still produced.
pub(crate) struct WritebackFile {
    file: File,
    written: u64,
    flushed_to: u64,
}

/// How much a [`WritebackFile`] writes before it starts writeback of it.
const WRITEBACK_BYTES: u64 = 16 << 20;

impl WritebackFile {
    pub(crate) fn new(file: File) -> Self {
        Self {
            file,
            written: 0,
            flushed_to: 0,
        }
    }

    /// Fsyncs the file and returns it.
    pub(crate) fn sync(self) -> io::Result<File> {
        self.file.sync_all()?;
        Ok(self.file)
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed_to >= WRITEBACK_BYTES {
            start_writeback(&self.file, self.flushed_to, self.written - self.flushed_to);
            self.flushed_to = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// How often a [`Writeback`] thread asks the kernel to write what has arrived.
const WRITEBACK_EVERY: Duration = Duration::from_millis(100);

/// A thread that keeps starting writeback of a file written at random offsets (a download), so
/// the disk works while the rest arrives. `sync_file_range` may block, hence its own thread.
/// Stops when dropped.
pub(crate) struct Writeback {
    stop: Arc<AtomicBool>,
}

impl Writeback {
    pub(crate) fn start(file: File) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let _ = std::thread::Builder::new()
            .name("snapsync-writeback".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    start_writeback(&file, 0, 0);
                    std::thread::sleep(WRITEBACK_EVERY);
                }
            });
        Self { stop }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_atomic_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        replace_synced(&p, b"one").unwrap();
        replace_synced(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        remove_path(&p).unwrap();
        remove_path(&p).unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
    }

    #[test]
    fn preallocation_gives_the_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        fs::write(&path, b"kept").unwrap();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        preallocate(&f, 12345).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 12345);
        assert_eq!(&fs::read(&path).unwrap()[..4], b"kept");
    }
}
