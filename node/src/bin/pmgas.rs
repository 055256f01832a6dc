//! `pmgas`: the command-line client of a pmgas cluster, for scripts and operators. Any
//! process can run it, with or without PM: it finds the active monitor through ZooKeeper
//! and talks to the data nodes over RDMA ([`pmgas_node::space::Space`]).
//!
//! Addresses are global addresses, `page_id << 32 | offset`, in decimal or `0x…` hex.
//! `registers` is the linearizability workload: threads doing random reads, writes,
//! compare-and-swaps and fetch-and-adds on 8-byte registers, each recorded in a JSON-lines
//! history (`pmgas-bench check-history` checks it).
#![deny(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pmgas_layout::{GlobalAddr, NodeId, PageId};
use pmgas_node::blockcache::CacheConfig;
use pmgas_node::space::{Space, SpaceConfig, SpaceError};

#[derive(Parser)]
#[command(name = "pmgas", version, about = "pmgas command-line client")]
struct Cli {
    /// ZooKeeper connect string of the cluster.
    #[arg(long, env = "PMGAS_ZK")]
    zk: String,
    /// Cluster name (the ZooKeeper root is /pmgas/<cluster>).
    #[arg(long, env = "PMGAS_CLUSTER")]
    cluster: String,
    /// Local address to connect from (picks the RDMA device).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// How long an operation retries what is safe to retry.
    #[arg(long, default_value_t = 30_000)]
    op_timeout_ms: u64,
    /// Serve reads from the coherent block cache (node/CACHE.md).
    #[arg(long)]
    cache: bool,
    /// The cache's block size (a power of two, at most the page).
    #[arg(long, default_value_t = 4096)]
    cache_block_bytes: usize,
    /// The cache's DRAM budget.
    #[arg(long, default_value_t = 64)]
    cache_budget_mib: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the live data nodes, their data-path addresses and free pages.
    Nodes,
    /// Prints where a page's replicas are (primary first).
    Lookup { page_id: u32 },
    /// Allocates a replicated page; prints its page id, address and replicas.
    AllocPage {
        #[arg(long, default_value_t = 2)]
        backups: u8,
        /// The primary (default: the node with the most free pages).
        #[arg(long)]
        on: Option<u32>,
    },
    /// Frees a page: its id is never handed out again, its replicas go FREE (zeroed), and
    /// every later operation on it is refused PageFreed. Prints how many replicas it freed.
    FreePage { page_id: u32 },
    /// Reads bytes (printed as hex) or, with --u64, one 8-byte word (printed as decimal).
    Read {
        addr: String,
        #[arg(long, default_value_t = 8)]
        len: usize,
        #[arg(long)]
        u64: bool,
        /// Then wait until this file exists and read again (a test script's signal; with
        /// --cache the second read may be a hit).
        #[arg(long)]
        again_after: Option<PathBuf>,
    },
    /// Writes hex bytes, or with --u64 one 8-byte little-endian word.
    Write {
        addr: String,
        /// Hex bytes (`68656c6c6f`), or a decimal word with --u64.
        value: String,
        #[arg(long)]
        u64: bool,
        /// Connect first, then wait until this file exists to write (a test script's
        /// signal); prints WRITTEN once acknowledged.
        #[arg(long)]
        after_file: Option<PathBuf>,
    },
    /// Compare-and-swap on an 8-byte word; prints the old word.
    Cas {
        addr: String,
        expected: u64,
        new: u64,
    },
    /// Fetch-and-add on an 8-byte word; prints the old word.
    Faa { addr: String, delta: u64 },
    /// The register workload; writes its history (JSON lines) to --history.
    Registers(RegistersArgs),
}

#[derive(clap::Args)]
struct RegistersArgs {
    /// The page holding the registers (words 0..count).
    #[arg(long)]
    page_id: u32,
    #[arg(long, default_value_t = 8)]
    count: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Operations per thread.
    #[arg(long, default_value_t = 500)]
    ops: u64,
    /// Names this process's clients in the history: `<prefix>t<thread>`.
    #[arg(long, default_value = "p1")]
    client: String,
    /// Where the history goes (appended; required unless --init).
    #[arg(long, required_unless_present = "init")]
    history: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Set every register to 0 first (run once, before any workload process starts).
    #[arg(long)]
    init: bool,
    /// Stop issuing operations after this long (ms; 0: no limit).
    #[arg(long, default_value_t = 0)]
    max_ms: u64,
    /// Stop issuing operations once this file exists (a test script's signal).
    #[arg(long)]
    until_file: Option<PathBuf>,
    /// Bytes between two registers (a multiple of 8): 8 puts them in one cache block.
    #[arg(long, default_value_t = 8)]
    stride: u64,
    /// Percent of operations that are reads; the rest are writes, CAS and FAA, 3:2:1.
    #[arg(long, default_value_t = 40)]
    read_percent: u64,
}

fn main() -> ExitCode {
    pmgas_node::init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmgas: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a number: {e}"))
}

