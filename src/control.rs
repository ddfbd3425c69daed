//! The control loop: the main thread's one event loop for signals (signalfd),
//! the admin endpoint, and the netns directory (inotify). Being one loop on the
//! main thread, it adds no thread to the budget.
//!
//! - SIGHUP: re-read and validate the config, apply it ([`Server::reload`]); a
//!   config that fails is logged and the running one goes on. The file is read,
//!   parsed and its namespaces checked on a short-lived thread (the loop keeps
//!   serving signals, the admin endpoint and the namespace watch meanwhile: a
//!   10,000-listener file takes tens of ms); the loop applies the result when the
//!   thread hands it over (a channel plus an eventfd in the loop's epoll set) and
//!   joins the thread, so at rest the thread count stays workers + 2. A SIGHUP
//!   during a reload reads the file once more after it; a SIGTERM during a reload
//!   shuts down and drops the result.
//! - SIGTERM/SIGINT: stop accepting, tell every worker to drain
//!   ([`Command::Drain`]: idle HTTP keep-alive connections close at once, a
//!   request in progress is answered with `Connection: close`, other sessions go
//!   on; see [`crate::proto::Session::on_drain`]), and return (exit 0) as soon as
//!   no session is open (checked every 50 ms), at the latest after
//!   `shutdown_timeout_ms`, closing what is left. A second SIGTERM/SIGINT exits at
//!   once (status 130).
//! - Signals sent during start-up: `main` blocks them before anything else runs
//!   ([`crate::signals`]), so they wait, pending, and the signalfd reads them once
//!   the server is ready, before the loop first waits: a SIGHUP then reloads the
//!   same file (logged at info as received during start-up), a SIGTERM/SIGINT
//!   shuts down as above, closing what was bound, and exits 0 (two of them during
//!   start-up count as one).
//! - inotify on the netns directory: a new entry is bound by the templates and
//!   listeners it concerns, retried every 20 ms for [`NETNS_SETTLE`] (`ip netns
//!   add` creates the file before it mounts the namespace on it), then, while it
//!   is still not served, never given up: its identity is re-checked (one
//!   `stat(2)`) with a back-off from 20 ms doubling up to [`NETNS_POLL_MAX`], and
//!   a bind is tried again as soon as the entry changed (a namespace was mounted
//!   on a placeholder file, which makes no inotify event), else with a back-off up
//!   to [`NETNS_BIND_MAX`] (its addresses may come later), until it is served or
//!   goes away. Entries of templates left down at start are retried the same
//!   way, and the directory is rescanned every [`NETNS_RESCAN`] in case an event
//!   was missed. A removed entry closes its listeners.
//! - every [`HELD_CHECK`]: a listener whose `netns` is a path goes down if the
//!   path now names another namespace ([`Server::check_held_namespaces`]).
//! - `[runtime] takeover_socket`: a new process (`ringress run --takeover`) gets
//!   copies of the listening sockets ([`crate::takeover`]); once it serves and says
//!   which it took, those are detached here (the shared sockets untouched), the
//!   others stop accepting, and the process drains as on SIGTERM (exit 0). While
//!   a takeover is pending (at most [`crate::takeover::PENDING_MAX`]), SIGHUP is
//!   ignored with a warning: the offered sockets are shared.
//! - sd_notify: READY=1 once running, RELOADING=1/READY=1 around a reload,
//!   STOPPING=1 at shutdown.

use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::admin::{Admin, Interest};
use crate::config::Config;
use crate::driver::Command;
use crate::netns;
use crate::sdnotify;
use crate::server::Server;
use crate::signals;
use crate::takeover::TakeoverServer;

/// How long a new netns entry is retried at the fast pace (every 20 ms);
/// after it, an entry still not served is logged once and retried with back-off.
pub const NETNS_SETTLE: Duration = Duration::from_secs(3);
/// Interval between retries while a new entry settles.
const NETNS_RETRY: Duration = Duration::from_millis(20);
/// Longest interval between two identity checks (`stat(2)`) of an entry not
/// served after [`NETNS_SETTLE`]: a namespace mounted on a placeholder is served
/// within about this long (ms scale; 1,000 such entries cost 2,000 stats/s).
pub const NETNS_POLL_MAX: Duration = Duration::from_millis(500);
/// Longest interval between two bind attempts in an entry whose identity did not
/// change (a namespace whose address is not configured yet).
pub const NETNS_BIND_MAX: Duration = Duration::from_secs(30);
/// Interval between checks that namespace paths still name the namespace their
/// listeners hold ([`Server::check_held_namespaces`]).
pub const HELD_CHECK: Duration = Duration::from_secs(1);
/// Interval of the periodic rescan of the netns directory (names that appeared
/// or vanished without an inotify event reaching us).
pub const NETNS_RESCAN: Duration = Duration::from_secs(30);

