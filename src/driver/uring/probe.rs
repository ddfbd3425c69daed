//! What this kernel's io_uring offers ringress, found once per process.
//!
//! [`probe()`] sets up one throwaway ring with the best setup flags the kernel
//! takes, reads the `IORING_FEAT_*` bits io_uring_setup(2) reported, asks
//! `IORING_REGISTER_PROBE` (Linux 5.6) which opcodes exist, registers a small
//! provided-buffer ring (`IORING_REGISTER_PBUF_RING`, 5.19), and tries the
//! multishot flags live: they are flags of an opcode, not opcodes, so the probe
//! register cannot tell. Each live test submits the multishot request on an idle
//! socket, then an `IORING_OP_ASYNC_CANCEL` (5.5) of it: a kernel that does not
//! know the flag fails the request at once with EINVAL, a kernel that does keeps it
//! armed until the cancel ends it with ECANCELED.
//!
//! Two environment variables steer it (read once, for tests and debugging):
//! - `RINGRESS_URING_SETUP=plain`: the path of Linux 6.1-era ringress: no setup
//!   flag is tried, and the fast-path features (multishot stream receive, bundles)
//!   are reported absent, so every stream receive is single-shot;
//! - `RINGRESS_URING_DISABLE=NAME,...` with names from [`DISABLE_NAMES`]: the probe
//!   reports those as absent, so that the fallback paths can be tested on a kernel
//!   that has everything.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// The environment variable that makes the probe report features as absent: a
/// comma-separated list of [`DISABLE_NAMES`].
pub const DISABLE_ENV: &str = "RINGRESS_URING_DISABLE";
/// The environment variable that, set to `plain`, makes the probe (and the
/// workers' rings) use no setup flag and report [`PLAIN_OFF`] absent.
pub const SETUP_ENV: &str = "RINGRESS_URING_SETUP";
/// The names [`DISABLE_ENV`] takes, each a field of [`UringProbe`] or of
/// [`SetupFlags`].
pub const DISABLE_NAMES: &[&str] = &[
    "multishot_accept",
    "multishot_recvmsg",
    "multishot_recv",
    "multishot_recv_limit",
    "recv_bundle",
    "defer_taskrun",
    "single_issuer",
    "coop_taskrun",
];

/// What `RINGRESS_URING_SETUP=plain` turns off besides the setup flags: the
/// stream-receive features the 6.1-era path did not use (names of
/// [`DISABLE_NAMES`]).
pub const PLAIN_OFF: &[&str] = &["multishot_recv", "multishot_recv_limit", "recv_bundle"];

/// Entries of the probe's throwaway ring (SQ and CQ entries).
const PROBE_ENTRIES: u32 = 8;
/// How long one live test waits for its two CQEs before it gives up (and leaks
/// what the kernel may still use).
const LIVE_WAIT: Duration = Duration::from_secs(2);
/// Buffer group of the probe's provided-buffer ring.
const PROBE_BGID: u16 = 1;
/// Buffers in the probe's provided-buffer ring (a power of two).
const PROBE_BUFS: u16 = 8;
/// Size of each of those buffers (bytes).
const PROBE_BUF_SIZE: usize = 256;
/// Offset of the buffers in the probe's mapping (bytes), past the ring entries.
const PROBE_BUF_OFFSET: usize = 1024;

/// Setup flags of a ring (io_uring_setup(2) `flags`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SetupFlags {
    /// `IORING_SETUP_SINGLE_ISSUER` (Linux 6.0): one task submits.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (Linux 6.1, needs SINGLE_ISSUER): completion
    /// work runs when the task waits for CQEs, not at any interrupt.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (Linux 5.19): no IPI to run completion work.
    pub coop_taskrun: bool,
}

impl SetupFlags {
    /// The combinations tried, best first: `SINGLE_ISSUER | DEFER_TASKRUN` (6.1),
    /// `SINGLE_ISSUER | COOP_TASKRUN` (6.0), `COOP_TASKRUN` (5.19), none.
    pub const PREFERENCE: [SetupFlags; 4] = [
        SetupFlags {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: false,
        },
        SetupFlags {
            single_issuer: true,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        SetupFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        SetupFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: false,
        },
    ];

