//! A data node's part in restoring replication (`monitor/REREPLICATION.md`): what the
//! node's service (which hears the monitor) and its data path (which orders and stores
//! updates) share about it.
//!
//! - As a **target** (R2): the pages it prepared (`PrepareCopy`) to receive a copy of a page
//!   id. A Replicate of that page id may store into such a PREALLOCATED page
//!   ([`Rereplica::store_copy`]); the entry goes when the transaction commits or aborts, or
//!   when the node rejoins a monitor (its reconciliation settles the page).
//! - As a **primary** (R3, R4): the `AddReplica` requests the service hands to the data
//!   path, the answers the data path hands back, and the mapping notices that end a join.
//!   The data path's side of the join is in [`crate::data`] (`DataServer::start_join`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pmgas_layout::wire::{Body, Replica};
use pmgas_layout::{PageId, PageIndex};
use pmgas_verbs::wait::Notifier;

use crate::pool::{Pool, PoolError};

/// The monitor asks this node, as the page's primary, to add `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddReplica {
    pub(crate) txn_id: u64,
    pub(crate) page_id: PageId,
    pub(crate) target: Replica,
}

/// What the service and the data path share about re-replication (see the module head).
#[derive(Default)]
pub(crate) struct Rereplica {
    /// Target side: prepared page -> the page id whose copy it receives.
    copies: Mutex<HashMap<PageIndex, PageId>>,
    /// Primary side, service -> data path: joins to start, and mappings the monitor
    /// announced (a join of the page ends: the target is a replica now, or was dropped).
    asked: Mutex<Vec<AddReplica>>,
    notices: Mutex<Vec<(PageId, Vec<Replica>)>>,
    /// Primary side, data path -> service: (transaction, answer to the AddReplica).
    answered: Mutex<Vec<(u64, Body)>>,
    /// How many times this node has joined a monitor (a new one knows nothing of the old
    /// one's joins: the data path ends them, `DataServer::start_join`).
    generation: AtomicU64,
    /// Wakes the data path (set when it starts serving).
    data_wake: Mutex<Option<Arc<Notifier>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Rereplica {
    /// R2 on the target: `page` (PREALLOCATED for the transaction) receives `page_id`.
    pub(crate) fn expect_copy(&self, page: PageIndex, page_id: PageId) {
        lock(&self.copies).insert(page, page_id);
    }

    /// The transaction that prepared `page` ended (committed or aborted): Replicates
    /// store into it only as an ALLOCATED replica from now on. Called before an abort
    /// frees the page.
    pub(crate) fn copy_ended(&self, page: PageIndex) {
        lock(&self.copies).remove(&page);
    }

    /// D4 on any node: stores a Replicate's bytes into `page`, ALLOCATED under `page_id`
    /// or prepared to receive its copy (checked under the copies' lock, held across the
    /// store, so an abort cannot free the page in between).
    pub(crate) fn store_copy(
        &self,
        pool: &Pool,
        page: PageIndex,
        page_id: PageId,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PoolError> {
        let copies = lock(&self.copies);
        let target = copies.get(&page) == Some(&page_id);
        pool.store_in_replica(page, page_id, target, offset, data)?;
        if target {
            pmgas_verbs::fault::point("node.rereplicate-target");
        }
        Ok(())
    }

    /// A new monitor connection: the old one's prepared copies are settled by the
    /// reconciliation that follows (committed if the GAT lists them, freed otherwise).
    pub(crate) fn rejoined(&self) {
        lock(&self.copies).clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn ask(&self, add: AddReplica) {
        lock(&self.asked).push(add);
        self.wake();
    }

    pub(crate) fn notice(&self, page_id: PageId, replicas: Vec<Replica>) {
        lock(&self.notices).push((page_id, replicas));
        self.wake();
    }

    pub(crate) fn take_asked(&self) -> Vec<AddReplica> {
        std::mem::take(&mut *lock(&self.asked))
    }

    pub(crate) fn take_notices(&self) -> Vec<(PageId, Vec<Replica>)> {
        std::mem::take(&mut *lock(&self.notices))
    }

    pub(crate) fn answer(&self, txn_id: u64, body: Body) {
        lock(&self.answered).push((txn_id, body));
    }

    pub(crate) fn take_answers(&self) -> Vec<(u64, Body)> {
        std::mem::take(&mut *lock(&self.answered))
    }

    pub(crate) fn set_data_wake(&self, n: Arc<Notifier>) {
        *lock(&self.data_wake) = Some(n);
    }

    fn wake(&self) {
        if let Some(n) = lock(&self.data_wake).as_ref() {
            n.notify();
        }
    }
}
