//! Administration over the protocol (1.2, 1.3): users, permissions and virtual hosts, for
//! users with the `administrator` tag (docs/security.md "Managing users").
//!
//! These requests never run under the broker lock: adding a user or changing a password runs
//! the KDF (tens of milliseconds) and every change rewrites and fsyncs the users file. A
//! connection's administration requests go, in order, to a task of their own, which runs each
//! on a blocking thread (bounded by the KDF semaphore) and queues its response; the client
//! matches responses by correlation id, so they may overtake the connection's other answers.

use super::*;
use crate::auth::{AuthError, Permission, Tag, TopicPermission, Users};
use tokio::sync::mpsc;
use wharf_protocol::{UserInfo, VhostInfo, VhostLimits};

/// Administration requests of one connection waiting for its task at most; past it they are
/// refused with `ResourceLimit` at once.
const ADMIN_QUEUE_MAX: usize = 64;

/// A connection's administration task, started at its first administration request.
#[derive(Debug, Default)]
pub(super) struct Admin {
    queue: Option<mpsc::Sender<(u64, Request)>>,
}

impl Admin {
    /// Hands `request` to the connection's administration task (started if need be), or
    /// answers at once when too many wait.
    pub(super) fn submit(
        &mut self,
        shared: &Arc<Context>,
        user: &str,
        anonymous: bool,
        outbox: &Arc<Output>,
        correlation_id: u64,
        request: Request,
    ) {
        // Refused here, before any queueing, thread or KDF permit (the task checks again, as
        // the tag may be taken away while the request waits).
        if anonymous || !is_administrator(&shared.users, user) {
            outbox.push_frame_held(Frame::Response {
                correlation_id,
                response: not_an_administrator(user, anonymous),
            });
            return;
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(ADMIN_QUEUE_MAX);
            tokio::spawn(run(
                shared.clone(),
                user.to_owned(),
                outbox.clone(),
                receiver,
            ));
            sender
        });
        if queue.try_send((correlation_id, request)).is_err() {
            outbox.push_frame_held(Frame::Response {
                correlation_id,
                response: Response::Error {
                    code: ErrorCode::ResourceLimit,
                    message: format!(
                        "more than {ADMIN_QUEUE_MAX} administration requests wait on this connection"
                    ),
                },
            });
        }
    }
}

async fn run(
    shared: Arc<Context>,
    caller: String,
    outbox: Arc<Output>,
    mut requests: mpsc::Receiver<(u64, Request)>,
) {
    while let Some((correlation_id, request)) = requests.recv().await {
        // Only a password to hash takes one of the KDF's permits (logins wait for them too).
        let permit = match request {
            Request::AddUser { .. } | Request::ChangePassword { .. } => Some(
                shared
                    .kdf
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the KDF semaphore is never closed"),
            ),
            _ => None,
        };
        let (shared, caller) = (shared.clone(), caller.clone());
        let response = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            handle(&shared, &caller, request)
        })
        .await
        .unwrap_or_else(|err| Response::Error {
            code: ErrorCode::Internal,
            message: format!("the administration request failed: {err}"),
        });
        outbox.push_frame(Frame::Response {
            correlation_id,
            response,
        });
    }
}

fn is_administrator(users: &Users, user: &str) -> bool {
    users
        .tags(user)
        .is_some_and(|tags| tags.contains(&Tag::Administrator))
}

fn not_an_administrator(user: &str, anonymous: bool) -> Response {
    let message = match anonymous {
        true => "an ANONYMOUS login may not administer the broker".to_owned(),
        false => {
            format!("user '{user}' may not administer the broker (it needs the administrator tag)")
        }
    };
    Response::Error {
        code: ErrorCode::AccessRefused,
        message,
    }
}

fn parse_tags(tags: &[String]) -> Result<Vec<Tag>, AuthError> {
    tags.iter().map(|tag| tag.parse()).collect()
}

fn error_response(err: AuthError) -> Response {
    let code = match &err {
        AuthError::NoSuchUser(_) | AuthError::NoSuchVhost(_) => ErrorCode::NotFound,
        AuthError::UserExists(_) => ErrorCode::PreconditionFailed,
        AuthError::Invalid(_) => ErrorCode::InvalidArgument,
        AuthError::TooMany => ErrorCode::ResourceLimit,
        _ => ErrorCode::Internal,
    };
    Response::Error {
        code,
        message: err.to_string(),
    }
}

