//! The monitor side of the two-phase page allocation (DESIGN.md steps 1–7), as a pure
//! state machine: it takes inputs (messages, persistence results, `now_ns`) and returns
//! actions; a shell does the RDMA sends and the ZooKeeper writes.
//!
//! 1. A primary that pre-allocated a page asks for `backups_wanted` backups.
//! 2. The coordinator picks backups — live nodes other than the primary, most free pages
//!    first, never two replicas on one node — and sends each `Prepare`.
//! 3. Backups pre-allocate and answer `Prepared`.
//! 4. With every backup prepared, the coordinator takes the next page id (ids are never
//!    reused, even if what follows fails) and asks the shell to persist the mapping. The
//!    shell may group many mappings into one ZooKeeper write (group commit).
//! 5. Once persisted, it sends `Commit` to every backup and waits for every ack,
//! 6. then answers the primary with the mapping (primary commits last).
//! 7. Any failure before the persist — a backup's error, a timeout, a failed write —
//!    aborts: every backup that was asked to prepare is told to abort (until it acks),
//!    and the primary gets an error so it frees its own page.
//!
//! Requests are idempotent per (primary, request id): a retried request gets the same
//! transaction, or its final answer again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pmgas_layout::wire::{ErrorCode, MAX_REPLICAS, Replica};
use pmgas_layout::{Epoch, NodeId, PageId, PageIndex};

/// How long a phase may wait for its messages before it retries or gives up.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Preparing longer than this aborts the transaction.
    pub prepare_ns: u64,
    /// Commit and abort messages are resent at this interval until acknowledged.
    pub resend_ns: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            prepare_ns: 500_000_000,
            resend_ns: 100_000_000,
        }
    }
}

pub use pmgas_layout::gat::Mapping;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    AllocPage {
        from: NodeId,
        request_id: u64,
        epoch: Epoch,
        primary_page: PageIndex,
        backups_wanted: u8,
    },
    Prepared {
        from: NodeId,
        txn_id: u64,
        page: PageIndex,
    },
    PrepareFailed {
        from: NodeId,
        txn_id: u64,
        code: ErrorCode,
    },
    /// The shell durably stored these transactions' mappings.
    Persisted {
        txn_ids: Vec<u64>,
    },
    /// The shell could not store them (outcome known: not stored).
    PersistFailed {
        txn_ids: Vec<u64>,
    },
    CommitAck {
        from: NodeId,
        txn_id: u64,
    },
    AbortAck {
        from: NodeId,
        txn_id: u64,
    },
    /// A node's connection ended. It reconciles its ART with the GAT when it rejoins
    /// (PREALLOCATED pages not in the GAT are freed there), so transactions still
    /// preparing with it abort now without waiting for its acknowledgement, and aborts
    /// stop waiting for it. Transactions already persisting or committing run on: what
    /// the GAT holds, its reconciliation commits. Nothing is sent to it until it rejoins.
    NodeLeft {
        node: NodeId,
    },
    /// A node was declared dead (it stayed away past the node timeout; the shell stored
    /// the declaration and the new epoch first). Its replicas leave every mapping still
    /// persisting or committing (the first surviving replica is the primary, as in the
    /// GAT's view) and nobody waits for its acknowledgement any more.
    NodeDead {
        node: NodeId,
        epoch: Epoch,
    },
    /// Time passes; timeouts and resends happen here.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Prepare {
        to: NodeId,
        txn_id: u64,
    },
    Abort {
        to: NodeId,
        txn_id: u64,
    },
    /// Store this mapping durably (ZooKeeper), then report `Persisted` or `PersistFailed`.
    Persist {
        txn_id: u64,
        mapping: Mapping,
    },
    Commit {
        to: NodeId,
        txn_id: u64,
        mapping: Mapping,
    },
    /// The answer to a primary's AllocPage: the mapping (commit its page) or an error
    /// (free its page).
    Reply {
        to: NodeId,
        request_id: u64,
        txn_id: u64,
        result: Result<Mapping, ErrorCode>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Preparing { deadline_ns: u64 },
    Persisting,
    Committing { resend_ns: u64 },
    Aborting { resend_ns: u64 },
    Done,
}