    /// A ring builder with these flags.
    pub fn builder(&self) -> io_uring::Builder {
        let mut b = IoUring::builder();
        if self.single_issuer {
            b.setup_single_issuer();
        }
        if self.defer_taskrun {
            b.setup_defer_taskrun();
        }
        if self.coop_taskrun {
            b.setup_coop_taskrun();
        }
        b
    }

    /// Whether every flag set here is absent from `disabled` (names of
    /// [`DISABLE_NAMES`]).
    fn allowed(&self, disabled: &[String]) -> bool {
        let off = |n: &str| disabled.iter().any(|d| d == n);
        !(self.single_issuer && off("single_issuer")
            || self.defer_taskrun && off("defer_taskrun")
            || self.coop_taskrun && off("coop_taskrun"))
    }
}

impl fmt::Display for SetupFlags {
    /// `single_issuer|defer_taskrun`, ..., or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.single_issuer, "single_issuer"),
            (self.defer_taskrun, "defer_taskrun"),
            (self.coop_taskrun, "coop_taskrun"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// What this kernel's io_uring offers ringress, found once per process.
///
/// The booleans say what ringress may use: what the kernel has, minus what
/// `RINGRESS_URING_DISABLE` turns off. `features` and `opcodes` are what the kernel
/// reported, untouched by that variable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UringProbe {
    /// The kernel release (uname(2) `release`, e.g. `6.18.0`).
    pub kernel: String,
    /// The best setup flags the kernel took, in the order of
    /// [`SetupFlags::PREFERENCE`]; none with `RINGRESS_URING_SETUP=plain`.
    pub setup: SetupFlags,
    /// The `IORING_FEAT_*` bits io_uring_setup(2) reported in `io_uring_params`,
    /// without the prefix (`NODROP`, `FAST_POLL`, `EXT_ARG`, `RECVSEND_BUNDLE`,
    /// ...; the bits the io-uring crate names).
    pub features: Vec<&'static str>,
    /// Of the opcodes ringress uses or may use (`ACCEPT`, `RECV`, `SEND`,
    /// `RECVMSG`, `SENDMSG`, `CONNECT`, `ASYNC_CANCEL`, `POLL_ADD`, `TIMEOUT`,
    /// `LINK_TIMEOUT`, `CLOSE`, `SHUTDOWN`, `MSG_RING`, `SEND_ZC`, `SENDMSG_ZC`),
    /// those `IORING_REGISTER_PROBE` (Linux 5.6) says are supported; empty where
    /// the probe register itself is missing.
    pub opcodes: Vec<&'static str>,
    /// `IORING_REGISTER_PBUF_RING` works (provided-buffer rings, Linux 5.19).
    pub buf_ring: bool,
    /// `IORING_ACCEPT_MULTISHOT` on `IORING_OP_ACCEPT` works (Linux 5.19).
    pub multishot_accept: bool,
    /// `IORING_RECV_MULTISHOT` on `IORING_OP_RECVMSG` works (Linux 6.0).
    pub multishot_recvmsg: bool,
    /// `IORING_RECV_MULTISHOT` on `IORING_OP_RECV` works (Linux 6.0); false with
    /// `RINGRESS_URING_SETUP=plain`.
    pub multishot_recv: bool,
    /// A multishot `IORING_OP_RECV` takes a total byte limit in `sqe->optlen`
    /// and ends once it has received that much (Linux 6.18; before, a non-zero
    /// `optlen` fails the request with EINVAL); false with
    /// `RINGRESS_URING_SETUP=plain`.
    pub multishot_recv_limit: bool,
    /// `IORING_FEAT_RECVSEND_BUNDLE`: receives and sends may take several
    /// provided buffers at once (`IORING_RECVSEND_BUNDLE`, Linux 6.10); false
    /// with `RINGRESS_URING_SETUP=plain`.
    pub recv_bundle: bool,
}

/// The probe of this process: computed on the first call (from the environment
/// variables [`SETUP_ENV`] and [`DISABLE_ENV`] as they are then), then cached.
///
/// # Errors
/// A message naming why io_uring cannot be used: io_uring_setup(2) failed even
/// without setup flags (ENOSYS: no io_uring in this kernel; EPERM: disabled by
/// `kernel.io_uring_disabled` or a seccomp filter; ENOMEM: locked-memory limit).
pub fn probe() -> &'static Result<UringProbe, String> {
    static PROBE: OnceLock<Result<UringProbe, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let plain = std::env::var_os(SETUP_ENV).is_some_and(|v| v == "plain");
        let disabled = parse_disable(&std::env::var(DISABLE_ENV).unwrap_or_default());
        for d in &disabled {
            if !DISABLE_NAMES.contains(&d.as_str()) {
                tracing::warn!(name = %d, known = ?DISABLE_NAMES, "{DISABLE_ENV}: unknown name ignored");
            }
        }
        probe_with(plain, &disabled)
    })
}

