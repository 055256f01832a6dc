//! `pmgas-bench objects`: the object allocator side by side with PMDK's libpmemobj
//! (`pmemobj_alloc` / `pmemobj_free`) and glibc `malloc` / `free`, in one run, on the same
//! kind of memory (pool files on the same tmpfs or devdax-backed mount).
//!
//! Each thread repeats: allocate a batch of 64 objects of one size, then free them. Every
//! call is timed with the cycle clock; throughput counts alloc+free pairs per second over
//! all threads. libpmemobj needs `PMEM_IS_PMEM_FORCE=1` on tmpfs to persist with cache
//! flushes (as pmgas does) instead of msync; the command re-executes itself with it set.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use pmgas_layout::{ClusterId, NodeId};
use pmgas_node::{LocalPageIds, ObjectAllocator, OnBlank, Pool, PoolIdentity};
use serde::Serialize;

use crate::clock::{CycleClock, cycles};
use crate::report::new_histogram;

#[derive(Debug, Args)]
pub struct ObjectsArgs {
    /// Object sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    sizes: Vec<u64>,
    /// Thread counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// alloc+free pairs per thread per run.
    #[arg(long, default_value_t = 200_000)]
    ops: u64,
    /// Directory for the pool files (tmpfs, or a devdax-backed mount).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Size of each pool file.
    #[arg(long, default_value_t = 1 << 30)]
    pool_bytes: u64,
    /// Also fill a pool completely and time the allocator's rebuild on reopen.
    #[arg(long)]
    rebuild: bool,
    #[arg(long)]
    json: bool,
}

const BATCH: usize = 64;

#[derive(Debug, Serialize)]
struct Row {
    allocator: &'static str,
    size_bytes: u64,
    threads: usize,
    pairs_per_sec: f64,
    alloc_p50_ns: u64,
    alloc_p99_ns: u64,
    free_p50_ns: u64,
    free_p99_ns: u64,
}

/// One allocator under test, shared by the threads.
trait Subject: Sync {
    /// Per-thread state for one thread.
    fn cache(&self) -> Cache<'_> {
        Cache { pmgas: None }
    }
    /// Allocates `size` bytes; returns a handle for `free`.
    fn alloc(&self, cache: &mut Cache, size: u64) -> Result<u64, String>;
    fn free(&self, cache: &mut Cache, handle: u64) -> Result<(), String>;
}

/// Per-thread state a subject may keep (pmgas's thread cache).
struct Cache<'a> {
    pmgas: Option<pmgas_node::ThreadCache<'a>>,
}

struct Pmgas(ObjectAllocator);

impl Subject for Pmgas {
    fn cache(&self) -> Cache<'_> {
        Cache {
            pmgas: Some(self.0.thread_cache()),
        }
    }
    fn alloc(&self, cache: &mut Cache, size: u64) -> Result<u64, String> {
        let tc = cache.pmgas.as_mut().ok_or("no thread cache")?;
        tc.alloc(size).map(|a| a.raw()).map_err(|e| e.to_string())
    }
    fn free(&self, _cache: &mut Cache, handle: u64) -> Result<(), String> {
        let page_size = self.0.pool().header().page_size_bytes;
        let addr =
            pmgas_layout::GlobalAddr::from_raw(handle, page_size).map_err(|e| e.to_string())?;
        self.0.free(addr).map_err(|e| e.to_string())
    }
}

struct Malloc;

