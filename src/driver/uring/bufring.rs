//! Provided-buffer rings (`IORING_REGISTER_PBUF_RING`, Linux 5.19): buffers the
//! kernel picks from for receives with `IOSQE_BUFFER_SELECT`.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19): `count` buffers
/// of `size` bytes that the kernel picks from for receives.
pub(super) struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_bytes: usize,
    bufs: *mut u8,
    bufs_bytes: usize,
    count: u16,
    size: usize,
    tail: u16,
}

/// An anonymous private read-write mapping of `len` bytes (mmap(2)).
///
/// # Errors
/// The mmap(2) errno (ENOMEM).
pub(super) fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous private mapping, no fd, no fixed address; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

impl BufRing {
    pub(super) fn new(ring: &IoUring, count: u16, size: usize, bgid: u16) -> io::Result<BufRing> {
        let ring_bytes = count as usize * std::mem::size_of::<types::BufRingEntry>();
        let bufs_bytes = count as usize * size;
        let r = mmap_anon(ring_bytes)?;
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: `r` is the mapping of `ring_bytes` made just above.
                unsafe { libc::munmap(r.cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut br = BufRing {
            ring: r.cast(),
            ring_bytes,
            bufs,
            bufs_bytes,
            count,
            size,
            tail: 0,
        };
        // SAFETY: the ring memory is page aligned, `count` entries long, a power of
        // two, and stays mapped until Drop, which runs after the ring is gone
        // (`UringBackend` drops the ring first, or leaks both).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(r as u64, count, bgid, 0)?;
        }
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    /// Adds buffer `bid` at the tail (not yet visible to the kernel).
    pub(super) fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, inside the ring mapping; the kernel reads only entries
        // between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < count, so the buffer lies inside the `bufs` mapping.
        e.set_addr(unsafe { self.bufs.add(bid as usize * self.size) } as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel (release store of the tail).
    pub(super) fn publish(&self) {
        // SAFETY: the tail field lives in entry 0's reserved bytes (liburing
        // io_uring_buf_ring layout), a naturally aligned u16 shared with the kernel.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which the kernel has just filled.
    pub(super) fn data(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: bid < count (the kernel only reports ids we gave it) and the kernel
        // is done with the buffer until we push it again.
        unsafe {
            std::slice::from_raw_parts(self.bufs.add((bid % self.count) as usize * self.size), len)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` with these lengths; the ring that
        // used them has been dropped before (`UringBackend::drop`), or this is never run (leaked).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.bufs.cast(), self.bufs_bytes);
        }
    }
}
