//! Devices, contexts, ports and GIDs.
//!
//! Contexts come from librdmacm's own device list (`rdma_get_devices`), not from a fresh
//! `ibv_open_device`: an rdma_cm id that resolves to a device uses librdmacm's context for
//! it, and a protection domain or completion queue must live on that very context to be
//! used with the id's queue pair. librdmacm keeps those contexts open for the life of the
//! process, so a [`Context`] never closes its device.

use std::ffi::CStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::error::{Error, Result};

/// The names of the RDMA devices present, in the order libibverbs lists them.
pub fn device_names() -> Result<Vec<String>> {
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer; the returned list is freed below and the
    // names are copied out before that.
    let list = unsafe { sys::ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Err(Error::last_os("ibv_get_device_list", ""));
    }
    let mut names = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count.max(0) as usize {
        // SAFETY: the list holds `count` valid device pointers.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once.
    unsafe { sys::ibv_free_device_list(list) };
    Ok(names)
}

pub(crate) struct ContextInner {
    pub(crate) ptr: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: libibverbs contexts may be used from any thread; the pointer is never freed.
unsafe impl Send for ContextInner {}
// SAFETY: as above; all verbs on a context are thread-safe in rdma-core.
unsafe impl Sync for ContextInner {}

/// An open RDMA device (librdmacm's context for it).
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// Attributes of one port, as `ibv_query_port` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAttr {
    pub state: u32,
    pub active_mtu_bytes: u32,
    pub gid_table_len: u32,
    /// 1 = InfiniBand, 2 = Ethernet (RoCE).
    pub link_layer: u8,
}

/// The RoCE flavour of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    Ib,
    RoceV1,
    RoceV2,
}

/// One populated GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    pub gid_type: GidType,
}

impl GidEntry {
    /// The IPv4 address this GID encodes (`::ffff:a.b.c.d`), if it is an IPv4-mapped GID.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        let g = &self.gid;
        (g[..10] == [0; 10] && g[10] == 0xff && g[11] == 0xff)
            .then(|| Ipv4Addr::new(g[12], g[13], g[14], g[15]))
    }
}

fn mtu_bytes(mtu: u32) -> u32 {
    // enum ibv_mtu: 1 = 256 … 5 = 4096.
    if (1..=5).contains(&mtu) {
        128 << mtu
    } else {
        0
    }
}

/// Selects the RoCE v2 GID for `ip` from a GID table: the choice perftest makes with `-x`,
/// made automatically. `override_index` wins when given (and must be populated).
pub fn select_gid(entries: &[GidEntry], ip: IpAddr, override_index: Option<u32>) -> Option<u32> {
    if let Some(index) = override_index {
        return entries.iter().any(|e| e.index == index).then_some(index);
    }
    let want: [u8; 16] = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    entries
        .iter()
        .find(|e| e.gid == want && e.gid_type == GidType::RoceV2)
        .map(|e| e.index)
}

