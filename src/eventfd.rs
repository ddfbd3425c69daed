//! eventfd(2) helpers: how the supervisor and the binder wake a worker.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Writes 1 to eventfd `fd`, waking the worker that watches it.
pub fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: `fd` is an eventfd kept open by the Arc in the handle; the buffer is
    // 8 valid bytes. A failed write (counter full) still leaves the worker woken.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

/// Creates a non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads (and so resets) an eventfd counter; never blocks (the fd is non-blocking).
pub fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: `v` is 8 writable bytes; `fd` is an open eventfd.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
}
