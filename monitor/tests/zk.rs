//! The GAT store against a real ZooKeeper (Debian's 3.8), started by
//! `scripts/zookeeper.sh` on a port of its own for this test binary, and stopped after.
//! Without ZooKeeper installed the tests fail; they never pass silently.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::Replica;
use pmgas_layout::{NodeId, PageId, PageIndex};
use pmgas_monitor::{GatWriter, Store, StoreError};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/zookeeper.sh")
}

/// One standalone server for the whole test binary (tests use distinct cluster names);
/// the script stops it when this process exits.
fn zk() -> &'static str {
    static ZK: OnceLock<String> = OnceLock::new();
    ZK.get_or_init(|| {
        let port = 24000 + (std::process::id() % 2000) as u16;
        let dir = PathBuf::from(format!("/tmp/pmgas-zk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("bash")
            .arg(script())
            .args([
                "start",
                "--port",
                &port.to_string(),
                "--stop-with",
                &std::process::id().to_string(),
                "--dir",
            ])
            .arg(&dir)
            .output()
            .expect("run scripts/zookeeper.sh");
        assert!(
            out.status.success(),
            "ZooKeeper did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

fn mapping(id: u32, nodes: &[u32]) -> Mapping {
    Mapping {
        page_id: PageId(id),
        replicas: nodes
            .iter()
            .map(|&n| Replica {
                node: NodeId(n),
                page: PageIndex(id % 1000),
            })
            .collect(),
        freed: false,
        revision: 0,
    }
}

async fn page_ids(s: &Store) -> Vec<u32> {
    let gat = s.load_gat().await.unwrap();
    gat.mappings.iter().map(|m| m.page_id.0).collect()
}

async fn store(cluster: &str) -> Store {
    Store::connect(zk(), cluster, Duration::from_secs(4))
        .await
        .expect("connect to ZooKeeper")
}

#[tokio::test]
async fn group_commits_span_chunks_and_reload_exactly() {
    let s = store("reload").await;
    assert_eq!(s.epoch().await.unwrap().0, 0);
    let mut w0 = GatWriter::open(&s, 0).await.unwrap();
    let mut w1 = GatWriter::open(&s, 1).await.unwrap();
    let mut all = vec![];
    let mut id = 1;
    // 5000 mappings in group commits of 1..=64, alternating workers.
    let mut round = 0;
    let mut compactions = 0;
    while all.len() < 5000 {
        let n = 1 + (round * 37) % 64;
        let batch: Vec<Mapping> = (0..n)
            .map(|k| mapping(id + k as u32, &[1, 2 + (k as u32 % 3), 9]))
            .collect();
        id += n as u32;
        let w = if round % 2 == 0 { &mut w0 } else { &mut w1 };
        w.append(&batch).await.unwrap();
        if w.compaction_due() {
            assert!(w.compact().await.unwrap() >= 2);
            compactions += 1;
        }
        all.extend(batch);
        round += 1;
        if round == 40 {
            // Midway, a reader sees exactly what was appended so far.
            assert_eq!(s.load_gat().await.unwrap().mappings.len(), all.len());
        }
    }
    assert!(w0.chunk_seq().is_some() && w1.chunk_seq().is_some());
    assert!(w0.pending_deltas() < 64 && w1.pending_deltas() < 64);
    let loaded = s.load_gat().await.unwrap();
    assert!(compactions >= 2, "5000 mappings of 3 replicas fill chunks");
    assert_eq!(
        loaded.chunks,
        compactions + w0.pending_deltas() + w1.pending_deltas(),
        "each compaction replaces its deltas by one chunk"
    );
    assert_eq!(loaded.mappings.len(), all.len());
    assert_eq!(loaded.max_page_id, id - 1);
    let want: HashSet<_> = all.iter().cloned().collect();
    assert!(loaded.mappings.iter().all(|m| want.contains(m)));
    eprintln!(
        "{} mappings in {} chunks reloaded",
        loaded.mappings.len(),
        loaded.chunks
    );

    // A writer reopened on its series resumes after the last stored mapping.
    drop(w0);
    let mut again = GatWriter::open(&s, 0).await.unwrap();
    again.append(&[mapping(id, &[4])]).await.unwrap();
    assert_eq!(s.load_gat().await.unwrap().mappings.len(), all.len() + 1);
}

#[tokio::test]
async fn a_second_writer_on_one_series_is_fenced() {
    let s = store("fence").await;
    let mut a = GatWriter::open(&s, 0).await.unwrap();
    a.append(&[mapping(1, &[1, 2])]).await.unwrap();
    a.append(&[mapping(4, &[1, 2])]).await.unwrap();
    // Opening the series again (a new active monitor) fences `a` off.
    let mut b = GatWriter::open(&s, 0).await.unwrap();
    b.append(&[mapping(2, &[1, 3])]).await.unwrap();
    assert!(matches!(
        a.compact().await.unwrap_err(),
        StoreError::Fenced { .. }
    ));
    // `a` still believes the old version: its write must not overwrite `b`'s.
    let err = a.append(&[mapping(3, &[2, 3])]).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(page_ids(&s).await, vec![1, 2, 4]);
    // `b` can fold what `a` wrote; nothing is lost or doubled.
    assert_eq!(b.compact().await.unwrap(), 3);
    assert_eq!(page_ids(&s).await, vec![1, 2, 4]);
    assert!(
        !a.resolve(&[mapping(3, &[2, 3])]).await.unwrap(),
        "the fenced batch did not land"
    );
}

#[tokio::test]
async fn a_damaged_chunk_is_reported_not_skipped() {
    let s = store("damaged").await;
    let mut w = GatWriter::open(&s, 0).await.unwrap();
    w.append(&[mapping(1, &[1])]).await.unwrap();
    s.client()
        .set_data("/pmgas/damaged/gat/w0000/d0000000000", b"garbage", None)
        .await
        .unwrap();
    let err = s.load_gat().await.unwrap_err();
    assert!(matches!(err, StoreError::Chunk { .. }), "{err}");
    assert!(err.to_string().contains("d0000000000"), "{err}");
}

#[tokio::test]
async fn a_page_id_in_two_series_is_reported_with_both_znodes() {
    let s = store("twice").await;
    let mut a = GatWriter::open(&s, 0).await.unwrap();
    let mut b = GatWriter::open(&s, 1).await.unwrap();
    a.append(&[mapping(1, &[1]), mapping(2, &[1])])
        .await
        .unwrap();
    b.append(&[mapping(3, &[2]), mapping(2, &[2])])
        .await
        .unwrap();
    let err = s.load_gat().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
    assert!(text.contains("page id 2 stored twice"), "{text}");
    assert!(text.contains("w0000/") && text.contains("w0001/"), "{text}");
}

#[tokio::test]
async fn a_tombstone_in_another_series_replaces_the_mapping_and_survives_compaction() {
    let s = store("tombstones").await;
    let mut a = GatWriter::open(&s, 0).await.unwrap();
    let mut b = GatWriter::open(&s, 1).await.unwrap();
    a.append(&[mapping(1, &[1, 2]), mapping(2, &[2])])
        .await
        .unwrap();
    b.append(&[mapping(1, &[1, 2]).tombstone()]).await.unwrap();
    let gat = s.load_gat().await.unwrap();
    assert_eq!(
        gat.mappings,
        vec![mapping(1, &[1, 2]).tombstone(), mapping(2, &[2])]
    );
    // The largest id stays counted: a freed id is never handed out again.
    b.append(&[mapping(3, &[1])]).await.unwrap();
    b.append(&[mapping(3, &[1]).tombstone()]).await.unwrap();
    assert_eq!(
        b.compact().await.unwrap(),
        3,
        "live and tombstone in one chunk"
    );
    let gat = s.load_gat().await.unwrap();
    assert_eq!(gat.max_page_id, 3);
    assert_eq!(
        gat.mappings
            .iter()
            .map(|m| (m.page_id.0, m.freed))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, false), (3, true)]
    );
    // Freed twice is corruption, not a silent merge.
    a.append(&[
        mapping(2, &[2]).tombstone(),
        mapping(1, &[1, 2]).tombstone(),
    ])
    .await
    .unwrap();
    let err = s.load_gat().await.unwrap_err();
    assert!(err.to_string().contains("page id 1 stored twice"), "{err}");
}

#[test]
fn gat_dump_prints_json_lines() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = store("dump").await;
        let mut w = GatWriter::open(&s, 3).await.unwrap();
        w.append(&[mapping(7, &[2, 1]), mapping(8, &[3])])
            .await
            .unwrap();
    });
    let out = Command::new(env!("CARGO_BIN_EXE_pmgas-monitor"))
        .args(["gat-dump", "--zk", zk(), "--cluster", "dump", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["epoch"], 0);
    assert_eq!(lines[1]["page_id"], 7);
    assert_eq!(lines[1]["replicas"][0]["node"], 2, "primary first");
    assert_eq!(lines[1]["replicas"][1]["page_index"], 7);
    assert_eq!(lines[2]["page_id"], 8);
    assert_eq!(lines.len(), 3);
    // A reader that stops early (`gat-dump | head`): the pipe is closed long before the
    // dump connects to ZooKeeper, so every write fails with EPIPE; that is no failure.
    let mut early = Command::new(env!("CARGO_BIN_EXE_pmgas-monitor"))
        .args(["gat-dump", "--zk", zk(), "--cluster", "dump"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(early.stdout.take());
    let early = early.wait_with_output().unwrap();
    assert!(
        early.status.success(),
        "a closed pipe failed the dump: {:?} {}",
        early.status,
        String::from_utf8_lossy(&early.stderr)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_pmgas-monitor"))
        .args(["gat-dump", "--zk", "127.0.0.1:1", "--cluster", "x"])
        .output()
        .unwrap();
    assert!(
        !bad.status.success(),
        "an unreachable ZooKeeper is an error"
    );
}

#[tokio::test]
async fn one_monitor_leads_standbys_wait_and_a_deposed_one_writes_nothing() {
    let s = store("leader").await;
    assert_eq!(s.leader().await.unwrap(), None);
    s.campaign("10.0.0.4:7000").await.unwrap();
    s.publish_leader("10.0.0.4:7000").await.unwrap();
    assert_eq!(s.leader().await.unwrap().as_deref(), Some("10.0.0.4:7000"));
    // A standby waits in the election while the leader's session lives, and cannot
    // announce itself meanwhile.
    let other = std::sync::Arc::new(store("leader").await);
    let standby = {
        let o = other.clone();
        tokio::spawn(async move { o.campaign("10.0.0.5:7000").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !standby.is_finished(),
        "a standby was elected beside a live leader"
    );
    assert!(matches!(
        other.publish_leader("10.0.0.5:7000").await,
        Err(StoreError::Fenced { .. })
    ));
    s.epoch().await.unwrap();
    s.register_node(2, "joined").await.unwrap();
    s.register_node(1, "joined").await.unwrap();
    s.register_node(1, "joined again").await.unwrap();
    assert_eq!(other.live_nodes().await.unwrap(), vec!["node1", "node2"]);
    s.unregister_node(2).await.unwrap();
    s.unregister_node(2).await.unwrap();
    assert_eq!(other.live_nodes().await.unwrap(), vec!["node1"]);
    // Once the epoch moves on under it, a join is refused and not recorded: the live list
    // and the epoch change together or not at all.
    other
        .client()
        .set_data("/pmgas/leader/epoch", b"1", None)
        .await
        .unwrap();
    assert!(matches!(
        s.register_node(3, "joined").await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(other.live_nodes().await.unwrap(), vec!["node1"]);
    assert_eq!(s.epoch().await.unwrap().0, 1);
    s.register_node(3, "joined").await.unwrap();
    assert_eq!(other.live_nodes().await.unwrap(), vec!["node1", "node3"]);
    let mut writer = GatWriter::open(&s, 0).await.unwrap();
    writer.append(&[mapping(1, &[1])]).await.unwrap();
    // The leader's election znode vanishes (as when its session expires while the
    // process still runs): the standby is elected, and the old leader's every write is
    // refused as fenced and changes nothing.
    let lock = s.election_path().unwrap().to_owned();
    other.client().delete(&lock, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("the standby was not elected")
        .unwrap()
        .unwrap();
    assert!(matches!(
        writer.append(&[mapping(2, &[1])]).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        s.register_node(4, "joined").await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        s.unregister_node(3).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        s.publish_leader("10.0.0.4:7000").await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(other.live_nodes().await.unwrap(), vec!["node1", "node3"]);
    let gat = other.load_gat().await.unwrap();
    assert_eq!(gat.mappings.len(), 1, "a deposed leader's write landed");
    // The new leader replaces the old announcement (whose session still lives).
    other.publish_leader("10.0.0.5:7000").await.unwrap();
    assert_eq!(
        other.leader().await.unwrap().as_deref(),
        Some("10.0.0.5:7000")
    );
    other.epoch().await.unwrap();
    other.register_node(4, "joined").await.unwrap();
    // The announcement is ephemeral: it goes with the monitor's session.
    drop(other);
    let mut gone = false;
    for _ in 0..100 {
        if s.leader().await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the leader znode outlived its monitor's session");
}

#[tokio::test]
async fn a_node_declared_dead_leaves_the_view_with_the_epoch_moved_on() {
    use pmgas_layout::Epoch;
    use pmgas_layout::gat::DeadNode;
    let s = store("dead").await;
    s.campaign("10.0.0.4:7000").await.unwrap();
    assert_eq!(s.epoch().await.unwrap(), Epoch(0));
    for n in [1, 2, 3] {
        s.register_node(n, "joined").await.unwrap();
    }
    let mut writer = GatWriter::open(&s, 0).await.unwrap();
    writer
        .append(&[
            mapping(1, &[3, 1, 2]),
            mapping(2, &[1, 3]),
            mapping(3, &[3]),
        ])
        .await
        .unwrap();
    let record = DeadNode {
        epoch: Epoch(1),
        max_page_id: 3,
    };
    s.declare_dead(NodeId(3), record).await.unwrap();
    // Asked again (as after an unknown outcome): already done, nothing moves twice.
    s.declare_dead(NodeId(3), record).await.unwrap();
    assert_eq!(s.epoch().await.unwrap(), Epoch(1));
    assert_eq!(s.live_nodes().await.unwrap(), vec!["node1", "node2"]);
    // A page allocated after the declaration keeps node 3 (it may rejoin).
    writer.append(&[mapping(4, &[3, 2])]).await.unwrap();
    let gat = s.load_gat().await.unwrap();
    let view: Vec<(u32, Vec<u32>)> = gat
        .mappings
        .iter()
        .map(|m| (m.page_id.0, m.replicas.iter().map(|r| r.node.0).collect()))
        .collect();
    assert_eq!(
        view,
        [(1, vec![1, 2]), (2, vec![1]), (3, vec![]), (4, vec![3, 2])],
        "primaries promoted in order, a page with no replica left kept (its id is never reused)"
    );
    assert_eq!(gat.dropped_replicas, 3);
    assert_eq!(gat.max_page_id, 4);
    assert_eq!(s.dead_nodes().await.unwrap().0[&NodeId(3)], record);
    // Only the elected monitor declares, and only in the epoch it read: a standby is
    // refused, and so is the leader once the epoch moved on under it.
    let late = store("dead").await;
    late.epoch().await.unwrap();
    let next = DeadNode {
        epoch: Epoch(2),
        max_page_id: 4,
    };
    assert!(matches!(
        late.declare_dead(NodeId(2), next).await,
        Err(StoreError::Fenced { .. })
    ));
    late.client()
        .set_data("/pmgas/dead/epoch", b"2", None)
        .await
        .unwrap();
    assert!(matches!(
        s.declare_dead(
            NodeId(2),
            DeadNode {
                epoch: Epoch(3),
                ..next
            }
        )
        .await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(s.live_nodes().await.unwrap(), vec!["node1", "node2"]);
    assert!(!s.dead_nodes().await.unwrap().0.contains_key(&NodeId(2)));
}
