//! RDMA integration tests. They run only on the rig (`scripts/rig.sh`): two or more
//! simulated hosts, each with its own rxe device, and emulated devdax PM. Every test uses
//! two processes on two different hosts connected by rdma_cm. Without the rig they fail;
//! they never pass silently.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use pmgas_verbs::peer::{
    MODE_ECHO, MODE_MSG, PATTERN_BYTES, PeerProcess, mode_private_data, pattern_byte,
};
use pmgas_verbs::{
    Access, AlignedBuf, Connection, ConnectionConfig, Connector, Context, Endpoint, Error, GidType,
    Incoming, MemoryRegion, MsgConfig, Opcode, ProtectionDomain, RemoteRegion, WorkRequest,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn rig_hosts() -> Vec<IpAddr> {
    let hosts = std::env::var("PMGAS_HOSTS").unwrap_or_default();
    let hosts: Vec<IpAddr> = hosts
        .split_whitespace()
        .filter_map(|h| h.parse().ok())
        .collect();
    assert!(
        hosts.len() >= 2,
        "the RDMA rig is not up: PMGAS_HOSTS={:?} names fewer than 2 simulated hosts. These tests \
         need real rxe devices; run them through scripts/rig.sh (or scripts/test.sh)",
        std::env::var("PMGAS_HOSTS").ok()
    );
    hosts
}

/// Starts a peer process on another simulated host; it is killed on drop.
fn start_peer(host: IpAddr, port: u16, region: &str) -> PeerProcess {
    let addr = SocketAddr::new(host, port);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pmgas-verbs-peer"));
    cmd.args(["--bind", &addr.to_string(), "--region", region]);
    PeerProcess::spawn(cmd, addr, Duration::from_secs(60)).expect("start peer")
}

struct Client {
    conn: Connection,
    remote: RemoteRegion,
    local: MemoryRegion,
}

fn connect(src: IpAddr, peer: &PeerProcess, mode: u8) -> Client {
    let route = Connector::new(Some(src), peer.addr)
        .resolve()
        .expect("resolve route");
    let pd = ProtectionDomain::new(route.context()).expect("alloc pd");
    let local = pd
        .register(AlignedBuf::zeroed(1 << 20).unwrap(), Access::ALL_REMOTE)
        .expect("reg mr");
    let conn = route
        .connect(&pd, &ConnectionConfig::default(), &mode_private_data(mode))
        .expect("connect");
    let remote =
        RemoteRegion::from_bytes(conn.remote_private_data()).expect("region in private data");
    assert_ne!(
        conn.device_name(),
        peer.device,
        "client and peer must be on different simulated hosts' devices"
    );
    eprintln!(
        "connected {} ({src}) -> {} ({})",
        conn.device_name(),
        peer.device,
        peer.addr
    );
    Client {
        conn,
        remote,
        local,
    }
}

impl Client {
    fn op(
        &mut self,
        opcode: Opcode,
        offset: usize,
        len: usize,
        remote_offset: u64,
    ) -> pmgas_verbs::Result<()> {
        self.conn
            .execute(
                opcode,
                &self.local,
                offset,
                len,
                Some((&self.remote, remote_offset)),
                TIMEOUT,
            )
            .map(|_| ())
    }

    fn local_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.local.read_at(offset, &mut out).unwrap();
        out
    }

    fn local_u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.local_bytes(offset, 8).try_into().unwrap())
    }
}

#[test]
fn devices_ports_and_roce_v2_gids() {
    let hosts = rig_hosts();
    let devices = std::env::var("PMGAS_DEVICES").expect("PMGAS_DEVICES");
    let devices: Vec<&str> = devices.split_whitespace().collect();
    assert_eq!(devices.len(), hosts.len());
    let present = pmgas_verbs::device_names().unwrap();
    for (dev, ip) in devices.iter().zip(&hosts) {
        assert!(present.iter().any(|p| p == dev), "{dev} not in {present:?}");
        let ctx = Context::open(dev).unwrap();
        let port = ctx.query_port(1).unwrap();
        assert_eq!(port.link_layer, 2, "rxe is Ethernet (RoCE)");
        assert!(port.active_mtu_bytes >= 256);
        let index = ctx.gid_index_for(1, *ip, None).unwrap();
        let table = ctx.gid_table(1).unwrap();
        let entry = table.iter().find(|e| e.index == index).unwrap();
        assert_eq!(entry.gid_type, GidType::RoceV2);
        assert_eq!(entry.ipv4().map(IpAddr::V4), Some(*ip));
        eprintln!(
            "{dev}: {ip} is RoCE v2 GID index {index}; mtu {}",
            port.active_mtu_bytes
        );
        // The override wins, and another host's address has no GID here.
        assert_eq!(ctx.gid_index_for(1, *ip, Some(0)).unwrap(), 0);
        let other = hosts.iter().find(|h| *h != ip).unwrap();
        assert!(matches!(
            ctx.gid_index_for(1, *other, None),
            Err(Error::NoGidForIp { .. })
        ));
    }
    assert!(matches!(
        Context::open("nosuchdev0"),
        Err(Error::NoSuchDevice { .. })
    ));
}

