//! The allocation-record table (ART) as a state machine, and its persistent shell.
//!
//! [`ArtState`] is pure: it holds the current record of every page and decides whether a
//! transition is legal and what record it writes. [`crate::pool::Pool`] writes that record
//! to PM (persist step P4 in PERSISTENCE.md) and only then applies it here, so the DRAM view
//! never runs ahead of what is durable.
//!
//! Legal transitions: FREE→PREALLOCATED, PREALLOCATED→ALLOCATED (with page id and epoch),
//! PREALLOCATED→FREE (abort, reconciliation), ALLOCATED→FREE (page free). Everything else is
//! an error the caller can act on; nothing panics on a peer's request.

use std::collections::{BTreeSet, HashMap};

use pmgas_layout::{ArtRecord, Epoch, PageId, PageIndex, PageState};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArtError {
    #[error("page {page} does not exist (pool has {page_count} pages)")]
    UnknownPage { page: u32, page_count: u32 },
    #[error("page {page}: illegal transition {from} -> {to}")]
    IllegalTransition {
        page: u32,
        from: &'static str,
        to: &'static str,
    },
    #[error("page {page} is corrupt and quarantined")]
    Quarantined { page: u32 },
    #[error("no FREE page left ({page_count} pages)")]
    NoFreePage { page_count: u32 },
}

/// What reconciliation found and did, for the operator and the monitor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// PREALLOCATED pages the GAT knows: committed now.
    pub committed: Vec<(PageIndex, PageId)>,
    /// PREALLOCATED pages the GAT does not know: freed.
    pub freed: Vec<PageIndex>,
    /// ALLOCATED pages the GAT does not know: left untouched, reported loudly.
    pub unknown_allocated: Vec<(PageIndex, PageId)>,
    /// ALLOCATED pages whose page id differs from the GAT's: left untouched, reported.
    pub conflicting: Vec<(PageIndex, PageId, PageId)>,
}

/// The pure ART: current records, the FREE set, quarantined (corrupt) pages.
#[derive(Debug, Clone)]
pub struct ArtState {
    records: Vec<ArtRecord>,
    free: BTreeSet<u32>,
    quarantined: BTreeSet<u32>,
}

