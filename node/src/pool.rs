//! A node's pool: the PM mapping, its header and its ART.
//!
//! Opening never reformats anything but an all-zero header area; a pool whose header fails
//! validation, or belongs to another cluster, node or page size, is refused with the
//! reason. Persist steps P0–P4 are described in PERSISTENCE.md.

use std::path::Path;
use std::sync::Mutex;

use pmgas_layout::pool::{ART_ENTRY_BYTES, ART_OFFSET, HEADER_AREA_BYTES};
use pmgas_layout::{
    ArtRecord, ClusterId, Epoch, FormatError, NodeId, PageId, PageIndex, PageState, PoolHeader,
};
use pmgas_verbs::MappedRegion;
use zerocopy::IntoBytes;

use crate::art::{ArtError, ArtState, ReconcileReport};
use crate::pmem::Pmem;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    #[error(transparent)]
    Region(#[from] pmgas_verbs::Error),
    #[error("{path}: {source}")]
    Format { path: String, source: FormatError },
    #[error("{path}: pool belongs to {field} {found}, this node is configured for {expected}")]
    Foreign {
        path: String,
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("{path}: not formatted (blank header area); run `pmgas-node format`")]
    NotFormatted { path: String },
    #[error("{path}: the pool was formatted for {recorded} bytes but the mapping has {mapped}")]
    Shrunk {
        path: String,
        recorded: u64,
        mapped: u64,
    },
    #[error("{path}: holds a valid pool; pass --force to destroy it")]
    AlreadyFormatted { path: String },
    #[error(transparent)]
    Art(#[from] ArtError),
    #[error("[{offset}, +{len}) is outside a page of {page_size} bytes")]
    OutOfPage {
        offset: u64,
        len: usize,
        page_size: u64,
    },
    /// The page does not hold `page_id` (any more): it was freed, and maybe handed out
    /// again. Nothing was stored.
    #[error("page {page} is {state} under page id {held}, not page id {page_id}")]
    NotHeld {
        page: u32,
        page_id: u32,
        state: &'static str,
        held: u32,
    },
}

/// Who this node is; a pool is opened only if it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolIdentity {
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    pub page_size_bytes: u64,
}

/// What to do with a pool whose header area is all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBlank {
    /// Format it for this identity (a node's first start).
    Format(PoolIdentity),
    /// Refuse (inspection tools, which never write).
    Refuse,
}

/// A corrupt ART entry found at open; the page is quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptEntry {
    pub page: PageIndex,
    pub reason: String,
}

pub struct Pool {
    pmem: Pmem,
    header: PoolHeader,
    art: Mutex<ArtState>,
    corrupt: Vec<CorruptEntry>,
    path: String,
}

