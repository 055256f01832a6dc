//! The primary's directory of sharers (#12, `node/CACHE.md` steps C1 and C3): per cached
//! block, which clients (by the token they register under) hold it and until when their lease runs,
//! and, per update, the invalidation round that must end before the update is
//! acknowledged.
//!
//! Pure: time is passed in (`now_ns`, the primary's monotonic clock), nothing is sent.
//! A sharer stays in the directory until it acknowledges an invalidation or its lease
//! ends, whatever happens to its connection: a client whose connection broke may still
//! serve its cached blocks until then.

use std::collections::{BTreeSet, HashMap};

use pmgas_layout::PageId;

/// A client holding blocks: the token it registers under (its invalidation connection
/// announced it with `CacheListen`).
pub type Sharer = u64;

/// A block as one client caches it: page, log2 of the client's block size, block index.
type Block = (PageId, u32, u32);

/// Sharers per block (see the module head). Clients may use different block sizes; an
/// update invalidates every cached block of any size it overlaps.
#[derive(Debug)]
pub struct Directory {
    lease_ns: u64,
    /// Block -> sharer -> end of its lease.
    blocks: HashMap<Block, HashMap<Sharer, u64>>,
    /// The block sizes (log2) registered so far.
    shifts: BTreeSet<u32>,
}

impl Directory {
    pub fn new(lease_ns: u64) -> Self {
        Self {
            lease_ns,
            blocks: HashMap::new(),
            shifts: BTreeSet::new(),
        }
    }

    pub fn lease_ns(&self) -> u64 {
        self.lease_ns
    }

    /// C1: `sharer` caches block `block` of `block_bytes` (a power of two) of `page` from
    /// `now_ns`: returns the lease granted (a renewal extends it).
    pub fn register(
        &mut self,
        page: PageId,
        block_bytes: u32,
        block: u32,
        sharer: Sharer,
        now_ns: u64,
    ) -> u64 {
        let shift = block_bytes.max(1).ilog2();
        self.shifts.insert(shift);
        self.blocks
            .entry((page, shift, block))
            .or_default()
            .insert(sharer, now_ns.saturating_add(self.lease_ns));
        self.lease_ns
    }

    /// C2a: `sharer`, which holds block `block` (of `block_bytes`) of `page`, asks for its
    /// lease to be extended. Granted (from `now_ns`) only if it is still registered with
    /// a lease running: then no update of the block was ordered since it registered
    /// (every round takes the block's sharers), so the bytes it holds are current.
    pub fn renew(
        &mut self,
        page: PageId,
        block_bytes: u32,
        block: u32,
        sharer: Sharer,
        now_ns: u64,
    ) -> bool {
        let shift = block_bytes.max(1).ilog2();
        let lease = self.lease_ns;
        match self
            .blocks
            .get_mut(&(page, shift, block))
            .and_then(|s| s.get_mut(&sharer))
        {
            Some(end) if now_ns < *end => {
                *end = now_ns.saturating_add(lease);
                true
            }
            _ => false,
        }
    }

    /// Forgets every registration whose lease ended before `now_ns` (the data path calls
    /// it now and then: blocks nobody updates would otherwise keep their sharers forever).
    pub fn prune(&mut self, now_ns: u64) {
        self.blocks.retain(|_, sharers| {
            sharers.retain(|_, &mut end| now_ns < end);
            !sharers.is_empty()
        });
    }