#[derive(Debug, Clone)]
struct Txn {
    primary: Replica,
    request_id: u64,
    backups: Vec<NodeId>,
    prepared: BTreeMap<NodeId, PageIndex>,
    /// Nodes that still owe an ack (commit or abort phase).
    waiting: BTreeSet<NodeId>,
    mapping: Option<Mapping>,
    error: Option<ErrorCode>,
    phase: Phase,
}

/// The coordinator's view of one data node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    pub free_pages: u32,
}

pub struct Coordinator {
    epoch: Epoch,
    next_page_id: u32,
    next_txn_id: u64,
    timeouts: Timeouts,
    nodes: BTreeMap<NodeId, NodeView>,
    /// Ordered, so that ticks visit transactions in a deterministic order.
    txns: BTreeMap<u64, Txn>,
    /// (primary, request id) -> transaction, for idempotent retries.
    by_request: HashMap<(NodeId, u64), u64>,
}

impl Coordinator {
    /// `max_page_id`: the largest page id stored in the GAT (0 if none); ids resume above.
    pub fn new(epoch: Epoch, max_page_id: u32, timeouts: Timeouts) -> Self {
        Self {
            epoch,
            next_page_id: max_page_id + 1,
            next_txn_id: 1,
            timeouts,
            nodes: BTreeMap::new(),
            txns: BTreeMap::new(),
            by_request: HashMap::new(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether a GAT write of a transaction with a replica on `node` is in flight.
    pub fn persisting_involves(&self, node: NodeId) -> bool {
        self.txns.values().any(|t| {
            t.phase == Phase::Persisting && (t.primary.node == node || t.backups.contains(&node))
        })
    }

    /// The page id the next allocation gets.
    pub fn next_page_id(&self) -> u32 {
        self.next_page_id
    }

    pub fn set_node(&mut self, node: NodeId, view: NodeView) {
        self.nodes.insert(node, view);
    }

    pub fn node(&self, node: NodeId) -> Option<NodeView> {
        self.nodes.get(&node).copied()
    }

    /// Transactions not yet finished.
    pub fn in_flight(&self) -> usize {
        self.txns
            .values()
            .filter(|t| t.phase != Phase::Done)
            .count()
    }

    /// Picks `n` backups for a page whose primary is `primary`: most free pages first,
    /// then lowest id; never the primary, never a node twice.
    pub fn choose_backups(&self, primary: NodeId, n: usize) -> Option<Vec<NodeId>> {
        let mut candidates: Vec<(u32, NodeId)> = self
            .nodes
            .iter()
            .filter(|(id, v)| **id != primary && v.free_pages > 0)
            .map(|(id, v)| (v.free_pages, *id))
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        (candidates.len() >= n).then(|| candidates.into_iter().take(n).map(|(_, id)| id).collect())
    }

    pub fn handle(&mut self, input: Input, now_ns: u64) -> Vec<Action> {
        let mut out = vec![];
        match input {
            Input::AllocPage {
                from,
                request_id,
                epoch,
                primary_page,
                backups_wanted,
            } => self.alloc_page(
                from,
                request_id,
                epoch,
                primary_page,
                backups_wanted,
                now_ns,
                &mut out,
            ),
            Input::Prepared { from, txn_id, page } => self.prepared(from, txn_id, page, &mut out),
            Input::PrepareFailed { from, txn_id, code } => {
                if let Some(t) = self.txns.get(&txn_id)
                    && matches!(t.phase, Phase::Preparing { .. })
                    && t.backups.contains(&from)
                {
                    if code == ErrorCode::NoSpace {
                        self.nodes.entry(from).and_modify(|v| v.free_pages = 0);
                    }
                    self.abort(txn_id, code, now_ns, &mut out);
                }
            }
            Input::Persisted { txn_ids } => {
                for txn_id in txn_ids {
                    self.persisted(txn_id, now_ns, &mut out);
                }
            }
            Input::PersistFailed { txn_ids } => {
                for txn_id in txn_ids {
                    if self
                        .txns
                        .get(&txn_id)
                        .is_some_and(|t| t.phase == Phase::Persisting)
                    {
                        self.abort(txn_id, ErrorCode::Internal, now_ns, &mut out);
                    }
                }
            }
            Input::CommitAck { from, txn_id } => self.acked(from, txn_id, true, &mut out),
            Input::AbortAck { from, txn_id } => self.acked(from, txn_id, false, &mut out),
            Input::NodeLeft { node } => self.node_left(node, now_ns, &mut out),
            Input::NodeDead { node, epoch } => self.node_dead(node, epoch, now_ns, &mut out),
            Input::Tick => self.tick(now_ns, &mut out),
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn alloc_page(
        &mut self,
        from: NodeId,
        request_id: u64,
        epoch: Epoch,
        primary_page: PageIndex,
        backups_wanted: u8,
        now_ns: u64,
        out: &mut Vec<Action>,
    ) {
        let reply = |result| Action::Reply {
            to: from,
            request_id,
            txn_id: 0,
            result,
        };
        if epoch != self.epoch {
            out.push(reply(Err(ErrorCode::StaleEpoch)));
            return;
        }
        if !self.nodes.contains_key(&from) {
            out.push(reply(Err(ErrorCode::UnknownPage)));
            return;
        }
        if let Some(&txn_id) = self.by_request.get(&(from, request_id)) {
            // A retry: answer again if finished, otherwise let the transaction run on.
            if let Some(t) = self.txns.get(&txn_id)
                && t.phase == Phase::Done
            {
                let result = t
                    .mapping
                    .clone()
                    .ok_or(t.error.unwrap_or(ErrorCode::Internal));
                out.push(Action::Reply {
                    to: from,
                    request_id,
                    txn_id,
                    result,
                });
            }
            return;
        }
        let wanted = backups_wanted as usize;
        if wanted + 1 > MAX_REPLICAS {
            out.push(reply(Err(ErrorCode::Malformed)));
            return;
        }
        let Some(backups) = self.choose_backups(from, wanted) else {
            out.push(reply(Err(ErrorCode::NotEnoughNodes)));
            return;
        };
        let txn_id = self.next_txn_id;
        self.next_txn_id += 1;
        for b in &backups {
            out.push(Action::Prepare { to: *b, txn_id });
        }
        let txn = Txn {
            primary: Replica {
                node: from,
                page: primary_page,
            },
            request_id,
            waiting: backups.iter().copied().collect(),
            backups,
            prepared: BTreeMap::new(),
            mapping: None,
            error: None,
            phase: Phase::Preparing {
                deadline_ns: now_ns + self.timeouts.prepare_ns,
            },
        };
        self.by_request.insert((from, request_id), txn_id);
        self.txns.insert(txn_id, txn);
        if wanted == 0 {
            self.all_prepared(txn_id, out);
        }
    }

    fn prepared(&mut self, from: NodeId, txn_id: u64, page: PageIndex, out: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        if !t.backups.contains(&from) {
            return;
        }
        match t.phase {
            Phase::Preparing { .. } => {
                if t.prepared.insert(from, page).is_none() {
                    self.nodes
                        .entry(from)
                        .and_modify(|v| v.free_pages = v.free_pages.saturating_sub(1));
                }
                t.waiting.remove(&from);
                if t.waiting.is_empty() {
                    self.all_prepared(txn_id, out);
                }
            }
            Phase::Aborting { .. } => {
                // A late Prepared for an aborted transaction: that page must be freed too.
                t.prepared.insert(from, page);
                t.waiting.insert(from);
                out.push(Action::Abort { to: from, txn_id });
            }
            Phase::Done => {
                // A Prepared for a finished transaction whose mapping does not hold that
                // page (it was aborted, or this is a stray): have the node free it.
                let mapped = t
                    .mapping
                    .as_ref()
                    .is_some_and(|m| m.replicas.contains(&Replica { node: from, page }));
                if !mapped {
                    out.push(Action::Abort { to: from, txn_id });
                }
            }
            _ => {}
        }
    }

    fn all_prepared(&mut self, txn_id: u64, out: &mut Vec<Action>) {
        let page_id = PageId(self.next_page_id);
        self.next_page_id += 1;
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        let mut replicas = vec![t.primary];
        replicas.extend(t.backups.iter().map(|b| Replica {
            node: *b,
            page: t.prepared[b],
        }));
        debug_assert!(
            replicas
                .iter()
                .map(|r| r.node)
                .collect::<BTreeSet<_>>()
                .len()
                == replicas.len(),
            "two replicas on one node"
        );
        let mapping = Mapping::new(page_id, replicas);
        t.mapping = Some(mapping.clone());
        t.phase = Phase::Persisting;
        out.push(Action::Persist { txn_id, mapping });
    }

    fn persisted(&mut self, txn_id: u64, now_ns: u64, out: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        if t.phase != Phase::Persisting {
            return;
        }
        let Some(mapping) = t.mapping.clone() else {
            return;
        };
        t.waiting = t.backups.iter().copied().collect();
        t.phase = Phase::Committing {
            resend_ns: now_ns + self.timeouts.resend_ns,
        };
        for b in &t.backups {
            out.push(Action::Commit {
                to: *b,
                txn_id,
                mapping: mapping.clone(),
            });
        }
        if t.waiting.is_empty() {
            self.finish(txn_id, out);
        }
    }

    fn node_left(&mut self, node: NodeId, now_ns: u64, out: &mut Vec<Action>) {
        self.nodes.remove(&node);
        // Its request ids die with the connection: a restarted node numbers afresh, and
        // must never be answered with an earlier incarnation's result.
        self.by_request.retain(|(from, _), _| *from != node);
        let ids: Vec<u64> = self.txns.keys().copied().collect();
        for txn_id in ids {
            let Some(t) = self.txns.get(&txn_id) else {
                continue;
            };
            let involved = t.primary.node == node || t.backups.contains(&node);
            if !involved {
                continue;
            }
            if matches!(t.phase, Phase::Preparing { .. }) {
                self.abort(txn_id, ErrorCode::BackupLost, now_ns, out);
            }
            if let Some(t) = self.txns.get_mut(&txn_id)
                && matches!(t.phase, Phase::Aborting { .. })
                && t.waiting.remove(&node)
            {
                t.prepared.remove(&node);
                if t.waiting.is_empty() {
                    self.finish(txn_id, out);
                }
            }
        }
    }

    fn node_dead(&mut self, node: NodeId, epoch: Epoch, now_ns: u64, out: &mut Vec<Action>) {
        self.epoch = self.epoch.max(epoch);
        self.node_left(node, now_ns, out);
        let ids: Vec<u64> = self.txns.keys().copied().collect();
        for txn_id in ids {
            let Some(t) = self.txns.get_mut(&txn_id) else {
                continue;
            };
            if let Some(m) = t.mapping.as_mut() {
                m.replicas.retain(|r| r.node != node);
            }
            t.backups.retain(|b| *b != node);
            t.prepared.remove(&node);
            if matches!(t.phase, Phase::Committing { .. })
                && t.waiting.remove(&node)
                && t.waiting.is_empty()
            {
                self.finish(txn_id, out);
            }
        }
    }

    fn acked(&mut self, from: NodeId, txn_id: u64, commit: bool, out: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        let right_phase = match t.phase {
            Phase::Committing { .. } => commit,
            Phase::Aborting { .. } => !commit,
            _ => false,
        };
        if !right_phase || !t.waiting.remove(&from) {
            return;
        }
        if !commit {
            // The backup freed its page.
            if t.prepared.remove(&from).is_some() {
                self.nodes.entry(from).and_modify(|v| v.free_pages += 1);
            }
        }
        if t.waiting.is_empty() {
            self.finish(txn_id, out);
        }
    }

    fn finish(&mut self, txn_id: u64, out: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        t.phase = Phase::Done;
        let result = match (&t.mapping, t.error) {
            (Some(m), None) => Ok(m.clone()),
            (_, e) => Err(e.unwrap_or(ErrorCode::Internal)),
        };
        out.push(Action::Reply {
            to: t.primary.node,
            request_id: t.request_id,
            txn_id,
            result,
        });
    }

    fn abort(&mut self, txn_id: u64, code: ErrorCode, now_ns: u64, out: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn_id) else {
            return;
        };
        t.error = Some(code);
        t.mapping = None;
        // Every backup asked to prepare may hold a PREALLOCATED page: all get Abort, but
        // one that has left is not waited for (its reconciliation frees the page, R3).
        t.waiting = t
            .backups
            .iter()
            .copied()
            .filter(|b| self.nodes.contains_key(b))
            .collect();
        t.phase = Phase::Aborting {
            resend_ns: now_ns + self.timeouts.resend_ns,
        };
        for b in t.backups.iter().filter(|b| t.waiting.contains(b)) {
            out.push(Action::Abort { to: *b, txn_id });
        }
        if t.waiting.is_empty() {
            self.finish(txn_id, out);
        }
    }

    fn tick(&mut self, now_ns: u64, out: &mut Vec<Action>) {
        let ids: Vec<u64> = self.txns.keys().copied().collect();
        for txn_id in ids {
            let Some(t) = self.txns.get_mut(&txn_id) else {
                continue;
            };
            match t.phase {
                Phase::Preparing { deadline_ns } if now_ns >= deadline_ns => {
                    self.abort(txn_id, ErrorCode::BackupLost, now_ns, out);
                }
                Phase::Committing { resend_ns } if now_ns >= resend_ns => {
                    t.phase = Phase::Committing {
                        resend_ns: now_ns + self.timeouts.resend_ns,
                    };
                    // A node that left hears nothing until it rejoins: its
                    // reconciliation settles the page, and resends reach it from then.
                    if let Some(m) = &t.mapping {
                        for n in t.waiting.iter().filter(|n| self.nodes.contains_key(n)) {
                            out.push(Action::Commit {
                                to: *n,
                                txn_id,
                                mapping: m.clone(),
                            });
                        }
                    }
                }
                Phase::Aborting { resend_ns } if now_ns >= resend_ns => {
                    t.phase = Phase::Aborting {
                        resend_ns: now_ns + self.timeouts.resend_ns,
                    };
                    for n in t.waiting.iter().filter(|n| self.nodes.contains_key(n)) {
                        out.push(Action::Abort { to: *n, txn_id });
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coord(nodes: &[(u32, u32)]) -> Coordinator {
        let mut c = Coordinator::new(Epoch(1), 41, Timeouts::default());
        for &(id, free) in nodes {
            c.set_node(NodeId(id), NodeView { free_pages: free });
        }
        c
    }

    /// Node 1 asked for a page with 2 backups (transaction 1); nodes 2 and 3 prepared.
    fn both_backups_prepared() -> Coordinator {
        let mut c = coord(&[(1, 10), (2, 10), (3, 10)]);
        c.handle(alloc(1, 5, 2), 0);
        for (n, page) in [(2, 4), (3, 6)] {
            c.handle(
                Input::Prepared {
                    from: NodeId(n),
                    txn_id: 1,
                    page: PageIndex(page),
                },
                1,
            );
        }
        c
    }

    fn alloc(from: u32, req: u64, backups: u8) -> Input {
        Input::AllocPage {
            from: NodeId(from),
            request_id: req,
            epoch: Epoch(1),
            primary_page: PageIndex(7),
            backups_wanted: backups,
        }
    }

    #[test]
    fn happy_path_in_protocol_order() {
        let mut c = coord(&[(1, 10), (2, 5), (3, 9)]);
        let a = c.handle(alloc(1, 100, 2), 0);
        assert_eq!(
            a,
            vec![
                Action::Prepare {
                    to: NodeId(3),
                    txn_id: 1
                },
                Action::Prepare {
                    to: NodeId(2),
                    txn_id: 1
                }
            ]
        );
        assert!(
            c.handle(
                Input::Prepared {
                    from: NodeId(3),
                    txn_id: 1,
                    page: PageIndex(4)
                },
                1
            )
            .is_empty()
        );
        let a = c.handle(
            Input::Prepared {
                from: NodeId(2),
                txn_id: 1,
                page: PageIndex(8),
            },
            2,
        );
        let mapping = Mapping {
            page_id: PageId(42),
            replicas: vec![
                Replica {
                    node: NodeId(1),
                    page: PageIndex(7),
                },
                Replica {
                    node: NodeId(3),
                    page: PageIndex(4),
                },
                Replica {
                    node: NodeId(2),
                    page: PageIndex(8),
                },
            ],
            freed: false,
            revision: 0,
        };
        assert_eq!(
            a,
            vec![Action::Persist {
                txn_id: 1,
                mapping: mapping.clone()
            }]
        );
        // Nothing is committed anywhere before the persist completes.
        assert!(c.handle(Input::Tick, 3).is_empty());
        let a = c.handle(Input::Persisted { txn_ids: vec![1] }, 4);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|x| matches!(x, Action::Commit { .. })));
        assert!(
            c.handle(
                Input::CommitAck {
                    from: NodeId(3),
                    txn_id: 1
                },
                5
            )
            .is_empty()
        );
        let a = c.handle(
            Input::CommitAck {
                from: NodeId(2),
                txn_id: 1,
            },
            6,
        );
        assert_eq!(
            a,
            vec![Action::Reply {
                to: NodeId(1),
                request_id: 100,
                txn_id: 1,
                result: Ok(mapping.clone())
            }]
        );
        // A retried request gets the same answer, not a second page.
        let a = c.handle(alloc(1, 100, 2), 7);
        assert_eq!(
            a,
            vec![Action::Reply {
                to: NodeId(1),
                request_id: 100,
                txn_id: 1,
                result: Ok(mapping)
            }]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn refusals() {
        let mut c = coord(&[(1, 10), (2, 5)]);
        let err = |a: Vec<Action>| match a.as_slice() {
            [Action::Reply { result: Err(e), .. }] => *e,
            other => panic!("{other:?}"),
        };
        assert_eq!(err(c.handle(alloc(1, 1, 2), 0)), ErrorCode::NotEnoughNodes);
        let stale = Input::AllocPage {
            from: NodeId(1),
            request_id: 2,
            epoch: Epoch(0),
            primary_page: PageIndex(0),
            backups_wanted: 1,
        };
        assert_eq!(err(c.handle(stale, 0)), ErrorCode::StaleEpoch);
        assert_eq!(err(c.handle(alloc(9, 3, 1), 0)), ErrorCode::UnknownPage);
        assert_eq!(err(c.handle(alloc(1, 4, 8), 0)), ErrorCode::Malformed);
        c.set_node(NodeId(2), NodeView { free_pages: 0 });
        assert_eq!(err(c.handle(alloc(1, 5, 1), 0)), ErrorCode::NotEnoughNodes);
    }

    #[test]
    fn failures_before_the_persist_abort_everything() {
        let mut c = coord(&[(1, 10), (2, 5), (3, 9)]);
        c.handle(alloc(1, 1, 2), 0);
        c.handle(
            Input::Prepared {
                from: NodeId(3),
                txn_id: 1,
                page: PageIndex(4),
            },
            1,
        );
        let a = c.handle(
            Input::PrepareFailed {
                from: NodeId(2),
                txn_id: 1,
                code: ErrorCode::NoSpace,
            },
            2,
        );
        assert_eq!(
            a,
            vec![
                Action::Abort {
                    to: NodeId(3),
                    txn_id: 1
                },
                Action::Abort {
                    to: NodeId(2),
                    txn_id: 1
                }
            ]
        );
        assert_eq!(c.node(NodeId(2)).unwrap().free_pages, 0);
        // Aborts are resent until acknowledged, then the primary hears the error.
        let a = c.handle(Input::Tick, 200_000_000);
        assert_eq!(a.len(), 2);
        c.handle(
            Input::AbortAck {
                from: NodeId(3),
                txn_id: 1,
            },
            3,
        );
        let a = c.handle(
            Input::AbortAck {
                from: NodeId(2),
                txn_id: 1,
            },
            4,
        );
        assert!(matches!(
            a.as_slice(),
            [Action::Reply {
                result: Err(ErrorCode::NoSpace),
                ..
            }]
        ));
        assert_eq!(
            c.node(NodeId(3)).unwrap().free_pages,
            9,
            "the freed backup page is counted back"
        );

        // A prepare timeout aborts too; so does a failed persist; page ids are not reused.
        c.handle(alloc(1, 2, 1), 1_000_000_000);
        let a = c.handle(Input::Tick, 2_000_000_000);
        assert!(matches!(a.as_slice(), [Action::Abort { .. }]));
        c.handle(alloc(1, 3, 1), 3_000_000_000);
        let a = c.handle(
            Input::Prepared {
                from: NodeId(3),
                txn_id: 3,
                page: PageIndex(1),
            },
            3_000_000_001,
        );
        let Action::Persist { mapping, .. } = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(mapping.page_id, PageId(42));
        let a = c.handle(Input::PersistFailed { txn_ids: vec![3] }, 3_000_000_002);
        assert!(matches!(a.as_slice(), [Action::Abort { .. }]));
        c.handle(alloc(1, 4, 1), 4_000_000_000);
        let a = c.handle(
            Input::Prepared {
                from: NodeId(3),
                txn_id: 4,
                page: PageIndex(2),
            },
            4_000_000_001,
        );
        let Action::Persist { mapping, .. } = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(
            mapping.page_id,
            PageId(43),
            "a page id whose persist failed is never reused"
        );
    }

    #[test]
    fn a_node_leaving_mid_prepare_aborts_without_waiting_for_it() {
        let mut c = coord(&[(1, 10), (2, 10), (3, 10)]);
        let a = c.handle(alloc(1, 5, 2), 0);
        assert_eq!(a.len(), 2, "prepares to both backups: {a:?}");
        // Node 3 prepared, then its connection ended before node 2 answered.
        c.handle(
            Input::Prepared {
                from: NodeId(3),
                txn_id: 1,
                page: PageIndex(4),
            },
            1,
        );
        let a = c.handle(Input::NodeLeft { node: NodeId(3) }, 2);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Abort { to, txn_id: 1 } if *to == NodeId(2))),
            "{a:?}"
        );
        // Node 2's late Prepared must not resurrect the transaction into a persist.
        let a = c.handle(
            Input::Prepared {
                from: NodeId(2),
                txn_id: 1,
                page: PageIndex(9),
            },
            3,
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::Persist { .. })),
            "{a:?}"
        );
        // Only node 2's ack is awaited; then the primary hears of the failure.
        let a = c.handle(
            Input::AbortAck {
                from: NodeId(2),
                txn_id: 1,
            },
            4,
        );
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Reply { result: Err(_), .. })),
            "{a:?}"
        );
        assert_eq!(c.in_flight(), 0);
        // A departed node is no longer chosen as a backup.
        assert_eq!(c.choose_backups(NodeId(1), 2), None);
    }

    #[test]
    fn commits_are_not_resent_to_a_departed_backup_until_it_rejoins() {
        let mut c = both_backups_prepared();
        c.handle(Input::Persisted { txn_ids: vec![1] }, 2);
        c.handle(
            Input::CommitAck {
                from: NodeId(2),
                txn_id: 1,
            },
            3,
        );
        // Node 3 left after the persist: the mapping stands, the primary waits for it
        // (DESIGN step 6), but nothing is sent to a node that is not there.
        assert!(c.handle(Input::NodeLeft { node: NodeId(3) }, 4).is_empty());
        assert!(c.handle(Input::Tick, 200_000_000).is_empty());
        // Back: the resend reaches it, its ack completes the allocation.
        c.set_node(NodeId(3), NodeView { free_pages: 9 });
        let a = c.handle(Input::Tick, 400_000_000);
        assert!(
            matches!(a.as_slice(), [Action::Commit { to, txn_id: 1, .. }] if *to == NodeId(3)),
            "{a:?}"
        );
        let a = c.handle(
            Input::CommitAck {
                from: NodeId(3),
                txn_id: 1,
            },
            5,
        );
        assert!(
            matches!(a.as_slice(), [Action::Reply { result: Ok(_), .. }]),
            "{a:?}"
        );
    }

    #[test]
    fn an_abort_does_not_wait_for_a_backup_that_already_left() {
        let mut c = both_backups_prepared();
        // The mapping is being written when node 3 leaves; then the write fails.
        c.handle(Input::NodeLeft { node: NodeId(3) }, 2);
        let a = c.handle(Input::PersistFailed { txn_ids: vec![1] }, 3);
        assert!(
            matches!(a.as_slice(), [Action::Abort { to, txn_id: 1 }] if *to == NodeId(2)),
            "only the backup still there is told: {a:?}"
        );
        let a = c.handle(
            Input::AbortAck {
                from: NodeId(2),
                txn_id: 1,
            },
            4,
        );
        assert!(
            matches!(a.as_slice(), [Action::Reply { result: Err(_), .. }]),
            "{a:?}"
        );
    }

    #[test]
    fn a_dead_backup_leaves_committing_mappings_and_the_epoch_moves_on() {
        let mut c = both_backups_prepared();
        c.handle(Input::Persisted { txn_ids: vec![1] }, 2);
        // Node 2 acks its Commit; node 3 went away and is declared dead.
        let a = c.handle(
            Input::CommitAck {
                from: NodeId(2),
                txn_id: 1,
            },
            3,
        );
        assert!(a.is_empty(), "{a:?}");
        c.handle(Input::NodeLeft { node: NodeId(3) }, 4);
        let a = c.handle(
            Input::NodeDead {
                node: NodeId(3),
                epoch: Epoch(2),
            },
            5,
        );
        let [
            Action::Reply {
                result: Ok(m), to, ..
            },
        ] = a.as_slice()
        else {
            panic!("the primary must be answered without the dead backup: {a:?}")
        };
        assert_eq!(*to, NodeId(1));
        let nodes: Vec<u32> = m.replicas.iter().map(|r| r.node.0).collect();
        assert_eq!(nodes, [1, 2]);
        assert_eq!(c.epoch(), Epoch(2));
        // Requests of the old epoch are refused; the new one is served.
        let a = c.handle(alloc(1, 6, 1), 6);
        assert!(
            matches!(
                a.as_slice(),
                [Action::Reply {
                    result: Err(ErrorCode::StaleEpoch),
                    ..
                }]
            ),
            "{a:?}"
        );
        let mut fresh = alloc(1, 7, 1);
        if let Input::AllocPage { epoch, .. } = &mut fresh {
            *epoch = Epoch(2);
        }
        let a = c.handle(fresh, 7);
        assert!(
            matches!(a.as_slice(), [Action::Prepare { to, .. }] if *to == NodeId(2)),
            "{a:?}"
        );
    }
}
