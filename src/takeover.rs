//! Binary upgrade by listener takeover: a running ringress hands its listening
//! sockets, with their identity, to a new process over a unix stream socket
//! (SCM_RIGHTS, unix(7)); the new process serves them at once and only then tells
//! the old one to stop accepting and drain, as on SIGTERM. Nothing is closed in
//! between, so no queued connection is reset and no new one refused: the old and
//! the new process share the same sockets (the same file descriptions) until the
//! old one closes its copies. The idea is HAProxy's (`-x` with `stats socket ...
//! expose-fd listeners`); the protocol is ours.
//!
//! # Roles
//! - The running process ([`TakeoverServer`], in the control loop) listens on
//!   `[runtime] takeover_socket` (mode 0600; only root or its own uid may connect,
//!   checked with SO_PEERCRED).
//! - The new process (`ringress run NEW.toml --takeover PATH`) calls [`receive`]
//!   before it binds anything, starts its server with the sockets it got
//!   ([`Inherited`], consulted by `Server::bind`), and then calls
//!   [`Inherited::finish`] with the sockets it took.
//!
//! # Messages
//! A *frame* is a 4-byte little-endian length (at most [`MAX_FRAME`] bytes) and
//! that many bytes of JSON. A *batch* is a 4-byte little-endian count `n`
//! (1..=[`SCM_MAX_FD`]) sent in one sendmsg(2) with an SCM_RIGHTS control message
//! of exactly `n` fds (Linux takes at most `SCM_MAX_FD` = 253 fds per message,
//! include/net/scm.h).
//!
//! 1. old → new, frame [`Offer`]: `{"version":1,"pid":1234,"listeners":[{"name":
//!    "web","netns":"/run/netns/a","netns_label":"a","proto":"tcp","address":
//!    "10.0.0.1:80","fds":4}, ...]}`.
//! 2. old → new, batches carrying `sum(listeners[].fds)` fds in the order of the
//!    listeners (each listener's sockets in a row: one SO_REUSEPORT socket per old
//!    worker).
//! 3. new → old, frame [`Accept`] once it serves: `{"taken":["web", ...]}`, the
//!    offered listener names it reuses. Closing the connection instead abandons
//!    the takeover: the old process goes on serving.
//! 4. old → new, frame [`Stopped`]: `{"pid":1234}` once the old process has
//!    stopped accepting (taken sockets detached without touching them, the others
//!    drained as on SIGTERM), released its admin endpoint and removed its
//!    takeover socket; then it drains and exits 0.
//!
//! Each step has a [`EXCHANGE_TIMEOUT`] deadline on the new process's side. Any
//! malformed message is an error naming what was wrong; neither side panics.

use std::collections::HashSet;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    getsockopt, recv, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::{Deserialize, Serialize};

use crate::config::Proto;

/// Version of the protocol in [`Offer::version`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Most fds in one SCM_RIGHTS message (Linux `SCM_MAX_FD`, include/net/scm.h).
pub const SCM_MAX_FD: usize = 253;
/// Largest frame accepted (bytes); a peer announcing more is refused.
pub const MAX_FRAME: usize = 16 << 20;
/// Deadline of each step of the exchange on the new process's side: connecting,
/// each message read or written, and the old process's [`Stopped`] answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the running process waits, after its offer, for the new process to
/// serve and answer; then it abandons the takeover (closes the connection) and
/// goes on as before (SIGHUP is ignored meanwhile).
pub const PENDING_MAX: Duration = Duration::from_secs(60);

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// connect(2) to the takeover socket failed (ENOENT: no running process
    /// there; ECONNREFUSED: a stale socket file).
    #[error("cannot connect to the takeover socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the exchange failed or timed out (EAGAIN after
    /// [`EXCHANGE_TIMEOUT`]), or the peer closed the connection.
    #[error("takeover socket {path}: {step}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something this protocol does not allow.
    #[error("takeover socket {path}: malformed message from the peer: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// One listener as offered: its identity and how many sockets follow for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// The listener's name in the old process (template instances: `NAME@NS`).
    pub name: String,
    /// The namespace file the sockets were made in; `None`: the root namespace.
    pub netns: Option<PathBuf>,
    /// The namespace label, for logs (`root` or the name).
    pub netns_label: String,
    /// `"tcp"`, `"udp"` or `"sctp"` (one-to-one SCTP only).
    pub proto: String,
    /// The configured (and bound) address.
    pub address: SocketAddr,
    /// How many sockets (one per old worker) follow for this listener.
    pub fds: usize,
}

