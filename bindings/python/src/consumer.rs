//! Consuming: [`PyConsumer`] (`wharf.Consumer`) and its [`Batches`] iterator.
//!
//! Deliveries the client already buffered are taken without releasing the GIL (one poll);
//! only an empty buffer makes the thread wait, GIL released, in interruptible slices. Batches
//! take everything buffered, up to `max_messages`, in one crossing.

use crate::convert;
use crate::message::Message;
use crate::{ToPy, errors, poll_once, spawn_done, wait_forever};
use pyo3::prelude::*;
use pyo3::types::PyType;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};
use wharf_client::{ClientError, Consumer, Delivery};

/// The consumer and what its stream reported.
pub(crate) struct ConsumerState {
    consumer: Option<Consumer>,
    /// An error the stream reported while a batch was being filled; raised by the next call.
    error: Option<ClientError>,
    /// The stream ended (cancelled, or after its error): only empty results from now on.
    ended: bool,
    handle: Handle,
}

impl Drop for ConsumerState {
    fn drop(&mut self) {
        // Dropping a `Consumer` spawns its `Cancel` on the current runtime.
        let _context = self.handle.enter();
        drop(self.consumer.take());
    }
}

/// Deliveries taken from the stream but not yet handed to Python: requeued if dropped (the
/// wait was interrupted or the asyncio task cancelled), so none is left unsettled.
struct Collected(Vec<Delivery>);

impl Collected {
    fn take(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Collected {
    fn drop(&mut self) {
        for delivery in self.0.drain(..) {
            // Completes at once (it queues a frame); an auto-ack delivery refuses, harmlessly.
            let _ = poll_once(std::pin::pin!(delivery.nack(true)));
        }
    }
}

/// One batch: deliveries, and whether the stream has ended.
pub(crate) struct Batch {
    deliveries: Vec<Delivery>,
    ended: bool,
}

/// Takes what the stream has buffered, up to `max`, without waiting. `Err` only if nothing
/// was taken (an error after some deliveries is kept for the next call).
fn take_buffered(
    state: &mut ConsumerState,
    max: usize,
    collected: &mut Collected,
) -> Result<(), ClientError> {
    if let Some(err) = state.error.take() {
        state.ended = true;
        return Err(err);
    }
    let Some(consumer) = state.consumer.as_mut() else {
        state.ended = true;
        return Ok(());
    };
    while collected.0.len() < max && !state.ended {
        match poll_once(std::pin::pin!(consumer.next())) {
            Poll::Ready(Some(Ok(delivery))) => collected.0.push(delivery),
            Poll::Ready(Some(Err(err))) => {
                state.ended = true;
                if collected.0.is_empty() {
                    return Err(err);
                }
                state.error = Some(err);
            }
            Poll::Ready(None) => state.ended = true,
            Poll::Pending => break,
        }
    }
    Ok(())
}

/// Waits (until `first_deadline`) for a first delivery, then takes up to `max`, waiting at most
/// `max_wait` after the first for more.
async fn collect(
    state: Arc<Mutex<ConsumerState>>,
    max: usize,
    first_deadline: Option<Instant>,
    max_wait: Duration,
) -> Result<Batch, ClientError> {
    let mut state = state.lock().await;
    let mut collected = Collected(Vec::new());
    take_buffered(&mut state, max, &mut collected)?;
    if collected.0.is_empty() && !state.ended {
        let consumer = state.consumer.as_mut().expect("present until ended");
        let next = match first_deadline {
            Some(deadline) => match timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_) => {
                    return Ok(Batch {
                        deliveries: Vec::new(),
                        ended: false,
                    });
                }
            },
            None => consumer.next().await,
        };
        match next {
            Some(Ok(delivery)) => collected.0.push(delivery),
            Some(Err(err)) => {
                state.ended = true;
                return Err(err);
            }
            None => state.ended = true,
        }
        take_buffered(&mut state, max, &mut collected)?;
    }
    if !max_wait.is_zero() && !collected.0.is_empty() {
        let batch_deadline = Instant::now() + max_wait;
        while collected.0.len() < max && !state.ended && state.error.is_none() {
            let consumer = state.consumer.as_mut().expect("present until ended");
            match timeout_at(batch_deadline, consumer.next()).await {
                Err(_) => break,
                Ok(Some(Ok(delivery))) => {
                    collected.0.push(delivery);
                    take_buffered(&mut state, max, &mut collected)?;
                }
                Ok(Some(Err(err))) => {
                    state.ended = true;
                    state.error = Some(err);
                }
                Ok(None) => state.ended = true,
            }
        }
    }
    Ok(Batch {
        deliveries: collected.take(),
        ended: state.ended,
    })
}

