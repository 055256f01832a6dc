//! Byte access to a mapped pool, and the one place that makes stores durable.
//!
//! Durability on PM needs the written cache lines written back (`clwb`, or `clflushopt` /
//! `clflush` where the CPU lacks it, chosen once by CPUID) and then one `sfence` per
//! logical update; [`Pmem::store`] does exactly that and nothing else in pmgas issues
//! flushes. Stores are made with aligned 8-byte writes where possible, since 8-byte
//! aligned stores are the unit that survives a power failure whole.
//!
//! Persist steps are numbered in PERSISTENCE.md; every call site names its step. For crash
//! testing, `PMGAS_CRASH_AT_PERSIST=N` aborts the process at the N-th store: before any
//! byte of it lands (`PMGAS_CRASH_MODE=before`, the default) or after a prefix of its
//! 8-byte words (`torn`), which is what a power failure may leave behind.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use pmgas_verbs::MappedRegion;

/// How dirty lines are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushInsn {
    Clwb,
    Clflushopt,
    Clflush,
}

const LINE_BYTES: usize = 64;

fn detect_flush() -> FlushInsn {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        // CPUID is available on every x86_64 CPU (the intrinsic is safe to call).
        let leaf7 = __cpuid_count(7, 0);
        if leaf7.ebx & (1 << 24) != 0 {
            return FlushInsn::Clwb;
        }
        if leaf7.ebx & (1 << 23) != 0 {
            return FlushInsn::Clflushopt;
        }
    }
    FlushInsn::Clflush
}

pub fn flush_insn() -> FlushInsn {
    static INSN: OnceLock<FlushInsn> = OnceLock::new();
    *INSN.get_or_init(detect_flush)
}

/// Fault injection: which store to crash at, and how.
struct CrashPlan {
    at: u64,
    torn: bool,
}

fn crash_plan() -> Option<&'static CrashPlan> {
    static PLAN: OnceLock<Option<CrashPlan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let at = std::env::var("PMGAS_CRASH_AT_PERSIST").ok()?.parse().ok()?;
        let torn = std::env::var("PMGAS_CRASH_MODE").is_ok_and(|m| m == "torn");
        Some(CrashPlan { at, torn })
    })
    .as_ref()
}

static STORES: AtomicU64 = AtomicU64::new(0);

/// Number of persist steps this process has executed, counted only while a crash is
/// planned (`PMGAS_CRASH_AT_PERSIST`): a process-wide counter would be one more contended
/// cache line on every allocation.
pub fn persist_count() -> u64 {
    STORES.load(Ordering::Relaxed)
}

/// Counts a persist step if a crash is planned; returns the plan when this is its step.
#[inline]
fn planned_crash_here() -> Option<&'static CrashPlan> {
    let plan = crash_plan()?;
    let n = STORES.fetch_add(1, Ordering::Relaxed) + 1;
    (plan.at == n).then_some(plan)
}

/// A mapped pool: devdax or a tmpfs file.
pub struct Pmem {
    region: MappedRegion,
}

impl Pmem {
    pub fn new(region: MappedRegion) -> Self {
        Self { region }
    }

