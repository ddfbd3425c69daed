//! Workers and their I/O backends.
//!
//! A worker is one OS thread, pinned to one CPU, that runs one `worker::Worker`
//! over one backend: an io_uring ring ([`uring`], feature `uring`) or an epoll
//! instance ([`epoll`]). The supervisor hands it listener sockets over a channel
//! ([`Command`]) and wakes it through an eventfd; the worker accepts connections
//! on them and runs one session per connection ([`crate::proto`]).
//!
//! # Layout
//! - [`backend`]: the contract. A backend starts [`backend::Op`]s (accept, poll,
//!   receive, send, connect), cancels them and reports how they ended
//!   ([`backend::Event`]); each operation owns the memory the kernel may touch
//!   until its last event hands it back.
//! - `worker`: the one engine: listeners, sessions, UDP, timers, commands,
//!   peel-offs, the shutdown sequence and the loop. Both backends run it, so they
//!   accept, time out, count and shut down identically.
//! - `active`: one session's sockets and bookkeeping between its state machine
//!   and the worker; `timers`, `slab`: the worker's timers and tables;
//!   [`shared`]: what workers share with the supervisor (settings, counters);
//!   [`udp`]: UDP sessions and datagram syscalls; [`upstream`]: upstream choice
//!   and socket pools.

pub(crate) mod active;
pub mod backend;
pub mod budget;
pub mod epoll;
pub(crate) mod pipe;
pub mod shared;
pub(crate) mod slab;
pub(crate) mod timers;
pub mod udp;
pub mod upstream;
#[cfg(feature = "uring")]
pub mod uring;
pub(crate) mod worker;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread;

use crate::config::IoChoice;
pub(crate) use crate::eventfd::{drain_eventfd, eventfd, wake};
pub use crate::proto::{SEND_RETRY_MAX_MS, SEND_STALL_LIMIT};
pub use shared::{ListenerShared, ListenerStats, PeelSource, WorkerStats};
pub use upstream::UpstreamSet;
pub(crate) use worker::drop_new_handshakes;
use worker::WorkerCtx;

/// How long a listener stops accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM (ms).
pub const ACCEPT_PAUSE_MS: u64 = 100;

/// How long a removed TCP listener keeps accepting the handshakes already under
/// way while new SYNs are dropped (ms): long enough for the final ACK of a
/// handshake whose SYN-ACK was sent just before (one round trip), short enough
/// that a client whose SYN was dropped is refused at its first retransmission
/// (1 s, RFC 6298 §2.1 initial RTO).
pub const LISTENER_DRAIN_MS: u64 = 500;

/// Set once a worker's backend failed, a worker panicked, or the binder panicked.
static WORKER_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether a worker of this process stopped (its backend failed, or it
/// panicked), or the binder thread panicked.
pub fn worker_failed() -> bool {
    WORKER_FAILED.load(Relaxed)
}

/// Records that a worker (or the binder) stopped, and tells the supervisor with a
/// SIGTERM to the process (its control loop then shuts down and exits with
/// status 1).
pub(crate) fn notify_worker_failed() {
    WORKER_FAILED.store(true, Relaxed);
    // Unit tests run workers inside the test process: no signal there.
    #[cfg(not(test))]
    // SAFETY: kill(2) with our own pid and a valid signal number.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM)
    };
}

/// Which driver a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring (Linux 5.19+ for multishot accept and provided-buffer rings).
    Uring,
    /// epoll, edge-triggered.
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// Why io_uring cannot be used here, or `Ok` if a ring can be set up and a
/// provided-buffer ring registered (what every io_uring worker needs). Decided by
/// [`uring::probe()`], once per process.
///
/// # Errors
/// A message naming the cause: `/proc/sys/kernel/io_uring_disabled` is 2, the
/// binary was built without the `uring` feature, io_uring_setup(2) failed
/// (ENOSYS: no io_uring in the kernel; EPERM: disabled for this process), or the
/// kernel lacks provided-buffer rings (`IORING_REGISTER_PBUF_RING`, Linux 5.19).
pub fn uring_available() -> Result<(), String> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if s.trim() == "2" {
            return Err("io_uring is disabled (/proc/sys/kernel/io_uring_disabled = 2)".into());
        }
    }
    #[cfg(feature = "uring")]
    {
        match uring::probe() {
            Ok(p) if p.buf_ring => Ok(()),
            Ok(p) => Err(format!(
                "kernel {} has no provided-buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19+)",
                p.kernel
            )),
            Err(e) => Err(e.clone()),
        }
    }
    #[cfg(not(feature = "uring"))]
    {
        Err("this ringress was built without the `uring` feature".into())
    }
}

/// Logs, once per call, what the io_uring driver will use (from the probe).
#[cfg(feature = "uring")]
fn log_uring_choice(io: &str) {
    if let Ok(p) = uring::probe() {
        tracing::info!(
            kernel = %p.kernel,
            setup = %p.setup,
            multishot_accept = p.multishot_accept,
            multishot_recvmsg = p.multishot_recvmsg,
            multishot_recv = p.multishot_recv,
            multishot_recv_limit = p.multishot_recv_limit,
            recv_bundle = p.recv_bundle,
            "io = {io}: using io_uring"
        );
    }
}