#[test]
fn read_and_write_between_hosts() {
    let hosts = rig_hosts();
    let peer = start_peer(hosts[1], 21001, "anon:1048576");
    let mut c = connect(hosts[0], &peer, MODE_ECHO);
    assert_eq!(c.remote.len, 1 << 20);

    c.op(Opcode::Read, 0, 4096, 0).unwrap();
    let head = c.local_bytes(0, 4096);
    assert!(
        head.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)),
        "head pattern"
    );

    let tail_off = (1u64 << 20) - 8;
    c.op(Opcode::Read, 0, 8, tail_off).unwrap();
    let expect: Vec<u8> = (tail_off..tail_off + 8).map(pattern_byte).collect();
    assert_eq!(c.local_bytes(0, 8), expect);

    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    c.local.write_at(4096, &data).unwrap();
    c.op(Opcode::Write, 4096, data.len(), 200_000).unwrap();
    c.op(Opcode::Read, 16384, data.len(), 200_000).unwrap();
    assert_eq!(c.local_bytes(16384, data.len()), data);

    // Small writes go inline; check one crosses intact.
    c.local.write_at(0, b"inline!!").unwrap();
    c.op(Opcode::Write, 0, 8, 300_000).unwrap();
    c.op(Opcode::Read, 64, 8, 300_000).unwrap();
    assert_eq!(c.local_bytes(64, 8), b"inline!!");

    // Out-of-range requests are refused before anything is posted.
    assert!(matches!(
        c.op(Opcode::Read, 0, 16, (1 << 20) - 8),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        c.op(Opcode::Read, (1 << 20) - 4, 16, 0),
        Err(Error::OutOfBounds { .. })
    ));
    // And the connection still works afterwards.
    c.op(Opcode::Read, 0, 8, 0).unwrap();
}

#[test]
fn write_with_immediate_and_send_recv_echo() {
    let hosts = rig_hosts();
    let peer = start_peer(hosts[1], 21002, "anon:1048576");
    let mut c = connect(hosts[0], &peer, MODE_ECHO);
    for (round, size) in [1usize, 8, 64, 100, 1024, 4096, 60_000]
        .into_iter()
        .enumerate()
    {
        let msg: Vec<u8> = (0..size).map(|i| (i + round) as u8).collect();
        c.local.write_at(0, &msg).unwrap();
        // SAFETY: the receive buffer is not touched until its completion is polled below.
        unsafe { c.conn.post_recv(7, &c.local, 65_536, 65_536) }.unwrap();
        let mut wr = WorkRequest::new(Opcode::Send, &c.local, 0, size, None)
            .unwrap()
            .inline_if_fits(&c.conn);
        wr.set_wr_id(1);
        // SAFETY: the send buffer stays untouched until both completions are polled.
        unsafe { c.conn.post(&mut wr) }.unwrap();
        let mut got_send = false;
        let mut got_recv = None;
        let start = std::time::Instant::now();
        while !(got_send && got_recv.is_some()) {
            assert!(start.elapsed() < TIMEOUT, "echo of {size} bytes timed out");
            if let Some(wc) = c.conn.poll().unwrap() {
                let wc = wc.ok().unwrap();
                if wc.wr_id == 1 {
                    got_send = true;
                } else {
                    assert_eq!(wc.wr_id, 7);
                    got_recv = Some(wc.byte_len as usize);
                }
            }
        }
        assert_eq!(got_recv, Some(size));
        assert_eq!(c.local_bytes(65_536, size), msg, "echo of {size} bytes");
    }
    // WRITE_WITH_IMM consumes a receive at the peer, which echoes the immediate back.
    // SAFETY: as above.
    unsafe { c.conn.post_recv(9, &c.local, 65_536, 65_536) }.unwrap();
    c.local.write_at(0, b"imm-data").unwrap();
    c.op(Opcode::WriteWithImm(0xfeed), 0, 8, 500_000).unwrap();
    let start = std::time::Instant::now();
    let wc = loop {
        assert!(start.elapsed() < TIMEOUT);
        if let Some(wc) = c.conn.poll().unwrap() {
            break wc.ok().unwrap();
        }
    };
    assert_eq!((wc.wr_id, wc.byte_len), (9, 4));
    assert_eq!(c.local_bytes(65_536, 4), 0xfeedu32.to_le_bytes());
    c.op(Opcode::Read, 128, 8, 500_000).unwrap();
    assert_eq!(c.local_bytes(128, 8), b"imm-data");
}

