//! A session object read from JSON is either refused or a consistent session that
//! serializes back to an equal one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_lifecycle::{Session, Status};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(session) = serde_json::from_slice::<Session>(bytes) {
        assert_eq!(
            session.ended_at().is_some(),
            session.status() == Status::Ended
        );
        assert!(
            session
                .ended_at()
                .is_none_or(|at| at >= session.started_at())
        );
        let json = serde_json::to_vec(&session).unwrap();
        assert_eq!(serde_json::from_slice::<Session>(&json).unwrap(), session);
    }
});
