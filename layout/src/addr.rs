//! Global addresses: `page_id << 32 | offset_in_page`.

use thiserror::Error;

/// Bits of a [`GlobalAddr`] that hold the offset inside a page.
pub const OFFSET_BITS: u32 = 32;
const OFFSET_MASK: u64 = (1u64 << OFFSET_BITS) - 1;

/// A cluster-wide page number, handed out once by the active monitor and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId(pub u32);

/// A 64-bit global address: the page id in the high 32 bits, the offset in the low 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlobalAddr(u64);

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrError {
    #[error("offset {offset} is beyond the page size {page_size_bytes}")]
    OffsetBeyondPage { offset: u64, page_size_bytes: u64 },
    #[error("page size {page_size_bytes} is not a power of two in 4 KiB..=4 GiB")]
    BadPageSize { page_size_bytes: u64 },
}

/// Checks a cluster page size: a power of two, at least 4 KiB, at most 4 GiB (the offset
/// field is 32 bits wide).
pub fn check_page_size(page_size_bytes: u64) -> Result<(), AddrError> {
    if page_size_bytes.is_power_of_two()
        && (4096..=(1u64 << OFFSET_BITS)).contains(&page_size_bytes)
    {
        Ok(())
    } else {
        Err(AddrError::BadPageSize { page_size_bytes })
    }
}

impl GlobalAddr {
    /// Builds an address; offsets at or past `page_size_bytes` are invalid input.
    pub fn new(page: PageId, offset: u64, page_size_bytes: u64) -> Result<Self, AddrError> {
        check_page_size(page_size_bytes)?;
        if offset >= page_size_bytes {
            return Err(AddrError::OffsetBeyondPage {
                offset,
                page_size_bytes,
            });
        }
        Ok(Self(((page.0 as u64) << OFFSET_BITS) | offset))
    }

    /// Reinterprets raw bits, checking the offset against the page size.
    pub fn from_raw(raw: u64, page_size_bytes: u64) -> Result<Self, AddrError> {
        Self::new(
            PageId((raw >> OFFSET_BITS) as u32),
            raw & OFFSET_MASK,
            page_size_bytes,
        )
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn page(self) -> PageId {
        PageId((self.0 >> OFFSET_BITS) as u32)
    }

    pub fn offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: u64 = 2 << 20;

    #[test]
    fn round_trips_page_and_offset() {
        let addr = GlobalAddr::new(PageId(7), 4096, MIB2).unwrap();
        assert_eq!(addr.raw(), (7u64 << 32) | 4096);
        assert_eq!(addr.page(), PageId(7));
        assert_eq!(addr.offset(), 4096);
        assert_eq!(GlobalAddr::from_raw(addr.raw(), MIB2).unwrap(), addr);
    }

    #[test]
    fn rejects_offset_at_or_past_page_size() {
        assert_eq!(
            GlobalAddr::new(PageId(1), MIB2, MIB2),
            Err(AddrError::OffsetBeyondPage {
                offset: MIB2,
                page_size_bytes: MIB2
            })
        );
        assert!(GlobalAddr::from_raw((1u64 << 32) | MIB2, MIB2).is_err());
        assert!(GlobalAddr::new(PageId(u32::MAX), MIB2 - 1, MIB2).is_ok());
    }

    #[test]
    fn rejects_bad_page_sizes() {
        for bad in [0, 1000, 2048, 3 << 20, 1u64 << 33] {
            assert!(check_page_size(bad).is_err(), "{bad}");
        }
        for good in [4096, MIB2, 2u64 << 30, 1u64 << 32] {
            assert!(check_page_size(good).is_ok(), "{good}");
        }
    }
}
