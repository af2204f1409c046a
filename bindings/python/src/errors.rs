//! `ClientError` → the exception classes of `wharf.errors` (defined in Python, so they are
//! ordinary, picklable, subclassable classes with a `code` attribute).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule};
use wharf_client::{ClientError, ErrorCode};

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The `wharf.errors` class for a server error code (operating errors).
fn class_for_code(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::NotFound => "NotFound",
        ErrorCode::PreconditionFailed => "PreconditionFailed",
        ErrorCode::AccessRefused => "AccessRefused",
        ErrorCode::ResourceLimit => "ResourceLimit",
        ErrorCode::InvalidName => "InvalidName",
        ErrorCode::ResourceLocked => "ResourceLocked",
        ErrorCode::Backpressure => "Backpressure",
        ErrorCode::PublishRefused => "PublishRefused",
        ErrorCode::InvalidArgument => "InvalidArgument",
        ErrorCode::NotImplemented => "NotSupported",
        _ => "WharfError",
    }
}

/// The class name and wire code of an error.
fn classify(err: &ClientError) -> (&'static str, Option<u16>) {
    let code = err.code().map(u16::from);
    let class = match err {
        ClientError::InvalidAddress { .. }
        | ClientError::Encode(_)
        | ClientError::InvalidArgument { .. } => "InvalidArgument",
        ClientError::Connect { .. } | ClientError::Tls { .. } | ClientError::Handshake { .. } => {
            "ConnectError"
        }
        ClientError::Server { code, .. } => class_for_code(*code),
        ClientError::ServerClosed { code, .. } => match code {
            ErrorCode::AccessRefused => "AccessRefused",
            _ => "ConnectionLost",
        },
        ClientError::ConnectionLost(_) | ClientError::Protocol(_) => "ConnectionLost",
        ClientError::Closed => "ConnectionClosed",
        ClientError::Timeout { .. } => "Timeout",
        ClientError::PublishRefused { code, .. } => match class_for_code(*code) {
            "WharfError" => "PublishRefused",
            class => class,
        },
        ClientError::Backpressure { .. } => "Backpressure",
        ClientError::Duplicate => "Duplicate",
        ClientError::ConsumerCancelled { .. } => "ConsumerCancelled",
        ClientError::NotSettleable { .. } => "NotSettleable",
        ClientError::NotSupported { .. } => "NotSupported",
        _ => "WharfError",
    };
    (class, code)
}

fn build(py: Python<'_>, class: &str, message: String, code: Option<u16>) -> PyResult<Py<PyAny>> {
    let module = ERRORS_MODULE
        .get_or_try_init(py, || py.import("wharf.errors").map(Bound::unbind))?
        .bind(py);
    let kwargs = PyDict::new(py);
    kwargs.set_item("code", code)?;
    Ok(module
        .getattr(class)?
        .call((message,), Some(&kwargs))?
        .unbind())
}

/// The exception object for `err` (an instance of a `wharf.errors` class).
pub(crate) fn error_object(py: Python<'_>, err: &ClientError) -> Py<PyAny> {
    let (class, code) = classify(err);
    match build(py, class, err.to_string(), code) {
        Ok(object) => object,
        Err(import_failure) => import_failure.into_value(py).into_any(),
    }
}

/// `err` as a raisable `PyErr`.
pub(crate) fn to_py_err(py: Python<'_>, err: &ClientError) -> PyErr {
    PyErr::from_value(error_object(py, err).into_bound(py))
}

/// A `wharf.errors` exception of class `class` without a server code.
pub(crate) fn new_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    match build(py, class, message, None) {
        Ok(object) => PyErr::from_value(object.into_bound(py)),
        Err(err) => err,
    }
}
