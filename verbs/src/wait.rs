//! Sleeping until something happens, for control-plane loops that must not hold a core
//! while idle: `poll(2)` over completion-channel, rdma_cm and [`Notifier`] descriptors.
//!
//! The pattern: spin a little while work flows; when idle, arm every endpoint
//! ([`crate::Endpoint::arm`]: it re-checks its CQ after arming, so nothing that arrived
//! meanwhile is slept through), then [`wait_readable`] on their descriptors with a bound.

use std::time::Duration;

use crate::error::{Error, Result};

/// Waits until one of `fds` is readable or `timeout` passes. Returns whether one was.
pub fn wait_readable(fds: &[i32], timeout: Duration) -> Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // A sub-millisecond bound still sleeps (at least) a millisecond rather than spinning.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    // SAFETY: `pfds` is a valid array of pollfd of the given length.
    let ready = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if ready < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::Verb {
            verb: "poll",
            context: String::new(),
            source: err,
        });
    }
    Ok(ready > 0)
}

/// An eventfd that other threads poke to wake a loop sleeping in [`wait_readable`].
pub struct Notifier {
    fd: i32,
}

impl Notifier {
    pub fn new() -> Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Verb {
                verb: "eventfd",
                context: String::new(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { fd })
    }

    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// Wakes the waiter (cheap; any number of pokes before it wakes count as one).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.fd, (&raw const one).cast(), 8) };
    }

    /// Resets it, after waking.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd, (&raw mut v).cast(), 8) };
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_notifier_wakes_a_waiter_and_resets() {
        let n = std::sync::Arc::new(Notifier::new().unwrap());
        let t = Instant::now();
        assert!(!wait_readable(&[n.fd()], Duration::from_millis(30)).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(25));
        let poker = std::sync::Arc::clone(&n);
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            poker.notify();
        });
        assert!(wait_readable(&[n.fd()], Duration::from_secs(10)).unwrap());
        h.join().unwrap();
        n.drain();
        assert!(
            !wait_readable(&[n.fd()], Duration::ZERO).unwrap(),
            "drained"
        );
    }
}
