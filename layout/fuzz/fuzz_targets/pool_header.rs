#![no_main]
//! PoolHeader::decode on arbitrary bytes: never panics; a header that decodes re-encodes
//! to the same 128 bytes.
use libfuzzer_sys::fuzz_target;
use pmgas_layout::PoolHeader;
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = PoolHeader::decode(data) {
        assert_eq!(h.encode().as_bytes(), &data[..128]);
    }
});
