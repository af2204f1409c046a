//! The real `wharf serve` process, for end-to-end tests that stop it with signals (crash.rs,
//! scale.rs): started on 127.0.0.1 with an ephemeral port and a given data dir, its address
//! read from its log, its stderr kept (bounded) so a test can show why it failed.

use super::DEADLINE;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a broker's stderr kept for failure messages; later lines are counted only.
const LOG_LINES_MAX: usize = 5_000;

/// A broker's stderr, as far as it was read.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    n_dropped: u64,
}

/// What a started process did first.
#[derive(Debug)]
pub enum Start {
    /// It logged that it listens here.
    Listening(SocketAddr),
    /// It exited (or closed its stderr) without listening.
    Exited(Option<ExitStatus>),
    /// Neither happened in time.
    TimedOut,
}

/// A `wharf serve` child process. Dropping it kills it (`kill -9`), so a failed assertion
/// leaves no broker behind.
pub struct Process {
    /// `None` once handed to a [`Broker`].
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
    events: Receiver<Option<SocketAddr>>,
}

/// A `wharf serve` that listens.
pub struct Broker {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

/// Starts `wharf serve` on an ephemeral port and reads the address from its log.
pub fn spawn(dir: &Path) -> Broker {
    spawn_with(dir, &[], DEADLINE)
}

/// Like [`spawn`], with more `serve` arguments and a startup deadline (recovering a large log
/// takes longer than [`DEADLINE`] in a debug build).
pub fn spawn_with(dir: &Path, args: &[&OsStr], startup: Duration) -> Broker {
    let mut process = start(dir, args);
    match process.wait_start(startup) {
        Start::Listening(addr) => process.into_broker(addr),
        other => panic!(
            "wharf serve on {} did not start listening within {startup:?}: {other:?}\n{}",
            dir.display(),
            process.log_tail(40)
        ),
    }
}

/// Starts `wharf serve --bind 127.0.0.1:0 --data-dir DIR ARGS` without waiting for anything.
pub fn start(dir: &Path, args: &[&OsStr]) -> Process {
    start_wrapped(&[], dir, args)
}

/// Like [`spawn_with`], run by `wrapper` (`prlimit --nofile=...`, `unshare ...`): the command
/// is `WRAPPER... wharf serve --bind 127.0.0.1:0 --data-dir DIR ARGS`, and the wrapper must
/// exec it in its own process (the child's pid is the broker's).
pub fn spawn_wrapped(wrapper: &[&OsStr], dir: &Path, args: &[&OsStr]) -> Broker {
    let mut process = start_wrapped(wrapper, dir, args);
    match process.wait_start(DEADLINE) {
        Start::Listening(addr) => process.into_broker(addr),
        other => panic!(
            "wharf serve on {} did not start listening: {other:?}\n{}",
            dir.display(),
            process.log_tail(40)
        ),
    }
}

fn start_wrapped(wrapper: &[&OsStr], dir: &Path, args: &[&OsStr]) -> Process {
    let binary = OsStr::new(env!("CARGO_BIN_EXE_wharf"));
    let (program, before) = match wrapper.split_first() {
        Some((program, rest)) => (*program, [rest, &[binary]].concat()),
        None => (binary, Vec::new()),
    };
    let mut child = Command::new(program)
        .args(before)
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wharf serve");
    let stderr = child.stderr.take().expect("piped");
    let log: Arc<Mutex<Log>> = Arc::default();
    let (sender, events) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let listening = line
                    .contains("wharf is listening")
                    .then(|| {
                        line.split("addr=")
                            .nth(1)
                            .and_then(|rest| rest.split_whitespace().next())
                            .and_then(|found| found.parse::<SocketAddr>().ok())
                    })
                    .flatten();
                {
                    let mut log = log.lock().unwrap();
                    if log.lines.len() < LOG_LINES_MAX {
                        log.lines.push(line);
                    } else {
                        log.n_dropped += 1;
                    }
                }
                if let Some(addr) = listening {
                    let _ = sender.send(Some(addr));
                }
            }
            // End of stderr: the process exited (or closed it).
            let _ = sender.send(None);
        });
    }
    Process {
        child: Some(child),
        log,
        events,
    }
}

fn log_tail(log: &Mutex<Log>, n_lines: usize) -> String {
    let log = log.lock().unwrap();
    let skip = log.lines.len().saturating_sub(n_lines);
    let mut text = format!("--- last {} lines of its log", log.lines.len() - skip);
    if log.n_dropped > 0 {
        text.push_str(&format!(" ({} later lines not kept)", log.n_dropped));
    }
    text.push_str(" ---\n");
    for line in &log.lines[skip..] {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Waits (at most `within`) for `child` to exit.
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

impl Process {
    /// Waits until the process listens or exits, at most `within`.
    pub fn wait_start(&mut self, within: Duration) -> Start {
        match self.events.recv_timeout(within) {
            Ok(Some(addr)) => Start::Listening(addr),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                // Stderr closed: the exit follows at once.
                Start::Exited(self.wait_exit(DEADLINE))
            }
            Err(RecvTimeoutError::Timeout) => Start::TimedOut,
        }
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        wait_exit(self.child.as_mut().expect("not handed over"), within)
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("not handed over").id()
    }

    /// Every line of its stderr read so far (up to [`LOG_LINES_MAX`]).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().lines.clone()
    }

    /// The last `n_lines` lines of its stderr, for failure messages.
    pub fn log_tail(&self, n_lines: usize) -> String {
        log_tail(&self.log, n_lines)
    }

    fn into_broker(mut self, addr: SocketAddr) -> Broker {
        Broker {
            child: self.child.take().expect("not handed over"),
            addr,
            log: self.log.clone(),
        }
    }
}

impl Broker {
    /// Graceful stop: SIGTERM, then waits (at most `within`) for the exit; panics if it does
    /// not exit in time or exits non-zero.
    pub fn terminate(mut self, within: Duration) {
        sigterm(&self.child);
        match wait_exit(&mut self.child, within) {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "the broker exited with {status} after SIGTERM\n{}",
                self.log_tail(40)
            ),
            None => panic!(
                "the broker did not exit within {within:?} after SIGTERM\n{}",
                self.log_tail(40)
            ),
        }
    }

    /// `kill -9` and reap.
    pub fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    /// Every line of its stderr read so far (up to [`LOG_LINES_MAX`]).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().lines.clone()
    }

    /// The last `n_lines` lines of its stderr, for failure messages.
    pub fn log_tail(&self, n_lines: usize) -> String {
        log_tail(&self.log, n_lines)
    }

    /// Whether a line of its stderr contains `needle` within `within` (lines are read by a
    /// thread of their own: one the broker just wrote may not be there yet).
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.log_lines().iter().any(|line| line.contains(needle)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lines of its stderr read but not kept (past [`LOG_LINES_MAX`]).
    pub fn n_log_lines_dropped(&self) -> u64 {
        self.log.lock().unwrap().n_dropped
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