/// Step 1: what the old process offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The old process's pid.
    pub pid: u32,
    /// The listeners, in the order their fds follow.
    pub listeners: Vec<SocketInfo>,
}

/// Step 3: the new process serves; the names of the listeners it reuses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accept {
    /// Offered listener names whose sockets the new process serves.
    pub taken: Vec<String>,
}

/// Step 4: the old process has stopped accepting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stopped {
    /// The old process's pid (it exits once its sessions are done).
    pub pid: u32,
}

// ------------------------------------------------------------------ wire

/// Writes one frame: 4-byte little-endian length, JSON.
fn send_frame<T: Serialize>(s: &mut UnixStream, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "message of {} bytes exceeds {MAX_FRAME}",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out)
}

/// What a read got wrong: an I/O error, or a protocol violation.
enum ReadError {
    Io(io::Error),
    Protocol(String),
}

/// Reads exactly `buf.len()` bytes with recvmsg(2), so that fds attached by a
/// hostile or confused peer are received (and closed here) rather than lost;
/// returns the fds that came with the bytes (close-on-exec).
fn recv_exact(s: &UnixStream, buf: &mut [u8]) -> Result<Vec<OwnedFd>, ReadError> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(ReadError::Io(io::Error::from(e))),
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel has just installed `fd` in this
                        // process for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if truncated {
            return Err(ReadError::Protocol(
                "control data truncated (more fds than one message may carry)".into(),
            ));
        }
        if n == 0 {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )));
        }
        got += n;
    }
    Ok(fds)
}

