//! What the workers share with the supervisor: each listener's settings and
//! counters, and each worker's counters.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::slab::Key;
use super::UpstreamSet;
use crate::config::{Action, SctpConfig};

/// Counters of one listener, shared by all workers (all counts; bytes in bytes).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed.
    pub closed: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Accept errors other than EINTR/ECONNABORTED/EAGAIN.
    pub accept_errors: AtomicU64,
    /// Sessions that ended with an I/O error or timeout (reset, refused, ...).
    pub conn_errors: AtomicU64,
    /// Resets (ECONNRESET/EPIPE) seen on established connections.
    pub resets: AtomicU64,
    /// Upstream connects refused (ECONNREFUSED).
    pub upstream_refused: AtomicU64,
    /// Upstream connects that timed out (`connect_timeout_ms`).
    pub upstream_timeouts: AtomicU64,
    /// Upstream connects that failed otherwise (unreachable, no socket, ...).
    pub upstream_errors: AtomicU64,
    /// UDP datagrams dropped for being larger than `max_datagram_bytes` (MSG_TRUNC).
    pub truncated: AtomicU64,
    /// UDP datagrams of new clients dropped at `max_sessions`.
    pub session_limit: AtomicU64,
    /// UDP datagrams dropped because their session, waiting for an upstream
    /// socket, had no room left to keep them ([`crate::proto::udp::UdpSessions::enqueue`]:
    /// 8 datagrams or 64 KiB per session, 1 MiB per listener on each worker).
    pub session_queue_full: AtomicU64,
    /// UDP sessions ended by the unreplied timeout (their upstream never answered).
    pub expired_unreplied: AtomicU64,
    /// UDP sessions ended by the idle timeout (after their upstream answered).
    pub expired_idle: AtomicU64,
    /// UDP datagrams dropped because the socket buffer was full (EAGAIN) or the
    /// send failed; SCTP one-to-many messages whose send failed (association gone).
    pub send_drops: AtomicU64,
    /// SCTP messages larger than `max_message_bytes` (their association was aborted).
    pub message_too_big: AtomicU64,
    /// Times a worker stopped accepting on this listener at a cap (its own
    /// `max_connections`, its namespace's fd share, the process budget).
    pub capacity_pauses: AtomicU64,
    /// This listener's sockets held at a cap now (0..=workers; a gauge).
    pub at_capacity: AtomicU64,
    /// Sessions ended by their idle timeout (echo, proxy `idle_timeout_ms`).
    pub timeouts_idle: AtomicU64,
    /// http connections ended by `header_timeout_ms` (a 408 was sent).
    pub timeouts_header: AtomicU64,
    /// http connections ended idle between requests by `keepalive_timeout_ms`.
    pub timeouts_keepalive: AtomicU64,
    /// Rate limits of its warnings.
    pub logs: ListenerLogs,
}

impl ListenerStats {
    /// Connections open now (accepted minus closed).
    pub fn active(&self) -> u64 {
        self.accepted
            .load(Relaxed)
            .saturating_sub(self.closed.load(Relaxed))
    }
}

/// How often one kind of warning may be logged per listener (ms): the first one
/// goes out, the next ones within this window are counted and said in one line
/// with the next warning after it ("N more in the last 10 s").
pub const LOG_EVERY_MS: u64 = 10_000;

/// A rate limit for one kind of warning of one listener, shared by the workers:
/// at most one line per [`LOG_EVERY_MS`]; counters keep the exact numbers.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the next line may go out (ms since [`log_clock_ms`]'s start).
    next_ms: AtomicU64,
    /// Warnings not logged since the last line.
    suppressed: AtomicU64,
}