/// The names in a `RINGRESS_URING_DISABLE` value: comma-separated, trimmed, empty
/// ones dropped.
pub(crate) fn parse_disable(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Probes io_uring now: no setup flag if `plain`; the names in `disabled` (of
/// [`DISABLE_NAMES`]) reported as absent.
///
/// # Errors
/// As [`probe()`].
pub(crate) fn probe_with(plain: bool, disabled: &[String]) -> Result<UringProbe, String> {
    let off = |n: &str| disabled.iter().any(|d| d == n) || plain && PLAIN_OFF.contains(&n);
    let attempts: &[SetupFlags] = if plain {
        &SetupFlags::PREFERENCE[3..]
    } else {
        &SetupFlags::PREFERENCE
    };
    let mut made = None;
    let mut last = None;
    for setup in attempts.iter().filter(|s| s.allowed(disabled)) {
        match setup.builder().build(PROBE_ENTRIES) {
            Ok(r) => {
                made = Some((r, *setup));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some((ring, setup)) = made else {
        let e = last.unwrap_or_else(|| io::Error::other("no setup flags to try"));
        return Err(format!("io_uring_setup failed: {e}"));
    };
    let features = feature_names(ring.params());
    let opcodes = supported_opcodes(&ring);
    let ext_arg = ring.params().is_feature_ext_arg();
    let recv_bundle = ring.params().is_feature_recvsend_bundle() && !off("recv_bundle");
    let mut live = Live {
        ring,
        bufs: None,
        msghdr: Box::new(
            // SAFETY: an all-zero msghdr is valid (no name, no iovec, no control).
            unsafe { std::mem::zeroed() },
        ),
        leak: false,
    };
    let buf_ring = live.register_bufs();
    // The live tests wait with a timeout (IORING_ENTER_EXT_ARG, 5.11); a kernel
    // without it has none of the multishot flags either.
    let multishot_accept = ext_arg && !off("multishot_accept") && live.multishot_accept();
    let multishot_recvmsg =
        ext_arg && buf_ring && !off("multishot_recvmsg") && live.multishot_recvmsg();
    let multishot_recv = ext_arg && buf_ring && !off("multishot_recv") && live.multishot_recv();
    let multishot_recv_limit =
        multishot_recv && !off("multishot_recv_limit") && live.multishot_recv_limit();
    live.finish();
    Ok(UringProbe {
        kernel: kernel_release(),
        setup,
        features,
        opcodes,
        buf_ring,
        multishot_accept,
        multishot_recvmsg,
        multishot_recv,
        multishot_recv_limit,
        recv_bundle,
    })
}

/// uname(2) `release`, or `unknown`.
fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is valid; uname fills it and NUL-terminates
    // every field.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: `release` is NUL-terminated within its array (uname(2)).
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The names of the `IORING_FEAT_*` bits set in `p` (kernel versions from
/// io_uring_setup(2)).
fn feature_names(p: &io_uring::Parameters) -> Vec<&'static str> {
    [
        (p.is_feature_single_mmap(), "SINGLE_MMAP"),     // 5.4
        (p.is_feature_nodrop(), "NODROP"),               // 5.5
        (p.is_feature_submit_stable(), "SUBMIT_STABLE"), // 5.5
        (p.is_feature_rw_cur_pos(), "RW_CUR_POS"),       // 5.6
        (p.is_feature_cur_personality(), "CUR_PERSONALITY"), // 5.6
        (p.is_feature_fast_poll(), "FAST_POLL"),         // 5.7
        (p.is_feature_poll_32bits(), "POLL_32BITS"),     // 5.9
        (p.is_feature_sqpoll_nonfixed(), "SQPOLL_NONFIXED"), // 5.11
        (p.is_feature_ext_arg(), "EXT_ARG"),             // 5.11
        (p.is_feature_native_workers(), "NATIVE_WORKERS"), // 5.12
        (p.is_feature_resource_tagging(), "RSRC_TAGS"),  // 5.13
        (p.is_feature_skip_cqe_on_success(), "CQE_SKIP"), // 5.17
        (p.is_feature_linked_file(), "LINKED_FILE"),     // 5.17
        (p.is_feature_recvsend_bundle(), "RECVSEND_BUNDLE"), // 6.10
        (p.is_feature_min_timeout(), "MIN_TIMEOUT"),     // 6.12
        (p.is_feature_no_iowait(), "NO_IOWAIT"),         // 6.15
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| n)
    .collect()
}

/// The opcodes ringress uses or may use, with the kernel that added each.
const OPCODES: &[(&str, u8)] = &[
    ("ACCEPT", opcode::Accept::CODE),            // 5.5
    ("RECV", opcode::Recv::CODE),                // 5.6
    ("SEND", opcode::Send::CODE),                // 5.6
    ("RECVMSG", opcode::RecvMsg::CODE),          // 5.3
    ("SENDMSG", opcode::SendMsg::CODE),          // 5.3
    ("CONNECT", opcode::Connect::CODE),          // 5.5
    ("ASYNC_CANCEL", opcode::AsyncCancel::CODE), // 5.5
    ("POLL_ADD", opcode::PollAdd::CODE),         // 5.1
    ("TIMEOUT", opcode::Timeout::CODE),          // 5.4
    ("LINK_TIMEOUT", opcode::LinkTimeout::CODE), // 5.5
    ("CLOSE", opcode::Close::CODE),              // 5.6
    ("SHUTDOWN", opcode::Shutdown::CODE),        // 5.11
    ("MSG_RING", opcode::MsgRingData::CODE),     // 5.18
    ("SEND_ZC", opcode::SendZc::CODE),           // 6.0
    ("SENDMSG_ZC", opcode::SendMsgZc::CODE),     // 6.1
    ("SPLICE", opcode::Splice::CODE),            // 5.7
];

/// Of [`OPCODES`], those the kernel supports (`IORING_REGISTER_PROBE`, 5.6).
fn supported_opcodes(ring: &IoUring) -> Vec<&'static str> {
    let mut p = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut p).is_err() {
        return Vec::new();
    }
    OPCODES
        .iter()
        .filter(|(_, code)| p.is_supported(*code))
        .map(|(n, _)| *n)
        .collect()
}

/// An anonymous private mapping (page aligned, zeroed), unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        Ok(Mapping {
            ptr: super::bufring::mmap_anon(len)?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new` with this length; nobody uses it any
        // more (the ring that did is gone: `Live::finish`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The probe's throwaway ring and everything its requests may point to.
struct Live {
    // Field order matters: the ring goes before the memory it was given.
    ring: IoUring,
    /// The provided-buffer ring: entries at offset 0, buffers at
    /// [`PROBE_BUF_OFFSET`].
    bufs: Option<Mapping>,
    /// The template of the multishot RECVMSG (no name, no control).
    msghdr: Box<libc::msghdr>,
    /// A live test gave up waiting: the kernel may still use this memory.
    leak: bool,
}

impl Live {
    /// Registers a provided-buffer ring of [`PROBE_BUFS`] buffers and fills it;
    /// `false` if the kernel refuses (before 5.19: EINVAL).
    fn register_bufs(&mut self) -> bool {
        let Ok(m) = Mapping::new(PROBE_BUF_OFFSET + PROBE_BUFS as usize * PROBE_BUF_SIZE) else {
            return false;
        };
        let entries = m.ptr.cast::<types::BufRingEntry>();
        for bid in 0..PROBE_BUFS {
            // SAFETY: bid < PROBE_BUFS, whose entries (16 bytes each) fit before
            // PROBE_BUF_OFFSET inside the mapping; the kernel does not see them yet.
            let e = unsafe { &mut *entries.add(bid as usize) };
            // SAFETY: the buffer lies inside the mapping (offset + bid * size < len).
            let addr = unsafe { m.ptr.add(PROBE_BUF_OFFSET + bid as usize * PROBE_BUF_SIZE) };
            e.set_addr(addr as u64);
            e.set_len(PROBE_BUF_SIZE as u32);
            e.set_bid(bid);
        }
        // SAFETY: the tail lives in entry 0's reserved bytes (liburing
        // io_uring_buf_ring layout), a naturally aligned u16 of the mapping.
        unsafe {
            let tail = types::BufRingEntry::tail(entries) as *const AtomicU16;
            (*tail).store(PROBE_BUFS, Ordering::Release);
        }
        // SAFETY: the entries are page aligned (mmap), PROBE_BUFS long, a power of
        // two; the mapping is kept in `self.bufs` and outlives the ring (field
        // order, and `finish` drops the ring first).
        let ok = unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                m.ptr as u64,
                PROBE_BUFS,
                PROBE_BGID,
                0,
            )
        }
        .is_ok();
        if ok {
            self.bufs = Some(m);
        }
        ok
    }

    /// Multishot ACCEPT (5.19) on an idle non-blocking TCP listener on a wildcard
    /// address (loopback may be down), then its cancel.
    fn multishot_accept(&mut self) -> bool {
        let Some(l) = wildcard(TcpListener::bind) else {
            return false;
        };
        if l.set_nonblocking(true).is_err() {
            return false;
        }
        let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build();
        // SAFETY: a multishot accept points to no memory (no address out).
        let res = unsafe { self.op_then_cancel(e, true) };
        verdict("multishot accept", res)
    }

    /// Multishot RECVMSG (6.0) from the provided-buffer ring on an idle UDP
    /// socket, then its cancel.
    fn multishot_recvmsg(&mut self) -> bool {
        let Some(s) = wildcard(UdpSocket::bind) else {
            return false;
        };
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let e =
            opcode::RecvMsgMulti::new(types::Fd(s.as_raw_fd()), &*self.msghdr, PROBE_BGID).build();
        // SAFETY: the msghdr template is boxed in `self` and the buffers are in
        // `self.bufs`; both stay until the CQEs, or forever when `leak` is set.
        let res = unsafe { self.op_then_cancel(e, false) };
        verdict("multishot recvmsg", res)
    }

    /// Multishot RECV (6.0) from the provided-buffer ring on an idle UDP socket,
    /// then its cancel.
    fn multishot_recv(&mut self) -> bool {
        let Some(s) = wildcard(UdpSocket::bind) else {
            return false;
        };
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let e = opcode::RecvMulti::new(types::Fd(s.as_raw_fd()), PROBE_BGID).build();
        // SAFETY: the buffers it may fill are in `self.bufs`, kept until the CQEs,
        // or forever when `leak` is set.
        let res = unsafe { self.op_then_cancel(e, false) };
        verdict("multishot recv", res)
    }

    /// Multishot RECV with a total byte limit (`sqe->optlen`, 6.18) from the
    /// provided-buffer ring on an idle UDP socket, then its cancel.
    fn multishot_recv_limit(&mut self) -> bool {
        let Some(s) = wildcard(UdpSocket::bind) else {
            return false;
        };
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let e = super::ops::with_optlen(
            opcode::RecvMulti::new(types::Fd(s.as_raw_fd()), PROBE_BGID).build(),
            PROBE_BUF_SIZE as u32,
        );
        // SAFETY: as in `multishot_recv`.
        let res = unsafe { self.op_then_cancel(e, false) };
        verdict("multishot recv with a limit", res)
    }

    /// Submits `op` and an `IORING_OP_ASYNC_CANCEL` of it, and waits for both to
    /// end. Returns the result of `op`'s last CQE (the one without
    /// `IORING_CQE_F_MORE`), or `None` (and sets `leak`) if they did not both end
    /// within [`LIVE_WAIT`] or could not be submitted. With `fds`, a CQE of `op`
    /// carrying a result of 0 or more is a new fd (a connection someone made to
    /// the probe's listener meanwhile), which is closed.
    ///
    /// # Safety
    /// Whatever `op` points to must stay valid until this returns `Some`, and
    /// forever if it returns `None` (see [`Live::finish`]).
    unsafe fn op_then_cancel(&mut self, op: squeue::Entry, fds: bool) -> Option<i32> {
        const OP: u64 = 1;
        const CANCEL: u64 = 2;
        let entries = [
            op.user_data(OP),
            opcode::AsyncCancel::new(OP).build().user_data(CANCEL),
        ];
        // SAFETY: the caller keeps what `op` points to alive; the cancel points to
        // nothing. Both go in or neither (push_multiple).
        if unsafe { self.ring.submission().push_multiple(&entries) }.is_err() {
            return None;
        }
        let deadline = Instant::now() + LIVE_WAIT;
        let (mut op_res, mut cancelled) = (None, false);
        while op_res.is_none() || !cancelled {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!("io_uring probe: a live test did not end in time");
                self.leak = true;
                return None;
            }
            if let Err(e) = super::enter(&mut self.ring, 1, Some(left)) {
                tracing::debug!(error = %e, "io_uring probe: io_uring_enter failed");
                self.leak = true;
                return None;
            }
            for c in self.ring.completion() {
                if fds && c.user_data() == OP && c.result() >= 0 {
                    // SAFETY: the kernel just installed this fd for us; nobody
                    // else owns it.
                    drop(unsafe { OwnedFd::from_raw_fd(c.result()) });
                }
                match c.user_data() {
                    OP if !cqueue::more(c.flags()) => op_res = Some(c.result()),
                    CANCEL => cancelled = true,
                    _ => {}
                }
            }
        }
        // A buffer a multishot receive took (it should take none: nothing was
        // sent) is not given back: the ring is thrown away.
        op_res
    }

    /// Drops the ring, then the memory it was given; or, if a live test gave up
    /// waiting, leaks both (the kernel may still write to them).
    fn finish(self) {
        if self.leak {
            std::mem::forget(self);
        }
        // Otherwise the fields drop in order: ring, then buffers and msghdr.
    }
}

/// Binds a socket to a wildcard address, port 0: IPv4, else IPv6.
fn wildcard<T>(bind: impl Fn(SocketAddr) -> io::Result<T>) -> Option<T> {
    bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .or_else(|_| bind(SocketAddr::from(([0u16; 8], 0))))
        .ok()
}

/// Whether a live test's request was supported: ended by the cancel (ECANCELED),
/// not refused at once (EINVAL: the kernel does not know the flag).
fn verdict(what: &str, res: Option<i32>) -> bool {
    match res {
        Some(r) if r == -libc::ECANCELED => true,
        Some(r) if r == -libc::EINVAL => false,
        other => {
            tracing::debug!(what, result = ?other, "io_uring probe: unexpected result; taken as unsupported");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (major, minor) of a release string such as `6.18.0-rc1`.
    fn version(release: &str) -> (u32, u32) {
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|s| s.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    #[test]
    fn finds_what_this_kernel_has() {
        let p = probe_with(false, &[]).expect("io_uring usable here");
        let v = version(&p.kernel);
        assert_eq!(p.kernel, kernel_release());
        assert!(v >= (5, 1), "{}", p.kernel);
        // What each version brought (io_uring_setup(2), io_uring_enter(2)).
        assert_eq!(p.buf_ring, v >= (5, 19), "{p:?}");
        assert_eq!(p.multishot_accept, v >= (5, 19), "{p:?}");
        assert_eq!(p.multishot_recvmsg, v >= (6, 0), "{p:?}");
        assert_eq!(p.multishot_recv, v >= (6, 0), "{p:?}");
        assert_eq!(p.multishot_recv_limit, v >= (6, 18), "{p:?}");
        assert_eq!(p.recv_bundle, v >= (6, 10), "{p:?}");
        assert_eq!(p.setup.defer_taskrun, v >= (6, 1), "{p:?}");
        assert_eq!(p.setup.single_issuer, v >= (6, 0), "{p:?}");
        if v >= (6, 1) {
            assert_eq!(p.setup, SetupFlags::PREFERENCE[0]);
            for op in [
                "ACCEPT",
                "RECV",
                "SEND",
                "RECVMSG",
                "SENDMSG",
                "CONNECT",
                "ASYNC_CANCEL",
                "POLL_ADD",
                "TIMEOUT",
                "LINK_TIMEOUT",
                "CLOSE",
                "SEND_ZC",
                "SENDMSG_ZC",
            ] {
                assert!(p.opcodes.contains(&op), "{op} missing: {:?}", p.opcodes);
            }
            for f in ["NODROP", "FAST_POLL", "EXT_ARG"] {
                assert!(p.features.contains(&f), "{f} missing: {:?}", p.features);
            }
        }
        if v >= (6, 10) {
            assert!(p.features.contains(&"RECVSEND_BUNDLE"), "{:?}", p.features);
        }
    }

    #[test]
    fn the_disable_list_reports_features_absent() {
        let all: Vec<String> = DISABLE_NAMES.iter().map(|s| s.to_string()).collect();
        let p = probe_with(false, &all).unwrap();
        assert!(!p.multishot_accept);
        assert!(!p.multishot_recvmsg);
        assert!(!p.multishot_recv);
        assert!(!p.multishot_recv_limit);
        assert!(!p.recv_bundle);
        assert_eq!(p.setup, SetupFlags::default());
        // What the kernel reported is kept.
        let full = probe_with(false, &[]).unwrap();
        assert_eq!(p.features, full.features);
        assert_eq!(p.opcodes, full.opcodes);
        assert_eq!(p.buf_ring, full.buf_ring);
    }

    #[test]
    fn one_disabled_name_leaves_the_others() {
        let full = probe_with(false, &[]).unwrap();
        let p = probe_with(false, &parse_disable("multishot_accept")).unwrap();
        assert!(!p.multishot_accept);
        assert_eq!(p.multishot_recvmsg, full.multishot_recvmsg);
        assert_eq!(p.multishot_recv, full.multishot_recv);
        assert_eq!(p.setup, full.setup);
        let p = probe_with(false, &parse_disable("defer_taskrun")).unwrap();
        assert!(!p.setup.defer_taskrun);
        assert_eq!(p.setup.single_issuer, full.setup.single_issuer);
        assert_eq!(p.multishot_accept, full.multishot_accept);
        // DEFER_TASKRUN needs SINGLE_ISSUER: both go.
        let p = probe_with(false, &parse_disable("single_issuer")).unwrap();
        assert!(!p.setup.single_issuer && !p.setup.defer_taskrun);
    }

    #[test]
    fn plain_setup_uses_no_flag() {
        let p = probe_with(true, &[]).unwrap();
        assert_eq!(p.setup, SetupFlags::default());
        assert_eq!(p.setup.to_string(), "none");
        // ... and none of the fast path.
        assert!(
            !p.multishot_recv && !p.multishot_recv_limit && !p.recv_bundle,
            "{p:?}"
        );
        let full = probe_with(false, &[]).unwrap();
        assert_eq!(p.multishot_accept, full.multishot_accept);
        assert_eq!(p.multishot_recvmsg, full.multishot_recvmsg);
    }

    #[test]
    fn disable_list_parsing() {
        assert_eq!(
            parse_disable(" multishot_accept,,recv_bundle ,"),
            vec!["multishot_accept", "recv_bundle"]
        );
        assert!(parse_disable("").is_empty());
    }

    #[test]
    fn setup_flags_display() {
        assert_eq!(
            SetupFlags::PREFERENCE[0].to_string(),
            "single_issuer|defer_taskrun"
        );
        assert_eq!(SetupFlags::PREFERENCE[2].to_string(), "coop_taskrun");
    }

    #[test]
    fn probe_is_computed_once() {
        let a = probe() as *const _;
        let b = probe() as *const _;
        assert_eq!(a, b);
    }

    #[test]
    fn serializes_for_status() {
        let p = probe_with(false, &[]).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        for k in [
            "kernel",
            "setup",
            "features",
            "opcodes",
            "buf_ring",
            "multishot_accept",
            "multishot_recvmsg",
            "multishot_recv",
            "multishot_recv_limit",
            "recv_bundle",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert!(v["setup"]["defer_taskrun"].is_boolean());
    }
}
