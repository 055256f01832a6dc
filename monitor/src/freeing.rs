//! The monitor's side of freeing a page (`free_page`), as a pure state machine beside the
//! [`crate::coordinator::Coordinator`]: it takes inputs (a request, the tombstone's
//! persistence, the nodes' answers, `now_ns`) and returns actions; the shell
//! (`server.rs`) sends, writes and answers. The steps, each one method:
//!
//! - F1 [`Freer::request`]: a client asks to free a live page. A second request for a page
//!   being freed waits for the same outcome.
//! - F2 [`Freer::persisted`]: the tombstone (the mapping flagged freed) is in ZooKeeper, in
//!   a fenced GAT write: from now on the page is freed (lookups answer `PageFreed`, the id
//!   is never handed out again), whatever happens next.
//! - F3 [`Freer::drive`] and [`Freer::answered`]: each replica, primary first, one at a
//!   time, is told to free its page (FreeReplicas). The primary goes first so that no
//!   update is still ordered there while a backup already refuses it. A node that is away
//!   is skipped: its reconciliation, when it rejoins, frees every replica the GAT's
//!   tombstones place on it. A node still reconciling is waited for (its reconciliation
//!   may have been cut before the tombstone). An unanswered request is sent again.
//! - F4 (in [`Freer::drive`]): once no replica is left, every waiting client hears how many
//!   replicas went FREE.
//!
//! A crash anywhere is safe: before F2 nothing happened; after it, the next monitor loads
//! the tombstone and every node's reconciliation frees the replicas that are still
//! ALLOCATED under the freed id (a node frees a page only if its ART holds that id).

use std::collections::BTreeMap;

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::ErrorCode;
use pmgas_layout::{NodeId, PageId, PageIndex};

/// Where a node stands for the free of its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Joined and reconciled: it is sent FreeReplicas.
    Ready,
    /// Joined, still reconciling: waited for.
    Reconciling,
    /// Not connected: skipped (its reconciliation frees the replica).
    Away,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreeAction<W> {
    /// Store the tombstone durably (a fenced GAT write), then call [`Freer::persisted`].
    Persist { tombstone: Mapping },
    /// Send FreeReplicas{(page, page_id)} to `to`; its answer goes to [`Freer::answered`]
    /// with `attempt`.
    Send {
        to: NodeId,
        page: PageIndex,
        page_id: PageId,
        attempt: u64,
    },
    /// Answer these clients: the number of replicas freed, or why the free failed.
    Reply {
        page_id: PageId,
        waiters: Vec<W>,
        result: Result<u32, (ErrorCode, String)>,
    },
}

#[derive(Debug)]
enum Stage {
    Persisting,
    Freeing {
        /// The replica being freed (index into the tombstone's replicas).
        next: usize,
        /// The request in flight to it: (attempt, sent at).
        sent: Option<(u64, u64)>,
    },
}

#[derive(Debug)]
struct Freeing<W> {
    tombstone: Mapping,
    waiters: Vec<W>,
    stage: Stage,
    freed: u32,
}

/// Pages being freed.
#[derive(Debug)]
pub struct Freer<W> {
    pages: BTreeMap<PageId, Freeing<W>>,
    resend_ns: u64,
    next_attempt: u64,
}

impl<W> Freer<W> {
    /// `resend_ns`: a FreeReplicas unanswered this long is sent again.
    pub fn new(resend_ns: u64) -> Self {
        Self {
            pages: BTreeMap::new(),
            resend_ns,
            next_attempt: 1,
        }
    }

    /// Pages whose free has not finished.
    pub fn in_flight(&self) -> usize {
        self.pages.len()
    }

    /// Whether `page_id` is being freed.
    pub fn freeing(&self, page_id: PageId) -> bool {
        self.pages.contains_key(&page_id)
    }

    /// F1: free `mapping`'s page (the shell checked that it is live in the GAT).
    pub fn request(&mut self, mapping: &Mapping, waiter: W) -> Vec<FreeAction<W>> {
        if let Some(f) = self.pages.get_mut(&mapping.page_id) {
            f.waiters.push(waiter);
            return vec![];
        }
        let tombstone = mapping.tombstone();
        self.pages.insert(
            mapping.page_id,
            Freeing {
                tombstone: tombstone.clone(),
                waiters: vec![waiter],
                stage: Stage::Persisting,
                freed: 0,
            },
        );
        vec![FreeAction::Persist { tombstone }]
    }

    /// F2: the tombstone's write ended: stored (`Ok`), or not (the free fails and nothing
    /// changed; the error goes to the clients).
    pub fn persisted(
        &mut self,
        page_id: PageId,
        stored: Result<(), (ErrorCode, String)>,
    ) -> Vec<FreeAction<W>> {
        let Some(f) = self.pages.get_mut(&page_id) else {
            return vec![];
        };
        if !matches!(f.stage, Stage::Persisting) {
            return vec![];
        }
        match stored {
            Ok(()) => {
                f.stage = Stage::Freeing {
                    next: 0,
                    sent: None,
                };
                vec![]
            }
            Err(e) => {
                let f = self.pages.remove(&page_id).map(|f| f.waiters);
                vec![FreeAction::Reply {
                    page_id,
                    waiters: f.unwrap_or_default(),
                    result: Err(e),
                }]
            }
        }
    }

    /// A node answered FreeReplicas attempt `attempt` for `page_id`: `Ok(count)` freed, or
    /// refused (logged by the shell; its replica is left to its next reconciliation).
    /// Either way the next replica is due. Answers to superseded attempts are ignored.
    pub fn answered(&mut self, page_id: PageId, attempt: u64, freed: Result<u32, ()>) {
        let Some(f) = self.pages.get_mut(&page_id) else {
            return;
        };
        if let Stage::Freeing { next, sent } = &mut f.stage
            && sent.is_some_and(|(a, _)| a == attempt)
        {
            f.freed += freed.unwrap_or(0);
            *next += 1;
            *sent = None;
        }
    }

