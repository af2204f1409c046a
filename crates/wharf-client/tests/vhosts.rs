//! The client side of virtual hosts (protocol 1.3) against a scripted peer: the virtual host
//! named in `Hello` (from the address or the options), what is refused locally with a server
//! older than 1.3, and the administration requests on virtual hosts.

mod support;

use support::{Peer, quiet_limits, within};
use wharf_client::{Client, ClientError, ClientOptions, ErrorCode, VhostInfo, VhostLimits};
use wharf_protocol::{Close, Frame, MINOR_ADMIN, MINOR_VHOSTS, Preamble, Request, Response};

/// The peer's URL with `path` appended (`/staging`, `/%2Fstaging`, ...).
fn url_with_path(peer: &Peer, path: &str) -> String {
    format!("{}{path}", peer.url())
}

#[tokio::test]
async fn hello_names_the_addresss_vhost_percent_decoded() {
    for (path, vhost) in [
        ("", "/"),
        ("/", "/"),
        ("/staging", "staging"),
        ("/%2Fa", "/a"),
    ] {
        let peer = Peer::bind().await;
        let url = url_with_path(&peer, path);
        let connecting = tokio::spawn(async move { Client::connect(&url).await });
        let (_conn, hello) = peer.accept_minor(quiet_limits(), MINOR_VHOSTS).await;
        assert_eq!(hello.vhost, vhost, "{path}");
        within(connecting).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn the_options_vhost_overrides_the_addresss() {
    let peer = Peer::bind().await;
    let url = url_with_path(&peer, "/staging");
    let options = ClientOptions {
        vhost: Some("production".into()),
        ..ClientOptions::default()
    };
    let connecting = tokio::spawn(async move { Client::connect_with(&url, options).await });
    let (_conn, hello) = peer.accept_minor(quiet_limits(), MINOR_VHOSTS).await;
    assert_eq!(hello.vhost, "production");
    within(connecting).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_vhost_other_than_the_default_is_refused_before_hello_by_a_server_older_than_1_3() {
    let peer = Peer::bind().await;
    let url = url_with_path(&peer, "/staging");
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let mut conn = peer
        .accept_with_preamble(Preamble {
            major: 1,
            minor: MINOR_ADMIN,
        })
        .await;
    // No `Hello` (which the old server would refuse as malformed): the client hangs up.
    assert_eq!(conn.recv_or_eof().await, None);
    match within(connecting).await.unwrap() {
        Err(ClientError::NotSupported {
            minor_required: MINOR_VHOSTS,
            server_minor: MINOR_ADMIN,
            ..
        }) => {}
        other => panic!("expected NotSupported, got {other:?}"),
    }
}

#[tokio::test]
async fn the_default_vhost_still_connects_to_a_server_older_than_1_3() {
    let peer = Peer::bind().await;
    let url = url_with_path(&peer, "/");
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (_conn, hello) = peer.accept_minor(quiet_limits(), MINOR_ADMIN).await;
    assert_eq!(hello.vhost, "/");
    let client = within(connecting).await.unwrap().unwrap();
    // Administration of virtual hosts is refused locally, nothing sent.
    match client.list_vhosts().await {
        Err(ClientError::NotSupported {
            feature: "list_vhosts",
            minor_required: MINOR_VHOSTS,
            server_minor: MINOR_ADMIN,
        }) => {}
        other => panic!("expected NotSupported, got {other:?}"),
    }
    for result in [
        client.add_vhost("a", VhostLimits::default()).await,
        client.delete_vhost("a").await,
        client.set_vhost_limits("a", VhostLimits::default()).await,
    ] {
        assert!(
            matches!(result, Err(ClientError::NotSupported { .. })),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn an_invalid_vhost_in_the_options_is_refused_before_connecting() {
    let options = ClientOptions {
        vhost: Some(String::new()),
        ..ClientOptions::default()
    };
    // Port 9 on loopback: nothing is reached, the check comes first.
    let result = Client::connect_with("wharf://127.0.0.1:9", options).await;
    assert!(
        matches!(
            result,
            Err(ClientError::InvalidArgument { what: "vhost", .. })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_unknown_vhost_is_refused_at_login_with_access_refused() {
    let peer = Peer::bind().await;
    let url = url_with_path(&peer, "/nowhere");
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let mut conn = peer
        .accept_with_preamble(Preamble {
            major: 1,
            minor: MINOR_VHOSTS,
        })
        .await;
    let Frame::Hello(hello) = conn.recv().await else {
        panic!("expected Hello")
    };
    assert_eq!(hello.vhost, "nowhere");
    conn.send(&Frame::Close(Close {
        code: ErrorCode::AccessRefused,
        reason: "vhost 'nowhere' not found".into(),
    }))
    .await;
    let err = within(connecting).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused), "{err:?}");
}

#[tokio::test]
async fn vhost_administration_sends_its_requests_and_reads_the_answers() {
    let peer = Peer::bind().await;
    let url = peer.url();
    let connecting = tokio::spawn(async move { Client::connect(&url).await });
    let (mut conn, _) = peer.accept_minor(quiet_limits(), MINOR_VHOSTS).await;
    let client = within(connecting).await.unwrap().unwrap();
    let limits = VhostLimits {
        max_connections: Some(10),
        max_queues: None,
    };

    let adding = {
        let client = client.clone();
        tokio::spawn(async move { client.add_vhost("staging", limits).await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(
        request,
        Request::AddVhost {
            name: "staging".into(),
            limits
        }
    );
    conn.respond(correlation_id, Response::Done).await;
    within(adding).await.unwrap().unwrap();

    let limiting = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .set_vhost_limits("staging", VhostLimits::default())
                .await
        })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(
        request,
        Request::SetVhostLimits {
            name: "staging".into(),
            limits: VhostLimits::default()
        }
    );
    conn.respond(
        correlation_id,
        Response::Error {
            code: ErrorCode::NotFound,
            message: "vhost 'staging' not found".into(),
        },
    )
    .await;
    let err = within(limiting).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    let listing = {
        let client = client.clone();
        tokio::spawn(async move { client.list_vhosts().await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(request, Request::ListVhosts);
    let vhosts = vec![VhostInfo {
        name: "/".into(),
        limits: VhostLimits::default(),
        connections: 1,
        queues: 3,
    }];
    conn.respond(correlation_id, Response::Vhosts(vhosts.clone()))
        .await;
    assert_eq!(within(listing).await.unwrap().unwrap(), vhosts);

    let deleting = {
        let client = client.clone();
        tokio::spawn(async move { client.delete_vhost("staging").await })
    };
    let (correlation_id, request) = conn.recv_request().await;
    assert_eq!(
        request,
        Request::DeleteVhost {
            name: "staging".into()
        }
    );
    conn.respond(correlation_id, Response::Done).await;
    within(deleting).await.unwrap().unwrap();
}
