//! The on-PM format of a node's pool: a header at offset 0, the allocation-record table
//! (ART) at [`ART_OFFSET`], then the pages. FORMAT.md describes the bytes.
//!
//! Every field is little endian. The header and each ART record carry a CRC32C checksum,
//! a version (header) and reserved bytes that must be zero; decoders return
//! [`FormatError`] and never panic on any bytes.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PageId;
use crate::addr::AddrError;
use crate::addr::check_page_size;
use crate::ids::{ClusterId, Epoch, NodeId, PageIndex};

pub const POOL_MAGIC: [u8; 8] = *b"PMGASPL\0";
pub const POOL_FORMAT_VERSION: u32 = 1;
/// The header area: the header struct, then zeroes up to the ART.
pub const HEADER_AREA_BYTES: u64 = 4096;
pub const ART_OFFSET: u64 = HEADER_AREA_BYTES;
pub const ART_ENTRY_BYTES: u64 = 64;
/// Pages start at a multiple of this (or of the page size, if smaller): devdax mappings
/// come in 2 MiB units and huge-page-backed pages want it.
pub const DATA_ALIGN_BYTES: u64 = 2 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("{0}")]
    Geometry(String),
    #[error(transparent)]
    Addr(#[from] AddrError),
}

fn corrupt(what: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Corrupt {
        what,
        reason: reason.into(),
    }
}

/// The pool header (128 bytes at offset 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PoolHeaderBytes {
    /// CRC32C of bytes 4..128.
    pub checksum: U32,
    pub format_version: U32,
    pub magic: [u8; 8],
    pub cluster_id: U64,
    pub node_id: U32,
    pub art_entry_bytes: U32,
    pub page_size_bytes: U64,
    pub page_count: U64,
    pub art_offset: U64,
    pub data_offset: U64,
    pub pool_bytes: U64,
    pub reserved: [u8; 56],
}

const _: () = assert!(size_of::<PoolHeaderBytes>() == 128);

/// The pool's geometry and identity, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolHeader {
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    pub page_size_bytes: u64,
    pub page_count: u32,
    pub data_offset: u64,
    pub pool_bytes: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl PoolHeader {
    /// Lays out a pool of `pool_bytes` with pages of `page_size_bytes`: as many pages as fit
    /// after the header and ART.
    pub fn plan(
        cluster_id: ClusterId,
        node_id: NodeId,
        page_size_bytes: u64,
        pool_bytes: u64,
    ) -> Result<Self, FormatError> {
        check_page_size(page_size_bytes)?;
        let align = DATA_ALIGN_BYTES.min(page_size_bytes);
        let data_offset_for = |n: u64| align_up(ART_OFFSET + n * ART_ENTRY_BYTES, align);
        let mut n = pool_bytes.saturating_sub(ART_OFFSET) / (page_size_bytes + ART_ENTRY_BYTES);
        while n > 0 && data_offset_for(n) + n * page_size_bytes > pool_bytes {
            n -= 1;
        }
        let n = n.min(u32::MAX as u64);
        if n == 0 {
            return Err(FormatError::Geometry(format!(
                "a pool of {pool_bytes} bytes holds no page of {page_size_bytes} bytes"
            )));
        }
        Ok(Self {
            cluster_id,
            node_id,
            page_size_bytes,
            page_count: n as u32,
            data_offset: data_offset_for(n),
            pool_bytes,
        })
    }

    pub fn encode(&self) -> PoolHeaderBytes {
        let mut h = PoolHeaderBytes {
            checksum: U32::new(0),
            format_version: U32::new(POOL_FORMAT_VERSION),
            magic: POOL_MAGIC,
            cluster_id: U64::new(self.cluster_id.0),
            node_id: U32::new(self.node_id.0),
            art_entry_bytes: U32::new(ART_ENTRY_BYTES as u32),
            page_size_bytes: U64::new(self.page_size_bytes),
            page_count: U64::new(self.page_count as u64),
            art_offset: U64::new(ART_OFFSET),
            data_offset: U64::new(self.data_offset),
            pool_bytes: U64::new(self.pool_bytes),
            reserved: [0; 56],
        };
        h.checksum = U32::new(crc32c(&h.as_bytes()[4..]));
        h
    }

    /// Decodes and validates a header read from the first 128 bytes of a pool.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "pool header";
        let h = PoolHeaderBytes::read_from_prefix(bytes)
            .map_err(|_| corrupt(WHAT, format!("{} bytes, need 128", bytes.len())))?
            .0;
        if h.magic != POOL_MAGIC {
            return Err(corrupt(WHAT, format!("bad magic {:02x?}", h.magic)));
        }
        let sum = crc32c(&h.as_bytes()[4..]);
        if h.checksum.get() != sum {
            return Err(corrupt(
                WHAT,
                format!("checksum {:#010x}, computed {sum:#010x}", h.checksum.get()),
            ));
        }
        if h.format_version.get() != POOL_FORMAT_VERSION {
            return Err(corrupt(
                WHAT,
                format!(
                    "format version {} (this build reads {POOL_FORMAT_VERSION})",
                    h.format_version.get()
                ),
            ));
        }
        if h.reserved != [0; 56] {
            return Err(corrupt(WHAT, "reserved bytes are not zero"));
        }
        if h.art_entry_bytes.get() as u64 != ART_ENTRY_BYTES || h.art_offset.get() != ART_OFFSET {
            return Err(corrupt(
                WHAT,
                "ART offset or entry size differs from this format",
            ));
        }
        let page_count =
            u32::try_from(h.page_count.get()).map_err(|_| corrupt(WHAT, "page count over 2^32"))?;
        let planned = Self::plan(
            ClusterId(h.cluster_id.get()),
            NodeId(h.node_id.get()),
            h.page_size_bytes.get(),
            h.pool_bytes.get(),
        )
        .map_err(|e| corrupt(WHAT, e.to_string()))?;
        // The geometry must be exactly what `plan` makes of the recorded sizes.
        if planned.page_count != page_count || planned.data_offset != h.data_offset.get() {
            return Err(corrupt(
                WHAT,
                "page count or data offset inconsistent with the pool size",
            ));
        }
        Ok(planned)
    }

    /// Byte offset of page `index` in the pool.
    pub fn page_offset(&self, index: PageIndex) -> Option<u64> {
        (index.0 < self.page_count)
            .then(|| self.data_offset + index.0 as u64 * self.page_size_bytes)
    }

    /// Byte offset of the ART entry of page `index`.
    pub fn art_entry_offset(&self, index: PageIndex) -> Option<u64> {
        (index.0 < self.page_count).then(|| art_entry_at(index.0))
    }
}