impl Pool {
    /// Opens (and on a blank pool, possibly formats) the pool at `path`. `file_len` creates
    /// or grows a development tmpfs file. `expect`, when given, must match the header.
    pub fn open(
        path: &Path,
        file_len: Option<u64>,
        on_blank: OnBlank,
        expect: Option<PoolIdentity>,
    ) -> Result<Self, PoolError> {
        let pmem = Pmem::new(MappedRegion::open(path, file_len)?);
        let shown = path.display().to_string();
        let header_area = pmem.read_vec(0, HEADER_AREA_BYTES.min(pmem.len()) as usize);
        let header = if is_blank(&header_area) {
            match on_blank {
                OnBlank::Refuse => return Err(PoolError::NotFormatted { path: shown }),
                OnBlank::Format(id) => format_pmem(&pmem, id, &shown)?,
            }
        } else {
            PoolHeader::decode(&header_area).map_err(|source| PoolError::Format {
                path: shown.clone(),
                source,
            })?
        };
        if header.pool_bytes > pmem.len() {
            return Err(PoolError::Shrunk {
                path: shown,
                recorded: header.pool_bytes,
                mapped: pmem.len(),
            });
        }
        if let Some(id) = expect {
            check_identity(&header, id, &shown)?;
        }
        let table = pmem.read_vec(
            ART_OFFSET,
            header.page_count as usize * ART_ENTRY_BYTES as usize,
        );
        let mut corrupt = Vec::new();
        let entries = table
            .chunks_exact(ART_ENTRY_BYTES as usize)
            .enumerate()
            .map(|(i, bytes)| match ArtRecord::decode_entry(bytes, PageIndex(i as u32)) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(page = i, error = %e, path = %shown, "corrupt ART entry; page quarantined");
                    corrupt.push(CorruptEntry { page: PageIndex(i as u32), reason: e.to_string() });
                    None
                }
            })
            .collect();
        Ok(Self {
            pmem,
            header,
            art: Mutex::new(ArtState::from_entries(entries)),
            corrupt,
            path: shown,
        })
    }

    /// Formats `path` explicitly. A pool with a valid header is destroyed only with `force`.
    pub fn format(
        path: &Path,
        file_len: Option<u64>,
        id: PoolIdentity,
        force: bool,
    ) -> Result<Self, PoolError> {
        let pmem = Pmem::new(MappedRegion::open(path, file_len)?);
        let shown = path.display().to_string();
        let header_area = pmem.read_vec(0, HEADER_AREA_BYTES.min(pmem.len()) as usize);
        if !force && PoolHeader::decode(&header_area).is_ok() {
            return Err(PoolError::AlreadyFormatted { path: shown });
        }
        // P0: the old header goes first, so that a crash mid-format leaves a blank pool,
        // never an old header over a half-zeroed table.
        pmem.zero("P0 invalidate header", 0, HEADER_AREA_BYTES);
        drop(pmem);
        Self::open(path, None, OnBlank::Format(id), Some(id))
    }

    pub fn header(&self) -> &PoolHeader {
        &self.header
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn region(&self) -> &MappedRegion {
        self.pmem.region()
    }

    pub(crate) fn pmem(&self) -> &Pmem {
        &self.pmem
    }

    /// One persist step writing `data` at byte `offset` of page `page` (application data
    /// and allocator metadata alike). The page must not be FREE.
    pub fn store_in_page(
        &self,
        page: PageIndex,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PoolError> {
        let base = self.page_base(page, offset, data.len())?;
        self.pmem.store("page data", base + offset, data);
        Ok(())
    }

    /// As [`Self::store_in_page`], for a replica of global page `page_id`: stored only if
    /// the page is ALLOCATED under that id, checked under the ART's lock so that a free
    /// ([`Self::free_page`]) cannot come between the check and the store.
    pub fn store_in_page_as(
        &self,
        page: PageIndex,
        page_id: PageId,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PoolError> {
        self.store_in_replica(page, page_id, false, offset, data)
    }

    /// As [`Self::store_in_page_as`]; with `copy_target`, a PREALLOCATED page takes the
    /// bytes too: this node prepared it to receive a copy of `page_id` (re-replication,
    /// `monitor/REREPLICATION.md` R3; the caller checked that under its own lock, held
    /// across this call, so an abort cannot come between).
    pub fn store_in_replica(
        &self,
        page: PageIndex,
        page_id: PageId,
        copy_target: bool,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PoolError> {
        let art = self.lock();
        let rec = art.get(page)?;
        let prepared_copy = copy_target && rec.state == PageState::Preallocated;
        if !rec.holds(page_id) && !prepared_copy {
            return Err(PoolError::NotHeld {
                page: page.0,
                page_id: page_id.0,
                state: rec.state.name(),
                held: rec.page_id.0,
            });
        }
        let base = self.page_base_in(rec, page, offset, data.len())?;
        self.pmem.store("page data", base + offset, data);
        drop(art);
        Ok(())
    }

    /// Frees this node's replica of freed global page `page_id`: if page `page` is still
    /// ALLOCATED under that id, P10 zeroes its bytes (a page handed out again reads as
    /// zeros) and P4 marks it FREE. Returns whether it did; a page in any other state or
    /// under another id (freed already, and maybe handed out again) is left as it is, so
    /// asking twice is harmless.
    pub fn free_page(&self, page: PageIndex, page_id: PageId) -> Result<bool, PoolError> {
        let mut art = self.lock();
        let rec = art.get(page)?;
        if !rec.holds(page_id) {
            return Ok(false);
        }
        let base = self.page_base_in(rec, page, 0, 0)?;
        self.pmem
            .zero("P10 zero freed page", base, self.header.page_size_bytes);
        self.transition_locked(&mut art, page, PageState::Free, PageId(0), Epoch(0))?;
        Ok(true)
    }

    /// Reads bytes at `offset` of page `page`.
    pub fn read_in_page(
        &self,
        page: PageIndex,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), PoolError> {
        let base = self.page_base(page, offset, out.len())?;
        self.pmem.read(base + offset, out);
        Ok(())
    }

    fn page_base(&self, page: PageIndex, offset: u64, len: usize) -> Result<u64, PoolError> {
        self.page_base_in(self.record(page)?, page, offset, len)
    }

    /// [`Self::page_base`] for the page's current record `rec` (read under the lock).
    fn page_base_in(
        &self,
        rec: ArtRecord,
        page: PageIndex,
        offset: u64,
        len: usize,
    ) -> Result<u64, PoolError> {
        if rec.state == PageState::Free {
            return Err(PoolError::Art(ArtError::IllegalTransition {
                page: page.0,
                from: "FREE",
                to: "data access",
            }));
        }
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.header.page_size_bytes) {
            return Err(PoolError::OutOfPage {
                offset,
                len,
                page_size: self.header.page_size_bytes,
            });
        }
        Ok(self.header.page_offset(page).unwrap_or(0))
    }

    pub fn corrupt_entries(&self) -> &[CorruptEntry] {
        &self.corrupt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ArtState> {
        // A panic while holding the lock leaves the DRAM view at the last applied (durable)
        // record, which is still consistent, so poisoning is safe to ignore.
        self.art.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the ART (pure state) for inspection.
    pub fn art(&self) -> ArtState {
        self.lock().clone()
    }

    pub fn record(&self, page: PageIndex) -> Result<ArtRecord, PoolError> {
        Ok(self.lock().get(page)?)
    }

    /// One durable ART transition (persist step P4). Returns the new record.
    pub fn transition(
        &self,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<ArtRecord, PoolError> {
        let mut art = self.lock();
        self.transition_locked(&mut art, page, to, page_id, epoch)
    }

    fn transition_locked(
        &self,
        art: &mut ArtState,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<ArtRecord, PoolError> {
        let (slot, record) = art.plan(page, to, page_id, epoch)?;
        let bytes = record.encode(page);
        let entry = self
            .header
            .art_entry_offset(page)
            .ok_or(ArtError::UnknownPage {
                page: page.0,
                page_count: self.header.page_count,
            })?;
        // Assert the record before it goes to PM, and that it reads back as the entry's
        // new current value after (TigerBeetle's paired assertions).
        assert_eq!(
            ArtRecord::decode_entry(&self.entry_with(entry, slot, bytes.as_bytes()), page).ok(),
            Some(record)
        );
        // P4: one record slot, the one not holding the current value. A crash before the
        // fence leaves the old record current; after it, the new one.
        self.pmem
            .store("P4 ART record", entry + slot as u64 * 32, bytes.as_bytes());
        let reread =
            ArtRecord::decode_entry(&self.pmem.read_vec(entry, ART_ENTRY_BYTES as usize), page);
        assert_eq!(
            reread.ok(),
            Some(record),
            "ART entry {} does not read back",
            page.0
        );
        art.apply(page, record);
        Ok(record)
    }

    fn entry_with(&self, entry: u64, slot: usize, record: &[u8]) -> Vec<u8> {
        let mut bytes = self.pmem.read_vec(entry, ART_ENTRY_BYTES as usize);
        bytes[slot * 32..slot * 32 + 32].copy_from_slice(record);
        bytes
    }

    /// Takes the lowest FREE page and marks it PREALLOCATED, durably.
    pub fn preallocate(&self) -> Result<PageIndex, PoolError> {
        let mut art = self.lock();
        let page = art.pick_free()?;
        self.transition_locked(&mut art, page, PageState::Preallocated, PageId(0), Epoch(0))?;
        Ok(page)
    }

    /// Reconciles the ART with the GAT's view of this node (monitor start/recovery).
    pub fn reconcile(
        &self,
        committed: &std::collections::HashMap<PageIndex, (PageId, Epoch)>,
    ) -> Result<ReconcileReport, PoolError> {
        let mut art = self.lock();
        let (plan, report) = art.reconcile_plan(committed);
        for (page, to, page_id, epoch) in plan {
            self.transition_locked(&mut art, page, to, page_id, epoch)?;
            pmgas_verbs::fault::point("node.reconciling");
        }
        for (page, id) in &report.unknown_allocated {
            tracing::error!(
                page = page.0,
                page_id = id.0,
                "ALLOCATED page unknown to the GAT; left untouched"
            );
        }
        for (page, ours, gat) in &report.conflicting {
            tracing::error!(
                page = page.0,
                ours = ours.0,
                gat = gat.0,
                "ALLOCATED page id differs from the GAT"
            );
        }
        Ok(report)
    }
}

/// Whether a header area is blank: its publish word (checksum and version, the first 8
/// bytes, written last by a format) is zero, and the rest is either zero or the body of an
/// interrupted pmgas format. Anything else is someone's data and is never formatted over.
fn is_blank(header_area: &[u8]) -> bool {
    let publish_word_zero = header_area.iter().take(8).all(|&b| b == 0);
    let body = header_area.get(8..).unwrap_or(&[]);
    publish_word_zero
        && (body.iter().all(|&b| b == 0) || body.starts_with(&pmgas_layout::pool::POOL_MAGIC))
}

fn check_identity(h: &PoolHeader, id: PoolIdentity, path: &str) -> Result<(), PoolError> {
    let foreign = |field, expected: u64, found: u64| PoolError::Foreign {
        path: path.to_owned(),
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    };
    if h.cluster_id != id.cluster_id {
        return Err(foreign("cluster", id.cluster_id.0, h.cluster_id.0));
    }
    if h.node_id != id.node_id {
        return Err(foreign("node", id.node_id.0 as u64, h.node_id.0 as u64));
    }
    if h.page_size_bytes != id.page_size_bytes {
        return Err(foreign("page size", id.page_size_bytes, h.page_size_bytes));
    }
    Ok(())
}

/// Formats a blank pool: P1 zeroes the ART, P2 writes the header body, P3 its publish word
/// (checksum and version), which makes the format valid. A crash before P3 leaves a blank
/// pool that the next start formats again.
fn format_pmem(pmem: &Pmem, id: PoolIdentity, path: &str) -> Result<PoolHeader, PoolError> {
    let header = PoolHeader::plan(id.cluster_id, id.node_id, id.page_size_bytes, pmem.len())
        .map_err(|source| PoolError::Format {
            path: path.to_owned(),
            source,
        })?;
    pmem.zero(
        "P1 zero ART",
        ART_OFFSET,
        header.page_count as u64 * ART_ENTRY_BYTES,
    );
    let encoded = header.encode();
    let bytes = encoded.as_bytes();
    assert_eq!(PoolHeader::decode(bytes).ok(), Some(header));
    pmem.store("P2 header body", 8, &bytes[8..]);
    pmem.store("P3 publish header", 0, &bytes[..8]);
    assert_eq!(
        PoolHeader::decode(&pmem.read_vec(0, 128)).ok(),
        Some(header),
        "header does not read back"
    );
    tracing::info!(
        path,
        pages = header.page_count,
        page_size = header.page_size_bytes,
        "formatted pool"
    );
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    struct TempPool(PathBuf);

    impl TempPool {
        fn new(tag: &str) -> Self {
            let p = PathBuf::from(format!("/dev/shm/pmgas-pool-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }
    }

    impl Drop for TempPool {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn id(node: u32) -> PoolIdentity {
        PoolIdentity {
            cluster_id: ClusterId(7),
            node_id: NodeId(node),
            page_size_bytes: 2 * MIB,
        }
    }

    #[test]
    fn formats_a_blank_pool_once_and_keeps_it() {
        let t = TempPool::new("fmt");
        let pool = Pool::open(&t.0, Some(64 * MIB), OnBlank::Format(id(1)), Some(id(1))).unwrap();
        assert_eq!(pool.header().page_count, 31);
        let p = pool.preallocate().unwrap();
        pool.transition(p, PageState::Allocated, PageId(5), Epoch(2))
            .unwrap();
        drop(pool);
        let pool = Pool::open(&t.0, None, OnBlank::Format(id(1)), Some(id(1))).unwrap();
        let r = pool.record(p).unwrap();
        assert_eq!(
            (r.state, r.page_id, r.epoch),
            (PageState::Allocated, PageId(5), Epoch(2))
        );
        assert_eq!(pool.art().free_count(), 30);
    }

    #[test]
    fn refuses_foreign_and_corrupt_pools() {
        let t = TempPool::new("foreign");
        drop(Pool::open(&t.0, Some(16 * MIB), OnBlank::Format(id(1)), None).unwrap());
        let err = Pool::open(&t.0, None, OnBlank::Format(id(2)), Some(id(2)))
            .err()
            .unwrap();
        assert!(
            matches!(err, PoolError::Foreign { field: "node", .. }),
            "{err}"
        );
        let other_cluster = PoolIdentity {
            cluster_id: ClusterId(8),
            ..id(1)
        };
        assert!(matches!(
            Pool::open(&t.0, None, OnBlank::Refuse, Some(other_cluster)),
            Err(PoolError::Foreign { .. })
        ));
        let other_size = PoolIdentity {
            page_size_bytes: 4 * MIB,
            ..id(1)
        };
        assert!(matches!(
            Pool::open(&t.0, None, OnBlank::Refuse, Some(other_size)),
            Err(PoolError::Foreign { .. })
        ));
        // Corrupt one header byte: refused, and never reformatted.
        let pmem = Pmem::new(MappedRegion::open(&t.0, None).unwrap());
        let mut b = pmem.read_vec(40, 1);
        b[0] ^= 1;
        pmem.store("test", 40, &b);
        let err = Pool::open(&t.0, None, OnBlank::Format(id(1)), Some(id(1)))
            .err()
            .unwrap();
        assert!(matches!(err, PoolError::Format { .. }), "{err}");
        assert_eq!(pmem.read_vec(40, 1), b, "a corrupt pool is left as it is");
        // Explicit format needs --force only for a valid pool; this one is corrupt.
        let pool = Pool::format(&t.0, None, id(1), false).unwrap();
        assert!(matches!(
            Pool::format(&t.0, None, id(1), false),
            Err(PoolError::AlreadyFormatted { .. })
        ));
        drop(pool);
        Pool::format(&t.0, None, id(1), true).unwrap();
    }

    #[test]
    fn a_freed_replica_is_zeroed_and_free_and_a_stale_store_lands_nowhere() {
        let t = TempPool::new("free");
        let pool = Pool::open(&t.0, Some(16 * MIB), OnBlank::Format(id(1)), None).unwrap();
        let p = pool.preallocate().unwrap();
        pool.transition(p, PageState::Allocated, PageId(5), Epoch(1))
            .unwrap();
        pool.store_in_page_as(p, PageId(5), 64, b"old bytes")
            .unwrap();
        // Wrong id: nothing stored, nothing freed.
        assert!(matches!(
            pool.store_in_page_as(p, PageId(6), 64, b"x"),
            Err(PoolError::NotHeld { held: 5, .. })
        ));
        assert!(!pool.free_page(p, PageId(6)).unwrap());
        assert!(pool.free_page(p, PageId(5)).unwrap());
        assert!(!pool.free_page(p, PageId(5)).unwrap(), "twice is harmless");
        assert_eq!(pool.record(p).unwrap().state, PageState::Free);
        // Handed out again (lowest FREE page first) under another id: zeros, and a store
        // for the freed id is refused.
        let again = pool.preallocate().unwrap();
        assert_eq!(again, p);
        pool.transition(p, PageState::Allocated, PageId(9), Epoch(1))
            .unwrap();
        let mut b = [1u8; 9];
        pool.read_in_page(p, 64, &mut b).unwrap();
        assert_eq!(b, [0; 9]);
        assert!(matches!(
            pool.store_in_page_as(p, PageId(5), 64, b"stale"),
            Err(PoolError::NotHeld { .. })
        ));
        pool.read_in_page(p, 64, &mut b).unwrap();
        assert_eq!(b, [0; 9]);
    }

    #[test]
    fn blank_pools_are_not_formatted_by_inspection() {
        let t = TempPool::new("blank");
        let err = Pool::open(&t.0, Some(8 * MIB), OnBlank::Refuse, None)
            .err()
            .unwrap();
        assert!(matches!(err, PoolError::NotFormatted { .. }));
        let pmem = Pmem::new(MappedRegion::open(&t.0, None).unwrap());
        assert!(pmem.read_vec(0, 4096).iter().all(|&b| b == 0));
    }

    #[test]
    fn corrupt_entries_are_quarantined_not_reused() {
        let t = TempPool::new("quarantine");
        let pool = Pool::open(&t.0, Some(16 * MIB), OnBlank::Format(id(1)), None).unwrap();
        drop(pool);
        let pmem = Pmem::new(MappedRegion::open(&t.0, None).unwrap());
        // Garbage in both records of entry 2 (a single bad record would read as torn).
        pmem.store("test", ART_OFFSET + 64 * 2 + 5, &[0xee]);
        pmem.store("test", ART_OFFSET + 64 * 2 + 37, &[0xee]);
        let pool = Pool::open(&t.0, None, OnBlank::Refuse, Some(id(1))).unwrap();
        assert_eq!(pool.corrupt_entries().len(), 1);
        assert_eq!(pool.corrupt_entries()[0].page, PageIndex(2));
        let mut got = vec![];
        while let Ok(p) = pool.preallocate() {
            got.push(p.0);
        }
        assert!(!got.contains(&2));
        assert_eq!(got.len() as u32, pool.header().page_count - 1);
        assert!(matches!(
            pool.preallocate(),
            Err(PoolError::Art(ArtError::NoFreePage { .. }))
        ));
    }

    #[test]
    fn refuses_disk_files() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert!(matches!(
            Pool::open(&manifest, None, OnBlank::Refuse, None),
            Err(PoolError::Region(_))
        ));
    }
}
