//! The monitor's side of restoring replication after a node loss (#13,
//! `monitor/REREPLICATION.md`), as a pure state machine beside the
//! [`crate::coordinator::Coordinator`]: it takes inputs (pages short of replicas, the
//! nodes' answers, the GAT writer's outcome) and returns actions; a shell sends, writes
//! and reports. The steps, each one method:
//!
//! - R1 [`Rereplicator::need`] and [`Rereplicator::drive`]: a page short of replicas is
//!   queued; at most `concurrency` pages at a time get a target: a ready node holding no
//!   replica of the page, the one with the most free pages (lowest id on a tie), not one
//!   that already failed for this page.
//! - R2 (in [`Rereplicator::drive`]): the target is asked to prepare a page (`Prepare`).
//! - R3 [`Rereplicator::prepared`]: the page's primary is asked to add the target, copying
//!   the page through its update queue (`AddReplica`).
//! - R4/R5 [`Rereplicator::copied`]: the copy is done; the mapping with the target
//!   appended is written (a fenced GAT write: the commit point).
//! - R6 [`Rereplicator::persisted`] and [`Rereplicator::committed`]: the target commits
//!   its page under the page id; the page is done.
//! - R7 [`Rereplicator::progress`] and the final [`RereplicateAction::Report`].
//!
//! Failures before the GAT write roll back (`Abort` to the target, the page queued again
//! with another target); a lost primary or target re-queues the page, whose current
//! mapping the shell supplies at the next [`Rereplicator::drive`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::Replica;
use pmgas_layout::{NodeId, PageId, PageIndex};

/// What the shell does for the re-replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RereplicateAction {
    /// R2: ask `to` to prepare a page for `txn` to receive a copy of `page_id` (answer:
    /// [`Rereplicator::prepared`] or [`Rereplicator::prepare_failed`]).
    Prepare {
        to: NodeId,
        txn: u64,
        page_id: PageId,
    },
    /// R3: ask the page's primary to copy the page to `target` and send it every later
    /// update (answer: [`Rereplicator::copied`]).
    AddReplica {
        to: NodeId,
        page_id: PageId,
        target: Replica,
        txn: u64,
    },
    /// R5: write this mapping to the GAT (answer: [`Rereplicator::persisted`]).
    Persist { mapping: Mapping, txn: u64 },
    /// R6: the target commits its page under the page id (answer:
    /// [`Rereplicator::committed`]).
    Commit {
        to: NodeId,
        txn: u64,
        page_id: PageId,
        replicas: Vec<Replica>,
    },
    /// Roll back: the target frees the page it prepared for `txn`; `primary` (node, page
    /// id), if it was asked to add the target, is told the page's mapping (without it),
    /// which ends the join there.
    Abort {
        to: NodeId,
        txn: u64,
        primary: Option<(NodeId, PageId)>,
    },
    /// R7: nothing is left to do now: `pages` got their replica back since the last
    /// report, after `failed_attempts` rollbacks; `waiting` pages have no node that can
    /// take them (they go when one can).
    Report {
        pages: u64,
        failed_attempts: u64,
        waiting: usize,
    },
}

/// A page short of replicas as the shell sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageView {
    pub mapping: Mapping,
    /// Nodes that may not hold it besides the mapping's (declared dead for this page id:
    /// the view would drop a replica there).
    pub excluded: Vec<NodeId>,
}

/// A node as the re-replication sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    pub free_pages: u32,
    /// Joined and reconciled.
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preparing,
    Copying { page: PageIndex },
    Persisting { page: PageIndex },
    Committing { page: PageIndex },
}

#[derive(Debug)]
struct InFlight {
    page_id: PageId,
    mapping: Mapping,
    target: NodeId,
    stage: Stage,
}

/// Pages being brought back to their replica count (see the module head).
#[derive(Debug)]
pub struct Rereplicator {
    concurrency: usize,
    queue: VecDeque<PageId>,
    queued: BTreeSet<PageId>,
    /// How many replicas each page short of them should have.
    want: BTreeMap<PageId, usize>,
    /// By transaction id.
    flights: BTreeMap<u64, InFlight>,
    /// Targets that failed, per page: not chosen again for it.
    failed: BTreeMap<PageId, BTreeSet<NodeId>>,
    next_txn: u64,
    done: u64,
    failed_attempts: u64,
    reported: bool,
    /// The pages waiting for a node at the last report (a change is reported again).
    reported_waiting: usize,
}

