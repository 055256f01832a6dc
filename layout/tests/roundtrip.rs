//! Round-trip property tests: everything the encoders produce decodes to the same value,
//! and decoders never panic on arbitrary bytes.

use pmgas_layout::PageId;
use pmgas_layout::ids::{ClusterId, Epoch, NodeId, PageIndex};
use pmgas_layout::pool::{ArtRecord, PageState, PoolHeader};
use pmgas_layout::wire::{
    Body, ErrorCode, Join, MAX_RECONCILE_ENTRIES, MAX_REPLICAS, Message, Replica,
};
use proptest::prelude::*;

fn replicas() -> impl Strategy<Value = Vec<Replica>> {
    proptest::collection::btree_map(any::<u32>(), any::<u32>(), 1..=MAX_REPLICAS).prop_map(|m| {
        m.into_iter()
            .map(|(n, p)| Replica {
                node: NodeId(n),
                page: PageIndex(p),
            })
            .collect()
    })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=10).prop_map(|c| ErrorCode::from_code(c).expect("codes 1..=10 exist"))
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u32>()
        )
            .prop_flat_map(|(c, ps, pc, ra, rl, rk, ip, port, art)| {
                (0..=pc).prop_map(move |free| {
                    Body::Join(Join {
                        cluster_id: ClusterId(c),
                        page_size_bytes: ps,
                        page_count: pc,
                        free_pages: free,
                        region_addr: ra,
                        region_len: rl,
                        rkey: rk,
                        cm_ip: ip,
                        cm_port: port,
                        art_rkey: art,
                    })
                })
            }),
        any::<u32>().prop_map(|n| Body::JoinAck { live_nodes: n }),
        (any::<u32>(), 0u8..(MAX_REPLICAS as u8)).prop_map(|(p, b)| Body::AllocPage {
            primary_page: PageIndex(p),
            backups_wanted: b
        }),
        any::<u64>().prop_map(|t| Body::Prepare { txn_id: t }),
        (any::<u64>(), any::<u32>()).prop_map(|(t, p)| Body::Prepared {
            txn_id: t,
            page: PageIndex(p)
        }),
        (any::<u64>(), any::<u32>(), replicas()).prop_map(|(t, id, r)| Body::Commit {
            txn_id: t,
            page_id: PageId(id),
            replicas: r
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(t, id)| Body::CommitAck {
            txn_id: t,
            page_id: PageId(id)
        }),
        any::<u64>().prop_map(|t| Body::Abort { txn_id: t }),
        any::<u64>().prop_map(|t| Body::AbortAck { txn_id: t }),
        any::<u32>().prop_map(|id| Body::MappingLookup {
            page_id: PageId(id)
        }),
        (any::<u32>(), replicas()).prop_map(|(id, r)| Body::Mapping {
            page_id: PageId(id),
            replicas: r
        }),
        (error_code(), "\\PC{0,60}").prop_map(|(code, detail)| Body::Error { code, detail }),
        (
            any::<bool>(),
            proptest::collection::btree_map(any::<u32>(), 1u32.., 0..=MAX_RECONCILE_ENTRIES)
        )
            .prop_map(|(last, m)| Body::Reconcile {
                last,
                entries: m
                    .into_iter()
                    .map(|(p, id)| (PageIndex(p), PageId(id)))
                    .collect(),
            }),
        any::<[u32; 4]>().prop_map(|[c, f, u, x]| Body::Reconciled {
            committed: c,
            freed: f,
            unknown_allocated: u,
            conflicting: x,
        }),
        any::<u32>().prop_map(|n| Body::EpochChanged {
            dead_node: NodeId(n)
        }),
        any::<u64>().prop_map(|seq| Body::Heartbeat { seq }),
    ]
}

proptest! {
    #[test]
    fn messages_round_trip(epoch in any::<u64>(), sender in any::<u32>(), id in any::<u64>(), body in body()) {
        let m = Message::new(Epoch(epoch), NodeId(sender), id, body);
        let bytes = m.encode();
        prop_assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn message_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(m) = Message::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }

    #[test]
    fn art_records_round_trip(seq in 0u64..u64::MAX, state in 0u8..3, page_id in any::<u32>(), epoch in any::<u64>(), index in any::<u32>()) {
        let cur = ArtRecord { seq, state: PageState::Free, page_id: PageId(0), epoch: Epoch(0) };
        let state = PageState::from_code(state).unwrap();
        let (slot, next) = cur.successor(state, PageId(page_id), Epoch(epoch));
        let mut entry = [0u8; 64];
        entry[(1 - slot) * 32..(1 - slot) * 32 + 32].copy_from_slice(zerocopy::IntoBytes::as_bytes(&cur.encode(PageIndex(index))));
        entry[slot * 32..slot * 32 + 32].copy_from_slice(zerocopy::IntoBytes::as_bytes(&next.encode(PageIndex(index))));
        prop_assert_eq!(ArtRecord::decode_entry(&entry, PageIndex(index)).unwrap(), next);
    }

    #[test]
    fn pool_headers_round_trip(cluster in any::<u64>(), node in any::<u32>(), shift in 12u32..=32, pages in 1u64..100_000) {
        let page = 1u64 << shift;
        let bytes = 4096 + pages * (page + 64) + (2 << 20);
        if let Ok(h) = PoolHeader::plan(ClusterId(cluster), NodeId(node), page, bytes) {
            prop_assert_eq!(PoolHeader::decode(zerocopy::IntoBytes::as_bytes(&h.encode())).unwrap(), h);
        }
    }

    #[test]
    fn pool_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), index in any::<u32>()) {
        let _ = PoolHeader::decode(&bytes);
        let _ = ArtRecord::decode_entry(&bytes, PageIndex(index));
    }
}
