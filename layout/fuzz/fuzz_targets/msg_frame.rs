#![no_main]
//! The verbs message layer's frame header and the rdma_cm region descriptor, on arbitrary
//! bytes a peer could send: never panic.
use libfuzzer_sys::fuzz_target;
use pmgas_verbs::RemoteRegion;
use pmgas_verbs::msg::FrameHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FrameHeader::decode(data, 4080) {
        assert_eq!(h.len as usize + pmgas_verbs::msg::HEADER_BYTES, data.len());
    }
    let _ = RemoteRegion::from_bytes(data);
});
