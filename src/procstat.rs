//! Process figures read from /proc: OS threads, open fds, resident memory.

use std::io;

/// OS threads of process `pid` (entries of `/proc/PID/task`).
///
/// # Errors
/// The process does not exist, or /proc is not mounted.
pub fn threads(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
///
/// # Errors
/// As [`threads`]; also EACCES for another user's process without privileges.
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
///
/// # Errors
/// As [`threads`], or `InvalidData` when the line is missing.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/PID/status"))
}

/// This process's soft RLIMIT_NOFILE (count of fds; getrlimit(2)).
///
/// # Errors
/// getrlimit(2) failed.
pub fn nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (as servers such as
/// nginx and HAProxy do): every connection costs an fd, a proxied one two.
/// Returns the new soft limit (count of fds).
///
/// # Errors
/// getrlimit(2) or setrlimit(2) failed.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// RLIMIT_NOFILE now: (soft, hard) limits on open files (counts;
/// getrlimit(2)); `u64::MAX` for both if it cannot be read (RLIM_INFINITY reads
/// as `u64::MAX` too).
pub fn nofile_limits() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (u64::MAX, u64::MAX);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Whether this process has CAP_SYS_ADMIN in its effective set (bit 21 of `CapEff`
/// in `/proc/self/status`; capabilities(7)). Needed for setns(2) and `ip netns add`.
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Fds [`reserve_fd_table`] makes room for at least, when RLIMIT_NOFILE allows
/// (count): sessions up to this many fds open no table growth either.
pub const FD_TABLE_MIN: u64 = 16_384;

/// Grows this process's fd table so that fds below `n` (capped at the
/// RLIMIT_NOFILE soft limit) need no further growth, by placing a throwaway
/// duplicate at `n - 1` (fcntl(2) `F_DUPFD_CLOEXEC`) and closing it; the table
/// never shrinks. Call it while the process has one thread: the kernel grows a
/// table shared by threads only after an RCU grace period
/// (`expand_fdtable`: `synchronize_rcu()` when `files->count > 1`), which at
/// 10,000 listeners stalled the binder for milliseconds at each doubling (seen
/// as half of the bind phase off-CPU on Linux 6.18). Costs 8 bytes per fd slot
/// (128 KiB for [`FD_TABLE_MIN`]). Returns the table size reserved (count).
///
/// # Errors
/// open(2) of `/` or fcntl(2) failed (EMFILE, EINVAL above the limit).
pub fn reserve_fd_table(n: u64) -> io::Result<u64> {
    let (soft, _) = nofile_limits();
    let n = n.min(soft).min(i32::MAX as u64);
    if n < 2 {
        return Ok(n);
    }
    let dir = std::fs::File::open("/")?;
    // SAFETY: fcntl on an fd we own; the result is checked and, if an fd, owned
    // below.
    let dup = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            libc::F_DUPFD_CLOEXEC,
            (n - 1) as libc::c_int,
        )
    };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own, closed here.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) });
    Ok(n)
}

/// Size of the fd table of process `pid` (`FDSize` of `/proc/PID/status`: slots,
/// not open fds).
///
/// # Errors
/// As [`rss_kib`].
pub fn fd_table_size(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no FDSize in /proc/PID/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_figures() {
        let me = std::process::id();
        assert!(threads(me).unwrap() >= 1);
        assert!(open_fds(me).unwrap() >= 3);
        assert!(rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn the_fd_table_is_reserved() {
        let want = 4096.min(nofile_limits().0);
        let got = reserve_fd_table(want).unwrap();
        assert_eq!(got, want);
        let size = fd_table_size(std::process::id()).unwrap();
        assert!(size >= want, "FDSize {size} < {want}");
    }
}
