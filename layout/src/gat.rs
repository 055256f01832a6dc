//! The global address table (GAT) as stored in ZooKeeper: chunks of mappings
//! `page_id → [replica…]` (primary first), each chunk one znode of at most
//! [`CHUNK_MAX_BYTES`], checksummed so that a torn or foreign znode is detected.
//!
//! A monitor worker writes each group commit as a small delta znode in this encoding and
//! later folds deltas into full chunks (the monitor's `GatWriter`), so adding a mapping
//! never re-serialises older ones. FORMAT.md describes the bytes and the znode series.
//!
//! A freed page leaves a *tombstone*: its mapping again, flagged freed, written in a later
//! znode than the mapping (possibly another worker's series). The page id is never handed
//! out again, and the replicas it names are freed by their nodes (also at reconciliation,
//! for a node that was away). A page given a new replica after a node loss (re-replication,
//! `monitor/REREPLICATION.md`) is stored again live with the next *revision*.
//! [`merge_tombstones`] makes the GAT's view: a page id is stored live at most once per
//! revision and freed at most once; the tombstone wins, then the highest revision.

use crate::PageId;
use crate::ids::{NodeId, PageIndex};
use crate::pool::crc32c;
use crate::wire::{MAX_REPLICAS, Replica};

pub const GAT_MAGIC: [u8; 8] = *b"PMGASGAT";
pub const GAT_VERSION: u16 = 1;
pub const CHUNK_HEADER_BYTES: usize = 24;
/// Chunks stay well below ZooKeeper's ~1 MiB request limit and small enough that the
/// server's in-heap log of recent transactions stays small.
pub const CHUNK_MAX_BYTES: usize = 64 << 10;

/// One committed page: its id and its replicas, primary first; or, with `freed` set, the
/// tombstone of a freed page (the replicas it had, to be freed on their nodes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub page_id: PageId,
    pub replicas: Vec<Replica>,
    pub freed: bool,
    /// 0 as allocated; each re-replication stores the mapping again with the next one.
    pub revision: u16,
}

impl Mapping {
    /// A live mapping.
    pub fn new(page_id: PageId, replicas: Vec<Replica>) -> Self {
        Self {
            page_id,
            replicas,
            freed: false,
            revision: 0,
        }
    }

    /// This mapping's tombstone.
    pub fn tombstone(&self) -> Self {
        Self {
            freed: true,
            ..self.clone()
        }
    }

    pub fn encoded_bytes(&self) -> usize {
        8 + 8 * self.replicas.len()
    }
}

/// Flag bit of a mapping's header: the page was freed (a tombstone).
const FLAG_FREED: u8 = 1;

/// Merges a GAT's mappings, sorted by page id, into its view: where a page id is stored
/// live and as a tombstone, the tombstone stays; of its live revisions, the highest.
/// Returns the page id of the first violation (an id stored twice live in one revision, or
/// twice freed) as an error.
pub fn merge_tombstones(mappings: &mut Vec<Mapping>) -> Result<(), PageId> {
    mappings.sort_unstable_by_key(|m| (m.page_id, m.freed, m.revision));
    if let Some(w) = mappings.windows(2).find(|w| {
        w[0].page_id == w[1].page_id
            && w[0].freed == w[1].freed
            && (w[0].freed || w[0].revision == w[1].revision)
    }) {
        return Err(w[0].page_id);
    }
    // Sorted with `false` first, then by revision: each later one replaces the one before.
    let mut out: Vec<Mapping> = Vec::with_capacity(mappings.len());
    for m in mappings.drain(..) {
        match out.last_mut() {
            Some(last) if last.page_id == m.page_id => *last = m,
            _ => out.push(m),
        }
    }
    *mappings = out;
    Ok(())
}

/// A data server declared dead (`/pmgas/<cluster>/dead/node<N>`): its replicas of every
/// page with an id up to `max_page_id` (the largest id handed out when it was declared)
/// are gone from the GAT, and the first surviving replica of each such page is its
/// primary. Stored as text, `epoch=<E> max_page_id=<P>`; a later declaration of the same
/// node (it rejoined, then died again) replaces it, and its larger `max_page_id` covers
/// the earlier one. Pages allocated after a rejoin (ids above it) keep the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadNode {
    /// The epoch the declaration started.
    pub epoch: crate::Epoch,
    pub max_page_id: u32,
}

impl DeadNode {
    pub fn encode(&self) -> String {
        format!("epoch={} max_page_id={}", self.epoch.0, self.max_page_id)
    }

