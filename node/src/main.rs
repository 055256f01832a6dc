//! `pmgas-node`: the data-server binary.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pmgas_layout::wire::ErrorCode;
use pmgas_layout::{ClusterId, Epoch, NodeId, PageState};
use pmgas_node::{Client, ClientConfig, ClientError, OnBlank, Pool, PoolIdentity};

#[derive(Parser)]
#[command(name = "pmgas-node", version, about = "pmgas data server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Copy)]
struct IdentityArgs {
    #[arg(long)]
    cluster_id: u64,
    #[arg(long)]
    node_id: u32,
    /// Page size in bytes (power of two, 4 KiB ..= 4 GiB).
    #[arg(long, default_value_t = 2 << 20)]
    page_size: u64,
}

impl IdentityArgs {
    fn identity(self) -> PoolIdentity {
        PoolIdentity {
            cluster_id: ClusterId(self.cluster_id),
            node_id: NodeId(self.node_id),
            page_size_bytes: self.page_size,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Checks that PATH can back a node's pool (devdax, or a tmpfs file in development)
    /// and prints what it is; refuses fsdax and other memory RDMA cannot register.
    CheckPm {
        #[arg(long)]
        pm: PathBuf,
        /// Create or grow a development file to this many bytes.
        #[arg(long)]
        size_bytes: Option<u64>,
    },
    /// Formats a pool. A valid pool is destroyed only with --force.
    Format {
        #[arg(long)]
        pm: PathBuf,
        #[command(flatten)]
        id: IdentityArgs,
        /// Create or grow a development file to this many bytes.
        #[arg(long)]
        size_bytes: Option<u64>,
        #[arg(long)]
        force: bool,
    },
    /// Prints the pool header and every non-FREE ART entry, without modifying the pool.
    ArtDump {
        #[arg(long)]
        pm: PathBuf,
        /// One JSON object per line: the header first, then one per entry.
        #[arg(long)]
        json: bool,
    },
    /// Prints a digest (FNV-1a 64) of the bytes of the page that holds each given page id
    /// (`PAGE page_id=P page=I state=S fnv=H`), to compare replicas byte for byte; never
    /// writes.
    PageDigest {
        #[arg(long)]
        pm: PathBuf,
        /// Page ids to digest (comma-separated).
        #[arg(long, value_delimiter = ',')]
        page_id: Vec<u32>,
    },
    /// Replays a persistence audit file (PMGAS_PERSIST_AUDIT of a node built with the
    /// `persist-audit` feature): every acknowledged byte must have been written back after
    /// it was last stored. Prints `AUDIT ok stores=… writebacks=… acks=…`.
    AuditCheck {
        #[arg(long)]
        file: PathBuf,
    },
    /// Runs a data node: opens (or formats) the pool, joins the monitor over rdma_cm and
    /// serves the two-phase page allocation; with --alloc-pages, also allocates that many
    /// replicated pages as a primary from --concurrency threads through the client API:
    /// prints `ALLOC START <node>` once --start-delay-ms has passed after its join, and
    /// `ALLOC DONE …` with their latencies at the end.
    Serve {
        #[arg(long)]
        pm: PathBuf,
        #[command(flatten)]
        id: IdentityArgs,
        #[arg(long)]
        size_bytes: Option<u64>,
        /// The monitor's rdma_cm address (or find it with --zk and --cluster).
        #[arg(long, required_unless_present = "zk")]
        monitor: Option<std::net::SocketAddr>,
        /// ZooKeeper connect string: the active monitor's address is read from
        /// /pmgas/<cluster>/leader.
        #[arg(long, requires = "cluster")]
        zk: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        /// This node's address (picks its RDMA device).
        #[arg(long)]
        bind: std::net::IpAddr,
        #[arg(long, default_value_t = 0)]
        alloc_pages: u64,
        #[arg(long, default_value_t = 2)]
        backups: u8,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Serve only for this long after joining before allocating.
        #[arg(long, default_value_t = 0)]
        start_delay_ms: u64,
        /// Each allocating thread pauses this long after each allocation (paces a run
        /// that must outlast an event, such as a node being declared dead).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// After the pages, allocate this many objects through the client API (new slabs
        /// on replicated pages), check them, free half, print `OBJECTS DONE …`.
        #[arg(long, default_value_t = 0)]
        alloc_objects: u64,
        /// Retry an allocation refused for a passing reason (the monitor being replaced,
        /// a node rejoining: Stopped, NotLeader, NotEnoughNodes, StaleEpoch) for up to
        /// this long, as an application riding out a failover would; 0 counts them as
        /// failures at once.
        #[arg(long, default_value_t = 0)]
        retry_ms: u64,
        /// Serve the data path (clients' reads and updates, primaries' Replicates) on this
        /// port of --bind (0: any free port); the monitor lists it to clients.
        #[arg(long, default_value_t = 0)]
        data_port: u16,
        /// Serve no data path (allocation only).
        #[arg(long)]
        no_data_path: bool,
        /// The lease this node grants on a block a client caches (node/CACHE.md): a writer
        /// waits at most this long for a sharer that does not answer (50 to 1000). Keep it
        /// well below the monitor's node and heartbeat timeouts (a new primary must not
        /// order updates while a dead one's leases run; a free waits for a lease on the
        /// thread that answers heartbeats).
        #[arg(long, default_value_t = 500)]
        cache_lease_ms: u64,
    },
    /// Crash-test workload (internal): formats a blank pool, then performs a seeded random
    /// sequence of ART transitions, printing `DONE i` after each is durable.
    #[command(hide = true)]
    CrashExercise(ExerciseArgs),
    /// Object crash-test workload (internal): seeded random alloc/free, each allocated
    /// object tagged with its own address; prints `A i addr` / `F i addr` once durable.
    #[command(hide = true)]
    ObjectExercise(ExerciseArgs),
}

/// The crash-test workloads' arguments.
#[derive(clap::Args)]
struct ExerciseArgs {
    #[arg(long)]
    pm: PathBuf,
    #[command(flatten)]
    id: IdentityArgs,
    #[arg(long)]
    size_bytes: Option<u64>,
    #[arg(long)]
    seed: u64,
    #[arg(long)]
    ops: u64,
}

fn main() -> ExitCode {
    pmgas_node::init_logging();
    let result = match Cli::parse().command {
        Command::CheckPm { pm, size_bytes } => pmgas_node::MappedRegion::open(&pm, size_bytes)
            .map(|region| {
                println!(
                    "{}: {:?}, {} bytes",
                    pm.display(),
                    region.kind(),
                    region.len()
                )
            })
            .map_err(|e| e.to_string()),
        Command::Format {
            pm,
            id,
            size_bytes,
            force,
        } => Pool::format(&pm, size_bytes, id.identity(), force)
            .map(|pool| {
                let h = pool.header();
                println!(
                    "{}: formatted {} pages of {} bytes for {}",
                    pm.display(),
                    h.page_count,
                    h.page_size_bytes,
                    h.node_id
                );
            })
            .map_err(|e| e.to_string()),
        Command::Serve {
            pm,
            id,
            size_bytes,
            monitor,
            zk,
            cluster,
            bind,
            alloc_pages,
            backups,
            concurrency,
            start_delay_ms,
            pause_ms,
            alloc_objects,
            retry_ms,
            data_port,
            no_data_path,
            cache_lease_ms,
        } => {
            let rediscover = zk.clone().zip(cluster.clone());
            let t0 = std::time::Instant::now();
            let monitor = match (monitor, zk, cluster) {
                (Some(m), _, _) => Ok(m),
                (None, Some(zk), Some(cluster)) => pmgas_node::service::find_monitor(
                    &zk,
                    &cluster,
                    pmgas_node::service::FIRST_JOIN_PATIENCE,
                ),
                _ => Err("give --monitor, or --zk and --cluster".to_string()),
            };
            let monitor = match monitor {
                Ok(m) => {
                    tracing::debug!(%m, ms = ?t0.elapsed(), "monitor found");
                    m
                }
                Err(e) => {
                    eprintln!("pmgas-node: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let load = Load {
                pages: alloc_pages,
                backups,
                threads: concurrency.max(1),
                start_delay: std::time::Duration::from_millis(start_delay_ms),
                pause: std::time::Duration::from_millis(pause_ms),
                objects: alloc_objects,
                retry_for: std::time::Duration::from_millis(retry_ms),
            };
            let mut config = ClientConfig::new(id.identity().node_id, bind, monitor);
            // With ZooKeeper, a lost monitor is looked up again and rejoined.
            config.rediscover = rediscover;
            config.data_port = (!no_data_path).then_some(data_port);
            // A free waits for a page's last lease on the node's service thread, which must
            // keep answering the monitor's heartbeats meanwhile.
            if !(50..=1_000).contains(&cache_lease_ms) {
                eprintln!("pmgas-node: --cache-lease-ms {cache_lease_ms}: between 50 and 1000");
                return ExitCode::FAILURE;
            }
            config.cache_lease = std::time::Duration::from_millis(cache_lease_ms);
            serve(&pm, id.identity(), size_bytes, config, &load)
        }
        Command::ArtDump { pm, json } => art_dump(&pm, json),
        Command::PageDigest { pm, page_id } => page_digest(&pm, &page_id),
        Command::AuditCheck { file } => std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|text| pmgas_node::audit::check(&text))
            .map(|s| {
                println!(
                    "AUDIT ok stores={} writebacks={} acks={}",
                    s.stores, s.writebacks, s.acks
                )
            }),
        Command::CrashExercise(a) => crash_exercise(&a),
        Command::ObjectExercise(a) => object_exercise(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmgas-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn page_digest(pm: &std::path::Path, ids: &[u32]) -> Result<(), String> {
    let pool = Pool::open(pm, None, OnBlank::Refuse, None).map_err(|e| e.to_string())?;
    let page_size = pool.header().page_size_bytes as usize;
    for &id in ids {
        let found = pool
            .art()
            .iter()
            .find(|(_, r)| r.page_id.0 == id && r.state != pmgas_layout::PageState::Free);
        let Some((page, rec)) = found else {
            println!("PAGE page_id={id} missing");
            continue;
        };
        let mut bytes = vec![0u8; page_size];
        pool.read_in_page(page, 0, &mut bytes)
            .map_err(|e| e.to_string())?;
        let fnv = pmgas_node::fnv1a(&bytes);
        println!(
            "PAGE page_id={id} page={} state={:?} fnv={fnv:016x}",
            page.0, rec.state
        );
    }
    Ok(())
}

fn art_dump(pm: &std::path::Path, json: bool) -> Result<(), String> {
    let pool = Pool::open(pm, None, OnBlank::Refuse, None).map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match write_art(&mut out, pm, &pool, json).and_then(|()| out.flush()) {
        // A reader that stopped early (`art-dump | head`) is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| format!("writing the dump: {e}")),
    }
}

fn write_art(
    out: &mut impl Write,
    pm: &std::path::Path,
    pool: &Pool,
    json: bool,
) -> std::io::Result<()> {
    let h = pool.header();
    let art = pool.art();
    let w = |out: &mut dyn Write, line: String| writeln!(out, "{line}");
    if json {
        w(
            out,
            format!(
                r#"{{"header":{{"cluster_id":{},"node_id":{},"page_size_bytes":{},"page_count":{},"data_offset":{},"pool_bytes":{},"free_pages":{}}}}}"#,
                h.cluster_id.0,
                h.node_id.0,
                h.page_size_bytes,
                h.page_count,
                h.data_offset,
                h.pool_bytes,
                art.free_count()
            ),
        )?;
    } else {
        w(
            out,
            format!(
                "pool {}: cluster {} {} page_size {} pages {} free {} data_offset {}",
                pm.display(),
                h.cluster_id.0,
                h.node_id,
                h.page_size_bytes,
                h.page_count,
                art.free_count(),
                h.data_offset
            ),
        )?;
    }
    for (page, rec) in art.iter().filter(|(_, r)| r.state != PageState::Free) {
        let line = if json {
            format!(
                r#"{{"page_index":{},"state":"{}","page_id":{},"epoch":{},"seq":{}}}"#,
                page.0,
                rec.state.name(),
                rec.page_id.0,
                rec.epoch.0,
                rec.seq
            )
        } else {
            format!(
                "page {:>6} {:<12} page_id {:>10} epoch {:>6} seq {}",
                page.0,
                rec.state.name(),
                rec.page_id.0,
                rec.epoch.0,
                rec.seq
            )
        };
        w(out, line)?;
    }
    for c in pool.corrupt_entries() {
        let line = if json {
            format!(
                r#"{{"page_index":{},"state":"CORRUPT","reason":{:?}}}"#,
                c.page.0, c.reason
            )
        } else {
            format!("page {:>6} CORRUPT      {}", c.page.0, c.reason)
        };
        w(out, line)?;
    }
    Ok(())
}

/// The crash-test workload: see `node/tests/crash.rs` for the driver and the model.
/// The pool an exerciser works on: formatted on first use, as a node's first start does.
fn exercise_pool(a: &ExerciseArgs) -> Result<Pool, String> {
    let id = a.id.identity();
    Pool::open(&a.pm, a.size_bytes, OnBlank::Format(id), Some(id)).map_err(|e| e.to_string())
}

fn crash_exercise(a: &ExerciseArgs) -> Result<(), String> {
    let pool = exercise_pool(a)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").map_err(|e| e.to_string())?;
    let _ = out.flush();
    let mut rng = pmgas_node::art::SplitMix(a.seed);
    for i in 0..a.ops {
        let (page, to, page_id) = pmgas_node::art::random_op(&pool.art(), &mut rng, i);
        pool.transition(page, to, page_id, Epoch(1))
            .map_err(|e| e.to_string())?;
        writeln!(out, "DONE {i} {} {} {}", page.0, to.name(), page_id.0)
            .map_err(|e| e.to_string())?;
        let _ = out.flush();
    }
    Ok(())
}

/// The object crash-test workload: see `node/tests/object_crash.rs` for the checks.
fn object_exercise(a: &ExerciseArgs) -> Result<(), String> {
    use pmgas_node::{LocalPageIds, ObjectAllocator};
    let pool = exercise_pool(a)?;
    let alloc = ObjectAllocator::open(std::sync::Arc::new(pool), Box::new(LocalPageIds), true)
        .map_err(|e| e.to_string())?;
    let mut live: Vec<pmgas_layout::GlobalAddr> =
        alloc.allocated().into_iter().map(|(a, _)| a).collect();
    let mut tc = alloc.thread_cache();
    let mut rng = pmgas_node::art::SplitMix(a.seed);
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").map_err(|e| e.to_string())?;
    let _ = out.flush();
    for i in 0..a.ops {
        if live.is_empty() || rng.below(10) < 6 {
            // Mostly small objects, sometimes up to 8 KiB.
            let size = if rng.below(4) == 0 {
                8 + rng.below(8192)
            } else {
                8 + rng.below(256)
            };
            let addr = tc.alloc(size).map_err(|e| e.to_string())?;
            let (page, offset) = alloc.page_of(addr).map_err(|e| e.to_string())?;
            alloc
                .pool()
                .store_in_page(page, offset, &addr.raw().to_le_bytes())
                .map_err(|e| e.to_string())?;
            live.push(addr);
            writeln!(out, "A {i} {}", addr.raw()).map_err(|e| e.to_string())?;
        } else {
            let victim = live.swap_remove(rng.below(live.len() as u64) as usize);
            tc.free(victim).map_err(|e| e.to_string())?;
            writeln!(out, "F {i} {}", victim.raw()).map_err(|e| e.to_string())?;
        }
        let _ = out.flush();
    }
    Ok(())
}

/// What `serve` allocates itself (the load generator of the tests, the local cluster and
/// the benchmark).
struct Load {
    pages: u64,
    backups: u8,
    threads: usize,
    start_delay: std::time::Duration,
    pause: std::time::Duration,
    objects: u64,
    retry_for: std::time::Duration,
}

/// Whether an allocation may succeed if asked again shortly.
fn passing(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Stopped(_)
            | ClientError::Refused {
                code: ErrorCode::NotLeader
                    | ErrorCode::NotEnoughNodes
                    | ErrorCode::StaleEpoch
                    | ErrorCode::BackupLost,
                ..
            }
    )
}

fn serve(
    pm: &std::path::Path,
    id: PoolIdentity,
    size: Option<u64>,
    config: ClientConfig,
    load: &Load,
) -> Result<(), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let t0 = std::time::Instant::now();
    let pool = Pool::open(pm, size, OnBlank::Format(id), Some(id)).map_err(|e| e.to_string())?;
    tracing::debug!(ms = ?t0.elapsed(), "pool opened");
    let pool = std::sync::Arc::new(pool);
    // A node restarting after a crash may find the monitor still holding its old
    // connection for a moment (DuplicateNode), or the monitor may fail to record the join
    // in a ZooKeeper slow to answer (Internal): retry, for about 10 s.
    let mut attempts = 0;
    let client = loop {
        match Client::connect(config.clone(), std::sync::Arc::clone(&pool)) {
            Err(ClientError::Refused {
                code: ErrorCode::DuplicateNode | ErrorCode::Internal,
                ..
            }) if attempts < 40 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            other => break other.map_err(|e| e.to_string())?,
        }
    };
    let r = client.reconcile_report();
    println!(
        "NODE READY {} epoch={} reconciled: committed={} freed={} unknown_allocated={} conflicting={}",
        client.node_id(),
        client.epoch().0,
        r.committed.len(),
        r.freed.len(),
        r.unknown_allocated.len(),
        r.conflicting.len()
    );
    let _ = std::io::stdout().flush();
    if load.pages > 0 {
        std::thread::sleep(load.start_delay);
        // Fault injection (scripts/cluster.sh) times its faults from this line.
        println!("ALLOC START {}", client.node_id());
        let _ = std::io::stdout().flush();
        let next = AtomicU64::new(0);
        let start = std::time::Instant::now();
        let results: Vec<(Vec<u64>, std::collections::BTreeMap<String, u64>)> =
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..load.threads)
                    .map(|_| {
                        s.spawn(|| {
                            let mut lat = vec![];
                            let mut failures = std::collections::BTreeMap::new();
                            while next.fetch_add(1, Ordering::Relaxed) < load.pages {
                                std::thread::sleep(load.pause);
                                let t = std::time::Instant::now();
                                let mut result = client.alloc_page(load.backups);
                                while let Err(e) = &result
                                    && passing(e)
                                    && t.elapsed() < load.retry_for
                                {
                                    *failures.entry("retried".to_string()).or_insert(0) += 1;
                                    std::thread::sleep(std::time::Duration::from_millis(50));
                                    result = client.alloc_page(load.backups);
                                }
                                match result {
                                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                                    Err(e) => {
                                        // Stop asking a deposed monitor; while the
                                        // service reconnects, slow down.
                                        let deposed = matches!(
                                            e,
                                            ClientError::Refused {
                                                code: ErrorCode::NotLeader,
                                                ..
                                            }
                                        );
                                        if matches!(e, ClientError::Stopped(_)) {
                                            std::thread::sleep(std::time::Duration::from_millis(
                                                100,
                                            ));
                                        }
                                        let kind = match e {
                                            ClientError::Refused { code, .. } => {
                                                format!("{code:?}")
                                            }
                                            ClientError::NoLocalSpace => "NoLocalSpace".into(),
                                            ClientError::Stopped(_) => "Stopped".into(),
                                            other => {
                                                eprintln!("allocation failed: {other}");
                                                "Other".into()
                                            }
                                        };
                                        *failures.entry(kind).or_insert(0) += 1;
                                        if deposed {
                                            break;
                                        }
                                    }
                                }
                            }
                            (lat, failures)
                        })
                    })
                    .collect();
                workers.into_iter().filter_map(|w| w.join().ok()).collect()
            });
        let secs = start.elapsed().as_secs_f64();
        let mut l: Vec<u64> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
        let mut failures = std::collections::BTreeMap::new();
        for (_, f) in &results {
            for (k, v) in f {
                *failures.entry(k.clone()).or_insert(0u64) += v;
            }
        }
        l.sort_unstable();
        let q = |f: f64| {
            l.get(((l.len() as f64 * f) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let retried = failures.remove("retried").unwrap_or(0);
        println!(
            "ALLOC DONE ok={} failed={} retried={retried} {:?} p50_us={} p99_us={} elapsed_s={secs:.3} per_s={:.1}",
            l.len(),
            failures.values().sum::<u64>(),
            failures,
            q(0.5),
            q(0.99),
            l.len() as f64 / secs.max(1e-9)
        );
        let _ = std::io::stdout().flush();
    }
    if load.objects > 0 {
        objects_round_trip(&client, load.objects)?;
    }
    client.wait()
}

/// Allocates `n` objects of assorted sizes, checks each one's slab page is mapped to this
/// node (through the mapping cache), writes and reads back a tag in each, frees half.
fn objects_round_trip(client: &Client, n: u64) -> Result<(), String> {
    let pool = client.objects().pool().clone();
    let mut live = vec![];
    for i in 0..n {
        let size = [8u64, 100, 1000, 4000][i as usize % 4];
        let addr = client.alloc(size).map_err(|e| e.to_string())?;
        let m = client.lookup(addr.page()).map_err(|e| e.to_string())?;
        if m.replicas[0].node != client.node_id() {
            return Err(format!(
                "object {addr:?} on a page whose primary is {:?}",
                m.replicas[0]
            ));
        }
        let (page, off) = client.objects().page_of(addr).map_err(|e| e.to_string())?;
        pool.store_in_page(page, off, &addr.raw().to_le_bytes())
            .map_err(|e| e.to_string())?;
        live.push((addr, page, off));
    }
    for (k, (addr, page, off)) in live.iter().enumerate() {
        let mut b = [0u8; 8];
        pool.read_in_page(*page, *off, &mut b)
            .map_err(|e| e.to_string())?;
        if u64::from_le_bytes(b) != addr.raw() {
            return Err(format!("object {addr:?} lost its tag"));
        }
        if k % 2 == 0 {
            client.free(*addr).map_err(|e| e.to_string())?;
        }
    }
    // The mapping cache: a miss asks the monitor and gets the same answer; a page nobody
    // allocated is an error, not a guess.
    if let Some((addr, _, _)) = live.first() {
        let cached = client.lookup(addr.page()).map_err(|e| e.to_string())?;
        client.invalidate(addr.page());
        let fetched = client.lookup(addr.page()).map_err(|e| e.to_string())?;
        if fetched != cached {
            return Err(format!(
                "the monitor says {fetched:?}, the cache said {cached:?}"
            ));
        }
    }
    match client.lookup(pmgas_layout::PageId(u32::MAX - 1)) {
        Err(ClientError::Refused {
            code: ErrorCode::UnknownPage,
            ..
        }) => {}
        other => return Err(format!("lookup of an unmapped page gave {other:?}")),
    }
    let stats = client.objects().stats();
    println!(
        "OBJECTS DONE allocated={n} freed={} live={} slabs={} remote_lookups={}",
        n.div_ceil(2),
        stats.allocated_objects,
        stats.slabs,
        client.remote_lookups()
    );
    let _ = std::io::stdout().flush();
    Ok(())
}
