//! `pmgas-bench data-probe` (rig tests): speaks to a live data node's data port as a
//! misbehaving peer would — garbage, truncated and out-of-bounds requests, updates of
//! pages it is not primary of, Replicates aimed at the wrong page — and requires a clear
//! error for each, and that the node still serves afterwards. Prints `PROBE ok N`.
//!
//! `--freed` checks `free_page` instead (see [`freed`]).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use pmgas_layout::wire::{Body, ErrorCode, Message, UpdateOp};
use pmgas_layout::{NodeId, PageId, PageIndex};
use pmgas_node::space::{CLIENT_SENDER, Space, SpaceConfig, SpaceError};
use pmgas_verbs::{ConnectionConfig, Connector, Endpoint, ProtectionDomain};

#[derive(Args)]
pub struct ProbeArgs {
    #[arg(long)]
    zk: String,
    #[arg(long)]
    cluster: String,
    #[arg(long)]
    bind: std::net::IpAddr,
    /// A page whose primary is --primary (its registers are read before and after).
    #[arg(long)]
    page_id: u32,
    #[arg(long, default_value_t = 1)]
    primary: u32,
    /// A node that holds a backup of the page (not its primary).
    #[arg(long, default_value_t = 2)]
    backup: u32,
    /// Only check that this node, which came back after being declared dead and still
    /// holds an old replica of the page, refuses to order an update of it (NotPrimary) and
    /// that the page's registers are unchanged.
    #[arg(long)]
    returned: Option<u32>,
    /// Only check freeing (ignores --page-id): a page on --primary with --backup as its
    /// backup is written, read (cached) and freed by another handle; the freed id is
    /// refused everywhere; the page handed out next on the primary reads zeros and is
    /// written; the first handle, with its stale cached mapping, then must get PageFreed
    /// for reads, writes, a CAS and a batched read, and the new page's bytes must be
    /// unchanged; raw requests for the freed page to the primary and the backup are
    /// refused too.
    #[arg(long)]
    freed: bool,
}

fn connect(bind: std::net::IpAddr, addr: SocketAddr) -> Result<Endpoint, String> {
    let route = Connector::new(Some(bind), addr)
        .resolve()
        .map_err(|e| e.to_string())?;
    let pd = ProtectionDomain::new(route.context()).map_err(|e| e.to_string())?;
    route
        .connect_endpoint(
            &pd,
            &ConnectionConfig::default(),
            &[],
            pmgas_node::data::data_msg_config(),
        )
        .map_err(|e| e.to_string())
}

fn space(a: &ProbeArgs) -> Result<Space, String> {
    let mut config = SpaceConfig::new(&a.zk, &a.cluster);
    config.bind = Some(a.bind);
    Space::connect(config).map_err(|e| e.to_string())
}

/// Whether `r` is a refusal with code PageFreed.
fn is_freed<T: std::fmt::Debug>(what: &str, r: Result<T, SpaceError>) -> Result<(), String> {
    match r {
        Err(SpaceError::Refused {
            code: ErrorCode::PageFreed,
            detail,
        }) => {
            println!("PROBE {what}: refused, PageFreed: {detail}");
            Ok(())
        }
        other => Err(format!("{what}: expected PageFreed, got {other:?}")),
    }
}

