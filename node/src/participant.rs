//! The data-node side of the two-phase page allocation, as a pure state machine over a
//! [`PageTable`] (the durable ART of a [`crate::Pool`], or a model of it in simulations).
//!
//! Each handler makes its ART change durable (through the table) before returning the
//! message that depends on it, and is idempotent: a repeated Prepare returns the page it
//! prepared before, a repeated Commit or Abort is acknowledged again.

use std::collections::{HashMap, HashSet, VecDeque};

use pmgas_layout::wire::{ErrorCode, Replica};
use pmgas_layout::{ArtRecord, Epoch, NodeId, PageId, PageIndex, PageState};

use crate::art::{ArtError, ArtState};
use crate::pool::{Pool, PoolError};

/// The ART operations the protocol needs.
pub trait PageTable {
    fn preallocate(&mut self) -> Result<PageIndex, ErrorCode>;
    fn set_state(
        &mut self,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<(), ErrorCode>;
    fn record(&self, page: PageIndex) -> Option<ArtRecord>;
}

fn art_code(e: &ArtError) -> ErrorCode {
    match e {
        ArtError::NoFreePage { .. } => ErrorCode::NoSpace,
        ArtError::UnknownPage { .. } | ArtError::Quarantined { .. } => ErrorCode::UnknownPage,
        _ => ErrorCode::Internal,
    }
}

impl PageTable for ArtState {
    fn preallocate(&mut self) -> Result<PageIndex, ErrorCode> {
        let page = self.pick_free().map_err(|e| art_code(&e))?;
        self.set_state(page, PageState::Preallocated, PageId(0), Epoch(0))?;
        Ok(page)
    }

    fn set_state(
        &mut self,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<(), ErrorCode> {
        let (_, rec) = self
            .plan(page, to, page_id, epoch)
            .map_err(|e| art_code(&e))?;
        self.apply(page, rec);
        Ok(())
    }

    fn record(&self, page: PageIndex) -> Option<ArtRecord> {
        self.get(page).ok()
    }
}

fn pool_code(e: &PoolError) -> ErrorCode {
    match e {
        PoolError::Art(a) => art_code(a),
        _ => ErrorCode::Internal,
    }
}

/// The real thing: every change is a durable ART transition.
impl PageTable for &Pool {
    fn preallocate(&mut self) -> Result<PageIndex, ErrorCode> {
        Pool::preallocate(self).map_err(|e| pool_code(&e))
    }

    fn set_state(
        &mut self,
        page: PageIndex,
        to: PageState,
        page_id: PageId,
        epoch: Epoch,
    ) -> Result<(), ErrorCode> {
        self.transition(page, to, page_id, epoch)
            .map(|_| ())
            .map_err(|e| pool_code(&e))
    }

    fn record(&self, page: PageIndex) -> Option<ArtRecord> {
        Pool::record(self, page).ok()
    }
}

/// Finished transactions remembered, so that a Prepare arriving after its transaction
/// ended (a retransmission, or one from before a reconnect) is refused instead of
/// pre-allocating a page nobody will ever commit or abort.
pub const FINISHED_MEMORY: usize = 1 << 16;

/// A node's open transactions (backup side) — DRAM only: after a crash, reconciliation
/// with the GAT settles the pages they held.
#[derive(Debug, Default)]
pub struct Participant {
    me: Option<NodeId>,
    txns: HashMap<u64, PageIndex>,
    finished: HashSet<u64>,
    finished_order: VecDeque<u64>,
}

impl Participant {
    pub fn new(me: NodeId) -> Self {
        Self {
            me: Some(me),
            ..Self::default()
        }
    }

    fn finish(&mut self, txn_id: u64) {
        self.txns.remove(&txn_id);
        if self.finished.insert(txn_id) {
            self.finished_order.push_back(txn_id);
            if self.finished_order.len() > FINISHED_MEMORY
                && let Some(old) = self.finished_order.pop_front()
            {
                self.finished.remove(&old);
            }
        }
    }

    /// Prepare: pre-allocate a page (durably) for `txn_id`, or return the one already
    /// prepared for it. A transaction that already ended is refused.
    pub fn prepare(
        &mut self,
        table: &mut impl PageTable,
        txn_id: u64,
    ) -> Result<PageIndex, ErrorCode> {
        if let Some(&page) = self.txns.get(&txn_id) {
            return Ok(page);
        }
        if self.finished.contains(&txn_id) {
            return Err(ErrorCode::StaleEpoch);
        }
        let page = table.preallocate()?;
        self.txns.insert(txn_id, page);
        Ok(page)
    }

    /// The page prepared for `txn_id`, while the transaction is open.
    pub fn page_of(&self, txn_id: u64) -> Option<PageIndex> {
        self.txns.get(&txn_id).copied()
    }

    /// Commit: mark this node's replica ALLOCATED under `page_id` (durably). Repeats of a
    /// commit already applied succeed.
    pub fn commit(
        &mut self,
        table: &mut impl PageTable,
        txn_id: u64,
        page_id: PageId,
        epoch: Epoch,
        replicas: &[Replica],
    ) -> Result<(), ErrorCode> {
        let me = self.me.ok_or(ErrorCode::Internal)?;
        let page = replicas
            .iter()
            .find(|r| r.node == me)
            .map(|r| r.page)
            .ok_or(ErrorCode::Malformed)?;
        let rec = table.record(page).ok_or(ErrorCode::UnknownPage)?;
        match rec.state {
            // Only the page this transaction prepared: a stray or forged Commit must not
            // claim a page pre-allocated for something else (a primary's, another txn's).
            PageState::Preallocated if self.txns.get(&txn_id) == Some(&page) => {
                table.set_state(page, PageState::Allocated, page_id, epoch)?
            }
            PageState::Allocated if rec.page_id == page_id => {}
            _ => return Err(ErrorCode::UnknownPage),
        }
        self.finish(txn_id);
        Ok(())
    }