impl Subject for Malloc {
    fn alloc(&self, _cache: &mut Cache, size: u64) -> Result<u64, String> {
        // SAFETY: plain malloc; the pointer is freed exactly once by `free` below.
        let p = unsafe { libc::malloc(size as usize) };
        if p.is_null() {
            return Err("malloc returned NULL".into());
        }
        // Touch it, as the other allocators' callers would.
        // SAFETY: `p` points to at least `size` >= 1 writable bytes.
        unsafe { p.cast::<u8>().write(1) };
        Ok(p as u64)
    }
    fn free(&self, _cache: &mut Cache, handle: u64) -> Result<(), String> {
        // SAFETY: `handle` came from malloc above and is freed once.
        unsafe { libc::free(handle as *mut c_void) };
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PmemOid {
    pool_uuid_lo: u64,
    off: u64,
}

type Constructor = Option<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void) -> c_int>;

#[link(name = "pmemobj")]
unsafe extern "C" {
    fn pmemobj_create(
        path: *const c_char,
        layout: *const c_char,
        poolsize: usize,
        mode: u32,
    ) -> *mut c_void;
    fn pmemobj_close(pop: *mut c_void);
    fn pmemobj_alloc(
        pop: *mut c_void,
        oidp: *mut PmemOid,
        size: usize,
        type_num: u64,
        constructor: Constructor,
        arg: *mut c_void,
    ) -> c_int;
    fn pmemobj_free(oidp: *mut PmemOid);
    fn pmemobj_errormsg() -> *const c_char;
}

struct PmemObj {
    pop: *mut c_void,
    uuid_lo: std::sync::atomic::AtomicU64,
}

// SAFETY: libpmemobj pools are thread-safe for alloc/free.
unsafe impl Sync for PmemObj {}

fn pmem_error() -> String {
    // SAFETY: pmemobj_errormsg returns a thread-local C string.
    unsafe { CStr::from_ptr(pmemobj_errormsg()) }
        .to_string_lossy()
        .into_owned()
}

impl PmemObj {
    fn create(path: &Path, bytes: u64) -> Result<Self, String> {
        let _ = std::fs::remove_file(path);
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let layout = CString::new("pmgas-bench").map_err(|e| e.to_string())?;
        // SAFETY: valid C strings; libpmemobj creates and maps the file.
        let pop = unsafe { pmemobj_create(cpath.as_ptr(), layout.as_ptr(), bytes as usize, 0o600) };
        if pop.is_null() {
            return Err(format!(
                "pmemobj_create {}: {}",
                path.display(),
                pmem_error()
            ));
        }
        Ok(Self {
            pop,
            uuid_lo: Default::default(),
        })
    }
}

impl Drop for PmemObj {
    fn drop(&mut self) {
        // SAFETY: the pool is open and closed once.
        unsafe { pmemobj_close(self.pop) };
    }
}

impl Subject for PmemObj {
    fn alloc(&self, _cache: &mut Cache, size: u64) -> Result<u64, String> {
        let mut oid = PmemOid::default();
        // SAFETY: valid pool and out-pointer; no constructor.
        let ret = unsafe {
            pmemobj_alloc(
                self.pop,
                &mut oid,
                size as usize,
                0,
                None,
                std::ptr::null_mut(),
            )
        };
        if ret != 0 {
            return Err(format!("pmemobj_alloc: {}", pmem_error()));
        }
        self.uuid_lo
            .store(oid.pool_uuid_lo, std::sync::atomic::Ordering::Relaxed);
        Ok(oid.off)
    }
    fn free(&self, _cache: &mut Cache, handle: u64) -> Result<(), String> {
        let mut oid = PmemOid {
            pool_uuid_lo: self.uuid_lo.load(std::sync::atomic::Ordering::Relaxed),
            off: handle,
        };
        // SAFETY: the oid names an object allocated above, freed once.
        unsafe { pmemobj_free(&mut oid) };
        Ok(())
    }
}

/// One thread's alloc and free latency histograms.
type ThreadResult = Result<(Histogram<u64>, Histogram<u64>), String>;

fn run_subject(
    subject: &dyn Subject,
    clock: &CycleClock,
    size: u64,
    threads: usize,
    pairs: u64,
) -> Result<(f64, Histogram<u64>, Histogram<u64>), String> {
    let start = Instant::now();
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    crate::peer_proc::pin(t);
                    let mut cache = subject.cache();
                    let (mut ha, mut hf) = (new_histogram(), new_histogram());
                    let mut handles = Vec::with_capacity(BATCH);
                    let mut done = 0;
                    while done < pairs {
                        let n = (pairs - done).min(BATCH as u64);
                        for _ in 0..n {
                            let c0 = cycles();
                            handles.push(subject.alloc(&mut cache, size)?);
                            ha.record(clock.ns_between(c0, cycles()).max(1))
                                .map_err(|e| e.to_string())?;
                        }
                        for h in handles.drain(..) {
                            let c0 = cycles();
                            subject.free(&mut cache, h)?;
                            hf.record(clock.ns_between(c0, cycles()).max(1))
                                .map_err(|e| e.to_string())?;
                        }
                        done += n;
                    }
                    Ok((ha, hf))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let (mut ha, mut hf) = (new_histogram(), new_histogram());
    for r in results {
        let (a, f) = r?;
        ha.add(&a).map_err(|e| e.to_string())?;
        hf.add(&f).map_err(|e| e.to_string())?;
    }
    Ok(((pairs * threads as u64) as f64 / secs, ha, hf))
}

fn open_pmgas(path: &Path, bytes: u64) -> Result<ObjectAllocator, String> {
    let _ = std::fs::remove_file(path);
    let id = PoolIdentity {
        cluster_id: ClusterId(1),
        node_id: NodeId(1),
        page_size_bytes: 2 << 20,
    };
    let pool =
        Pool::open(path, Some(bytes), OnBlank::Format(id), Some(id)).map_err(|e| e.to_string())?;
    ObjectAllocator::open(Arc::new(pool), Box::new(LocalPageIds), true).map_err(|e| e.to_string())
}

pub fn run(args: &ObjectsArgs) -> Result<(), String> {
    if std::env::var_os("PMEM_IS_PMEM_FORCE").is_none() {
        // libpmem reads this when it loads: re-run with it set.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let status = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("PMEM_IS_PMEM_FORCE", "1")
            .status()
            .map_err(|e| e.to_string())?;
        return if status.success() {
            Ok(())
        } else {
            Err(format!("benchmark exited with {status}"))
        };
    }
    let clock = CycleClock::calibrate(Duration::from_millis(200));
    let pid = std::process::id();
    let pmgas_path = args.dir.join(format!("pmgas-bench-objects-{pid}.pool"));
    let pmemobj_path = args.dir.join(format!("pmgas-bench-pmemobj-{pid}.pool"));
    if args.json {
        persist_floor(&args.dir, &clock, true)?;
    } else {
        println!(
            "objects: {} alloc+free pairs per thread, batches of {BATCH}, pools of {} MiB in {}, flush: {:?}",
            args.ops,
            args.pool_bytes >> 20,
            args.dir.display(),
            pmgas_node::pmem::flush_insn()
        );
        persist_floor(&args.dir, &clock, false)?;
        println!(
            "{:<9} {:>6} {:>3} | {:>12} | {:>9} {:>9} | {:>9} {:>9}",
            "allocator",
            "bytes",
            "thr",
            "pairs/s",
            "alloc p50",
            "alloc p99",
            "free p50",
            "free p99"
        );
    }
    let mut rows: Vec<Row> = vec![];
    for &size in &args.sizes {
        for &threads in &args.threads {
            // Fresh pools per run, so no run inherits another's fragmentation.
            let pmgas = Pmgas(open_pmgas(&pmgas_path, args.pool_bytes)?);
            let pmemobj = PmemObj::create(&pmemobj_path, args.pool_bytes)?;
            let subjects: [(&'static str, &dyn Subject); 3] = [
                ("pmgas", &pmgas),
                ("pmemobj", &pmemobj),
                ("malloc", &Malloc),
            ];
            for (name, subject) in subjects {
                let (rate, ha, hf) = run_subject(subject, &clock, size, threads, args.ops)?;
                let row = Row {
                    allocator: name,
                    size_bytes: size,
                    threads,
                    pairs_per_sec: rate,
                    alloc_p50_ns: ha.value_at_quantile(0.5),
                    alloc_p99_ns: ha.value_at_quantile(0.99),
                    free_p50_ns: hf.value_at_quantile(0.5),
                    free_p99_ns: hf.value_at_quantile(0.99),
                };
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string(&row).map_err(|e| e.to_string())?
                    );
                } else {
                    println!(
                        "{:<9} {:>6} {:>3} | {:>12.0} | {:>6} ns {:>6} ns | {:>6} ns {:>6} ns",
                        row.allocator,
                        size,
                        threads,
                        rate,
                        row.alloc_p50_ns,
                        row.alloc_p99_ns,
                        row.free_p50_ns,
                        row.free_p99_ns
                    );
                }
                rows.push(row);
            }
        }
    }
    let _ = std::fs::remove_file(&pmgas_path);
    let _ = std::fs::remove_file(&pmemobj_path);
    if !args.json {
        print_ratios(&rows, args);
    }
    if args.rebuild {
        rebuild(&pmgas_path, args.pool_bytes, args.json)?;
        let _ = std::fs::remove_file(&pmgas_path);
    }
    Ok(())
}

