//! Conversions between Python values and the client's types: bodies, header values, message
//! properties, and the results of operations.

use crate::ToPy;
use bytes::Bytes;
use pyo3::IntoPyObjectExt;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType,
};
use std::time::Duration;
use wharf_client::wharf_protocol::{TableIter, limits::TABLE_DEPTH_MAX};
use wharf_client::{
    ClientError, DeclaredQueue, Durability, Message, QueueInfo, QueueInfoV2, Value, ValueRef,
};

/// A message body: `bytes`, `bytearray`, `str` (UTF-8) or any buffer (`memoryview`, ...).
pub(crate) fn extract_body(body: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(bytes) = body.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    if let Ok(text) = body.cast::<PyString>() {
        return Ok(Bytes::copy_from_slice(text.to_cow()?.as_bytes()));
    }
    if let Ok(array) = body.cast::<PyByteArray>() {
        return Ok(Bytes::from(array.to_vec()));
    }
    match body.py().get_type::<PyBytes>().call1((body,)) {
        Ok(copied) => Ok(Bytes::copy_from_slice(copied.cast::<PyBytes>()?.as_bytes())),
        Err(_) => Err(PyTypeError::new_err(format!(
            "a message body is bytes, bytearray, memoryview or str, not {}",
            body.get_type().name()?
        ))),
    }
}

/// A Python header / argument value as a typed table value.
pub(crate) fn to_value(object: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > TABLE_DEPTH_MAX as usize {
        return Err(PyValueError::new_err("header value nested too deep"));
    }
    // `bool` before `int`: it is a subclass.
    if let Ok(flag) = object.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if object.is_instance_of::<PyInt>() {
        return Ok(Value::I64(object.extract()?));
    }
    if object.is_instance_of::<PyFloat>() {
        return Ok(Value::F64(object.extract()?));
    }
    if let Ok(text) = object.cast::<PyString>() {
        return Ok(Value::Str(text.to_cow()?.into_owned()));
    }
    if let Ok(bytes) = object.cast::<PyBytes>() {
        return Ok(Value::Bytes(Bytes::copy_from_slice(bytes.as_bytes())));
    }
    if let Ok(array) = object.cast::<PyByteArray>() {
        return Ok(Value::Bytes(Bytes::from(array.to_vec())));
    }
    if let Ok(dict) = object.cast::<PyDict>() {
        return Ok(Value::Map(to_entries(dict, depth + 1)?));
    }
    if object.is_instance_of::<PyList>() || object.is_instance_of::<PyTuple>() {
        let mut items = Vec::new();
        for item in object.try_iter()? {
            items.push(to_value(&item?, depth + 1)?);
        }
        return Ok(Value::List(items));
    }
    Err(PyTypeError::new_err(format!(
        "a header value is str, int, float, bool, bytes, list or dict, not {}",
        object.get_type().name()?
    )))
}

/// A `dict[str, value]` as ordered table entries.
pub(crate) fn to_entries(dict: &Bound<'_, PyDict>, depth: usize) -> PyResult<Vec<(String, Value)>> {
    let mut entries = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        let key: String = key
            .extract()
            .map_err(|_| PyTypeError::new_err("header and argument keys are str"))?;
        entries.push((key, to_value(&value, depth)?));
    }
    Ok(entries)
}

/// Optional entries from a dict or any mapping (`None` = empty).
pub(crate) fn optional_entries(
    mapping: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, Value)>> {
    let Some(mapping) = mapping else {
        return Ok(Vec::new());
    };
    if mapping.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(dict) = mapping.cast::<PyDict>() {
        return to_entries(dict, 0);
    }
    let dict = mapping.py().get_type::<PyDict>().call1((mapping,))?;
    to_entries(dict.cast::<PyDict>()?, 0)
}

/// A typed table value as a Python object.
pub(crate) fn value_to_py<'py>(
    py: Python<'py>,
    value: ValueRef<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    match value {
        ValueRef::Str(text) => text.into_bound_py_any(py),
        ValueRef::I64(number) => number.into_bound_py_any(py),
        ValueRef::F64(number) => number.into_bound_py_any(py),
        ValueRef::Bool(flag) => flag.into_bound_py_any(py),
        ValueRef::Bytes(bytes) => Ok(PyBytes::new(py, bytes).into_any()),
        ValueRef::List(list) => {
            let items = PyList::empty(py);
            for item in list.iter() {
                items.append(value_to_py(py, item)?)?;
            }
            Ok(items.into_any())
        }
        ValueRef::Map(map) => Ok(table_to_dict(py, map.iter())?.into_any()),
    }
}

