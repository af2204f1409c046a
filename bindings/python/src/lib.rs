//! `wharf._wharf`: the native core of the `wharf` Python package, a thin layer over
//! `wharf-client`. It holds no broker logic.
//!
//! Design (see `bindings/python/README.md`):
//! - one background tokio runtime per process ([`runtime`]); every connection lives on it;
//! - every blocking wait releases the GIL (`Python::detach`) and waits in short slices, checking
//!   for signals between them, so Ctrl-C interrupts it promptly ([`wait`]);
//! - the asyncio layer (`wharf.aio`) passes a `done(value, error)` callback instead of blocking:
//!   the operation runs as a tokio task and the callback (which hands the result to the event
//!   loop with `call_soon_threadsafe`) is called from a blocking-pool thread ([`spawn_done`]);
//! - hot paths never cross into the runtime when they need not: settling a delivery, taking an
//!   already-buffered delivery and queueing a publish inside the window are polled once in place.

mod connection;
mod consumer;
mod convert;
mod errors;
mod message;
mod publisher;

use pyo3::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::runtime::{Handle, Runtime};
use wharf_client::ClientError;

/// How long one GIL-released wait lasts before the thread re-checks for signals (Ctrl-C).
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Set by an `atexit` hook: the interpreter is going away, so background completions must not
/// call into Python any more.
static FINALIZING: AtomicBool = AtomicBool::new(false);

/// Background completions calling into Python right now (see [`_shutdown`]).
static N_DELIVERING: AtomicUsize = AtomicUsize::new(0);

/// How long interpreter exit waits for completions already calling into Python.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The process's runtime and the pid that created it (a forked child builds its own: the
/// parent's worker threads do not exist in the child).
static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The process's background runtime, created on first use.
pub(crate) fn runtime() -> PyResult<Handle> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, runtime)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(runtime.handle().clone());
    }
    if let Some(inherited) = slot.take() {
        // Dropping it would try to stop threads that only exist in the parent.
        std::mem::forget(inherited);
    }
    let n_threads = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .clamp(2, 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(n_threads)
        .thread_name("wharf-io")
        .enable_all()
        .build()
        .map_err(|err| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot start the wharf runtime: {err}"))
        })?;
    let runtime = Arc::new(runtime);
    let handle = runtime.handle().clone();
    *slot = Some((pid, runtime));
    Ok(handle)
}

/// Polls `future` once without a runtime or a real waker (for futures that are usually ready
/// at once; a pending one must be polled again with a real context later).
pub(crate) fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    let mut context = Context::from_waker(Waker::noop());
    future.poll(&mut context)
}

/// Runs `future` on the runtime until it completes or `deadline` passes (`Ok(None)`), with the
/// GIL released. Waits in slices of [`WAIT_SLICE`] and runs `check_signals` between them, so a
/// `KeyboardInterrupt` (or any exception a signal handler raises) stops the wait promptly; the
/// future is then dropped (every future passed here is cancel-safe or cleans up on drop).
pub(crate) fn wait<F>(
    py: Python<'_>,
    handle: &Handle,
    future: F,
    deadline: Option<Instant>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    // Anything the future drops early (a consumer, a client clone) may need the runtime.
    let _context = handle.enter();
    let mut future = std::pin::pin!(future);
    loop {
        let slice = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(None);
                }
                (deadline - now).min(WAIT_SLICE)
            }
            None => WAIT_SLICE,
        };
        let slice_future = future.as_mut();
        let output = py.detach(|| {
            handle.block_on(async move { tokio::time::timeout(slice, slice_future).await.ok() })
        });
        if let Some(output) = output {
            return Ok(Some(output));
        }
        py.check_signals()?;
    }
}

/// [`wait`] without a deadline.
pub(crate) fn wait_forever<F>(py: Python<'_>, handle: &Handle, future: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    Ok(wait(py, handle, future, None)?.expect("no deadline"))
}

/// A value an operation produces, converted to Python once the GIL is held.
pub(crate) trait ToPy: Send + 'static {
    /// The Python object.
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>>;
}

