//! Pipes for splice(2) relays: the kernel-side window of one proxy direction.
//!
//! A direction relayed with splice(2) moves its bytes socket → pipe → socket
//! ([`crate::driver::backend::Op::Splice`]) and never copies them to user space.
//! The pipe is the direction's window: the worker moves at most `buffer_bytes`
//! into it (the same bound as the user-space window), and its capacity is set
//! to that with `F_SETPIPE_SZ` (fcntl(2), Linux 2.6.35), which the kernel
//! rounds up to a power-of-two number of pages and caps, for a process without
//! CAP_SYS_RESOURCE (a worker has none), at `/proc/sys/fs/pipe-max-size`
//! (default 1 MiB); past `/proc/sys/fs/pipe-user-pages-soft` a user's new pipes
//! get 2 pages and cannot grow (pipe(7)). A smaller pipe only makes the splices
//! shorter: the window still holds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// A non-blocking pipe, both ends owned: closed when dropped, or handed to the
/// backend's [`crate::driver::backend::Backend::close`] once no operation refers
/// to either end.
#[derive(Debug)]
pub(crate) struct Pipe {
    /// The read end (what is spliced out to a socket).
    pub r: OwnedFd,
    /// The write end (what a socket is spliced into).
    pub w: OwnedFd,
    /// What the pipe can hold (bytes, as `F_GETPIPE_SZ` says).
    pub cap: usize,
}

impl Pipe {
    /// A pipe (pipe2(2), `O_NONBLOCK | O_CLOEXEC`) sized to hold `bytes` (rounded
    /// up by the kernel; capped at `/proc/sys/fs/pipe-max-size`). A size the
    /// kernel refuses (EPERM over the user's pipe pages) leaves the default.
    ///
    /// # Errors
    /// pipe2(2) failed (EMFILE, ENFILE).
    pub fn new(bytes: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2(2) writes two fds into the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are new and ours alone.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = bytes.min(max_size()).min(i32::MAX as usize) as libc::c_int;
        // SAFETY: fcntl(2) on a pipe fd we own; no pointers.
        let mut cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        if cap <= 0 {
            // SAFETY: as above.
            cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        Ok(Pipe {
            r,
            w,
            cap: usize::try_from(cap).unwrap_or(0),
        })
    }
}

/// splice(2) of up to `len` bytes from `fd_in` to `fd_out` (one of them a
/// pipe), `SPLICE_F_NONBLOCK | SPLICE_F_MOVE`, no offsets: the bytes moved (0:
/// end of stream on a socket `fd_in`), or the errno (EAGAIN: nothing could
/// move now).
pub(crate) fn splice_nonblock(fd_in: RawFd, fd_out: RawFd, len: u32) -> Result<i32, i32> {
    // SAFETY: splice(2) between two fds the caller keeps open for the call; no
    // offsets (null pointers).
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n >= 0 {
        Ok(i32::try_from(n).unwrap_or(i32::MAX))
    } else {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// `/proc/sys/fs/pipe-max-size` (bytes), read once; 1 MiB (the kernel's
/// default) if it cannot be read.
fn max_size() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_is_sized_to_the_window() {
        let p = Pipe::new(256 * 1024).unwrap();
        assert!(p.cap >= 256 * 1024.min(max_size()), "{}", p.cap);
        let small = Pipe::new(4096).unwrap();
        assert_eq!(small.cap, 4096);
    }
}
