//! The object allocator: any size from 8 bytes up to a page (less its 128-byte slab
//! header and bitmap), inside ALLOCATED pages, crash-consistent and concurrent.
//!
//! Each object page is a *slab* of one size class: a 64-byte header, a bitmap with one bit
//! per slot, then the slots. The bitmap on PM is the only truth about which slots are
//! allocated; allocating or freeing is one atomic read-modify-write of one 8-byte bitmap
//! word, written back and fenced (P8, P9 in PERSISTENCE.md) before the caller learns the
//! result. So after a crash at any point no slot is both free and allocated, and no
//! allocation that was returned is lost. DRAM holds only indexes (free counts, queues of
//! slabs with room), rebuilt from the bitmaps on start.
//!
//! A page becomes a slab while still PREALLOCATED: its bitmap is zeroed (P5), the header
//! body written (P6) and its publish word last (P7); only then is the page committed
//! ALLOCATED in the ART (P4). The header records the ART sequence number the ALLOCATED
//! record will carry, so a header left in a page that is later freed and handed out
//! again never validates. A crash before the commit leaves a PREALLOCATED page, which
//! recovery frees (standalone: at open; in a cluster: reconciliation with the GAT).
//!
//! Concurrency: slabs with free slots wait in one lock-free queue per size class
//! (crossbeam `SegQueue`); each thread takes slabs from it into its own [`ThreadCache`]
//! and allocates from them; frees from any thread clear bits atomically and put a slab
//! that was full back on its queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_queue::SegQueue;
use pmgas_layout::{ArtRecord, Epoch, GlobalAddr, PageId, PageIndex, PageState};

use crate::pool::{Pool, PoolError};

