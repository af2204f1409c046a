//! [`Core`]: one connection. The Python classes `wharf.Connection` and
//! `wharf.aio.Connection` wrap it; every method blocks (GIL released) unless given `done`.

use crate::consumer::NewConsumer;
use crate::convert::{self, Props};
use crate::message::OutgoingMessage;
use crate::publisher::PyPublisher;
use crate::{InRuntime, ToPy, run, runtime};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::time::Duration;
use tokio::runtime::Handle;
use wharf_client::wharf_protocol::MINOR_QUEUE_FEATURES;
use wharf_client::{
    Client, ClientOptions, ConsumeOptions, Credentials, DeclareQueue, ExchangeKind, Message,
    Overflow, PermissionInfo, TlsOptions, TopicPermissionInfo, UserLimits, Value, VhostLimits,
};

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

/// The queue features given as keywords of `declare_queue`, each becoming its queue argument.
/// Integers go to the broker as given, so it judges their range (`InvalidArgument`) exactly as
/// for the same argument in `arguments`; durations are checked here (seconds >= 0).
struct QueueFeatures {
    max_priority: Option<i64>,
    max_length: Option<i64>,
    max_length_bytes: Option<i64>,
    overflow: Option<Overflow>,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
    delivery_limit: Option<i64>,
    message_ttl: Option<Duration>,
    expires: Option<Duration>,
    retry: Option<Vec<Duration>>,
    dedup_window: Option<Duration>,
    single_active_consumer: Option<bool>,
    sync: Option<String>,
}

impl QueueFeatures {
    /// The queue argument of every feature given, with its keyword.
    fn given(&self) -> Vec<(&'static str, &'static str)> {
        let mut given = Vec::new();
        let mut add = |is_set: bool, key: &'static str, keyword: &'static str| {
            if is_set {
                given.push((key, keyword));
            }
        };
        add(
            self.max_priority.is_some(),
            "x-max-priority",
            "max_priority",
        );
        add(self.max_length.is_some(), "x-max-length", "max_length");
        add(
            self.max_length_bytes.is_some(),
            "x-max-length-bytes",
            "max_length_bytes",
        );
        add(self.overflow.is_some(), "x-overflow", "overflow");
        add(
            self.dead_letter_exchange.is_some(),
            "x-dead-letter-exchange",
            "dead_letter_exchange",
        );
        add(
            self.dead_letter_routing_key.is_some(),
            "x-dead-letter-routing-key",
            "dead_letter_routing_key",
        );
        add(
            self.delivery_limit.is_some(),
            "x-delivery-limit",
            "delivery_limit",
        );
        add(self.message_ttl.is_some(), "x-message-ttl", "message_ttl");
        add(self.expires.is_some(), "x-expires", "expires");
        add(self.retry.is_some(), "x-retry", "retry");
        add(
            self.dedup_window.is_some(),
            "x-dedup-window",
            "dedup_window",
        );
        add(
            self.single_active_consumer.is_some(),
            "x-single-active-consumer",
            "single_active_consumer",
        );
        add(self.sync.is_some(), "x-sync", "sync");
        given
    }

    /// Refuses a feature given both as a keyword and in `arguments` (which one should win
    /// is a guess; a redeclare must repeat the arguments exactly anyway).
    fn check_against(&self, arguments: &[(String, Value)]) -> PyResult<()> {
        for (key, keyword) in self.given() {
            if arguments.iter().any(|(given, _)| given == key) {
                return Err(convert::invalid_argument(format!(
                    "{key} is given twice: as {keyword}= and in arguments"
                )));
            }
        }
        Ok(())
    }