fn print_ratios(rows: &[Row], args: &ObjectsArgs) {
    let rate = |a: &str, size: u64, t: usize| {
        rows.iter()
            .find(|r| r.allocator == a && r.size_bytes == size && r.threads == t)
            .map(|r| r.pairs_per_sec)
    };
    println!("ratios (throughput): pmgas/pmemobj, pmgas/malloc; scaling pmgas 2 threads / 1");
    for &size in &args.sizes {
        for &t in &args.threads {
            if let (Some(p), Some(o), Some(m)) = (
                rate("pmgas", size, t),
                rate("pmemobj", size, t),
                rate("malloc", size, t),
            ) {
                println!(
                    "  {size:>6} B, {t} thr: x{:.2} vs pmemobj, x{:.2} vs malloc",
                    p / o,
                    p / m
                );
            }
        }
        if let (Some(one), Some(two)) = (rate("pmgas", size, 1), rate("pmgas", size, 2)) {
            println!(
                "  {size:>6} B: pmgas scaling 1 -> 2 threads x{:.2}",
                two / one
            );
        }
    }
}

/// Fills a pool with 256-byte objects until it is full, then times reopening it.
fn rebuild(path: &Path, bytes: u64, json: bool) -> Result<(), String> {
    let alloc = open_pmgas(path, bytes)?;
    let mut tc = alloc.thread_cache();
    let mut n = 0u64;
    while tc.alloc(256).is_ok() {
        n += 1;
    }
    drop(tc);
    drop(alloc);
    let start = Instant::now();
    let id = PoolIdentity {
        cluster_id: ClusterId(1),
        node_id: NodeId(1),
        page_size_bytes: 2 << 20,
    };
    let pool = Pool::open(path, None, OnBlank::Refuse, Some(id)).map_err(|e| e.to_string())?;
    let alloc = ObjectAllocator::open(Arc::new(pool), Box::new(LocalPageIds), false)
        .map_err(|e| e.to_string())?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let stats = alloc.stats();
    if stats.allocated_objects != n {
        return Err(format!(
            "rebuild found {} objects, {n} were allocated",
            stats.allocated_objects
        ));
    }
    if json {
        println!(
            r#"{{"rebuild_ms":{ms:.1},"pool_bytes":{bytes},"objects":{n},"slabs":{}}}"#,
            stats.slabs
        );
    } else {
        println!(
            "rebuild: reopening a full {} MiB pool ({n} objects of 256 B in {} slabs) took {ms:.1} ms",
            bytes >> 20,
            stats.slabs
        );
    }
    Ok(())
}