pub const SLAB_MAGIC: [u8; 8] = *b"PMGASSLB";
pub const SLAB_VERSION: u32 = 1;
pub const SLAB_HEADER_BYTES: u64 = 64;
const SLAB_SHARDS: usize = 64;
/// The smallest object and the alignment of every object.
pub const MIN_OBJECT_BYTES: u32 = 8;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    #[error("object of {size} bytes: sizes run from 8 to {max} bytes on this pool")]
    BadSize { size: u64, max: u64 },
    #[error("{addr:#x} is not an object of this node ({reason})")]
    NotAnObject { addr: u64, reason: &'static str },
    #[error("{addr:#x} is already free")]
    DoubleFree { addr: u64 },
    #[error("no space for a new slab: {0}")]
    NoSpace(PoolError),
    #[error("no page for a new slab: {0}")]
    PageSource(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Where object pages come from: turns a prepared (PREALLOCATED) page into an ALLOCATED
/// one with a global page id. Standalone nodes number pages themselves; cluster nodes
/// run the monitor's two-phase allocation ([`crate::Client`]).
pub trait PageSource: Send + Sync {
    /// Commits `page` (the next ART transition of it must be this commit) and returns its
    /// new record. On an error the page is FREE again, or PREALLOCATED if the outcome is
    /// unknown (reconciliation settles it); either way it is not a slab.
    fn commit(&self, pool: &Pool, page: PageIndex) -> Result<ArtRecord, ObjectError>;
}

/// Standalone (development) numbering: page id = page index + 1, epoch 0.
pub struct LocalPageIds;

impl PageSource for LocalPageIds {
    fn commit(&self, pool: &Pool, page: PageIndex) -> Result<ArtRecord, ObjectError> {
        Ok(pool.transition(page, PageState::Allocated, PageId(page.0 + 1), Epoch(0))?)
    }
}

/// The size classes for a page size: 8, 16, 24, 32, 48, 64, 96, 128, … (powers of two and
/// the midpoints between them), up to the largest object a one-slot slab holds.
pub fn size_classes(page_size_bytes: u64) -> Vec<u32> {
    let max = max_object_bytes(page_size_bytes);
    let mut out = vec![];
    let mut p = MIN_OBJECT_BYTES as u64;
    while p <= max {
        out.push(p as u32);
        let mid = p + p / 2;
        if mid.is_multiple_of(8) && mid <= max && mid < 2 * p {
            out.push(mid as u32);
        }
        p *= 2;
    }
    if out.last().is_some_and(|&l| (l as u64) < max) {
        out.push(max as u32);
    }
    out
}

/// The largest object: a page less the slab header and one 64-byte bitmap block.
pub fn max_object_bytes(page_size_bytes: u64) -> u64 {
    (page_size_bytes - SLAB_HEADER_BYTES - 64) / 8 * 8
}

/// Slot count and slots offset of a slab of `class_bytes` in a page.
pub fn slab_geometry(page_size_bytes: u64, class_bytes: u32) -> (u32, u64) {
    let c = class_bytes as u64;
    let mut n = (page_size_bytes - SLAB_HEADER_BYTES) * 8 / (8 * c + 1);
    loop {
        let bitmap_bytes = n.div_ceil(512) * 64;
        let slots = SLAB_HEADER_BYTES + bitmap_bytes;
        if slots + n * c <= page_size_bytes {
            return (n.min(u32::MAX as u64) as u32, slots);
        }
        n -= 1;
    }
}

/// The slab header as stored in the first 64 bytes of an object page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlabHeader {
    class_bytes: u32,
    slot_count: u32,
    slots_offset: u32,
    art_seq: u64,
}

impl SlabHeader {
    fn encode(&self, page: PageIndex) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[4..8].copy_from_slice(&SLAB_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&SLAB_MAGIC);
        b[16..20].copy_from_slice(&self.class_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&self.slot_count.to_le_bytes());
        b[24..28].copy_from_slice(&(SLAB_HEADER_BYTES as u32).to_le_bytes());
        b[28..32].copy_from_slice(&self.slots_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.art_seq.to_le_bytes());
        b[40..44].copy_from_slice(&page.0.to_le_bytes());
        let sum = pmgas_layout::pool::crc32c(&b[4..]);
        b[0..4].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the page it sits in and its ART record.
    fn decode(b: &[u8; 64], page: PageIndex, art_seq: u64, page_size_bytes: u64) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[32..40]);
        let h = Self {
            class_bytes: u32_at(16),
            slot_count: u32_at(20),
            slots_offset: u32_at(28),
            art_seq: u64::from_le_bytes(seq),
        };
        let valid = u32_at(0) == pmgas_layout::pool::crc32c(&b[4..])
            && u32_at(4) == SLAB_VERSION
            && b[8..16] == SLAB_MAGIC
            && u32_at(24) == SLAB_HEADER_BYTES as u32
            && u32_at(40) == page.0
            && b[44..].iter().all(|&x| x == 0)
            && h.art_seq == art_seq
            && h.class_bytes >= MIN_OBJECT_BYTES
            && h.class_bytes as u64 <= max_object_bytes(page_size_bytes)
            && slab_geometry(page_size_bytes, h.class_bytes)
                == (h.slot_count, h.slots_offset as u64);
        valid.then_some(h)
    }
}

/// DRAM index of one slab.
struct Slab {
    page: PageIndex,
    page_id: PageId,
    class: usize,
    class_bytes: u32,
    slot_count: u32,
    slots_offset: u64,
    /// Pool offset of the page.
    base: u64,
    free: AtomicU32,
    /// Whether the slab sits in its class's queue (so it is pushed at most once).
    queued: AtomicBool,
    /// Bitmap word to start the next search at.
    hint: AtomicU32,
}

impl Slab {
    fn bitmap_words(&self) -> u32 {
        self.slot_count.div_ceil(64)
    }

    /// The bits of bitmap word `w` that stand for real slots.
    fn valid_mask(&self, w: u32) -> u64 {
        if (w + 1) * 64 <= self.slot_count {
            u64::MAX
        } else {
            (1u64 << (self.slot_count % 64)) - 1
        }
    }
}

/// Counts, for operators and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectStats {
    pub slabs: u32,
    pub allocated_objects: u64,
    pub free_slots: u64,
}

pub struct ObjectAllocator {
    pool: Arc<Pool>,
    source: Box<dyn PageSource>,
    classes: Vec<u32>,
    page_size_bytes: u64,
    /// Slabs by page id, in shards so that frees on different pages never touch the same
    /// lock word.
    slabs: Vec<RwLock<HashMap<PageId, Arc<Slab>>>>,
    partial: Vec<SegQueue<Arc<Slab>>>,
    /// Serialises taking new pages, so that two threads never both grow one class.
    grow: Mutex<()>,
}