    fn apply<'a>(self, mut declare: DeclareQueue<'a>) -> DeclareQueue<'a> {
        let integers = [
            ("x-max-priority", self.max_priority),
            ("x-max-length", self.max_length),
            ("x-max-length-bytes", self.max_length_bytes),
            ("x-delivery-limit", self.delivery_limit),
        ];
        for (key, value) in integers {
            if let Some(value) = value {
                declare = declare.argument(key, value);
            }
        }
        if let Some(overflow) = self.overflow {
            declare = declare.overflow(overflow);
        }
        if let Some(exchange) = &self.dead_letter_exchange {
            declare = declare.dead_letter_exchange(exchange);
        }
        if let Some(routing_key) = &self.dead_letter_routing_key {
            declare = declare.dead_letter_routing_key(routing_key);
        }
        if let Some(ttl) = self.message_ttl {
            declare = declare.message_ttl(ttl);
        }
        if let Some(idle) = self.expires {
            declare = declare.expires(idle);
        }
        if let Some(delays) = &self.retry {
            declare = declare.retry(delays);
        }
        if let Some(window) = self.dedup_window {
            declare = declare.dedup_window(window);
        }
        if let Some(enabled) = self.single_active_consumer {
            declare = declare.single_active_consumer(enabled);
        }
        if let Some(sync) = &self.sync {
            // The broker validates it (`InvalidArgument`), as for `arguments`.
            declare = declare.argument("x-sync", sync.as_str());
        }
        declare
    }
}

fn overflow(value: &str) -> PyResult<Overflow> {
    match value {
        "drop-head" => Ok(Overflow::DropHead),
        "reject-publish" => Ok(Overflow::RejectPublish),
        "reject-publish-dlx" => Ok(Overflow::RejectPublishDlx),
        other => Err(convert::invalid_argument(format!(
            "overflow is 'drop-head', 'reject-publish' or 'reject-publish-dlx', not {other:?}"
        ))),
    }
}

/// A retry schedule: a list or tuple of durations.
fn retry_schedule(schedule: &Bound<'_, PyAny>) -> PyResult<Vec<Duration>> {
    if schedule.is_instance_of::<PyString>() || schedule.cast::<PyDict>().is_ok() {
        return Err(PyTypeError::new_err(
            "retry is a list of delays (seconds or timedelta)",
        ));
    }
    schedule
        .try_iter()
        .map_err(|_| PyTypeError::new_err("retry is a list of delays (seconds or timedelta)"))?
        .map(|delay| convert::duration("retry delay", &delay?))
        .collect()
}

/// A limit from a Python int: `None` is no limit; it must fit a `u32`.
fn limit(what: &str, value: Option<i64>) -> PyResult<Option<u32>> {
    value
        .map(|value| {
            u32::try_from(value).map_err(|_| {
                convert::invalid_argument(format!(
                    "{what} must be in 0..={} (None: no limit), not {value}",
                    u32::MAX
                ))
            })
        })
        .transpose()
}

/// A virtual host's limits from Python ints: `None` is no limit; each must fit a `u32`.
fn vhost_limits(max_connections: Option<i64>, max_queues: Option<i64>) -> PyResult<VhostLimits> {
    Ok(VhostLimits {
        max_connections: limit("max_connections", max_connections)?,
        max_queues: limit("max_queues", max_queues)?,
    })
}

/// A user's own limits from Python ints: `None` is no limit; each must fit a `u32`.
fn user_limits(max_connections: Option<i64>, max_queues: Option<i64>) -> PyResult<UserLimits> {
    Ok(UserLimits {
        max_connections: limit("max_connections", max_connections)?,
        max_queues: limit("max_queues", max_queues)?,
    })
}

impl Core {
    fn client(&self) -> Client {
        (*self.client).clone()
    }
}

