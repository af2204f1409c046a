//! Messages: [`Message`] (a received delivery, settled with ack / nack / reject) and
//! [`OutgoingMessage`] (one entry of `publish_many`).

use crate::convert::{self, Props};
use crate::{errors, poll_once, wait_forever};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::runtime::Handle;
use wharf_client::{ClientError, Delivery};

/// A message delivered to a consumer.
///
/// Settle it exactly once, with `ack()`, `nack(requeue=...)`, `reject()` or `defer(delay)`
/// (or let `process()` do it), unless it came from an `auto_ack` consumer. Settling never
/// blocks: it queues the frame for the socket. Safe to use from any thread. While it is held
/// unsettled, the lease of a consumer with an `ack_timeout` is extended in the background.
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct Message {
    delivery: Delivery,
    body: Py<PyBytes>,
    settled: AtomicBool,
    handle: Handle,
}

impl Message {
    pub(crate) fn new(
        py: Python<'_>,
        delivery: Delivery,
        auto_ack: bool,
        handle: Handle,
    ) -> Message {
        let body = PyBytes::new(py, delivery.body()).unbind();
        Message {
            delivery,
            body,
            settled: AtomicBool::new(auto_ack),
            handle,
        }
    }

    /// Deliveries as a list of `Message`s.
    pub(crate) fn list(
        py: Python<'_>,
        deliveries: Vec<Delivery>,
        auto_ack: bool,
        handle: &Handle,
    ) -> PyResult<Vec<Py<Message>>> {
        deliveries
            .into_iter()
            .map(|delivery| Py::new(py, Message::new(py, delivery, auto_ack, handle.clone())))
            .collect()
    }

    /// Runs a settle future: it completes at once (it only queues a frame), else it is
    /// awaited with the GIL released.
    fn settle<F>(&self, py: Python<'_>, future: F) -> PyResult<()>
    where
        F: Future<Output = Result<(), ClientError>> + Send,
    {
        let mut future = Box::pin(future);
        let result = match poll_once(future.as_mut()) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => wait_forever(py, &self.handle, future)?,
        };
        match result {
            Ok(()) => {
                self.settled.store(true, Ordering::Release);
                Ok(())
            }
            Err(err) => {
                if matches!(err, ClientError::NotSettleable { .. }) {
                    self.settled.store(true, Ordering::Release);
                }
                Err(errors::to_py_err(py, &err))
            }
        }
    }
}

#[pymethods]
impl Message {
    /// The body.
    #[getter]
    fn body(&self, py: Python<'_>) -> Py<PyBytes> {
        self.body.clone_ref(py)
    }

