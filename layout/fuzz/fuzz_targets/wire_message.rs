#![no_main]
//! Message::decode on arbitrary bytes: never panics, and whatever decodes re-encodes to
//! the same bytes.
use libfuzzer_sys::fuzz_target;
use pmgas_layout::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