#[pymethods]
impl Core {
    /// Connects to `url` (`wharf://[user:password@]host[:port][/vhost]`, `wharfs://...` for
    /// TLS, or `host[:port]`). `ca`, `cert`, `key` and `server_name` are the TLS settings of a
    /// `wharfs://` URL; `external` logs in as the client certificate's subject; `vhost`
    /// overrides the URL's virtual host.
    #[staticmethod]
    #[pyo3(signature = (url, *, client_name = None, heartbeat = None, connect_timeout = 10.0,
        request_timeout = 30.0, ca = None, cert = None, key = None, server_name = None,
        external = false, vhost = None, done = None))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        url: String,
        client_name: Option<String>,
        heartbeat: Option<f64>,
        connect_timeout: f64,
        request_timeout: f64,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
        server_name: Option<String>,
        external: bool,
        vhost: Option<String>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let handle = runtime()?;
        let mut options = ClientOptions {
            connect_timeout: convert::seconds("connect_timeout", connect_timeout)?,
            request_timeout: convert::seconds("request_timeout", request_timeout)?,
            vhost,
            ..ClientOptions::default()
        };
        if let Some(client_name) = client_name {
            options.client_name = client_name;
        }
        if ca.is_some() || cert.is_some() || key.is_some() || server_name.is_some() {
            options.tls = Some(TlsOptions {
                ca_file: ca,
                cert_file: cert,
                key_file: key,
                server_name,
            });
        }
        if external {
            options.credentials = Credentials::External;
        }
        if let Some(heartbeat) = convert::optional_seconds("heartbeat", heartbeat)? {
            options.heartbeat_ms = u32::try_from(heartbeat.as_millis())
                .unwrap_or(u32::MAX)
                .max(1);
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

    /// Declares a queue; returns `(name, ready, consumers)`. The feature keywords
    /// (`max_priority`, ..., `single_active_consumer`) become their queue arguments.
    #[pyo3(signature = (name, *, durable = false, exclusive = false, auto_delete = false,
        passive = false, arguments = None, max_priority = None, max_length = None,
        max_length_bytes = None, overflow = None, dead_letter_exchange = None,
        dead_letter_routing_key = None, delivery_limit = None, message_ttl = None,
        expires = None, retry = None, dedup_window = None, single_active_consumer = None,
        sync = None, done = None))]
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
        max_priority: Option<i64>,
        max_length: Option<i64>,
        max_length_bytes: Option<i64>,
        overflow: Option<&str>,
        dead_letter_exchange: Option<String>,
        dead_letter_routing_key: Option<String>,
        delivery_limit: Option<i64>,
        message_ttl: Option<&Bound<'_, PyAny>>,
        expires: Option<&Bound<'_, PyAny>>,
        retry: Option<&Bound<'_, PyAny>>,
        dedup_window: Option<&Bound<'_, PyAny>>,
        single_active_consumer: Option<bool>,
        sync: Option<String>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let arguments = self::arguments(arguments)?;
        let features = QueueFeatures {
            max_priority,
            max_length,
            max_length_bytes,
            overflow: overflow.map(self::overflow).transpose()?,
            dead_letter_exchange,
            dead_letter_routing_key,
            delivery_limit,
            message_ttl: convert::optional_duration("message_ttl", message_ttl)?,
            expires: convert::optional_duration("expires", expires)?,
            retry: retry
                .filter(|retry| !retry.is_none())
                .map(retry_schedule)
                .transpose()?,
            dedup_window: convert::optional_duration("dedup_window", dedup_window)?,
            single_active_consumer,
            sync,
        };
        features.check_against(&arguments)?;
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
            features.apply(declare).await
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
            client
                .delete_queue(&name)
                .if_unused(if_unused)
                .if_empty(if_empty)
                .await
        })
    }

    /// Drops a queue's ready messages; returns how many.
    #[pyo3(signature = (name, *, done = None))]
    fn purge_queue(
        &self,
        py: Python<'_>,
        name: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.purge_queue(&name).await
        })
    }

    /// A queue's counters as a dict (every counter of protocol 1.1; those a 1.0 broker does
    /// not report are 0).
    #[pyo3(signature = (name, *, done = None))]
    fn queue_stats(
        &self,
        py: Python<'_>,
        name: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            if client.protocol_minor() >= MINOR_QUEUE_FEATURES {
                client.queue_stats_v2(&name).await
            } else {
                client.queue_stats(&name).await.map(convert::widen)
            }
        })
    }

    /// Every queue's counters, as dicts (as `queue_stats`).
    #[pyo3(signature = (*, done = None))]
    fn list_queues(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            if client.protocol_minor() >= MINOR_QUEUE_FEATURES {
                client.list_queues_v2().await
            } else {
                let queues = client.list_queues().await?;
                Ok(queues.into_iter().map(convert::widen).collect())
            }
        })
    }

    /// Adds a user (administrators only), without permissions.
    #[pyo3(signature = (name, password, *, tags = Vec::new(), done = None))]
    fn add_user(
        &self,
        py: Python<'_>,
        name: String,
        password: String,
        tags: Vec<String>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            client.add_user(&name, &password, &tags).await
        })
    }

    /// Deletes a user and its permissions (administrators only).
    #[pyo3(signature = (name, *, done = None))]
    fn delete_user(
        &self,
        py: Python<'_>,
        name: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.delete_user(&name).await
        })
    }

    /// Sets a user's password (administrators only).
    #[pyo3(signature = (name, password, *, done = None))]
    fn change_password(
        &self,
        py: Python<'_>,
        name: String,
        password: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.change_password(&name, &password).await
        })
    }

    /// Sets a user's tags (administrators only).
    #[pyo3(signature = (name, tags, *, done = None))]
    fn set_user_tags(
        &self,
        py: Python<'_>,
        name: String,
        tags: Vec<String>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            client.set_user_tags(&name, &tags).await
        })
    }

    /// Every user and its tags, as dicts (administrators only).
    #[pyo3(signature = (*, done = None))]
    fn list_users(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(
            py,
            &self.handle,
            done,
            async move { client.list_users().await },
        )
    }

    /// Sets a user's permissions in a virtual host (administrators only).
    #[pyo3(signature = (user, configure, write, read, *, vhost = "/".to_owned(), done = None))]
    #[allow(clippy::too_many_arguments)]
    fn set_permissions(
        &self,
        py: Python<'_>,
        user: String,
        configure: String,
        write: String,
        read: String,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        let permission = PermissionInfo {
            user,
            vhost,
            configure,
            write,
            read,
        };
        run(py, &self.handle, done, async move {
            client.set_permissions(permission).await
        })
    }

    /// Removes a user's permissions in a virtual host (administrators only).
    #[pyo3(signature = (user, *, vhost = "/".to_owned(), done = None))]
    fn clear_permissions(
        &self,
        py: Python<'_>,
        user: String,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.clear_permissions(&user, &vhost).await
        })
    }

    /// The permissions in a virtual host, as dicts (administrators only).
    #[pyo3(signature = (*, vhost = "/".to_owned(), done = None))]
    fn list_permissions(
        &self,
        py: Python<'_>,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.list_permissions(&vhost).await
        })
    }

    /// Sets a user's topic permissions on a topic exchange (administrators only).
    #[pyo3(signature = (user, exchange, write, read, *, vhost = "/".to_owned(), done = None))]
    #[allow(clippy::too_many_arguments)]
    fn set_topic_permissions(
        &self,
        py: Python<'_>,
        user: String,
        exchange: String,
        write: String,
        read: String,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        let permission = TopicPermissionInfo {
            user,
            vhost,
            exchange,
            write,
            read,
        };
        run(py, &self.handle, done, async move {
            client.set_topic_permissions(permission).await
        })
    }

    /// Removes a user's topic permissions on one exchange or all (administrators only).
    #[pyo3(signature = (user, *, exchange = None, vhost = "/".to_owned(), done = None))]
    fn clear_topic_permissions(
        &self,
        py: Python<'_>,
        user: String,
        exchange: Option<String>,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client
                .clear_topic_permissions(&user, &vhost, exchange.as_deref())
                .await
        })
    }

    /// The topic permissions in a virtual host, as dicts (administrators only).
    #[pyo3(signature = (*, vhost = "/".to_owned(), done = None))]
    fn list_topic_permissions(
        &self,
        py: Python<'_>,
        vhost: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.list_topic_permissions(&vhost).await
        })
    }

    /// Adds a virtual host with its own limits (`None`: no limit of its own; administrators
    /// only).
    #[pyo3(signature = (name, *, max_connections = None, max_queues = None, done = None))]
    fn add_vhost(
        &self,
        py: Python<'_>,
        name: String,
        max_connections: Option<i64>,
        max_queues: Option<i64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let limits = vhost_limits(max_connections, max_queues)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.add_vhost(&name, limits).await
        })
    }

    /// Deletes a virtual host with everything in it (administrators only).
    #[pyo3(signature = (name, *, done = None))]
    fn delete_vhost(
        &self,
        py: Python<'_>,
        name: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.delete_vhost(&name).await
        })
    }

    /// Every virtual host, its limits and its usage, as dicts (administrators only).
    #[pyo3(signature = (*, done = None))]
    fn list_vhosts(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(
            py,
            &self.handle,
            done,
            async move { client.list_vhosts().await },
        )
    }

    /// Sets a virtual host's limits, replacing them (`None`: no limit; administrators only).
    #[pyo3(signature = (name, *, max_connections = None, max_queues = None, done = None))]
    fn set_vhost_limits(
        &self,
        py: Python<'_>,
        name: String,
        max_connections: Option<i64>,
        max_queues: Option<i64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let limits = vhost_limits(max_connections, max_queues)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.set_vhost_limits(&name, limits).await
        })
    }

    /// Sets a user's own limits, replacing both (`None`: no limit of its own; administrators
    /// only).
    #[pyo3(signature = (user, *, max_connections = None, max_queues = None, done = None))]
    fn set_user_limits(
        &self,
        py: Python<'_>,
        user: String,
        max_connections: Option<i64>,
        max_queues: Option<i64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let limits = user_limits(max_connections, max_queues)?;
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.set_user_limits(&user, limits).await
        })
    }

    /// Every user and its own limits, as dicts sorted by user (administrators only).
    #[pyo3(signature = (*, done = None))]
    fn list_user_limits(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.list_user_limits().await
        })
    }

    /// Moves up to `max_messages` (`None`: all) dead-lettered messages of `queue` back to the
    /// queues they died in; returns how many moved.
    #[pyo3(signature = (queue, *, max_messages = None, done = None))]
    fn redrive(
        &self,
        py: Python<'_>,
        queue: String,
        max_messages: Option<i64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        // The wire's 0 means "all": a Python 0 must not.
        let max = match max_messages {
            None => 0,
            Some(max) if max >= 1 => u64::try_from(max).expect("positive"),
            Some(max) => {
                return Err(convert::invalid_argument(format!(
                    "max_messages must be >= 1 (None: all), not {max}"
                )));
            }
        };
        let client = self.client();
        run(py, &self.handle, done, async move {
            client.redrive(&queue, max).await
        })
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
            delay,
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
        let mut entries: Vec<(Option<String>, Message)> =
            Vec::with_capacity(messages.len().unwrap_or(0));
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
                publisher
                    .publish_batch(&exchange, &routing_key, messages)
                    .await
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

    /// Subscribes to `queue`; returns a `Consumer`. With `ack_timeout`, each delivery is on a
    /// lease that the client extends while the application holds the message.
    #[pyo3(signature = (queue, *, prefetch = 100, auto_ack = false, exclusive = false,
        priority = 0, timeout = None, ack_timeout = None, done = None))]
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
        ack_timeout: Option<&Bound<'_, PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let timeout: Option<Duration> = convert::optional_seconds("timeout", timeout)?;
        let options = ConsumeOptions {
            prefetch,
            auto_ack,
            exclusive,
            priority,
            ack_timeout: convert::optional_duration("ack_timeout", ack_timeout)?,
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
                ack_timeout: options.ack_timeout,
            })
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let version = PyString::new(py, self.client.server_version()).repr()?;
        let closed = if self.client.is_closed() {
            "True"
        } else {
            "False"
        };
        Ok(format!(
            "<wharf Core server_version={version} closed={closed}>"
        ))
    }
}
