//! The client's block cache (#12, `node/CACHE.md`): blocks of pages held in DRAM under
//! leases the pages' primaries granted, within a byte budget, evicted by CLOCK.
//!
//! Pure: time is passed in (`now_ns`, one monotonic clock of this process), nothing is
//! sent. The client fills a block on a miss (step C1), serves hits (C2), drops a block the
//! primary invalidates (C3) and drops everything when the epoch moves (C4).

use std::collections::HashMap;

use pmgas_layout::{Epoch, PageId};

/// What the cache is, per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes per block: a power of two, at most the page size.
    pub block_bytes: usize,
    /// DRAM for blocks; at least one block.
    pub budget_bytes: usize,
    /// Taken off every lease the primary grants (see CACHE.md: the clock assumption).
    pub margin_ns: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_bytes: 4096,
            budget_bytes: 64 << 20,
            margin_ns: 50_000_000,
        }
    }
}

impl CacheConfig {
    /// Checks the configuration against the page size.
    pub fn validate(&self, page_size_bytes: u64) -> Result<(), String> {
        if !self.block_bytes.is_power_of_two() || self.block_bytes as u64 > page_size_bytes {
            return Err(format!(
                "block size {} is not a power of two of at most the page size {page_size_bytes}",
                self.block_bytes
            ));
        }
        if self.budget_bytes < self.block_bytes {
            return Err(format!(
                "a budget of {} bytes holds no block of {}",
                self.budget_bytes, self.block_bytes
            ));
        }
        Ok(())
    }
}

/// A block: its page and its index within the page.
pub type BlockKey = (PageId, u32);

/// The cache's counters, for the operator and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses because the block's lease had run out.
    pub expired: u64,
    pub fills: u64,
    pub invalidations: u64,
    pub evictions: u64,
    /// Leases extended by a renewal (C2a).
    pub renewals: u64,
}

#[derive(Debug)]
struct Slot {
    key: BlockKey,
    bytes: Box<[u8]>,
    /// The client's end of the lease (already less the margin).
    expires_ns: u64,
    epoch: Epoch,
    referenced: bool,
    /// Hit since its lease was last renewed (C2a renews only blocks in use).
    used: bool,
}

/// Blocks in DRAM (see the module head).
#[derive(Debug)]
pub struct BlockCache {
    config: CacheConfig,
    slots: Vec<Option<Slot>>,
    index: HashMap<BlockKey, usize>,
    hand: usize,
    stats: CacheStats,
    /// Counts invalidations and drops (see [`Self::begin_fill`]).
    generation: u64,
    /// Fills begun and not ended.
    filling: usize,
    /// While fills are in progress: the generation at which each block was last
    /// invalidated, and the last generation that dropped many blocks at once.
    invalidated_at: HashMap<BlockKey, u64>,
    dropped_all_at: u64,
}

/// A fill in progress: the cache generation when its registration was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct FillTicket(u64);

impl BlockCache {
    pub fn new(config: CacheConfig) -> Self {
        let capacity = (config.budget_bytes / config.block_bytes.max(1)).max(1);
        Self {
            config,
            slots: (0..capacity).map(|_| None).collect(),
            index: HashMap::new(),
            hand: 0,
            stats: CacheStats::default(),
            generation: 0,
            filling: 0,
            invalidated_at: HashMap::new(),
            dropped_all_at: 0,
        }
    }

    /// C1, before the registration is sent: an invalidation of the block may reach this
    /// client before the fill's READs end (the primary invalidates every registered
    /// sharer). The ticket remembers that, so [`Self::end_fill`] does not install bytes
    /// that an update acknowledged meanwhile made stale.
    pub fn begin_fill(&mut self) -> FillTicket {
        self.filling += 1;
        FillTicket(self.generation)
    }

    /// C1, after the fill: installs the block as [`Self::insert`] does, unless the block
    /// (or everything) was invalidated since `ticket` was taken. Returns whether it was
    /// installed. Every ticket must end here (with `bytes` None if the fill failed).
    pub fn end_fill(
        &mut self,
        ticket: FillTicket,
        key: BlockKey,
        bytes: Option<&[u8]>,
        epoch: Epoch,
        requested_ns: u64,
        lease_ns: u64,
    ) -> bool {
        let invalidated = self.invalidated_since(ticket, key);
        self.release(ticket);
        match bytes {
            Some(b) if !invalidated => self.insert(key, b, epoch, requested_ns, lease_ns),
            _ => false,
        }
    }