/// Table entries as a dict; for a repeated key the first entry wins (as for readers in Rust).
pub(crate) fn table_to_dict<'py>(
    py: Python<'py>,
    entries: TableIter<'_>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (key, value) in entries {
        if !dict.contains(key)? {
            dict.set_item(key, value_to_py(py, value)?)?;
        }
    }
    Ok(dict)
}

/// `wharf.InvalidArgument` (a `ValueError`) with `message`: a bad value caught before
/// anything is sent.
pub(crate) fn invalid_argument(message: String) -> PyErr {
    Python::attach(|py| crate::errors::new_error(py, "InvalidArgument", message))
}

/// Seconds (`float`) as a `Duration`; `wharf.InvalidArgument` if negative or not finite.
pub(crate) fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        invalid_argument(format!(
            "{what} must be a finite number of seconds >= 0, not {value}"
        ))
    })
}

/// Optional seconds.
pub(crate) fn optional_seconds(what: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    value.map(|value| seconds(what, value)).transpose()
}

static TIMEDELTA: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A duration given as seconds (`int` or `float`) or as a `datetime.timedelta`.
pub(crate) fn duration(what: &str, value: &Bound<'_, PyAny>) -> PyResult<Duration> {
    let py = value.py();
    let timedelta = TIMEDELTA.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("datetime")?
                .getattr("timedelta")?
                .cast_into::<PyType>()?
                .unbind(),
        )
    })?;
    let secs: f64 = if value.is_instance(timedelta.bind(py))? {
        value.call_method0("total_seconds")?.extract()?
    } else if value.is_instance_of::<PyBool>()
        || !(value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>())
    {
        return Err(PyTypeError::new_err(format!(
            "{what} is a number of seconds or a datetime.timedelta, not {}",
            value.get_type().name()?
        )));
    } else {
        value.extract()?
    };
    seconds(what, secs)
}

/// An optional duration (`None` = not given).
pub(crate) fn optional_duration(
    what: &str,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Duration>> {
    match value {
        Some(value) if !value.is_none() => Ok(Some(duration(what, value)?)),
        _ => Ok(None),
    }
}

/// The properties of an outgoing message, as given to `publish(...)`.
pub(crate) struct Props {
    pub(crate) headers: Vec<(String, Value)>,
    pub(crate) persistent: bool,
    pub(crate) message_id: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) content_encoding: Option<String>,
    pub(crate) priority: u8,
    pub(crate) expiration: Option<Duration>,
    pub(crate) delay: Option<Duration>,
}

impl Props {
    /// Reads the keyword arguments shared by every publishing call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
    ) -> PyResult<Props> {
        Ok(Props {
            headers: optional_entries(headers)?,
            persistent,
            message_id,
            correlation_id,
            reply_to,
            content_type,
            content_encoding,
            priority,
            expiration: optional_duration("expiration", expiration)?,
            delay: optional_duration("delay", delay)?,
        })
    }

    /// The message to publish.
    pub(crate) fn into_message(self, body: Bytes) -> Message {
        let mut message = Message::new(body)
            .persistent(self.persistent)
            .priority(self.priority);
        for (key, value) in self.headers {
            message = message.header(key, value);
        }
        if let Some(message_id) = self.message_id {
            message = message.message_id(message_id);
        }
        if let Some(correlation_id) = self.correlation_id {
            message = message.correlation_id(correlation_id);
        }
        if let Some(reply_to) = self.reply_to {
            message = message.reply_to(reply_to);
        }
        if let Some(content_type) = self.content_type {
            message = message.content_type(content_type);
        }
        if let Some(content_encoding) = self.content_encoding {
            message = message.content_encoding(content_encoding);
        }
        if let Some(expiration) = self.expiration {
            message = message.expiration(expiration);
        }
        if let Some(delay) = self.delay {
            message = message.delay(delay);
        }
        message
    }
}

/// The Python spelling of a durability.
pub(crate) fn durability_name(durability: Durability) -> &'static str {
    match durability {
        Durability::Fsynced => "fsynced",
        Durability::InMemory => "in_memory",
        Durability::UnsafeNotSynced => "unsafe_not_synced",
    }
}

impl ToPy for () {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py.None())
    }
}

impl ToPy for u64 {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.into_py_any(py)
    }
}

impl ToPy for Option<u64> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.into_py_any(py)
    }
}

impl ToPy for Durability {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        durability_name(self).into_py_any(py)
    }
}

