//! Signals as messages: `main` blocks SIGINT, SIGTERM and SIGHUP as its first
//! instruction, before the command line is parsed and the config is loaded, so
//! every thread inherits the mask (pthread_sigmask(3)) and a signal sent while
//! `run` starts up waits, pending, instead of killing the process with its
//! default action. The supervisor reads them from a signalfd(2) in its control
//! loop ([`crate::control`]), which also sees the ones that became pending before
//! it existed (signalfd(2): "the set of signals readable via the file descriptor
//! includes those pending"); the demo polls them with sigtimedwait(2) ([`wait`]).
//! No signal handler and no extra thread is needed. `check` unblocks them again
//! ([`unblock`]): it keeps the default dispositions.
//!
//! A signal that arrives before ringress runs any code of its own (between
//! execve(2) and `main`: the dynamic loader, the runtime's set-up) still gets the
//! default action; a supervisor that must close that window starts ringress with
//! the signals already blocked (the mask is inherited across execve(2)).

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

/// Unblocks the handled signals in the calling thread: a pending one is delivered
/// at once, with its disposition (by default: the process ends).
///
/// # Errors
/// pthread_sigmask(3) failed (EINVAL only, which cannot happen with these signals).
pub fn unblock() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None)
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