fn addr(space: &Space, text: &str) -> Result<GlobalAddr, String> {
    let raw = parse_u64(text)?;
    GlobalAddr::from_raw(raw, space.page_size_bytes().map_err(|e| e.to_string())?)
        .map_err(|e| format!("{text}: {e}"))
}

fn run(cli: Cli) -> Result<(), String> {
    let mut config = SpaceConfig::new(&cli.zk, &cli.cluster);
    config.bind = cli.bind;
    config.op_timeout = Duration::from_millis(cli.op_timeout_ms);
    if cli.cache {
        config.cache = Some(CacheConfig {
            block_bytes: cli.cache_block_bytes,
            budget_bytes: cli.cache_budget_mib << 20,
            ..CacheConfig::default()
        });
    }
    let space = Space::connect(config).map_err(|e| e.to_string())?;
    let s = |e: SpaceError| e.to_string();
    match cli.command {
        Command::Nodes => {
            for n in space.nodes().map_err(s)? {
                let [a, b, c, d] = n.ip;
                println!(
                    "node{} {a}.{b}.{c}.{d}:{} free_pages={}",
                    n.node.0, n.port, n.free_pages
                );
            }
        }
        Command::Lookup { page_id } => {
            let m = space.lookup(PageId(page_id)).map_err(s)?;
            println!(
                "page {page_id} epoch={} replicas={}",
                space.epoch().0,
                replicas(&m.replicas)
            );
        }
        Command::AllocPage { backups, on } => {
            let m = space.alloc_page(backups, on.map(NodeId)).map_err(s)?;
            let a = space.addr(m.page_id, 0).map_err(s)?;
            println!(
                "page_id={} addr={:#x} replicas={}",
                m.page_id.0,
                a.raw(),
                replicas(&m.replicas)
            );
        }
        Command::FreePage { page_id } => {
            let freed = space.free_page(PageId(page_id)).map_err(s)?;
            println!("page_id={page_id} freed replicas_freed={freed}");
        }
        Command::Read {
            addr: a,
            len,
            u64,
            again_after,
        } => {
            let a = addr(&space, &a)?;
            let read = || -> Result<(), String> {
                if u64 {
                    println!("{}", space.read_u64(a).map_err(s)?);
                } else {
                    let mut buf = vec![0u8; len];
                    space.read(a, &mut buf).map_err(s)?;
                    println!(
                        "{}",
                        buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    );
                }
                Ok(())
            };
            read()?;
            if let Some(f) = again_after {
                wait_for_file(&f);
                read()?;
            }
            print_cache_stats(&space);
        }
        Command::Write {
            addr: a,
            value,
            u64,
            after_file,
        } => {
            let a = addr(&space, &a)?;
            let bytes = if u64 {
                parse_u64(&value)?.to_le_bytes().to_vec()
            } else {
                hex(&value)?
            };
            if let Some(f) = &after_file {
                wait_for_file(f);
            }
            let start = Instant::now();
            space.write(a, &bytes).map_err(s)?;
            if after_file.is_some() {
                println!("WRITTEN in_ms={}", start.elapsed().as_millis());
            }
        }
        Command::Cas {
            addr: a,
            expected,
            new,
        } => {
            let a = addr(&space, &a)?;
            println!("{}", space.compare_and_swap(a, expected, new).map_err(s)?);
        }
        Command::Faa { addr: a, delta } => {
            let a = addr(&space, &a)?;
            println!("{}", space.fetch_add(a, delta).map_err(s)?);
        }
        Command::Registers(r) => registers(&space, &r)?,
    }
    Ok(())
}

fn replicas(r: &[pmgas_layout::wire::Replica]) -> String {
    r.iter()
        .map(|r| format!("node{}:page{}", r.node.0, r.page.0))
        .collect::<Vec<_>>()
        .join(",")
}

fn hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("{text:?}: an odd number of hex digits"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| format!("{text:?}: {e}")))
        .collect()
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host (the rig's
/// hosts share one kernel), so histories of several processes merge.
fn monotonic_ns() -> u64 {
    let t = nix_clock();
    t.0 * 1_000_000_000 + t.1
}

#[allow(unsafe_code)]
fn nix_clock() -> (u64, u64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64, ts.tv_nsec as u64)
}

/// A small deterministic generator (SplitMix64) per thread, seeded from --seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[derive(Clone, Copy)]
enum RegOp {
    Read,
    Write(u64),
    Cas(u64, u64),
    Faa(u64),
}

impl RegOp {
    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write(_) => "write",
            Self::Cas(..) => "cas",
            Self::Faa(_) => "faa",
        }
    }

    fn args(self) -> Vec<u64> {
        match self {
            Self::Read => vec![],
            Self::Write(v) | Self::Faa(v) => vec![v],
            Self::Cas(e, n) => vec![e, n],
        }
    }
}

/// One operation as the history records it: written at invocation (status unknown) and
/// again at completion, both with the same `seq`, so a process killed mid-operation leaves
/// its invocation.
struct Invocation<'a> {
    client: &'a str,
    seq: u64,
    op: RegOp,
    addr: u64,
    invoke_ns: u64,
}

