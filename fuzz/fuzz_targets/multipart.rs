//! Multipart form bodies (uploads, OpenAI edits). The input is the Content-Type header,
//! a newline, then the body: parts or a clear error, never a panic.
#![no_main]

use bytes::Bytes;
use imagegen_runtime::server::media::{parse_multipart, MAX_PARTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => ("multipart/form-data; boundary=x".to_string(), data),
    };
    let body = Bytes::copy_from_slice(body);
    let len = body.len();
    if let Ok(parts) = futures_executor::block_on(parse_multipart(&content_type, body)) {
        assert!(parts.len() <= MAX_PARTS);
        assert!(parts.iter().map(|p| p.data.len()).sum::<usize>() <= len);
    }
});
