//! The client side of users' own limits (protocol 1.3) against a scripted peer: the requests
//! sent, the answers read, and what is refused locally with a server older than 1.3.

mod support;

use support::{Peer, quiet_limits, within};
use wharf_client::{Client, ClientError, ErrorCode, UserLimits, UserLimitsInfo};
use wharf_protocol::{MINOR_ADMIN, MINOR_VHOSTS, Request, Response};

#[tokio::test]
async fn user_limits_administration_sends_its_requests_and_reads_the_answers() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (mut conn, _) = peer.accept_minor(quiet_limits(), MINOR_VHOSTS).await;
    let client = within(connecting).await.unwrap().unwrap();
    let limits = UserLimits {
        max_connections: Some(2),
        max_queues: Some(10),
    };

    let setting = {
        let client = client.clone();
        tokio::spawn(async move { client.set_user_limits("alice", limits).await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(
        request,
        Request::SetUserLimits {
            user: "alice".into(),
            limits
        }
    );
    conn.respond(correlation_id, Response::Done).await;
    within(setting).await.unwrap().unwrap();

    let unknown = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .set_user_limits("nobody", UserLimits::default())
                .await
        })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(
        request,
        Request::SetUserLimits {
            user: "nobody".into(),
            limits: UserLimits::default()
        }
    );
    conn.respond(
        correlation_id,
        Response::Error {
            code: ErrorCode::NotFound,
            message: "user 'nobody' not found".into(),
        },
    )
    .await;
    let err = within(unknown).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");

    let listing = {
        let client = client.clone();
        tokio::spawn(async move { client.list_user_limits().await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::ListUserLimits);
    let users = vec![
        UserLimitsInfo {
            user: "alice".into(),
            limits,
        },
        UserLimitsInfo {
            user: "guest".into(),
            limits: UserLimits::default(),
        },
    ];
    conn.respond(correlation_id, Response::UserLimits(users.clone()))
        .await;
    assert_eq!(within(listing).await.unwrap().unwrap(), users);

    // A non-administrator's refusal comes back as the server's error.
    let refused = {
        let client = client.clone();
        tokio::spawn(async move { client.list_user_limits().await })
    };
    let (correlation_id, _) = conn.recv_request().await;
    conn.respond(
        correlation_id,
        Response::Error {
            code: ErrorCode::AccessRefused,
            message: "user 'bob' may not administer the broker".into(),
        },
    )
    .await;
    let err = within(refused).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");

    // Another answer than the request's is an error, not a panic or an empty list.
    let confused = {
        let client = client.clone();
        tokio::spawn(async move { client.list_user_limits().await })
    };
    let (correlation_id, _) = conn.recv_request().await;
    conn.respond(correlation_id, Response::Done).await;
    let result = within(confused).await.unwrap();
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn user_limits_are_refused_locally_by_a_server_older_than_1_3() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (_conn, _) = peer.accept_minor(quiet_limits(), MINOR_ADMIN).await;
    let client = within(connecting).await.unwrap().unwrap();
    match client.list_user_limits().await {
        Err(ClientError::NotSupported {
            feature: "list_user_limits",
            minor_required: MINOR_VHOSTS,
            server_minor: MINOR_ADMIN,
        }) => {}
        other => panic!("expected NotSupported, got {other:?}"),
    }
    match client.set_user_limits("alice", UserLimits::default()).await {
        Err(ClientError::NotSupported {
            feature: "set_user_limits",
            minor_required: MINOR_VHOSTS,
            server_minor: MINOR_ADMIN,
        }) => {}
        other => panic!("expected NotSupported, got {other:?}"),
    }
}
