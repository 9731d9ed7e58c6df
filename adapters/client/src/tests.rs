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