/// `--freed`: freeing a page, and a stale cached mapping after its place is reused.
fn freed(a: &ProbeArgs) -> Result<(), String> {
    let e = |e: SpaceError| e.to_string();
    let stale = space(a)?;
    let other = space(a)?;
    let primary = NodeId(a.primary);
    let x = stale.alloc_page(1, Some(primary)).map_err(e)?;
    let place = x.replicas[0].page;
    let xa = stale.addr(x.page_id, 0).map_err(e)?;
    stale.write(xa, &[0xaa; 64]).map_err(e)?;
    let mut buf = [0u8; 64];
    stale.read(xa, &mut buf).map_err(e)?;
    if buf != [0xaa; 64] {
        return Err(format!("page {} reads {buf:?}", x.page_id.0));
    }
    // Freed by another handle: `stale` keeps the mapping in its cache.
    let n = other.free_page(x.page_id).map_err(e)?;
    if n != x.replicas.len() as u32 {
        return Err(format!("{n} of {} replicas freed", x.replicas.len()));
    }
    println!("PROBE page {} freed: {n} replicas", x.page_id.0);
    is_freed("freeing it again", other.free_page(x.page_id))?;
    is_freed("a lookup of the freed page", other.lookup(x.page_id))?;
    match other.free_page(PageId(x.page_id.0 + 100_000)) {
        Err(SpaceError::Refused {
            code: ErrorCode::UnknownPage,
            ..
        }) => println!("PROBE freeing a page never allocated: refused, UnknownPage"),
        r => return Err(format!("freeing a page never allocated: {r:?}")),
    }
    // The primary hands the lowest FREE page out next: the freed one's place.
    let mut y = None;
    for _ in 0..4 {
        let m = other.alloc_page(1, Some(primary)).map_err(e)?;
        if m.replicas[0].page == place {
            y = Some(m);
            break;
        }
    }
    let y = y.ok_or("the freed page's place was not handed out again")?;
    let ya = other.addr(y.page_id, 0).map_err(e)?;
    other.read(ya, &mut buf).map_err(e)?;
    if buf != [0; 64] {
        return Err(format!(
            "page {} (the freed page's place) does not read zeros",
            y.page_id.0
        ));
    }
    other.write(ya, &[0xbb; 64]).map_err(e)?;
    println!(
        "PROBE page {} took the freed page's place (node{} page {}), read zeros",
        y.page_id.0, a.primary, place.0
    );
    // The stale handle: nothing of page y's may be read or written through page x.
    is_freed(
        "a read through a stale cached mapping",
        stale.read(xa, &mut buf),
    )?;
    is_freed(
        "a write through a stale cached mapping",
        stale.write(xa, &[0xcc; 8]),
    )?;
    is_freed("a CAS on the freed page", stale.compare_and_swap(xa, 0, 1))?;
    let mut batch = stale.batch();
    batch.read(xa, 8);
    let results = batch.quiet();
    is_freed("a batched read of the freed page", results[0].clone())?;
    // Raw requests for the freed page, to its old primary and its old backup.
    let epoch = other.epoch();
    let msg = |body: Body| Message::new(epoch, CLIENT_SENDER, 7, body).encode();
    let nodes = pmgas_node::data::node_addrs(&other.nodes().map_err(e)?);
    for (what, node, body) in [
        (
            "a raw update of the freed page",
            x.replicas[0].node,
            Body::Update {
                page_id: x.page_id,
                offset: 0,
                op: UpdateOp::Write(vec![0xdd; 8]),
            },
        ),
        (
            "a raw Replicate of the freed page",
            x.replicas[1].node,
            Body::Replicate {
                page_id: x.page_id,
                page: x.replicas[1].page,
                offset: 0,
                data: vec![0xdd; 8],
            },
        ),
    ] {
        let addr = nodes.get(&node).ok_or(format!("{node} is not listed"))?;
        let answer = connect(a.bind, *addr)?
            .call(&msg(body), Duration::from_secs(10))
            .map_err(|e| format!("{what}: no answer: {e}"))?;
        match Message::decode(&answer).map(|m| m.body) {
            Ok(Body::Error {
                code: ErrorCode::PageFreed,
                detail,
            }) => println!("PROBE {what}: refused, PageFreed: {detail}"),
            other => return Err(format!("{what}: expected PageFreed, got {other:?}")),
        }
    }
    other.read(ya, &mut buf).map_err(e)?;
    if buf != [0xbb; 64] {
        return Err(format!(
            "page {} was changed through the freed page: {buf:?}",
            y.page_id.0
        ));
    }
    other.free_page(y.page_id).map_err(e)?;
    println!("PROBE ok freed");
    Ok(())
}

