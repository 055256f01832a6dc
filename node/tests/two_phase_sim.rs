//! Seeded simulation of the two-phase page allocation: the monitor's [`Coordinator`] and
//! every node's [`Participant`] and primary logic, over a network that drops, duplicates
//! and delays messages, and a metadata store whose writes sometimes fail. Only the
//! network and the store are simulated; both state machines are the real ones, and each
//! node's ART is the real pure [`ArtState`].
//!
//! At quiescence it checks: page ids unique; no two replicas of a page on one node; every
//! replica of every stored mapping ALLOCATED with its page id; every ALLOCATED page in
//! exactly one stored mapping; no PREALLOCATED page left; every primary's answer matches
//! the store. Failing seeds are printed; `PMGAS_SIM_SEED=N` replays one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use pmgas_layout::wire::{ErrorCode, Replica};
use pmgas_layout::{ArtRecord, Epoch, NodeId, PageIndex, PageState};
use pmgas_monitor::{Action, Coordinator, Input, Mapping, NodeView, Timeouts};
use pmgas_node::ArtState;
use pmgas_node::art::SplitMix;
use pmgas_node::participant::{Participant, primary_finish, primary_prepare};

const MS: u64 = 1_000_000;
const EPOCH: Epoch = Epoch(3);
const PMGAS_SIM_SEEDS: u64 = 2000;

#[derive(Debug, Clone)]
enum ToNode {
    Prepare {
        txn_id: u64,
    },
    Commit {
        txn_id: u64,
        mapping: Mapping,
    },
    Abort {
        txn_id: u64,
    },
    Reply {
        request_id: u64,
        result: Result<Mapping, ErrorCode>,
    },
}

#[derive(Debug, Clone)]
enum Event {
    ToCoord(Input),
    ToNode(usize, ToNode),
    StoreDone {
        txn_id: u64,
        mapping: Mapping,
        ok: bool,
    },
    Tick,
    PrimaryStart(usize),
    PrimaryRetry(usize, u64),
}

struct Node {
    id: NodeId,
    art: ArtState,
    participant: Participant,
    /// Open requests: request id -> (pre-allocated page, backups wanted).
    pending: HashMap<u64, (PageIndex, u8)>,
    answers: Vec<(u64, Result<Mapping, ErrorCode>)>,
}

struct Sim {
    rng: SplitMix,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    coord: Coordinator,
    nodes: Vec<Node>,
    stored: BTreeMap<u64, Mapping>,
    next_request: u64,
    drop_pct: u64,
    store_fail_pct: u64,
}

impl Sim {
    fn at(&mut self, delay: u64, e: Event) {
        self.seq += 1;
        self.events.push(Some(e));
        self.queue
            .push(Reverse((self.now + delay, self.seq, self.events.len() - 1)));
    }

    /// A message over the network: maybe lost, maybe duplicated, always delayed.
    fn send(&mut self, e: Event) {
        if self.rng.below(100) < self.drop_pct {
            return;
        }
        let d = 100_000 + self.rng.below(2 * MS);
        if self.rng.below(100) < 5 {
            let d2 = 100_000 + self.rng.below(4 * MS);
            self.at(d2, e.clone());
        }
        self.at(d, e);
    }

    fn node_index(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("known node")
    }

    fn coordinator(&mut self, input: Input) {
        let now = self.now;
        for action in self.coord.handle(input, now) {
            match action {
                Action::Prepare { to, txn_id } => {
                    let i = self.node_index(to);
                    self.send(Event::ToNode(i, ToNode::Prepare { txn_id }));
                }
                Action::Commit {
                    to,
                    txn_id,
                    mapping,
                } => {
                    let i = self.node_index(to);
                    self.send(Event::ToNode(i, ToNode::Commit { txn_id, mapping }));
                }
                Action::Abort { to, txn_id } => {
                    let i = self.node_index(to);
                    self.send(Event::ToNode(i, ToNode::Abort { txn_id }));
                }
                Action::Reply {
                    to,
                    request_id,
                    result,
                    ..
                } => {
                    let i = self.node_index(to);
                    self.send(Event::ToNode(i, ToNode::Reply { request_id, result }));
                }
                Action::Persist { txn_id, mapping } => {
                    let ok = self.rng.below(100) >= self.store_fail_pct;
                    let d = MS + self.rng.below(3 * MS);
                    self.at(
                        d,
                        Event::StoreDone {
                            txn_id,
                            mapping,
                            ok,
                        },
                    );
                }
            }
        }
    }