const T_SIGNAL: u64 = 1;
const T_INOTIFY: u64 = 2;
const T_ADMIN: u64 = 3;
const T_TAKEOVER: u64 = 4;
const T_TAKEOVER_CONN: u64 = 5;
const T_RELOAD: u64 = 6;
/// Admin connections: `T_CONN_BASE + id`.
const T_CONN_BASE: u64 = 1 << 32;

/// How the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Graceful shutdown finished.
    Clean,
    /// A second signal asked to stop at once.
    Forced,
    /// A worker's backend failed or a worker panicked (its listeners were no
    /// longer served), or the binder panicked; the rest was shut down gracefully.
    WorkerFailed,
}

/// A reload whose file is being read and checked on its own thread.
struct Reloading {
    /// The thread's answer: the validated config, or why it was refused.
    rx: mpsc::Receiver<Result<Config, String>>,
    thread: std::thread::JoinHandle<()>,
    /// Another SIGHUP came meanwhile: read the file again after this one.
    again: bool,
}

/// SIGHUP handling: the eventfd the reload thread wakes the loop with, and the
/// reload under way, if any.
struct Reloader {
    wake: Arc<OwnedFd>,
    current: Option<Reloading>,
    path: PathBuf,
    /// The namespace check and the resolution of interface-name zones run on
    /// the binder, which may open `/proc/PID/ns/net` of a privileged process
    /// (CAP_SYS_PTRACE) and enter a namespace (CAP_SYS_ADMIN); the reload
    /// thread, like the control thread it comes from, holds no capability.
    binder: crate::binder::Binder,
}

impl Reloader {
    /// Starts reading the file (RELOADING=1 to systemd), or, if a reload is
    /// under way, asks for another one after it.
    fn start(&mut self) {
        if let Some(r) = &mut self.current {
            r.again = true;
            tracing::info!("SIGHUP during a reload: the file is read again after it");
            return;
        }
        sdnotify::notify_or_log(&sdnotify::reloading_message());
        tracing::info!(config = %self.path.display(), "SIGHUP: reloading");
        let (tx, rx) = mpsc::channel();
        let (path, wake) = (self.path.clone(), self.wake.clone());
        let binder = self.binder.clone();
        let spawned = std::thread::Builder::new()
            .name("ringress-reload".into())
            .spawn(move || {
                let r = Config::load(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        binder
                            .call(move || {
                                let mut c = c;
                                c.check_namespaces()
                                    .and_then(|_| c.resolve_zones())
                                    .map(|_| c)
                                    .map_err(|e| e.to_string())
                            })
                            .map_err(|e| e.to_string())?
                    });
                let _ = tx.send(r);
                crate::eventfd::wake(wake.as_raw_fd());
            });
        match spawned {
            Ok(thread) => {
                self.current = Some(Reloading {
                    rx,
                    thread,
                    again: false,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "reload rejected: cannot start a thread to read the file; the running config goes on");
                sdnotify::notify_or_log("READY=1");
            }
        }
    }

    /// The reload thread's answer, once it is there (the thread is joined).
    fn finished(&mut self) -> Option<(Result<Config, String>, bool)> {
        crate::eventfd::drain_eventfd(self.wake.as_raw_fd());
        let r = self.current.as_ref()?.rx.try_recv();
        let result = match r {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Err("the reload thread ended without an answer".into())
            }
        };
        let r = self.current.take()?;
        let _ = r.thread.join();
        Some((result, r.again))
    }
}

