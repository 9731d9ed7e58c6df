//! What a client controls in `sessiond`: the create body and the session id path segment.
//! Parsing never panics, and what it accepts is within the documented bounds.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use session_lifecycle_http::input::{
    MAX_GPU_DEVICE, MAX_GPU_MEMORY_MIB, MAX_METADATA_BYTES, MAX_ROOM_NAME, parse_create, session_id,
};

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    CreateBody(&'a [u8]),
    PathSegment(&'a str),
}

fuzz_target!(|input: Input<'_>| match input {
    Input::CreateBody(body) => {
        if let Ok(request) = parse_create(body) {
            if let Some(d) = request.duration_secs {
                assert!((1..=604_800).contains(&d));
            }
            if let Some(room) = &request.room {
                assert!(!room.name.is_empty() && room.name.chars().count() <= MAX_ROOM_NAME);
            }
            if let Some(m) = &request.metadata {
                assert!(serde_json::to_vec(m).unwrap().len() <= MAX_METADATA_BYTES);
            }
            if let Some(mib) = request.gpu_memory_mib {
                assert!((1..=MAX_GPU_MEMORY_MIB).contains(&mib));
            }
            if let Some(device) = request.gpu_device {
                assert!(device <= MAX_GPU_DEVICE);
            }
        }
    }
    Input::PathSegment(text) => {
        if let Ok(id) = session_id(text) {
            assert_eq!(id.to_string(), text);
        }
    }
});
