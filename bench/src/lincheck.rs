//! `pmgas-bench check-history`: linearizability of recorded register histories.
//!
//! A workload records every read, write, compare-and-swap and fetch-and-add it issues on
//! 64-bit registers (one register per address, each starting at 0) as JSON lines; this
//! module decides whether some total order of those operations, each taking effect at one
//! instant between its invocation and its completion, explains every result.
//!
//! Registers are independent, so each address is checked on its own (linearizability is
//! compositional), which keeps every search small. The search is Wing and Gong's with
//! Lowe's memoisation ("Testing for linearizability", 2017; the algorithm Porcupine
//! implements): call and return events sorted by time in a doubly linked list; an operation
//! whose call comes before the first remaining return may be linearized next (it is lifted
//! out of the list and pushed on a stack); reaching a return whose operation is still in
//! the list means the choices so far were wrong, so the last one is undone (unlifted); a
//! configuration (set of linearized operations, register value) already searched from is
//! never searched again.
//!
//! An operation whose outcome was never learned ("unknown", Knossos's `:info`) may have
//! taken effect at any instant after its invocation, or never. It gets a call event and no
//! return event: nothing ever forces the search to linearize it, and the search succeeds as
//! soon as every "ok" operation is linearized, whatever unknown ones are left over. Each
//! unknown operation still pending may go in or out of every prefix, so the search builds
//! only linearizations of a canonical form and lets a configuration with fewer unknown
//! operations stand for those with more (see `search` and `Visited`): without that,
//! rejecting a history with a few dozen unknown operations would take exponentially long.
//!
//! Events at the same nanosecond are ordered calls first, so operations that merely touch
//! (one completes at the instant the other is invoked) count as concurrent: timestamps
//! taken on different threads are not precise enough to order them, and a checker must not
//! report a violation the clocks cannot show.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Search steps allowed per address before the verdict is [`Verdict::Undecided`].
pub const DEFAULT_MAX_STEPS: u64 = 50_000_000;
/// Memory the visited-configuration cache of one address may use before the verdict is
/// [`Verdict::Undecided`]: a pathological history must not take the machine down.
pub const DEFAULT_MAX_CACHE_BYTES: usize = 2 << 30;
/// Witness size: the tail of the longest linearizable prefix, the stuck operation and the
/// operations pending with it stay within about 20 lines.
const WITNESS_PREFIX_OPS: usize = 8;
const WITNESS_PENDING_OPS: usize = 11;

/// What an operation asked of its register, with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Call {
    Read,
    Write {
        value: u64,
    },
    /// Succeeds (the register becomes `new`) iff the register holds `expected`.
    Cas {
        expected: u64,
        new: u64,
    },
    /// The register becomes its old value plus `delta`, wrapping.
    Faa {
        delta: u64,
    },
}

/// How an operation ended, as far as its client learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Took effect between invocation and completion, with the recorded result.
    Ok,
    /// Definitely did not take effect; the checker ignores it.
    Fail,
    /// May have taken effect at any instant after invocation, or never.
    Unknown,
}

/// One operation of a history: a record, or the last record of a streamed (client, seq).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    pub client: String,
    pub seq: Option<u64>,
    pub addr: u64,
    #[serde(flatten)]
    pub call: Call,
    pub status: Status,
    /// The value the register held when the operation took effect: set for ok reads, cas
    /// and faa, `None` otherwise (a write observes nothing; unknown results are ignored).
    pub result: Option<u64>,
    pub invoke_ns: u64,
    /// When the client learned the outcome; `None` for unknown operations (+infinity) and
    /// for failed ones that did not record it.
    pub complete_ns: Option<u64>,
    /// 1-based line of the record that gave the operation its final form.
    pub line: usize,
}

/// Why a history could not be read; each variant names the line(s) involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// Not a record of the format, or a record that contradicts itself.
    Malformed { line: usize, reason: String },
    /// A record for a streamed (client, seq) that already has a completion (ok or fail).
    AlreadyCompleted {
        client: String,
        seq: u64,
        completed_line: usize,
        line: usize,
    },
    /// A record for a streamed (client, seq) that is not the operation an earlier record
    /// with that (client, seq) invoked.
    Mismatch {
        client: String,
        seq: u64,
        first_line: usize,
        line: usize,
        field: &'static str,
    },
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed { line, reason } => write!(f, "line {line}: {reason}"),
            Self::AlreadyCompleted {
                client,
                seq,
                completed_line,
                line,
            } => write!(
                f,
                "line {line}: client {client} seq {seq} was already completed at line {completed_line}"
            ),
            Self::Mismatch {
                client,
                seq,
                first_line,
                line,
                field,
            } => write!(
                f,
                "line {line}: client {client} seq {seq} differs in {field} from its record at line {first_line}"
            ),
        }
    }
}

impl std::error::Error for HistoryError {}

/// One line of a history, as written.
#[derive(Deserialize)]
struct Record {
    client: String,
    op: OpName,
    addr: u64,
    arg: Vec<u64>,
    #[serde(default)]
    result: Option<u64>,
    status: Status,
    invoke_ns: u64,
    #[serde(default)]
    complete_ns: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpName {
    Read,
    Write,
    Cas,
    Faa,
}

impl Record {
    fn into_op(self, line: usize) -> Result<Op, HistoryError> {
        let bad = |reason: String| HistoryError::Malformed { line, reason };
        let call = match (self.op, self.arg.as_slice()) {
            (OpName::Read, []) => Call::Read,
            (OpName::Write, &[value]) => Call::Write { value },
            (OpName::Cas, &[expected, new]) => Call::Cas { expected, new },
            (OpName::Faa, &[delta]) => Call::Faa { delta },
            (name, arg) => {
                let wanted = match name {
                    OpName::Read => "no arguments",
                    OpName::Write => "1 argument [value]",
                    OpName::Cas => "2 arguments [expected, new]",
                    OpName::Faa => "1 argument [delta]",
                };
                return Err(bad(format!("{name:?} takes {wanted}, got {}", arg.len())));
            }
        };
        let (result, complete_ns) = match self.status {
            Status::Ok => {
                let complete_ns = self
                    .complete_ns
                    .ok_or_else(|| bad("an ok record needs complete_ns".into()))?;
                if complete_ns < self.invoke_ns {
                    return Err(bad(format!(
                        "complete_ns {complete_ns} is before invoke_ns {}",
                        self.invoke_ns
                    )));
                }
                let result = match (call, self.result) {
                    (Call::Write { .. }, None) => None,
                    (Call::Write { .. }, Some(r)) => {
                        return Err(bad(format!("a write's result is null, got {r}")));
                    }
                    (_, None) => {
                        return Err(bad(format!("an ok {:?} needs its result", self.op)));
                    }
                    (_, Some(r)) => Some(r),
                };
                (result, Some(complete_ns))
            }
            // The result of an operation that did not take effect means nothing.
            Status::Fail => (None, self.complete_ns),
            // Completion time +infinity, result unknown: both recorded values are ignored.
            Status::Unknown => (None, None),
        };
        Ok(Op {
            client: self.client,
            seq: self.seq,
            addr: self.addr,
            call,
            status: self.status,
            result,
            invoke_ns: self.invoke_ns,
            complete_ns,
            line,
        })
    }
}

/// Reads a history, one JSON record per line (blank lines ignored). A record with a `seq`
/// replaces the earlier record with the same (client, seq), which must be its unknown
/// invocation record: same op, addr, arg and invoke_ns. Failed operations are kept (with
/// [`Status::Fail`]) so that reports can count them; [`check`] ignores them.
pub fn parse_history(text: &str) -> Result<Vec<Op>, HistoryError> {
    let mut ops: Vec<Op> = Vec::new();
    // (client, seq) -> index in `ops` of its latest record.
    let mut streamed: HashMap<(String, u64), usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(raw).map_err(|e| {
            // serde_json places the error in the one line it was given ("at line 1
            // column 12"); only the column means anything here.
            let text = e.to_string();
            let message = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(m, _)| m);
            HistoryError::Malformed {
                line,
                reason: format!("{message} (column {})", e.column()),
            }
        })?;
        let op = record.into_op(line)?;
        let Some(seq) = op.seq else {
            ops.push(op);
            continue;
        };
        match streamed.entry((op.client.clone(), seq)) {
            Entry::Vacant(slot) => {
                slot.insert(ops.len());
                ops.push(op);
            }
            Entry::Occupied(slot) => {
                let earlier = &mut ops[*slot.get()];
                if earlier.status != Status::Unknown {
                    return Err(HistoryError::AlreadyCompleted {
                        client: op.client,
                        seq,
                        completed_line: earlier.line,
                        line,
                    });
                }
                let field =
                    if std::mem::discriminant(&earlier.call) != std::mem::discriminant(&op.call) {
                        Some("op")
                    } else if earlier.call != op.call {
                        Some("arg")
                    } else if earlier.addr != op.addr {
                        Some("addr")
                    } else if earlier.invoke_ns != op.invoke_ns {
                        Some("invoke_ns")
                    } else {
                        None
                    };
                if let Some(field) = field {
                    return Err(HistoryError::Mismatch {
                        client: op.client,
                        seq,
                        first_line: earlier.line,
                        line,
                        field,
                    });
                }
                *earlier = op;
            }
        }
    }
    Ok(ops)
}