    fn node_event(&mut self, i: usize, msg: ToNode) {
        let from = self.nodes[i].id;
        let reply = {
            let n = &mut self.nodes[i];
            match msg {
                ToNode::Prepare { txn_id } => {
                    Some(match n.participant.prepare(&mut n.art, txn_id) {
                        Ok(page) => Input::Prepared { from, txn_id, page },
                        Err(code) => Input::PrepareFailed { from, txn_id, code },
                    })
                }
                ToNode::Commit { txn_id, mapping } => {
                    n.participant
                        .commit(
                            &mut n.art,
                            txn_id,
                            mapping.page_id,
                            EPOCH,
                            &mapping.replicas,
                        )
                        .unwrap_or_else(|e| panic!("{from} commit {txn_id}: {e:?}"));
                    Some(Input::CommitAck { from, txn_id })
                }
                ToNode::Abort { txn_id } => {
                    n.participant
                        .abort(&mut n.art, txn_id)
                        .unwrap_or_else(|e| panic!("{from} abort: {e:?}"));
                    Some(Input::AbortAck { from, txn_id })
                }
                ToNode::Reply { request_id, result } => {
                    if let Some((page, _)) = n.pending.remove(&request_id) {
                        let answer = result
                            .as_ref()
                            .map(|m| (m.page_id, m.replicas.as_slice()))
                            .map_err(|e| *e);
                        primary_finish(&mut n.art, page, EPOCH, answer).unwrap_or_else(|e| {
                            panic!("{from} finishing request {request_id}: {e:?}")
                        });
                        n.answers.push((request_id, result));
                    }
                    None
                }
            }
        };
        if let Some(input) = reply {
            self.send(Event::ToCoord(input));
        }
    }

    fn alloc_request(&self, i: usize, request_id: u64, page: PageIndex, backups: u8) -> Event {
        Event::ToCoord(Input::AllocPage {
            from: self.nodes[i].id,
            request_id,
            epoch: EPOCH,
            primary_page: page,
            backups_wanted: backups,
        })
    }

    fn step(&mut self, e: Event) {
        if std::env::var_os("PMGAS_SIM_TRACE").is_some() {
            eprintln!("{:>12} {e:?}", self.now);
        }
        match e {
            Event::ToCoord(input) => self.coordinator(input),
            Event::ToNode(i, msg) => self.node_event(i, msg),
            Event::StoreDone {
                txn_id,
                mapping,
                ok,
            } => {
                if ok {
                    self.stored.insert(txn_id, mapping);
                    self.coordinator(Input::Persisted {
                        txn_ids: vec![txn_id],
                    });
                } else {
                    self.coordinator(Input::PersistFailed {
                        txn_ids: vec![txn_id],
                    });
                }
            }
            Event::Tick => self.coordinator(Input::Tick),
            Event::PrimaryStart(i) => {
                let backups = self.rng.below(3) as u8;
                let Ok(page) = primary_prepare(&mut self.nodes[i].art) else {
                    return; // this node is full: nothing to ask for
                };
                self.next_request += 1;
                let request_id = self.next_request;
                self.nodes[i].pending.insert(request_id, (page, backups));
                let e = self.alloc_request(i, request_id, page, backups);
                self.send(e);
                self.at(300 * MS, Event::PrimaryRetry(i, request_id));
            }
            Event::PrimaryRetry(i, request_id) => {
                if let Some(&(page, backups)) = self.nodes[i].pending.get(&request_id) {
                    let e = self.alloc_request(i, request_id, page, backups);
                    self.send(e);
                    self.at(300 * MS, Event::PrimaryRetry(i, request_id));
                }
            }
        }
    }
}

