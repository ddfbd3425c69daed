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
}

impl ListenerStats {
    /// Connections open now (accepted minus closed).
    pub fn active(&self) -> u64 {
        self.accepted
            .load(Relaxed)
            .saturating_sub(self.closed.load(Relaxed))
    }
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
    /// Sessions open now on this worker (a gauge).
    pub sessions: AtomicU64,
    /// The worker's backend failed and the worker stopped.
    pub failed: AtomicBool,
}
