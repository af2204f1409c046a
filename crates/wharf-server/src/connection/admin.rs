//! Administration over the protocol (1.2): users and permissions, for users with the
//! `administrator` tag (docs/security.md "Managing users").
//!
//! These requests never run under the broker lock: adding a user or changing a password runs
//! the KDF (tens of milliseconds) and every change rewrites and fsyncs the users file. A
//! connection's administration requests go, in order, to a task of their own, which runs each
//! on a blocking thread (bounded by the KDF semaphore) and queues its response; the client
//! matches responses by correlation id, so they may overtake the connection's other answers.

use super::*;
use crate::auth::{AuthError, Permission, Tag, TopicPermission, Users};
use tokio::sync::mpsc;
use wharf_protocol::UserInfo;

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
        shared: &Context,
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
                shared.users.clone(),
                shared.kdf.clone(),
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
    users: Arc<Users>,
    kdf: Arc<tokio::sync::Semaphore>,
    caller: String,
    outbox: Arc<Output>,
    mut requests: mpsc::Receiver<(u64, Request)>,
) {
    while let Some((correlation_id, request)) = requests.recv().await {
        // Only a password to hash takes one of the KDF's permits (logins wait for them too).
        let permit = match request {
            Request::AddUser { .. } | Request::ChangePassword { .. } => Some(
                kdf.clone()
                    .acquire_owned()
                    .await
                    .expect("the KDF semaphore is never closed"),
            ),
            _ => None,
        };
        let (users, caller) = (users.clone(), caller.clone());
        let response = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            handle(&users, &caller, request)
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

/// Applies one administration request for `caller` (blocking: may run the KDF and rewrites
/// the users file). The caller's tags are looked up afresh: a demoted administrator can do
/// nothing more from its next request.
fn handle(users: &Users, caller: &str, request: Request) -> Response {
    if !is_administrator(users, caller) {
        return not_an_administrator(caller, false);
    }
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
        other => unreachable!("not an administration request: {other:?}"),
    }
}