    fn invalidated_since(&self, ticket: FillTicket, key: BlockKey) -> bool {
        self.dropped_all_at > ticket.0
            || self.invalidated_at.get(&key).is_some_and(|&g| g > ticket.0)
    }

    fn release(&mut self, _ticket: FillTicket) {
        self.filling = self.filling.saturating_sub(1);
        if self.filling == 0 {
            self.invalidated_at.clear();
        }
    }

    /// C2a: the blocks to renew now: hit since their last renewal, lease running and
    /// ending before `now_ns + within_ns`. Each is marked unused again.
    pub fn due_for_renewal(&mut self, now_ns: u64, within_ns: u64) -> Vec<BlockKey> {
        let mut due = vec![];
        for slot in self.slots.iter_mut().flatten() {
            if slot.used && now_ns < slot.expires_ns && slot.expires_ns < now_ns + within_ns {
                slot.used = false;
                due.push(slot.key);
            }
        }
        due
    }

    /// C2a, after the primary answered a renewal sent at `sent_ns` (its ticket taken
    /// before): each of `renewed` still held and not invalidated since has its lease
    /// extended to `sent_ns + lease_ns − margin`. Every ticket must end here (with
    /// nothing renewed if the request failed).
    pub fn end_renewal(
        &mut self,
        ticket: FillTicket,
        renewed: &[BlockKey],
        sent_ns: u64,
        lease_ns: u64,
    ) -> usize {
        let mut n = 0;
        if lease_ns > self.config.margin_ns {
            let expires_ns = sent_ns.saturating_add(lease_ns - self.config.margin_ns);
            for &key in renewed {
                if self.invalidated_since(ticket, key) {
                    continue;
                }
                if let Some(slot) = self.index.get(&key).and_then(|&i| self.slots[i].as_mut()) {
                    slot.expires_ns = slot.expires_ns.max(expires_ns);
                    n += 1;
                }
            }
        }
        self.stats.renewals += n as u64;
        self.release(ticket);
        n
    }