fn run(seed: u64) -> (usize, usize) {
    let mut rng = SplitMix(seed);
    let node_count = 3 + rng.below(3) as usize;
    let pages = 10 + rng.below(20) as usize;
    let mut coord = Coordinator::new(
        EPOCH,
        0,
        Timeouts {
            prepare_ns: 50 * MS,
            resend_ns: 20 * MS,
        },
    );
    let nodes: Vec<Node> = (0..node_count)
        .map(|i| {
            let id = NodeId(i as u32 + 1);
            coord.set_node(
                id,
                NodeView {
                    free_pages: pages as u32,
                },
            );
            Node {
                id,
                art: ArtState::from_entries(vec![Some(ArtRecord::FRESH); pages]),
                participant: Participant::new(id),
                pending: HashMap::new(),
                answers: vec![],
            }
        })
        .collect();
    let drop_pct = rng.below(20);
    let store_fail_pct = rng.below(15);
    let mut sim = Sim {
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: vec![],
        coord,
        nodes,
        stored: BTreeMap::new(),
        next_request: 0,
        drop_pct,
        store_fail_pct,
    };
    for i in 0..node_count {
        for _ in 0..10 {
            let t = sim.rng.below(200 * MS);
            sim.at(t, Event::PrimaryStart(i));
        }
    }
    for k in 0..2000u64 {
        sim.at(k * 10 * MS, Event::Tick);
    }
    while let Some(Reverse((t, _, idx))) = sim.queue.pop() {
        sim.now = t;
        if let Some(e) = sim.events[idx].take() {
            sim.step(e);
        }
        let idle = sim.nodes.iter().all(|n| n.pending.is_empty()) && sim.coord.in_flight() == 0;
        if idle
            && sim
                .queue
                .iter()
                .all(|Reverse((_, _, i))| matches!(sim.events[*i], Some(Event::Tick) | None))
        {
            break;
        }
    }
    check(&sim, seed);
    let answered = sim.nodes.iter().map(|n| n.answers.len()).sum();
    (answered, sim.stored.len())
}

fn check(sim: &Sim, seed: u64) {
    let ctx = format!("seed {seed}");
    assert_eq!(
        sim.coord.in_flight(),
        0,
        "{ctx}: transactions still in flight"
    );
    for n in &sim.nodes {
        assert!(
            n.pending.is_empty(),
            "{ctx}: {} has unanswered requests",
            n.id
        );
    }
    // Page ids unique; replicas on distinct nodes.
    let mut ids = HashSet::new();
    let mut owned: HashMap<(NodeId, PageIndex), u32> = HashMap::new();
    for m in sim.stored.values() {
        assert!(
            ids.insert(m.page_id),
            "{ctx}: page id {} stored twice",
            m.page_id.0
        );
        let nodes: HashSet<NodeId> = m.replicas.iter().map(|r| r.node).collect();
        assert_eq!(
            nodes.len(),
            m.replicas.len(),
            "{ctx}: two replicas on one node in {m:?}"
        );
        for r in &m.replicas {
            assert!(
                owned.insert((r.node, r.page), m.page_id.0).is_none(),
                "{ctx}: {r:?} in two mappings"
            );
            let node = &sim.nodes[sim.node_index(r.node)];
            let rec = node.art.get(r.page).unwrap();
            assert_eq!(
                (rec.state, rec.page_id),
                (PageState::Allocated, m.page_id),
                "{ctx}: replica {r:?} of page {} is not committed",
                m.page_id.0
            );
        }
    }
    // Every ALLOCATED page belongs to a stored mapping; nothing is left PREALLOCATED.
    for n in &sim.nodes {
        for (page, rec) in n.art.iter() {
            match rec.state {
                PageState::Preallocated => {
                    panic!("{ctx}: {} page {} left PREALLOCATED", n.id, page.0)
                }
                PageState::Allocated => assert_eq!(
                    owned.get(&(n.id, page)),
                    Some(&rec.page_id.0),
                    "{ctx}: {} page {} ALLOCATED outside every mapping",
                    n.id,
                    page.0
                ),
                PageState::Free => {}
            }
        }
        // Every successful answer is a stored mapping with this node's page first.
        for (_, answer) in &n.answers {
            if let Ok(m) = answer {
                assert!(
                    sim.stored.values().any(|s| s == m),
                    "{ctx}: answer {m:?} was never stored"
                );
                assert_eq!(m.replicas.first().map(|r: &Replica| r.node), Some(n.id));
            }
        }
    }
}

#[test]
fn two_phase_allocation_survives_loss_duplication_and_store_failures() {
    let seeds: Vec<u64> = match std::env::var("PMGAS_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("PMGAS_SIM_SEED is a number")],
        Err(_) => (1..=PMGAS_SIM_SEEDS).collect(),
    };
    let (mut answered, mut stored) = (0, 0);
    for seed in &seeds {
        let (a, s) = run(*seed);
        answered += a;
        stored += s;
    }
    eprintln!(
        "two-phase simulation: {} seeds, {answered} requests answered, {stored} mappings stored",
        seeds.len()
    );
    assert!(stored > seeds.len(), "the simulation stored almost nothing");
}