    pub fn region(&self) -> &MappedRegion {
        &self.region
    }

    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    fn check(&self, offset: u64, len: usize) -> usize {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.len()),
            "pool access [{offset}, +{len}) outside {} bytes",
            self.len()
        );
        offset as usize
    }

    /// Copies bytes out of the pool.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let start = self.check(offset, out.len());
        // SAFETY: in bounds of the live mapping (checked); `out` cannot overlap it since
        // the mapping is never handed out as a Rust reference.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.region.as_ptr().add(start),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// Reads `len` bytes into a new vector.
    pub fn read_vec(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v);
        v
    }

    /// One persist step: writes `data` at `offset`, writes back every line it touched and
    /// fences. When this returns, the bytes are durable. `step` names the step in
    /// PERSISTENCE.md (for logs and crash reports).
    pub fn store(&self, step: &'static str, offset: u64, data: &[u8]) {
        let start = self.check(offset, data.len());
        let mut len = data.len();
        let crash = planned_crash_here();
        if let Some(plan) = crash {
            // A torn store lands a prefix of its 8-byte words, at least one but not all.
            len = if plan.torn && data.len() > 8 {
                (data.len() / 8 / 2).max(1) * 8
            } else {
                0
            };
            eprintln!(
                "pmgas: injected crash at persist step {} ({step}), {len} of {} bytes written",
                plan.at,
                data.len()
            );
        }
        crate::audit::record('W', start as u64, len as u64);
        // SAFETY: in bounds of the live, writable mapping (checked above).
        unsafe { write_words(self.region.as_ptr().add(start), &data[..len]) };
        self.persist_range(start, len);
        if crash.is_some() {
            std::process::abort();
        }
    }

    /// One persist step on an 8-byte word: atomically ORs (`set = true`) or AND-NOTs `mask`
    /// into the aligned word at `offset`, writes its line back and fences. Returns the old
    /// word. The read-modify-write is atomic with respect to other threads doing the same,
    /// and an aligned 8-byte word is the unit a power failure leaves whole.
    pub fn update_bits(&self, step: &'static str, offset: u64, mask: u64, set: bool) -> u64 {
        let word = self.word(offset);
        if let Some(plan) = planned_crash_here() {
            // An 8-byte store cannot tear: crash before it.
            eprintln!(
                "pmgas: injected crash at persist step {} ({step}), word not written",
                plan.at
            );
            std::process::abort();
        }
        let old = if set {
            word.fetch_or(mask, Ordering::AcqRel)
        } else {
            word.fetch_and(!mask, Ordering::AcqRel)
        };
        self.persist_range(offset as usize, 8);
        old
    }

    /// Atomically loads the aligned 8-byte word at `offset`.
    pub fn load_word(&self, offset: u64) -> u64 {
        self.word(offset).load(Ordering::Acquire)
    }

    /// The aligned 8-byte word at `offset`, for atomic access.
    fn word(&self, offset: u64) -> &std::sync::atomic::AtomicU64 {
        let start = self.check(offset, 8);
        assert!(
            start.is_multiple_of(8),
            "word at {offset} is not 8-byte aligned"
        );
        // SAFETY: the word is in bounds, 8-byte aligned, inside a live shared mapping that
        // lives as long as `self`; such words are only accessed atomically (bitmaps).
        unsafe {
            &*self
                .region
                .as_ptr()
                .add(start)
                .cast::<std::sync::atomic::AtomicU64>()
        }
    }

    /// Stores zeroes over a range (formatting), in one persist step.
    pub fn zero(&self, step: &'static str, offset: u64, len: u64) {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.store(step, offset + done, &zeros[..n]);
            done += n as u64;
        }
    }

    fn persist_range(&self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let base = self.region.as_ptr() as usize;
        let first = (base + start) & !(LINE_BYTES - 1);
        let end = base + start + len;
        let insn = flush_insn();
        let mut line = first;
        while line < end {
            // SAFETY: `line` is inside (or the line-aligned start of) the live mapping.
            unsafe { flush_line(insn, line as *const u8) };
            line += LINE_BYTES;
        }
        fence();
        crate::audit::record('P', (first - base) as u64, (line - first) as u64);
    }
}

/// Copies `data` to `dst` using aligned 8-byte stores for the aligned middle.
///
/// # Safety
///
/// `dst..dst+data.len()` must be valid for writes and must not overlap `data`.
unsafe fn write_words(dst: *mut u8, data: &[u8]) {
    let mut i = 0;
    let head = (dst as usize).next_multiple_of(8) - dst as usize;
    // SAFETY: every offset written is below data.len(), inside `dst`'s range; the
    // middle stores are 8-byte aligned because `head` skips to alignment.
    unsafe {
        while i < head.min(data.len()) {
            std::ptr::write_volatile(dst.add(i), data[i]);
            i += 1;
        }
        while i + 8 <= data.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[i..i + 8]);
            std::ptr::write_volatile(dst.add(i).cast::<u64>(), u64::from_ne_bytes(w));
            i += 8;
        }
        while i < data.len() {
            std::ptr::write_volatile(dst.add(i), data[i]);
            i += 1;
        }
    }
}

/// # Safety
///
/// `line` must point into mapped memory.
#[inline]
unsafe fn flush_line(insn: FlushInsn, line: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions only write back a cache line of mapped memory; the CPU
    // supports the one chosen (CPUID).
    unsafe {
        match insn {
            FlushInsn::Clwb => {
                std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags))
            }
            FlushInsn::Clflushopt => {
                std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags))
            }
            FlushInsn::Clflush => {
                std::arch::asm!("clflush [{0}]", in(reg) line, options(nostack, preserves_flags))
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (insn, line);
}

#[inline]
fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(tag: &str, len: u64) -> (Pmem, std::path::PathBuf) {
        let path =
            std::path::PathBuf::from(format!("/dev/shm/pmgas-pmem-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        (
            Pmem::new(MappedRegion::open(&path, Some(len)).unwrap()),
            path,
        )
    }

    #[test]
    fn store_then_read_back_at_any_alignment() {
        let (p, path) = pool("rw", 1 << 16);
        for (off, len) in [(0u64, 1usize), (3, 13), (64, 64), (61, 200), (4095, 9)] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(off as u8))
                .collect();
            p.store("test", off, &data);
            assert_eq!(p.read_vec(off, len), data, "off {off} len {len}");
        }
        p.zero("test", 0, 1 << 16);
        assert!(p.read_vec(0, 1 << 16).iter().all(|&b| b == 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn detects_a_flush_instruction() {
        // Every x86_64 CPU has at least CLFLUSH; the choice is made once.
        assert_eq!(flush_insn(), flush_insn());
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_bounds_is_a_programmer_error() {
        let (p, _path) = pool("oob", 4096);
        p.store("test", 4090, &[0; 8]);
    }
}
