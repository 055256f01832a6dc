//! The takeover part of `pmgas-bench recovery`: three real monitors (one active, two
//! standbys) and data nodes on the rig; the active monitor is killed (-9) again and again,
//! and each time this measures, from the kill, when a standby was elected, when it served
//! (GAT reloaded, listener bound, announced in ZooKeeper), and how long each node's
//! reconciliation with it took and when the last node was reconciled. The killed monitor
//! comes back as a standby before the next round.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub struct TakeoverConfig<'a> {
    pub zk: &'a str,
    pub listen_ip: &'a str,
    pub node_hosts: &'a [String],
    pub trials: usize,
    pub session_timeout_ms: u64,
}

fn unix_ms() -> u64 {
    pmgas_verbs::fault::unix_ms() as u64
}

/// The `unix_ms=` fields of the lines of `log` containing `tag`, in order.
fn stamps(log: &Path, tag: &str) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(tag))
        .filter_map(|l| {
            let v = l.split("unix_ms=").nth(1)?;
            v.trim_end_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `line` without ANSI colour sequences (tracing colours its fields).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `ms="…"` values of the monitor's "node reconciled" lines.
fn reconciliations(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("node reconciled"))
        .filter_map(|l| {
            plain(l)
                .split("ms=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

struct Procs {
    children: Vec<Child>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(bin)
        .args(args)
        // PMGAS_TAKEOVER_LOG (e.g. pmgas_node=debug) to see a rejoin step by step.
        .env(
            "RUST_LOG",
            std::env::var("PMGAS_TAKEOVER_LOG")
                .unwrap_or_else(|_| "pmgas_monitor=info,pmgas_node=info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))
}

fn quantiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {} ms  p99 {} ms  max {} ms  (n={})",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max(),
        h.len()
    )
}

pub fn run(c: &TakeoverConfig<'_>) -> Result<serde_json::Value, String> {
    let bin_dir = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("no binary directory")?;
    let monitor_bin = bin_dir.join("pmgas-monitor");
    let node_bin = bin_dir.join("pmgas-node");
    let dir = std::env::temp_dir().join(format!("pmgas-takeover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cluster = format!("takeover{}", std::process::id());
    let monitor_args = |m: usize| -> Vec<String> {
        [
            "serve",
            "--zk",
            c.zk,
            "--cluster",
            &cluster,
            "--cluster-id",
            "9",
            "--page-size",
            "65536",
            "--session-timeout-ms",
            &c.session_timeout_ms.to_string(),
            "--listen",
            &format!("{}:{}", c.listen_ip, 7100 + m),
        ]
        .map(String::from)
        .to_vec()
    };
    let mlog = |m: usize| dir.join(format!("monitor{m}.log"));
    let mut monitors = Procs { children: vec![] };
    for m in 0..3 {
        monitors
            .children
            .push(spawn(&monitor_bin, &monitor_args(m), &mlog(m))?);
        let tag = if m == 0 {
            "MONITOR READY"
        } else {
            "MONITOR STANDBY"
        };
        wait_for(&format!("monitor {m}"), Duration::from_secs(60), || {
            std::fs::read_to_string(mlog(m)).is_ok_and(|s| s.contains(tag))
        })?;
    }
    let mut nodes = Procs { children: vec![] };
    let pools: Vec<PathBuf> = (0..c.node_hosts.len())
        .map(|i| PathBuf::from(format!("/dev/shm/pmgas-{cluster}-node{i}")))
        .collect();
    for (i, host) in c.node_hosts.iter().enumerate() {
        let args: Vec<String> = [
            "serve",
            "--pm",
            &pools[i].to_string_lossy(),
            "--size-bytes",
            &(64u64 << 20).to_string(),
            "--cluster-id",
            "9",
            "--node-id",
            &(i + 1).to_string(),
            "--page-size",
            "65536",
            "--zk",
            c.zk,
            "--cluster",
            &cluster,
            "--bind",
            host,
        ]
        .map(String::from)
        .to_vec();
        let log = dir.join(format!("node{i}.log"));
        nodes.children.push(spawn(&node_bin, &args, &log)?);
        wait_for(&format!("node {}", i + 1), Duration::from_secs(60), || {
            std::fs::read_to_string(&log).is_ok_and(|s| s.contains("NODE READY"))
        })?;
    }
    let mut elected = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut serving = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut all_reconciled = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut per_node = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut leader = 0;
    for trial in 0..c.trials {
        let ready_before: Vec<usize> = (0..3)
            .map(|m| stamps(&mlog(m), "MONITOR READY").len())
            .collect();
        let reconciled_before: Vec<usize> =
            (0..3).map(|m| reconciliations(&mlog(m)).len()).collect();
        let killed_at = unix_ms();
        let _ = monitors.children[leader].kill();
        let _ = monitors.children[leader].wait();
        let mut next = None;
        wait_for("a standby to take over", Duration::from_secs(30), || {
            next = (0..3).find(|&m| {
                m != leader && stamps(&mlog(m), "MONITOR READY").len() > ready_before[m]
            });
            next.is_some()
        })?;
        let new = next.ok_or("no new leader")?;
        let ready = *stamps(&mlog(new), "MONITOR READY")
            .last()
            .ok_or("no READY")?;
        let won = *stamps(&mlog(new), "MONITOR ELECTED")
            .last()
            .ok_or("no ELECTED")?;
        let n = c.node_hosts.len();
        wait_for("every node to reconcile", Duration::from_secs(30), || {
            reconciliations(&mlog(new)).len() >= reconciled_before[new] + n
        })?;
        let done = unix_ms();
        let times = reconciliations(&mlog(new));
        for t in &times[reconciled_before[new]..] {
            per_node
                .record(t.round() as u64)
                .map_err(|e| e.to_string())?;
        }
        elected
            .record(won.saturating_sub(killed_at))
            .map_err(|e| e.to_string())?;
        serving
            .record(ready.saturating_sub(killed_at))
            .map_err(|e| e.to_string())?;
        all_reconciled
            .record(done.saturating_sub(killed_at))
            .map_err(|e| e.to_string())?;
        println!(
            "takeover {trial}: monitor {leader} killed; monitor {new} elected after {} ms, serving after {} ms, {n} nodes reconciled after {} ms",
            won.saturating_sub(killed_at),
            ready.saturating_sub(killed_at),
            done.saturating_sub(killed_at)
        );
        // The killed monitor comes back as a standby.
        let standbys_before = stamps(&mlog(leader), "MONITOR STANDBY").len();
        monitors.children[leader] = spawn(&monitor_bin, &monitor_args(leader), &mlog(leader))?;
        let back = leader;
        wait_for(
            "the killed monitor to stand by again",
            Duration::from_secs(60),
            || {
                std::fs::read_to_string(mlog(back))
                    .is_ok_and(|s| s.matches("MONITOR STANDBY").count() > standbys_before)
            },
        )?;
        leader = new;
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(nodes);
    if std::env::var_os("PMGAS_TAKEOVER_SHOW_LOGS").is_some() {
        for f in ["node0.log", "monitor1.log"] {
            println!("--- {f}");
            for l in std::fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                .lines()
            {
                println!("{}", plain(l));
            }
        }
    }
    for p in &pools {
        let _ = std::fs::remove_file(p);
    }
    println!(
        "takeover after kill -9 of the active monitor (session timeout {} ms, ZooKeeper tickTime 200 ms):",
        c.session_timeout_ms
    );
    println!("  standby elected:      {}", quantiles(&elected));
    println!("  standby serving:      {}", quantiles(&serving));
    println!("  all nodes reconciled: {}", quantiles(&all_reconciled));
    println!(
        "  reconciliation per node (monitor side): {}",
        quantiles(&per_node)
    );
    Ok(serde_json::json!({
        "session_timeout_ms": c.session_timeout_ms,
        "elected_ms_p50": elected.value_at_quantile(0.5),
        "serving_ms_p50": serving.value_at_quantile(0.5),
        "serving_ms_max": serving.max(),
        "all_reconciled_ms_p50": all_reconciled.value_at_quantile(0.5),
        "reconcile_per_node_ms_p50": per_node.value_at_quantile(0.5),
        "reconcile_per_node_ms_max": per_node.max(),
    }))
}