/// Applies one administration request for `caller` (blocking: may run the KDF, rewrites
/// the users file, waits for the log). The caller's tags are looked up afresh: a demoted
/// administrator can do nothing more from its next request.
fn handle(shared: &Context, caller: &str, request: Request) -> Response {
    let users = &shared.users;
    if !is_administrator(users, caller) {
        return not_an_administrator(caller, false);
    }
    // A check that a virtual host exists and the change relying on it are never split by
    // another administrator's delete (or add) of that virtual host.
    let _vhosts = matches!(
        request,
        Request::SetPermissions(_)
            | Request::SetTopicPermissions(_)
            | Request::AddVhost { .. }
            | Request::DeleteVhost { .. }
            | Request::SetVhostLimits { .. }
    )
    .then(|| {
        shared
            .vhost_admin
            .lock()
            .expect("vhost administration lock")
    });
    let vhost_exists = |vhost: &str| -> Result<(), Response> {
        match shared.lock().broker.has_vhost(vhost) {
            true => Ok(()),
            false => Err(no_such_vhost(vhost)),
        }
    };
    let done =
        |result: Result<(), AuthError>| result.map_or_else(error_response, |()| Response::Done);
    match request {
        Request::AddUser {
            name,
            password,
            tags,
        } => done(parse_tags(&tags).and_then(|tags| users.add(&name, &password.0, &tags))),
        Request::DeleteUser { name } => done(users.delete(&name)),
        Request::ChangePassword { name, password } => done(users.set_password(&name, &password.0)),
        Request::SetUserTags { name, tags } => {
            done(parse_tags(&tags).and_then(|tags| users.set_tags(&name, &tags)))
        }
        Request::ListUsers => Response::Users(
            users
                .list()
                .into_iter()
                .map(|(name, tags)| UserInfo {
                    name,
                    tags: tags.iter().map(Tag::to_string).collect(),
                })
                .collect(),
        ),
        Request::SetPermissions(info) if let Err(response) = vhost_exists(&info.vhost) => response,
        Request::SetTopicPermissions(info) if let Err(response) = vhost_exists(&info.vhost) => {
            response
        }
        Request::SetPermissions(info) => done(users.set_permissions(
            &info.user,
            &info.vhost,
            Permission {
                configure: info.configure,
                write: info.write,
                read: info.read,
            },
        )),
        Request::ClearPermissions { user, vhost } => done(users.clear_permissions(&user, &vhost)),
        Request::ListPermissions { vhost } => Response::Permissions(users.permissions_in(&vhost)),
        Request::SetTopicPermissions(info) => done(users.set_topic_permissions(
            &info.user,
            &info.vhost,
            &info.exchange,
            TopicPermission {
                write: info.write,
                read: info.read,
            },
        )),
        Request::ClearTopicPermissions {
            user,
            vhost,
            exchange,
        } => done(users.clear_topic_permissions(&user, &vhost, exchange.as_deref())),
        Request::ListTopicPermissions { vhost } => {
            Response::TopicPermissions(users.topic_permissions_in(&vhost))
        }
        Request::AddVhost { name, limits } => {
            if shared.lock().broker.has_vhost(&name) {
                return Response::Error {
                    code: ErrorCode::PreconditionFailed,
                    message: format!("vhost '{name}' already exists"),
                };
            }
            apply_logged(
                shared,
                Command::AddVhost {
                    name,
                    limits: core_limits(limits),
                },
            )
        }
        Request::SetVhostLimits { name, limits } => apply_logged(
            shared,
            Command::SetVhostLimits {
                name,
                limits: core_limits(limits),
            },
        ),
        Request::DeleteVhost { name } => {
            if name == wharf_core::DEFAULT_VHOST {
                return Response::Error {
                    code: ErrorCode::AccessRefused,
                    message: "the default virtual host '/' cannot be deleted".to_owned(),
                };
            }
            if let Err(response) = vhost_exists(&name) {
                return response;
            }
            // Its permissions go first: the connections open in it lose their access and are
            // closed at their next frame (as RabbitMQ closes them), and a crash between the two
            // steps leaves a virtual host nobody may enter, never permissions that would apply
            // to a new virtual host of the same name.
            if let Err(err) = users.clear_vhost(&name) {
                return error_response(err);
            }
            apply_logged(shared, Command::DeleteVhost { name })
        }
        Request::ListVhosts => Response::Vhosts(
            shared
                .lock()
                .broker
                .list_vhosts()
                .into_iter()
                .map(|info| VhostInfo {
                    name: info.name,
                    limits: VhostLimits {
                        max_connections: info.limits.max_connections,
                        max_queues: info.limits.max_queues,
                    },
                    connections: info.connections,
                    queues: info.queues,
                })
                .collect(),
        ),
        Request::SetUserLimits { user, limits } => done(users.set_limits(&user, limits.into())),
        Request::ListUserLimits => Response::UserLimits(users.limits_info()),
        other => unreachable!("not an administration request: {other:?}"),
    }
}

fn core_limits(limits: VhostLimits) -> wharf_core::VhostLimits {
    wharf_core::VhostLimits {
        max_connections: limits.max_connections,
        max_queues: limits.max_queues,
    }
}

fn no_such_vhost(vhost: &str) -> Response {
    Response::Error {
        code: ErrorCode::NotFound,
        message: format!("vhost '{vhost}' not found"),
    }
}

/// Applies a topology command through the command batch and answers once its log record is
/// on disk (what a virtual host change must be before it is acknowledged).
fn apply_logged(shared: &Context, command: Command) -> Response {
    let (sender, receiver) = std::sync::mpsc::channel();
    let mut batch = shared.batch();
    let applied = batch.apply(now_ms(), command);
    if applied.is_ok() {
        batch.on_durable(
            Box::new(move |outcome| {
                let _ = sender.send(outcome);
            }),
            true,
        );
    }
    if let Some(leader) = batch.finish().flush(None) {
        leader.commit();
    }
    if let Err(err) = applied {
        return Response::Error {
            code: error_code(&err),
            message: err.to_string(),
        };
    }
    match receiver.recv() {
        Ok(Ok(_)) => Response::Done,
        Ok(Err(err)) => Response::Error {
            code: ErrorCode::Internal,
            message: format!("the change could not be logged: {err}"),
        },
        Err(_) => Response::Error {
            code: ErrorCode::Internal,
            message: "the change's log record was dropped".to_owned(),
        },
    }
}