impl Rereplicator {
    /// `txn_base`: transaction ids start there (distinct from the allocation's).
    pub fn new(concurrency: usize, txn_base: u64) -> Self {
        Self {
            concurrency: concurrency.max(1),
            queue: VecDeque::new(),
            queued: BTreeSet::new(),
            want: BTreeMap::new(),
            flights: BTreeMap::new(),
            failed: BTreeMap::new(),
            next_txn: txn_base,
            done: 0,
            failed_attempts: 0,
            reported: true,
            reported_waiting: 0,
        }
    }

    /// R1: page `page_id` should have `want` replicas (it may have fewer now).
    pub fn need(&mut self, page_id: PageId, want: usize) {
        let w = self.want.entry(page_id).or_insert(want);
        *w = (*w).max(want);
        self.queue_page(page_id);
    }

    fn queue_page(&mut self, page_id: PageId) {
        let in_flight = self.flights.values().any(|f| f.page_id == page_id);
        if !in_flight && self.queued.insert(page_id) {
            self.queue.push_back(page_id);
            self.reported = false;
        }
    }

    /// (pages waiting, pages in flight, pages done).
    pub fn progress(&self) -> (usize, usize, u64) {
        (self.queue.len(), self.flights.len(), self.done)
    }

    /// Targets that failed may be chosen again (the shell calls it now and then: a node
    /// that failed once, unreachable for a moment, may be the only one left).
    pub fn forgive(&mut self) {
        self.failed.clear();
    }

    /// Whether `txn` is a re-replication's (the GAT writer's reports are shared).
    pub fn owns(&self, txn: u64) -> bool {
        self.flights.contains_key(&txn)
    }

    /// Whether a mapping naming `node` as a new replica is being written: the node's
    /// reconciliation waits (it would free the page the write is about to list).
    pub fn persisting_involves(&self, node: NodeId) -> bool {
        self.flights
            .values()
            .any(|f| f.target == node && matches!(f.stage, Stage::Persisting { .. }))
    }

    /// Whether page `page_id` is being given a replica now (a free waits).
    pub fn busy(&self, page_id: PageId) -> bool {
        self.flights.values().any(|f| f.page_id == page_id)
    }

    /// R6 again (its answer did not come): the Commit for `txn`, if it is still due.
    pub fn commit_again(&self, txn: u64) -> Option<RereplicateAction> {
        let f = self.flights.get(&txn)?;
        let Stage::Committing { page } = f.stage else {
            return None;
        };
        Some(Self::commit(txn, f, page))
    }

    /// R6 again for every page committing on `node` (it rejoined).
    pub fn commits_to(&self, node: NodeId) -> Vec<RereplicateAction> {
        self.flights
            .iter()
            .filter(|(_, f)| f.target == node)
            .filter_map(|(&txn, _)| self.commit_again(txn))
            .collect()
    }

    fn commit(txn: u64, f: &InFlight, page: PageIndex) -> RereplicateAction {
        let mut replicas = f.mapping.replicas.clone();
        replicas.push(Replica {
            node: f.target,
            page,
        });
        RereplicateAction::Commit {
            to: f.target,
            txn,
            page_id: f.page_id,
            replicas,
        }
    }

