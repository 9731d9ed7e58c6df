//! The LiveKit and Daily webhook verifiers on arbitrary headers and bodies: never a panic,
//! and never accepted without the secret (the fuzzer does not know it).
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use session_lifecycle::Timestamp;
use session_lifecycle_http::webhooks::{
    DailySecret, LivekitKey, parse_daily, parse_livekit, verify_daily, verify_livekit,
};

#[derive(Arbitrary, Debug)]
struct Delivery<'a> {
    authorization: Option<&'a str>,
    signature: Option<&'a str>,
    timestamp: Option<&'a str>,
    body: &'a [u8],
    now_secs: u32,
}

fuzz_target!(|d: Delivery<'_>| {
    let now = Timestamp::from_millis(u64::from(d.now_secs) * 1000);
    let keys = [LivekitKey {
        tenant: None,
        api_key: "lk-key".to_owned(),
        api_secret: "a secret the fuzzer never sees 8f2b".to_owned(),
    }];
    let secrets = [DailySecret {
        tenant: None,
        secret: "c2VjcmV0IHRoZSBmdXp6ZXIgbmV2ZXIgc2Vlcw==".to_owned(),
    }];
    let tolerance = Duration::from_secs(300);
    assert!(verify_livekit(&keys, d.authorization, d.body, now, tolerance).is_err());
    assert!(verify_daily(&secrets, d.signature, d.timestamp, d.body, now, tolerance).is_err());
    // The parsers run only on verified bodies, but must not panic on anything either.
    let _ = parse_livekit(d.body);
    let _ = parse_daily(d.body);
});