/// Reads one frame; fds attached to it are a protocol error.
fn recv_frame<T: for<'de> Deserialize<'de>>(s: &UnixStream) -> Result<T, ReadError> {
    let mut len = [0u8; 4];
    let mut stray = recv_exact(s, &mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ReadError::Protocol(format!(
            "frame of {len} bytes announced (at most {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    stray.extend(recv_exact(s, &mut body)?);
    if !stray.is_empty() {
        return Err(ReadError::Protocol(format!(
            "{} fds attached to a JSON frame",
            stray.len()
        )));
    }
    serde_json::from_slice(&body).map_err(|e| ReadError::Protocol(format!("bad JSON: {e}")))
}

/// Sends `fds` in batches of at most [`SCM_MAX_FD`].
fn send_fds(s: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for chunk in fds.chunks(SCM_MAX_FD) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.as_raw_fd()).collect();
        let count = (raw.len() as u32).to_le_bytes();
        let iov = [IoSlice::new(&count)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        loop {
            match sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(4) => break,
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short write of an fd batch ({n} of 4 bytes)"
                    )))
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Receives `total` fds sent by [`send_fds`].
fn recv_fds(s: &UnixStream, total: usize) -> Result<Vec<OwnedFd>, ReadError> {
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let mut count = [0u8; 4];
        let fds = recv_exact(s, &mut count)?;
        let count = u32::from_le_bytes(count) as usize;
        if count == 0 || count > SCM_MAX_FD || count != fds.len() {
            return Err(ReadError::Protocol(format!(
                "fd batch announces {count} fds and carries {}",
                fds.len()
            )));
        }
        out.extend(fds);
        if out.len() > total {
            return Err(ReadError::Protocol(format!(
                "{} fds received, {total} announced",
                out.len()
            )));
        }
    }
    Ok(out)
}

/// Whether the peer of `s` is root or runs as our effective uid (SO_PEERCRED).
fn peer_allowed(s: &UnixStream) -> Result<(u32, i32), String> {
    let cred = getsockopt(&s.as_fd(), sockopt::PeerCredentials)
        .map_err(|e| format!("SO_PEERCRED: {e}"))?;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == me {
        Ok((cred.uid(), cred.pid()))
    } else {
        Err(format!(
            "peer pid {} runs as uid {}; only root or uid {me} may take over",
            cred.pid(),
            cred.uid()
        ))
    }
}

// ------------------------------------------------------------------ new process

/// Sockets of one offered listener, received by the new process.
#[derive(Debug)]
struct Entry {
    info: SocketInfo,
    proto: Proto,
    fds: Vec<OwnedFd>,
    taken: bool,
}

/// What the new process received from the old one: the offered sockets until it
/// takes them, and the connection to finish the takeover on.
#[derive(Debug)]
pub struct Inherited {
    path: PathBuf,
    conn: UnixStream,
    old_pid: u32,
    entries: Vec<Entry>,
}

/// Connects to the running process at `path` and receives its listening sockets
/// (steps 1–2). Binds nothing.
///
/// # Errors
/// [`TakeoverError::Connect`] (the path and errno), [`TakeoverError::Io`] (a read
/// failed or timed out after [`EXCHANGE_TIMEOUT`]), [`TakeoverError::Protocol`]
/// (a malformed offer: wrong version, fd counts that do not add up, an fd that is
/// not a socket of the announced kind and address, a peer of another uid).
pub fn receive(path: &Path) -> Result<Inherited, TakeoverError> {
    let io_err = |step, source| TakeoverError::Io {
        path: path.to_path_buf(),
        step,
        source,
    };
    let proto_err = |message: String| TakeoverError::Protocol {
        path: path.to_path_buf(),
        message,
    };
    let read_err = |step, e: ReadError| match e {
        ReadError::Io(e) => io_err(step, e),
        ReadError::Protocol(m) => proto_err(m),
    };
    let conn = UnixStream::connect(path).map_err(|source| TakeoverError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .and_then(|_| conn.set_write_timeout(Some(EXCHANGE_TIMEOUT)))
        .map_err(|e| io_err("setting timeouts", e))?;
    peer_allowed(&conn).map_err(proto_err)?;
    let offer: Offer = recv_frame(&conn).map_err(|e| read_err("reading the offer", e))?;
    if offer.version != PROTOCOL_VERSION {
        return Err(proto_err(format!(
            "protocol version {} (this ringress speaks {PROTOCOL_VERSION})",
            offer.version
        )));
    }
    let mut total = 0usize;
    for l in &offer.listeners {
        if l.fds == 0 || l.fds > 65_536 {
            return Err(proto_err(format!(
                "listener {}: {} sockets announced",
                l.name, l.fds
            )));
        }
        total += l.fds;
    }
    let mut fds = recv_fds(&conn, total)
        .map_err(|e| read_err("receiving the sockets", e))?
        .into_iter();
    let mut entries = Vec::with_capacity(offer.listeners.len());
    for info in offer.listeners {
        let proto: Proto = info
            .proto
            .parse()
            .map_err(|e: String| proto_err(format!("listener {}: {e}", info.name)))?;
        let mine: Vec<OwnedFd> = fds.by_ref().take(info.fds).collect();
        for fd in &mine {
            check_socket(fd, proto, info.address)
                .map_err(|m| proto_err(format!("listener {}: {m}", info.name)))?;
        }
        entries.push(Entry {
            info,
            proto,
            fds: mine,
            taken: false,
        });
    }
    tracing::info!(
        path = %path.display(),
        old_pid = offer.pid,
        listeners = entries.len(),
        sockets = total,
        "takeover: received the running process's listening sockets"
    );
    Ok(Inherited {
        path: path.to_path_buf(),
        conn,
        old_pid: offer.pid,
        entries,
    })
}

/// Checks that `fd` is a socket of `proto` bound to `addr` (and listening, for
/// stream sockets).
fn check_socket(fd: &OwnedFd, proto: Proto, addr: SocketAddr) -> Result<(), String> {
    let sock = socket2::SockRef::from(fd);
    let ty = sock.r#type().map_err(|e| format!("SO_TYPE: {e}"))?;
    let want = match proto {
        Proto::Udp => socket2::Type::DGRAM,
        Proto::Tcp | Proto::Sctp => socket2::Type::STREAM,
    };
    if ty != want {
        return Err(format!("fd is a {ty:?} socket, not {proto}"));
    }
    if want == socket2::Type::STREAM
        && !sock
            .is_listener()
            .map_err(|e| format!("SO_ACCEPTCONN: {e}"))?
    {
        return Err("fd is not a listening socket".into());
    }
    let name = sock.local_addr().map_err(|e| format!("getsockname: {e}"))?;
    match name.as_socket() {
        Some(b) if b.ip() == addr.ip() && b.port() == addr.port() => Ok(()),
        Some(b) => Err(format!("fd is bound to {b}, not {addr}")),
        None => Err(format!(
            "fd is not an inet socket (family {:?})",
            name.family()
        )),
    }
}

impl Inherited {
    /// The old process's pid.
    pub fn old_pid(&self) -> u32 {
        self.old_pid
    }

    /// Takes the sockets offered for (`netns` file, `proto`, `addr`), if any and
    /// not taken yet: the old process's SO_REUSEPORT sockets of that listener.
    pub fn take(
        &mut self,
        netns: Option<&Path>,
        proto: Proto,
        addr: SocketAddr,
    ) -> Option<Vec<OwnedFd>> {
        let e = self.entries.iter_mut().find(|e| {
            !e.taken
                && e.proto == proto
                && e.info.address == addr
                && e.info.netns.as_deref() == netns
        })?;
        e.taken = true;
        Some(std::mem::take(&mut e.fds))
    }

    /// Closes this process's copies of the sockets no listener took (the old
    /// process drains them); returns their listener names.
    pub fn release_rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.entries.iter_mut().filter(|e| !e.taken) {
            e.fds.clear();
            out.push(e.info.name.clone());
        }
        out
    }

    /// Steps 3–4: tells the old process which listeners this one serves now and
    /// waits until it has stopped accepting (at most [`EXCHANGE_TIMEOUT`]). Sockets
    /// not taken are closed here first.
    ///
    /// # Errors
    /// [`TakeoverError::Io`] (write or read failed, timed out, or the old process
    /// closed the connection) or [`TakeoverError::Protocol`] (a malformed answer).
    pub fn finish(mut self) -> Result<u32, TakeoverError> {
        let released = self.release_rest();
        let taken: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.taken)
            .map(|e| e.info.name.clone())
            .collect();
        let path = self.path.clone();
        send_frame(
            &mut self.conn,
            &Accept {
                taken: taken.clone(),
            },
        )
        .map_err(|source| TakeoverError::Io {
            path: path.clone(),
            step: "asking the old process to stop",
            source,
        })?;
        let stopped: Stopped = recv_frame(&self.conn).map_err(|e| match e {
            ReadError::Io(source) => TakeoverError::Io {
                path: path.clone(),
                step: "waiting for the old process to stop accepting",
                source,
            },
            ReadError::Protocol(message) => TakeoverError::Protocol {
                path: path.clone(),
                message,
            },
        })?;
        tracing::info!(
            old_pid = stopped.pid,
            taken = taken.len(),
            released = released.len(),
            "takeover done: the old process stopped accepting and drains"
        );
        Ok(stopped.pid)
    }
}