    /// R1, R2: gives queued pages a target, as far as the concurrency and `budget` (how
    /// many pages may start now: the bandwidth setting) allow. `view` returns a page's
    /// current mapping (None: unknown, and it leaves the queue).
    pub fn drive(
        &mut self,
        view: &dyn Fn(PageId) -> Option<PageView>,
        nodes: &BTreeMap<NodeId, NodeView>,
        budget: usize,
    ) -> Vec<RereplicateAction> {
        let mut out = vec![];
        let mut waiting = VecDeque::new();
        let mut started = 0;
        let mut exhausted = false;
        while self.flights.len() < self.concurrency && started < budget {
            let Some(page_id) = self.queue.pop_front() else {
                exhausted = true;
                break;
            };
            let want = self.want.get(&page_id).copied().unwrap_or(0);
            let Some(PageView { mapping, excluded }) = view(page_id) else {
                self.forget(page_id);
                continue;
            };
            if mapping.freed || mapping.replicas.is_empty() || mapping.replicas.len() >= want {
                // Freed, lost (nothing to copy from), or whole again.
                self.forget(page_id);
                continue;
            }
            let failed = self.failed.get(&page_id);
            let target = nodes
                .iter()
                .filter(|(n, v)| {
                    v.ready
                        && v.free_pages > 0
                        && !mapping.replicas.iter().any(|r| r.node == **n)
                        && !excluded.contains(n)
                        && !failed.is_some_and(|f| f.contains(n))
                })
                .max_by_key(|(n, v)| (v.free_pages, std::cmp::Reverse(**n)))
                .map(|(n, _)| *n);
            let Some(target) = target else {
                // No node can take it now: asked again at the next drive.
                waiting.push_back(page_id);
                continue;
            };
            self.queued.remove(&page_id);
            started += 1;
            self.reported = false;
            let txn = self.next_txn;
            self.next_txn += 1;
            self.flights.insert(
                txn,
                InFlight {
                    page_id,
                    mapping,
                    target,
                    stage: Stage::Preparing,
                },
            );
            out.push(RereplicateAction::Prepare {
                to: target,
                txn,
                page_id,
            });
        }
        // Pages without a target wait at the front, in order.
        let stuck = waiting.len();
        while let Some(p) = waiting.pop_back() {
            self.queue.push_front(p);
        }
        if exhausted && self.queue.len() == stuck {
            self.report_if_done(&mut out, stuck);
        }
        out
    }

    /// R3: the target prepared `page` for `txn`.
    pub fn prepared(&mut self, txn: u64, page: PageIndex) -> Vec<RereplicateAction> {
        let Some(f) = self.flights.get_mut(&txn) else {
            return vec![];
        };
        if f.stage != Stage::Preparing {
            return vec![];
        }
        f.stage = Stage::Copying { page };
        let Some(primary) = f.mapping.replicas.first() else {
            return vec![];
        };
        vec![RereplicateAction::AddReplica {
            to: primary.node,
            page_id: f.page_id,
            target: Replica {
                node: f.target,
                page,
            },
            txn,
        }]
    }

    /// R2 failed: the target could not prepare a page (full, gone, or no answer: it may
    /// have prepared one, so it is told to abort). Another is chosen.
    pub fn prepare_failed(&mut self, txn: u64) -> Vec<RereplicateAction> {
        self.fail(txn, true)
    }

    /// R4, R5: the primary copied the page to the target (Ok) or could not (the target
    /// or the primary failed: rolled back, queued again).
    pub fn copied(&mut self, txn: u64, ok: bool) -> Vec<RereplicateAction> {
        if !ok {
            return self.fail(txn, true);
        }
        let Some(f) = self.flights.get_mut(&txn) else {
            return vec![];
        };
        let Stage::Copying { page } = f.stage else {
            return vec![];
        };
        f.stage = Stage::Persisting { page };
        // Stored again, in the next revision: it replaces the one it grew from.
        let mut mapping = f.mapping.clone();
        mapping.replicas.push(Replica {
            node: f.target,
            page,
        });
        mapping.revision = mapping.revision.wrapping_add(1);
        vec![RereplicateAction::Persist { mapping, txn }]
    }

    /// R6: the GAT writer's outcome. Stored: the target is a replica from now on; it is
    /// told to commit. Not stored: rolled back, queued again.
    pub fn persisted(&mut self, txn: u64, stored: bool) -> Vec<RereplicateAction> {
        if !stored {
            return self.fail(txn, true);
        }
        let Some(f) = self.flights.get_mut(&txn) else {
            return vec![];
        };
        let Stage::Persisting { page } = f.stage else {
            return vec![];
        };
        f.stage = Stage::Committing { page };
        vec![Self::commit(txn, f, page)]
    }