impl ArtState {
    /// Builds the state from decoded entries; `None` marks a corrupt entry, which is
    /// quarantined (never handed out, never overwritten) and reported by the caller.
    pub fn from_entries(entries: Vec<Option<ArtRecord>>) -> Self {
        let mut free = BTreeSet::new();
        let mut quarantined = BTreeSet::new();
        let records = entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| match e {
                Some(r) => {
                    if r.state == PageState::Free {
                        free.insert(i as u32);
                    }
                    r
                }
                None => {
                    quarantined.insert(i as u32);
                    ArtRecord::FRESH
                }
            })
            .collect();
        Self {
            records,
            free,
            quarantined,
        }
    }

    pub fn page_count(&self) -> u32 {
        self.records.len() as u32
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn quarantined(&self) -> impl Iterator<Item = PageIndex> + '_ {
        self.quarantined.iter().map(|&p| PageIndex(p))
    }

    pub fn get(&self, page: PageIndex) -> Result<ArtRecord, ArtError> {
        self.check(page)?;
        Ok(self.records[page.0 as usize])
    }

    /// Every page with its record, quarantined pages excluded.
    pub fn iter(&self) -> impl Iterator<Item = (PageIndex, ArtRecord)> + '_ {
        self.records
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.quarantined.contains(&(*i as u32)))
            .map(|(i, r)| (PageIndex(i as u32), *r))
    }

    fn check(&self, page: PageIndex) -> Result<(), ArtError> {
        if page.0 >= self.page_count() {
            return Err(ArtError::UnknownPage {
                page: page.0,
                page_count: self.page_count(),
            });
        }
        if self.quarantined.contains(&page.0) {
            return Err(ArtError::Quarantined { page: page.0 });
        }
        Ok(())
    }

    /// The lowest FREE page, if any (not yet taken: call [`ArtState::plan`] and apply).
    pub fn pick_free(&self) -> Result<PageIndex, ArtError> {
        self.free
            .first()
            .map(|&p| PageIndex(p))
            .ok_or(ArtError::NoFreePage {
                page_count: self.page_count(),
            })
    }

    /// Checks a transition and returns the record slot and record to write.
    pub fn plan(
        &self,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<(usize, ArtRecord), ArtError> {
        let cur = self.get(page)?;
        use PageState::*;
        let legal = matches!(
            (cur.state, to),
            (Free, Preallocated)
                | (Preallocated, Allocated)
                | (Preallocated, Free)
                | (Allocated, Free)
        );
        if !legal {
            return Err(ArtError::IllegalTransition {
                page: page.0,
                from: cur.state.name(),
                to: to.name(),
            });
        }
        // Only ALLOCATED records carry the page id and epoch they were committed under.
        let (page_id, epoch) = if to == Allocated {
            (page_id, epoch)
        } else {
            (PageId(0), Epoch(0))
        };
        Ok(cur.successor(to, page_id, epoch))
    }

    /// Records a transition that is now durable.
    pub fn apply(&mut self, page: PageIndex, record: ArtRecord) {
        let i = page.0 as usize;
        assert!(i < self.records.len(), "apply on unknown page {}", page.0);
        assert_eq!(
            record.seq,
            self.records[i].seq + 1,
            "ART records apply in sequence"
        );
        if record.state == PageState::Free {
            self.free.insert(page.0);
        } else {
            self.free.remove(&page.0);
        }
        self.records[i] = record;
    }

    /// The transitions that reconcile this ART with the GAT's view of this node
    /// (`committed`: page index -> (page id, epoch)), and the report of what was found.
    /// Applying the returned transitions (each durable first) completes reconciliation.
    pub fn reconcile_plan(
        &self,
        committed: &HashMap<PageIndex, (PageId, Epoch)>,
    ) -> (Vec<(PageIndex, PageState, PageId, Epoch)>, ReconcileReport) {
        let mut plan = Vec::new();
        let mut report = ReconcileReport::default();
        for (page, rec) in self.iter() {
            let known = committed.get(&page);
            match (rec.state, known) {
                (PageState::Preallocated, Some(&(page_id, epoch))) => {
                    plan.push((page, PageState::Allocated, page_id, epoch));
                    report.committed.push((page, page_id));
                }
                (PageState::Preallocated, None) => {
                    plan.push((page, PageState::Free, PageId(0), Epoch(0)));
                    report.freed.push(page);
                }
                (PageState::Allocated, None) => report.unknown_allocated.push((page, rec.page_id)),
                (PageState::Allocated, Some(&(page_id, _))) if page_id != rec.page_id => {
                    report.conflicting.push((page, rec.page_id, page_id));
                }
                _ => {}
            }
        }
        (plan, report)
    }
}