/// Limits of one address's search; past either, its verdict is [`Verdict::Undecided`].
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Search steps (one attempt to linearize an operation, or one backtrack) per address.
    pub max_steps: u64,
    /// Memory of the visited-configuration cache per address.
    pub max_cache_bytes: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            max_steps: DEFAULT_MAX_STEPS,
            max_cache_bytes: DEFAULT_MAX_CACHE_BYTES,
        }
    }
}

/// The checker's findings, one entry per address in ascending address order.
#[derive(Debug, Serialize)]
pub struct Report {
    pub addrs: Vec<AddrReport>,
}

impl Report {
    pub fn ops(&self) -> usize {
        self.addrs.iter().map(|a| a.ops).sum()
    }

    pub fn not_linearizable(&self) -> impl Iterator<Item = &AddrReport> {
        self.addrs
            .iter()
            .filter(|a| matches!(a.verdict, Verdict::NotLinearizable { .. }))
    }

    pub fn undecided(&self) -> impl Iterator<Item = &AddrReport> {
        self.addrs
            .iter()
            .filter(|a| matches!(a.verdict, Verdict::Undecided { .. }))
    }
}

/// The checker's findings for one address: what its history held and the verdict.
#[derive(Debug, Serialize)]
pub struct AddrReport {
    pub addr: u64,
    /// Operations on this address, whatever their status.
    pub ops: usize,
    pub ok: usize,
    pub unknown: usize,
    pub failed: usize,
    pub steps: u64,
    pub elapsed_us: u64,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl fmt::Display for AddrReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match &self.verdict {
            Verdict::Linearizable => "linearizable".to_owned(),
            Verdict::NotLinearizable { .. } => "NOT LINEARIZABLE".to_owned(),
            Verdict::Undecided { reason } => format!("undecided ({reason})"),
        };
        write!(
            f,
            "addr {:#x}: {} ops ({} ok, {} unknown, {} failed): {verdict}, {} steps, {:.1} ms",
            self.addr,
            self.ops,
            self.ok,
            self.unknown,
            self.failed,
            self.steps,
            self.elapsed_us as f64 / 1000.0
        )
    }
}

/// Whether one address's history is linearizable.
#[derive(Debug, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Linearizable,
    NotLinearizable {
        witness: Box<Witness>,
    },
    /// The search hit a limit of [`CheckOptions`] before deciding.
    Undecided {
        reason: String,
    },
}

/// Why an address is not linearizable, from the furthest the search got: the longest
/// linearizable prefix found (most ok operations), and the operation that then completed
/// without any order of the pending operations letting it take effect.
#[derive(Debug, Serialize)]
pub struct Witness {
    /// Ok operations in that prefix.
    pub linearized_ok: usize,
    /// The register's value after it.
    pub value: u64,
    /// Its last operations, in linearization order.
    pub prefix_tail: Vec<Op>,
    /// The operation whose completion came before it could take effect.
    pub stuck: Op,
    /// The other operations invoked but not linearized when `stuck` completed: the
    /// candidates for going next.
    pub pending: Vec<Op>,
}

impl fmt::Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  longest linearizable prefix: {} ok ops, leaving the register at {}; it ends with",
            self.linearized_ok, self.value
        )?;
        if self.prefix_tail.is_empty() {
            writeln!(f, "    (nothing: the register still holds its initial 0)")?;
        }
        for op in &self.prefix_tail {
            writeln!(f, "    {op}")?;
        }
        writeln!(
            f,
            "  then this op completed and could not have taken effect:"
        )?;
        writeln!(f, "    {}", self.stuck)?;
        if !self.pending.is_empty() {
            writeln!(f, "  with these pending (invoked, not linearized):")?;
            for op in &self.pending {
                writeln!(f, "    {op}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read => write!(f, "read"),
            Self::Write { value } => write!(f, "write({value})"),
            Self::Cas { expected, new } => write!(f, "cas({expected}, {new})"),
            Self::Faa { delta } => write!(f, "faa({delta})"),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.client)?;
        if let Some(seq) = self.seq {
            write!(f, "#{seq}")?;
        }
        write!(f, " {}", self.call)?;
        if let Some(result) = self.result {
            write!(f, " -> {result}")?;
        }
        let status = match self.status {
            Status::Ok => "ok",
            Status::Fail => "fail",
            Status::Unknown => "unknown",
        };
        match self.complete_ns {
            Some(complete_ns) if self.status != Status::Unknown => {
                write!(f, ", {status}, {}..{complete_ns} ns", self.invoke_ns)
            }
            _ => write!(f, ", {status}, {}.. ns", self.invoke_ns),
        }
    }
}

/// Checks each address's history on its own.
pub fn check(ops: &[Op], options: &CheckOptions) -> Report {
    let mut by_addr: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_addr.entry(op.addr).or_default().push(op);
    }
    Report {
        addrs: by_addr
            .into_iter()
            .map(|(addr, ops)| check_addr(addr, &ops, options))
            .collect(),
    }
}

fn check_addr(addr: u64, ops: &[&Op], options: &CheckOptions) -> AddrReport {
    let start = Instant::now();
    let count = |s: Status| ops.iter().filter(|op| op.status == s).count();
    let chains = UnknownChains::new(ops);
    let searched = searched_ops(ops, &chains);
    let (verdict, steps) = search(&searched, &chains, options);
    AddrReport {
        addr,
        ops: ops.len(),
        ok: count(Status::Ok),
        unknown: count(Status::Unknown),
        failed: count(Status::Fail),
        steps,
        elapsed_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        verdict,
    }
}

/// What can carry a value the register took on to a different value without an ok
/// operation seeing it: operations whose outcome is unknown.
struct UnknownChains {
    /// Values an unknown cas could replace.
    cas_expected: HashSet<u64>,
    /// An unknown faa could add to any value.
    faa: bool,
}

impl UnknownChains {
    fn new(ops: &[&Op]) -> Self {
        let unknown = || ops.iter().filter(|op| op.status == Status::Unknown);
        Self {
            cas_expected: unknown()
                .filter_map(|op| match op.call {
                    Call::Cas { expected, new } if expected != new => Some(expected),
                    _ => None,
                })
                .collect(),
            faa: unknown().any(|op| matches!(op.call, Call::Faa { delta } if delta != 0)),
        }
    }

    /// Whether `v`, once an unknown operation has put it in the register, can reach an
    /// ok operation only as `v` itself: unless an unknown cas expects `v` or an unknown
    /// faa exists, the next operation after it that reports or changes the register is an
    /// ok one reporting `v`, or a write (ok or unknown) that overwrites `v` unseen. Once
    /// every ok operation reporting `v` is linearized, such an unknown operation taking
    /// effect is then the same as its never taking effect.
    fn ends_at(&self, v: u64) -> bool {
        !self.faa && !self.cas_expected.contains(&v)
    }
}