impl ObjectAllocator {
    /// Rebuilds the DRAM indexes from the pool. With `free_preallocated`, PREALLOCATED
    /// pages (slabs whose commit a crash interrupted) are freed first — right for a
    /// standalone node; cluster nodes leave them to reconciliation with the GAT.
    pub fn open(
        pool: Arc<Pool>,
        source: Box<dyn PageSource>,
        free_preallocated: bool,
    ) -> Result<Self, ObjectError> {
        let page_size_bytes = pool.header().page_size_bytes;
        let classes = size_classes(page_size_bytes);
        let me = Self {
            partial: classes.iter().map(|_| SegQueue::new()).collect(),
            classes,
            page_size_bytes,
            slabs: (0..SLAB_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
            grow: Mutex::new(()),
            source,
            pool,
        };
        let art = me.pool.art();
        for (page, rec) in art.iter() {
            match rec.state {
                PageState::Preallocated if free_preallocated => {
                    me.pool
                        .transition(page, PageState::Free, PageId(0), Epoch(0))?;
                }
                PageState::Allocated => {
                    if let Some(slab) = me.load_slab(page, rec.page_id, rec.seq) {
                        me.index(slab);
                    }
                }
                _ => {}
            }
        }
        Ok(me)
    }

    fn load_slab(&self, page: PageIndex, page_id: PageId, art_seq: u64) -> Option<Arc<Slab>> {
        let mut hb = [0u8; 64];
        self.pool.read_in_page(page, 0, &mut hb).ok()?;
        let h = SlabHeader::decode(&hb, page, art_seq, self.page_size_bytes)?;
        let class = self.classes.iter().position(|&c| c == h.class_bytes)?;
        let base = self.pool.header().page_offset(page)?;
        let slab = Slab {
            page,
            page_id,
            class,
            class_bytes: h.class_bytes,
            slot_count: h.slot_count,
            slots_offset: h.slots_offset as u64,
            base,
            free: AtomicU32::new(0),
            queued: AtomicBool::new(false),
            hint: AtomicU32::new(0),
        };
        let used: u32 = (0..slab.bitmap_words())
            .map(|w| {
                let word = self
                    .pool
                    .pmem()
                    .load_word(base + SLAB_HEADER_BYTES + w as u64 * 8);
                let valid = slab.valid_mask(w);
                (word & valid).count_ones()
            })
            .sum();
        slab.free.store(slab.slot_count - used, Ordering::Relaxed);
        Some(Arc::new(slab))
    }

    fn index(&self, slab: Arc<Slab>) {
        if slab.free.load(Ordering::Relaxed) > 0 {
            slab.queued.store(true, Ordering::Relaxed);
            self.partial[slab.class].push(Arc::clone(&slab));
        }
        self.insert_slab(slab);
    }

    fn shard(&self, page_id: PageId) -> &RwLock<HashMap<PageId, Arc<Slab>>> {
        &self.slabs[page_id.0 as usize % SLAB_SHARDS]
    }

    fn insert_slab(&self, slab: Arc<Slab>) {
        self.shard(slab.page_id)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slab.page_id, slab);
    }