/// Resolves the configured choice to a driver. `auto` takes io_uring when
/// [`uring_available`], else epoll. When io_uring is chosen, one info line says
/// what of it will be used (setup flags, multishot accept/RECVMSG/RECV, bundles,
/// kernel); `auto` choosing epoll logs why.
///
/// # Errors
/// `io = "uring"` where io_uring is unavailable: the cause, and a hint to use epoll.
pub fn resolve(choice: IoChoice) -> Result<DriverKind, String> {
    match choice {
        IoChoice::Epoll => Ok(DriverKind::Epoll),
        IoChoice::Uring => match uring_available() {
            Ok(()) => {
                #[cfg(feature = "uring")]
                log_uring_choice("uring");
                Ok(DriverKind::Uring)
            }
            Err(e) => Err(format!(
                "io = \"uring\" but {e}; use io = \"epoll\" (or --io epoll, or io = \"auto\")"
            )),
        },
        IoChoice::Auto => match uring_available() {
            Ok(()) => {
                #[cfg(feature = "uring")]
                log_uring_choice("auto");
                Ok(DriverKind::Uring)
            }
            Err(e) => {
                tracing::info!("io = auto: using epoll ({e})");
                Ok(DriverKind::Epoll)
            }
        },
    }
}

/// A listening socket as a worker holds it: its own (one SO_REUSEPORT socket per
/// worker, `shards = "by-worker"`), or one fd shared with other workers
/// (`shards = N`, TCP and one-to-one SCTP only: the same fd number in every
/// worker, no dup, so the listener costs N fds in the process, not one per worker).
/// A shared fd is closed by the last worker that lets it go.
#[derive(Debug)]
pub enum ListenerFd {
    /// This worker's own socket.
    Own(OwnedFd),
    /// A socket every worker with the same [`Arc`] accepts on.
    Shared(Arc<OwnedFd>),
}

impl ListenerFd {
    /// When this worker lets the socket go: `Ok(fd)` to close (its own, or a
    /// shared one no other worker holds any more), or `Err(hold)` while another
    /// worker holds it (the fd stays open as long as `hold` lives; dropping the
    /// last hold closes it).
    pub fn into_last(self) -> Result<OwnedFd, Arc<OwnedFd>> {
        match self {
            ListenerFd::Own(fd) => Ok(fd),
            ListenerFd::Shared(fd) => Arc::try_unwrap(fd),
        }
    }
}

impl From<OwnedFd> for ListenerFd {
    fn from(fd: OwnedFd) -> Self {
        ListenerFd::Own(fd)
    }
}

impl AsFd for ListenerFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ListenerFd::Own(fd) => fd.as_fd(),
            ListenerFd::Shared(fd) => fd.as_fd(),
        }
    }
}

impl AsRawFd for ListenerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A message from the supervisor to a worker.
#[derive(Debug)]
pub enum Command {
    /// Start accepting on `fd` (a listening, non-blocking socket) for listener `id`.
    AddListener {
        /// Supervisor's id of the listener, unique for the process lifetime.
        id: u64,
        /// The worker's socket of this listener: its own SO_REUSEPORT socket, or
        /// (TCP and one-to-one SCTP with `shards = N`) one shared with other
        /// workers. UDP and one-to-many SCTP listeners always get their own.
        fd: ListenerFd,
        /// Name, action and counters.
        shared: Arc<ListenerShared>,
    },
    /// New settings for listener `id`, whose socket stays (a reload that changed
    /// anything but its namespace, protocol and address): connections accepted from
    /// now on use `shared`; open ones finish under the settings they started with.
    /// Not sent for one-to-many SCTP listeners (their socket is one session).
    UpdateListener {
        /// The listener's id.
        id: u64,
        /// The new settings; its counters are the old ones when the name is kept.
        shared: Arc<ListenerShared>,
        /// A new accept backlog (connections) to apply with listen(2) again, if it
        /// changed (TCP and one-to-one SCTP).
        backlog: Option<u32>,
    },
    /// Stop accepting on listener `id` without resetting what is queued: a TCP
    /// listener first drops new SYNs (a socket filter; the client retransmits and
    /// is refused once the socket is closed), accepts and serves what completed its
    /// handshake for [`LISTENER_DRAIN_MS`], then closes. Connections go on.
    RemoveListener {
        /// The listener's id.
        id: u64,
    },
    /// Graceful shutdown, sent after every listener was removed: tell every session
    /// once, and every session opened later (an accept or SCTP peel-off that was
    /// already under way), that the process is stopping
    /// ([`crate::proto::Session::on_drain`]: idle HTTP keep-alive connections
    /// close, the rest finish their work). Nothing is cut; [`Command::Shutdown`]
    /// still ends the thread.
    Drain,
    /// Stop accepting on listener `id` and close this worker's fd of it, without
    /// touching the socket itself (no filter, no option): after a takeover
    /// ([`crate::takeover`]) another process shares the same socket and goes on
    /// accepting from its queue. Connections go on.
    DetachListener {
        /// The listener's id.
        id: u64,
    },
    /// Reply with close-on-exec copies (`F_DUPFD_CLOEXEC`) of the worker's
    /// accepting TCP, one-to-one SCTP and UDP listener sockets, by listener id
    /// (for a takeover; one-to-many SCTP sockets are left out). The worker keeps
    /// its own fds and goes on accepting.
    ExportListeners {
        /// Where the `(listener id, fd copy)` pairs go.
        reply: mpsc::Sender<Vec<(u64, OwnedFd)>>,
    },
    /// Ask every accepting listener's accept again (cancel it; it is re-armed at
    /// once, and a new accept first tries accept(2) inline): sent by a process
    /// that took listeners over once the old one has stopped, so that a
    /// connection whose (exclusive, on io_uring) wake-up went to the old
    /// process's accept is not left in the queue.
    AcceptAgain,
    /// Close every listener and connection and end the thread.
    Shutdown,
}