    /// R6 done: the page has its replica back.
    pub fn committed(&mut self, txn: u64) -> Vec<RereplicateAction> {
        let mut out = vec![];
        if self
            .flights
            .get(&txn)
            .is_some_and(|f| matches!(f.stage, Stage::Committing { .. }))
        {
            let f = self.flights.remove(&txn);
            if let Some(f) = f {
                self.failed.remove(&f.page_id);
                self.forget(f.page_id);
            }
            self.done += 1;
        }
        self.report_if_done(&mut out, 0);
        out
    }

    /// A node was declared dead: pages it was the target of are rolled back and queued
    /// again (after their GAT write, the declaration drops the target from the view: the
    /// page is short again); pages it was the primary of are queued again (their mapping
    /// has a new primary). Call it before [`Self::need`] for the declaration's pages.
    pub fn node_lost(&mut self, node: NodeId) -> Vec<RereplicateAction> {
        let hit: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| {
                // A page past its copy goes on without its old primary: the mapping
                // written names it, and the view drops it.
                let copying = matches!(f.stage, Stage::Preparing | Stage::Copying { .. });
                f.target == node
                    || (copying && f.mapping.replicas.first().is_some_and(|r| r.node == node))
            })
            .map(|(t, _)| *t)
            .collect();
        let mut out = vec![];
        for txn in hit {
            let by_target = self.flights.get(&txn).is_some_and(|f| f.target == node);
            out.extend(self.fail(txn, !by_target));
        }
        out
    }

    /// Rolls `txn` back (Abort to the target when it may hold a prepared page) and queues
    /// its page again, not to be given the same target.
    fn fail(&mut self, txn: u64, abort: bool) -> Vec<RereplicateAction> {
        let Some(f) = self.flights.remove(&txn) else {
            return vec![];
        };
        self.failed_attempts += 1;
        self.failed.entry(f.page_id).or_default().insert(f.target);
        self.queue_page(f.page_id);
        let primary = match f.stage {
            Stage::Preparing => None,
            _ => f.mapping.replicas.first().map(|r| (r.node, f.page_id)),
        };
        if abort {
            vec![RereplicateAction::Abort {
                to: f.target,
                txn,
                primary,
            }]
        } else {
            vec![]
        }
    }

    fn forget(&mut self, page_id: PageId) {
        self.queued.remove(&page_id);
        self.want.remove(&page_id);
        self.failed.remove(&page_id);
    }

    /// R7 once nothing is in flight and the queue holds only the `waiting` pages that no
    /// node can take (again when that number changed: a waiting page was lost or freed);
    /// the counts start again.
    fn report_if_done(&mut self, out: &mut Vec<RereplicateAction>, waiting: usize) {
        let news = !self.reported || self.reported_waiting != waiting;
        if news && self.queue.len() == waiting && self.flights.is_empty() {
            self.reported = true;
            self.reported_waiting = waiting;
            out.push(RereplicateAction::Report {
                pages: std::mem::take(&mut self.done),
                failed_attempts: std::mem::take(&mut self.failed_attempts),
                waiting,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(node: u32, page: u32) -> Replica {
        Replica {
            node: NodeId(node),
            page: PageIndex(page),
        }
    }

    fn nodes(list: &[(u32, u32)]) -> BTreeMap<NodeId, NodeView> {
        list.iter()
            .map(|&(n, free)| {
                (
                    NodeId(n),
                    NodeView {
                        free_pages: free,
                        ready: true,
                    },
                )
            })
            .collect()
    }

    fn view_of(m: &Mapping) -> Option<PageView> {
        Some(PageView {
            mapping: m.clone(),
            excluded: vec![],
        })
    }

    fn prepare(to: u32, txn: u64, page: u32) -> RereplicateAction {
        RereplicateAction::Prepare {
            to: NodeId(to),
            txn,
            page_id: PageId(page),
        }
    }

    fn abort(to: u32, txn: u64, primary: Option<u32>) -> RereplicateAction {
        RereplicateAction::Abort {
            to: NodeId(to),
            txn,
            primary: primary.map(|n| (NodeId(n), PageId(3))),
        }
    }

    #[test]
    fn a_page_gets_a_new_replica_on_the_emptiest_node_and_commits_after_the_gat_write() {
        let mut re = Rereplicator::new(4, 1000);
        let page = PageId(7);
        let current = Mapping::new(page, vec![r(2, 5)]);
        let view = |_: PageId| view_of(&current);
        re.need(page, 2);
        re.need(page, 2);
        // Node 2 holds it; node 3 has the most free pages.
        let a = re.drive(&view, &nodes(&[(2, 100), (3, 50), (4, 10)]), 8);
        assert_eq!(a, vec![prepare(3, 1000, 7)]);
        assert!(re.owns(1000) && re.busy(page) && !re.owns(999));
        assert_eq!(re.progress(), (0, 1, 0));
        let a = re.prepared(1000, PageIndex(9));
        assert_eq!(
            a,
            vec![RereplicateAction::AddReplica {
                to: NodeId(2),
                page_id: page,
                target: r(3, 9),
                txn: 1000
            }]
        );
        let a = re.copied(1000, true);
        let mut next = Mapping::new(page, vec![r(2, 5), r(3, 9)]);
        next.revision = 1;
        assert_eq!(
            a,
            vec![RereplicateAction::Persist {
                mapping: next,
                txn: 1000
            }]
        );
        assert!(re.persisting_involves(NodeId(3)) && !re.persisting_involves(NodeId(2)));
        let commit = RereplicateAction::Commit {
            to: NodeId(3),
            txn: 1000,
            page_id: page,
            replicas: vec![r(2, 5), r(3, 9)],
        };
        assert_eq!(re.persisted(1000, true), vec![commit.clone()]);
        assert_eq!(re.commit_again(1000), Some(commit));
        assert_eq!(
            re.committed(1000),
            vec![RereplicateAction::Report {
                pages: 1,
                failed_attempts: 0,
                waiting: 0
            }]
        );
        // Answers that come late or twice change nothing.
        assert!(re.committed(1000).is_empty());
        assert!(re.copied(1000, true).is_empty());
        assert_eq!(re.commit_again(1000), None);
        assert!(!re.busy(page));
    }

    #[test]
    fn failures_before_the_gat_write_roll_back_and_choose_another_target() {
        let mut re = Rereplicator::new(1, 1);
        let page = PageId(3);
        let current = std::cell::RefCell::new(Mapping::new(page, vec![r(1, 0), r(2, 0)]));
        let view = |_: PageId| view_of(&current.borrow());
        let all = nodes(&[(1, 9), (2, 9), (3, 8), (4, 5)]);
        re.need(page, 3);
        assert_eq!(re.drive(&view, &all, 8), vec![prepare(3, 1, 3)]);
        // Node 3 cannot prepare (told to abort, in case it did): node 4 next, never 3
        // again for this page.
        assert_eq!(re.prepare_failed(1), vec![abort(3, 1, None)]);
        assert_eq!(re.drive(&view, &all, 8), vec![prepare(4, 2, 3)]);
        re.prepared(2, PageIndex(1));
        // The copy failed (the target died): rolled back, the primary told; no target is
        // left.
        assert_eq!(re.copied(2, false), vec![abort(4, 2, Some(1))]);
        assert_eq!(
            re.drive(&view, &all, 8),
            vec![RereplicateAction::Report {
                pages: 0,
                failed_attempts: 2,
                waiting: 1
            }],
            "reported once as waiting"
        );
        assert!(re.drive(&view, &all, 8).is_empty());
        assert_eq!(
            re.progress(),
            (1, 0, 0),
            "waits for a node that can take it"
        );
        // The waiting page is lost (its last replica's node died): reported again.
        let kept = current.replace(Mapping::new(page, vec![]));
        assert_eq!(
            re.drive(&view, &all, 8),
            vec![RereplicateAction::Report {
                pages: 0,
                failed_attempts: 0,
                waiting: 0
            }]
        );
        assert!(re.drive(&view, &all, 8).is_empty());
        *current.borrow_mut() = kept;
        // A GAT write that failed rolls back too.
        let mut re = Rereplicator::new(1, 1);
        re.need(page, 3);
        re.drive(&view, &all, 8);
        re.prepared(1, PageIndex(4));
        re.copied(1, true);
        assert_eq!(re.persisted(1, false), vec![abort(3, 1, Some(1))]);
        // The primary died mid-copy: the page is queued again and goes from the new
        // primary, once the view says so.
        re.drive(&view, &all, 8);
        let a = re.prepared(2, PageIndex(6));
        assert!(matches!(
            a[0],
            RereplicateAction::AddReplica { to: NodeId(1), .. }
        ));
        assert_eq!(re.node_lost(NodeId(1)), vec![abort(4, 2, Some(1))]);
        *current.borrow_mut() = Mapping::new(page, vec![r(2, 0)]);
        let fresh = nodes(&[(2, 9), (5, 1)]);
        assert_eq!(re.drive(&view, &fresh, 8), vec![prepare(5, 3, 3)]);
        assert!(matches!(
            re.prepared(3, PageIndex(0))[0],
            RereplicateAction::AddReplica { to: NodeId(2), .. }
        ));
        // Past the copy, losing the primary changes nothing (the write names it, the view
        // drops it), and nothing is aborted whose GAT write may land.
        re.copied(3, true);
        assert!(re.node_lost(NodeId(2)).is_empty());
        assert_eq!(re.progress(), (0, 1, 0));
        // The target lost while its mapping is written: the flight ends without an abort
        // (the view drops the dead target) and the page waits for another.
        assert!(re.node_lost(NodeId(5)).is_empty());
        assert!(re.persisted(3, true).is_empty(), "a late report is ignored");
        assert_eq!(re.progress(), (1, 0, 0));
    }

    #[test]
    fn concurrency_and_budget_bound_the_flights_and_freed_lost_or_whole_pages_leave() {
        let mut re = Rereplicator::new(2, 1);
        let view = |p: PageId| match p.0 {
            1..=3 => view_of(&Mapping::new(p, vec![r(1, p.0)])),
            4 => view_of(&Mapping::new(p, vec![r(1, 4), r(2, 4)])), // whole again
            5 => view_of(&Mapping::new(p, vec![])),                 // lost
            // Node 2 died holding page 7 once: it may not hold it again.
            7 => Some(PageView {
                mapping: Mapping::new(p, vec![r(1, 7)]),
                excluded: vec![NodeId(2)],
            }),
            _ => None, // unknown
        };
        for p in 1..=7 {
            re.need(PageId(p), 2);
        }
        let all = nodes(&[(1, 9), (2, 9)]);
        assert_eq!(re.drive(&view, &all, 1).len(), 1, "the budget allows one");
        let a = re.drive(&view, &all, 8);
        assert_eq!(a.len(), 1, "two in flight at most: {a:?}");
        assert!(
            a.iter()
                .all(|x| matches!(x, RereplicateAction::Prepare { to: NodeId(2), .. }))
        );
        assert_eq!(re.progress(), (5, 2, 0));
        for txn in [1, 2] {
            re.prepared(txn, PageIndex(txn as u32));
            re.copied(txn, true);
            re.persisted(txn, true);
            re.committed(txn);
        }
        // Page 3 goes; 4, 5 and 6 leave the queue without a copy; 7 waits for a node.
        let a = re.drive(&view, &all, 8);
        assert_eq!(a, vec![prepare(2, 3, 3)]);
        assert_eq!(re.progress(), (1, 1, 2));
        re.prepared(3, PageIndex(3));
        re.copied(3, true);
        re.persisted(3, true);
        assert!(re.committed(3).is_empty(), "page 7 still waits");
        assert_eq!(
            re.drive(&view, &all, 8),
            vec![RereplicateAction::Report {
                pages: 3,
                failed_attempts: 0,
                waiting: 1
            }]
        );
        let more = nodes(&[(1, 9), (2, 9), (3, 1)]);
        assert_eq!(re.drive(&view, &more, 8), vec![prepare(3, 4, 7)]);
        re.prepared(4, PageIndex(0));
        re.copied(4, true);
        re.persisted(4, true);
        assert_eq!(
            re.committed(4),
            vec![RereplicateAction::Report {
                pages: 1,
                failed_attempts: 0,
                waiting: 0
            }]
        );
    }
}