/// A netns entry not served yet, retried until it is or it goes away.
struct Pending {
    name: String,
    /// When to look at it again.
    next: Instant,
    /// End of the fast settle phase.
    until: Instant,
    /// Current back-off of identity checks after the settle phase.
    delay: Duration,
    /// Current back-off of bind attempts while its identity stays the same.
    bind_gap: Duration,
    /// When a bind may be tried again though the identity did not change.
    bind_at: Instant,
    /// The entry's identity at the last failed attempt (`None`: not stat-able).
    seen: Option<netns::NsId>,
    /// Whether the "still not served" warning was logged.
    warned: bool,
}

impl Pending {
    fn new(name: String, now: Instant) -> Pending {
        Pending {
            name,
            next: now,
            until: now + NETNS_SETTLE,
            delay: NETNS_RETRY,
            bind_gap: NETNS_RETRY,
            bind_at: now,
            seen: None,
            warned: false,
        }
    }

    /// One look at the entry: bind if settling, if it changed since the last
    /// failure, or if its bind back-off expired. Returns `false` when done
    /// (served, gone, or shutting down).
    fn step(&mut self, now: Instant, dir: &Path, server: &mut Server) -> bool {
        let id = match netns::NsId::of_path(&dir.join(&self.name)) {
            Ok(id) => Some(id),
            // Gone: the inotify event (or the rescan) says so too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(_) => None,
        };
        let settling = now < self.until;
        if settling || id != self.seen || now >= self.bind_at {
            if server.netns_appeared(&self.name) {
                return false;
            }
            if !settling {
                self.bind_gap = (self.bind_gap * 2).min(NETNS_BIND_MAX);
                self.bind_at = now + self.bind_gap;
            }
            self.seen = id;
        }
        if settling {
            self.next = now + NETNS_RETRY;
            return true;
        }
        if !self.warned {
            self.warned = true;
            tracing::warn!(netns = %self.name, settle_ms = NETNS_SETTLE.as_millis() as u64,
                "new netns entry still cannot be served (not a namespace yet?); retrying with back-off until it is served or goes away");
        }
        self.delay = (self.delay * 2).min(NETNS_POLL_MAX);
        self.next = now + self.delay;
        true
    }
}