/// The value an unknown write or cas may leave in the register; `None` for operations
/// whose effect depends on the value they find (faa) or that change nothing (read).
fn target(call: Call) -> Option<u64> {
    match call {
        Call::Write { value } => Some(value),
        Call::Cas { expected, new } if expected != new => Some(new),
        _ => None,
    }
}

/// The operations the search needs: the ok ones, and the unknown ones whose taking effect
/// could change some ok operation's result. Every unknown operation left in multiplies
/// the configurations the search may visit (each one in or out of every prefix), and
/// unknown operations are what a crash or a timeout leaves by the dozen.
fn searched_ops<'a>(ops: &[&'a Op], chains: &UnknownChains) -> Vec<&'a Op> {
    // Values some ok operation saw in the register.
    let observed: HashSet<u64> = ops
        .iter()
        .filter(|op| op.status == Status::Ok)
        .filter_map(|op| op.result)
        .collect();
    ops.iter()
        .copied()
        .filter(|op| match op.status {
            Status::Ok => true,
            Status::Fail => false,
            Status::Unknown => match target(op.call) {
                Some(v) => observed.contains(&v) || !chains.ends_at(v),
                // A read, a faa of 0 or a cas to the value it expects changes nothing
                // whether it happened or not.
                None => match op.call {
                    Call::Faa { delta } => delta != 0,
                    _ => false,
                },
            },
        })
        .collect()
}

const NONE: usize = usize::MAX;
/// The sentinel nodes heading the two event lists of [`search`].
const OK_HEAD: usize = 0;
const UNKNOWN_HEAD: usize = 1;

/// One event of the doubly linked event lists.
#[derive(Clone, Copy)]
struct Node {
    /// Index of the operation in the searched slice.
    op: usize,
    is_call: bool,
    /// A call's return event, `NONE` for an unknown operation (and for return events).
    ret: usize,
    prev: usize,
    next: usize,
}

fn unlink(nodes: &mut [Node], i: usize) {
    let Node { prev, next, .. } = nodes[i];
    nodes[prev].next = next;
    if next != NONE {
        nodes[next].prev = prev;
    }
}

/// Undoes `unlink(i)`; correct because lifts are undone in the reverse order they were
/// done, so `i`'s neighbours are again the ones it had.
fn relink(nodes: &mut [Node], i: usize) {
    let Node { prev, next, .. } = nodes[i];
    nodes[prev].next = i;
    if next != NONE {
        nodes[next].prev = i;
    }
}

fn lift(nodes: &mut [Node], call: usize) {
    unlink(nodes, call);
    if nodes[call].ret != NONE {
        unlink(nodes, nodes[call].ret);
    }
}

fn unlift(nodes: &mut [Node], call: usize) {
    if nodes[call].ret != NONE {
        relink(nodes, nodes[call].ret);
    }
    relink(nodes, call);
}

/// The register's sequential specification: the value after `op` takes effect on `value`,
/// or `None` if `op` could not have returned what it did.
fn apply(op: &Op, value: u64) -> Option<u64> {
    // A recorded result must be the value found; unknown operations (no result) act on
    // whatever they found.
    if op.result.is_some_and(|r| r != value) {
        return None;
    }
    Some(match op.call {
        Call::Read => value,
        Call::Write { value: v } => v,
        Call::Cas { expected, new } => {
            if value == expected {
                new
            } else {
                value
            }
        }
        Call::Faa { delta } => value.wrapping_add(delta),
    })
}

/// SplitMix64's finalizer: spreads the bits of `x` over the whole word.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The configurations already searched from: (ok operations linearized, unknown
/// operations linearized, register value, whether the last one linearized was unknown).
/// Sets live in arenas, so a visit allocates nothing of its own; entries with the same
/// hash (of the ok set and the value) are chained newest first.
///
/// A configuration is as good as a visited one with the same ok set and value, fewer
/// unknown operations linearized and no more constraint on what comes next: an unknown
/// operation need never take effect, so whatever completes the first also completes the
/// second, which has been (or is being) searched. Without this, every subset of the
/// pending unknown operations that a later write overwrites unseen is its own
/// configuration, and rejecting a history takes exponentially long.
struct Visited {
    ok_words: usize,
    unknown_words: usize,
    newest: HashMap<u64, usize>,
    older: Vec<usize>,
    values: Vec<u64>,
    after_unknown: Vec<bool>,
    ok_sets: Vec<u64>,
    unknown_sets: Vec<u64>,
}

impl Visited {
    fn new(ok_words: usize, unknown_words: usize) -> Self {
        Self {
            ok_words,
            unknown_words,
            newest: HashMap::new(),
            older: Vec::new(),
            values: Vec::new(),
            after_unknown: Vec::new(),
            ok_sets: Vec::new(),
            unknown_sets: Vec::new(),
        }
    }

    /// Records the configuration; false if it is no better than one already there.
    fn insert(
        &mut self,
        hash: u64,
        ok_set: &[u64],
        unknown_set: &[u64],
        value: u64,
        after_unknown: bool,
    ) -> bool {
        let (w, u) = (self.ok_words, self.unknown_words);
        let newest = self.newest.get(&hash).copied().unwrap_or(NONE);
        let mut e = newest;
        while e != NONE {
            if self.values[e] == value
                && (after_unknown || !self.after_unknown[e])
                && self.ok_sets[e * w..(e + 1) * w] == *ok_set
                && self.unknown_sets[e * u..(e + 1) * u]
                    .iter()
                    .zip(unknown_set)
                    .all(|(seen, now)| seen & !now == 0)
            {
                return false;
            }
            e = self.older[e];
        }
        let id = self.values.len();
        self.older.push(newest);
        self.values.push(value);
        self.after_unknown.push(after_unknown);
        self.ok_sets.extend_from_slice(ok_set);
        self.unknown_sets.extend_from_slice(unknown_set);
        self.newest.insert(hash, id);
        true
    }

    fn bytes(&self) -> usize {
        // Sets, value and flag, the chain link, and a hash map slot (key, value, control
        // byte and spare capacity, about 2x).
        self.values.len() * ((self.ok_words + self.unknown_words) * 8 + 8 + 1 + 8 + 2 * 17)
    }
}

fn flip(set: &mut [u64], i: usize) {
    set[i / 64] ^= 1 << (i % 64);
}

fn contains(set: &[u64], i: usize) -> bool {
    set[i / 64] & (1 << (i % 64)) != 0
}

