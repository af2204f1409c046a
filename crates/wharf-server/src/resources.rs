//! The machine's resources the broker must not run out of, read from the system: file
//! descriptors (the soft limit is raised to the hard one at start, and a reserve is kept for
//! the log and the spools), free disk space (`disk_free_limit`) and the machine's memory (the
//! relative memory watermark).

use std::path::Path;
use tracing::{info, warn};

/// Descriptors kept out of the connections' reach: the log's segments and directory, a
/// checkpoint being written, the spool files of queues larger than memory, the runtime's own
/// (epoll, eventfd, blocking threads' files) and the listener. A connection cap that leaves
/// fewer could make the log's next segment fail to open, and the log stops the broker then.
pub const FDS_RESERVED: u64 = 128;

/// What the descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit in force (after raising it).
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

impl FdLimit {
    /// Sockets (connections, handshaking ones included) the descriptor limit leaves room for
    /// once [`FDS_RESERVED`] are kept back (half of a very low limit at most).
    pub fn sockets(self) -> usize {
        let reserve = FDS_RESERVED.min(self.soft / 2);
        usize::try_from(self.soft - reserve).unwrap_or(usize::MAX)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as NATS and RabbitMQ do: systemd's
/// default soft limit of 1,024 is reached by accident near a thousand clients) and returns
/// what is in force. A failure to raise it keeps the old limit, which is then what the
/// connection cap follows.
pub fn raise_fd_limit() -> FdLimit {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft < hard {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                return FdLimit { soft: hard, hard };
            }
            Err(err) => warn!(soft, hard, "cannot raise the open-file limit: {err}"),
        }
    }
    FdLimit { soft, hard }
}

/// Free and total bytes of the file system holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer may still use.
    pub free: u64,
    /// The file system's size.
    pub total: u64,
}

/// Reads the free space of the file system holding `path`.
pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(DiskSpace {
        free: stat.f_bavail.saturating_mul(stat.f_frsize),
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
    })
}

/// The memory this process may use: the machine's (`MemTotal`), or its cgroup's limit if that
/// is lower (a container's broker must measure itself against the container). `None` if
/// neither can be read (not Linux).
pub fn total_memory() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    match (machine, cgroup) {
        (Some(machine), Some(cgroup)) => Some(machine.min(cgroup)),
        (machine, cgroup) => machine.or(cgroup),
    }
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_cap_keeps_a_reserve_of_descriptors() {
        let limit = FdLimit {
            soft: 256,
            hard: 256,
        };
        assert_eq!(limit.sockets(), 128);
        let limit = FdLimit {
            soft: 1_048_576,
            hard: 1_048_576,
        };
        assert_eq!(limit.sockets(), 1_048_576 - 128);
        // A tiny limit still leaves half for the log.
        let limit = FdLimit { soft: 64, hard: 64 };
        assert_eq!(limit.sockets(), 32);
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
        assert!(total_memory().is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn disk_space_of_a_real_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = disk_space(dir.path()).expect("statvfs");
        assert!(space.total > 0 && space.free <= space.total);
        assert!(disk_space(Path::new("/nonexistent/wharf")).is_err());
    }
}