/// The cost of the smallest durable update (an 8-byte atomic OR, its line written back, a
/// fence): the floor under every pmgas allocation and free, and under each of the several
/// persists a libpmemobj allocation makes.
fn persist_floor(dir: &Path, clock: &CycleClock, json: bool) -> Result<(), String> {
    let path = dir.join(format!("pmgas-bench-floor-{}", std::process::id()));
    let region = pmgas_node::MappedRegion::open(&path, Some(1 << 20)).map_err(|e| e.to_string())?;
    let pmem = pmgas_node::pmem::Pmem::new(region);
    let mut h = new_histogram();
    for i in 0..200_000u64 {
        let c0 = cycles();
        pmem.update_bits("bench floor", (i % 64) * 64, 1 << (i % 64), i % 2 == 0);
        h.record(clock.ns_between(c0, cycles()).max(1))
            .map_err(|e| e.to_string())?;
    }
    let _ = std::fs::remove_file(&path);
    if json {
        println!(
            r#"{{"persist_floor_p50_ns":{},"persist_floor_p99_ns":{}}}"#,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99)
        );
    } else {
        println!(
            "persist floor (8-byte atomic update + {:?} + sfence): p50 {} ns, p99 {} ns",
            pmgas_node::pmem::flush_insn(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99)
        );
    }
    Ok(())
}