    /// Abort: free the page prepared for `txn_id`, if any (durably). Unknown
    /// transactions are acknowledged: there is nothing to undo.
    pub fn abort(&mut self, table: &mut impl PageTable, txn_id: u64) -> Result<(), ErrorCode> {
        if let Some(&page) = self.txns.get(&txn_id)
            && table
                .record(page)
                .is_some_and(|r| r.state == PageState::Preallocated)
        {
            table.set_state(page, PageState::Free, PageId(0), Epoch(0))?;
        }
        // Remembered even if it was never prepared here: an Abort may overtake its Prepare.
        self.finish(txn_id);
        Ok(())
    }
}

/// The primary's side: pre-allocate before asking, then commit or free on the answer.
pub fn primary_prepare(table: &mut impl PageTable) -> Result<PageIndex, ErrorCode> {
    table.preallocate()
}

/// Applies the monitor's answer to the primary's pre-allocated `page`.
pub fn primary_finish(
    table: &mut impl PageTable,
    page: PageIndex,
    epoch: Epoch,
    answer: Result<(PageId, &[Replica]), ErrorCode>,
) -> Result<(), ErrorCode> {
    let rec = table.record(page).ok_or(ErrorCode::UnknownPage)?;
    match answer {
        Ok((page_id, replicas)) => {
            if replicas.first().map(|r| r.page) != Some(page) {
                return Err(ErrorCode::Malformed);
            }
            match rec.state {
                PageState::Preallocated => {
                    table.set_state(page, PageState::Allocated, page_id, epoch)
                }
                PageState::Allocated if rec.page_id == page_id => Ok(()),
                _ => Err(ErrorCode::UnknownPage),
            }
        }
        Err(_) if rec.state == PageState::Preallocated => {
            table.set_state(page, PageState::Free, PageId(0), Epoch(0))
        }
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{OnBlank, PoolIdentity};
    use pmgas_layout::ClusterId;

    #[test]
    fn handlers_are_durable_and_idempotent_on_a_real_pool() {
        let path =
            std::path::PathBuf::from(format!("/dev/shm/pmgas-participant-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let id = PoolIdentity {
            cluster_id: ClusterId(1),
            node_id: NodeId(2),
            page_size_bytes: 1 << 20,
        };
        let pool = Pool::open(&path, Some(8 << 20), OnBlank::Format(id), Some(id)).unwrap();
        let mut table = &pool;
        let mut p = Participant::new(NodeId(2));
        let page = p.prepare(&mut table, 10).unwrap();
        assert_eq!(
            p.prepare(&mut table, 10).unwrap(),
            page,
            "a repeated Prepare returns the same page"
        );
        let replicas = [
            Replica {
                node: NodeId(1),
                page: PageIndex(0),
            },
            Replica {
                node: NodeId(2),
                page,
            },
        ];
        p.commit(&mut table, 10, PageId(77), Epoch(4), &replicas)
            .unwrap();
        p.commit(&mut table, 10, PageId(77), Epoch(4), &replicas)
            .unwrap();
        assert_eq!(
            p.prepare(&mut table, 10),
            Err(ErrorCode::StaleEpoch),
            "a finished transaction is not re-prepared"
        );
        let other = p.prepare(&mut table, 11).unwrap();
        p.abort(&mut table, 11).unwrap();
        p.abort(&mut table, 11).unwrap();
        p.abort(&mut table, 99).unwrap();
        let wrong = [Replica {
            node: NodeId(1),
            page: PageIndex(0),
        }];
        assert_eq!(
            p.commit(&mut table, 12, PageId(1), Epoch(4), &wrong),
            Err(ErrorCode::Malformed)
        );
        // A Commit naming a PREALLOCATED page that its transaction did not prepare (here:
        // a primary's own page) is refused and leaves the page alone.
        let primary_page = primary_prepare(&mut table).unwrap();
        let forged = [Replica {
            node: NodeId(2),
            page: primary_page,
        }];
        assert_eq!(
            p.commit(&mut table, 13, PageId(5), Epoch(4), &forged),
            Err(ErrorCode::UnknownPage)
        );
        assert_eq!(
            pool.record(primary_page).unwrap().state,
            PageState::Preallocated
        );
        primary_finish(&mut table, primary_page, Epoch(4), Err(ErrorCode::Internal)).unwrap();
        drop(p);
        drop(pool);
        // What the handlers did is on PM.
        let pool = Pool::open(&path, None, OnBlank::Refuse, Some(id)).unwrap();
        let rec = pool.record(page).unwrap();
        assert_eq!(
            (rec.state, rec.page_id, rec.epoch),
            (PageState::Allocated, PageId(77), Epoch(4))
        );
        assert_eq!(pool.record(other).unwrap().state, PageState::Free);
        std::fs::remove_file(&path).unwrap();
    }
}