    fn note_invalidated(&mut self, key: Option<BlockKey>) {
        self.generation += 1;
        if self.filling == 0 {
            return;
        }
        match key {
            Some(k) => {
                self.invalidated_at.insert(k, self.generation);
            }
            None => self.dropped_all_at = self.generation,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// C2: copies `out.len()` bytes at `offset` of block `key` into `out` if the block is
    /// cached, filled in `epoch`, and its lease has not ended at `now_ns`. Counts a hit or
    /// a miss. An expired block is dropped.
    pub fn get(
        &mut self,
        key: BlockKey,
        offset: usize,
        out: &mut [u8],
        epoch: Epoch,
        now_ns: u64,
    ) -> bool {
        let Some(&i) = self.index.get(&key) else {
            self.stats.misses += 1;
            return false;
        };
        let Some(slot) = self.slots[i].as_mut() else {
            self.stats.misses += 1;
            return false;
        };
        if slot.epoch != epoch || now_ns >= slot.expires_ns {
            self.stats.misses += 1;
            self.stats.expired += u64::from(now_ns >= slot.expires_ns);
            self.remove_at(i);
            return false;
        }
        let Some(src) = offset
            .checked_add(out.len())
            .and_then(|end| slot.bytes.get(offset..end))
        else {
            self.stats.misses += 1;
            return false;
        };
        out.copy_from_slice(src);
        slot.referenced = true;
        slot.used = true;
        self.stats.hits += 1;
        true
    }

    /// C1: installs block `key` as filled in `epoch`, with a lease of `lease_ns` granted by
    /// the primary for a request the client sent at `requested_ns` (the lease is counted
    /// from then, less the margin). A block of the wrong size, or a lease no longer than
    /// the margin, is not installed. Evicts by CLOCK when full.
    pub fn insert(
        &mut self,
        key: BlockKey,
        bytes: &[u8],
        epoch: Epoch,
        requested_ns: u64,
        lease_ns: u64,
    ) -> bool {
        if bytes.len() != self.config.block_bytes || lease_ns <= self.config.margin_ns {
            return false;
        }
        let expires_ns = requested_ns.saturating_add(lease_ns - self.config.margin_ns);
        if let Some(&i) = self.index.get(&key) {
            self.remove_at(i);
        }
        let i = self.free_slot();
        self.slots[i] = Some(Slot {
            key,
            bytes: bytes.into(),
            expires_ns,
            epoch,
            referenced: false,
            used: false,
        });
        self.index.insert(key, i);
        self.stats.fills += 1;
        true
    }

    /// C3: the primary invalidated block `key` (or this client wrote it). Returns whether
    /// it was held.
    pub fn invalidate(&mut self, key: BlockKey) -> bool {
        self.stats.invalidations += 1;
        self.note_invalidated(Some(key));
        match self.index.get(&key) {
            Some(&i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }

    /// This client updates block `key`: its copy goes (not counted as an invalidation).
    pub fn forget(&mut self, key: BlockKey) {
        self.note_invalidated(Some(key));
        if let Some(&i) = self.index.get(&key) {
            self.remove_at(i);
        }
    }

    /// Drops every block of `page` (freed, say).
    pub fn drop_page(&mut self, page: PageId) {
        self.note_invalidated(None);
        let keys: Vec<BlockKey> = self.index.keys().filter(|k| k.0 == page).copied().collect();
        for k in keys {
            if let Some(i) = self.index.get(&k).copied() {
                self.remove_at(i);
            }
        }
    }

    /// C4: the epoch moved: every block filled before it goes.
    pub fn drop_older_than(&mut self, epoch: Epoch) -> usize {
        self.note_invalidated(None);
        let old: Vec<usize> = self
            .index
            .values()
            .copied()
            .filter(|&i| self.slots[i].as_ref().is_some_and(|s| s.epoch < epoch))
            .collect();
        for &i in &old {
            self.remove_at(i);
        }
        old.len()
    }

    fn remove_at(&mut self, i: usize) {
        if let Some(s) = self.slots[i].take() {
            self.index.remove(&s.key);
        }
    }

    /// A slot to fill: an empty one, or the first unreferenced one the CLOCK hand reaches
    /// (clearing reference bits as it passes).
    fn free_slot(&mut self) -> usize {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return i;
        }
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            match self.slots[i].as_mut() {
                Some(s) if s.referenced => s.referenced = false,
                _ => {
                    self.remove_at(i);
                    self.stats.evictions += 1;
                    return i;
                }
            }
        }
    }
}

/// What a fill's messages and READs found (`node/CACHE.md` C1): the primary's answer to the
/// registration, the page's version word READ before and after the block, and whether
/// the page's ART entry still holds the page id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillReads {
    /// The lease granted (0: not cacheable now).
    pub lease_ns: u64,
    /// The version word when the primary registered the sharer.
    pub registered_version: u64,
    pub version_before: u64,
    pub version_after: u64,
    pub art_holds: bool,
}

/// What to do with a fill's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// Return them and cache the block under the lease.
    Install,
    /// Return them (a linearizable read at `version_before`), cache nothing: the
    /// registration and the READs did not see the same quiet page.
    ReadOnly,
    /// Return nothing: an update was being stored while the block was read (the bytes may
    /// mix two versions); read again.
    Retry,
    /// The page no longer holds the id (freed): look the mapping up again.
    Stale,
}