/// A small deterministic generator (SplitMix64) for seeded workloads and simulations.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The `i`-th operation of the crash-test workload: a random page and a legal transition
/// for it (ALLOCATED pages get page id `i + 1`). Pure, so the test driver can replay it.
pub fn random_op(art: &ArtState, rng: &mut SplitMix, i: u64) -> (PageIndex, PageState, PageId) {
    let page = PageIndex(rng.below(art.page_count() as u64) as u32);
    let coin = rng.below(2) == 0;
    let state = art.get(page).map(|r| r.state).unwrap_or(PageState::Free);
    let to = match state {
        PageState::Free => PageState::Preallocated,
        PageState::Preallocated if coin => PageState::Allocated,
        PageState::Preallocated | PageState::Allocated => PageState::Free,
    };
    let page_id = if to == PageState::Allocated {
        PageId(i as u32 + 1)
    } else {
        PageId(0)
    };
    (page, to, page_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(n: usize) -> ArtState {
        ArtState::from_entries(vec![Some(ArtRecord::FRESH); n])
    }

    fn step(a: &mut ArtState, page: u32, to: PageState, id: u32) -> Result<ArtRecord, ArtError> {
        let (_, rec) = a.plan(PageIndex(page), to, PageId(id), Epoch(3))?;
        a.apply(PageIndex(page), rec);
        Ok(rec)
    }

    #[test]
    fn legal_lifecycle() {
        let mut a = fresh(4);
        assert_eq!(a.pick_free().unwrap(), PageIndex(0));
        step(&mut a, 0, PageState::Preallocated, 0).unwrap();
        assert_eq!(a.pick_free().unwrap(), PageIndex(1));
        assert_eq!(a.free_count(), 3);
        let r = step(&mut a, 0, PageState::Allocated, 42).unwrap();
        assert_eq!((r.page_id, r.epoch, r.seq), (PageId(42), Epoch(3), 2));
        let r = step(&mut a, 0, PageState::Free, 99).unwrap();
        assert_eq!(
            (r.page_id, r.epoch),
            (PageId(0), Epoch(0)),
            "FREE records carry no id"
        );
        step(&mut a, 1, PageState::Preallocated, 0).unwrap();
        step(&mut a, 1, PageState::Free, 0).unwrap();
        assert_eq!(a.free_count(), 4);
    }

    #[test]
    fn illegal_transitions_are_errors() {
        let mut a = fresh(2);
        use PageState::*;
        for to in [Free, Allocated] {
            assert!(matches!(
                a.plan(PageIndex(0), to, PageId(1), Epoch(0)),
                Err(ArtError::IllegalTransition { .. })
            ));
        }
        step(&mut a, 0, Preallocated, 0).unwrap();
        assert!(
            a.plan(PageIndex(0), Preallocated, PageId(0), Epoch(0))
                .is_err()
        );
        step(&mut a, 0, Allocated, 5).unwrap();
        for to in [Preallocated, Allocated] {
            assert!(a.plan(PageIndex(0), to, PageId(5), Epoch(0)).is_err());
        }
        assert_eq!(
            a.plan(PageIndex(9), Preallocated, PageId(0), Epoch(0)),
            Err(ArtError::UnknownPage {
                page: 9,
                page_count: 2
            })
        );
    }

    #[test]
    fn exhaustion_and_quarantine() {
        let mut a = ArtState::from_entries(vec![Some(ArtRecord::FRESH), None]);
        assert_eq!(a.quarantined().collect::<Vec<_>>(), vec![PageIndex(1)]);
        assert_eq!(a.get(PageIndex(1)), Err(ArtError::Quarantined { page: 1 }));
        step(&mut a, 0, PageState::Preallocated, 0).unwrap();
        assert_eq!(a.pick_free(), Err(ArtError::NoFreePage { page_count: 2 }));
        assert_eq!(a.iter().count(), 1);
    }

    #[test]
    fn reconciliation_follows_the_gat() {
        let mut a = fresh(6);
        use PageState::*;
        step(&mut a, 0, Preallocated, 0).unwrap(); // in GAT -> ALLOCATED
        step(&mut a, 1, Preallocated, 0).unwrap(); // not in GAT -> FREE
        step(&mut a, 2, Preallocated, 0).unwrap();
        step(&mut a, 2, Allocated, 20).unwrap(); // allocated, GAT agrees
        step(&mut a, 3, Preallocated, 0).unwrap();
        step(&mut a, 3, Allocated, 30).unwrap(); // allocated, GAT does not know it
        step(&mut a, 4, Preallocated, 0).unwrap();
        step(&mut a, 4, Allocated, 40).unwrap(); // allocated, GAT says another id
        let gat: HashMap<_, _> = [
            (PageIndex(0), (PageId(10), Epoch(7))),
            (PageIndex(2), (PageId(20), Epoch(7))),
            (PageIndex(4), (PageId(41), Epoch(7))),
        ]
        .into();
        let (plan, report) = a.reconcile_plan(&gat);
        assert_eq!(
            plan,
            vec![
                (PageIndex(0), Allocated, PageId(10), Epoch(7)),
                (PageIndex(1), Free, PageId(0), Epoch(0))
            ]
        );
        assert_eq!(report.committed, vec![(PageIndex(0), PageId(10))]);
        assert_eq!(report.freed, vec![PageIndex(1)]);
        assert_eq!(report.unknown_allocated, vec![(PageIndex(3), PageId(30))]);
        assert_eq!(
            report.conflicting,
            vec![(PageIndex(4), PageId(40), PageId(41))]
        );
        for (page, to, id, epoch) in plan {
            let (_, rec) = a.plan(page, to, id, epoch).unwrap();
            a.apply(page, rec);
        }
        let (again, _) = a.reconcile_plan(&gat);
        assert!(again.is_empty(), "reconciliation is idempotent");
    }
}