#[test]
fn compare_and_swap_and_fetch_add() {
    let hosts = rig_hosts();
    let peer = start_peer(hosts[1], 21003, "anon:1048576");
    let mut c = connect(hosts[0], &peer, MODE_ECHO);
    let word = 256 * 1024u64; // zero: between the head and tail patterns
    c.op(
        Opcode::CompareSwap {
            compare: 0,
            swap: 42,
        },
        0,
        8,
        word,
    )
    .unwrap();
    assert_eq!(c.local_u64(0), 0, "CAS returns the old value");
    c.op(
        Opcode::CompareSwap {
            compare: 0,
            swap: 7,
        },
        0,
        8,
        word,
    )
    .unwrap();
    assert_eq!(c.local_u64(0), 42, "failed CAS returns the current value");
    c.op(Opcode::FetchAdd { add: 5 }, 0, 8, word).unwrap();
    assert_eq!(c.local_u64(0), 42);
    c.op(Opcode::Read, 8, 8, word).unwrap();
    assert_eq!(c.local_u64(8), 47);
    assert!(matches!(
        c.op(Opcode::FetchAdd { add: 1 }, 0, 8, word + 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.op(Opcode::FetchAdd { add: 1 }, 0, 4, word),
        Err(Error::InvalidArgument(_))
    ));

    // Two clients on two different hosts race fetch-and-add on one word: none is lost.
    let counter = 300 * 1024u64;
    let per_client = 500u64;
    let racers: Vec<_> = [hosts[0], *hosts.get(2).unwrap_or(&hosts[0])]
        .into_iter()
        .map(|src| {
            let peer_addr = peer.addr;
            let peer_device = peer.device.clone();
            std::thread::spawn(move || {
                let fake_peer_view = PeerView {
                    addr: peer_addr,
                    device: peer_device,
                };
                let mut c = fake_peer_view.connect(src);
                for _ in 0..per_client {
                    c.op(Opcode::FetchAdd { add: 1 }, 0, 8, counter).unwrap();
                }
            })
        })
        .collect();
    for r in racers {
        r.join().unwrap();
    }
    c.op(Opcode::Read, 16, 8, counter).unwrap();
    assert_eq!(c.local_u64(16), 2 * per_client);
}

/// The address of a running peer, for connecting from other threads.
struct PeerView {
    addr: SocketAddr,
    device: String,
}

impl PeerView {
    fn connect(&self, src: IpAddr) -> Client {
        let route = Connector::new(Some(src), self.addr).resolve().unwrap();
        let pd = ProtectionDomain::new(route.context()).unwrap();
        let local = pd
            .register(AlignedBuf::zeroed(4096).unwrap(), Access::ALL_REMOTE)
            .unwrap();
        let conn = route
            .connect(
                &pd,
                &ConnectionConfig::default(),
                &mode_private_data(MODE_ECHO),
            )
            .unwrap();
        assert_ne!(conn.device_name(), self.device);
        let remote = RemoteRegion::from_bytes(conn.remote_private_data()).unwrap();
        Client {
            conn,
            remote,
            local,
        }
    }
}

#[test]
fn devdax_region_is_read_and_written_remotely() {
    let hosts = rig_hosts();
    let dax = std::env::var("PMGAS_PM_DEVICE").unwrap_or_default();
    assert!(
        !dax.is_empty(),
        "the rig provided no devdax PM device (PMGAS_PM_DEVICE is empty)"
    );
    let peer = start_peer(hosts[1], 21004, &dax);
    let mut c = connect(hosts[0], &peer, MODE_ECHO);
    let len = c.remote.len;
    eprintln!("{dax}: {len} bytes registered on {}", peer.device);
    assert!(len >= 256 << 20, "devdax region is {len} bytes");
    c.op(Opcode::Read, 0, PATTERN_BYTES, 0).unwrap();
    let head = c.local_bytes(0, PATTERN_BYTES);
    assert!(
        head.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64))
    );
    let tail = len - 4096;
    c.op(Opcode::Read, 0, 4096, tail).unwrap();
    let expect: Vec<u8> = (tail..len).map(pattern_byte).collect();
    assert_eq!(c.local_bytes(0, 4096), expect);
    c.local
        .write_at(8192, b"persistent memory, remotely")
        .unwrap();
    c.op(Opcode::Write, 8192, 27, len / 2).unwrap();
    c.op(Opcode::Read, 0, 27, len / 2).unwrap();
    assert_eq!(c.local_bytes(0, 27), b"persistent memory, remotely");
    c.op(
        Opcode::CompareSwap {
            compare: 0,
            swap: 9,
        },
        0,
        8,
        len / 2 + 64,
    )
    .unwrap();
    c.op(Opcode::Read, 0, 8, len / 2 + 64).unwrap();
    assert_eq!(c.local_u64(0), 9);
}