    /// Registrations held now (all blocks, all sharers).
    pub fn len(&self) -> usize {
        self.blocks.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Sharers of the blocks of `page` that `len` bytes at `offset` overlap, whose lease
    /// has not ended at `now_ns` (the others are forgotten).
    pub fn sharers(&mut self, page: PageId, offset: u64, len: u64, now_ns: u64) -> usize {
        let mut all: Vec<Sharer> = vec![];
        for b in self.overlapping(page, offset, len) {
            if let Some(s) = self.blocks.get_mut(&b) {
                s.retain(|_, &mut end| now_ns < end);
                all.extend(s.keys().copied());
                if s.is_empty() {
                    self.blocks.remove(&b);
                }
            }
        }
        all.sort_unstable();
        all.dedup();
        all.len()
    }

    fn overlapping(&self, page: PageId, offset: u64, len: u64) -> Vec<Block> {
        let last = offset + len.max(1) - 1;
        let mut v = vec![];
        for &shift in &self.shifts {
            let (first, end) = (offset >> shift, last >> shift);
            for b in first..=end.min(u64::from(u32::MAX)) {
                v.push((page, shift, b as u32));
            }
        }
        v
    }

    /// C3: an update of `len` bytes at `offset` of `page` is about to be stored and
    /// acknowledged: the invalidation round it must finish first, over every sharer of an
    /// overlapping block whose lease has not ended. The sharers leave the directory now (a
    /// sharer that fills again registers again, and the primary answers a fill of a page
    /// whose round is open as uncacheable).
    pub fn invalidate(&mut self, page: PageId, offset: u64, len: u64, now_ns: u64) -> Round {
        let mut round = Round::default();
        for b in self.overlapping(page, offset, len) {
            if let Some(sharers) = self.blocks.remove(&b) {
                round.add(b, sharers, now_ns);
            }
        }
        round
    }

    /// C5: `page` is being freed here: one round over every live sharer of any of its
    /// blocks, which must end before the replica goes FREE (a cached block of a freed page
    /// must not be served for its lease).
    pub fn invalidate_page(&mut self, page: PageId, now_ns: u64) -> Round {
        let mut round = Round::default();
        let keys: Vec<Block> = self
            .blocks
            .keys()
            .filter(|k| k.0 == page)
            .copied()
            .collect();
        for b in keys {
            if let Some(sharers) = self.blocks.remove(&b) {
                round.add(b, sharers, now_ns);
            }
        }
        round
    }
}

/// One invalidation round: the sharers still to hear from, each until its lease ends,
/// with the blocks (page, block index in the sharer's own block size) each is to drop.
#[derive(Debug, Default)]
pub struct Round {
    pending: HashMap<Sharer, Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    end_ns: u64,
    blocks: Vec<(PageId, u32)>,
    unanswered: usize,
}

impl Round {
    fn add(&mut self, b: Block, sharers: HashMap<Sharer, u64>, now_ns: u64) {
        for (s, end) in sharers.into_iter().filter(|&(_, end)| now_ns < end) {
            let p = self.pending.entry(s).or_default();
            p.end_ns = p.end_ns.max(end);
            p.blocks.push((b.0, b.2));
            p.unanswered += 1;
        }
    }

    /// The Invalidate messages to send, all at once: (sharer, page, block).
    pub fn messages(&self) -> Vec<(Sharer, PageId, u32)> {
        let mut v: Vec<(Sharer, PageId, u32)> = self
            .pending
            .iter()
            .flat_map(|(&s, p)| p.blocks.iter().map(move |&(page, b)| (s, page, b)))
            .collect();
        v.sort_unstable();
        v
    }