pub fn run(a: &ProbeArgs) -> Result<(), String> {
    if a.freed {
        return freed(a);
    }
    let space = space(a)?;
    let nodes = pmgas_node::data::node_addrs(&space.nodes().map_err(|e| e.to_string())?);
    let addr_of = |n: u32| {
        nodes
            .get(&NodeId(n))
            .copied()
            .ok_or(format!("node{n} is not listed"))
    };
    let page = PageId(a.page_id);
    let mapping = space.lookup(page).map_err(|e| e.to_string())?;
    let registers = || -> Result<Vec<u64>, String> {
        (0..8)
            .map(|i| {
                let a = space.addr(page, i * 8).map_err(|e| e.to_string())?;
                space.read_u64(a).map_err(|e| e.to_string())
            })
            .collect()
    };
    let before = registers()?;
    let epoch = space.epoch();
    let msg = |body: Body| Message::new(epoch, CLIENT_SENDER, 7, body).encode();
    let update = |offset: u32, op: UpdateOp| {
        msg(Body::Update {
            page_id: page,
            offset,
            op,
        })
    };
    if let Some(node) = a.returned {
        let mut ep = connect(a.bind, addr_of(node)?)?;
        let answer = ep
            .call(
                &update(0, UpdateOp::FetchAdd { delta: 1 }),
                Duration::from_secs(10),
            )
            .map_err(|e| format!("no answer from node{node}: {e}"))?;
        match Message::decode(&answer).map(|m| m.body) {
            Ok(Body::Error {
                code: ErrorCode::NotPrimary,
                detail,
            }) => println!(
                "PROBE node{node}, back after being declared dead: refused, NotPrimary: {detail}"
            ),
            other => return Err(format!("node{node} came back and answered {other:?}")),
        }
        if registers()? != before {
            return Err("the registers changed".into());
        }
        if mapping.replicas.iter().any(|r| r.node == NodeId(node)) {
            return Err(format!("node{node} is in the page's mapping again"));
        }
        println!("PROBE ok returned node{node}");
        return Ok(());
    }
    let page_size = space.page_size_bytes().map_err(|e| e.to_string())?;
    let backup_page = mapping
        .replicas
        .iter()
        .find(|r| r.node == NodeId(a.backup))
        .map(|r| r.page)
        .ok_or("the named backup holds no replica")?;
    let mut truncated = update(0, UpdateOp::Write(vec![1; 64]));
    truncated.truncate(50);
    let mut bad_op = update(0, UpdateOp::FetchAdd { delta: 1 });
    bad_op[32 + 8] = 9; // the op code
    let probes: Vec<(&str, u32, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage",
            a.primary,
            b"not a pmgas message".to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "a truncated Update",
            a.primary,
            truncated,
            ErrorCode::Malformed,
        ),
        (
            "an unknown op code",
            a.primary,
            bad_op,
            ErrorCode::Malformed,
        ),
        (
            "a write past the page end",
            a.primary,
            update(page_size as u32 - 4, UpdateOp::Write(vec![1; 8])),
            ErrorCode::BadAddress,
        ),
        (
            "an unaligned CAS",
            a.primary,
            update(
                4,
                UpdateOp::CompareAndSwap {
                    expected: 0,
                    new: 1,
                },
            ),
            ErrorCode::BadAddress,
        ),
        (
            "an update of an unknown page",
            a.primary,
            msg(Body::Update {
                page_id: PageId(a.page_id + 100_000),
                offset: 0,
                op: UpdateOp::FetchAdd { delta: 1 },
            }),
            ErrorCode::UnknownPage,
        ),
        (
            "an update sent to a backup",
            a.backup,
            update(0, UpdateOp::FetchAdd { delta: 1 }),
            ErrorCode::NotPrimary,
        ),
        (
            "a Replicate aimed at another page index",
            a.backup,
            msg(Body::Replicate {
                page_id: page,
                page: PageIndex(backup_page.0 + 1),
                offset: 0,
                data: vec![0xee; 8],
            }),
            ErrorCode::PageFreed,
        ),
        (
            "a Replicate past the page end",
            a.backup,
            msg(Body::Replicate {
                page_id: page,
                page: backup_page,
                offset: page_size as u32,
                data: vec![0xee; 8],
            }),
            ErrorCode::BadAddress,
        ),
        (
            "a monitor request on the data port",
            a.primary,
            msg(Body::Prepare { txn_id: 1 }),
            ErrorCode::Malformed,
        ),
    ];
    let mut eps = std::collections::HashMap::new();
    for (what, node, bytes, want) in &probes {
        let ep = match eps.entry(*node) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(connect(a.bind, addr_of(*node)?)?)
            }
        };
        let answer = ep
            .call(bytes, Duration::from_secs(10))
            .map_err(|e| format!("{what}: no answer: {e}"))?;
        match Message::decode(&answer).map(|m| m.body) {
            Ok(Body::Error { code, detail }) if code == *want => {
                println!("PROBE {what}: refused, {code:?}: {detail}");
            }
            other => return Err(format!("{what}: expected {want:?}, got {other:?}")),
        }
    }
    let after = registers()?;
    if before != after {
        return Err(format!("the registers changed: {before:?} -> {after:?}"));
    }
    // Both nodes still serve.
    let a0 = space.addr(page, 0).map_err(|e| e.to_string())?;
    let old = space
        .fetch_add(a0, 0)
        .map_err(|e| format!("the primary no longer serves: {e}"))?;
    if old != before[0] {
        return Err(format!("register 0 reads {old}, was {}", before[0]));
    }
    println!("PROBE ok {}", probes.len());
    Ok(())
}