/// C1: judges a fill. The bytes are one version of the page only if both version READs
/// agree on an even (quiet) version; they may be cached only if that is also the version
/// at which the primary registered the sharer with a lease, so that every later update
/// invalidates it.
pub fn judge_fill(r: &FillReads) -> FillOutcome {
    if !r.art_holds {
        return FillOutcome::Stale;
    }
    if r.version_before != r.version_after || r.version_before % 2 == 1 {
        return FillOutcome::Retry;
    }
    if r.lease_ns == 0 || r.registered_version != r.version_before {
        return FillOutcome::ReadOnly;
    }
    FillOutcome::Install
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cache(blocks: usize) -> BlockCache {
        BlockCache::new(CacheConfig {
            block_bytes: 64,
            budget_bytes: 64 * blocks,
            margin_ns: 50 * MS,
        })
    }

    fn key(p: u32, b: u32) -> BlockKey {
        (PageId(p), b)
    }

    #[test]
    fn hits_within_the_lease_less_the_margin_and_never_after() {
        let mut c = cache(4);
        let e = Epoch(1);
        assert!(c.insert(key(1, 0), &[7; 64], e, 1_000 * MS, 500 * MS));
        let mut out = [0u8; 8];
        assert!(c.get(key(1, 0), 8, &mut out, e, 1_000 * MS));
        assert_eq!(out, [7; 8]);
        // The lease counts from the request, less the margin: 1000 + 500 - 50.
        assert!(c.get(key(1, 0), 0, &mut out, e, 1_449 * MS));
        assert!(!c.get(key(1, 0), 0, &mut out, e, 1_450 * MS));
        assert!(
            !c.get(key(1, 0), 0, &mut out, e, 1_000 * MS),
            "dropped once expired"
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.expired, s.fills), (2, 2, 1, 1));
        // A lease no longer than the margin is never installed; nor a block of another size.
        assert!(!c.insert(key(1, 1), &[1; 64], e, 0, 50 * MS));
        assert!(!c.insert(key(1, 1), &[1; 32], e, 0, 500 * MS));
        // Out-of-block reads miss instead of panicking.
        c.insert(key(1, 2), &[1; 64], e, 0, 500 * MS);
        assert!(!c.get(key(1, 2), 60, &mut out, e, 0));
        assert!(!c.get(key(1, 2), usize::MAX, &mut out, e, 0));
    }

    #[test]
    fn invalidation_epoch_and_free_drop_blocks() {
        let mut c = cache(8);
        let mut out = [0u8; 1];
        for b in 0..3 {
            c.insert(key(1, b), &[b as u8; 64], Epoch(1), 0, 500 * MS);
        }
        c.insert(key(2, 0), &[9; 64], Epoch(2), 0, 500 * MS);
        assert!(c.invalidate(key(1, 1)));
        assert!(!c.invalidate(key(1, 1)));
        assert!(!c.get(key(1, 1), 0, &mut out, Epoch(1), 0));
        // A block filled in an older epoch than asked for is not served.
        assert!(!c.get(key(1, 0), 0, &mut out, Epoch(2), 0));
        assert_eq!(
            c.drop_older_than(Epoch(2)),
            1,
            "only (1,2) was left of epoch 1"
        );
        assert!(c.get(key(2, 0), 0, &mut out, Epoch(2), 0));
        c.drop_page(PageId(2));
        assert!(c.is_empty());
    }

    #[test]
    fn clock_keeps_referenced_blocks_and_the_budget_holds() {
        let mut c = cache(3);
        let e = Epoch(0);
        let mut out = [0u8; 1];
        for b in 0..3 {
            c.insert(key(1, b), &[0; 64], e, 0, 500 * MS);
        }
        // Blocks 0 and 2 are used; 1 is not: the next fill evicts 1.
        assert!(c.get(key(1, 0), 0, &mut out, e, 0));
        assert!(c.get(key(1, 2), 0, &mut out, e, 0));
        c.insert(key(1, 3), &[0; 64], e, 0, 500 * MS);
        assert_eq!(c.len(), 3);
        assert!(!c.get(key(1, 1), 0, &mut out, e, 0));
        assert!(c.get(key(1, 0), 0, &mut out, e, 0));
        assert_eq!(c.stats().evictions, 1);
        for b in 10..100 {
            c.insert(key(1, b), &[0; 64], e, 0, 500 * MS);
            assert!(c.len() <= 3);
        }
    }

    #[test]
    fn a_fill_is_cached_only_when_registration_and_reads_saw_one_quiet_version() {
        let quiet = FillReads {
            lease_ns: 500 * MS,
            registered_version: 8,
            version_before: 8,
            version_after: 8,
            art_holds: true,
        };
        assert_eq!(judge_fill(&quiet), FillOutcome::Install);
        // Freed (or reused) under the READ: never returned.
        let freed = FillReads {
            art_holds: false,
            ..quiet
        };
        assert_eq!(judge_fill(&freed), FillOutcome::Stale);
        // A store in progress, or one between the two version READs: the bytes may mix.
        for (before, after) in [(9, 9), (8, 10), (8, 9)] {
            let torn = FillReads {
                version_before: before,
                version_after: after,
                ..quiet
            };
            assert_eq!(judge_fill(&torn), FillOutcome::Retry, "{before} {after}");
        }
        // Not cacheable now, or registered at another version than the READs saw: the
        // bytes are a good read, but a later update might not invalidate them.
        let busy = FillReads {
            lease_ns: 0,
            ..quiet
        };
        assert_eq!(judge_fill(&busy), FillOutcome::ReadOnly);
        for registered in [6, 10] {
            let moved = FillReads {
                registered_version: registered,
                ..quiet
            };
            assert_eq!(judge_fill(&moved), FillOutcome::ReadOnly);
        }
    }

    #[test]
    fn an_invalidation_during_a_fill_keeps_its_bytes_out() {
        let mut c = cache(4);
        let e = Epoch(1);
        // The registration went out; the primary invalidated the block (an update of it)
        // before the fill's READs ended: the READ may have seen the old bytes.
        let t = c.begin_fill();
        assert!(!c.invalidate(key(1, 0)));
        assert!(!c.end_fill(t, key(1, 0), Some(&[1; 64]), e, 0, 500 * MS));
        // Another block's invalidation does not matter; a drop of everything does.
        let t = c.begin_fill();
        c.invalidate(key(1, 1));
        assert!(c.end_fill(t, key(1, 0), Some(&[1; 64]), e, 0, 500 * MS));
        let t = c.begin_fill();
        c.drop_older_than(Epoch(1));
        c.drop_page(PageId(7));
        assert!(!c.end_fill(t, key(1, 2), Some(&[1; 64]), e, 0, 500 * MS));
        // Overlapping fills: the one that began after the invalidation installs.
        let t1 = c.begin_fill();
        c.invalidate(key(2, 0));
        let t2 = c.begin_fill();
        assert!(c.end_fill(t2, key(2, 0), Some(&[2; 64]), e, 0, 500 * MS));
        assert!(!c.end_fill(t1, key(2, 0), Some(&[1; 64]), e, 0, 500 * MS));
        let mut out = [0u8; 1];
        assert!(c.get(key(2, 0), 0, &mut out, e, 0));
        assert_eq!(out, [2]);
        // A failed fill ends its ticket too.
        let t = c.begin_fill();
        assert!(!c.end_fill(t, key(3, 0), None, e, 0, 500 * MS));
        assert_eq!(c.filling, 0);
        assert!(c.invalidated_at.is_empty());
    }

    #[test]
    fn blocks_in_use_are_renewed_unless_invalidated_meanwhile() {
        let mut c = cache(4);
        let e = Epoch(1);
        let mut out = [0u8; 1];
        for b in 0..3 {
            c.insert(key(1, b), &[0; 64], e, 0, 500 * MS); // expires at 450
        }
        // Block 0 and 1 are used, block 2 is not; nothing is due before its lease nears
        // its end.
        assert!(c.get(key(1, 0), 0, &mut out, e, 10 * MS));
        assert!(c.get(key(1, 1), 0, &mut out, e, 10 * MS));
        assert!(c.due_for_renewal(100 * MS, 250 * MS).is_empty());
        let due = c.due_for_renewal(300 * MS, 250 * MS);
        assert_eq!(due, vec![key(1, 0), key(1, 1)]);
        // Marked unused: not due again until hit again.
        assert!(c.due_for_renewal(300 * MS, 250 * MS).is_empty());
        let t = c.begin_fill();
        // Block 1 is invalidated while the renewal is in flight: not extended.
        c.invalidate(key(1, 1));
        assert_eq!(c.end_renewal(t, &due, 300 * MS, 500 * MS), 1);
        assert!(c.get(key(1, 0), 0, &mut out, e, 749 * MS), "300 + 500 - 50");
        assert!(!c.get(key(1, 0), 0, &mut out, e, 750 * MS));
        assert!(
            !c.get(key(1, 2), 0, &mut out, e, 450 * MS),
            "not renewed, expired"
        );
        assert_eq!(c.stats().renewals, 1);
        // A failed renewal ends its ticket and changes nothing.
        let t = c.begin_fill();
        assert_eq!(c.end_renewal(t, &[], 0, 0), 0);
        assert_eq!(c.filling, 0);
    }

    #[test]
    fn configurations_are_checked() {
        let ok = CacheConfig::default();
        assert!(ok.validate(65536).is_ok());
        assert!(ok.validate(2048).is_err(), "block larger than the page");
        let odd = CacheConfig {
            block_bytes: 3000,
            ..ok
        };
        assert!(odd.validate(65536).is_err());
        let tiny = CacheConfig {
            budget_bytes: 100,
            ..ok
        };
        assert!(tiny.validate(65536).is_err());
    }
}