    fn all_slabs(&self) -> Vec<Arc<Slab>> {
        self.slabs
            .iter()
            .flat_map(|s| {
                s.read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn max_object_bytes(&self) -> u64 {
        max_object_bytes(self.page_size_bytes)
    }

    pub fn classes(&self) -> &[u32] {
        &self.classes
    }

    /// A per-thread allocation handle.
    pub fn thread_cache(&self) -> ThreadCache<'_> {
        ThreadCache {
            alloc: self,
            current: vec![None; self.classes.len()],
        }
    }

    fn class_for(&self, size: u64) -> Result<usize, ObjectError> {
        if size == 0 || size > self.max_object_bytes() {
            return Err(ObjectError::BadSize {
                size,
                max: self.max_object_bytes(),
            });
        }
        Ok(self.classes.partition_point(|&c| (c as u64) < size))
    }

    /// Makes a new slab of `class`: P5–P7 on a PREALLOCATED page, then the P4 commit.
    fn grow(&self, class: usize) -> Result<Arc<Slab>, ObjectError> {
        let _guard = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        // Another thread may have grown this class while we waited.
        if let Some(slab) = self.partial[class].pop() {
            return Ok(slab);
        }
        let page = self.pool.preallocate().map_err(ObjectError::NoSpace)?;
        let prealloc_seq = self.pool.record(page)?.seq;
        let class_bytes = self.classes[class];
        let (slot_count, slots_offset) = slab_geometry(self.page_size_bytes, class_bytes);
        let bitmap_bytes = slots_offset - SLAB_HEADER_BYTES;
        let base = self
            .pool
            .header()
            .page_offset(page)
            .ok_or(PoolError::OutOfPage {
                offset: 0,
                len: 0,
                page_size: self.page_size_bytes,
            })?;
        let header = SlabHeader {
            class_bytes,
            slot_count,
            slots_offset: slots_offset as u32,
            art_seq: prealloc_seq + 1,
        };
        let bytes = header.encode(page);
        assert_eq!(
            SlabHeader::decode(&bytes, page, prealloc_seq + 1, self.page_size_bytes),
            Some(header)
        );
        let pmem = self.pool.pmem();
        // P5: a clean bitmap (the page may hold anything from an earlier life).
        pmem.zero(
            "P5 zero slab bitmap",
            base + SLAB_HEADER_BYTES,
            bitmap_bytes,
        );
        // P6, P7: header body, then its publish word. Until the P4 commit below, the header
        // names an ART sequence number the page does not have yet, so it is not valid.
        pmem.store("P6 slab header body", base + 8, &bytes[8..]);
        pmem.store("P7 slab publish", base, &bytes[..8]);
        let rec = self.source.commit(&self.pool, page)?;
        if rec.seq != header.art_seq || rec.state != PageState::Allocated {
            return Err(ObjectError::PageSource(format!(
                "page {} committed as {rec:?}, not as the slab header expects",
                page.0
            )));
        }
        let slab = self
            .load_slab(page, rec.page_id, rec.seq)
            .ok_or(ObjectError::NotAnObject {
                addr: 0,
                reason: "a new slab does not validate",
            })?;
        self.insert_slab(Arc::clone(&slab));
        Ok(slab)
    }

    /// Claims one free slot of `slab` (P8), or `None` if it is full.
    fn claim(&self, slab: &Slab) -> Option<u32> {
        let words = slab.bitmap_words();
        let start = slab.hint.load(Ordering::Relaxed) % words.max(1);
        let pmem = self.pool.pmem();
        for k in 0..words {
            let w = (start + k) % words;
            let offset = slab.base + SLAB_HEADER_BYTES + w as u64 * 8;
            loop {
                let word = pmem.load_word(offset);
                let valid = slab.valid_mask(w);
                let free = !word & valid;
                if free == 0 {
                    break;
                }
                let bit = free.trailing_zeros();
                // P8: the allocation is durable once this word is written back.
                let old = pmem.update_bits("P8 allocate slot", offset, 1u64 << bit, true);
                if old & (1u64 << bit) == 0 {
                    slab.hint.store(w, Ordering::Relaxed);
                    slab.free.fetch_sub(1, Ordering::AcqRel);
                    return Some(w * 64 + bit);
                }
                // Another thread took it first: look again.
            }
        }
        None
    }

    fn addr_of(&self, slab: &Slab, slot: u32) -> GlobalAddr {
        let offset = slab.slots_offset + slot as u64 * slab.class_bytes as u64;
        // Offsets inside a page are below the page size by construction.
        GlobalAddr::new(slab.page_id, offset, self.page_size_bytes)
            .expect("slot offset inside its page")
    }

    fn locate(&self, addr: GlobalAddr) -> Result<(Arc<Slab>, u32), ObjectError> {
        let raw = addr.raw();
        let slab = self
            .shard(addr.page())
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr.page())
            .cloned()
            .ok_or(ObjectError::NotAnObject {
                addr: raw,
                reason: "no slab on that page",
            })?;
        let off = addr.offset();
        if off < slab.slots_offset {
            return Err(ObjectError::NotAnObject {
                addr: raw,
                reason: "inside the slab header",
            });
        }
        let rel = off - slab.slots_offset;
        if !rel.is_multiple_of(slab.class_bytes as u64) {
            return Err(ObjectError::NotAnObject {
                addr: raw,
                reason: "not at the start of a slot",
            });
        }
        let slot = rel / slab.class_bytes as u64;
        if slot >= slab.slot_count as u64 {
            return Err(ObjectError::NotAnObject {
                addr: raw,
                reason: "past the last slot",
            });
        }
        Ok((slab, slot as u32))
    }

    /// Frees an object (P9). Freeing an address that is not an allocated object is an
    /// error and changes nothing.
    pub fn free(&self, addr: GlobalAddr) -> Result<(), ObjectError> {
        let (slab, slot) = self.locate(addr)?;
        let offset = slab.base + SLAB_HEADER_BYTES + (slot / 64) as u64 * 8;
        let mask = 1u64 << (slot % 64);
        if self.pool.pmem().load_word(offset) & mask == 0 {
            return Err(ObjectError::DoubleFree { addr: addr.raw() });
        }
        // P9: the free is durable once this word is written back.
        let old = self
            .pool
            .pmem()
            .update_bits("P9 free slot", offset, mask, false);
        if old & mask == 0 {
            // Raced with another free of the same object: that one won.
            return Err(ObjectError::DoubleFree { addr: addr.raw() });
        }
        if slab.free.fetch_add(1, Ordering::AcqRel) == 0
            && !slab.queued.swap(true, Ordering::AcqRel)
        {
            self.partial[slab.class].push(slab);
        }
        Ok(())
    }

    /// The size of the slot an allocated object occupies.
    pub fn usable_size(&self, addr: GlobalAddr) -> Result<u32, ObjectError> {
        let (slab, slot) = self.locate(addr)?;
        let offset = slab.base + SLAB_HEADER_BYTES + (slot / 64) as u64 * 8;
        if self.pool.pmem().load_word(offset) & (1u64 << (slot % 64)) == 0 {
            return Err(ObjectError::NotAnObject {
                addr: addr.raw(),
                reason: "not allocated",
            });
        }
        Ok(slab.class_bytes)
    }

    /// The pool page an object lives in, and its offset there.
    pub fn page_of(&self, addr: GlobalAddr) -> Result<(PageIndex, u64), ObjectError> {
        let (slab, _) = self.locate(addr)?;
        Ok((slab.page, addr.offset()))
    }

    /// Every allocated object, from the PM bitmaps (for checks and inspection).
    pub fn allocated(&self) -> Vec<(GlobalAddr, u32)> {
        let slabs = self.all_slabs();
        let mut out = vec![];
        for slab in slabs {
            for w in 0..slab.bitmap_words() {
                let mut word = self
                    .pool
                    .pmem()
                    .load_word(slab.base + SLAB_HEADER_BYTES + w as u64 * 8);
                while word != 0 {
                    let bit = word.trailing_zeros();
                    word &= word - 1;
                    let slot = w * 64 + bit;
                    if slot < slab.slot_count {
                        out.push((self.addr_of(&slab, slot), slab.class_bytes));
                    }
                }
            }
        }
        out.sort();
        out
    }

    pub fn stats(&self) -> ObjectStats {
        let slabs = self.all_slabs();
        let free: u64 = slabs
            .iter()
            .map(|s| s.free.load(Ordering::Relaxed) as u64)
            .sum();
        let slots: u64 = slabs.iter().map(|s| s.slot_count as u64).sum();
        ObjectStats {
            slabs: slabs.len() as u32,
            allocated_objects: slots - free,
            free_slots: free,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

/// One thread's allocation handle: the slab it currently allocates from, per class.
pub struct ThreadCache<'a> {
    alloc: &'a ObjectAllocator,
    current: Vec<Option<Arc<Slab>>>,
}

impl ThreadCache<'_> {
    /// Allocates an object of at least `size` bytes; returns its global address once the
    /// allocation is durable.
    pub fn alloc(&mut self, size: u64) -> Result<GlobalAddr, ObjectError> {
        let a = self.alloc;
        let class = a.class_for(size)?;
        loop {
            let slab = match self.current[class].take() {
                Some(s) => s,
                None => match a.partial[class].pop() {
                    Some(s) => {
                        s.queued.store(false, Ordering::Release);
                        s
                    }
                    None => a.grow(class)?,
                },
            };
            if let Some(slot) = a.claim(&slab) {
                let addr = a.addr_of(&slab, slot);
                self.current[class] = Some(slab);
                return Ok(addr);
            }
            // Full (other threads took the rest): a later free re-queues it.
        }
    }

    pub fn free(&mut self, addr: GlobalAddr) -> Result<(), ObjectError> {
        self.alloc.free(addr)
    }
}

impl Drop for ThreadCache<'_> {
    fn drop(&mut self) {
        // Hand slabs with room back to their queues for other threads.
        for slab in self.current.drain(..).flatten() {
            if slab.free.load(Ordering::Acquire) > 0 && !slab.queued.swap(true, Ordering::AcqRel) {
                self.alloc.partial[slab.class].push(slab);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{OnBlank, PoolIdentity};
    use pmgas_layout::{ClusterId, NodeId};
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;

    struct TempPool(std::path::PathBuf);

    impl Drop for TempPool {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn open(tag: &str, bytes: u64, page: u64) -> (TempPool, Arc<Pool>) {
        let t = TempPool(format!("/dev/shm/pmgas-obj-{tag}-{}", std::process::id()).into());
        let _ = std::fs::remove_file(&t.0);
        let id = PoolIdentity {
            cluster_id: ClusterId(1),
            node_id: NodeId(1),
            page_size_bytes: page,
        };
        let pool = Pool::open(&t.0, Some(bytes), OnBlank::Format(id), Some(id)).unwrap();
        (t, Arc::new(pool))
    }

    #[test]
    fn classes_and_geometry() {
        let classes = size_classes(2 * MIB);
        assert_eq!(&classes[..8], &[8, 16, 24, 32, 48, 64, 96, 128]);
        assert_eq!(*classes.last().unwrap() as u64, max_object_bytes(2 * MIB));
        assert!(classes.windows(2).all(|w| w[0] < w[1]));
        for &c in &classes {
            let (n, slots) = slab_geometry(2 * MIB, c);
            assert!(n >= 1, "class {c}");
            assert!(slots + n as u64 * c as u64 <= 2 * MIB);
            assert!(slots >= SLAB_HEADER_BYTES + (n as u64).div_ceil(8));
            assert_eq!(slots % 64, 0);
        }
        assert_eq!(slab_geometry(4096, 8).0, 496);
    }

    #[test]
    fn alloc_free_and_reuse() {
        let (_t, pool) = open("basic", 16 * MIB, 64 * 1024);
        let a = ObjectAllocator::open(pool, Box::new(LocalPageIds), true).unwrap();
        let mut tc = a.thread_cache();
        let mut seen = HashSet::new();
        for size in [1u64, 8, 9, 100, 4096, 30_000, a.max_object_bytes()] {
            let addr = tc.alloc(size).unwrap();
            assert!(seen.insert(addr));
            assert!(a.usable_size(addr).unwrap() as u64 >= size);
            assert_eq!(addr.offset() % 8, 0);
        }
        assert!(matches!(tc.alloc(0), Err(ObjectError::BadSize { .. })));
        assert!(matches!(
            tc.alloc(a.max_object_bytes() + 1),
            Err(ObjectError::BadSize { .. })
        ));
        let x = tc.alloc(64).unwrap();
        tc.free(x).unwrap();
        assert!(matches!(tc.free(x), Err(ObjectError::DoubleFree { .. })));
        assert!(matches!(
            tc.free(GlobalAddr::new(x.page(), x.offset() + 8, 64 * 1024).unwrap()),
            Err(ObjectError::NotAnObject { .. })
        ));
        assert!(matches!(
            tc.free(GlobalAddr::new(PageId(999), 128, 64 * 1024).unwrap()),
            Err(ObjectError::NotAnObject { .. })
        ));
        assert_eq!(tc.alloc(64).unwrap(), x, "a freed slot is reused");
        assert_eq!(a.allocated().len(), seen.len() + 1);
    }

    #[test]
    fn fills_the_pool_then_reports_no_space() {
        let (_t, pool) = open("full", 4 * MIB, 64 * 1024);
        let pages = pool.header().page_count as u64;
        let a = ObjectAllocator::open(pool, Box::new(LocalPageIds), true).unwrap();
        let mut tc = a.thread_cache();
        let mut n = 0u64;
        let err = loop {
            match tc.alloc(16 * 1024) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ObjectError::NoSpace(_)), "{err}");
        assert_eq!(n, pages * slab_geometry(64 * 1024, 16 * 1024).0 as u64);
        assert_eq!(a.stats().free_slots, 0);
    }

    #[test]
    fn rebuild_after_reopen_matches() {
        let (t, pool) = open("rebuild", 16 * MIB, 64 * 1024);
        let a = ObjectAllocator::open(pool, Box::new(LocalPageIds), true).unwrap();
        let mut tc = a.thread_cache();
        let mut live = vec![];
        for i in 0..2000u64 {
            live.push(tc.alloc(8 + (i * 37) % 3000).unwrap());
        }
        for addr in live.iter().step_by(3) {
            tc.free(*addr).unwrap();
        }
        let before = a.allocated();
        let stats = a.stats();
        drop(tc);
        drop(a);
        let id = PoolIdentity {
            cluster_id: ClusterId(1),
            node_id: NodeId(1),
            page_size_bytes: 64 * 1024,
        };
        let pool = Arc::new(Pool::open(&t.0, None, OnBlank::Refuse, Some(id)).unwrap());
        let b = ObjectAllocator::open(pool, Box::new(LocalPageIds), true).unwrap();
        assert_eq!(b.allocated(), before);
        assert_eq!(b.stats(), stats);
        let mut tc = b.thread_cache();
        let fresh: HashSet<_> = (0..500).map(|_| tc.alloc(24).unwrap()).collect();
        assert!(
            before.iter().all(|(addr, _)| !fresh.contains(addr)),
            "a live object was handed out again"
        );
    }

    #[test]
    fn threads_never_share_an_object() {
        let (_t, pool) = open("threads", 32 * MIB, 64 * 1024);
        let a = ObjectAllocator::open(pool, Box::new(LocalPageIds), true).unwrap();
        // Every allocation goes into one shared queue; every fourth iteration a thread
        // frees whatever object it pops from it, usually another thread's.
        let shared = SegQueue::new();
        let freed = SegQueue::new();
        let per_thread: Vec<Vec<GlobalAddr>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let (a, shared, freed) = (&a, &shared, &freed);
                    s.spawn(move || {
                        let mut tc = a.thread_cache();
                        let mut mine = vec![];
                        for i in 0..3000u64 {
                            let addr = tc.alloc(16 + (i % 5) * 8).unwrap();
                            mine.push(addr);
                            shared.push(addr);
                            if i % 4 == t
                                && let Some(victim) = shared.pop()
                            {
                                a.free(victim).unwrap();
                                freed.push(victim);
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Net count per address: +1 per allocation, -1 per free. A count of 2 would mean
        // one object handed to two owners at once.
        let mut net: HashMap<GlobalAddr, i64> = HashMap::new();
        for addr in per_thread.into_iter().flatten() {
            *net.entry(addr).or_default() += 1;
        }
        while let Some(f) = freed.pop() {
            *net.entry(f).or_default() -= 1;
        }
        assert!(
            net.values().all(|&n| n == 0 || n == 1),
            "an object was live twice"
        );
        let live: HashSet<GlobalAddr> = net
            .into_iter()
            .filter(|(_, n)| *n == 1)
            .map(|(a, _)| a)
            .collect();
        let allocated: HashSet<GlobalAddr> = a.allocated().into_iter().map(|(x, _)| x).collect();
        assert_eq!(
            allocated, live,
            "the bitmaps disagree with what was handed out"
        );
        assert_eq!(allocated.len() as u64, a.stats().allocated_objects);
    }
}