    /// F3 and F4: sends what is due and answers the frees that are complete. `state` says
    /// where each node stands.
    pub fn drive(
        &mut self,
        state: impl Fn(NodeId) -> NodeState,
        now_ns: u64,
    ) -> Vec<FreeAction<W>> {
        let mut out = vec![];
        let mut done = vec![];
        for (&page_id, f) in self.pages.iter_mut() {
            let Stage::Freeing { next, sent } = &mut f.stage else {
                continue;
            };
            loop {
                let Some(r) = f.tombstone.replicas.get(*next) else {
                    done.push(page_id);
                    break;
                };
                match (state(r.node), *sent) {
                    (NodeState::Away, _) => {
                        *next += 1;
                        *sent = None;
                    }
                    (NodeState::Reconciling, _) => break,
                    (NodeState::Ready, Some((_, at)))
                        if now_ns.saturating_sub(at) < self.resend_ns =>
                    {
                        break;
                    }
                    (NodeState::Ready, _) => {
                        let attempt = self.next_attempt;
                        self.next_attempt += 1;
                        *sent = Some((attempt, now_ns));
                        out.push(FreeAction::Send {
                            to: r.node,
                            page: r.page,
                            page_id,
                            attempt,
                        });
                        break;
                    }
                }
            }
        }
        for page_id in done {
            if let Some(f) = self.pages.remove(&page_id) {
                out.push(FreeAction::Reply {
                    page_id,
                    waiters: f.waiters,
                    result: Ok(f.freed),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmgas_layout::wire::Replica;

    fn page(id: u32, nodes: &[u32]) -> Mapping {
        Mapping::new(
            PageId(id),
            nodes
                .iter()
                .map(|&n| Replica {
                    node: NodeId(n),
                    page: PageIndex(10 * n),
                })
                .collect(),
        )
    }

    fn sends<W>(actions: &[FreeAction<W>]) -> Vec<(u32, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                FreeAction::Send { to, attempt, .. } => Some((to.0, *attempt)),
                _ => None,
            })
            .collect()
    }

    const READY: fn(NodeId) -> NodeState = |_| NodeState::Ready;

    #[test]
    fn replicas_are_freed_one_at_a_time_primary_first_after_the_tombstone() {
        let mut f = Freer::new(1_000);
        let m = page(5, &[2, 1, 3]);
        let a = f.request(&m, "c1");
        assert_eq!(
            a,
            vec![FreeAction::Persist {
                tombstone: m.tombstone()
            }]
        );
        // A second client waits for the same free; nothing is sent before the tombstone.
        assert!(f.request(&m, "c2").is_empty());
        assert!(f.drive(READY, 0).is_empty());
        assert!(f.persisted(PageId(5), Ok(())).is_empty());
        let mut order = vec![];
        for t in 0..3 {
            let a = f.drive(READY, t);
            let s = sends(&a);
            assert_eq!(s.len(), 1, "{a:?}");
            // Nothing more while it is in flight.
            assert!(f.drive(READY, t).is_empty());
            order.push(s[0].0);
            f.answered(PageId(5), s[0].1, Ok(1));
        }
        assert_eq!(order, vec![2, 1, 3]);
        assert_eq!(
            f.drive(READY, 4),
            vec![FreeAction::Reply {
                page_id: PageId(5),
                waiters: vec!["c1", "c2"],
                result: Ok(3)
            }]
        );
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn a_failed_tombstone_write_fails_the_free_and_sends_nothing() {
        let mut f = Freer::new(1_000);
        f.request(&page(5, &[1, 2]), 7u8);
        let a = f.persisted(PageId(5), Err((ErrorCode::NotLeader, "fenced".into())));
        assert!(
            matches!(&a[..], [FreeAction::Reply { waiters, result: Err((ErrorCode::NotLeader, _)), .. }] if waiters == &[7])
        );
        assert!(f.drive(READY, 0).is_empty());
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn away_nodes_are_skipped_reconciling_ones_waited_for_silent_ones_asked_again() {
        let mut f = Freer::new(1_000);
        f.request(&page(5, &[1, 2, 3]), ());
        f.persisted(PageId(5), Ok(()));
        // Node 1 away: skipped. Node 2 reconciling: waited for.
        let state = |n: NodeId| match n.0 {
            1 => NodeState::Away,
            2 => NodeState::Reconciling,
            _ => NodeState::Ready,
        };
        assert!(f.drive(state, 0).is_empty());
        let a = f.drive(READY, 10);
        assert_eq!(sends(&a).iter().map(|s| s.0).collect::<Vec<_>>(), vec![2]);
        let first = sends(&a)[0].1;
        // Unanswered past the resend time: sent again, and the old answer no longer counts.
        assert!(f.drive(READY, 500).is_empty());
        let again = sends(&f.drive(READY, 1_010));
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].1, first);
        f.answered(PageId(5), first, Ok(1));
        assert!(f.drive(READY, 1_020).is_empty(), "stale answer ignored");
        f.answered(PageId(5), again[0].1, Ok(1));
        let last = sends(&f.drive(READY, 1_030));
        assert_eq!(last.iter().map(|s| s.0).collect::<Vec<_>>(), vec![3]);
        // Node 3 leaves while asked: skipped; a refusal would count 0 the same way.
        let a = f.drive(|_| NodeState::Away, 1_040);
        assert_eq!(
            a,
            vec![FreeAction::Reply {
                page_id: PageId(5),
                waiters: vec![()],
                result: Ok(1)
            }]
        );
    }
}