/// The Wing–Gong–Lowe search over one address's operations; returns the verdict and the
/// steps taken.
///
/// Unknown operations would make the search exponential in how many are pending (each
/// one in or out of every prefix, for the rest of the history), so the search only
/// builds linearizations of a canonical form, which exists whenever any linearization
/// does (each rule only removes unknown operations from a linearization, or swaps two
/// identical ones, and keeps it valid):
/// - an unknown operation is immediately followed by an operation that observes the
///   register (read, cas, faa; ok, or unknown and then followed likewise), never by a
///   write (ok or unknown) or the end: that would erase its effect unseen, so it can be
///   dropped;
/// - of identical unknown operations (same call), the earlier invoked take effect first:
///   swapping two identical operations changes nothing, and an operation invoked earlier
///   may take effect wherever a later one may;
/// - an unknown operation changes the register's value (one that does not is a no-op);
/// - an unknown write (or cas) of a value only ok operations can see (see
///   [`UnknownChains::ends_at`]) does not take effect once all of those are linearized.
fn search(ops: &[&Op], chains: &UnknownChains, options: &CheckOptions) -> (Verdict, u64) {
    // Ok operations first: an index below `total_ok` is an ok operation.
    let ops: Vec<&Op> = ops
        .iter()
        .filter(|op| op.status == Status::Ok)
        .chain(ops.iter().filter(|op| op.status != Status::Ok))
        .copied()
        .collect();
    let total_ok = ops.iter().filter(|op| op.status == Status::Ok).count();
    if total_ok == 0 {
        return (Verdict::Linearizable, 0);
    }

    // Events: (time, calls before returns at the same time, op).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke_ns, false, i));
        if i < total_ok
            && let Some(complete_ns) = op.complete_ns
        {
            events.push((complete_ns, true, i));
        }
    }
    events.sort_unstable();
    // Two lists: the ok operations' calls and returns (from node OK_HEAD), the unknown
    // operations' calls (from UNKNOWN_HEAD), so that passes over the ok operations do not
    // wade through unknown ones that stay pending for the rest of the history. Event k is
    // node k + 2: comparing nodes compares events.
    let head = Node {
        op: NONE,
        is_call: false,
        ret: NONE,
        prev: NONE,
        next: NONE,
    };
    let mut nodes = vec![head; events.len() + 2];
    let mut tails = [OK_HEAD, UNKNOWN_HEAD];
    let mut call_node = vec![NONE; ops.len()];
    for (k, &(_, is_return, op)) in events.iter().enumerate() {
        let i = k + 2;
        let list = usize::from(op >= total_ok);
        let tail = tails[list];
        nodes[tail].next = i;
        nodes[i] = Node {
            op,
            is_call: !is_return,
            ret: NONE,
            prev: tail,
            next: NONE,
        };
        tails[list] = i;
        if is_return {
            nodes[call_node[op]].ret = i;
        } else {
            call_node[op] = i;
        }
    }

    // Identical unknown operations take effect in invocation order: `twin_before[i]`
    // must be linearized before unknown operation `i` may be.
    let mut twin_before = vec![NONE; ops.len()];
    let mut last_twin: HashMap<Call, usize> = HashMap::new();
    for &(_, is_return, op) in &events {
        if !is_return && op >= total_ok {
            twin_before[op] = last_twin.insert(ops[op].call, op).unwrap_or(NONE);
        }
    }

    // An unknown write (or cas) of a value that ends there is useless once every ok
    // operation reporting that value is linearized; `unseen[slot]` counts those still to
    // be linearized, for each such value.
    let mut slots: HashMap<u64, usize> = HashMap::new();
    let mut unseen: Vec<usize> = Vec::new();
    let mut matters_while = vec![NONE; ops.len()];
    for (i, op) in ops.iter().enumerate().skip(total_ok) {
        if let Some(v) = target(op.call)
            && chains.ends_at(v)
        {
            matters_while[i] = *slots.entry(v).or_insert_with(|| {
                unseen.push(0);
                unseen.len() - 1
            });
        }
    }
    let mut sees = vec![NONE; total_ok];
    for (i, op) in ops.iter().enumerate().take(total_ok) {
        if let Some(&slot) = op.result.and_then(|r| slots.get(&r)) {
            sees[i] = slot;
            unseen[slot] += 1;
        }
    }

    // Zobrist hashing: the ok set's hash is the xor of its members' keys, kept up to date
    // as operations are lifted and unlifted instead of rehashing the whole set.
    let keys: Vec<u64> = (0..total_ok as u64).map(mix64).collect();
    let mut ok_set = vec![0u64; total_ok.div_ceil(64)];
    let mut unknown_set = vec![0u64; (ops.len() - total_ok).div_ceil(64)];
    let mut ok_hash = 0u64;
    let mut visited = Visited::new(ok_set.len(), unknown_set.len());
    // Puts `op` in or out of the linearized sets (the same either way: a flip).
    let mut toggle = |op: usize, ok_set: &mut [u64], unknown_set: &mut [u64]| {
        if op < total_ok {
            flip(ok_set, op);
            ok_hash ^= keys[op];
        } else {
            flip(unknown_set, op - total_ok);
        }
        ok_hash
    };

    let mut value = 0u64;
    let mut remaining_ok = total_ok;
    // (lifted call node, register value before it)
    let mut stack: Vec<(usize, u64)> = Vec::new();
    let mut best: Option<Witness> = None;
    let mut steps = 0u64;
    // Each configuration tries the pending ok operations first, then the unknown ones
    // invoked before `frontier` (the first return left, which the ok pass ends at), so
    // that configurations with fewer unknown operations tend to be visited first and
    // subsume the others (see `Visited`).
    let mut unknown_pass = false;
    let mut entry = nodes[OK_HEAD].next;
    let mut frontier = NONE;
    loop {
        if remaining_ok == 0 {
            return (Verdict::Linearizable, steps);
        }
        if steps >= options.max_steps {
            let reason = format!("search stopped after {steps} steps");
            return (Verdict::Undecided { reason }, steps);
        }
        if visited.bytes() > options.max_cache_bytes {
            let reason = format!(
                "search stopped after {steps} steps: visited configurations exceed {} MiB",
                options.max_cache_bytes >> 20
            );
            return (Verdict::Undecided { reason }, steps);
        }
        steps += 1;

        let candidate = if unknown_pass {
            entry != NONE && entry < frontier
        } else {
            entry != NONE && nodes[entry].is_call
        };
        if candidate {
            let op = nodes[entry].op;
            let is_ok = op < total_ok;
            let after_unknown = stack.last().is_some_and(|&(c, _)| nodes[c].op >= total_ok);
            let is_write = matches!(ops[op].call, Call::Write { .. });
            let allowed = !(after_unknown && is_write)
                && (is_ok
                    || ((twin_before[op] == NONE
                        || contains(&unknown_set, twin_before[op] - total_ok))
                        && (matters_while[op] == NONE || unseen[matters_while[op]] > 0)));
            if allowed
                && let Some(next_value) = apply(ops[op], value)
                && (is_ok || next_value != value)
            {
                let hash = toggle(op, &mut ok_set, &mut unknown_set);
                if visited.insert(
                    hash ^ mix64(next_value),
                    &ok_set,
                    &unknown_set,
                    next_value,
                    !is_ok,
                ) {
                    stack.push((entry, value));
                    value = next_value;
                    lift(&mut nodes, entry);
                    if is_ok {
                        remaining_ok -= 1;
                        if sees[op] != NONE {
                            unseen[sees[op]] -= 1;
                        }
                    }
                    entry = nodes[OK_HEAD].next;
                    unknown_pass = false;
                    continue;
                }
                toggle(op, &mut ok_set, &mut unknown_set);
            }
            entry = nodes[entry].next;
            continue;
        }
        if !unknown_pass {
            // `entry` is the first return left. (The ok list cannot end first while an ok
            // operation is left: its return is still in the list.)
            frontier = entry;
            unknown_pass = true;
            entry = nodes[UNKNOWN_HEAD].next;
            continue;
        }

        // The first return left is of an operation no order of the operations chosen so
        // far lets take effect in time.
        if frontier != NONE {
            let linearized_ok = total_ok - remaining_ok;
            if best
                .as_ref()
                .is_none_or(|b| linearized_ok > b.linearized_ok)
            {
                best = Some(witness(
                    &ops,
                    &nodes,
                    &stack,
                    frontier,
                    linearized_ok,
                    value,
                ));
            }
        }
        let Some((call, previous)) = stack.pop() else {
            return match best {
                Some(witness) => (
                    Verdict::NotLinearizable {
                        witness: Box::new(witness),
                    },
                    steps,
                ),
                None => (
                    Verdict::Undecided {
                        reason: "internal error: the search failed without reaching a return"
                            .into(),
                    },
                    steps,
                ),
            };
        };
        let op = nodes[call].op;
        value = previous;
        toggle(op, &mut ok_set, &mut unknown_set);
        unlift(&mut nodes, call);
        // Resume after it, in the pass it was chosen in.
        entry = nodes[call].next;
        if op < total_ok {
            remaining_ok += 1;
            if sees[op] != NONE {
                unseen[sees[op]] += 1;
            }
            unknown_pass = false;
        } else {
            // The ok list is back as it was when `call` was chosen.
            frontier = first_return(&nodes);
            unknown_pass = true;
        }
    }
}

