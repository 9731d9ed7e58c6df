//! The client against a real `sessiond`: every call of a session's life, the contract's
//! error codes as the service answers them, the event stream with a client token, and the
//! overview for an operator and a tenant.

use std::time::Duration;

use session_lifecycle_client::test_server::TestServer;
use session_lifecycle_client::{
    Client, CreateRequest, Error, ErrorCode, EventType, EventsQuery, HealthStatus, ListDeliveries,
    ListSessions, StatusView,
};

fn code_of<T: std::fmt::Debug>(result: Result<T, Error>) -> (ErrorCode, u16) {
    match result {
        Err(Error::Api { code, status, .. }) => (code, status),
        other => panic!("not an API error: {other:?}"),
    }
}

#[tokio::test]
async fn calls_answer_typed_views_and_the_contract_errors_come_back_as_codes() {
    let server = TestServer::start_with(&["--max-concurrent-sessions", "2"]).unwrap();
    let client = Client::new(server.url(), server.api_key()).unwrap();

    let created = client
        .create_session(&CreateRequest::default())
        .await
        .unwrap();
    let id = created.session.session_id.clone();
    assert_eq!(client.get_session(&id).await.unwrap().session_id, id);
    assert_eq!(
        client.heartbeat(&id).await.unwrap().status,
        StatusView::Started
    );
    let page = client
        .list_sessions(&ListSessions {
            status: Some(StatusView::Started),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1);

    // The contract's table, row by row (capacity and storage need a GPU and an outage:
    // the service's own tests provoke those).
    let stranger = Client::new(server.url(), "sk_unknown").unwrap();
    assert_eq!(
        code_of(stranger.get_session(&id).await),
        (ErrorCode::Unauthorized, 401)
    );
    assert_eq!(
        code_of(client.get_session("session-1").await),
        (ErrorCode::InvalidSessionId, 400)
    );
    assert_eq!(
        code_of(client.get_session("sess_0000").await),
        (ErrorCode::SessionNotFound, 404)
    );
    let zero = CreateRequest {
        duration_secs: Some(0),
        ..Default::default()
    };
    assert_eq!(
        code_of(client.create_session(&zero).await),
        (ErrorCode::InvalidRequest, 400)
    );
    let mut big = serde_json::Map::new();
    big.insert("blob".into(), "x".repeat(64 * 1024).into());
    let huge = CreateRequest {
        metadata: Some(big),
        ..Default::default()
    };
    assert_eq!(
        code_of(client.create_session(&huge).await),
        (ErrorCode::PayloadTooLarge, 413)
    );
    client
        .create_session(&CreateRequest::default())
        .await
        .unwrap();
    let limited = client.create_session(&CreateRequest::default()).await;
    assert_eq!(code_of(limited), (ErrorCode::PlanLimitReached, 429));

    // And the service's own.
    let ended = client.end_session(&id).await.unwrap();
    assert_eq!(
        client.end_session(&id).await.unwrap().ended_at,
        ended.ended_at
    );
    assert_eq!(
        code_of(client.heartbeat(&id).await),
        (ErrorCode::SessionEnded, 409)
    );
    assert_eq!(
        code_of(client.retry_delivery(987_654).await),
        (ErrorCode::DeliveryNotFound, 404)
    );
    let short = CreateRequest {
        duration_secs: Some(60),
        ..Default::default()
    };
    client
        .create_session_idempotent(&short, "key-1")
        .await
        .unwrap();
    let reused = client
        .create_session_idempotent(&CreateRequest::default(), "key-1")
        .await;
    assert_eq!(code_of(reused), (ErrorCode::IdempotencyKeyReused, 422));
    assert!(
        client
            .deliveries(&ListDeliveries::default())
            .await
            .unwrap()
            .is_empty(),
        "no endpoints, no deliveries"
    );

    assert_eq!(client.healthz().await.unwrap().status, HealthStatus::Ok);
    assert_eq!(client.readyz().await.unwrap().status, HealthStatus::Ok);
    assert!(
        client
            .metrics()
            .await
            .unwrap()
            .contains("sessiond_sessions_started_total")
    );
    assert!(client.openapi().await.unwrap()["paths"]["/v1/overview"].is_object());
}

#[tokio::test]
async fn a_rate_limited_call_says_when_to_retry() {
    let server =
        TestServer::start_with(&["--requests-per-second", "1", "--request-burst", "1"]).unwrap();
    let client = Client::new(server.url(), server.api_key()).unwrap();
    let mut limited = None;
    for _ in 0..5 {
        if let Err(e) = client.list_sessions(&ListSessions::default()).await {
            limited = Some(e);
            break;
        }
    }
    let limited = limited.expect("a burst of 1 per second is exceeded");
    assert_eq!(limited.code(), Some(ErrorCode::RateLimited));
    assert!(limited.is_retryable());
    assert!(
        limited
            .retry_after()
            .is_some_and(|d| d >= Duration::from_secs(1))
    );
}

#[tokio::test]
async fn a_session_token_follows_its_own_events_and_the_operator_sees_the_nodes() {
    let server = TestServer::start().unwrap();
    let client = Client::new(server.url(), server.api_key()).unwrap();
    let created = client
        .create_session(&CreateRequest::default())
        .await
        .unwrap();
    let id = created.session.session_id.clone();
    // A browser's view: the client token, no API key.
    let browser = Client::new(server.url(), "unused").unwrap();
    let mut events = browser
        .events(&EventsQuery {
            session_id: Some(id.clone()),
            token: Some(created.client_token.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    client.end_session(&id).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("events arrive")
            .expect("the stream stays open")
            .unwrap();
        assert_eq!(event.envelope.data.session_id, id);
        kinds.push(event.envelope.kind);
    }
    assert_eq!(
        kinds,
        [EventType::Started, EventType::Ended, EventType::Released]
    );
    let bad_token = browser
        .events(&EventsQuery {
            session_id: Some(id.clone()),
            token: Some("v1.x.y.z".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(bad_token), (ErrorCode::Unauthorized, 401));

    let tenant_view = client.overview().await.unwrap();
    assert_eq!(tenant_view.tenant.as_deref(), Some("default"));
    assert!(
        tenant_view.nodes.is_none(),
        "a tenant does not see the nodes"
    );
    assert!(
        tenant_view
            .recent_ends
            .iter()
            .any(|p| p.session.session_id == id)
    );
    let operator = Client::new(server.url(), server.operator_key()).unwrap();
    let all = operator.overview().await.unwrap();
    assert_eq!(all.tenant, None);
    assert_eq!(all.nodes.map(|n| n.len()), Some(1));
    assert_eq!(all.ends_by_reason.len(), 12);
}