    pub fn decode(text: &str) -> Result<Self, GatError> {
        let mut epoch = None;
        let mut max = None;
        for field in text.split_whitespace() {
            match field.split_once('=') {
                Some(("epoch", v)) => epoch = v.parse().ok(),
                Some(("max_page_id", v)) => max = v.parse().ok(),
                _ => return corrupt(format!("dead-node record field {field:?}")),
            }
        }
        match (epoch, max) {
            (Some(e), Some(max_page_id)) => Ok(Self {
                epoch: crate::Epoch(e),
                max_page_id,
            }),
            _ => corrupt(format!("dead-node record {text:?}")),
        }
    }
}

/// The dead-node records: how stored mappings become the GAT's current view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadNodes(pub std::collections::BTreeMap<NodeId, DeadNode>);

impl DeadNodes {
    /// Drops the replicas of `m` that died with their node; returns how many.
    pub fn apply(&self, m: &mut Mapping) -> usize {
        self.apply_dropping(m).len()
    }

    /// Drops the replicas of `m` that died with their node and returns them: a node that
    /// comes back still holds them, and is told to free them.
    pub fn apply_dropping(&self, m: &mut Mapping) -> Vec<Replica> {
        if self.0.is_empty() {
            return vec![];
        }
        let page_id = m.page_id;
        let (kept, dropped) = m.replicas.iter().partition(|r| {
            self.0
                .get(&r.node)
                .is_none_or(|d| page_id.0 > d.max_page_id)
        });
        m.replicas = kept;
        dropped
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatError {
    #[error("corrupt GAT chunk: {0}")]
    Corrupt(String),
    #[error("GAT chunk would be {len_bytes} bytes, over the limit of {CHUNK_MAX_BYTES}")]
    TooLarge { len_bytes: usize },
}

fn corrupt<T>(reason: impl Into<String>) -> Result<T, GatError> {
    Err(GatError::Corrupt(reason.into()))
}

/// Encodes a chunk. Header: checksum u32 (CRC32C of bytes 4..), version u16, reserved
/// u16, magic [8], count u32, reserved u32; then per mapping: page_id u32, count u8,
/// flags u8 (bit 0: freed, a tombstone), revision u16, count × (node u32, page u32).
pub fn encode_chunk(mappings: &[Mapping]) -> Result<Vec<u8>, GatError> {
    let len = CHUNK_HEADER_BYTES + mappings.iter().map(Mapping::encoded_bytes).sum::<usize>();
    if len > CHUNK_MAX_BYTES {
        return Err(GatError::TooLarge { len_bytes: len });
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&GAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&GAT_MAGIC);
    out.extend_from_slice(&(mappings.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for m in mappings {
        // A tombstone of a page whose replicas all died has none.
        assert!(
            (m.freed || !m.replicas.is_empty()) && m.replicas.len() <= MAX_REPLICAS,
            "replica count"
        );
        out.extend_from_slice(&m.page_id.0.to_le_bytes());
        out.push(m.replicas.len() as u8);
        out.push(if m.freed { FLAG_FREED } else { 0 });
        out.extend_from_slice(&m.revision.to_le_bytes());
        for r in &m.replicas {
            out.extend_from_slice(&r.node.0.to_le_bytes());
            out.extend_from_slice(&r.page.0.to_le_bytes());
        }
    }
    let sum = crc32c(&out[4..]);
    out[0..4].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Decodes and validates a chunk: checksum, version, magic, exact length, reserved bytes,
/// 1..=8 replicas on distinct nodes per mapping (0..=8 for a tombstone), no page id twice
/// in the chunk except live in different revisions and once freed.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<Mapping>, GatError> {
    if bytes.len() < CHUNK_HEADER_BYTES || bytes.len() > CHUNK_MAX_BYTES {
        return corrupt(format!("{} bytes", bytes.len()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if u32_at(0) != crc32c(&bytes[4..]) {
        return corrupt("checksum mismatch");
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != GAT_VERSION || bytes[6..8] != [0, 0] {
        return corrupt("unsupported version");
    }
    if bytes[8..16] != GAT_MAGIC || u32_at(20) != 0 {
        return corrupt("bad magic or reserved bytes");
    }
    let count = u32_at(16) as usize;
    let mut pos = CHUNK_HEADER_BYTES;
    let mut out = Vec::with_capacity(count.min(bytes.len() / 16));
    // (Sorted once at the end: a million hash-set inserts are most of a GAT reload.)
    let mut ids = Vec::with_capacity(out.capacity());
    for _ in 0..count {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return corrupt("truncated mapping");
        };
        let page_id = PageId(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
        let n = head[4] as usize;
        let freed = head[5] == FLAG_FREED;
        let revision = u16::from_le_bytes([head[6], head[7]]);
        if (n == 0 && !freed) || n > MAX_REPLICAS || head[5] > FLAG_FREED {
            return corrupt(format!(
                "page {}: {n} replicas or reserved bytes set",
                page_id.0
            ));
        }
        // Two tombstones of one page are a violation whatever their revisions.
        ids.push((page_id.0, freed, if freed { 0 } else { revision }));
        pos += 8;
        let Some(body) = bytes.get(pos..pos + 8 * n) else {
            return corrupt("truncated replicas");
        };
        let replicas: Vec<Replica> = body
            .chunks_exact(8)
            .map(|c| Replica {
                node: NodeId(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                page: PageIndex(u32::from_le_bytes([c[4], c[5], c[6], c[7]])),
            })
            .collect();
        // At most MAX_REPLICAS: pairwise beats a hash set allocated per mapping.
        if (1..n).any(|i| replicas[..i].iter().any(|r| r.node == replicas[i].node)) {
            return corrupt(format!("page {}: two replicas on one node", page_id.0));
        }
        pos += 8 * n;
        out.push(Mapping {
            page_id,
            replicas,
            freed,
            revision,
        });
    }
    if pos != bytes.len() {
        return corrupt(format!("{} trailing bytes", bytes.len() - pos));
    }
    ids.sort_unstable();
    if let Some(twice) = ids.windows(2).find(|w| w[0] == w[1]) {
        return corrupt(format!("page {} twice", twice[0].0));
    }
    Ok(out)
}

/// Mappings per full chunk when every mapping has `replicas` replicas.
pub fn chunk_capacity(replicas: usize) -> usize {
    (CHUNK_MAX_BYTES - CHUNK_HEADER_BYTES) / (8 + 8 * replicas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u32, nodes: &[u32]) -> Mapping {
        Mapping::new(
            PageId(id),
            nodes
                .iter()
                .map(|&n| Replica {
                    node: NodeId(n),
                    page: PageIndex(id.wrapping_mul(10).wrapping_add(n)),
                })
                .collect(),
        )
    }

    #[test]
    fn a_later_revision_replaces_the_mapping_and_one_revision_twice_is_corrupt() {
        let r = |node: u32, page: u32| Replica {
            node: NodeId(node),
            page: PageIndex(page),
        };
        let first = Mapping::new(PageId(9), vec![r(1, 0), r(2, 0)]);
        let mut second = Mapping::new(PageId(9), vec![r(2, 0), r(3, 4)]);
        second.revision = 1;
        // Both revisions in one chunk (a compaction of two deltas), in either order.
        let chunk = encode_chunk(&[second.clone(), first.clone()]).unwrap();
        let mut ms = decode_chunk(&chunk).unwrap();
        assert_eq!(ms[0].revision, 1);
        merge_tombstones(&mut ms).unwrap();
        assert_eq!(ms, vec![second.clone()]);
        // The tombstone still wins over every revision.
        let mut ms = vec![second.tombstone(), first.clone(), second.clone()];
        merge_tombstones(&mut ms).unwrap();
        assert_eq!(ms, vec![second.tombstone()]);
        // One revision stored twice is corrupt, in a chunk and across chunks.
        let twice = encode_chunk(&[first.clone(), first.clone()]).unwrap();
        assert!(decode_chunk(&twice).is_err());
        assert_eq!(
            merge_tombstones(&mut vec![first.clone(), first]),
            Err(PageId(9))
        );
    }

    #[test]
    fn tombstones_round_trip_and_win_over_the_live_mapping() {
        let dead_everywhere = Mapping {
            page_id: PageId(4),
            replicas: vec![],
            freed: true,
            revision: 0,
        };
        let ms = vec![
            m(1, &[1, 2]),
            m(1, &[1, 2]).tombstone(),
            dead_everywhere.clone(),
        ];
        let bytes = encode_chunk(&ms).unwrap();
        assert_eq!(bytes[24 + 5], 0, "live: flags 0");
        assert_eq!(bytes[24 + 24 + 5], 1, "tombstone: flag bit 0");
        assert_eq!(decode_chunk(&bytes).unwrap(), ms);
        // A live mapping without replicas is still corrupt.
        let mut bad = encode_chunk(std::slice::from_ref(&dead_everywhere)).unwrap();
        bad[24 + 5] = 0;
        let sum = crc32c(&bad[4..]);
        bad[0..4].copy_from_slice(&sum.to_le_bytes());
        assert!(decode_chunk(&bad).is_err());
        // Unknown flag bits are corrupt.
        let mut bad = encode_chunk(&[m(2, &[1])]).unwrap();
        bad[24 + 5] = 2;
        let sum = crc32c(&bad[4..]);
        bad[0..4].copy_from_slice(&sum.to_le_bytes());
        assert!(decode_chunk(&bad).is_err());
        // The view: tombstone replaces the live mapping, wherever each was stored.
        let mut view = vec![m(1, &[1, 2]).tombstone(), m(3, &[2]), m(1, &[1, 2])];
        merge_tombstones(&mut view).unwrap();
        assert_eq!(view, vec![m(1, &[1, 2]).tombstone(), m(3, &[2])]);
        for twice in [
            vec![m(1, &[1]), m(1, &[2])],
            vec![m(1, &[1]).tombstone(), m(1, &[1]).tombstone()],
        ] {
            let mut v = twice;
            assert_eq!(merge_tombstones(&mut v), Err(PageId(1)));
        }
        // Within one chunk: once live and once freed is fine, twice either way is not.
        assert!(decode_chunk(&encode_chunk(&[m(5, &[1]), m(5, &[1])]).unwrap()).is_err());
    }

    #[test]
    fn chunks_round_trip_and_golden_bytes() {
        let ms = vec![m(1, &[1, 2, 3]), m(2, &[2]), m(9, &[3, 1])];
        let bytes = encode_chunk(&ms).unwrap();
        assert_eq!(decode_chunk(&bytes).unwrap(), ms);
        assert_eq!(
            &bytes[4..24],
            &[
                1, 0, 0, 0, b'P', b'M', b'G', b'A', b'S', b'G', b'A', b'T', 3, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(&bytes[24..32], &[1, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&bytes[32..40], &[1, 0, 0, 0, 11, 0, 0, 0]);
        assert_eq!(decode_chunk(&encode_chunk(&[]).unwrap()).unwrap(), vec![]);
    }

    #[test]
    fn rejects_damage_and_violations() {
        let bytes = encode_chunk(&[m(1, &[1, 2]), m(2, &[3])]).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_chunk(&b).is_err(), "byte {i}");
        }
        for cut in 0..bytes.len() {
            assert!(decode_chunk(&bytes[..cut]).is_err());
        }
        // Structurally valid checksums over invalid content are still refused.
        let reseal = |mut b: Vec<u8>| {
            let sum = crc32c(&b[4..]);
            b[0..4].copy_from_slice(&sum.to_le_bytes());
            b
        };
        let mut dup_node = bytes.clone();
        dup_node[40..44].copy_from_slice(&1u32.to_le_bytes());
        assert!(
            decode_chunk(&reseal(dup_node)).is_err(),
            "two replicas on one node"
        );
        let mut dup_id = bytes.clone();
        dup_id[48..52].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode_chunk(&reseal(dup_id)).is_err(), "page id twice");
    }

    #[test]
    fn dead_nodes_drop_their_replicas_up_to_the_declaration() {
        let d = DeadNode {
            epoch: crate::Epoch(4),
            max_page_id: 10,
        };
        assert_eq!(d.encode(), "epoch=4 max_page_id=10");
        assert_eq!(DeadNode::decode(&d.encode()), Ok(d));
        for bad in [
            "",
            "epoch=4",
            "epoch=x max_page_id=1",
            "epoch=1 max_page_id=2 z=3",
        ] {
            assert!(DeadNode::decode(bad).is_err(), "{bad:?}");
        }
        let dead = DeadNodes([(NodeId(2), d)].into_iter().collect());
        // Primary died: the first backup is the primary now, order kept.
        let mut old = m(10, &[2, 1, 3]);
        let dropped = dead.apply_dropping(&mut old);
        assert_eq!(
            dropped.iter().map(|r| r.node).collect::<Vec<_>>(),
            vec![NodeId(2)]
        );
        assert_eq!(old, m(10, &[1, 3]));
        // Allocated after the declaration (the node rejoined): kept.
        let mut new = m(11, &[2, 1, 3]);
        assert_eq!(dead.apply(&mut new), 0);
        assert_eq!(new, m(11, &[2, 1, 3]));
        // Every replica dead: nothing left.
        let mut lost = m(3, &[2]);
        assert_eq!(dead.apply(&mut lost), 1);
        assert!(lost.replicas.is_empty());
    }

    #[test]
    fn chunk_size_is_bounded() {
        let cap = chunk_capacity(3);
        let full: Vec<Mapping> = (0..cap as u32).map(|i| m(i, &[1, 2, 3])).collect();
        assert!(encode_chunk(&full).unwrap().len() <= CHUNK_MAX_BYTES);
        let mut over = full;
        over.push(m(u32::MAX, &[1, 2, 3]));
        assert!(matches!(
            encode_chunk(&over),
            Err(GatError::TooLarge { .. })
        ));
        assert_eq!(cap, 2047);
    }
}
