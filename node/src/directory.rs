//! The primary's directory of sharers (#12, `node/CACHE.md` steps C1 and C3): per cached
//! block, which clients (data-path connections) hold it and until when their lease runs,
//! and, per update, the invalidation round that must end before the update is
//! acknowledged.
//!
//! Pure: time is passed in (`now_ns`, the primary's monotonic clock), nothing is sent.
//! A sharer stays in the directory until it acknowledges an invalidation or its lease
//! ends, whatever happens to its connection: a client whose connection broke may still
//! serve its cached blocks until then.

use std::collections::HashMap;

use crate::blockcache::BlockKey;

/// A client holding blocks: the data server's connection id.
pub type Sharer = u64;

/// Sharers per block (see the module head).
#[derive(Debug)]
pub struct Directory {
    lease_ns: u64,
    /// Block -> sharer -> end of its lease.
    blocks: HashMap<BlockKey, HashMap<Sharer, u64>>,
}

impl Directory {
    pub fn new(lease_ns: u64) -> Self {
        Self {
            lease_ns,
            blocks: HashMap::new(),
        }
    }

    pub fn lease_ns(&self) -> u64 {
        self.lease_ns
    }

    /// C1: `sharer` caches `key` from `now_ns`: returns the lease granted (a renewal
    /// extends it).
    pub fn register(&mut self, key: BlockKey, sharer: Sharer, now_ns: u64) -> u64 {
        self.blocks
            .entry(key)
            .or_default()
            .insert(sharer, now_ns.saturating_add(self.lease_ns));
        self.lease_ns
    }

    /// Sharers of `key` whose lease has not ended at `now_ns` (the others are forgotten).
    pub fn sharers(&mut self, key: BlockKey, now_ns: u64) -> usize {
        self.prune(key, now_ns);
        self.blocks.get(&key).map_or(0, HashMap::len)
    }

    fn prune(&mut self, key: BlockKey, now_ns: u64) {
        if let Some(s) = self.blocks.get_mut(&key) {
            s.retain(|_, &mut end| now_ns < end);
            if s.is_empty() {
                self.blocks.remove(&key);
            }
        }
    }

    /// C3: an update of `key` is about to be acknowledged: the invalidation round it must
    /// finish first, over every sharer whose lease has not ended. The sharers leave the
    /// directory now (a sharer that fills again registers again, and the primary answers
    /// a fill while an update of the page is in flight as uncacheable).
    pub fn invalidate(&mut self, key: BlockKey, now_ns: u64) -> Round {
        self.prune(key, now_ns);
        Round {
            pending: self.blocks.remove(&key).unwrap_or_default(),
        }
    }

    /// C5: `page` is being freed here: one round over every live sharer of any of its
    /// blocks, which must end before the replica goes FREE (a cached block of a freed page
    /// must not be served for its lease).
    pub fn invalidate_page(&mut self, page: pmgas_layout::PageId, now_ns: u64) -> Round {
        let mut pending: HashMap<Sharer, u64> = HashMap::new();
        self.blocks.retain(|k, sharers| {
            if k.0 != page {
                return true;
            }
            for (&s, &end) in sharers.iter().filter(|(_, end)| now_ns < **end) {
                let e = pending.entry(s).or_insert(end);
                *e = (*e).max(end);
            }
            false
        });
        Round { pending }
    }
}

/// One invalidation round: the sharers still to hear from, each until its lease ends.
#[derive(Debug, Default)]
pub struct Round {
    pending: HashMap<Sharer, u64>,
}

impl Round {
    /// The sharers to send Invalidate to (all at once).
    pub fn sharers(&self) -> Vec<Sharer> {
        let mut v: Vec<Sharer> = self.pending.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// `sharer` acknowledged: it dropped the block.
    pub fn acked(&mut self, sharer: Sharer) {
        self.pending.remove(&sharer);
    }

    /// Whether the update may be acknowledged at `now_ns`: every sharer acknowledged or
    /// its lease ended (it can no longer serve the block: its own end comes earlier).
    pub fn done(&mut self, now_ns: u64) -> bool {
        self.pending.retain(|_, &mut end| now_ns < end);
        self.pending.is_empty()
    }

    /// When the round ends at the latest, whatever the sharers do (None: done).
    pub fn deadline_ns(&self) -> Option<u64> {
        self.pending.values().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmgas_layout::PageId;

    const MS: u64 = 1_000_000;

    #[test]
    fn an_update_waits_for_every_live_sharer_or_its_lease_never_longer() {
        let mut d = Directory::new(500 * MS);
        let k = (PageId(3), 1);
        assert_eq!(d.register(k, 10, 0), 500 * MS);
        d.register(k, 11, 100 * MS);
        d.register(k, 12, 100 * MS);
        d.register((PageId(3), 2), 13, 100 * MS);
        // Sharer 10's lease ended at 500: not waited for.
        let mut r = d.invalidate(k, 550 * MS);
        assert_eq!(r.sharers(), vec![11, 12]);
        assert!(!r.done(550 * MS));
        r.acked(11);
        assert!(!r.done(560 * MS), "12 neither answered nor expired");
        assert_eq!(r.deadline_ns(), Some(600 * MS));
        // A hung sharer delays the writer by at most its lease.
        assert!(r.done(600 * MS));
        // The round took the block's sharers: the next update waits for nobody...
        assert!(d.invalidate(k, 600 * MS).done(600 * MS));
        // ...but another block's sharer stays, and a renewal extends a lease.
        assert_eq!(d.sharers((PageId(3), 2), 550 * MS), 1);
        d.register((PageId(3), 2), 13, 550 * MS);
        assert_eq!(d.sharers((PageId(3), 2), 1_000 * MS), 1);
        assert_eq!(d.sharers((PageId(3), 2), 1_050 * MS), 0);
    }

    #[test]
    fn a_free_invalidates_every_block_of_the_page_once_per_sharer() {
        let mut d = Directory::new(500 * MS);
        d.register((PageId(1), 0), 1, 0);
        d.register((PageId(1), 5), 1, 200 * MS);
        d.register((PageId(1), 5), 2, 0);
        d.register((PageId(2), 0), 1, 0);
        let mut r = d.invalidate_page(PageId(1), 100 * MS);
        assert_eq!(r.sharers(), vec![1, 2]);
        // Sharer 1 is waited for until its latest lease of the page's blocks.
        assert_eq!(r.deadline_ns(), Some(700 * MS));
        r.acked(2);
        assert!(!r.done(600 * MS));
        r.acked(1);
        assert!(r.done(100 * MS));
        assert_eq!(d.sharers((PageId(1), 5), 100 * MS), 0);
        assert_eq!(d.sharers((PageId(2), 0), 100 * MS), 1);
    }
}
