//! Protection domains, memory regions and the page-aligned buffers they usually cover.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{Error, Result};

/// Access rights of a memory region, as `IBV_ACCESS_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(pub u32);

impl Access {
    pub const LOCAL_WRITE: Self = Self(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    pub const REMOTE_WRITE: Self = Self(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    pub const REMOTE_READ: Self = Self(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    pub const REMOTE_ATOMIC: Self = Self(sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0);
    /// Everything a peer may do to a data region: read, write, atomics.
    pub const ALL_REMOTE: Self = Self(
        Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_READ.0 | Self::REMOTE_ATOMIC.0,
    );
    /// Local use only (send and receive buffers).
    pub const LOCAL: Self = Self::LOCAL_WRITE;
}

impl std::ops::BitOr for Access {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

pub(crate) struct PdInner {
    pub(crate) ptr: NonNull<sys::ibv_pd>,
    pub(crate) context: Context,
}

// SAFETY: protection domains may be used from any thread.
unsafe impl Send for PdInner {}
// SAFETY: as above; registration on a PD is thread-safe in rdma-core.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR and QP on this PD holds an Arc to it, so none is left.
        let ret = unsafe { sys::ibv_dealloc_pd(self.ptr.as_ptr()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_dealloc_pd failed");
        }
    }
}

/// A protection domain on a device.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl ProtectionDomain {
    pub fn new(context: &Context) -> Result<Self> {
        // SAFETY: the context is valid for the life of the process.
        let ptr = unsafe { sys::ibv_alloc_pd(context.as_ptr()) };
        let ptr =
            NonNull::new(ptr).ok_or_else(|| Error::last_os("ibv_alloc_pd", context.name()))?;
        Ok(Self {
            inner: Arc::new(PdInner {
                ptr,
                context: context.clone(),
            }),
        })
    }

    pub fn context(&self) -> &Context {
        &self.inner.context
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.inner.ptr.as_ptr()
    }

    /// Registers an owned, page-aligned buffer; the region keeps it alive.
    pub fn register(&self, buf: AlignedBuf, access: Access) -> Result<MemoryRegion> {
        let (ptr, len) = (buf.ptr.as_ptr(), buf.len);
        // SAFETY: the buffer is owned by the region we return and outlives the registration.
        let mut mr = unsafe { self.register_raw(ptr, len, access) }?;
        mr.buf = Some(buf);
        Ok(mr)
    }

    /// Registers `len` bytes at `addr`, such as a devdax or tmpfs mapping.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` must stay mapped, readable and (for any write access) writable
    /// until the returned region is dropped, and nothing may unmap or remap it before then.
    pub unsafe fn register_raw(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        // SAFETY: the caller keeps the range valid for the region's lifetime.
        let mr = unsafe { sys::ibv_reg_mr(self.as_ptr(), addr.cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| {
            Error::last_os(
                "ibv_reg_mr",
                format!("{} bytes at {addr:p} on {}", len, self.context().name()),
            )
        })?;
        Ok(MemoryRegion {
            mr,
            pd: self.clone(),
            buf: None,
            addr,
            len,
        })
    }
}

/// A registered memory region.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    pd: ProtectionDomain,
    buf: Option<AlignedBuf>,
    addr: *mut u8,
    len: usize,
}

// SAFETY: an MR handle may move between threads; the memory it covers is raw bytes that
// callers access through `unsafe` slices or RDMA.
unsafe impl Send for MemoryRegion {}
// SAFETY: the handle itself is immutable after registration.
unsafe impl Sync for MemoryRegion {}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl MemoryRegion {
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is valid until drop.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: the MR is valid until drop.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// What a peer needs to address this region one-sided.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr(),
            len: self.len as u64,
            rkey: self.rkey(),
        }
    }

