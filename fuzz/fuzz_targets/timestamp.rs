//! RFC 3339 parsing is total: any input parses or errors, never panics, and what parses
//! formats to text that parses back to the same second.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_lifecycle::Timestamp;

fuzz_target!(|text: &str| {
    if let Ok(t) = Timestamp::parse_rfc3339(text) {
        let mut buf = [0u8; 20];
        let printed = t.format_rfc3339(&mut buf);
        let back = Timestamp::parse_rfc3339(printed).expect("formatted text parses");
        assert_eq!(back.as_secs(), t.as_secs());
    }
});