impl Invocation<'_> {
    fn line(&self, result: Option<u64>, status: &str, complete_ns: u64) -> String {
        let args: Vec<String> = self.op.args().iter().map(u64::to_string).collect();
        let result = result.map_or("null".to_string(), |r| r.to_string());
        format!(
            "{{\"client\":\"{}\",\"seq\":{},\"op\":\"{}\",\"addr\":{},\"arg\":[{}],\"result\":{result},\"status\":\"{status}\",\"invoke_ns\":{},\"complete_ns\":{complete_ns}}}\n",
            self.client,
            self.seq,
            self.op.name(),
            self.addr,
            args.join(","),
            self.invoke_ns,
        )
    }
}

fn registers(space: &Space, r: &RegistersArgs) -> Result<(), String> {
    let page = PageId(r.page_id);
    if r.stride == 0 || !r.stride.is_multiple_of(8) {
        return Err(format!("--stride {}: a multiple of 8", r.stride));
    }
    let addrs: Vec<GlobalAddr> = (0..r.count)
        .map(|i| space.addr(page, i * r.stride))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if r.init {
        for a in &addrs {
            space
                .write(*a, &0u64.to_le_bytes())
                .map_err(|e| e.to_string())?;
        }
        println!("REGISTERS INIT page_id={} count={}", r.page_id, r.count);
        return Ok(());
    }
    let path = r.history.as_ref().ok_or("--history is required")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let file = Mutex::new(file);
    // One write(2) per record: a process killed at any point leaves whole lines.
    let emit = |line: String| {
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(line.as_bytes());
    };
    let start = Instant::now();
    let counts: Vec<(u64, u64, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..r.threads)
            .map(|t| {
                let emit = &emit;
                let addrs = &addrs;
                scope.spawn(move || {
                    let client = format!("{}t{t}", r.client);
                    let mut rng = Rng(r.seed
                        ^ ((t as u64 + 1) << 32)
                        ^ pmgas_node::fnv1a(r.client.as_bytes()));
                    let (mut ok, mut failed, mut unknown) = (0u64, 0u64, 0u64);
                    for seq in 0..r.ops {
                        if r.max_ms > 0 && start.elapsed() >= Duration::from_millis(r.max_ms) {
                            break;
                        }
                        if r.until_file.as_ref().is_some_and(|f| f.exists()) {
                            break;
                        }
                        let a = addrs[(rng.next() % addrs.len() as u64) as usize];
                        // Values unique to this client and operation keep the check fast.
                        let unique =
                            (pmgas_node::fnv1a(client.as_bytes()) & 0xffff) << 40 | (seq + 1);
                        let op = match rng.next() % 100 {
                            p if p < r.read_percent => RegOp::Read,
                            _ => match rng.next() % 6 {
                                0..=2 => RegOp::Write(unique),
                                3..=4 => {
                                    // Expect a recent value of this register to make some succeed.
                                    let expected = space.read_u64(a).unwrap_or(0);
                                    RegOp::Cas(expected, unique)
                                }
                                _ => RegOp::Faa(1 + rng.next() % 5),
                            },
                        };
                        let inv = Invocation {
                            client: &client,
                            seq,
                            op,
                            addr: a.raw(),
                            invoke_ns: monotonic_ns(),
                        };
                        emit(inv.line(None, "unknown", 0));
                        let result = match op {
                            RegOp::Read => space.read_u64(a).map(Some),
                            RegOp::Write(v) => space.write(a, &v.to_le_bytes()).map(|()| None),
                            RegOp::Cas(e, n) => space.compare_and_swap(a, e, n).map(Some),
                            RegOp::Faa(d) => space.fetch_add(a, d).map(Some),
                        };
                        let complete_ns = monotonic_ns();
                        let (status, value) = match result {
                            Ok(v) => {
                                ok += 1;
                                ("ok", v)
                            }
                            Err(SpaceError::Unknown(e)) => {
                                unknown += 1;
                                eprintln!("{client} seq {seq}: outcome unknown: {e}");
                                ("unknown", None)
                            }
                            Err(e) => {
                                failed += 1;
                                eprintln!("{client} seq {seq}: failed: {e}");
                                ("fail", None)
                            }
                        };
                        emit(inv.line(value, status, complete_ns));
                    }
                    (ok, failed, unknown)
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let (ok, failed, unknown) = counts
        .iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    println!(
        "REGISTERS DONE client={} ok={ok} failed={failed} unknown={unknown} elapsed_ms={}",
        r.client,
        start.elapsed().as_millis()
    );
    print_cache_stats(space);
    Ok(())
}

fn wait_for_file(f: &std::path::Path) {
    while !f.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The block cache's counters, when caching is on.
fn print_cache_stats(space: &Space) {
    if let Some(c) = space.cache_stats() {
        println!(
            "CACHE STATS hits={} misses={} expired={} fills={} invalidations={} evictions={} renewals={}",
            c.hits, c.misses, c.expired, c.fills, c.invalidations, c.evictions, c.renewals
        );
    }
}
