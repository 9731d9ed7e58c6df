//! Session id parsing is total and strict: any input parses or errors, never panics, and
//! whatever parses prints back as the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_lifecycle::SessionId;

fuzz_target!(|text: &str| {
    if let Ok(id) = SessionId::parse(text) {
        assert_eq!(&*id.as_str(), text);
        assert_eq!(SessionId::parse(&id.to_string()), Ok(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
    }
});
