use super::*;

#[test]
fn urls_escape_ids_and_keep_the_base_path() {
    let client = Client::new("http://127.0.0.1:9/prefix", "k").unwrap();
    assert_eq!(
        client.url("v1/sessions", &["sess_1", "end"]).as_str(),
        "http://127.0.0.1:9/prefix/v1/sessions/sess_1/end"
    );
    assert_eq!(
        client.url("v1/sessions", &["../x?y"]).as_str(),
        "http://127.0.0.1:9/prefix/v1/sessions/..%2Fx%3Fy"
    );
    assert_eq!(
        client.websocket_url("sess_1", "t+k"),
        "ws://127.0.0.1:9/prefix/v1/sessions/sess_1/ws?token=t%2Bk"
    );
    for bad in ["ftp://x", "not a url", "mailto:a@b"] {
        assert!(matches!(
            Client::new(bad, "k"),
            Err(Error::InvalidBaseUrl(_))
        ));
    }
    assert!(matches!(
        Client::new("http://x", "bad\nkey"),
        Err(Error::InvalidApiKey)
    ));
    for id in ["", ".", ".."] {
        assert!(matches!(
            client.session_url(id, &["end"]),
            Err(Error::InvalidArgument { .. })
        ));
    }
}

/// Every row of the contract's error table (CONTRACT.md), and the codes the service
/// added since, is a code of the enum with the table's status.
#[test]
fn every_contract_error_code_is_known_with_its_status() {
    let contract = [
        ("unauthorized", 401),
        ("invalid_session_id", 400),
        ("session_not_found", 404),
        ("invalid_request", 400),
        ("payload_too_large", 413),
        ("plan_limit_reached", 429),
        ("capacity_exhausted", 503),
        ("storage_unavailable", 503),
    ];
    for (name, status) in contract {
        let code = ErrorCode::from_name(name).expect(name);
        assert_eq!(code.http_status(), status, "{name}");
    }
    for code in ErrorCode::ALL {
        let body = format!(
            r#"{{"success":false,"error":{{"code":"{code}","message":"m","request_id":"r"}}}}"#
        );
        let error = answer_error(code.http_status(), None, body.as_bytes());
        assert_eq!(error.code(), Some(code));
    }
    let unknown = answer_error(
        418,
        None,
        br#"{"success":false,"error":{"code":"teapot","message":"m","request_id":"r"}}"#,
    );
    assert!(matches!(
        unknown,
        Error::UnexpectedAnswer { status: 418, .. }
    ));
}

/// Answers every connection with one `200` carrying `body`, as a newer server would.
async fn newer_server(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0u8; 8192];
            let _ = socket.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    url
}

fn session_json(end_reason: &str) -> String {
    format!(
        r#"{{"success":true,"session":{{"session_id":"sess_01H3Z8G9YR3K2N5M6P7Q8W4T","status":"ended","started_at":"2024-01-15T10:30:00Z","ended_at":"2024-01-15T10:35:00Z","end_reason":"{end_reason}","ready_at":null,"expires_at":"2024-01-15T11:30:00Z","last_seen_at":"2024-01-15T10:34:10Z","room":null,"metadata":null,"timeouts":{{"participant_left_timeout_ms":30000,"participant_absent_timeout_ms":null,"websocket_grace_ms":15000}}}}}}"#
    )
}

/// A reason a newer server added reads as `Other` with its name; known ones read as
/// themselves, and `Other` is written back as the same name.
#[tokio::test(flavor = "current_thread")]
async fn an_unknown_end_reason_from_a_newer_server_is_other() {
    let url = newer_server(session_json("credits_exhausted")).await;
    let client = Client::new(&url, "k").unwrap();
    let session = client
        .get_session("sess_01H3Z8G9YR3K2N5M6P7Q8W4T")
        .await
        .expect("a newer server's answer parses");
    assert_eq!(
        session.end_reason,
        Some(EndReasonView::Other("credits_exhausted".to_owned()))
    );
    assert_eq!(
        serde_json::to_value(&session.end_reason).unwrap(),
        serde_json::json!("credits_exhausted")
    );

    let url = newer_server(session_json("node_lost")).await;
    let session = Client::new(&url, "k")
        .unwrap()
        .get_session("sess_01H3Z8G9YR3K2N5M6P7Q8W4T")
        .await
        .unwrap();
    assert_eq!(session.end_reason, Some(EndReasonView::NodeLost));
}

/// Every end reason the core knows has a named variant (none reads as `Other`), and an
/// event type a newer server added reads as `Other`.
#[test]
fn known_names_are_never_other_and_new_event_types_are() {
    use session_lifecycle_api::events::EventType;
    let reasons = EndReasonView::known_names();
    assert_eq!(reasons.len(), 10);
    for name in &reasons {
        let parsed: EndReasonView = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert!(!matches!(parsed, EndReasonView::Other(_)), "{name}");
    }
    for name in EventType::known_names() {
        let parsed: EventType = serde_json::from_value(serde_json::json!(name)).unwrap();
        assert!(!matches!(parsed, EventType::Other(_)), "{name}");
    }
    let parsed: EventType = serde_json::from_str(r#""session.paused""#).unwrap();
    assert_eq!(parsed, EventType::Other("session.paused".to_owned()));
}
