//! [`Core`]: one connection. The Python classes `wharf.Connection` and
//! `wharf.aio.Connection` wrap it; every method blocks (GIL released) unless given `done`.

use crate::consumer::NewConsumer;
use crate::convert::{self, Props};
use crate::message::OutgoingMessage;
use crate::publisher::PyPublisher;
use crate::{InRuntime, ToPy, run, runtime};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::time::Duration;
use tokio::runtime::Handle;
use wharf_client::{Client, ClientOptions, ConsumeOptions, ExchangeKind, Message, Value};

/// A connection to a Wharf broker (native core; use `wharf.connect` or `wharf.aio.connect`).
#[pyclass(frozen, module = "wharf._wharf")]
pub(crate) struct Core {
    client: InRuntime<Client>,
    handle: Handle,
}

/// A connected client, made into a `Core` once the GIL is held.
struct Connected(Client, Handle);

impl ToPy for Connected {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let Connected(client, handle) = self;
        Ok(Py::new(
            py,
            Core {
                client: InRuntime::new(client, handle.clone()),
                handle,
            },
        )?
        .into_any())
    }
}

fn exchange_kind(kind: &str) -> PyResult<ExchangeKind> {
    match kind {
        "direct" => Ok(ExchangeKind::Direct),
        "fanout" => Ok(ExchangeKind::Fanout),
        "topic" => Ok(ExchangeKind::Topic),
        "headers" => Ok(ExchangeKind::Headers),
        other => Err(PyValueError::new_err(format!(
            "exchange kind is 'direct', 'fanout', 'topic' or 'headers', not {other:?}"
        ))),
    }
}

fn arguments(dict: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, Value)>> {
    convert::optional_entries(dict)
}

impl Core {
    fn client(&self) -> Client {
        (*self.client).clone()
    }
}