impl ToPy for DeclaredQueue {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        (self.name, self.ready, self.consumers).into_py_any(py)
    }
}

/// A 1.0 broker's queue description with the counters it cannot report set to 0.
pub(crate) fn widen(info: QueueInfo) -> QueueInfoV2 {
    QueueInfoV2 {
        name: info.name,
        durable: info.durable,
        exclusive: info.exclusive,
        auto_delete: info.auto_delete,
        ready: info.ready,
        unacked: info.unacked,
        consumers: info.consumers,
        ..QueueInfoV2::default()
    }
}

/// A queue's description and counters as the dict `QueueStats._from_dict` reads.
fn queue_info_to_py<'py>(py: Python<'py>, info: QueueInfoV2) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("name", info.name)?;
    dict.set_item("durable", info.durable)?;
    dict.set_item("exclusive", info.exclusive)?;
    dict.set_item("auto_delete", info.auto_delete)?;
    dict.set_item("ready", info.ready)?;
    dict.set_item("unacked", info.unacked)?;
    dict.set_item("consumers", info.consumers)?;
    dict.set_item("delayed", info.delayed)?;
    dict.set_item("ready_bytes", info.ready_bytes)?;
    dict.set_item("published", info.published)?;
    dict.set_item("delivered", info.delivered)?;
    dict.set_item("redelivered", info.redelivered)?;
    dict.set_item("acked", info.acked)?;
    dict.set_item("dropped", info.dropped)?;
    dict.set_item("expired", info.expired)?;
    dict.set_item("duplicates", info.duplicates)?;
    Ok(dict)
}

impl ToPy for QueueInfoV2 {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(queue_info_to_py(py, self)?.into_any().unbind())
    }
}

impl ToPy for Vec<QueueInfoV2> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let list = PyList::empty(py);
        for info in self {
            list.append(queue_info_to_py(py, info)?)?;
        }
        Ok(list.into_any().unbind())
    }
}

/// Per-message publish outcomes: `None` (confirmed) or the error object.
impl ToPy for Vec<Result<Durability, ClientError>> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let list = PyList::empty(py);
        for outcome in self {
            match outcome {
                Ok(_) => list.append(py.None())?,
                Err(err) => list.append(crate::errors::error_object(py, &err))?,
            }
        }
        Ok(list.into_any().unbind())
    }
}

/// A list of dicts, one per item, with the fields `fields` gives.
fn dict_list<T>(
    py: Python<'_>,
    items: Vec<T>,
    fields: impl Fn(&Bound<'_, PyDict>, T) -> PyResult<()>,
) -> PyResult<Py<PyAny>> {
    let list = PyList::empty(py);
    for item in items {
        let dict = PyDict::new(py);
        fields(&dict, item)?;
        list.append(dict)?;
    }
    Ok(list.into_any().unbind())
}

impl ToPy for Vec<wharf_client::UserInfo> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        dict_list(py, self, |dict, user| {
            dict.set_item("name", user.name)?;
            dict.set_item("tags", user.tags)
        })
    }
}

impl ToPy for Vec<wharf_client::PermissionInfo> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        dict_list(py, self, |dict, permission| {
            dict.set_item("user", permission.user)?;
            dict.set_item("vhost", permission.vhost)?;
            dict.set_item("configure", permission.configure)?;
            dict.set_item("write", permission.write)?;
            dict.set_item("read", permission.read)
        })
    }
}

impl ToPy for Vec<wharf_client::TopicPermissionInfo> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        dict_list(py, self, |dict, permission| {
            dict.set_item("user", permission.user)?;
            dict.set_item("vhost", permission.vhost)?;
            dict.set_item("exchange", permission.exchange)?;
            dict.set_item("write", permission.write)?;
            dict.set_item("read", permission.read)
        })
    }
}

impl ToPy for Vec<wharf_client::VhostInfo> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        dict_list(py, self, |dict, vhost| {
            dict.set_item("name", vhost.name)?;
            dict.set_item("max_connections", vhost.limits.max_connections)?;
            dict.set_item("max_queues", vhost.limits.max_queues)?;
            dict.set_item("connections", vhost.connections)?;
            dict.set_item("queues", vhost.queues)
        })
    }
}

impl ToPy for Vec<wharf_client::UserLimitsInfo> {
    fn to_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        dict_list(py, self, |dict, user| {
            dict.set_item("user", user.user)?;
            dict.set_item("max_connections", user.limits.max_connections)?;
            dict.set_item("max_queues", user.limits.max_queues)
        })
    }
}
