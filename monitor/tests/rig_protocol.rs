//! Malformed and stale messages against the live processes, on the rig: the real monitor
//! (with a real ZooKeeper) and a real data node each get garbage, truncated frames,
//! requests out of order, wrong clusters, duplicate ids, stale epochs and forged commits
//! from a hand-driven peer over rdma_cm; each is refused with the right error code, and
//! afterwards the metadata (gat-dump) and the node's ART (art-dump) show no side effect
//! and the processes still serve.
//! Built only with the `rig` feature; without the rig it fails.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pmgas_layout::wire::{Body, ErrorCode, Join, Message, Replica};
use pmgas_layout::{ClusterId, Epoch, NodeId, PageId, PageIndex};
use pmgas_verbs::msg::{Endpoint, Incoming, MsgConfig};
use pmgas_verbs::{
    Access, AlignedBuf, ConnectionConfig, Connector, Listener, Opcode, ProtectionDomain,
    RemoteRegion,
};

const CLUSTER_ID: u64 = 7;
const PAGE: u64 = 65536;

fn hosts() -> Vec<IpAddr> {
    let hosts = std::env::var("PMGAS_HOSTS").unwrap_or_default();
    let hosts: Vec<IpAddr> = hosts
        .split_whitespace()
        .filter_map(|h| h.parse().ok())
        .collect();
    assert!(
        hosts.len() >= 4,
        "the rig must provide 4 simulated hosts (PMGAS_HOSTS={hosts:?}); run through scripts/test.sh"
    );
    hosts
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion; its stdout, or a failed test naming what failed.
fn output_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn zookeeper(port: u16) -> String {
    let dir = format!("/tmp/pmgas-zk-proto-{}", std::process::id());
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("scripts/zookeeper.sh"))
        .args(["start", "--port", &port.to_string(), "--dir", &dir])
        .args(["--stop-with", &std::process::id().to_string()]);
    output_of(&mut cmd, "starting ZooKeeper").trim().to_owned()
}

fn gat_dump(zk: &str, cluster: &str) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(bin("pmgas-monitor"));
    cmd.args(["gat-dump", "--zk", zk, "--cluster", cluster, "--json"]);
    output_of(&mut cmd, "gat-dump")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn connect(from: IpAddr, to: SocketAddr) -> Endpoint {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = Connector::new(Some(from), to).resolve().and_then(|route| {
            let pd = ProtectionDomain::new(route.context())?;
            let conn = route.connect(&pd, &ConnectionConfig::default(), &[])?;
            Endpoint::new(conn, MsgConfig::default())
        });
        match attempt {
            Ok(ep) => return ep,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect to {to}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot connect to {to}: {e}"),
        }
    }
}

fn ask(ep: &mut Endpoint, payload: &[u8]) -> Message {
    let reply = ep
        .call(payload, Duration::from_secs(10))
        .expect("the peer answers");
    Message::decode(&reply).expect("a well-formed answer")
}

fn expect_error(reply: &Message, want: ErrorCode, what: &str) {
    match &reply.body {
        Body::Error { code, detail } => {
            assert_eq!(*code, want, "{what}: {detail}");
            eprintln!("{what}: refused with {code:?} ({detail})");
        }
        other => panic!("{what}: expected {want:?}, got {other:?}"),
    }
}

/// Waits for one request from the peer and answers it with `answer(body)`, as `sender` in
/// `epoch`; returns the request's body.
fn serve_one(
    ep: &mut Endpoint,
    epoch: Epoch,
    sender: NodeId,
    answer: impl FnOnce(Body) -> Body,
) -> Body {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no request from the peer");
        if let Some(Incoming::Request {
            request_id,
            payload,
        }) = ep.poll().expect("poll")
        {
            let m = Message::decode(&payload).expect("a well-formed request");
            let body = m.body.clone();
            let reply = Message::new(epoch, sender, 0, answer(m.body));
            ep.respond(request_id, &reply.encode()).expect("respond");
            return body;
        }
    }
}

fn join_msg(node: u32, cluster: u64, page: u64) -> Vec<u8> {
    let j = Join {
        cluster_id: ClusterId(cluster),
        page_size_bytes: page,
        page_count: 16,
        free_pages: 16,
        region_addr: 0x1000,
        region_len: 16 * page,
        rkey: 1,
        cm_ip: [10, 0, 0, 1],
        cm_port: 0,
        // No ART exported: the monitor skips its one-sided cross-check.
        art_rkey: 0,
    };
    Message::new(Epoch(0), NodeId(node), 1, Body::Join(j)).encode()
}

