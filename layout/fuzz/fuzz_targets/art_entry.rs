#![no_main]
//! ArtRecord::decode_entry on arbitrary bytes and page indexes: never panics.
use libfuzzer_sys::fuzz_target;
use pmgas_layout::{ArtRecord, PageIndex};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let index = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    if let Ok(rec) = ArtRecord::decode_entry(&data[4..], PageIndex(index)) {
        assert!(rec.seq > 0 || rec == ArtRecord::FRESH);
    }
});