    /// The sharers still waited for.
    pub fn sharers(&self) -> Vec<Sharer> {
        let mut v: Vec<Sharer> = self.pending.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// `sharer` acknowledged one of its Invalidates: once all, it dropped every block.
    pub fn acked(&mut self, sharer: Sharer) {
        if let Some(p) = self.pending.get_mut(&sharer) {
            p.unanswered = p.unanswered.saturating_sub(1);
            if p.unanswered == 0 {
                self.pending.remove(&sharer);
            }
        }
    }

    /// `sharer` cannot be told (no invalidation connection): waited for until its lease
    /// ends.
    pub fn unreachable(&mut self, sharer: Sharer) {
        if let Some(p) = self.pending.get_mut(&sharer) {
            p.unanswered = usize::MAX;
        }
    }

    /// Whether the update may be acknowledged at `now_ns`: every sharer acknowledged or
    /// its lease ended (it can no longer serve the block: its own end comes earlier).
    pub fn done(&mut self, now_ns: u64) -> bool {
        self.pending.retain(|_, p| now_ns < p.end_ns);
        self.pending.is_empty()
    }

    /// When the round ends at the latest, whatever the sharers do (None: done).
    pub fn deadline_ns(&self) -> Option<u64> {
        self.pending.values().map(|p| p.end_ns).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const B: u32 = 4096;

    #[test]
    fn an_update_waits_for_every_live_sharer_or_its_lease_never_longer() {
        let mut d = Directory::new(500 * MS);
        let p = PageId(3);
        assert_eq!(d.register(p, B, 1, 10, 0), 500 * MS);
        d.register(p, B, 1, 11, 100 * MS);
        d.register(p, B, 1, 12, 100 * MS);
        d.register(p, B, 2, 13, 100 * MS);
        // Sharer 10's lease ended at 500: not waited for. 8 bytes inside block 1.
        let mut r = d.invalidate(p, 4096 + 8, 8, 550 * MS);
        assert_eq!(r.sharers(), vec![11, 12]);
        assert_eq!(r.messages(), vec![(11, p, 1), (12, p, 1)]);
        assert!(!r.done(550 * MS));
        r.acked(11);
        assert!(!r.done(560 * MS), "12 neither answered nor expired");
        assert_eq!(r.deadline_ns(), Some(600 * MS));
        // A hung sharer delays the writer by at most its lease.
        assert!(r.done(600 * MS));
        // The round took the block's sharers: the next update waits for nobody...
        assert!(d.invalidate(p, 4096, 4096, 600 * MS).done(600 * MS));
        // ...but another block's sharer stays, and a renewal extends a lease.
        assert_eq!(d.sharers(p, 2 * 4096, 1, 550 * MS), 1);
        d.register(p, B, 2, 13, 550 * MS);
        assert_eq!(d.sharers(p, 2 * 4096, 1, 1_000 * MS), 1);
        assert_eq!(d.sharers(p, 2 * 4096, 1, 1_050 * MS), 0);
    }

    #[test]
    fn an_update_across_blocks_and_block_sizes_invalidates_each_overlap() {
        let mut d = Directory::new(500 * MS);
        let p = PageId(4);
        d.register(p, 64, 63, 1, 0); // bytes 4032..4096
        d.register(p, 64, 65, 1, 0); // bytes 4160..4224: not touched
        d.register(p, B, 1, 2, 0); // bytes 4096..8192
        d.register(p, 1 << 16, 0, 3, 0); // the first 64 KiB
        d.register(PageId(5), B, 0, 4, 0); // another page
        // 100 bytes at 4090: 4090..4190 overlaps 64-byte blocks 63, 64, 65 (only 63 and
        // 65 registered), 4 KiB blocks 0 and 1, the 64 KiB block 0.
        let mut r = d.invalidate(p, 4090, 100, 10 * MS);
        assert_eq!(
            r.messages(),
            vec![(1, p, 63), (1, p, 65), (2, p, 1), (3, p, 0)]
        );
        r.acked(1);
        r.acked(2);
        r.acked(3);
        assert_eq!(r.sharers(), vec![1], "sharer 1 answered one of its two");
        r.acked(1);
        assert!(r.done(10 * MS));
        // A sharer without a connection is waited for until its lease ends.
        d.register(p, B, 0, 9, 100 * MS);
        let mut r = d.invalidate(p, 0, 8, 100 * MS);
        r.unreachable(9);
        r.acked(9);
        assert!(!r.done(599 * MS));
        assert!(r.done(600 * MS));
        assert_eq!(d.sharers(PageId(5), 0, 4096, 10 * MS), 1);
    }

    #[test]
    fn a_renewal_extends_only_a_registration_no_update_has_taken() {
        let mut d = Directory::new(500 * MS);
        let p = PageId(6);
        d.register(p, B, 0, 1, 0);
        d.register(p, B, 1, 1, 0);
        // Running: extended from now.
        assert!(d.renew(p, B, 0, 1, 400 * MS));
        assert_eq!(d.sharers(p, 0, 1, 800 * MS), 1);
        // Ended: refused (an update may have been ordered without this sharer).
        assert!(!d.renew(p, B, 1, 1, 500 * MS));
        // Taken by an update's round: refused, and the next update waits for nobody.
        let _ = d.invalidate(p, 0, 8, 600 * MS);
        assert!(!d.renew(p, B, 0, 1, 600 * MS));
        assert!(d.invalidate(p, 0, 8, 600 * MS).done(600 * MS));
        // Never registered, or another block size: refused.
        assert!(!d.renew(p, B, 2, 1, 0));
        d.register(p, 64, 0, 2, 0);
        assert!(!d.renew(p, B, 0, 2, 0));
        assert!(d.renew(p, 64, 0, 2, 0));
        // Pruning forgets ended leases only.
        d.register(p, B, 7, 3, 1_000 * MS);
        d.prune(1_000 * MS);
        assert_eq!(d.len(), 1);
        d.prune(1_500 * MS);
        assert!(d.is_empty());
    }

    #[test]
    fn a_free_invalidates_every_block_of_the_page_once_per_sharer() {
        let mut d = Directory::new(500 * MS);
        let p = PageId(1);
        d.register(p, B, 0, 1, 0);
        d.register(p, B, 5, 1, 200 * MS);
        d.register(p, B, 5, 2, 0);
        d.register(PageId(2), B, 0, 1, 0);
        let mut r = d.invalidate_page(p, 100 * MS);
        assert_eq!(r.sharers(), vec![1, 2]);
        // Sharer 1 is waited for until its latest lease of the page's blocks.
        assert_eq!(r.deadline_ns(), Some(700 * MS));
        r.acked(2);
        assert!(!r.done(600 * MS));
        r.acked(1);
        r.acked(1);
        assert!(r.done(100 * MS));
        assert_eq!(d.sharers(p, 5 * 4096, 1, 100 * MS), 0);
        assert_eq!(d.sharers(PageId(2), 0, 1, 100 * MS), 1);
    }
}