fn first_return(nodes: &[Node]) -> usize {
    let mut e = nodes[OK_HEAD].next;
    while e != NONE && nodes[e].is_call {
        e = nodes[e].next;
    }
    e
}

fn witness(
    ops: &[&Op],
    nodes: &[Node],
    stack: &[(usize, u64)],
    stuck_return: usize,
    linearized_ok: usize,
    value: u64,
) -> Witness {
    let stuck = nodes[stuck_return].op;
    let prefix_tail = stack[stack.len().saturating_sub(WITNESS_PREFIX_OPS)..]
        .iter()
        .map(|&(call, _)| ops[nodes[call].op].clone())
        .collect();
    // The calls left before the first return left: ok ones, then unknown ones.
    let mut pending = Vec::new();
    for head in [OK_HEAD, UNKNOWN_HEAD] {
        let mut e = nodes[head].next;
        while e != NONE && e < stuck_return && pending.len() < WITNESS_PENDING_OPS {
            if nodes[e].op != stuck {
                pending.push(ops[nodes[e].op].clone());
            }
            e = nodes[e].next;
        }
    }
    Witness {
        linearized_ok,
        value,
        prefix_tail,
        stuck: ops[stuck].clone(),
        pending,
    }
}

/// `pmgas-bench check-history`: one line per address and a total (JSON lines with
/// `json`); an error naming every address that is not linearizable (with a witness for
/// the first few) or undecided.
pub fn run(path: &Path, json: bool, max_steps: u64) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ops = parse_history(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let start = Instant::now();
    let options = CheckOptions {
        max_steps,
        ..CheckOptions::default()
    };
    let report = check(&ops, &options);
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    let bad: Vec<&AddrReport> = report.not_linearizable().collect();
    let undecided: Vec<&AddrReport> = report.undecided().collect();
    let linearizable = report.addrs.len() - bad.len() - undecided.len();
    if json {
        for addr in &report.addrs {
            println!(
                "{}",
                serde_json::to_string(addr).map_err(|e| e.to_string())?
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "total": {
                    "ops": report.ops(),
                    "addrs": report.addrs.len(),
                    "linearizable": linearizable,
                    "not_linearizable": bad.len(),
                    "undecided": undecided.len(),
                    "elapsed_ms": elapsed_ms,
                }
            })
        );
    } else {
        for addr in &report.addrs {
            println!("{addr}");
        }
        println!(
            "total: {} ops over {} addresses: {linearizable} linearizable, {} not linearizable, {} undecided ({elapsed_ms:.1} ms)",
            report.ops(),
            report.addrs.len(),
            bad.len(),
            undecided.len()
        );
    }
    if bad.is_empty() && undecided.is_empty() {
        return Ok(());
    }
    // Witnesses for the first few bad addresses keep the message readable when a broken
    // protocol breaks every address.
    const WITNESSED_ADDRS: usize = 3;
    let mut message = format!(
        "{}: {} of {} addresses not linearizable, {} undecided",
        path.display(),
        bad.len(),
        report.addrs.len(),
        undecided.len()
    );
    for (k, addr) in bad.iter().enumerate() {
        message.push_str(&format!("\naddr {:#x} is not linearizable", addr.addr));
        if let (true, Verdict::NotLinearizable { witness }) = (k < WITNESSED_ADDRS, &addr.verdict) {
            message.push_str(&format!(":\n{witness}"));
        }
    }
    for addr in &undecided {
        if let Verdict::Undecided { reason } = &addr.verdict {
            message.push_str(&format!(
                "\naddr {:#x} is undecided: {reason} (--max-steps)",
                addr.addr
            ));
        }
    }
    Err(message.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        client: &str,
        op: &str,
        arg: &[u64],
        result: Option<u64>,
        status: &str,
        invoke_ns: u64,
        complete_ns: u64,
    ) -> String {
        serde_json::json!({
            "client": client, "op": op, "addr": 0, "arg": arg, "result": result,
            "status": status, "invoke_ns": invoke_ns, "complete_ns": complete_ns,
        })
        .to_string()
    }

    fn ok(client: &str, op: &str, arg: &[u64], result: Option<u64>, i: u64, c: u64) -> String {
        record(client, op, arg, result, "ok", i, c)
    }

    fn unknown(client: &str, op: &str, arg: &[u64], invoke_ns: u64) -> String {
        record(client, op, arg, None, "unknown", invoke_ns, invoke_ns)
    }

    fn failed(client: &str, op: &str, arg: &[u64], invoke_ns: u64, complete_ns: u64) -> String {
        record(client, op, arg, None, "fail", invoke_ns, complete_ns)
    }

    fn with_seq(line: String, seq: u64) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["seq"] = seq.into();
        v.to_string()
    }

    fn report(lines: &[String]) -> Report {
        let ops = parse_history(&lines.join("\n")).unwrap();
        check(&ops, &CheckOptions::default())
    }

    fn assert_linearizable(lines: &[String]) {
        let r = report(lines);
        for a in &r.addrs {
            assert!(
                matches!(a.verdict, Verdict::Linearizable),
                "{a}: {:?}",
                a.verdict
            );
        }
    }

    /// The witness of the single address, which must be rejected.
    fn assert_rejected(lines: &[String]) -> Box<Witness> {
        let mut r = report(lines);
        assert_eq!(r.addrs.len(), 1);
        match r.addrs.remove(0).verdict {
            Verdict::NotLinearizable { witness } => witness,
            v => panic!("accepted: {v:?}"),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        assert_linearizable(&[
            ok("p1", "read", &[], Some(0), 0, 10),
            ok("p1", "write", &[5], None, 20, 30),
            ok("p1", "read", &[], Some(5), 40, 50),
            ok("p1", "cas", &[5, 7], Some(5), 60, 70),
            ok("p1", "faa", &[3], Some(7), 80, 90),
            ok("p1", "read", &[], Some(10), 100, 110),
        ]);
    }

    #[test]
    fn concurrent_writes_and_reads_are_linearizable_in_some_order() {
        // write(2) must go before write(1): the read at 20..30 sees 2, the one at 95..110
        // sees 1; the read at 0..5 sees the initial 0 before either.
        assert_linearizable(&[
            ok("p1", "write", &[1], None, 0, 100),
            ok("p2", "write", &[2], None, 10, 90),
            ok("p3", "read", &[], Some(0), 0, 5),
            ok("p3", "read", &[], Some(2), 20, 30),
            ok("p4", "read", &[], Some(1), 25, 40),
            ok("p3", "read", &[], Some(1), 95, 110),
        ]);
    }

    #[test]
    fn touching_intervals_count_as_concurrent() {
        // The read is invoked at the very nanosecond the write completes.
        assert_linearizable(&[
            ok("p1", "write", &[1], None, 0, 10),
            ok("p2", "read", &[], Some(0), 10, 20),
        ]);
    }

    #[test]
    fn cas_success_and_failure() {
        assert_linearizable(&[
            ok("p1", "cas", &[0, 5], Some(0), 0, 10),
            ok("p1", "cas", &[0, 7], Some(5), 20, 30),
            ok("p1", "read", &[], Some(5), 40, 50),
            // Two overlapping cas(5, 6): one found 5 and won, the other found 6.
            ok("p1", "cas", &[5, 6], Some(6), 60, 80),
            ok("p2", "cas", &[5, 6], Some(5), 61, 79),
            ok("p2", "read", &[], Some(6), 90, 100),
        ]);
    }

    #[test]
    fn faa_adds_and_wraps() {
        assert_linearizable(&[
            ok("p1", "faa", &[1], Some(1), 0, 10),
            ok("p2", "faa", &[1], Some(0), 2, 12),
            ok("p1", "read", &[], Some(2), 20, 30),
            ok("p1", "write", &[u64::MAX], None, 40, 50),
            ok("p1", "faa", &[2], Some(u64::MAX), 60, 70),
            ok("p1", "read", &[], Some(1), 80, 90),
        ]);
    }

    #[test]
    fn unknown_ops_may_have_taken_effect_late() {
        // Each unknown op is seen only long after its invocation.
        assert_linearizable(&[
            unknown("p1", "write", &[9], 10),
            ok("p2", "read", &[], Some(0), 20, 30),
            ok("p2", "read", &[], Some(9), 50, 60),
            unknown("p1", "cas", &[9, 4], 70),
            unknown("p3", "faa", &[10], 75),
            ok("p2", "read", &[], Some(9), 80, 90),
            ok("p2", "read", &[], Some(14), 100, 110),
        ]);
    }

    #[test]
    fn unknown_ops_may_never_have_taken_effect() {
        assert_linearizable(&[
            unknown("p1", "write", &[9], 10),
            unknown("p1", "faa", &[1], 15),
            unknown("p1", "cas", &[0, 3], 16),
            ok("p2", "read", &[], Some(0), 50, 60),
            ok("p2", "read", &[], Some(0), 70, 80),
            // An unknown cas whose expected value the register never holds.
            unknown("p3", "cas", &[99, 4], 85),
            ok("p2", "write", &[1], None, 90, 100),
            ok("p2", "read", &[], Some(1), 110, 120),
        ]);
    }

    #[test]
    fn unknown_ops_chain_through_unknown_cas_and_faa() {
        // 6 is reachable only through write(5), then cas(5, 6); 7 only through a further
        // faa(1): the write must not be dropped as unobserved.
        assert_linearizable(&[
            unknown("p1", "write", &[5], 10),
            unknown("p2", "cas", &[5, 6], 20),
            ok("p3", "read", &[], Some(6), 30, 40),
            unknown("p2", "faa", &[1], 50),
            ok("p3", "read", &[], Some(7), 60, 70),
        ]);
        assert_rejected(&[
            unknown("p1", "write", &[5], 10),
            unknown("p2", "cas", &[5, 6], 20),
            ok("p3", "read", &[], Some(6), 30, 40),
            ok("p3", "read", &[], Some(5), 60, 70),
        ]);
    }

    #[test]
    fn identical_unknown_ops_are_interchangeable_only_where_invoked() {
        let faa_at = |invoke_ns| unknown("p1", "faa", &[1], invoke_ns);
        assert_linearizable(&[
            faa_at(0),
            faa_at(50),
            ok("p2", "read", &[], Some(1), 10, 20),
            ok("p2", "read", &[], Some(2), 60, 70),
        ]);
        // Either one may be the one that took effect.
        assert_linearizable(&[
            faa_at(0),
            faa_at(50),
            ok("p2", "read", &[], Some(1), 60, 70),
        ]);
        // Only one was invoked before the read completed.
        assert_rejected(&[
            faa_at(0),
            faa_at(50),
            ok("p2", "read", &[], Some(2), 10, 20),
        ]);
    }

    #[test]
    fn unknown_writes_may_take_effect_in_either_order_but_once() {
        let writes = [
            unknown("p1", "write", &[5], 0),
            unknown("p2", "write", &[6], 0),
        ];
        let read = |v, at_ns| ok("p3", "read", &[], Some(v), at_ns, at_ns + 10);
        for (first, second) in [(5, 6), (6, 5)] {
            let mut lines = writes.to_vec();
            lines.extend([read(first, 10), read(second, 30)]);
            assert_linearizable(&lines);
        }
        let mut lines = writes.to_vec();
        lines.extend([read(5, 10), read(6, 30), read(5, 50)]);
        assert_rejected(&lines);
    }

    #[test]
    fn an_unknown_write_takes_effect_at_most_once() {
        // Its 5 is seen, overwritten, and seen again: it cannot explain both reads.
        let mut lines = vec![
            unknown("p1", "write", &[5], 0),
            ok("p2", "read", &[], Some(5), 10, 20),
            ok("p2", "write", &[1], None, 30, 40),
            ok("p2", "read", &[], Some(5), 50, 60),
        ];
        assert_rejected(&lines);
        // Without the first read, it took effect after the write.
        lines.remove(1);
        assert_linearizable(&lines);
    }

    #[test]
    fn an_unknown_cas_needs_its_expected_value() {
        let mut lines = vec![
            unknown("p1", "cas", &[3, 4], 0),
            ok("p2", "write", &[3], None, 10, 20),
            ok("p2", "read", &[], Some(4), 30, 40),
        ];
        assert_linearizable(&lines);
        lines.remove(1);
        assert_rejected(&lines);
    }

    #[test]
    fn run_prints_and_fails_naming_the_address_and_witness() {
        let path =
            std::env::temp_dir().join(format!("pmgas-lincheck-{}.jsonl", std::process::id()));
        let mut other: serde_json::Value =
            serde_json::from_str(&ok("p1", "read", &[], Some(0), 20, 30)).unwrap();
        other["addr"] = 0x1_0000_0040_u64.into();
        let good = [ok("p1", "write", &[1], None, 0, 10), other.to_string()];
        std::fs::write(&path, good.join("\n")).unwrap();
        assert_eq!(run(&path, false, DEFAULT_MAX_STEPS), Ok(()));
        assert_eq!(run(&path, true, DEFAULT_MAX_STEPS), Ok(()));

        let bad = [
            good[0].clone(),
            ok("p2", "read", &[], Some(0), 20, 30),
            good[1].clone(),
        ];
        std::fs::write(&path, bad.join("\n")).unwrap();
        let message = run(&path, false, DEFAULT_MAX_STEPS).unwrap_err();
        assert!(
            message.contains("1 of 2 addresses not linearizable, 0 undecided"),
            "{message}"
        );
        assert!(
            message.contains("addr 0x0 is not linearizable"),
            "{message}"
        );
        assert!(
            message.contains("line 2: p2 read -> 0, ok, 20..30 ns"),
            "{message}"
        );
        assert!(
            message.contains("line 1: p1 write(1), ok, 0..10 ns"),
            "{message}"
        );
        assert!(!message.contains("0x100000040 is"), "{message}");

        let message = run(&path, false, 1).unwrap_err();
        assert!(message.contains("addr 0x0 is undecided"), "{message}");

        std::fs::write(&path, format!("{}\n{{", good[0])).unwrap();
        let message = run(&path, false, DEFAULT_MAX_STEPS).unwrap_err();
        assert!(message.contains("line 2: "), "{message}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn streamed_records_are_replaced_by_their_completion() {
        let lines = [
            with_seq(unknown("p1", "write", &[5], 0), 1),
            with_seq(unknown("p2", "read", &[], 2), 1),
            with_seq(ok("p1", "write", &[5], None, 0, 10), 1),
            with_seq(ok("p2", "read", &[], Some(5), 2, 20), 1),
            with_seq(unknown("p1", "write", &[6], 30), 2),
            with_seq(failed("p1", "write", &[6], 30, 40), 2),
            ok("p2", "read", &[], Some(5), 50, 60),
        ];
        let ops = parse_history(&lines.join("\n")).unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[0].status, Status::Ok);
        assert_eq!((ops[0].line, ops[1].line, ops[1].result), (3, 4, Some(5)));
        assert_eq!(ops[2].status, Status::Fail);
        assert_linearizable(&lines);

        // Had the failed write stayed unknown it could explain a read of 6; failed, it
        // cannot.
        let mut read_six = lines.to_vec();
        read_six[6] = ok("p2", "read", &[], Some(6), 50, 60);
        assert_rejected(&read_six);
        read_six.remove(5);
        assert_linearizable(&read_six);
    }

    #[test]
    fn stale_read_after_completed_write_is_rejected() {
        let w = assert_rejected(&[
            ok("p1", "write", &[1], None, 0, 10),
            ok("p2", "read", &[], Some(0), 20, 30),
        ]);
        assert_eq!(w.stuck.result, Some(0));
        assert_eq!((w.linearized_ok, w.value), (1, 1));
        assert_eq!(w.prefix_tail.len(), 1);
    }

    #[test]
    fn non_monotonic_reads_under_an_overlapping_write_are_rejected() {
        let w = assert_rejected(&[
            ok("p1", "write", &[1], None, 0, 100),
            ok("p2", "read", &[], Some(1), 10, 20),
            ok("p2", "read", &[], Some(0), 30, 40),
        ]);
        assert_eq!((w.stuck.line, w.value, w.linearized_ok), (3, 1, 2));
        let text = w.to_string();
        assert!(
            text.contains("line 3: p2 read -> 0, ok, 30..40 ns"),
            "{text}"
        );
    }

    #[test]
    fn successful_cas_then_old_value_is_rejected() {
        assert_rejected(&[
            ok("p1", "cas", &[0, 5], Some(0), 0, 10),
            ok("p2", "read", &[], Some(0), 20, 30),
        ]);
    }

    #[test]
    fn two_faa_with_the_same_old_value_are_rejected() {
        assert_rejected(&[
            ok("p1", "faa", &[1], Some(0), 0, 10),
            ok("p2", "faa", &[1], Some(0), 5, 15),
        ]);
    }

    #[test]
    fn read_of_a_value_never_written_is_rejected() {
        let w = assert_rejected(&[
            ok("p1", "write", &[1], None, 0, 10),
            ok("p2", "read", &[], Some(2), 5, 30),
        ]);
        assert_eq!(w.stuck.result, Some(2));
    }

    #[test]
    fn failed_write_read_later_is_rejected() {
        assert_rejected(&[
            failed("p1", "write", &[3], 0, 10),
            ok("p2", "read", &[], Some(3), 20, 30),
        ]);
    }

    #[test]
    fn unknown_op_invoked_after_the_read_completed_cannot_explain_it() {
        assert_rejected(&[
            ok("p2", "read", &[], Some(7), 10, 50),
            unknown("p1", "write", &[7], 100),
        ]);
        // Invoked while the read was in flight, it can.
        assert_linearizable(&[
            ok("p2", "read", &[], Some(7), 10, 50),
            unknown("p1", "write", &[7], 40),
        ]);
    }

    #[test]
    fn undecided_when_the_step_limit_is_hit() {
        let lines = [
            ok("p1", "write", &[1], None, 0, 10),
            ok("p2", "read", &[], Some(1), 20, 30),
        ];
        let ops = parse_history(&lines.join("\n")).unwrap();
        let options = CheckOptions {
            max_steps: 1,
            ..CheckOptions::default()
        };
        let r = check(&ops, &options);
        assert!(
            matches!(r.addrs[0].verdict, Verdict::Undecided { .. }),
            "{:?}",
            r.addrs[0].verdict
        );
        assert_eq!(r.undecided().count(), 1);
        assert_eq!(r.not_linearizable().count(), 0);
    }

    #[test]
    fn addresses_are_checked_and_counted_separately() {
        let mut other =
            serde_json::from_str::<serde_json::Value>(&ok("p1", "read", &[], Some(0), 20, 30))
                .unwrap();
        other["addr"] = 8.into();
        let lines = [
            ok("p1", "write", &[1], None, 0, 10),
            other.to_string(),
            unknown("p3", "read", &[], 5),
            failed("p3", "write", &[2], 1, 2),
        ];
        let r = report(&lines);
        assert_eq!(r.addrs.len(), 2);
        assert_eq!((r.addrs[0].addr, r.addrs[0].ops, r.addrs[0].ok), (0, 3, 1));
        assert_eq!((r.addrs[0].unknown, r.addrs[0].failed), (1, 1));
        assert_eq!((r.addrs[1].addr, r.addrs[1].ops), (8, 1));
        assert!(
            r.addrs
                .iter()
                .all(|a| matches!(a.verdict, Verdict::Linearizable))
        );
        let json = serde_json::to_value(&r.addrs[0]).unwrap();
        assert_eq!(json["verdict"], "linearizable");
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let good = ok("p1", "read", &[], Some(0), 0, 10);
        let cases = [
            "{not json".to_owned(),
            r#"{"client":"p1","op":"read","addr":0,"arg":[],"result":0,"status":"ok"}"#.into(),
            ok("p1", "swap", &[1], None, 0, 10),
            ok("p1", "cas", &[1], Some(0), 0, 10),
            ok("p1", "read", &[], None, 0, 10),
            ok("p1", "write", &[1], Some(1), 0, 10),
            ok("p1", "read", &[], Some(0), 10, 5),
            record("p1", "read", &[], Some(0), "maybe", 0, 10),
            r#"{"client":"p1","op":"read","addr":-1,"arg":[],"result":0,"status":"ok","invoke_ns":0,"complete_ns":1}"#.into(),
        ];
        for bad in cases {
            let text = format!("{good}\n\n{bad}\n{good}");
            match parse_history(&text) {
                Err(HistoryError::Malformed { line: 3, reason }) => {
                    assert!(!reason.is_empty() && !reason.contains("line"), "{reason}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Unknown and failed records need no result and no meaningful complete_ns.
        let text = [
            r#"{"client":"p1","op":"read","addr":0,"arg":[],"result":null,"status":"unknown","invoke_ns":5}"#,
            r#"{"client":"p1","op":"faa","addr":0,"arg":[1],"status":"fail","invoke_ns":5,"complete_ns":null}"#,
        ]
        .join("\n");
        assert_eq!(parse_history(&text).unwrap().len(), 2);
    }

    #[test]
    fn a_streamed_op_completed_twice_is_an_error() {
        let lines = [
            with_seq(unknown("p1", "write", &[5], 0), 7),
            with_seq(ok("p1", "write", &[5], None, 0, 10), 7),
            with_seq(ok("p1", "write", &[5], None, 0, 12), 7),
        ];
        assert_eq!(
            parse_history(&lines.join("\n")),
            Err(HistoryError::AlreadyCompleted {
                client: "p1".into(),
                seq: 7,
                completed_line: 2,
                line: 3
            })
        );
        // The same seq on another client is another operation.
        let lines = [
            with_seq(ok("p1", "write", &[5], None, 0, 10), 7),
            with_seq(ok("p2", "write", &[5], None, 0, 10), 7),
        ];
        assert_eq!(parse_history(&lines.join("\n")).unwrap().len(), 2);
    }

    #[test]
    fn a_completion_unlike_its_invocation_is_an_error() {
        let invocation = with_seq(unknown("p1", "cas", &[1, 2], 100), 3);
        for (completion, field) in [
            (ok("p1", "faa", &[1], Some(0), 100, 110), "op"),
            (ok("p1", "cas", &[1, 3], Some(0), 100, 110), "arg"),
            (ok("p1", "cas", &[1, 2], Some(0), 101, 110), "invoke_ns"),
        ] {
            let lines = [invocation.clone(), with_seq(completion, 3)];
            match parse_history(&lines.join("\n")) {
                Err(HistoryError::Mismatch {
                    field: f,
                    line: 2,
                    first_line: 1,
                    ..
                }) => {
                    assert_eq!(f, field)
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut moved: serde_json::Value =
            serde_json::from_str(&ok("p1", "cas", &[1, 2], Some(0), 100, 110)).unwrap();
        moved["addr"] = 1.into();
        let lines = [invocation, with_seq(moved.to_string(), 3)];
        assert!(matches!(
            parse_history(&lines.join("\n")),
            Err(HistoryError::Mismatch { field: "addr", .. })
        ));
    }

    /// Linearizability by brute force: every order of every subset of the unknown
    /// operations with all the ok ones, no pruning, no cache.
    fn brute_force(ops: &[&Op], used: &mut Vec<bool>, value: u64) -> bool {
        let done = |used: &[bool]| (0..ops.len()).all(|i| used[i] || ops[i].status != Status::Ok);
        if done(used) {
            return true;
        }
        for i in 0..ops.len() {
            // Every ok operation that completed before this one was invoked goes first.
            let ready = !used[i]
                && (0..ops.len()).all(|j| {
                    used[j]
                        || ops[j].status != Status::Ok
                        || ops[j].complete_ns.is_none_or(|c| c >= ops[i].invoke_ns)
                });
            if let (true, Some(next)) = (ready, apply(ops[i], value)) {
                used[i] = true;
                let found = brute_force(ops, used, next);
                used[i] = false;
                if found {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn small_random_histories_agree_with_brute_force() {
        let mut rng = Rng(7);
        let mut verdicts = [0usize; 2];
        for case in 0..3_000 {
            let n = 1 + rng.below(7) as usize;
            let lines: Vec<String> = (0..n)
                .map(|k| {
                    let client = format!("p{k}");
                    let (op, arg): (&str, Vec<u64>) = match rng.below(4) {
                        0 => ("read", vec![]),
                        1 => ("write", vec![rng.below(3)]),
                        2 => ("cas", vec![rng.below(3), rng.below(3)]),
                        _ => ("faa", vec![rng.below(2)]),
                    };
                    let result = (op != "write").then(|| rng.below(3));
                    let invoke_ns = rng.below(20);
                    let complete_ns = invoke_ns + rng.below(10);
                    match rng.below(10) {
                        0 => failed(&client, op, &arg, invoke_ns, complete_ns),
                        1 | 2 => unknown(&client, op, &arg, invoke_ns),
                        _ => ok(&client, op, &arg, result, invoke_ns, complete_ns),
                    }
                })
                .collect();
            let ops = parse_history(&lines.join("\n")).unwrap();
            let live: Vec<&Op> = ops.iter().filter(|op| op.status != Status::Fail).collect();
            let expected = brute_force(&live, &mut vec![false; live.len()], 0);
            let r = check(&ops, &CheckOptions::default());
            let got = matches!(r.addrs[0].verdict, Verdict::Linearizable);
            assert_eq!(got, expected, "case {case}:\n{}", lines.join("\n"));
            verdicts[usize::from(got)] += 1;
        }
        // Both verdicts are well represented.
        assert!(verdicts.iter().all(|&v| v > 500), "{verdicts:?}");
    }

    /// SplitMix64, for reproducible histories without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(1);
            mix64(self.0) % n
        }
    }

    /// A history linearizable by construction: operations take effect one after another
    /// on a sequential model, each at an instant inside its interval, with `clients`
    /// clients all busy so intervals overlap. Some operations end unknown (half of those
    /// took effect) or failed (none did); half the clients stream (invocation record,
    /// then completion record). Lines are in time order; returns them and the line
    /// indices of ok reads.
    fn random_history(
        seed: u64,
        n_ops: usize,
        addrs: u64,
        clients: usize,
        unknown_percent: u64,
    ) -> (Vec<String>, Vec<usize>) {
        let mut rng = Rng(seed);
        let mut registers = vec![0u64; addrs as usize];
        let mut free_ns = vec![0u64; clients];
        let mut lines: Vec<(u64, String, bool)> = Vec::new();
        let mut now_ns = 0u64;
        for seq in 0..n_ops as u64 {
            let mut at_ns = now_ns + 1 + rng.below(20);
            if free_ns.iter().all(|&f| f > at_ns) {
                at_ns = free_ns.iter().copied().min().unwrap_or(at_ns);
            }
            let idle: Vec<usize> = (0..clients).filter(|&c| free_ns[c] <= at_ns).collect();
            let c = idle[rng.below(idle.len() as u64) as usize];
            now_ns = at_ns;
            let addr = rng.below(addrs);
            let reg = &mut registers[addr as usize];
            let (op, arg, new) = match rng.below(20) {
                0..=7 => ("read", vec![], *reg),
                8..=13 => {
                    let v = rng.below(1000);
                    ("write", vec![v], v)
                }
                14..=16 => {
                    let expected = if rng.below(2) == 0 {
                        *reg
                    } else {
                        rng.below(1000)
                    };
                    let new = rng.below(1000);
                    let after = if *reg == expected { new } else { *reg };
                    ("cas", vec![expected, new], after)
                }
                _ => {
                    let delta = 1 + rng.below(5);
                    ("faa", vec![delta], reg.wrapping_add(delta))
                }
            };
            let invoke_ns = at_ns - rng.below((at_ns - free_ns[c]).min(300) + 1);
            let complete_ns = at_ns + rng.below(300);
            free_ns[c] = complete_ns + 1;
            let status = match rng.below(100) {
                r if r < unknown_percent => "unknown",
                r if r == unknown_percent => "fail",
                _ => "ok",
            };
            let took_effect = status == "ok" || (status == "unknown" && rng.below(2) == 0);
            let result = (status == "ok" && op != "write").then_some(*reg);
            if took_effect {
                *reg = new;
            }
            let client = format!("p{c}");
            let streamed = c < clients / 2;
            let mut v = serde_json::json!({
                "client": client, "op": op, "addr": addr, "arg": arg, "result": result,
                "status": status, "invoke_ns": invoke_ns, "complete_ns": complete_ns,
            });
            if streamed {
                v["seq"] = seq.into();
                let mut invocation = v.clone();
                invocation["status"] = "unknown".into();
                invocation["result"] = serde_json::Value::Null;
                lines.push((invoke_ns, invocation.to_string(), false));
            }
            if !streamed || status != "unknown" {
                lines.push((complete_ns, v.to_string(), status == "ok" && op == "read"));
            }
        }
        lines.sort_by_key(|(t, _, _)| *t);
        let reads = (0..lines.len()).filter(|&i| lines[i].2).collect();
        (lines.into_iter().map(|(_, l, _)| l).collect(), reads)
    }

    /// Checks a `random_history`, then the same with one read corrupted; `steps_per_op`
    /// bounds the search of the first (a regression to exponential search shows there).
    fn check_random(
        n_ops: usize,
        addrs: u64,
        clients: usize,
        unknown_percent: u64,
        steps_per_op: u64,
    ) {
        let (mut lines, reads) = random_history(42, n_ops, addrs, clients, unknown_percent);
        let ops = parse_history(&lines.join("\n")).unwrap();
        assert_eq!(ops.len(), n_ops);
        let start = Instant::now();
        let r = check(&ops, &CheckOptions::default());
        let elapsed = start.elapsed();
        let steps: u64 = r.addrs.iter().map(|a| a.steps).sum();
        eprintln!("{n_ops} ops, {addrs} addresses, {clients} clients: {steps} steps, {elapsed:?}");
        for a in &r.addrs {
            assert!(matches!(a.verdict, Verdict::Linearizable), "{a}");
        }
        assert_eq!(r.addrs.len(), addrs as usize);
        assert!(steps < steps_per_op * n_ops as u64, "{steps} steps");

        // One read in the middle now reports a value nothing ever wrote.
        let victim = reads[reads.len() / 2];
        let mut v: serde_json::Value = serde_json::from_str(&lines[victim]).unwrap();
        v["result"] = 0xDEAD_BEEF_u64.into();
        lines[victim] = v.to_string();
        let ops = parse_history(&lines.join("\n")).unwrap();
        let start = Instant::now();
        let r = check(&ops, &CheckOptions::default());
        let bad: Vec<&AddrReport> = r.not_linearizable().collect();
        eprintln!(
            "corrupted read rejected in {:?}: {}",
            start.elapsed(),
            bad.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].addr, v["addr"].as_u64().unwrap());
        let Verdict::NotLinearizable { witness } = &bad[0].verdict else {
            unreachable!()
        };
        assert_eq!(witness.stuck.line, victim + 1, "{witness}");
        assert_eq!(r.undecided().count(), 0);
    }

    #[test]
    fn large_random_linearizable_history_is_accepted_and_a_corrupted_read_rejected() {
        check_random(5_000, 8, 6, 2, 20);
    }

    #[test]
    fn larger_random_history_with_more_clients() {
        check_random(20_000, 16, 8, 2, 20);
    }

    #[test]
    fn random_history_with_many_unknown_ops() {
        // A crash leaves a few unknown operations per client; a fifth of all operations is
        // far beyond that. Every unknown operation stays pending (may still take effect)
        // for the rest of the history, so the search scans more candidates per step.
        check_random(4_000, 4, 8, 10, 2_500);
    }
}