    /// Application headers (a new dict on every access).
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::table_to_dict(py, self.delivery.properties().headers_iter())
    }

    /// The message was delivered before and not acked.
    #[getter]
    fn redelivered(&self) -> bool {
        self.delivery.redelivered()
    }

    /// How many times the message has been delivered, this time included.
    #[getter]
    fn delivery_count(&self) -> u32 {
        self.delivery.delivery_count()
    }

    /// The delivery tag (per connection, increasing).
    #[getter]
    fn delivery_tag(&self) -> u64 {
        self.delivery.delivery_tag()
    }

    /// The tag of the consumer that received it.
    #[getter]
    fn consumer_tag(&self) -> u32 {
        self.delivery.consumer_tag()
    }

    /// Exchange it was published to (`""`: the default exchange).
    #[getter]
    fn exchange(&self) -> &str {
        self.delivery.exchange()
    }

    /// Routing key it was published with.
    #[getter]
    fn routing_key(&self) -> &str {
        self.delivery.routing_key()
    }

    /// Application message id, if set.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.delivery.properties().message_id()
    }

    /// Correlation id (RPC replies), if set.
    #[getter]
    fn correlation_id(&self) -> Option<&str> {
        self.delivery.properties().correlation_id()
    }

    /// Queue to reply to (RPC requests), if set.
    #[getter]
    fn reply_to(&self) -> Option<&str> {
        self.delivery.properties().reply_to()
    }

    /// MIME type of the body, if set.
    #[getter]
    fn content_type(&self) -> Option<&str> {
        self.delivery.properties().content_type()
    }

    /// Encoding of the body, if set.
    #[getter]
    fn content_encoding(&self) -> Option<&str> {
        self.delivery.properties().content_encoding()
    }

    /// Priority, 0 (default) to 255.
    #[getter]
    fn priority(&self) -> u8 {
        self.delivery.properties().priority()
    }

    /// Whether it was published as persistent.
    #[getter]
    fn persistent(&self) -> bool {
        self.delivery.properties().persistent()
    }

    /// Publisher timestamp in seconds since the epoch, if set.
    #[getter]
    fn timestamp(&self) -> Option<f64> {
        match self.delivery.properties().timestamp_ms() {
            0 => None,
            ms => Some(ms as f64 / 1000.0),
        }
    }

    /// Per-message time to live in seconds, if set.
    #[getter]
    fn expiration(&self) -> Option<f64> {
        self.delivery
            .properties()
            .expiration_ms()
            .map(|ms| ms as f64 / 1000.0)
    }

    /// Whether it has been settled (always true for auto-ack deliveries).
    #[getter]
    fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Acks: processed; the broker forgets the message. Raises `NotSettleable` if it was
    /// settled already, came from an auto-ack consumer, or its consumer was cancelled (the
    /// broker then requeued it).
    fn ack(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py, self.delivery.ack())
    }

    /// Nacks: failed. `requeue=True` (default) puts it back for redelivery; `False`
    /// dead-letters or drops it.
    #[pyo3(signature = (requeue = true))]
    fn nack(&self, py: Python<'_>, requeue: bool) -> PyResult<()> {
        self.settle(py, self.delivery.nack(requeue))
    }

    /// Rejects without requeueing (dead-lettered or dropped).
    fn reject(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py, self.delivery.reject())
    }

    /// Defers: a nack whose requeue waits `delay` (seconds or `timedelta`, millisecond
    /// precision). The message comes back flagged redelivered at the back of its queue; until
    /// then the queue counts it as `delayed`. The delivery limit counts it as a requeue.
    fn defer(&self, py: Python<'_>, delay: &Bound<'_, PyAny>) -> PyResult<()> {
        let delay = convert::duration("delay", delay)?;
        self.settle(py, self.delivery.defer(delay))
    }

    /// Extends the message's lease by the consumer's `ack_timeout` from now ("still working on
    /// it"). Rarely needed: the client extends the lease of a message the application holds by
    /// itself. Does nothing without an `ack_timeout`; does not settle. Raises `NotSettleable`
    /// once the message is settled or its consumer ended.
    fn in_progress(&self, py: Python<'_>) -> PyResult<()> {
        let mut future = Box::pin(self.delivery.in_progress());
        let result = match poll_once(future.as_mut()) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => wait_forever(py, &self.handle, future)?,
        };
        result.map_err(|err| errors::to_py_err(py, &err))
    }

    /// A context manager that acks when its block succeeds and nacks (with `requeue`) when
    /// it raises; the exception propagates. Does nothing if the block settled the message
    /// itself, or for auto-ack deliveries.
    #[pyo3(signature = (requeue = false))]
    fn process(slf: &Bound<'_, Self>, requeue: bool) -> ProcessGuard {
        ProcessGuard {
            message: slf.clone().unbind(),
            requeue,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<wharf.Message delivery_tag={} routing_key={:?} redelivered={} body_bytes={}>",
            self.delivery.delivery_tag(),
            self.delivery.routing_key(),
            if self.delivery.redelivered() {
                "True"
            } else {
                "False"
            },
            self.delivery.body().len()
        )
    }
}

/// The context manager returned by `Message.process()`.
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct ProcessGuard {
    message: Py<Message>,
    requeue: bool,
}

#[pymethods]
impl ProcessGuard {
    fn __enter__(&self, py: Python<'_>) -> Py<Message> {
        self.message.clone_ref(py)
    }

    #[pyo3(signature = (exc_type = None, _exc = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyType>>,
        _exc: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let message = self.message.get();
        if message.settled.load(Ordering::Acquire) {
            return Ok(false);
        }
        match exc_type {
            None => message.ack(py)?,
            // The block's exception is what matters; a failed nack (the connection is gone,
            // so the broker requeues the message anyway) must not replace it.
            Some(_) => {
                let _ = message.nack(py, self.requeue);
            }
        }
        Ok(false)
    }
}

/// One message for `publish_many`: a body with its own routing key and properties.
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct OutgoingMessage {
    pub(crate) routing_key: Option<String>,
    pub(crate) message: wharf_client::Message,
}

#[pymethods]
impl OutgoingMessage {
    #[new]
    #[pyo3(signature = (body, *, routing_key = None, headers = None, persistent = false,
        message_id = None, correlation_id = None, reply_to = None, content_type = None,
        content_encoding = None, priority = 0, expiration = None, delay = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        body: &Bound<'_, PyAny>,
        routing_key: Option<String>,
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
    ) -> PyResult<OutgoingMessage> {
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
        Ok(OutgoingMessage {
            routing_key,
            message: props.into_message(convert::extract_body(body)?),
        })
    }

    /// The body.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.message.body())
    }

    /// Its own routing key (`None`: the one given to `publish_many`).
    #[getter]
    fn routing_key(&self) -> Option<&str> {
        self.routing_key.as_deref()
    }

    fn __repr__(&self) -> String {
        format!(
            "<wharf.OutgoingMessage routing_key={:?} body_bytes={}>",
            self.routing_key,
            self.message.body().len()
        )
    }
}