#[test]
fn message_layer_requests_timeouts_and_backpressure() {
    let hosts = rig_hosts();
    let peer = start_peer(hosts[1], 21005, "anon:65536");
    let c = connect(hosts[0], &peer, MODE_MSG);
    let mut ep = Endpoint::new(
        c.conn,
        MsgConfig {
            ring_slots: 8,
            ..MsgConfig::default()
        },
    )
    .unwrap();
    assert_eq!(ep.request_limit(), 4);
    assert_eq!(ep.call(b"hello", TIMEOUT).unwrap(), b"olleh");

    // Pipelined requests come back matched to their ids.
    let ids: Vec<u64> = (0..4)
        .map(|i| ep.request(format!("req-{i}").as_bytes(), TIMEOUT).unwrap())
        .collect();
    let mut answered = std::collections::HashMap::new();
    let start = std::time::Instant::now();
    while answered.len() < ids.len() {
        assert!(start.elapsed() < TIMEOUT);
        if let Some(Incoming::Response {
            request_id,
            payload,
        }) = ep.poll().unwrap()
        {
            answered.insert(request_id, payload);
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let want: Vec<u8> = format!("req-{i}").bytes().rev().collect();
        assert_eq!(answered[id], want);
    }

    // Unanswered requests fill the window: the next one is refused, not queued.
    let short = Duration::from_millis(300);
    for _ in 0..4 {
        ep.request(b"ignore me", short).unwrap();
    }
    assert!(matches!(
        ep.request(b"one more", TIMEOUT),
        Err(Error::Backpressure { limit: 4 })
    ));
    let mut timed_out = 0;
    let start = std::time::Instant::now();
    while timed_out < 4 {
        assert!(start.elapsed() < TIMEOUT);
        if let Some(Incoming::TimedOut { .. }) = ep.poll().unwrap() {
            timed_out += 1;
        }
    }
    assert_eq!(ep.outstanding(), 0);
    assert_eq!(ep.stats().timeouts, 4);
    assert!(matches!(
        ep.call(b"ignore", Duration::from_millis(200)),
        Err(Error::Timeout { .. })
    ));
    // The window is free again.
    assert_eq!(ep.call(b"abc", TIMEOUT).unwrap(), b"cba");
    let too_big = vec![0u8; 5000];
    assert!(matches!(
        ep.request(&too_big, TIMEOUT),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(ep.stats().malformed_frames, 0);
}

#[test]
fn connection_errors_are_reported_not_fatal() {
    let hosts = rig_hosts();
    // Nobody listens on this port.
    let dst = SocketAddr::new(hosts[1], 21999);
    match Connector::new(Some(hosts[0]), dst).resolve() {
        Err(e) => eprintln!("resolve to a dead port failed early: {e}"),
        Ok(route) => {
            let pd = ProtectionDomain::new(route.context()).unwrap();
            let err = route
                .connect(&pd, &ConnectionConfig::default(), &[MODE_ECHO])
                .err()
                .expect("connect must fail");
            eprintln!("connect to a dead port: {err}");
        }
    }
    // A peer refuses a mode it does not know.
    let peer = start_peer(hosts[1], 21006, "anon:65536");
    let route = Connector::new(Some(hosts[0]), peer.addr).resolve().unwrap();
    let pd = ProtectionDomain::new(route.context()).unwrap();
    let err = route
        .connect(&pd, &ConnectionConfig::default(), &[99])
        .err()
        .expect("unknown mode must be rejected");
    assert!(matches!(err, Error::Rejected { .. }), "{err}");
    // Too much private data is refused locally.
    let route = Connector::new(Some(hosts[0]), peer.addr).resolve().unwrap();
    let pd = ProtectionDomain::new(route.context()).unwrap();
    assert!(matches!(
        route.connect(&pd, &ConnectionConfig::default(), &[1; 57]),
        Err(Error::TooLarge { .. })
    ));
    // A PD from another device is refused before any QP is made.
    let route = Connector::new(Some(hosts[0]), peer.addr).resolve().unwrap();
    let other = Context::open(&peer.device).unwrap();
    let wrong_pd = ProtectionDomain::new(&other).unwrap();
    assert!(matches!(
        route.connect(&wrong_pd, &ConnectionConfig::default(), &[1]),
        Err(Error::DeviceMismatch { .. })
    ));
}

#[test]
fn a_killed_peer_fails_requests_cleanly() {
    let hosts = rig_hosts();
    let mut peer = start_peer(hosts[1], 21007, "anon:65536");
    let mut c = connect(hosts[0], &peer, MODE_ECHO);
    c.op(Opcode::Read, 0, 8, 0).unwrap();
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    // The kernel tears the peer's QP down; our next READ fails with a completion error or
    // a timeout, never a hang or a crash.
    let mut failed = false;
    for _ in 0..20 {
        if c.op(Opcode::Read, 0, 8, 0).is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(failed, "reads kept succeeding after the peer died");
}

/// RNR NAKs the rxe devices have sent so far (a responder whose receive queue was empty).
fn rnr_naks_sent() -> u64 {
    let mut total = 0;
    for dev in std::fs::read_dir("/sys/class/infiniband").expect("/sys/class/infiniband") {
        let ports = dev.unwrap().path().join("ports");
        for port in std::fs::read_dir(&ports).expect("device ports") {
            let counter = port.unwrap().path().join("hw_counters/send_rnr_err");
            let text = std::fs::read_to_string(&counter)
                .unwrap_or_else(|e| panic!("{}: {e}", counter.display()));
            total += text.trim().parse::<u64>().expect("a counter");
        }
    }
    total
}

/// An endpoint's receive ring is posted before its connection is up, on both sides: a
/// request sent the moment `connect_endpoint` returns never meets an empty receive queue.
/// (Otherwise the responder answers RNR NAK and, since the kernel's rdma_cm sets
/// `min_rnr_timer` 0, the sender waits 655 ms before trying again: a node's Join to a new
/// monitor took that long.) Counted with the rxe devices' `send_rnr_err`.
#[test]
fn endpoints_post_their_receives_before_the_peer_can_send() {
    const ROUNDS: u8 = 12;
    let hosts = rig_hosts();
    let listen = SocketAddr::new(hosts[1], 7391);
    let before = rnr_naks_sent();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || -> pmgas_verbs::Result<()> {
        let listener = pmgas_verbs::Listener::bind(listen, 8)?;
        let pd = ProtectionDomain::new(listener.context())?;
        ready_tx.send(()).unwrap();
        let mut kept = vec![];
        for _ in 0..ROUNDS {
            let req = listener
                .next_request(TIMEOUT)?
                .expect("the client connects");
            let mut ep =
                req.accept_endpoint(&pd, &ConnectionConfig::default(), &[], MsgConfig::default())?;
            loop {
                if let Some(Incoming::Request {
                    request_id,
                    payload,
                }) = ep.poll()?
                {
                    ep.respond(request_id, &payload)?;
                    break;
                }
            }
            kept.push(ep);
        }
        // Keep every connection until the client has its answers.
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
        Ok(())
    });
    ready_rx.recv().expect("the listener is up");
    let mut kept = vec![];
    for round in 0..ROUNDS {
        let route = Connector::new(Some(hosts[0]), listen)
            .resolve()
            .expect("resolve route");
        let pd = ProtectionDomain::new(route.context()).expect("pd");
        let mut ep = route
            .connect_endpoint(&pd, &ConnectionConfig::default(), &[], MsgConfig::default())
            .expect("connect");
        let reply = ep.call(&[round; 24], TIMEOUT).expect("echo");
        assert_eq!(reply, vec![round; 24]);
        kept.push((ep, pd));
    }
    done_tx.send(()).unwrap();
    server.join().unwrap().expect("server side");
    let naks = rnr_naks_sent() - before;
    assert_eq!(
        naks, 0,
        "{naks} RNR NAKs in {ROUNDS} connections: a first message met an empty receive queue"
    );
}
