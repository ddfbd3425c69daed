//! Capabilities per thread: least privilege after start-up.
//!
//! Linux keeps capability sets per thread (capabilities(7), "Thread capability
//! sets"), and a new thread starts with a copy of its spawner's. So after
//! start-up:
//! - every worker thread drops everything as soon as its ring (or epoll
//!   instance) exists, before it touches a connection ([`drop_all`]);
//! - the main (control) thread drops everything once its admin endpoint and
//!   takeover socket are bound ([`drop_all`]); reload and namespace watching go
//!   through the binder for whatever needs a capability;
//! - the binder keeps only [`BINDER_CAPS`] (those of them the process has) and
//!   drops the rest at its start ([`keep_only`]).
//!
//! Each drop clears the bounding set first (PR_CAPBSET_DROP needs CAP_SETPCAP
//! in the effective set, prctl(2); without it the bounding set is left as it is:
//! it limits only what an execve(2) could gain, and ringress never execs), then
//! the inheritable set (which clears the ambient set too, capabilities(7)), then
//! the effective and permitted sets (capset(2)). Uses the `caps` crate, whose
//! calls with `tid = None` act on the calling thread only.

use caps::{CapSet, Capability, CapsHashSet};
use std::io;

/// What the binder thread keeps, and why (Linux 6.1 and 6.18):
/// - `CAP_SYS_ADMIN`: setns(2) into another network namespace;
/// - `CAP_NET_BIND_SERVICE`: listeners on ports below 1024 (ip(7));
/// - `CAP_NET_ADMIN`: SO_ATTACH_FILTER, the SYN-dropping filter of a removed TCP
///   listener (measured: EPERM without it on Linux 6.18, even with CAP_SYS_ADMIN
///   or CAP_BPF);
/// - `CAP_SYS_PTRACE`: opening `/proc/PID/ns/net` of a process whose permitted
///   set is not a subset of the binder's effective set (ptrace(2), "Ptrace access
///   mode checking", PTRACE_MODE_READ_FSCREDS; e.g. a namespace held by a root
///   process with full capabilities).
pub const BINDER_CAPS: [Capability; 4] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_PTRACE,
];

fn err(what: &str, e: caps::errors::CapsError) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Drops every capability of the calling thread: bounding set (when it holds
/// CAP_SETPCAP), inheritable, ambient, effective and permitted.
///
/// # Errors
/// capget(2)/capset(2)/prctl(2) failed (not expected: lowering never needs a
/// capability, except the bounding set, which is skipped without CAP_SETPCAP).
pub fn drop_all() -> io::Result<()> {
    keep_only(&[]).map(drop)
}

/// Keeps only those of `keep` that the calling thread has in its permitted set
/// (in the effective and permitted sets) and drops every other capability of the
/// calling thread, as [`drop_all`] does. Returns what it kept.
///
/// # Errors
/// As [`drop_all`].
pub fn keep_only(keep: &[Capability]) -> io::Result<CapsHashSet> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| err("capget", e))?;
    let kept: CapsHashSet = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::all() {
            if !kept.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c).map_err(|e| err("PR_CAPBSET_DROP", e))?;
            }
        }
    }
    // Clearing the inheritable set clears the ambient set as well.
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("capset inheritable", e))?;
    caps::set(None, CapSet::Effective, &kept).map_err(|e| err("capset effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| err("capset permitted", e))?;
    Ok(kept)
}

/// Names of `set`, sorted, for logs (e.g. `["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]`).
pub fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops run on a thread of their own: the test harness's threads keep theirs.
    #[test]
    fn drops_are_per_thread() {
        let before = caps::read(None, CapSet::Permitted).unwrap();
        let (kept, after) = std::thread::spawn(|| {
            let kept = keep_only(&[Capability::CAP_NET_BIND_SERVICE]).unwrap();
            let eff = caps::read(None, CapSet::Effective).unwrap();
            let prm = caps::read(None, CapSet::Permitted).unwrap();
            assert_eq!(eff, prm);
            drop_all().unwrap();
            let none = caps::read(None, CapSet::Permitted).unwrap();
            assert!(none.is_empty(), "{none:?}");
            (kept, eff)
        })
        .join()
        .unwrap();
        assert_eq!(kept, after);
        assert!(kept.len() <= 1);
        assert_eq!(
            before.contains(&Capability::CAP_NET_BIND_SERVICE),
            kept.contains(&Capability::CAP_NET_BIND_SERVICE)
        );
        // This thread is untouched.
        assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), before);
    }
}