/// Runs an operation: blocking (GIL released, interruptible) when `done` is `None` and returns
/// its value; otherwise spawns it, returns a [`Task`] and calls `done(value, error)` later.
pub(crate) fn run<T, F>(
    py: Python<'_>,
    handle: &Handle,
    done: Option<Py<PyAny>>,
    future: F,
) -> PyResult<Py<PyAny>>
where
    T: ToPy,
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
{
    match done {
        None => match wait_forever(py, handle, future)? {
            Ok(value) => value.to_py(py),
            Err(err) => Err(errors::to_py_err(py, &err)),
        },
        Some(done) => Ok(Py::new(py, spawn_done(handle, done, future))?.into_any()),
    }
}

/// Spawns `future`; when it completes, `done(value, None)` or `done(None, error)` is called
/// from a blocking-pool thread (taking the GIL there never stalls the runtime's workers).
pub(crate) fn spawn_done<T, F>(handle: &Handle, done: Py<PyAny>, future: F) -> Task
where
    T: ToPy,
    F: Future<Output = Result<T, ClientError>> + Send + 'static,
{
    let join = handle.spawn(async move {
        let result = future.await;
        let _ = tokio::task::spawn_blocking(move || deliver(done, result)).await;
    });
    Task {
        abort: join.abort_handle(),
    }
}

fn deliver<T: ToPy>(done: Py<PyAny>, result: Result<T, ClientError>) {
    // Counted before the flag is read, so `_shutdown` either sees this call in flight and waits
    // for it, or this call sees the flag and stays out of Python.
    N_DELIVERING.fetch_add(1, Ordering::SeqCst);
    if FINALIZING.load(Ordering::SeqCst) {
        N_DELIVERING.fetch_sub(1, Ordering::SeqCst);
        // Python objects cannot be touched any more; the process is exiting.
        std::mem::forget(done);
        std::mem::forget(result);
        return;
    }
    Python::attach(|py| {
        let (value, error) = match result {
            Ok(value) => match value.to_py(py) {
                Ok(object) => (object, py.None()),
                Err(err) => (py.None(), err.into_value(py).into_any()),
            },
            Err(err) => (py.None(), errors::error_object(py, &err)),
        };
        if let Err(err) = done.call1(py, (value, error)) {
            err.write_unraisable(py, None);
        }
    });
    N_DELIVERING.fetch_sub(1, Ordering::SeqCst);
}

/// A background operation started by the asyncio layer; `abort()` stops it (used when the
/// awaiting asyncio task is cancelled).
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct Task {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl Task {
    /// Stops the operation if it has not completed; its callback is then never called.
    fn abort(&self) {
        self.abort.abort();
    }

    /// Whether the operation has completed (or was aborted).
    #[getter]
    fn finished(&self) -> bool {
        self.abort.is_finished()
    }
}

/// A value dropped inside the runtime's context (a `Client`, `Consumer` or `Publisher` spawns
/// its closing work on the current runtime when dropped).
pub(crate) struct InRuntime<T> {
    value: Option<T>,
    handle: Handle,
}

impl<T> InRuntime<T> {
    pub(crate) fn new(value: T, handle: Handle) -> InRuntime<T> {
        InRuntime {
            value: Some(value),
            handle,
        }
    }
}

impl<T> std::ops::Deref for InRuntime<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until dropped")
    }
}

impl<T> Drop for InRuntime<T> {
    fn drop(&mut self) {
        let _context = self.handle.enter();
        drop(self.value.take());
    }
}

/// Called by an `atexit` hook (before the interpreter starts finalizing): from now on
/// background completions do not call into Python, and the ones already calling in are waited
/// for (at most [`SHUTDOWN_WAIT`]). A thread that tried to take the GIL once finalization has
/// begun would be terminated by CPython in the middle of Rust frames.
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    FINALIZING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    py.detach(|| {
        while N_DELIVERING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// The native core of the `wharf` package.
#[pymodule]
fn _wharf(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<connection::Core>()?;
    module.add_class::<consumer::PyConsumer>()?;
    module.add_class::<consumer::Batches>()?;
    module.add_class::<message::Message>()?;
    module.add_class::<message::ProcessGuard>()?;
    module.add_class::<message::OutgoingMessage>()?;
    module.add_class::<publisher::PyPublisher>()?;
    module.add_class::<Task>()?;
    module.add_function(wrap_pyfunction!(_shutdown, module)?)?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
