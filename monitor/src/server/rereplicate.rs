//! The monitor's shell around [`Rereplicator`] (`monitor/REREPLICATION.md`): what starts
//! a re-replication (a node declared dead, or a GAT loaded with dropped replicas), the
//! bandwidth budget, the messages of R2-R6 and their answers, the GAT write (R5, shared
//! with allocation's writer thread), and the progress and report lines (R7).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::Body;
use pmgas_layout::{NodeId, PageId};
use pmgas_verbs::fault;

use super::{Monitor, REQUEST_TIMEOUT, Sent};
use crate::rereplication::{NodeView, PageView, RereplicateAction, Rereplicator};

/// How long the primary may take to copy a page (R3, R4): its queue may hold updates, and
/// the bandwidth is shared.
const COPY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often progress is printed while pages remain.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often targets that failed become eligible again.
const FORGIVE_EVERY: Duration = Duration::from_secs(2);

/// What a re-replication request to a node was.
#[derive(Debug, Clone, Copy)]
pub(super) enum ReSent {
    Prepare(u64),
    Add(u64),
    Commit(u64),
    Abort(u64),
    Notice,
}

/// The re-replication's state in the monitor (see the module head).
pub(super) struct Rereplication {
    machine: Rereplicator,
    /// Copy bandwidth (MB/s); 0: unlimited.
    mb_s: u32,
    page_size: u64,
    /// Since when pages have been short (None: none are), pages started since, bytes
    /// copied since, and when progress was last printed.
    began: Option<Instant>,
    started: u64,
    bytes: u64,
    last_progress: Instant,
    last_forgiven: Instant,
    /// When targets were last chosen: at most every [`DRIVE_EVERY`] (a page waiting for a
    /// node would otherwise cost a pass over the nodes on every loop pass).
    last_drive: Instant,
}

/// How often queued pages are given targets.
const DRIVE_EVERY: Duration = Duration::from_millis(10);

impl Rereplication {
    pub(super) fn new(concurrency: usize, mb_s: u32, page_size: u64) -> Self {
        Self {
            // Transaction ids apart from the allocation's (which count from 1).
            machine: Rereplicator::new(concurrency, 1 << 62),
            mb_s,
            page_size,
            began: None,
            started: 0,
            bytes: 0,
            last_progress: Instant::now(),
            last_forgiven: Instant::now(),
            last_drive: Instant::now(),
        }
    }

    pub(super) fn owns(&self, txn: u64) -> bool {
        self.machine.owns(txn)
    }

    pub(super) fn persisting_involves(&self, node: NodeId) -> bool {
        self.machine.persisting_involves(node)
    }

    pub(super) fn busy(&self, page_id: PageId) -> bool {
        self.machine.busy(page_id)
    }

    /// R1: `page_id` should have `want` replicas.
    pub(super) fn need(&mut self, page_id: PageId, want: usize) {
        self.machine.need(page_id, want);
    }

    /// How many more pages may start now under the bandwidth setting (one page of burst).
    fn budget(&self) -> usize {
        if self.mb_s == 0 {
            return usize::MAX;
        }
        let Some(began) = self.began else {
            return 1;
        };
        let allowed = began.elapsed().as_secs_f64() * f64::from(self.mb_s) * 1e6
            / self.page_size as f64
            + 1.0;
        (allowed as u64).saturating_sub(self.started) as usize
    }
}