    /// Checks that `[offset, offset + len)` lies inside the region.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                what: "local range",
                offset: offset as u64,
                len_bytes: len as u64,
                region_bytes: self.len as u64,
            }),
        }
    }

    /// Copies bytes out of the region.
    ///
    /// Remote peers may write the region at any time; the copy is a plain read, so a
    /// concurrent remote write can leave a mix of old and new bytes, never undefined
    /// behaviour on our side (the memory is never handed out as a Rust reference).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len())?;
        // SAFETY: the range is inside the registered mapping, which stays valid while
        // `self` lives; the destination does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Reads one byte with a volatile load: for spinning on a byte that a remote WRITE will
    /// change (the latency ping-pong), which a plain read could hoist out of the loop.
    #[inline]
    pub fn load_volatile(&self, offset: usize) -> Result<u8> {
        self.check_range(offset, 1)?;
        // SAFETY: in range of the live mapping; a byte load cannot tear.
        Ok(unsafe { std::ptr::read_volatile(self.addr.add(offset)) })
    }

    /// Copies bytes into the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        // SAFETY: as in `read_at`; the region is writable (registered memory is mapped
        // read-write by every constructor of this crate).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(offset), data.len()) };
        Ok(())
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the MR is valid and deregistered exactly once; the owned buffer (if any)
        // is freed only after this, when the field drops.
        let ret = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_dereg_mr failed");
        }
    }
}

/// Address, length and rkey of a peer's region: what travels in rdma_cm private data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

impl RemoteRegion {
    pub const WIRE_BYTES: usize = 24;

    pub fn to_bytes(self) -> [u8; Self::WIRE_BYTES] {
        let mut out = [0u8; Self::WIRE_BYTES];
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let field = |range: std::ops::Range<usize>| {
            bytes.get(range).ok_or_else(|| Error::Malformed {
                reason: format!(
                    "region descriptor is {} bytes, need {}",
                    bytes.len(),
                    Self::WIRE_BYTES
                ),
            })
        };
        let u64_at = |start| -> Result<u64> {
            let mut b = [0u8; 8];
            b.copy_from_slice(field(start..start + 8)?);
            Ok(u64::from_le_bytes(b))
        };
        let mut rkey = [0u8; 4];
        rkey.copy_from_slice(field(16..20)?);
        if field(20..24)? != [0; 4] {
            return Err(Error::Malformed {
                reason: "region descriptor reserved bytes are not zero".into(),
            });
        }
        Ok(Self {
            addr: u64_at(0)?,
            len: u64_at(8)?,
            rkey: u32::from_le_bytes(rkey),
        })
    }

    /// Checks that `[offset, offset + len)` lies inside the peer's region and returns the
    /// remote virtual address of `offset`.
    pub fn addr_of(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(Error::OutOfBounds {
                what: "remote range",
                offset,
                len_bytes: len,
                region_bytes: self.len,
            }),
        }
    }
}

/// A zeroed, page-aligned heap buffer for registration.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned raw memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads the pointer value.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    pub fn zeroed(len: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), Self::ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::InvalidArgument(format!("cannot allocate {len} bytes")))?;
        Ok(Self { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout (which was valid then).
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len.max(1), Self::ALIGN),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_region_round_trips_and_rejects_bad_bytes() {
        let r = RemoteRegion {
            addr: 0x7f00_1234_5000,
            len: 1 << 30,
            rkey: 0xabcd,
        };
        assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(RemoteRegion::from_bytes(&r.to_bytes()[..20]).is_err());
        let mut bad = r.to_bytes();
        bad[22] = 1;
        assert!(RemoteRegion::from_bytes(&bad).is_err());
        assert!(RemoteRegion::from_bytes(&[]).is_err());
    }

    #[test]
    fn remote_ranges_are_bounds_checked() {
        let r = RemoteRegion {
            addr: 4096,
            len: 100,
            rkey: 1,
        };
        assert_eq!(r.addr_of(0, 100).unwrap(), 4096);
        assert_eq!(r.addr_of(92, 8).unwrap(), 4188);
        assert!(r.addr_of(93, 8).is_err());
        assert!(r.addr_of(u64::MAX, 2).is_err());
    }

    #[test]
    fn aligned_buf_is_page_aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(10_000).unwrap();
        assert_eq!(b.ptr.as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 10_000);
        // SAFETY: test reads its own freshly allocated buffer.
        let s = unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), b.len) };
        assert!(s.iter().all(|&x| x == 0));
    }
}