/// A subscription to a queue, from `Connection.consume(...)`.
///
/// Iterate it for messages (`for message in consumer`), or take them with `get()`,
/// `next_batch()` or `batches()`. With a `timeout`, iteration stops (and the consumer is
/// cancelled) once no message arrived for that many seconds: an idle queue is not an error.
/// Use it as a context manager to cancel it on exit. Safe to share between threads.
#[pyclass(frozen, module = "wharf._wharf", name = "Consumer")]
pub(crate) struct PyConsumer {
    handle: Handle,
    state: Arc<Mutex<ConsumerState>>,
    queue: String,
    consumer_tag: u32,
    auto_ack: bool,
    prefetch: u32,
    timeout: Option<Duration>,
    ack_timeout: Option<Duration>,
}

/// What `Core.consume` produces, made into a `Consumer` once the GIL is held.
pub(crate) struct NewConsumer {
    pub(crate) consumer: Consumer,
    pub(crate) handle: Handle,
    pub(crate) auto_ack: bool,
    pub(crate) prefetch: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) ack_timeout: Option<Duration>,
}

impl ToPy for NewConsumer {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let consumer = PyConsumer {
            queue: self.consumer.queue().to_owned(),
            consumer_tag: self.consumer.consumer_tag(),
            auto_ack: self.auto_ack,
            prefetch: self.prefetch,
            timeout: self.timeout,
            ack_timeout: self.ack_timeout,
            state: Arc::new(Mutex::new(ConsumerState {
                consumer: Some(self.consumer),
                error: None,
                ended: false,
                handle: self.handle.clone(),
            })),
            handle: self.handle,
        };
        Ok(Py::new(py, consumer)?.into_any())
    }
}

/// A batch handed to an asyncio callback: `(messages, ended)`.
struct AsyncBatch {
    batch: Batch,
    auto_ack: bool,
    handle: Handle,
}

impl ToPy for AsyncBatch {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let messages = Message::list(py, self.batch.deliveries, self.auto_ack, &self.handle)?;
        Ok((messages, self.batch.ended)
            .into_pyobject(py)?
            .into_any()
            .unbind())
    }
}

impl PyConsumer {
    /// Up to `max` messages: buffered ones without releasing the GIL, else waits (GIL
    /// released) until `timeout` for the first.
    fn next_batch_inner(
        &self,
        py: Python<'_>,
        max: usize,
        max_wait: Duration,
        timeout: Option<Duration>,
    ) -> PyResult<(Vec<Py<Message>>, bool)> {
        let max = max.max(1);
        if max_wait.is_zero()
            && let Ok(mut state) = self.state.try_lock()
        {
            let mut collected = Collected(Vec::new());
            take_buffered(&mut state, max, &mut collected)
                .map_err(|err| errors::to_py_err(py, &err))?;
            if !collected.0.is_empty() || state.ended {
                let ended = state.ended;
                drop(state);
                return Ok((
                    Message::list(py, collected.take(), self.auto_ack, &self.handle)?,
                    ended,
                ));
            }
        }
        let first_deadline = timeout.map(|timeout| Instant::now() + timeout);
        let batch = wait_forever(
            py,
            &self.handle,
            collect(self.state.clone(), max, first_deadline, max_wait),
        )?
        .map_err(|err| errors::to_py_err(py, &err))?;
        Ok((
            Message::list(py, batch.deliveries, self.auto_ack, &self.handle)?,
            batch.ended,
        ))
    }

    fn cancel_future(&self) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let state = self.state.clone();
        async move {
            let mut state = state.lock().await;
            state.ended = true;
            match state.consumer.take() {
                Some(consumer) => consumer.cancel().await,
                None => Ok(()),
            }
        }
    }
}

#[pymethods]
impl PyConsumer {
    /// The queue consumed from.
    #[getter]
    fn queue(&self) -> &str {
        &self.queue
    }

    /// The consumer's tag (unique on its connection).
    #[getter]
    fn consumer_tag(&self) -> u32 {
        self.consumer_tag
    }

    /// Whether deliveries are settled by the broker when sent (no ack possible).
    #[getter]
    fn auto_ack(&self) -> bool {
        self.auto_ack
    }

    /// Most unsettled deliveries (auto-ack: deliveries sent ahead).
    #[getter]
    fn prefetch(&self) -> u32 {
        self.prefetch
    }

