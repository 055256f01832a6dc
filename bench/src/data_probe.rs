//! `pmgas-bench data-probe` (rig tests): speaks to a live data node's data port as a
//! misbehaving peer would — garbage, truncated and out-of-bounds requests, updates of
//! pages it is not primary of, Replicates aimed at the wrong page — and requires a clear
//! error for each, and that the node still serves afterwards. Prints `PROBE ok N`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use pmgas_layout::wire::{Body, ErrorCode, Message, UpdateOp};
use pmgas_layout::{NodeId, PageId, PageIndex};
use pmgas_node::space::{CLIENT_SENDER, Space, SpaceConfig};
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

pub fn run(a: &ProbeArgs) -> Result<(), String> {
    let mut config = SpaceConfig::new(&a.zk, &a.cluster);
    config.bind = Some(a.bind);
    let space = Space::connect(config).map_err(|e| e.to_string())?;
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
            ErrorCode::UnknownPage,
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