impl LogLimit {
    /// Whether a warning may be logged now; `Some(n)`: yes, and `n` were held back
    /// since the last one (say so in the line). `None`: counted, not logged.
    pub fn allow(&self) -> Option<u64> {
        let now = log_clock_ms();
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + LOG_EVERY_MS, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// Milliseconds since the first call (a monotonic clock for [`LogLimit`]).
fn log_clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The rate-limited warnings of one listener, by kind.
#[derive(Debug, Default)]
pub struct ListenerLogs {
    /// "upstream connect failed" (TCP/SCTP proxy) and UDP upstream errors.
    pub upstream: LogLimit,
    /// "accept failed".
    pub accept: LogLimit,
    /// "at capacity" (a cap stopped accepting).
    pub capacity: LogLimit,
}

/// What every worker knows about one listener.
#[derive(Debug)]
pub struct ListenerShared {
    /// Listener name (from the config).
    pub name: Arc<str>,
    /// What connections on it do.
    pub action: Action,
    /// The listener's namespace label ("root" for the start namespace), for the
    /// PROXY v2 NETNS TLV.
    pub netns: Arc<str>,
    /// Upstreams and their socket pools (`action = "proxy"` only).
    pub upstream: Option<Arc<UpstreamSet>>,
    /// Transport protocol.
    pub proto: crate::config::Proto,
    /// UDP: largest datagram accepted (bytes).
    pub max_datagram: usize,
    /// SCTP: style, streams, largest message.
    pub sctp: SctpConfig,
    /// SCTP one-to-many proxy: who peels associations off, and in which namespace.
    pub peel: Option<PeelSource>,
    /// Its counters (kept across a reload that keeps the listener's name).
    pub stats: Arc<ListenerStats>,
    /// Most sessions open at once (0: no limit; `max_connections`).
    pub max_connections: u64,
    /// TCP `echo`: close after this long without a byte either way (ms; 0: never).
    pub idle_timeout_ms: u64,
    /// The accept backlog (connections; `backlog`): how many one multishot accept
    /// may bring at once.
    pub backlog: u32,
    /// The process's session budget.
    pub budget: Arc<super::budget::FdBudget>,
    /// The session fds its namespace's listeners hold together.
    pub netns_fds: Arc<super::budget::NetnsFds>,
}

/// Where a one-to-many SCTP proxy listener's associations are peeled off: the
/// binder, inside the listener's namespace (`None`: the root namespace).
#[derive(Debug, Clone)]
pub struct PeelSource {
    /// The binder thread.
    pub binder: crate::binder::Binder,
    /// The listener's namespace file.
    pub netns: Option<std::path::PathBuf>,
}

/// A peel-off the binder finished for a worker's one-to-many session.
pub(crate) struct Peeled {
    /// The one-to-many session.
    pub session: Key,
    /// The association.
    pub assoc: i32,
    /// The new one-to-one socket, or why there is none.
    pub result: io::Result<OwnedFd>,
}

/// Peel-offs finished by the binder, waiting for their worker (which the binder
/// wakes through its eventfd).
pub(crate) type PeelMailbox = Arc<std::sync::Mutex<Vec<Peeled>>>;

/// Counters of one worker (counts).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Operations the worker started (one SQE each on io_uring; cancels and
    /// link timeouts not counted).
    pub submitted: AtomicU64,
    /// Operation events the worker handled (CQEs on io_uring, completions on
    /// epoll; a multishot operation has several).
    pub completed: AtomicU64,
    /// Receives that found no free receive buffer (ENOBUFS: the io_uring
    /// provided-buffer ring, or the epoll backend's pool of the same size, was empty).
    pub enobufs: AtomicU64,
    /// Multishot receives started on stream sockets (io_uring
    /// `IORING_RECV_MULTISHOT` on `IORING_OP_RECV`, 6.0; always 0 on epoll, on
    /// kernels without it and with `RINGRESS_URING_SETUP=plain`).
    pub multishot_recv: AtomicU64,
    /// Sessions open now on this worker (a gauge).
    pub sessions: AtomicU64,
    /// Listener sockets (TCP, one-to-one SCTP, UDP) this worker holds now (a
    /// gauge): a removed one counts until its accept or receive has ended and its
    /// fd is closed, so once it is 0 no connection can be accepted any more.
    pub listeners: AtomicU64,
    /// The worker's backend failed (or the worker panicked) and the worker stopped.
    pub failed: AtomicBool,
    /// The worker's last loop turn: it beats at least every
    /// [`crate::health::BEAT_EVERY`], idle or not.
    pub heartbeat: crate::health::Heartbeat,
}

#[cfg(test)]
impl ListenerShared {
    /// A TCP listener `name` in the root namespace with `action` and `upstream`,
    /// no limits, no idle timeout and an unlimited budget (for in-process tests).
    pub(crate) fn test(
        name: &str,
        action: Action,
        upstream: Option<Arc<UpstreamSet>>,
    ) -> ListenerShared {
        ListenerShared {
            name: name.into(),
            action,
            netns: "root".into(),
            upstream,
            proto: crate::config::Proto::Tcp,
            max_datagram: 0,
            sctp: SctpConfig::default(),
            peel: None,
            stats: Default::default(),
            max_connections: 0,
            backlog: 128,
            idle_timeout_ms: 0,
            budget: Default::default(),
            netns_fds: Default::default(),
        }
    }
}