/// Byte offset, from the pool's start, of the ART entry of page `index` (unchecked: for a
/// reader without the header, such as a client READing a node's ART one-sided; with
/// `index` = the page count, the end of the ART).
pub fn art_entry_at(index: u32) -> u64 {
    ART_OFFSET + u64::from(index) * ART_ENTRY_BYTES
}

/// CRC32C (Castagnoli), the checksum of every on-PM record.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The state of one page in its node's ART.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    Free,
    Preallocated,
    Allocated,
}

impl PageState {
    pub fn code(self) -> u8 {
        match self {
            Self::Free => 0,
            Self::Preallocated => 1,
            Self::Allocated => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Free),
            1 => Some(Self::Preallocated),
            2 => Some(Self::Allocated),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Free => "FREE",
            Self::Preallocated => "PREALLOCATED",
            Self::Allocated => "ALLOCATED",
        }
    }
}

/// One of the two 32-byte records of an ART entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ArtRecordBytes {
    /// Sequence number of this version of the entry; the valid record with the higher one
    /// is current.
    pub seq: U64,
    pub page_id: U32,
    pub state: u8,
    pub reserved: [u8; 3],
    pub epoch: U64,
    /// CRC32C of bytes 0..24 followed by the page index (little-endian u32), so that a
    /// record copied to the wrong entry does not validate.
    pub checksum: U32,
    pub reserved2: [u8; 4],
}

const _: () = assert!(size_of::<ArtRecordBytes>() == 32);
const _: () = assert!(2 * size_of::<ArtRecordBytes>() as u64 == ART_ENTRY_BYTES);

/// The current content of an ART entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtRecord {
    pub seq: u64,
    pub state: PageState,
    /// The global page id the page was committed under (ALLOCATED only; 0 otherwise).
    pub page_id: PageId,
    /// The epoch the page was committed in (ALLOCATED only; 0 otherwise).
    pub epoch: Epoch,
}

impl ArtRecord {
    /// The entry of a freshly formatted (all-zero) table.
    pub const FRESH: Self = Self {
        seq: 0,
        state: PageState::Free,
        page_id: PageId(0),
        epoch: Epoch(0),
    };

    fn checksum(bytes: &[u8], index: PageIndex) -> u32 {
        let mut buf = [0u8; 28];
        buf[..24].copy_from_slice(&bytes[..24]);
        buf[24..].copy_from_slice(&index.0.to_le_bytes());
        crc32c(&buf)
    }

    pub fn encode(&self, index: PageIndex) -> ArtRecordBytes {
        let mut r = ArtRecordBytes {
            seq: U64::new(self.seq),
            page_id: U32::new(self.page_id.0),
            state: self.state.code(),
            reserved: [0; 3],
            epoch: U64::new(self.epoch.0),
            checksum: U32::new(0),
            reserved2: [0; 4],
        };
        r.checksum = U32::new(Self::checksum(r.as_bytes(), index));
        r
    }