/// Runs the control loop until shutdown; `config_path` is re-read on SIGHUP.
///
/// # Errors
/// The signalfd or epoll instance could not be made, or the admin endpoint could
/// not be bound (e.g. EADDRINUSE), naming the address.
pub fn run(mut server: Server, config_path: &Path) -> Result<Exit, String> {
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
    let sfd = SignalFd::with_flags(
        &signals::handled(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| format!("signalfd: {e}"))?;
    add(&ep, sfd.as_fd(), T_SIGNAL)?;

    let mut admin = match server.config().admin {
        Some(addr) => {
            let a = Admin::bind(addr).map_err(|e| format!("[admin] listen {addr}: {e}"))?;
            // Edge-triggered: out of fds (EMFILE), a pending connection must not
            // wake the loop again and again; the next one retries the accept.
            ep.add(
                a.listener().as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, T_ADMIN),
            )
            .map_err(|e| format!("epoll_ctl: {e}"))?;
            tracing::info!(address = %addr, "admin endpoint: /metrics /status /healthz");
            Some(a)
        }
        None => None,
    };

    let mut takeover = match &server.config().runtime.takeover_socket {
        Some(path) => {
            let t = TakeoverServer::bind(path)?;
            add(&ep, t.listener().as_fd(), T_TAKEOVER)?;
            Some(t)
        }
        None => None,
    };

    let mut watch = NetnsWatch::new(&server.config().netns_dir);
    if let Some(w) = &watch {
        add(&ep, w.fd.as_fd(), T_INOTIFY)?;
    }

    // Every endpoint of this thread is bound: from here on it needs no capability
    // (reload and new namespaces go through the binder). crate::privs.
    crate::privs::drop_all().map_err(|e| format!("main thread: {e}"))?;
    let wake = crate::eventfd::eventfd().map_err(|e| format!("eventfd: {e}"))?;
    add(&ep, wake.as_fd(), T_RELOAD)?;
    let mut reloader = Reloader {
        wake: Arc::new(wake),
        current: None,
        path: config_path.to_path_buf(),
        binder: server.binder().clone(),
    };

    // "running" and READY=1 come once every endpoint is open: whoever waits for
    // either may use the listeners and the admin endpoint at once.
    tracing::info!(
        listeners = server.listeners().count(),
        workers = server.worker_count(),
        driver = %server.driver(),
        "ringress running"
    );
    sdnotify::notify_or_log("READY=1");
    let mut next_rescan = Instant::now() + NETNS_RESCAN;
    let mut next_held_check = Instant::now() + HELD_CHECK;
    // Entries whose listeners are down (e.g. a template instance in a placeholder
    // not yet mounted at start): retried like new entries.
    let start = Instant::now();
    let mut pending: Vec<Pending> = down_entries(&server)
        .into_iter()
        .map(|n| Pending::new(n, start))
        .collect();
    let mut draining: Option<Instant> = None;
    // Signals sent while starting up (blocked since main's first instruction)
    // are pending on the signalfd: act on them now that everything is open.
    for sig in read_signals(&sfd) {
        if let Some(exit) = on_signal(
            sig,
            true,
            &mut server,
            &mut draining,
            &mut takeover,
            &mut reloader,
        ) {
            return Ok(exit);
        }
    }
    let mut events = vec![EpollEvent::empty(); 64];
    loop {
        let now = Instant::now();
        let mut wait: Option<Duration> = pending
            .iter()
            .map(|p| p.next.saturating_duration_since(now))
            .min();
        if let Some(d) = draining {
            let poll = Duration::from_millis(50).min(d.saturating_duration_since(now));
            wait = Some(wait.map_or(poll, |w| w.min(poll)));
        }
        if watch.is_some() {
            let left = next_rescan.saturating_duration_since(now);
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
        let left = next_held_check.saturating_duration_since(now);
        wait = Some(wait.map_or(left, |w| w.min(left)));
        if let Some(a) = &admin {
            let left = a
                .retry_at()
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
                .min(Duration::from_secs(1));
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
        if let Some(d) = takeover
            .as_ref()
            .and_then(|t| t.conn.as_ref().and(t.deadline))
        {
            let left = d.saturating_duration_since(now);
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
        let timeout = match wait {
            None => EpollTimeout::NONE,
            Some(d) => EpollTimeout::from(d.as_millis().min(u16::MAX as u128 - 1) as u16),
        };
        let n = match ep.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => 0,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        };
        for ev in &events[..n] {
            match ev.data() {
                T_SIGNAL => {
                    for sig in read_signals(&sfd) {
                        if let Some(exit) = on_signal(
                            sig,
                            false,
                            &mut server,
                            &mut draining,
                            &mut takeover,
                            &mut reloader,
                        ) {
                            return Ok(exit);
                        }
                    }
                }
                T_RELOAD => {
                    if let Some((result, again)) = reloader.finished() {
                        apply_reload(&mut server, result, draining.is_some(), &takeover);
                        if again && draining.is_none() {
                            reloader.start();
                        }
                    }
                }
                T_INOTIFY => {
                    if let Some(w) = &mut watch {
                        let events = w.read();
                        netns_events(events, &mut pending, &mut server);
                    }
                }
                T_ADMIN => {
                    if let Some(a) = &mut admin {
                        admin_accept(&ep, a, &server);
                    }
                }
                T_TAKEOVER => {
                    if let Some(t) = &mut takeover {
                        while let Some(conn) = t.accept() {
                            if draining.is_some() {
                                tracing::warn!("takeover refused: this process is shutting down");
                                continue;
                            }
                            let offered = server
                                .export_listeners()
                                .and_then(|offer| t.offer(conn, offer));
                            match (offered, &t.conn) {
                                (Ok(()), Some(c)) => add(&ep, c.as_fd(), T_TAKEOVER_CONN)?,
                                (Ok(()), None) => {}
                                (Err(e), _) => {
                                    tracing::warn!(error = %e, "takeover abandoned; still serving")
                                }
                            }
                        }
                    }
                }
                T_TAKEOVER_CONN => {
                    let answer = takeover.as_mut().map(|t| t.read_accept());
                    match answer {
                        Some(Ok(Some(taken))) => {
                            let t = server.config().runtime.shutdown_timeout_ms;
                            tracing::info!(taken = taken.len(), timeout_ms = t,
                                "taken over by a new process: no new connections here; open ones may finish");
                            begin_shutdown(&mut server, &mut draining, Stop::HandedOver(&taken));
                            // Before "stopped": let the workers cancel their accepts on
                            // the shared sockets. io_uring arms an accept's poll as
                            // exclusive, so a connection that woke only this process's
                            // accept just as it was cancelled would wait unseen by the
                            // new process until the next one arrives; the new process
                            // accepts again once it reads "stopped" (bounded: 1 s).
                            let t0 = Instant::now();
                            while server.listener_sockets() > 0
                                && t0.elapsed() < Duration::from_secs(1)
                            {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            // The new process binds the admin address and the
                            // takeover socket once it has the answer.
                            admin = None;
                            if let Some(t) = takeover.take() {
                                t.stopped();
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "takeover abandoned; still serving")
                        }
                        _ => {}
                    }
                }
                t if t >= T_CONN_BASE => {
                    if let Some(a) = &mut admin {
                        let id = t - T_CONN_BASE;
                        let fd = a.fd_of(id);
                        if let Some(fd) = fd {
                            drive_admin(&ep, a, id, fd, &server);
                        }
                    }
                }
                _ => {}
            }
        }
        let now = Instant::now();
        // New namespaces: bind, retrying while they settle, then with back-off.
        let mut still = Vec::new();
        // The directory of the config in force (a reload may change it).
        let netns_dir = match pending.is_empty() {
            true => PathBuf::new(),
            false => server.config().netns_dir.clone(),
        };
        for mut p in std::mem::take(&mut pending) {
            if p.next > now {
                still.push(p);
                continue;
            }
            if draining.is_none() && p.step(now, &netns_dir, &mut server) {
                still.push(p);
            }
        }
        pending = still;
        if now >= next_held_check {
            next_held_check = now + HELD_CHECK;
            if draining.is_none() {
                server.check_held_namespaces();
            }
        }
        if let Some(w) = &mut watch {
            if now >= next_rescan {
                next_rescan = now + NETNS_RESCAN;
                let events = w.rescan();
                netns_events(events, &mut pending, &mut server);
            }
        }
        if let Some(t) = &mut takeover {
            if t.conn.is_some() && t.deadline.is_some_and(|d| now >= d) {
                tracing::warn!(
                    waited_s = crate::takeover::PENDING_MAX.as_secs(),
                    "takeover abandoned: the new process did not answer; still serving"
                );
                t.conn = None;
            }
        }
        if let Some(a) = &mut admin {
            a.expire(now);
            // An accept that failed for lack of fds: the edge-triggered listener
            // would not report the queued connection again.
            if a.retry_at().is_some_and(|t| now >= t) {
                admin_accept(&ep, a, &server);
            }
        }
        if let Some(deadline) = draining {
            // A listener still being detached may yet accept a connection: it
            // has to be closed before "no session" means "done" (read first).
            let closing = server.listener_sockets() > 0 && !crate::driver::worker_failed();
            let open = server.open_sessions();
            if (open == 0 && !closing) || now >= deadline {
                if open > 0 {
                    tracing::warn!(open, "shutdown timeout: closing the remaining connections");
                }
                server.shutdown();
                if crate::driver::worker_failed() {
                    return Ok(Exit::WorkerFailed);
                }
                return Ok(Exit::Clean);
            }
        }
        if let Some(w) = &mut watch {
            let events = w.rearm_if_needed();
            netns_events(events, &mut pending, &mut server);
        }
    }
}

/// Accepts the admin connections waiting (see [`Admin::accept`]), watches them and
/// serves what they already sent.
fn admin_accept(ep: &Epoll, a: &mut Admin, server: &Server) {
    for (id, fd) in a.accept() {
        // SAFETY: `fd` belongs to a stream the Admin keeps open until it reports
        // Interest::Closed (or evicts it, which closes the fd and so removes it
        // from the epoll set).
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = ep.add(b, EpollEvent::new(EpollFlags::EPOLLIN, T_CONN_BASE + id));
        drive_admin(ep, a, id, fd, server);
    }
}

/// The handled signals waiting on `sfd` (non-blocking), in the order read.
fn read_signals(sfd: &SignalFd) -> Vec<Signal> {
    let mut out = Vec::new();
    while let Ok(Some(info)) = sfd.read_signal() {
        if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
            out.push(sig);
        }
    }
    out
}

/// Acts on one signal: SIGHUP reloads (ignored while shutting down); the first
/// SIGTERM/SIGINT starts the graceful shutdown (`draining` becomes its deadline),
/// a later one ends the loop at once ([`Exit::Forced`]), unless both came during
/// start-up (`starting`: read before the loop first waited), where the operator
/// could not have seen the first one acted on. After a worker failed, any
/// terminating signal starts (or continues) the shutdown.
fn on_signal(
    sig: Signal,
    starting: bool,
    server: &mut Server,
    draining: &mut Option<Instant>,
    takeover: &mut Option<TakeoverServer>,
    reloader: &mut Reloader,
) -> Option<Exit> {
    if sig == Signal::SIGHUP {
        if draining.is_some() {
            tracing::warn!("SIGHUP while shutting down: ignored");
        } else if takeover.as_ref().is_some_and(|t| t.conn.is_some()) {
            // The offered sockets are shared with the new process now: a reload
            // must not close or change them.
            tracing::warn!("SIGHUP during a takeover: ignored");
        } else {
            if starting {
                tracing::info!(
                    "SIGHUP received during start-up: reloading now that the server is ready"
                );
            }
            reloader.start();
        }
        return None;
    }
    if crate::driver::worker_failed() {
        if draining.is_none() {
            tracing::error!("a worker stopped; shutting down (exit status 1)");
            begin_shutdown(server, draining, Stop::All);
        }
        return None;
    }
    if draining.is_some() {
        if starting {
            return None;
        }
        tracing::warn!(signal = %sig, "second signal: exiting now");
        return Some(Exit::Forced);
    }
    if let Some(t) = takeover {
        // A takeover in progress is abandoned: the new process sees EOF.
        t.conn = None;
    }
    let t = server.config().runtime.shutdown_timeout_ms;
    tracing::info!(signal = %sig, timeout_ms = t, during_start_up = starting,
        "shutting down: no new connections; idle keep-alive connections close, open ones may finish");
    begin_shutdown(server, draining, Stop::All);
    None
}

/// How the listeners stop when a graceful shutdown begins.
enum Stop<'a> {
    /// Every listener stops accepting (SIGTERM, a failed worker).
    All,
    /// A new process took these listeners over: they are detached, the rest stop.
    HandedOver(&'a HashSet<String>),
}

/// Stops the listeners as `stop` says, then tells every worker to drain its
/// sessions ([`Command::Drain`]); `draining` becomes the deadline
/// (now + `runtime.shutdown_timeout_ms`). The one path for SIGTERM, a failed
/// worker and a finished takeover.
fn begin_shutdown(server: &mut Server, draining: &mut Option<Instant>, stop: Stop<'_>) {
    sdnotify::notify_or_log("STOPPING=1");
    match stop {
        Stop::All => server.stop_accepting(),
        Stop::HandedOver(taken) => server.handed_over(taken),
    }
    for w in server.workers() {
        // A worker that has exited has no session left to drain.
        let _ = w.send(Command::Drain);
    }
    let t = server.config().runtime.shutdown_timeout_ms;
    *draining = Some(Instant::now() + Duration::from_millis(t));
}

/// The netns directory entries (names) of listeners that are down.
fn down_entries(server: &Server) -> BTreeSet<String> {
    server
        .listeners()
        .filter(|l| matches!(l.state, crate::server::ListenerState::Down(_)))
        .filter_map(|l| match &l.config.netns {
            Some(netns::NetnsRef::Named(n)) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// Acts on names that appeared (bind, retried while they settle, then with
/// back-off until served or gone) or vanished.
fn netns_events(events: Vec<(String, bool)>, pending: &mut Vec<Pending>, server: &mut Server) {
    for (name, appeared) in events {
        pending.retain(|p| p.name != name);
        if appeared {
            pending.push(Pending::new(name, Instant::now()));
        } else {
            server.netns_vanished(&name);
        }
    }
}

fn add(ep: &Epoll, fd: BorrowedFd<'_>, token: u64) -> Result<(), String> {
    ep.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
        .map_err(|e| format!("epoll_ctl: {e}"))
}

fn drive_admin(ep: &Epoll, a: &mut Admin, id: u64, fd: RawFd, server: &Server) {
    // SAFETY: the stream behind `fd` is open until Admin reports Closed; after
    // that, only EPOLL_CTL_DEL-free paths run (closing removes it from the set).
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let token = T_CONN_BASE + id;
    match a.drive(id, server) {
        Interest::Read => {
            let _ = ep.modify(b, &mut EpollEvent::new(EpollFlags::EPOLLIN, token));
        }
        Interest::Write => {
            let _ = ep.modify(b, &mut EpollEvent::new(EpollFlags::EPOLLOUT, token));
        }
        Interest::Closed => {}
    }
}

/// Applies what the reload thread read (SIGHUP): the config, validated; on any
/// failure the running config goes on. Dropped when the process is shutting
/// down (`draining`) or a takeover is under way (the offered sockets are shared
/// with the new process: a reload must not close or change them).
fn apply_reload(
    server: &mut Server,
    result: Result<Config, String>,
    draining: bool,
    takeover: &Option<TakeoverServer>,
) {
    if draining {
        tracing::warn!("reload dropped: shutting down");
        return;
    }
    if takeover.as_ref().is_some_and(|t| t.conn.is_some()) {
        tracing::warn!("reload dropped: a takeover is under way");
        sdnotify::notify_or_log("READY=1");
        return;
    }
    let result = result.and_then(|c| {
        if c.admin != server.config().admin {
            tracing::warn!(
                "[admin] changes take effect at the next start; the admin endpoint is unchanged"
            );
        }
        server.reload(c).map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        tracing::error!(error = %e, "reload rejected; the running config goes on");
    }
    sdnotify::notify_or_log("READY=1");
}

/// inotify on the netns directory, and the names it holds.
struct NetnsWatch {
    fd: Inotify,
    dir: PathBuf,
    watching: bool,
    /// The directory's entries as last seen.
    known: BTreeSet<String>,
}

impl NetnsWatch {
    /// Watches `dir`, creating it first if missing (as `ip netns add` would).
    fn new(dir: &Path) -> Option<NetnsWatch> {
        let fd = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: namespaces that come and go are not followed");
                return None;
            }
        };
        let mut w = NetnsWatch {
            fd,
            dir: dir.to_path_buf(),
            watching: false,
            known: netns::list_dir(dir).into_iter().collect(),
        };
        // The server has just bound what the directory holds: nothing to report.
        let _ = w.rearm_if_needed();
        Some(w)
    }

    /// Watches the directory again if the watch was lost (it was removed, or the
    /// event queue overflowed); returns what changed meanwhile.
    fn rearm_if_needed(&mut self) -> Vec<(String, bool)> {
        if self.watching {
            return Vec::new();
        }
        if !self.dir.exists() {
            let _ = std::fs::create_dir_all(&self.dir);
        }
        match self.fd.add_watch(
            &self.dir,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE_SELF,
        ) {
            Ok(_) => {
                self.watching = true;
                self.rescan()
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the netns directory");
                Vec::new()
            }
        }
    }

    /// Compares the directory with what was known: names that appeared or vanished.
    fn rescan(&mut self) -> Vec<(String, bool)> {
        let now: BTreeSet<String> = netns::list_dir(&self.dir).into_iter().collect();
        let mut out: Vec<(String, bool)> = now
            .difference(&self.known)
            .map(|n| (n.clone(), true))
            .collect();
        out.extend(self.known.difference(&now).map(|n| (n.clone(), false)));
        self.known = now;
        out
    }

    /// Names that appeared (`true`) or vanished (`false`), in order.
    fn read(&mut self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut rescan = false;
        while let Ok(evs) = self.fd.read_events() {
            if evs.is_empty() {
                break;
            }
            for e in evs {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: compare the directory with what we know.
                    rescan = true;
                    continue;
                }
                if e.mask
                    .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF)
                {
                    // The directory itself went away: watch it again when it is back.
                    self.watching = false;
                    continue;
                }
                let Some(name) = e.name.and_then(|n| n.into_string().ok()) else {
                    continue;
                };
                let appeared = e
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
                if appeared {
                    self.known.insert(name.clone());
                } else {
                    self.known.remove(&name);
                }
                out.push((name, appeared));
            }
        }
        if rescan {
            out.extend(self.rescan());
        }
        out
    }
}