impl Monitor<'_> {
    /// R1 after a declaration: flights that involved `node` roll back; every page that
    /// lost a replica (`shorts`: page id, replicas before) is queued.
    pub(super) fn rereplicate_after_death(&mut self, node: NodeId, shorts: Vec<(PageId, usize)>) {
        let actions = self.rereplication.machine.node_lost(node);
        self.carry_out_rereplication(actions);
        for (page_id, want) in shorts {
            self.rereplication.need(page_id, want);
        }
    }

    /// R1 at start: the pages the loaded GAT shows short (its last revision lost a
    /// replica to a declaration: a mapping written by a re-replication names only live
    /// replicas).
    pub(super) fn rereplicate_loaded(&mut self, short: BTreeMap<PageId, usize>) {
        for (page_id, lost) in short {
            if let Some(m) = self.mappings.get(&page_id)
                && !m.freed
                && !m.replicas.is_empty()
            {
                self.rereplication.need(page_id, m.replicas.len() + lost);
            }
        }
    }

    /// R1, R2, R7: starts what the concurrency and bandwidth allow, prints progress.
    /// Returns whether it sent anything.
    pub(super) fn drive_rereplication(&mut self) -> bool {
        let (waiting, in_flight, _) = self.rereplication.machine.progress();
        if waiting + in_flight == 0
            || self.deposed.is_some()
            || self.rereplication.last_drive.elapsed() < DRIVE_EVERY
        {
            return false;
        }
        self.rereplication.last_drive = Instant::now();
        let nodes: BTreeMap<NodeId, NodeView> = self
            .by_node
            .iter()
            .filter_map(|(&node, &i)| {
                let peer = self.peers.get(i)?;
                let view = self.coordinator.node(node)?;
                Some((
                    node,
                    NodeView {
                        free_pages: view.free_pages,
                        ready: peer.reconcile.is_none(),
                    },
                ))
            })
            .collect();
        let (mappings, dead) = (&self.mappings, &self.failures.dead);
        let view = |page_id: PageId| {
            let mapping = mappings.get(&page_id)?.clone();
            // A node declared dead for this page id may not hold it again: the view
            // would drop that replica.
            let excluded = dead
                .0
                .iter()
                .filter(|(_, d)| page_id.0 <= d.max_page_id)
                .map(|(n, _)| *n)
                .collect();
            Some(PageView { mapping, excluded })
        };
        if self.rereplication.last_forgiven.elapsed() >= FORGIVE_EVERY {
            self.rereplication.last_forgiven = Instant::now();
            self.rereplication.machine.forgive();
        }
        let budget = self.rereplication.budget();
        let actions = self.rereplication.machine.drive(&view, &nodes, budget);
        let any = !actions.is_empty();
        self.carry_out_rereplication(actions);
        self.print_rereplication_progress();
        any
    }

    fn print_rereplication_progress(&mut self) {
        let r = &mut self.rereplication;
        let Some(began) = r.began else {
            return;
        };
        if r.last_progress.elapsed() < PROGRESS_EVERY {
            return;
        }
        r.last_progress = Instant::now();
        let (waiting, in_flight, done) = r.machine.progress();
        let secs = began.elapsed().as_secs_f64();
        println!(
            "REREPLICATE pages_left={} in_flight={in_flight} pages_done={done} bytes_copied={} \
             rate_mb_s={:.2} unix_ms={}",
            waiting + in_flight,
            r.bytes,
            r.bytes as f64 / secs.max(1e-3) / 1e6,
            fault::unix_ms()
        );
    }

    /// Sends a re-replication request; one that cannot go out fails as if unanswered.
    fn send_rere(&mut self, to: NodeId, body: Body, sent: ReSent, timeout: Duration) {
        if !self.send_with_timeout(to, body, Sent::Rere(sent), timeout) {
            self.rereplicate_answer(to, sent, None);
        }
    }

    pub(super) fn carry_out_rereplication(&mut self, actions: Vec<RereplicateAction>) {
        for action in actions {
            match action {
                RereplicateAction::Prepare { to, txn, page_id } => {
                    let r = &mut self.rereplication;
                    if r.began.is_none() {
                        // A round starts: its counts, rate and report start here.
                        r.began = Some(Instant::now());
                        r.started = 0;
                        r.bytes = 0;
                    }
                    r.started += 1;
                    let body = Body::PrepareCopy {
                        txn_id: txn,
                        page_id,
                    };
                    self.send_rere(to, body, ReSent::Prepare(txn), REQUEST_TIMEOUT);
                }
                RereplicateAction::AddReplica {
                    to,
                    page_id,
                    target,
                    txn,
                } => {
                    let body = Body::AddReplica {
                        txn_id: txn,
                        page_id,
                        target,
                    };
                    self.send_rere(to, body, ReSent::Add(txn), COPY_TIMEOUT);
                    fault::point("monitor.rereplicate-copying");
                }
                RereplicateAction::Persist { mapping, txn } => self.persist_replica(mapping, txn),
                RereplicateAction::Commit {
                    to,
                    txn,
                    page_id,
                    replicas,
                } => {
                    let body = Body::Commit {
                        txn_id: txn,
                        page_id,
                        replicas,
                    };
                    self.send_rere(to, body, ReSent::Commit(txn), REQUEST_TIMEOUT);
                }
                RereplicateAction::Abort { to, txn, primary } => {
                    self.send(
                        to,
                        Body::Abort { txn_id: txn },
                        Sent::Rere(ReSent::Abort(txn)),
                    );
                    if let Some((p, page_id)) = primary {
                        self.notify_primary(p, page_id);
                    }
                }
                RereplicateAction::Report {
                    pages,
                    failed_attempts,
                    waiting,
                } => {
                    let r = &mut self.rereplication;
                    let ms = r.began.take().map_or(0, |b| b.elapsed().as_millis());
                    let rate = r.bytes as f64 / (ms as f64 / 1e3).max(1e-3) / 1e6;
                    println!(
                        "REREPLICATED pages={pages} bytes={} ms={ms} rate_mb_s={rate:.2} \
                         failed_attempts={failed_attempts} waiting_for_a_node={waiting} unix_ms={}",
                        r.bytes,
                        fault::unix_ms()
                    );
                    if waiting > 0 {
                        tracing::warn!(
                            pages = waiting,
                            "pages short of replicas with no node that can take one (they go once one joins)"
                        );
                    }
                    r.bytes = 0;
                }
            }
        }
    }

    /// R5: the mapping with the new replica goes to the GAT writer, unless the page was
    /// freed or is being freed meanwhile (then the re-replication rolls back).
    fn persist_replica(&mut self, mapping: Mapping, txn: u64) {
        let page_id = mapping.page_id;
        let live = self.mappings.get(&page_id).is_some_and(|m| !m.freed);
        if !live || self.freer.freeing(page_id) {
            let actions = self.rereplication.machine.persisted(txn, false);
            return self.carry_out_rereplication(actions);
        }
        self.writing.insert(txn, mapping.clone());
        if self.to_persister.send(vec![(Some(txn), mapping)]).is_err() {
            self.writing.remove(&txn);
            let actions = self.rereplication.machine.persisted(txn, false);
            return self.carry_out_rereplication(actions);
        }
        fault::point("monitor.rereplicate-persist-queued");
    }

    /// R5 done: the GAT writer's outcome for re-replication `txn`.
    pub(super) fn rereplica_persisted(&mut self, txn: u64, stored: bool) {
        if stored {
            fault::point("monitor.rereplicate-mapped");
        }
        let actions = self.rereplication.machine.persisted(txn, stored);
        self.carry_out_rereplication(actions);
    }

    /// Tells the page's primary its mapping now (with the new replica after R6, without
    /// it after a rollback): its join of the page ends.
    fn notify_primary(&mut self, primary: NodeId, page_id: PageId) {
        let Some(m) = self.mappings.get(&page_id) else {
            return;
        };
        if m.freed || m.replicas.is_empty() {
            return;
        }
        let body = Body::Mapping {
            page_id: m.page_id,
            replicas: m.replicas.clone(),
        };
        self.send(primary, body, Sent::Rere(ReSent::Notice));
    }

    /// `node` reconciled (its reconciliation committed the pages the GAT lists on it): the
    /// Commits due to it go again, so that their flights end.
    pub(super) fn rereplicate_node_ready(&mut self, node: NodeId) {
        let actions = self.rereplication.machine.commits_to(node);
        self.carry_out_rereplication(actions);
    }

    /// A node's answer to a re-replication request (`body` None: it timed out).
    pub(super) fn rereplicate_answer(&mut self, node: NodeId, sent: ReSent, body: Option<Body>) {
        let m = &mut self.rereplication.machine;
        let actions = match (sent, body) {
            (ReSent::Prepare(txn), Some(Body::Prepared { txn_id, page })) if txn_id == txn => {
                if let Some(mut view) = self.coordinator.node(node) {
                    view.free_pages = view.free_pages.saturating_sub(1);
                    self.coordinator.set_node(node, view);
                }
                fault::point("monitor.rereplicate-prepared");
                m.prepared(txn, page)
            }
            (ReSent::Prepare(txn), other) => {
                tracing::warn!(%node, txn, answer = ?other, "re-replication: the target did not prepare a page");
                m.prepare_failed(txn)
            }
            (ReSent::Add(txn), Some(Body::ReplicaAdded { txn_id, bytes, .. })) if txn_id == txn => {
                self.rereplication.bytes += bytes;
                m.copied(txn, true)
            }
            (ReSent::Add(txn), other) => {
                tracing::warn!(%node, txn, answer = ?other, "re-replication: the copy failed");
                m.copied(txn, false)
            }
            (ReSent::Commit(txn), Some(Body::CommitAck { txn_id, page_id })) if txn_id == txn => {
                fault::point("monitor.rereplicate-committed");
                let primary = self.mappings.get(&page_id).and_then(|m| m.replicas.first());
                if let Some(p) = primary.map(|r| r.node) {
                    self.notify_primary(p, page_id);
                }
                self.rereplication.machine.committed(txn)
            }
            (ReSent::Commit(txn), other) => {
                // The GAT lists the target already: asked again while it is connected;
                // otherwise when it has rejoined ([`Monitor::rereplicate_node_ready`]) or
                // its declaration drops it.
                tracing::warn!(%node, txn, answer = ?other, "re-replication: Commit unanswered");
                if self.by_node.contains_key(&node) {
                    m.commit_again(txn).into_iter().collect()
                } else {
                    vec![]
                }
            }
            (ReSent::Abort(txn), Some(Body::AbortAck { .. })) => {
                if let Some(mut view) = self.coordinator.node(node) {
                    view.free_pages = view.free_pages.saturating_add(1);
                    self.coordinator.set_node(node, view);
                }
                tracing::debug!(%node, txn, "re-replication rolled back on the target");
                vec![]
            }
            (ReSent::Abort(_) | ReSent::Notice, _) => vec![],
        };
        self.carry_out_rereplication(actions);
    }
}