// ------------------------------------------------------------------ old process

/// The running process's end: the listening unix socket at `[runtime]
/// takeover_socket`, and the one takeover in progress.
#[derive(Debug)]
pub struct TakeoverServer {
    path: PathBuf,
    listener: UnixListener,
    /// (st_dev, st_ino) of the socket file we made: removed at exit only if the
    /// path still names it (a new process may have made its own since).
    ident: (u64, u64),
    /// The file was removed (by [`TakeoverServer::stopped`] or at drop).
    removed: bool,
    /// The connection of the takeover in progress, after the offer was sent.
    pub conn: Option<UnixStream>,
    /// When the takeover in progress is abandoned ([`PENDING_MAX`] after the offer).
    pub deadline: Option<Instant>,
}

impl TakeoverServer {
    /// Listens on `path` (mode 0600): its parent directory is made if missing
    /// (mode 0755), a stale socket file is replaced. Non-blocking.
    ///
    /// # Errors
    /// The directory cannot be made, `path` exists and is not a socket, or
    /// bind(2)/listen(2) failed; the message names the path and errno.
    pub fn bind(path: &Path) -> Result<TakeoverServer, String> {
        let ctx =
            |what: &str, e: io::Error| format!("takeover socket {}: {what}: {e}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ctx("creating its directory", e))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|e| ctx("removing the stale socket", e))?
            }
            Ok(_) => {
                return Err(ctx(
                    "exists and is not a socket",
                    io::Error::from_raw_os_error(libc::EEXIST),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| ctx("bind", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ctx("chmod 0600", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ctx("O_NONBLOCK", e))?;
        let m = std::fs::symlink_metadata(path).map_err(|e| ctx("stat", e))?;
        tracing::info!(path = %path.display(), "takeover socket listening");
        Ok(TakeoverServer {
            path: path.to_path_buf(),
            listener,
            ident: (m.dev(), m.ino()),
            removed: false,
            conn: None,
            deadline: None,
        })
    }

    /// The listening socket (for the event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts one pending connection whose peer is root or our uid; refuses (closes)
    /// others with a warning, and any while a takeover is in progress.
    pub fn accept(&mut self) -> Option<UnixStream> {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            };
            if self.conn.is_some() {
                tracing::warn!("takeover refused: another takeover is in progress");
                continue;
            }
            match peer_allowed(&s) {
                Ok((uid, pid)) => {
                    tracing::info!(peer_pid = pid, peer_uid = uid, "takeover requested");
                    return Some(s);
                }
                Err(e) => tracing::warn!(error = %e, "takeover refused"),
            }
        }
    }

    /// Steps 1–2 on `conn`: sends the offer and the sockets (blocking, at most
    /// [`EXCHANGE_TIMEOUT`] per write), then keeps `conn` (non-blocking) to wait
    /// for the new process's answer. Our copies in `offer` are closed on return
    /// (the kernel holds the in-flight ones).
    ///
    /// # Errors
    /// A write failed or timed out (the message names the errno); the takeover
    /// is abandoned and nothing changes here.
    pub fn offer(
        &mut self,
        mut conn: UnixStream,
        offer: Vec<(SocketInfo, Vec<OwnedFd>)>,
    ) -> Result<(), String> {
        let err = |what: &str, e: io::Error| format!("takeover: {what}: {e}");
        conn.set_nonblocking(false)
            .and_then(|_| conn.set_write_timeout(Some(EXCHANGE_TIMEOUT)))
            .map_err(|e| err("socket setup", e))?;
        let msg = Offer {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            listeners: offer.iter().map(|(i, _)| i.clone()).collect(),
        };
        send_frame(&mut conn, &msg).map_err(|e| err("sending the offer", e))?;
        let fds: Vec<BorrowedFd<'_>> = offer
            .iter()
            .flat_map(|(_, fds)| fds.iter().map(|f| f.as_fd()))
            .collect();
        send_fds(&conn, &fds).map_err(|e| err("sending the sockets", e))?;
        conn.set_nonblocking(true)
            .map_err(|e| err("socket setup", e))?;
        tracing::info!(
            listeners = offer.len(),
            sockets = fds.len(),
            "takeover: listening sockets sent; serving on until the new process is ready"
        );
        self.conn = Some(conn);
        self.deadline = Some(Instant::now() + PENDING_MAX);
        Ok(())
    }

    /// The connection became readable: `Ok(Some(taken))` once the whole
    /// [`Accept`] arrived, `Ok(None)` if more is to come, `Err` if the new
    /// process gave up (closed the connection) or sent nothing valid; then the
    /// takeover is abandoned and this process goes on serving.
    pub fn read_accept(&mut self) -> Result<Option<HashSet<String>>, String> {
        let Some(conn) = &self.conn else {
            return Ok(None);
        };
        let mut probe = [0u8; 1];
        match recv(
            conn.as_raw_fd(),
            &mut probe,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)
        {
            Ok(0) => {
                self.conn = None;
                return Err("the new process closed the connection before it was ready".into());
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => {
                self.conn = None;
                return Err(format!("reading the answer: {e}"));
            }
        }
        // The answer is one small frame, sent at once: read it with a deadline.
        let res = conn
            .set_nonblocking(false)
            .and_then(|_| conn.set_read_timeout(Some(EXCHANGE_TIMEOUT)))
            .map_err(|e| format!("socket setup: {e}"))
            .and_then(|_| match recv_frame::<Accept>(conn) {
                Ok(a) => Ok(a.taken.into_iter().collect()),
                Err(ReadError::Io(e)) => Err(format!("reading the answer: {e}")),
                Err(ReadError::Protocol(m)) => Err(format!("malformed answer: {m}")),
            });
        match res {
            Ok(taken) => Ok(Some(taken)),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// Step 4: tells the new process this one has stopped accepting, and closes
    /// the connection and the takeover socket (removing its file).
    pub fn stopped(mut self) {
        // The file goes first: the new process makes its own once it has the answer.
        self.remove_file();
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.set_nonblocking(false);
            if let Err(e) = send_frame(
                &mut conn,
                &Stopped {
                    pid: std::process::id(),
                },
            ) {
                tracing::warn!(error = %e, "takeover: cannot confirm the stop to the new process");
            }
            // The frame is in the peer's receive queue: closing now loses nothing.
        }
    }
}

impl TakeoverServer {
    /// Removes the socket file if the path still names the one we made, once:
    /// after that the path may be the new process's socket, whose inode number
    /// can be the one just freed (filesystems reuse them), so a second removal
    /// (at drop) would delete it.
    fn remove_file(&mut self) {
        if self.removed {
            return;
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        self.removed = true;
    }
}

impl Drop for TakeoverServer {
    /// Removes the socket file if the path still names the one we made.
    fn drop(&mut self) {
        self.remove_file();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
    }

    #[test]
    fn fds_cross_in_batches() {
        let (a, b) = pair();
        let socks: Vec<OwnedFd> = (0..300)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = socks.iter().map(|f| f.as_fd()).collect();
        let t = std::thread::spawn(move || recv_fds(&b, 300).ok().map(|v| v.len()));
        send_fds(&a, &borrowed).unwrap();
        assert_eq!(t.join().unwrap(), Some(300));
    }

    #[test]
    fn hostile_frames_are_errors() {
        // A huge announced length.
        let (mut a, b) = pair();
        a.write_all(&(u32::MAX).to_le_bytes()).unwrap();
        assert!(
            matches!(recv_frame::<Offer>(&b), Err(ReadError::Protocol(m)) if m.contains("bytes announced"))
        );
        // Not JSON.
        let (mut a, b) = pair();
        a.write_all(&3u32.to_le_bytes()).unwrap();
        a.write_all(b"abc").unwrap();
        assert!(
            matches!(recv_frame::<Offer>(&b), Err(ReadError::Protocol(m)) if m.contains("bad JSON"))
        );
        // Truncated, then closed.
        let (mut a, b) = pair();
        a.write_all(&10u32.to_le_bytes()).unwrap();
        drop(a);
        assert!(matches!(recv_frame::<Offer>(&b), Err(ReadError::Io(_))));
        // A batch whose count lies.
        let (a, b) = pair();
        let s: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
        let count = 5u32.to_le_bytes();
        let raw = [s.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&count)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(
            matches!(recv_fds(&b, 5), Err(ReadError::Protocol(m)) if m.contains("announces 5"))
        );
    }

    #[test]
    fn sockets_are_checked_against_their_identity() {
        let u: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taddr = t.local_addr().unwrap();
        let t: OwnedFd = t.into();
        assert!(check_socket(&t, Proto::Tcp, taddr).is_ok());
        assert!(check_socket(&t, Proto::Udp, taddr)
            .unwrap_err()
            .contains("not udp"));
        assert!(check_socket(&u, Proto::Tcp, taddr).is_err());
        let other = SocketAddr::from(([127, 0, 0, 1], taddr.port().wrapping_add(1)));
        assert!(check_socket(&t, Proto::Tcp, other)
            .unwrap_err()
            .contains("bound to"));
    }
}