    /// Seconds without a message after which iteration stops (`None`: never).
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.timeout.map(|timeout| timeout.as_secs_f64())
    }

    /// The lease of each delivery in seconds (`None`: no lease). The client extends the lease
    /// of every message the application holds (taken, not settled, not garbage-collected).
    #[getter]
    fn ack_timeout(&self) -> Option<f64> {
        self.ack_timeout.map(|timeout| timeout.as_secs_f64())
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<Message>>> {
        let (mut messages, ended) = self.next_batch_inner(py, 1, Duration::ZERO, self.timeout)?;
        match messages.pop() {
            Some(message) => Ok(Some(message)),
            None => {
                if !ended {
                    // Idle for `timeout`: iteration is over, and so is the subscription.
                    self.cancel(py)?;
                }
                Ok(None)
            }
        }
    }

    /// The next message, waiting at most `timeout` seconds (`None`: as long as it takes);
    /// `None` if none arrived in time or the consumer was cancelled.
    #[pyo3(signature = (timeout = None))]
    fn get(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<Message>>> {
        let timeout = convert::optional_seconds("timeout", timeout)?;
        let (mut messages, _) = self.next_batch_inner(py, 1, Duration::ZERO, timeout)?;
        Ok(messages.pop())
    }

    /// Up to `max_messages` messages: waits at most `timeout` seconds (`None`: as long as it
    /// takes) for the first, then at most `max_wait` seconds for more. Empty if none arrived.
    #[pyo3(signature = (max_messages = 100, max_wait = 0.0, timeout = None))]
    fn next_batch(
        &self,
        py: Python<'_>,
        max_messages: usize,
        max_wait: f64,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Py<Message>>> {
        let max_wait = convert::seconds("max_wait", max_wait)?;
        let timeout = convert::optional_seconds("timeout", timeout)?;
        Ok(self
            .next_batch_inner(py, max_messages, max_wait, timeout)?
            .0)
    }

    /// An iterator of non-empty lists of up to `max_messages` messages, each waiting at most
    /// `max_wait` seconds after its first message to fill up. It ends like iterating the
    /// consumer does (after `timeout` idle seconds, or when the consumer is cancelled).
    #[pyo3(signature = (max_messages = 100, max_wait = 0.05))]
    fn batches(slf: &Bound<'_, Self>, max_messages: usize, max_wait: f64) -> PyResult<Batches> {
        Ok(Batches {
            consumer: slf.clone().unbind(),
            max_messages,
            max_wait: convert::seconds("max_wait", max_wait)?,
        })
    }

    /// Cancels the subscription and waits for the broker's answer. Messages received and
    /// not yet taken are requeued; messages taken and not settled are requeued by the broker.
    /// Cancelling twice is a no-op.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        wait_forever(py, &self.handle, self.cancel_future())?
            .map_err(|err| errors::to_py_err(py, &err))
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (_exc_type = None, _exc = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyType>>,
        _exc: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.cancel(py)?;
        Ok(false)
    }

    /// asyncio: `done((messages, ended), None)` once up to `max_messages` are in (waiting at
    /// most `timeout` for the first, `max_wait` for more), or `done(None, error)`.
    #[pyo3(signature = (done, max_messages, max_wait, timeout))]
    fn _next_batch_async(
        &self,
        done: Py<PyAny>,
        max_messages: usize,
        max_wait: f64,
        timeout: Option<f64>,
    ) -> PyResult<crate::Task> {
        let max_wait = convert::seconds("max_wait", max_wait)?;
        let first_deadline =
            convert::optional_seconds("timeout", timeout)?.map(|timeout| Instant::now() + timeout);
        let state = self.state.clone();
        let (auto_ack, handle) = (self.auto_ack, self.handle.clone());
        Ok(spawn_done(&self.handle, done, async move {
            let batch = collect(state, max_messages.max(1), first_deadline, max_wait).await?;
            Ok(AsyncBatch {
                batch,
                auto_ack,
                handle,
            })
        }))
    }

    /// asyncio: cancels, then `done(None, error_or_None)`.
    fn _cancel_async(&self, done: Py<PyAny>) -> crate::Task {
        spawn_done(&self.handle, done, self.cancel_future())
    }

    fn __repr__(&self) -> String {
        format!(
            "<wharf.Consumer queue={:?} consumer_tag={} prefetch={} auto_ack={}>",
            self.queue,
            self.consumer_tag,
            self.prefetch,
            if self.auto_ack { "True" } else { "False" }
        )
    }
}

/// Iterator of message batches, from `Consumer.batches(...)`.
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct Batches {
    consumer: Py<PyConsumer>,
    max_messages: usize,
    max_wait: Duration,
}

#[pymethods]
impl Batches {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Vec<Py<Message>>>> {
        let consumer = self.consumer.get();
        let (messages, ended) =
            consumer.next_batch_inner(py, self.max_messages, self.max_wait, consumer.timeout)?;
        if messages.is_empty() {
            if !ended {
                consumer.cancel(py)?;
            }
            return Ok(None);
        }
        Ok(Some(messages))
    }
}