    fn decode_one(r: &ArtRecordBytes, index: PageIndex) -> Option<Self> {
        // Writers never store sequence 0 (that is the all-zero fresh record), so a non-zero
        // record claiming it is corrupt or forged.
        let valid = r.checksum.get() == Self::checksum(r.as_bytes(), index)
            && r.seq.get() >= 1
            && r.reserved == [0; 3]
            && r.reserved2 == [0; 4];
        let state = PageState::from_code(r.state)?;
        valid.then_some(Self {
            seq: r.seq.get(),
            state,
            page_id: PageId(r.page_id.get()),
            epoch: Epoch(r.epoch.get()),
        })
    }

    /// Decodes a 64-byte ART entry: the valid record with the higher sequence number. An
    /// all-zero record counts as FREE with sequence 0 (fresh format). A record torn by a
    /// crash fails its checksum and the other record, the previous version, stands.
    pub fn decode_entry(bytes: &[u8], index: PageIndex) -> Result<Self, FormatError> {
        const WHAT: &str = "ART entry";
        if bytes.len() != ART_ENTRY_BYTES as usize {
            return Err(corrupt(
                WHAT,
                format!("{} bytes, need {ART_ENTRY_BYTES}", bytes.len()),
            ));
        }
        if bytes.iter().all(|&b| b == 0) {
            return Ok(Self::FRESH);
        }
        let (a, b) = bytes.split_at(32);
        // An all-zero record is the fresh format's (seq 0, FREE): the first update of an
        // entry writes slot 1, and if that write is torn, slot 0 must still stand.
        let parse = |half: &[u8]| {
            if half.iter().all(|&b| b == 0) {
                return Some(Self::FRESH);
            }
            ArtRecordBytes::read_from_bytes(half)
                .ok()
                .and_then(|r| Self::decode_one(&r, index))
        };
        match (parse(a), parse(b)) {
            (Some(x), Some(y)) if x.seq == y.seq => Err(corrupt(
                WHAT,
                format!("page {}: both records carry sequence {}", index.0, x.seq),
            )),
            (Some(x), Some(y)) => Ok(if x.seq > y.seq { x } else { y }),
            (Some(x), None) | (None, Some(x)) => Ok(x),
            (None, None) => Err(corrupt(
                WHAT,
                format!("page {}: neither record is valid", index.0),
            )),
        }
    }

    /// Whether the page holds global page `page_id`: ALLOCATED under that id. Ids are never
    /// reused, so a page that holds an id now held it since its commit.
    pub fn holds(&self, page_id: PageId) -> bool {
        self.state == PageState::Allocated && self.page_id == page_id
    }

    /// The record that supersedes `self` with new content, and the slot (0 or 1) it goes
    /// to: the slot not holding `self`, so a torn write leaves `self` intact.
    pub fn successor(&self, state: PageState, page_id: PageId, epoch: Epoch) -> (usize, Self) {
        let seq = self.seq + 1;
        (
            (seq % 2) as usize,
            Self {
                seq,
                state,
                page_id,
                epoch,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn header() -> PoolHeader {
        PoolHeader::plan(ClusterId(0xc1), NodeId(3), 2 * MIB, 64 * MIB).unwrap()
    }

    #[test]
    fn plan_fits_pages_after_header_and_art() {
        let h = header();
        assert_eq!(h.data_offset, 2 * MIB);
        assert_eq!(h.page_count, 31);
        assert!(h.data_offset + h.page_count as u64 * h.page_size_bytes <= h.pool_bytes);
        let big = PoolHeader::plan(ClusterId(1), NodeId(1), 2 * MIB, 1 << 30).unwrap();
        assert_eq!(big.page_count, 511);
        assert!(PoolHeader::plan(ClusterId(1), NodeId(1), 2 * MIB, 3 * MIB).is_err());
        assert!(PoolHeader::plan(ClusterId(1), NodeId(1), 3 * MIB, 64 * MIB).is_err());
        assert_eq!(h.page_offset(PageIndex(1)), Some(4 * MIB));
        assert_eq!(h.page_offset(PageIndex(31)), None);
        assert_eq!(h.art_entry_offset(PageIndex(2)), Some(4096 + 128));
    }

    #[test]
    fn header_round_trips_and_golden_bytes() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(PoolHeader::decode(bytes.as_bytes()).unwrap(), h);
        let b = bytes.as_bytes();
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..16], b"PMGASPL\0");
        assert_eq!(&b[16..24], &0xc1u64.to_le_bytes());
        assert_eq!(&b[24..28], &3u32.to_le_bytes());
        assert_eq!(&b[28..32], &64u32.to_le_bytes());
        assert_eq!(&b[32..40], &(2 * MIB).to_le_bytes());
        assert_eq!(&b[40..48], &31u64.to_le_bytes());
        assert_eq!(&b[48..56], &4096u64.to_le_bytes());
        assert_eq!(&b[56..64], &(2 * MIB).to_le_bytes());
        assert_eq!(&b[64..72], &(64 * MIB).to_le_bytes());
        assert!(b[72..].iter().all(|&x| x == 0));
        assert_eq!(
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            crc32c(&b[4..])
        );
    }

