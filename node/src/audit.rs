//! The persistence audit: proof that every acknowledged update was written back before
//! its acknowledgement left the node.
//!
//! A crash of a process cannot show a missing flush on emulated PM (the page cache keeps
//! the bytes), so a build with the `persist-audit` feature records, when
//! `PMGAS_PERSIST_AUDIT=<file>` is set, one line per event of the one persistence function
//! and of the data path, in the order they happen on each thread:
//!
//! - `W <offset> <len>`: bytes of the mapping stored (not yet durable);
//! - `P <offset> <len>`: the cache lines covering that range written back and fenced;
//! - `A <offset> <len>`: an acknowledgement is about to be sent for these bytes (a
//!   backup's ReplicateAck, a primary's UpdateAck).
//!
//! [`check`] replays a file: every byte acknowledged must have been written back after it
//! was last stored. `pmgas-node audit-check` runs it; the rig's data-path test runs that on
//! every node.

use std::fmt::Write as _;

/// What [`check`] found in an audit file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AuditSummary {
    pub stores: u64,
    pub writebacks: u64,
    pub acks: u64,
}

/// Replays an audit file. Returns the counts, or the first acknowledgements of bytes that
/// were stored and not written back before it (at most 8 named).
pub fn check(text: &str) -> Result<AuditSummary, String> {
    let mut summary = AuditSummary::default();
    // Byte ranges [start, end) stored and not yet written back; few at any time.
    let mut dirty: Vec<(u64, u64)> = vec![];
    let mut violations = String::new();
    let mut count = 0usize;
    for (i, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let (Some(kind), Some(off), Some(len)) = (f.next(), f.next(), f.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(format!("line {}: malformed: {line:?}", i + 1));
        };
        let parse = |v: &str| {
            v.parse::<u64>()
                .map_err(|e| format!("line {}: {v:?}: {e}", i + 1))
        };
        let start = parse(off)?;
        let end = start
            .checked_add(parse(len)?)
            .ok_or_else(|| format!("line {}: range overflows", i + 1))?;
        match kind {
            "W" => {
                summary.stores += 1;
                if start < end {
                    dirty.push((start, end));
                }
            }
            "P" => {
                summary.writebacks += 1;
                dirty = dirty
                    .into_iter()
                    .flat_map(|(s, e)| subtract((s, e), (start, end)))
                    .collect();
            }
            "A" => {
                summary.acks += 1;
                if let Some(&(s, e)) = dirty.iter().find(|&&(s, e)| s < end && start < e) {
                    count += 1;
                    if count <= 8 {
                        let _ = writeln!(
                            violations,
                            "line {}: acknowledged [{start}, {end}) while [{}, {}) was stored and not written back",
                            i + 1,
                            s.max(start),
                            e.min(end)
                        );
                    }
                }
            }
            other => return Err(format!("line {}: unknown record {other:?}", i + 1)),
        }
    }
    if count > 0 {
        return Err(format!(
            "{count} acknowledgements of bytes not written back:\n{violations}"
        ));
    }
    Ok(summary)
}

/// `a` less `b`: zero, one or two ranges.
fn subtract(a: (u64, u64), b: (u64, u64)) -> Vec<(u64, u64)> {
    let mut out = vec![];
    if a.0 < b.0.min(a.1) {
        out.push((a.0, b.0.min(a.1)));
    }
    if a.1 > b.1.max(a.0) {
        out.push((b.1.max(a.0), a.1));
    }
    out
}

#[cfg(feature = "persist-audit")]
mod recorder {
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    fn file() -> Option<&'static Mutex<std::fs::File>> {
        static FILE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
        FILE.get_or_init(|| {
            let path = std::env::var_os("PMGAS_PERSIST_AUDIT")?;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        })
        .as_ref()
    }

    /// Appends one record (one write(2), so lines stay whole).
    pub fn record(kind: char, offset: u64, len: u64) {
        if let Some(f) = file() {
            let line = format!("{kind} {offset} {len}\n");
            let _ = f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(line.as_bytes());
        }
    }
}

/// Records an event (a no-op without the `persist-audit` feature).
#[inline]
pub fn record(kind: char, offset: u64, len: u64) {
    #[cfg(feature = "persist-audit")]
    recorder::record(kind, offset, len);
    #[cfg(not(feature = "persist-audit"))]
    let _ = (kind, offset, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_after_its_writeback_passes() {
        let s = check("W 100 8\nP 64 64\nA 100 8\n").unwrap();
        assert_eq!(
            s,
            AuditSummary {
                stores: 1,
                writebacks: 1,
                acks: 1
            }
        );
    }

    #[test]
    fn an_ack_without_a_writeback_fails() {
        let e = check("W 100 8\nA 100 8\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_writeback_of_other_lines_does_not_count() {
        assert!(check("W 100 8\nP 128 64\nA 100 8\n").is_err());
        // Partly covered: the uncovered tail is still dirty.
        assert!(check("W 100 100\nP 64 64\nA 100 100\n").is_err());
        assert!(check("W 100 100\nP 64 64\nP 128 128\nA 100 100\n").is_ok());
    }

    #[test]
    fn a_store_after_the_writeback_makes_the_bytes_dirty_again() {
        assert!(check("W 0 8\nP 0 64\nW 0 8\nA 0 8\n").is_err());
    }

    #[test]
    fn an_ack_before_the_writeback_fails_even_if_it_comes_later() {
        assert!(check("W 0 8\nA 0 8\nP 0 64\n").is_err());
    }

    #[test]
    fn other_ranges_dirty_do_not_matter() {
        assert!(check("W 0 8\nW 4096 8\nP 4096 64\nA 4096 8\n").is_ok());
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(check("W 0\n").is_err());
        assert!(check("X 0 8\n").is_err());
        assert!(check("W a 8\n").is_err());
        assert!(check("W 18446744073709551615 2\n").is_err());
    }
}