/// The supervisor's handle to a running worker.
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
    join: Option<thread::JoinHandle<()>>,
    /// The worker's counters.
    pub stats: Arc<WorkerStats>,
    /// Index of the worker (0-based).
    pub index: usize,
}

impl WorkerHandle {
    /// Sends `cmd` and wakes the worker (eventfd write).
    ///
    /// # Errors
    /// The worker thread has exited.
    pub fn send(&self, cmd: Command) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::other(format!("worker {} has exited", self.index)))?;
        wake(self.wake.as_raw_fd());
        Ok(())
    }

    /// Asks the worker to shut down and waits for its thread to end.
    pub fn shutdown(mut self) {
        let _ = self.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The CPUs this process may run on (sched_getaffinity), in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![],
    }
}

/// Starts `count` workers running `kind`, worker `i` pinned to the `i`-th allowed CPU
/// (wrapping around). Each worker drops every capability of its thread once its
/// ring (or epoll instance) exists, before it serves anything
/// ([`crate::privs::drop_all`]); what still needs one goes through `binder`
/// (the SYN-dropping filter of a removed TCP listener). Without a binder (tests)
/// the worker attaches that filter itself.
///
/// # Errors
/// A ring or epoll instance could not be created, a worker could not drop its
/// capabilities, or a thread could not be spawned; workers already started are
/// shut down.
pub fn spawn_workers(
    count: usize,
    kind: DriverKind,
    binder: Option<crate::binder::Binder>,
) -> io::Result<Vec<WorkerHandle>> {
    let cpus = allowed_cpus();
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let cpu = if cpus.is_empty() {
            None
        } else {
            Some(cpus[index % cpus.len()])
        };
        match spawn_one(index, cpu, kind, binder.clone()) {
            Ok(h) => out.push(h),
            Err(e) => {
                for h in out {
                    h.shutdown();
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

fn spawn_one(
    index: usize,
    cpu: Option<usize>,
    kind: DriverKind,
    binder: Option<crate::binder::Binder>,
) -> io::Result<WorkerHandle> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(eventfd()?);
    let stats = Arc::new(WorkerStats::default());
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let (w2, s2) = (wake.clone(), stats.clone());
    let join = thread::Builder::new()
        .name(format!("ringress-w{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                let mut set = nix::sched::CpuSet::new();
                if set.set(cpu).is_ok() {
                    if let Err(e) =
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    {
                        tracing::warn!(worker = index, cpu, error = %e, "cannot pin worker");
                    }
                }
            }
            let ctx = WorkerCtx {
                index,
                rx,
                wake: w2,
                stats: s2,
                peeled: Default::default(),
                binder,
                filtered: Default::default(),
            };
            match kind {
                #[cfg(feature = "uring")]
                DriverKind::Uring => {
                    let make = || match uring::probe() {
                        Ok(p) => uring::UringBackend::new(p),
                        Err(e) => Err(io::Error::other(e.clone())),
                    };
                    worker::serve(make, ctx, ready_tx)
                }
                #[cfg(not(feature = "uring"))]
                DriverKind::Uring => {
                    let _ = ready_tx.send(Err(io::Error::other("built without io_uring")));
                }
                DriverKind::Epoll => worker::serve(epoll::EpollBackend::new, ctx, ready_tx),
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            tx,
            wake,
            join: Some(join),
            stats,
            index,
        }),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => {
            let _ = join.join();
            Err(io::Error::other(format!("worker {index} died at start")))
        }
    }
}

/// Classifies an accept errno: `true` when accepting should pause for
/// [`ACCEPT_PAUSE_MS`] (out of fds or memory), `false` when it should simply go on.
pub(crate) fn accept_error_pauses(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// Whether an accept errno is routine (re-arm silently).
pub(crate) fn accept_error_benign(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINTR | libc::ECONNABORTED | libc::EAGAIN | libc::EPROTO | libc::EPERM
    )
}
