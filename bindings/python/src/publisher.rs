//! Pipelined publishing: [`PyPublisher`] (`wharf.Publisher`).
//!
//! `publish()` returns as soon as the message is queued inside the confirm window (no GIL
//! crossing unless the window is full); confirms are collected in the background and reported
//! by `wait_confirms()`.

use crate::convert::{self, Props};
use crate::{InRuntime, ToPy, errors, poll_once, spawn_done, wait, wait_forever};
use pyo3::IntoPyObjectExt;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyType};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Instant;
use tokio::runtime::Handle;
use wharf_client::{ClientError, PublishTicket, Publisher};

/// Publishes awaiting their confirm, and the refusals seen so far.
#[derive(Default)]
struct Pending {
    tickets: VecDeque<(u64, PublishTicket)>,
    next_seq: u64,
    failures: Vec<(u64, ClientError)>,
}

impl Pending {
    fn push(&mut self, ticket: PublishTicket) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.tickets.push_back((seq, ticket));
        let _ = self.reap(None);
        seq
    }

    /// Takes the confirmed publishes off the front; with a context, registers it to be woken
    /// by the first one still pending.
    fn reap(&mut self, context: Option<&mut std::task::Context<'_>>) -> Poll<()> {
        let mut context = context;
        while let Some((seq, ticket)) = self.tickets.front_mut() {
            let poll = match context.as_deref_mut() {
                Some(context) => Pin::new(ticket).poll(context),
                None => poll_once(Pin::new(ticket)),
            };
            match poll {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => self.failures.push((*seq, err)),
                Poll::Pending => return Poll::Pending,
            }
            self.tickets.pop_front();
        }
        Poll::Ready(())
    }
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Refused publishes as `[(seq, error), ...]`.
struct Failures(Vec<(u64, ClientError)>);

impl ToPy for Failures {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let list = PyList::empty(py);
        for (seq, err) in self.0 {
            list.append((seq, errors::error_object(py, &err)))?;
        }
        Ok(list.into_any().unbind())
    }
}

struct Seq(u64);

impl ToPy for Seq {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.into_py_any(py)
    }
}

/// Waits until every publish queued so far is confirmed; returns the refusals.
async fn all_confirmed(pending: Arc<Mutex<Pending>>) -> Failures {
    std::future::poll_fn(|context| lock(&pending).reap(Some(context))).await;
    Failures(std::mem::take(&mut lock(&pending).failures))
}

/// A pipelining publisher, from `Connection.publisher(window=...)`.
///
/// `publish()` returns the message's sequence number (0, 1, 2, ... per publisher) as soon as
/// it is queued, waiting only while `window` publishes are unconfirmed; `wait_confirms()`
/// waits for every confirm and returns the refused publishes as `(seq, error)` pairs. As a
/// context manager it waits for confirms on exit and raises the first refusal. Safe to share
/// between threads.
#[pyclass(frozen, module = "wharf._wharf", name = "Publisher")]
pub(crate) struct PyPublisher {
    handle: Handle,
    publisher: InRuntime<Publisher>,
    pending: Arc<Mutex<Pending>>,
}

impl PyPublisher {
    pub(crate) fn new(publisher: Publisher, handle: Handle) -> PyPublisher {
        PyPublisher {
            publisher: InRuntime::new(publisher, handle.clone()),
            handle,
            pending: Arc::new(Mutex::new(Pending::default())),
        }
    }

    fn wait_confirms_inner(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Failures> {
        let deadline =
            convert::optional_seconds("timeout", timeout)?.map(|timeout| Instant::now() + timeout);
        match wait(
            py,
            &self.handle,
            all_confirmed(self.pending.clone()),
            deadline,
        )? {
            Some(failures) => Ok(failures),
            None => Err(errors::new_error(
                py,
                "Timeout",
                format!(
                    "wait_confirms timed out with {} publishes unconfirmed",
                    lock(&self.pending).tickets.len()
                ),
            )),
        }
    }
}

#[pymethods]
impl PyPublisher {
    /// Most unconfirmed publishes.
    #[getter]
    fn window(&self) -> u32 {
        self.publisher.window()
    }

