//! The cost of verifying (and parsing) one room webhook, per provider.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench webhooks`

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::Criterion;
use hmac::{Hmac, Mac};
use session_lifecycle::Timestamp;
use session_lifecycle_http::webhooks::{
    DailySecret, LivekitKey, parse_daily, parse_livekit, verify_daily, verify_livekit,
};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_764_300_000;

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let tolerance = Duration::from_secs(300);
    let now = Timestamp::from_millis(NOW * 1000);

    let lk_body = serde_json::json!({
        "event": "participant_left",
        "room": {"sid": "RM_hycBMAjmt6Ub", "name": "standup", "emptyTimeout": 300, "creationTime": "1764299000"},
        "participant": {"sid": "PA_39FqvfTxTkFQ", "identity": "alice", "state": "ACTIVE", "joinedAt": "1764299100"},
        "id": "EV_3ZkSDfRW1pHo",
        "createdAt": NOW.to_string(),
    })
    .to_string()
    .into_bytes();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"iss": "lk-key", "nbf": NOW - 5, "exp": NOW + 600,
                           "sha256": STANDARD.encode(Sha256::digest(&lk_body)), "video": {}})
        .to_string(),
    );
    let signed = format!("{header}.{claims}");
    let token = format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac(b"lk-secret", signed.as_bytes()))
    );
    let keys = [LivekitKey {
        tenant: None,
        api_key: "lk-key".into(),
        api_secret: "lk-secret".into(),
    }];

    let daily_body = serde_json::json!({
        "version": "1.0.0", "type": "participant.left", "id": "ptcpt-left-16168c97-f973-4eae-9642-020fe3fda5db-1708972302",
        "payload": {"room": "standup", "session_id": "16168c97-f973-4eae-9642-020fe3fda5db", "user_id": "u-1",
                    "user_name": "alice", "joined_at": 1708972279.96, "duration": 22.04, "owner": false},
        "event_ts": 1708972302.0,
    })
    .to_string()
    .into_bytes();
    let secret = STANDARD.encode(b"secret-key-for-daily");
    let ts = NOW.to_string();
    let mut signed_daily = ts.clone().into_bytes();
    signed_daily.push(b'.');
    signed_daily.extend_from_slice(&daily_body);
    let sig = STANDARD.encode(mac(b"secret-key-for-daily", &signed_daily));
    let secrets = [DailySecret {
        tenant: None,
        secret,
    }];

    assert!(verify_livekit(&keys, Some(&token), &lk_body, now, tolerance).is_ok());
    assert!(verify_daily(&secrets, Some(&sig), Some(&ts), &daily_body, now, tolerance).is_ok());
    println!(
        "payloads: livekit {} bytes, daily {} bytes",
        lk_body.len(),
        daily_body.len()
    );

    let mut group = c.benchmark_group("webhook");
    group.bench_function("livekit/verify", |b| {
        b.iter(|| {
            verify_livekit(
                &keys,
                Some(black_box(&token)),
                black_box(&lk_body),
                now,
                tolerance,
            )
            .is_ok()
        })
    });
    group.bench_function("livekit/verify_and_parse", |b| {
        b.iter(|| {
            verify_livekit(
                &keys,
                Some(black_box(&token)),
                black_box(&lk_body),
                now,
                tolerance,
            )
            .is_ok()
                && parse_livekit(black_box(&lk_body)).is_ok()
        })
    });
    group.bench_function("daily/verify", |b| {
        b.iter(|| {
            verify_daily(
                &secrets,
                Some(black_box(&sig)),
                Some(&ts),
                black_box(&daily_body),
                now,
                tolerance,
            )
            .is_ok()
        })
    });
    group.bench_function("daily/verify_and_parse", |b| {
        b.iter(|| {
            verify_daily(
                &secrets,
                Some(black_box(&sig)),
                Some(&ts),
                black_box(&daily_body),
                now,
                tolerance,
            )
            .is_ok()
                && parse_daily(black_box(&daily_body)).is_ok()
        })
    });
    group.finish();
    c.final_summary();
}