#[pymethods]
impl Core {
    /// Connects to `url` (`wharf://[user:password@]host[:port]` or `host[:port]`).
    #[staticmethod]
    #[pyo3(signature = (url, *, client_name = None, heartbeat = None, connect_timeout = 10.0,
        request_timeout = 30.0, done = None))]
    fn connect(
        py: Python<'_>,
        url: String,
        client_name: Option<String>,
        heartbeat: Option<f64>,
        connect_timeout: f64,
        request_timeout: f64,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let handle = runtime()?;
        let mut options = ClientOptions {
            connect_timeout: convert::seconds("connect_timeout", connect_timeout)?,
            request_timeout: convert::seconds("request_timeout", request_timeout)?,
            ..ClientOptions::default()
        };
        if let Some(client_name) = client_name {
            options.client_name = client_name;
        }
        if let Some(heartbeat) = convert::optional_seconds("heartbeat", heartbeat)? {
            options.heartbeat_ms = u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX).max(1);
        }
        let task_handle = handle.clone();
        run(py, &handle, done, async move {
            let client = Client::connect_with(&url, options).await?;
            Ok(Connected(client, task_handle))
        })
    }

    /// The server's software version.
    #[getter]
    fn server_version(&self) -> &str {
        self.client.server_version()
    }

    /// Whether the connection is over (closed by either side, or lost).
    #[getter]
    fn closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The limits the server announced for this connection.
    #[getter]
    fn server_limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let limits = self.client.server_limits();
        let dict = PyDict::new(py);
        dict.set_item("frame_bytes_max", limits.frame_bytes_max)?;
        dict.set_item("publishes_in_flight_max", limits.publishes_in_flight_max)?;
        dict.set_item("batch_messages_max", limits.batch_messages_max)?;
        dict.set_item("heartbeat_ms", limits.heartbeat_ms)?;
        Ok(dict)
    }

    /// Closes the connection (waits for the server's answer). Closing twice is a no-op.
    #[pyo3(signature = (*, done = None))]
    fn close(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move { client.close().await })
    }

    /// Declares a queue; returns `(name, ready, consumers)`.
    #[pyo3(signature = (name, *, durable = false, exclusive = false, auto_delete = false,
        passive = false, arguments = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn declare_queue(
        &self,
        py: Python<'_>,
        name: String,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        passive: bool,
        arguments: Option<&Bound<'_, PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let arguments = self::arguments(arguments)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            let mut declare = client
                .declare_queue(&name)
                .durable(durable)
                .exclusive(exclusive)
                .auto_delete(auto_delete)
                .passive(passive);
            for (key, value) in arguments {
                declare = declare.argument(&key, value);
            }
            declare.await
        })
    }

    /// Deletes a queue; returns the number of messages dropped.
    #[pyo3(signature = (name, *, if_unused = false, if_empty = false, done = None))]
    fn delete_queue(
        &self,
        py: Python<'_>,
        name: String,
        if_unused: bool,
        if_empty: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.delete_queue(&name).if_unused(if_unused).if_empty(if_empty).await
        })
    }

    /// Drops a queue's ready messages; returns how many.
    #[pyo3(signature = (name, *, done = None))]
    fn purge_queue(&self, py: Python<'_>, name: String, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move { client.purge_queue(&name).await })
    }

    /// A queue's counters as a dict.
    #[pyo3(signature = (name, *, done = None))]
    fn queue_stats(&self, py: Python<'_>, name: String, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move { client.queue_stats(&name).await })
    }

    /// Every queue's counters, as dicts.
    #[pyo3(signature = (*, done = None))]
    fn list_queues(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move { client.list_queues().await })
    }

    /// Declares an exchange of `kind` (`direct`, `fanout`, `topic`, `headers`).
    #[pyo3(signature = (name, kind, *, durable = false, auto_delete = false, internal = false,
        passive = false, arguments = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn declare_exchange(
        &self,
        py: Python<'_>,
        name: String,
        kind: &str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        passive: bool,
        arguments: Option<&Bound<'_, PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let kind = exchange_kind(kind)?;
        let arguments = self::arguments(arguments)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            let mut declare = client
                .declare_exchange(&name, kind)
                .durable(durable)
                .auto_delete(auto_delete)
                .internal(internal)
                .passive(passive);
            for (key, value) in arguments {
                declare = declare.argument(&key, value);
            }
            declare.await
        })
    }

    /// Deletes an exchange.
    #[pyo3(signature = (name, *, if_unused = false, done = None))]
    fn delete_exchange(
        &self,
        py: Python<'_>,
        name: String,
        if_unused: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.delete_exchange(&name).if_unused(if_unused).await
        })
    }

    /// Binds (or with `unbind`, unbinds) `destination` (a queue, or with `to_exchange` an
    /// exchange) to exchange `source` with `routing_key` and `arguments`.
    #[pyo3(signature = (destination, source, routing_key, *, to_exchange = false, unbind = false,
        arguments = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn bind(
        &self,
        py: Python<'_>,
        destination: String,
        source: String,
        routing_key: String,
        to_exchange: bool,
        unbind: bool,
        arguments: Option<&Bound<'_, PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let arguments = self::arguments(arguments)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            let mut bind = match (to_exchange, unbind) {
                (false, false) => client.bind_queue(&destination, &source, &routing_key),
                (false, true) => client.unbind_queue(&destination, &source, &routing_key),
                (true, false) => client.bind_exchange(&destination, &source, &routing_key),
                (true, true) => client.unbind_exchange(&destination, &source, &routing_key),
            };
            for (key, value) in arguments {
                bind = bind.argument(&key, value);
            }
            bind.await
        })
    }

    /// Publishes one message and waits for its confirm; returns the durability
    /// (`"in_memory"`, `"fsynced"`, `"unsafe_not_synced"`).
    #[pyo3(signature = (routing_key, body, *, exchange = "", headers = None,
        persistent = false, message_id = None, correlation_id = None, reply_to = None,
        content_type = None, content_encoding = None, priority = 0, expiration = None,
        done = None))]
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
        expiration: Option<f64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
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
        )?;
        let message = props.into_message(convert::extract_body(body)?);
        let exchange = exchange.to_owned();
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.publish(&exchange, &routing_key, message).await
        })
    }

    /// Publishes `messages` (bodies, or `OutgoingMessage`s with their own routing key and
    /// properties) in batches and waits for every confirm; returns one entry per message:
    /// `None` if stored, else the error.
    #[pyo3(signature = (messages, *, routing_key = "", exchange = "",
        done = None))]
    fn publish_many(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        routing_key: &str,
        exchange: &str,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let mut entries: Vec<(Option<String>, Message)> = Vec::with_capacity(messages.len().unwrap_or(0));
        let mut routed = false;
        for item in messages.try_iter()? {
            let item = item?;
            if let Ok(outgoing) = item.cast::<OutgoingMessage>() {
                let outgoing = outgoing.get();
                routed |= outgoing.routing_key.is_some();
                entries.push((outgoing.routing_key.clone(), outgoing.message.clone()));
            } else {
                entries.push((None, Message::new(convert::extract_body(&item)?)));
            }
        }
        let publisher = self.client.publisher();
        let (routing_key, exchange) = (routing_key.to_owned(), exchange.to_owned());
        run(py, &self.handle, done, async move {
            if routed {
                let routed = entries
                    .into_iter()
                    .map(|(key, message)| (key.unwrap_or_else(|| routing_key.clone()), message))
                    .collect();
                publisher.publish_batch_routed(&exchange, routed).await
            } else {
                let messages = entries.into_iter().map(|(_, message)| message).collect();
                publisher.publish_batch(&exchange, &routing_key, messages).await
            }
        })
    }

    /// A pipelining publisher with at most `window` unconfirmed publishes (`None`: the
    /// server's limit).
    #[pyo3(signature = (window = None))]
    fn publisher(&self, window: Option<u32>) -> PyPublisher {
        let publisher = match window {
            Some(window) => self.client.publisher_with_window(window),
            None => self.client.publisher(),
        };
        PyPublisher::new(publisher, self.handle.clone())
    }

    /// Subscribes to `queue`; returns a `Consumer`.
    #[pyo3(signature = (queue, *, prefetch = 100, auto_ack = false, exclusive = false,
        priority = 0, timeout = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn consume(
        &self,
        py: Python<'_>,
        queue: String,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
        priority: i32,
        timeout: Option<f64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let timeout: Option<Duration> = convert::optional_seconds("timeout", timeout)?;
        let options = ConsumeOptions {
            prefetch,
            auto_ack,
            exclusive,
            priority,
            ..ConsumeOptions::default()
        };
        let client = self.client();
        let handle = self.handle.clone();
        run(py, &self.handle, done, async move {
            let consumer = client.consume(&queue, options).await?;
            Ok(NewConsumer {
                consumer,
                handle,
                auto_ack,
                prefetch,
                timeout,
            })
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let version = PyString::new(py, self.client.server_version()).repr()?;
        let closed = if self.client.is_closed() { "True" } else { "False" };
        Ok(format!("<wharf Core server_version={version} closed={closed}>"))
    }
}

