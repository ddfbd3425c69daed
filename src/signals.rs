//! Signals as messages: the supervisor blocks SIGINT, SIGTERM and SIGHUP in every
//! thread (threads inherit the mask) and reads them from a signalfd(2) in its
//! control loop ([`crate::control`]); the demo polls them with sigtimedwait(2)
//! ([`wait`]). No signal handler and no extra thread is needed.

use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// The signals ringress handles.
pub fn handled() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGINT);
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGHUP);
    s
}

/// Blocks the handled signals in the calling thread; call before spawning threads.
///
/// # Errors
/// pthread_sigmask(3) failed (EINVAL only, which cannot happen with these signals).
pub fn block() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None)
}

/// Waits up to `timeout` for a handled signal; `None` when none arrived.
pub fn wait(timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let set = handled();
    // SAFETY: `set` is a valid sigset_t, `ts` a valid timespec; siginfo may be null.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if r > 0 {
        Signal::try_from(r).ok()
    } else {
        None
    }
}