#[test]
fn the_monitor_refuses_bad_messages_without_side_effects() {
    let h = hosts();
    let zk = zookeeper(2190);
    let cluster = format!("proto{}", std::process::id());
    let listen = SocketAddr::new(h[3], 7100);
    let _monitor = Proc(
        Command::new(bin("pmgas-monitor"))
            .args(["serve", "--zk", &zk, "--cluster", &cluster])
            .args(["--cluster-id", &CLUSTER_ID.to_string()])
            // A 2 s session, as scripts/cluster.sh uses: with the 600 ms default the
            // client's per-request timeout is 240 ms, which a ZooKeeper just started
            // under TCG misses for long enough to fail this test's 60 s connect deadline.
            .args(["--session-timeout-ms", "2000"])
            .args(["--page-size", &PAGE.to_string(), "--listen"])
            .arg(listen.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the monitor"),
    );
    let mut ep = connect(h[0], listen);

    let reply = ask(&mut ep, b"not a pmgas message at all");
    expect_error(&reply, ErrorCode::Malformed, "garbage");
    let mut truncated = join_msg(1, CLUSTER_ID, PAGE);
    truncated.truncate(40);
    expect_error(
        &ask(&mut ep, &truncated),
        ErrorCode::Malformed,
        "truncated Join",
    );
    let alloc = |epoch: u64, node: u32, backups: u8| {
        Message::new(
            Epoch(epoch),
            NodeId(node),
            9,
            Body::AllocPage {
                primary_page: PageIndex(0),
                backups_wanted: backups,
            },
        )
        .encode()
    };
    expect_error(
        &ask(&mut ep, &alloc(0, 1, 0)),
        ErrorCode::Malformed,
        "AllocPage before Join",
    );
    expect_error(
        &ask(&mut ep, &join_msg(1, CLUSTER_ID + 1, PAGE)),
        ErrorCode::WrongCluster,
        "Join of another cluster",
    );
    expect_error(
        &ask(&mut ep, &join_msg(1, CLUSTER_ID, PAGE * 2)),
        ErrorCode::BadGeometry,
        "Join with another page size",
    );
    let ack = ask(&mut ep, &join_msg(1, CLUSTER_ID, PAGE));
    assert!(matches!(ack.body, Body::JoinAck { .. }), "{ack:?}");
    let epoch = ack.header.epoch.0;
    // Next the monitor reconciles the new node: an empty GAT has nothing for it.
    let reconcile = serve_one(&mut ep, Epoch(epoch), NodeId(1), |body| {
        assert!(
            matches!(body, Body::Reconcile { last: true, ref entries } if entries.is_empty()),
            "{body:?}"
        );
        Body::Reconciled {
            committed: 0,
            freed: 0,
            unknown_allocated: 0,
            conflicting: 0,
        }
    });
    eprintln!("reconcile request after the join: {reconcile:?}");

    // A second connection claiming the same node id.
    let mut twin = connect(h[1], listen);
    expect_error(
        &ask(&mut twin, &join_msg(1, CLUSTER_ID, PAGE)),
        ErrorCode::DuplicateNode,
        "duplicate node id",
    );
    // Speaking as a node it is not.
    expect_error(
        &ask(&mut ep, &alloc(epoch, 2, 0)),
        ErrorCode::Malformed,
        "wrong sender",
    );
    expect_error(
        &ask(&mut ep, &alloc(epoch + 1, 1, 0)),
        ErrorCode::StaleEpoch,
        "stale epoch",
    );
    expect_error(
        &ask(&mut ep, &alloc(epoch, 1, 2)),
        ErrorCode::NotEnoughNodes,
        "2 backups with no other node",
    );
    expect_error(
        &ask(&mut ep, &alloc(epoch, 1, 200)),
        ErrorCode::Malformed,
        "200 backups",
    );
    let lookup = Message::new(
        Epoch(epoch),
        NodeId(1),
        10,
        Body::MappingLookup {
            page_id: PageId(12345),
        },
    );
    expect_error(
        &ask(&mut ep, &lookup.encode()),
        ErrorCode::UnknownPage,
        "unknown page",
    );
    let not_a_request = Message::new(Epoch(epoch), NodeId(1), 11, Body::AbortAck { txn_id: 1 });
    expect_error(
        &ask(&mut ep, &not_a_request.encode()),
        ErrorCode::Malformed,
        "a response kind sent as a request",
    );

    // No side effects: no mapping, only the node that really joined is live, and the
    // monitor still serves (a good allocation with no backups works).
    let gat = gat_dump(&zk, &cluster);
    assert_eq!(gat[0]["nodes"], serde_json::json!(["node1"]));
    assert_eq!(gat.len(), 1, "no mapping was created: {gat:?}");
    let ok = ask(&mut ep, &alloc(epoch, 1, 0));
    match ok.body {
        Body::Commit {
            page_id, replicas, ..
        } => {
            assert_eq!(
                replicas,
                vec![Replica {
                    node: NodeId(1),
                    page: PageIndex(0)
                }]
            );
            assert_eq!(gat_dump(&zk, &cluster).len(), 2);
            eprintln!("after all that, page {} was allocated normally", page_id.0);
        }
        other => panic!("the monitor stopped serving: {other:?}"),
    }
}

#[test]
fn a_node_refuses_bad_monitor_requests_without_touching_its_pool() {
    let h = hosts();
    // This test plays the monitor; the real node connects to it.
    let listen = SocketAddr::new(h[3], 7200);
    let listener = Listener::bind(listen, 4).expect("listen");
    let pd = ProtectionDomain::new(listener.context()).expect("pd");
    let pm = format!("/dev/shm/pmgas-proto-node-{}", std::process::id());
    let _ = std::fs::remove_file(&pm);
    let node = Proc(
        Command::new(bin("pmgas-node"))
            .args([
                "serve",
                "--pm",
                &pm,
                "--size-bytes",
                &(64 * PAGE).to_string(),
            ])
            .args(["--cluster-id", &CLUSTER_ID.to_string(), "--node-id", "3"])
            .args(["--page-size", &PAGE.to_string(), "--bind"])
            .arg(h[0].to_string())
            .args(["--monitor", &listen.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the node"),
    );
    let req = listener
        .next_request(Duration::from_secs(60))
        .expect("listen")
        .expect("the node connects");
    let mut ep = req
        .accept_endpoint(&pd, &ConnectionConfig::default(), &[], MsgConfig::default())
        .expect("accept");
    const EPOCH: u64 = 5;
    let join = serve_one(&mut ep, Epoch(EPOCH), NodeId(u32::MAX), |body| {
        assert!(matches!(body, Body::Join(_)), "expected Join, got {body:?}");
        Body::JoinAck { live_nodes: 1 }
    });
    let Body::Join(joined) = join else {
        unreachable!("checked above")
    };
    assert_eq!(joined.cluster_id, ClusterId(CLUSTER_ID));
    let monitor = NodeId(u32::MAX);
    let msg = |epoch: u64, body: Body| Message::new(Epoch(epoch), monitor, 0, body).encode();
    // The node waits for its reconciliation; a blank pool has nothing to reconcile.
    let none = ask(
        &mut ep,
        &msg(
            EPOCH,
            Body::Reconcile {
                last: true,
                entries: vec![],
            },
        ),
    );
    assert!(
        matches!(
            none.body,
            Body::Reconciled {
                committed: 0,
                freed: 0,
                ..
            }
        ),
        "{none:?}"
    );

    expect_error(
        &ask(&mut ep, b"\x01\x02garbage"),
        ErrorCode::Malformed,
        "garbage",
    );
    expect_error(
        &ask(&mut ep, &msg(EPOCH - 1, Body::Prepare { txn_id: 1 })),
        ErrorCode::StaleEpoch,
        "Prepare from an old epoch",
    );
    expect_error(
        &ask(
            &mut ep,
            &msg(
                EPOCH,
                Body::Commit {
                    txn_id: 2,
                    page_id: PageId(1),
                    replicas: vec![Replica {
                        node: NodeId(3),
                        page: PageIndex(0),
                    }],
                },
            ),
        ),
        ErrorCode::UnknownPage,
        "Commit of a page never prepared",
    );
    let prepared = ask(&mut ep, &msg(EPOCH, Body::Prepare { txn_id: 7 }));
    let Body::Prepared { page, .. } = prepared.body else {
        panic!("a good Prepare failed: {prepared:?}")
    };
    expect_error(
        &ask(
            &mut ep,
            &msg(
                EPOCH,
                Body::Commit {
                    txn_id: 8,
                    page_id: PageId(2),
                    replicas: vec![Replica {
                        node: NodeId(3),
                        page,
                    }],
                },
            ),
        ),
        ErrorCode::UnknownPage,
        "Commit of another transaction's page",
    );
    expect_error(
        &ask(
            &mut ep,
            &msg(
                EPOCH,
                Body::AllocPage {
                    primary_page: PageIndex(0),
                    backups_wanted: 0,
                },
            ),
        ),
        ErrorCode::Malformed,
        "a monitor-bound request sent to a node",
    );
    let aborted = ask(&mut ep, &msg(EPOCH, Body::Abort { txn_id: 7 }));
    assert!(
        matches!(aborted.body, Body::AbortAck { txn_id: 7 }),
        "{aborted:?}"
    );

    // Reconciliation: of two PREALLOCATED pages, the one the GAT lists is committed with
    // the GAT's page id, the other freed. A Reconcile listing a page twice is refused.
    let mut dup = msg(
        EPOCH,
        Body::Reconcile {
            last: true,
            entries: vec![(PageIndex(1), PageId(9)), (PageIndex(2), PageId(9))],
        },
    );
    dup[48..52].copy_from_slice(&1u32.to_le_bytes()); // second entry: page 1 again
    expect_error(
        &ask(&mut ep, &dup),
        ErrorCode::Malformed,
        "a page listed twice",
    );
    let prepare =
        |ep: &mut Endpoint, txn_id| match ask(ep, &msg(EPOCH, Body::Prepare { txn_id })).body {
            Body::Prepared { page, .. } => page,
            other => panic!("prepare {txn_id}: {other:?}"),
        };
    let keep = prepare(&mut ep, 20);
    let drop_page = prepare(&mut ep, 21);
    let rec = ask(
        &mut ep,
        &msg(
            EPOCH,
            Body::Reconcile {
                last: true,
                entries: vec![(keep, PageId(500))],
            },
        ),
    );
    assert_eq!(
        rec.body,
        Body::Reconciled {
            committed: 1,
            freed: 1,
            unknown_allocated: 0,
            conflicting: 0
        }
    );

    // The node exports its header and ART read-only and its pages read/write: a
    // one-sided READ shows the committed page as the monitor's cross-check sees it, a
    // WRITE into a page lands, and a WRITE into the ART is refused by the node's NIC (it
    // breaks the connection, as any remote access error on RC) and changes nothing.
    assert_ne!(joined.art_rkey, 0, "the node exports no ART region");
    let local = pd
        .register(AlignedBuf::zeroed(4096).unwrap(), Access::LOCAL)
        .unwrap();
    let art = RemoteRegion {
        addr: joined.region_addr,
        len: 4096 + 64 * u64::from(joined.page_count),
        rkey: joined.art_rkey,
    };
    let t = Duration::from_secs(5);
    ep.one_sided(Opcode::Read, &local, 0, (&art, 0), 4096, t)
        .expect("READ the header");
    let mut header = [0u8; 4096];
    local.read_at(0, &mut header).unwrap();
    let header = pmgas_layout::PoolHeader::decode(&header[..128]).expect("a pool header");
    let entry_at = header.art_entry_offset(keep).unwrap();
    ep.one_sided(Opcode::Read, &local, 0, (&art, entry_at), 64, t)
        .expect("READ an ART entry");
    let mut entry = [0u8; 64];
    local.read_at(0, &mut entry).unwrap();
    let rec = pmgas_layout::ArtRecord::decode_entry(&entry, keep).unwrap();
    assert_eq!(
        (rec.state, rec.page_id),
        (pmgas_layout::PageState::Allocated, PageId(500))
    );
    let pages = RemoteRegion {
        addr: joined.region_addr,
        len: joined.region_len,
        rkey: joined.rkey,
    };
    let page_at = header.page_offset(keep).unwrap();
    local.write_at(0, b"one-side").unwrap();
    ep.one_sided(Opcode::Write, &local, 0, (&pages, page_at), 8, t)
        .expect("WRITE into a page");
    assert!(
        ep.one_sided(Opcode::Write, &local, 0, (&art, entry_at), 8, t)
            .is_err(),
        "a peer wrote into the node's ART"
    );
    let file = std::fs::read(&pm).unwrap();
    assert_eq!(&file[page_at as usize..page_at as usize + 8], b"one-side");
    assert_eq!(
        &file[entry_at as usize..entry_at as usize + 64],
        &entry,
        "the ART entry changed"
    );

    drop(node);
    drop(ep);
    let mut cmd = Command::new(bin("pmgas-node"));
    cmd.args(["art-dump", "--pm", &pm, "--json"]);
    let text = output_of(&mut cmd, "art-dump");
    let entries: Vec<serde_json::Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "refused requests changed the ART, or reconciliation missed a page: {entries:?}"
    );
    assert_eq!(entries[0]["page_index"], keep.0);
    assert_eq!(entries[0]["state"], "ALLOCATED");
    assert_eq!(entries[0]["page_id"], 500);
    assert_ne!(keep, drop_page);
    std::fs::remove_file(&pm).unwrap();
}