    #[test]
    fn header_rejects_every_single_byte_corruption() {
        let good = header().encode();
        for i in 0..128 {
            let mut b = good.as_bytes().to_vec();
            b[i] ^= 0x40;
            assert!(PoolHeader::decode(&b).is_err(), "byte {i} flipped");
        }
        assert!(PoolHeader::decode(&good.as_bytes()[..100]).is_err());
        assert!(PoolHeader::decode(&[0u8; 128]).is_err());
    }

    #[test]
    fn art_entry_picks_the_newest_valid_record() {
        let idx = PageIndex(5);
        let mut entry = [0u8; 64];
        assert_eq!(
            ArtRecord::decode_entry(&entry, idx).unwrap(),
            ArtRecord::FRESH
        );
        let mut cur = ArtRecord::FRESH;
        let steps = [
            (PageState::Preallocated, PageId(0), Epoch(0)),
            (PageState::Allocated, PageId(77), Epoch(4)),
            (PageState::Free, PageId(0), Epoch(0)),
            (PageState::Preallocated, PageId(0), Epoch(0)),
        ];
        for (state, page_id, epoch) in steps {
            let (slot, next) = cur.successor(state, page_id, epoch);
            entry[slot * 32..slot * 32 + 32].copy_from_slice(next.encode(idx).as_bytes());
            assert_eq!(ArtRecord::decode_entry(&entry, idx).unwrap(), next);
            cur = next;
        }
        // The same bytes are not valid for another page.
        assert!(ArtRecord::decode_entry(&entry, PageIndex(6)).is_err());
    }

    #[test]
    fn a_torn_record_leaves_the_previous_version() {
        let idx = PageIndex(1);
        let mut entry = [0u8; 64];
        let (s1, r1) = ArtRecord::FRESH.successor(PageState::Preallocated, PageId(0), Epoch(0));
        entry[s1 * 32..s1 * 32 + 32].copy_from_slice(r1.encode(idx).as_bytes());
        let (s2, r2) = r1.successor(PageState::Allocated, PageId(9), Epoch(2));
        let new = r2.encode(idx);
        // Any prefix of 8-byte words of the new record (a crash mid write-back) decodes to
        // either the old or the new version, never anything else.
        for words in 0..=4 {
            let mut e = entry;
            e[s2 * 32..s2 * 32 + words * 8].copy_from_slice(&new.as_bytes()[..words * 8]);
            let got = ArtRecord::decode_entry(&e, idx).unwrap();
            assert!(got == r1 || got == r2, "{words} words: {got:?}");
            assert_eq!(got == r2, words == 4);
        }
    }

    #[test]
    fn a_torn_first_update_leaves_the_fresh_entry() {
        let idx = PageIndex(2);
        let (slot, rec) = ArtRecord::FRESH.successor(PageState::Preallocated, PageId(0), Epoch(0));
        assert_eq!(slot, 1);
        let bytes = rec.encode(idx);
        for words in 1..4 {
            let mut e = [0u8; 64];
            e[32..32 + words * 8].copy_from_slice(&bytes.as_bytes()[..words * 8]);
            assert_eq!(
                ArtRecord::decode_entry(&e, idx).unwrap(),
                ArtRecord::FRESH,
                "{words} words"
            );
        }
    }

    #[test]
    fn art_record_golden_bytes() {
        let r = ArtRecord {
            seq: 2,
            state: PageState::Allocated,
            page_id: PageId(0x0102_0304),
            epoch: Epoch(7),
        };
        let b = r.encode(PageIndex(0));
        let b = b.as_bytes();
        assert_eq!(&b[0..8], &2u64.to_le_bytes());
        assert_eq!(&b[8..12], &0x0102_0304u32.to_le_bytes());
        assert_eq!(b[12], 2);
        assert_eq!(&b[16..24], &7u64.to_le_bytes());
        assert_eq!(&b[28..32], &[0; 4]);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in 0..20_000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = n % 140;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 5) & 0xff) as u8)
                .collect();
            let _ = PoolHeader::decode(&bytes);
            let _ = ArtRecord::decode_entry(&bytes, PageIndex(n as u32));
        }
    }
}