    /// Publishes not yet known to be confirmed.
    #[getter]
    fn n_pending(&self) -> usize {
        let mut pending = lock(&self.pending);
        let _ = pending.reap(None);
        pending.tickets.len()
    }

    /// Queues one publish and returns its sequence number; waits (GIL released) only while the
    /// window is full. `exchange=""` is the default exchange (routes to the queue named
    /// `routing_key`). Its outcome is reported by `wait_confirms()`.
    #[pyo3(signature = (routing_key, body, *, exchange = "", headers = None,
        persistent = false, message_id = None, correlation_id = None, reply_to = None,
        content_type = None, content_encoding = None, priority = 0, expiration = None,
        delay = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        py: Python<'_>,
        routing_key: String,
        body: &Bound<'_, PyAny>,
        exchange: &str,
        headers: Option<&Bound<'_, PyAny>>,
        persistent: bool,
        message_id: Option<String>,
        correlation_id: Option<String>,
        reply_to: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        priority: u8,
        expiration: Option<&Bound<'_, PyAny>>,
        delay: Option<&Bound<'_, PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Option<u64>> {
        let props = Props::new(
            headers,
            persistent,
            message_id,
            correlation_id,
            reply_to,
            content_type,
            content_encoding,
            priority,
            expiration,
            delay,
        )?;
        let message = props.into_message(convert::extract_body(body)?);
        let ticket = match done {
            None => {
                // The common case, borrowed and on the stack: no clone, no allocation. Usually
                // ready at once (the message is queued for the writer); waits, GIL released,
                // only while the window is full.
                let mut future =
                    std::pin::pin!(self.publisher.publish(exchange, &routing_key, message));
                match poll_once(future.as_mut()) {
                    Poll::Ready(result) => result,
                    Poll::Pending => wait_forever(py, &self.handle, future)?,
                }
            }
            Some(done) => {
                let publisher = (*self.publisher).clone();
                let exchange = exchange.to_owned();
                let mut future =
                    Box::pin(
                        async move { publisher.publish(&exchange, &routing_key, message).await },
                    );
                match poll_once(future.as_mut()) {
                    Poll::Ready(result) => result,
                    Poll::Pending => {
                        // asyncio with a full window: `done(seq, error)` later, `None` now.
                        let pending = self.pending.clone();
                        let _ = spawn_done(&self.handle, done, async move {
                            let ticket = future.await?;
                            Ok(Seq(lock(&pending).push(ticket)))
                        });
                        return Ok(None);
                    }
                }
            }
        };
        match ticket {
            Ok(ticket) => Ok(Some(lock(&self.pending).push(ticket))),
            Err(err) => Err(errors::to_py_err(py, &err)),
        }
    }

    /// Waits until every publish so far is confirmed (at most `timeout` seconds, then
    /// `Timeout`) and returns the refused ones as `[(seq, error), ...]` (empty: all stored).
    #[pyo3(signature = (timeout = None, *, done = None))]
    fn wait_confirms(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        match done {
            None => self.wait_confirms_inner(py, timeout)?.to_py(py),
            Some(done) => {
                let timeout = convert::optional_seconds("timeout", timeout)?;
                let pending = self.pending.clone();
                let task = spawn_done(&self.handle, done, async move {
                    let confirmed = all_confirmed(pending);
                    match timeout {
                        None => Ok(confirmed.await),
                        Some(after) => tokio::time::timeout(after, confirmed).await.map_err(|_| {
                            ClientError::Timeout {
                                operation: "wait_confirms",
                                after,
                            }
                        }),
                    }
                });
                Ok(Py::new(py, task)?.into_any())
            }
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (exc_type = None, _exc = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyType>>,
        _exc: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let failures = self.wait_confirms_inner(py, None)?;
        if exc_type.is_none()
            && let Some((_, err)) = failures.0.into_iter().next()
        {
            return Err(errors::to_py_err(py, &err));
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<wharf.Publisher window={} pending={}>",
            self.publisher.window(),
            lock(&self.pending).tickets.len()
        )
    }
}