impl Context {
    /// Opens the device called `name` (for example `rxe0`).
    pub fn open(name: &str) -> Result<Self> {
        with_cm_devices(|contexts| {
            for &ctx in contexts {
                // SAFETY: librdmacm's contexts are valid for the life of the process.
                let dev_name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*ctx).device)) };
                if dev_name.to_bytes() == name.as_bytes() {
                    return Self::from_raw(ctx).map(Some);
                }
            }
            Ok(None)
        })?
        .ok_or_else(|| Error::NoSuchDevice {
            name: name.to_owned(),
            present: device_names().unwrap_or_default(),
        })
    }

    /// Wraps a context pointer that librdmacm owns (from an rdma_cm id).
    pub(crate) fn from_raw(ptr: *mut sys::ibv_context) -> Result<Self> {
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::InvalidArgument("rdma_cm id has no device context".into()))?;
        // SAFETY: the context and its device are valid for the life of the process.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*ptr.as_ptr()).device)) }
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            inner: Arc::new(ContextInner { ptr, name }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether both are the same open device (a protection domain of one can be used
    /// with connections of the other).
    pub fn same_device(&self, other: &Context) -> bool {
        self.as_ptr() == other.as_ptr()
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.inner.ptr.as_ptr()
    }

    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        // SAFETY: ibv_port_attr is plain old data; all-zero is a valid value.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is valid and `attr` is a valid out-pointer of the right size.
        let ret = unsafe { sys::___ibv_query_port(self.as_ptr(), port, &mut attr) };
        if ret != 0 {
            return Err(Error::from_ret(
                "ibv_query_port",
                self.port_context(port),
                ret,
            ));
        }
        Ok(PortAttr {
            state: attr.state,
            active_mtu_bytes: mtu_bytes(attr.active_mtu),
            gid_table_len: attr.gid_tbl_len.max(0) as u32,
            link_layer: attr.link_layer,
        })
    }

    fn port_context(&self, port: u8) -> String {
        format!("{} port {port}", self.name())
    }

    /// The populated entries of a port's GID table, with their types (read from sysfs, as
    /// perftest and rdma_cm do, since `ibv_query_gid` does not report the type).
    pub fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>> {
        let len = self.query_port(port)?.gid_table_len;
        let mut entries = Vec::new();
        for index in 0..len {
            // SAFETY: ibv_gid is plain old data.
            let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: valid context, index below the table length, valid out-pointer.
            let ret = unsafe { sys::ibv_query_gid(self.as_ptr(), port, index as i32, &mut gid) };
            if ret != 0 {
                continue;
            }
            // SAFETY: every bit pattern is a valid [u8; 16].
            let raw = unsafe { gid.raw };
            if raw == [0; 16] {
                continue;
            }
            let type_path = format!(
                "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
                self.name()
            );
            let gid_type = match fs::read_to_string(&type_path) {
                Ok(t) if t.trim() == "RoCE v2" => GidType::RoceV2,
                Ok(t) if t.trim().starts_with("IB/RoCE v1") => GidType::RoceV1,
                Ok(_) | Err(_) => GidType::Ib,
            };
            entries.push(GidEntry {
                index,
                gid: raw,
                gid_type,
            });
        }
        Ok(entries)
    }

    /// The GID index to use for traffic from `ip` (RoCE v2), or `override_index`.
    pub fn gid_index_for(&self, port: u8, ip: IpAddr, override_index: Option<u32>) -> Result<u32> {
        let table = self.gid_table(port)?;
        select_gid(&table, ip, override_index).ok_or(Error::NoGidForIp {
            device: self.name().to_owned(),
            port,
            ip,
        })
    }
}

/// Runs `f` over librdmacm's device contexts, freeing the list afterwards.
fn with_cm_devices<T>(f: impl FnOnce(&[*mut sys::ibv_context]) -> Result<T>) -> Result<T> {
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer.
    let list = unsafe { sys::rdma_get_devices(&mut count) };
    if list.is_null() {
        return Err(Error::last_os("rdma_get_devices", ""));
    }
    // SAFETY: the list holds `count` context pointers and lives until rdma_free_devices.
    let contexts = unsafe { std::slice::from_raw_parts(list, count.max(0) as usize) };
    let out = f(contexts);
    // SAFETY: frees only the array; the contexts stay open inside librdmacm.
    unsafe { sys::rdma_free_devices(list) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, gid: [u8; 16], gid_type: GidType) -> GidEntry {
        GidEntry {
            index,
            gid,
            gid_type,
        }
    }

    fn mapped(ip: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(ip).to_ipv6_mapped().octets()
    }

    #[test]
    fn selects_roce_v2_gid_for_ip() {
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let table = vec![
            entry(0, link_local, GidType::RoceV1),
            entry(1, link_local, GidType::RoceV2),
            entry(2, mapped([10, 0, 0, 1]), GidType::RoceV1),
            entry(3, mapped([10, 0, 0, 1]), GidType::RoceV2),
        ];
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(select_gid(&table, ip, None), Some(3));
        assert_eq!(table[3].ipv4(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(table[0].ipv4(), None);
        assert_eq!(select_gid(&table, "10.0.0.2".parse().unwrap(), None), None);
        assert_eq!(select_gid(&table, ip, Some(2)), Some(2));
        assert_eq!(select_gid(&table, ip, Some(9)), None);
    }

    #[test]
    fn mtu_enum_maps_to_bytes() {
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
        assert_eq!(mtu_bytes(9), 0);
    }
}
