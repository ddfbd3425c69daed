//! UDP listeners of a worker, shared by both drivers: what to do with a datagram
//! (echo it, or forward it through the client's proxy session), the session table,
//! and the datagram syscalls both drivers use.
//!
//! A proxy session is keyed by the client's address and the local address it sent
//! to. A new session whose upstream socket must come from the binder's pool and
//! finds it empty waits for the refill and keeps its first datagrams meanwhile
//! ([`UdpSessions::enqueue`]); the worker retries waiting sessions each time it
//! wakes (the refill wakes it through its eventfd; a sweep every 250 ms too).
//!
//! The backends only receive (a multishot [`super::backend::Op::RecvMulti`]:
//! io_uring RECVMSG from a provided-buffer ring, epoll recvmsg(2) until EAGAIN). Sends are sendmsg(2) with
//! MSG_DONTWAIT from both drivers: a UDP send never waits for the peer, and a full
//! socket buffer (EAGAIN) drops the datagram, as the network would. Replies leave
//! from the address the client sent to: for a wildcard bind, the datagram's
//! destination (IP_PKTINFO / IPV6_PKTINFO, ip(7), ipv6(7)) becomes the reply's
//! source through the same control message on sendmsg.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockAddr;

use super::backend::OpId;
use super::budget::FdCharge;
use super::shared::{ListenerShared, ListenerStats};
use super::slab::{Key, Slab};
use super::upstream::{GetSocket, UpstreamSet};
use crate::config::Action;
use crate::config::ProxyConfig;
use crate::proto::udp::{may_open_session, Expiry, Lookup, UdpSession, UdpSessions};

/// Room for a source address (`sockaddr_in6` is the larger of the two), bytes.
pub(crate) const NAME_SPACE: usize = size_of::<libc::sockaddr_in6>();
/// Room for one IP_PKTINFO and one IPV6_PKTINFO control message, bytes.
pub(crate) const CONTROL_SPACE: usize = 128;
/// How often idle and unreplied UDP sessions are looked for (so a session ends up
/// to this much after its timeout).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// A received datagram.
pub(crate) struct Datagram<'a> {
    /// The payload (possibly cut, see `truncated`).
    pub data: &'a [u8],
    /// Its source.
    pub from: Option<SocketAddr>,
    /// Its destination address (from IP_PKTINFO), for wildcard listeners.
    pub to: Option<IpAddr>,
    /// The payload did not fit the buffer (MSG_TRUNC).
    pub truncated: bool,
}

/// One UDP listener socket of this worker.
pub(crate) struct UdpListener {
    pub fd: OwnedFd,
    pub shared: Arc<ListenerShared>,
    pub max_datagram: usize,
    /// Proxy sessions by client and local address; `None` for echo.
    pub sessions: Option<UdpSessions<Key>>,
    /// Its multishot receive, while in flight.
    pub recv: Option<OpId>,
    /// Being removed: closed when its receive has ended.
    pub closing: bool,
}

/// The connected upstream socket of one UDP proxy session.
pub(crate) struct UdpUpstream {
    pub fd: OwnedFd,
    pub listener: Key,
    pub session: u32,
    /// Its multishot receive, while in flight.
    pub recv: Option<OpId>,
    /// Its session ended: closed when its receive has ended.
    pub closing: bool,
    /// What it holds of the session fd budget (its socket); given back on drop.
    _charge: Option<FdCharge>,
}

/// What the driver must do after a datagram was handled.
pub(crate) enum After {
    /// Nothing.
    Nothing,
    /// A session was made: start receiving on its upstream socket.
    Watch(Key),
}

/// The UDP state of a worker.
#[derive(Default)]
pub(crate) struct UdpState {
    pub listeners: Slab<UdpListener>,
    pub upstreams: Slab<UdpUpstream>,
    pub next_sweep: Option<Instant>,
}

impl UdpState {
    /// Adds a listener socket; returns its key.
    pub fn add_listener(&mut self, fd: OwnedFd, shared: Arc<ListenerShared>) -> Key {
        let (max_datagram, sessions) = match &shared.action {
            Action::Proxy(p) => {
                let (idle, unreplied) = timeouts(p);
                (shared.max_datagram, Some(UdpSessions::new(idle, unreplied)))
            }
            _ => (shared.max_datagram, None),
        };
        if sessions.is_some() && self.next_sweep.is_none() {
            self.next_sweep = Some(Instant::now() + SWEEP_EVERY);
        }
        self.listeners.insert(UdpListener {
            fd,
            shared,
            max_datagram,
            sessions,
            recv: None,
            closing: false,
        })
    }

    /// A datagram arrived on listener `lk`: echo it or forward it.
    pub fn on_listener_datagram(
        &mut self,
        lk: Key,
        d: &Datagram<'_>,
        wake: &Arc<OwnedFd>,
        now: Instant,
    ) -> After {
        let Some(l) = self.listeners.get_mut(lk) else {
            return After::Nothing;
        };
        let st = &l.shared.stats;
        if d.truncated || d.data.len() > l.max_datagram {
            st.truncated.fetch_add(1, Relaxed);
            return After::Nothing;
        }
        let Some(from) = d.from else {
            return After::Nothing;
        };
        st.bytes_in.fetch_add(d.data.len() as u64, Relaxed);
        let Some(sessions) = &mut l.sessions else {
            // echo: back to the sender, from the address it sent to.
            count_send(st, send_to_from(l.fd.as_raw_fd(), d.data, Some(from), d.to));
            return After::Nothing;
        };
        let (Action::Proxy(p), Some(set)) = (&l.shared.action, &l.shared.upstream) else {
            return After::Nothing;
        };
        let max = p.max_sessions;
        // A new session also needs room in the fd budget (one fd: its upstream
        // socket) and under the listener's max_connections; refused ones count
        // as session_limit.
        let shared = &l.shared;
        let admit = || {
            may_open_session(st.active() as usize, max)
                && shared
                    .budget
                    .admits(&shared.netns_fds, st.active(), shared.max_connections, 1)
                    .is_ok()
        };
        let (id, fd) = match sessions.lookup(from, d.to, admit) {
            Lookup::Existing(id) => {
                sessions.touch(id, now);
                match sessions.get(id).and_then(|s| s.upstream) {
                    Some(uk) => {
                        if let Some(u) = self.upstreams.get_mut(uk) {
                            let r = send_to_from(u.fd.as_raw_fd(), d.data, None, None);
                            count_upstream_send(st, r);
                        }
                    }
                    None => {
                        if sessions.enqueue(id, d.data).is_err() {
                            st.session_queue_full.fetch_add(1, Relaxed);
                        }
                    }
                }
                return After::Nothing;
            }
            Lookup::Full => {
                st.session_limit.fetch_add(1, Relaxed);
                return After::Nothing;
            }
            Lookup::Vacant => match upstream_socket(&l.shared, set, wake, now) {
                Err(()) => {
                    // No socket can be had: dropped, as a congested network would.
                    st.upstream_errors.fetch_add(1, Relaxed);
                    return After::Nothing;
                }
                Ok(None) => {
                    // The pool is empty: the session waits for its refill, keeping
                    // this datagram ([`UdpState::retry_waiting`]).
                    let id = sessions.insert(from, d.to, None, now);
                    st.accepted.fetch_add(1, Relaxed);
                    if sessions.enqueue(id, d.data).is_err() {
                        st.session_queue_full.fetch_add(1, Relaxed);
                    }
                    return After::Nothing;
                }
                Ok(Some(fd)) => {
                    let id = sessions.insert(from, d.to, None, now);
                    st.accepted.fetch_add(1, Relaxed);
                    count_upstream_send(st, send_to_from(fd.as_raw_fd(), d.data, None, None));
                    (id, fd)
                }
            },
        };
        After::Watch(self.add_upstream(lk, id, fd))
    }

    /// Registers `fd` as the upstream socket of session `id` of listener `lk` and
    /// sends the datagrams the session kept while it waited; returns its key.
    fn add_upstream(&mut self, lk: Key, id: u32, fd: OwnedFd) -> Key {
        let raw = fd.as_raw_fd();
        let charge = self
            .listeners
            .get(lk)
            .map(|l| l.shared.budget.charge(&l.shared.netns_fds, 1));
        let uk = self.upstreams.insert(UdpUpstream {
            fd,
            listener: lk,
            session: id,
            recv: None,
            closing: false,
            _charge: charge,
        });
        if let Some(l) = self.listeners.get_mut(lk) {
            if let Some(sessions) = &mut l.sessions {
                for data in sessions.set_upstream(id, uk) {
                    count_upstream_send(&l.shared.stats, send_to_from(raw, &data, None, None));
                }
            }
        }
        uk
    }

    /// Gives waiting session `id` of listener `lk` an upstream socket and sends
    /// what the session kept; returns the socket's key, to receive on. `None` when
    /// the pool is still empty (the session goes on waiting; `wake` is written
    /// when the refill ends) or no socket can be had (the session ends, its kept
    /// datagrams counted as upstream errors).
    fn connect_session(
        &mut self,
        lk: Key,
        id: u32,
        wake: &Arc<OwnedFd>,
        now: Instant,
    ) -> Option<Key> {
        let l = self.listeners.get_mut(lk)?;
        let set = l.shared.upstream.as_ref()?;
        match upstream_socket(&l.shared, set, wake, now) {
            Ok(Some(fd)) => Some(self.add_upstream(lk, id, fd)),
            Ok(None) => None,
            Err(()) => {
                let st = &l.shared.stats;
                if let Some(s) = l.sessions.as_mut().and_then(|t| t.remove(id)) {
                    st.upstream_errors
                        .fetch_add(s.queued().max(1) as u64, Relaxed);
                    st.closed.fetch_add(1, Relaxed);
                }
                None
            }
        }
    }

    /// Retries the sessions waiting for an upstream socket (the pool may have been
    /// refilled); returns the upstream keys of those that got one, to receive on.
    /// A listener's retries stop at its first session that must still wait.
    pub fn retry_waiting(&mut self, wake: &Arc<OwnedFd>, now: Instant) -> Vec<Key> {
        let mut watch = Vec::new();
        for lk in self.listeners.keys() {
            let ids = match self.listeners.get(lk).and_then(|l| l.sessions.as_ref()) {
                Some(s) if s.waiting() > 0 => s.waiting_ids(),
                _ => continue,
            };
            for id in ids {
                match self.connect_session(lk, id, wake, now) {
                    Some(uk) => watch.push(uk),
                    None => {
                        let still = self
                            .listeners
                            .get(lk)
                            .and_then(|l| l.sessions.as_ref())
                            .and_then(|s| s.get(id))
                            .is_some();
                        if still {
                            break;
                        }
                    }
                }
            }
        }
        watch
    }

    /// Whether some session waits for an upstream socket.
    pub fn any_waiting(&self) -> bool {
        self.listeners
            .values()
            .any(|l| l.sessions.as_ref().is_some_and(|s| s.waiting() > 0))
    }

    /// A datagram arrived on upstream socket `uk`: back to its session's client,
    /// from the address the client sent to.
    pub fn on_upstream_datagram(&mut self, uk: Key, d: &Datagram<'_>, now: Instant) {
        let Some(u) = self.upstreams.get_mut(uk) else {
            return;
        };
        let (lk, id) = (u.listener, u.session);
        let Some(l) = self.listeners.get_mut(lk) else {
            return;
        };
        let st = &l.shared.stats;
        if d.truncated {
            st.truncated.fetch_add(1, Relaxed);
            return;
        }
        let Some(sessions) = &mut l.sessions else {
            return;
        };
        // The session may have ended (and its id been reused) while this socket's
        // last datagrams were still on their way.
        match sessions.get(id) {
            Some(s) if s.upstream == Some(uk) => {
                let (client, local) = (s.client, s.local);
                sessions.reply(id, now);
                count_send(
                    st,
                    send_to_from(l.fd.as_raw_fd(), d.data, Some(client), local),
                );
            }
            _ => {}
        }
    }

    /// An error on upstream socket `uk` (ECONNREFUSED after an ICMP port
    /// unreachable, for one): counted; the session, the listener and the worker go on.
    pub fn on_upstream_error(&mut self, uk: Key, errno: i32) {
        let Some(u) = self.upstreams.get_mut(uk) else {
            return;
        };
        if let Some(l) = self.listeners.get_mut(u.listener) {
            let st = &l.shared.stats;
            if errno == libc::ECONNREFUSED {
                st.upstream_refused.fetch_add(1, Relaxed);
            } else {
                st.upstream_errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// Ends the sessions idle for their listener's timeout, if a sweep is due;
    /// returns their upstream keys, for the driver to stop receiving on and drop.
    pub fn sweep(&mut self, now: Instant) -> Vec<Key> {
        match self.next_sweep {
            Some(t) if t <= now => {}
            _ => return Vec::new(),
        }
        self.next_sweep = Some(now + SWEEP_EVERY);
        let mut gone = Vec::new();
        for lk in self.listeners.keys() {
            if let Some(l) = self.listeners.get_mut(lk) {
                if let Some(sessions) = &mut l.sessions {
                    for (s, why) in sessions.expire(now) {
                        let st = &l.shared.stats;
                        match why {
                            Expiry::Unreplied => st.expired_unreplied.fetch_add(1, Relaxed),
                            Expiry::Idle => st.expired_idle.fetch_add(1, Relaxed),
                        };
                        gone.extend(ended(st, s));
                    }
                }
            }
        }
        gone
    }

    /// Time until the next sweep, if sessions can exist.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        self.next_sweep.map(|t| t.saturating_duration_since(now))
    }

    /// New settings for listener `lk` (a reload kept its socket): datagrams from now
    /// on use `shared`. Proxy sessions stay with the upstream they have (new ones
    /// choose among the new upstreams); if the listener stops being a proxy, its
    /// sessions end and their upstream keys are returned for the driver to drop.
    pub fn update_listener(&mut self, lk: Key, shared: Arc<ListenerShared>) -> Vec<Key> {
        let proxy_idle = match &shared.action {
            Action::Proxy(p) => Some(timeouts(p)),
            _ => None,
        };
        let ended = if proxy_idle.is_none() {
            self.end_sessions(lk)
        } else {
            Vec::new()
        };
        let Some(l) = self.listeners.get_mut(lk) else {
            return ended;
        };
        l.max_datagram = shared.max_datagram;
        l.shared = shared;
        match (proxy_idle, &mut l.sessions) {
            (Some((idle, unreplied)), Some(s)) => s.set_timeouts(idle, unreplied),
            (Some((idle, unreplied)), None) => {
                l.sessions = Some(UdpSessions::new(idle, unreplied));
                if self.next_sweep.is_none() {
                    self.next_sweep = Some(Instant::now() + SWEEP_EVERY);
                }
            }
            (None, _) => l.sessions = None,
        }
        ended
    }

    /// Ends every session of listener `lk` (it is being removed); returns their
    /// upstream keys, for the driver to stop receiving on and drop. The listener
    /// itself stays until the driver removes it.
    pub fn end_sessions(&mut self, lk: Key) -> Vec<Key> {
        let Some(l) = self.listeners.get_mut(lk) else {
            return Vec::new();
        };
        let mut ups = Vec::new();
        if let Some(sessions) = &mut l.sessions {
            for s in sessions.drain() {
                ups.extend(ended(&l.shared.stats, s));
            }
        }
        ups
    }
}

/// A socket connected to the next upstream of `set` (for `listener`'s logs):
/// `Ok(None)` when the binder's pool is empty (`wake` is written when its refill
/// ends).
///
/// # Errors
/// No socket can be had (the pool's namespace is gone, socket(2) failed) or
/// connect(2) failed (logged): the caller drops what it would have sent.
fn upstream_socket(
    listener: &ListenerShared,
    set: &UpstreamSet,
    wake: &Arc<OwnedFd>,
    now: Instant,
) -> Result<Option<OwnedFd>, ()> {
    let addr = set.pick(now);
    let fd = match set.socket_for(addr, wake) {
        GetSocket::Ready(fd) => fd,
        GetSocket::Wait => return Ok(None),
        GetSocket::Failed(_) => return Err(()),
    };
    if let Err(e) = socket2::SockRef::from(&fd).connect(&SockAddr::from(addr)) {
        // Rate-limited: a flood of new clients must not become a flood of lines.
        if let Some(held_back) = listener.stats.logs.upstream.allow() {
            tracing::warn!(listener = %listener.name, upstream = %addr, error = %e,
                more_in_last_10s = held_back, "udp upstream connect failed");
        }
        return Err(());
    }
    Ok(Some(fd))
}

/// The idle and unreplied timeouts of a proxy listener's sessions.
fn timeouts(p: &ProxyConfig) -> (Duration, Duration) {
    (
        Duration::from_millis(p.session_idle_timeout_ms),
        Duration::from_millis(p.session_unreplied_timeout_ms),
    )
}

/// Counts session `s` as closed (its kept datagrams, never sent, as upstream
/// errors); returns its upstream socket's key, if it had one, for the driver to
/// stop receiving on and drop.
fn ended(st: &ListenerStats, s: UdpSession<Key>) -> Option<Key> {
    st.closed.fetch_add(1, Relaxed);
    if s.queued() > 0 {
        st.upstream_errors.fetch_add(s.queued() as u64, Relaxed);
    }
    s.upstream
}

fn count_send(st: &ListenerStats, r: io::Result<usize>) {
    match r {
        Ok(n) => {
            st.bytes_out.fetch_add(n as u64, Relaxed);
        }
        Err(_) => {
            st.send_drops.fetch_add(1, Relaxed);
        }
    }
}

fn count_upstream_send(st: &ListenerStats, r: io::Result<usize>) {
    match r {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            st.upstream_refused.fetch_add(1, Relaxed);
        }
        Err(_) => {
            st.send_drops.fetch_add(1, Relaxed);
        }
    }
}

/// Sends `data` on `fd` (MSG_DONTWAIT | MSG_NOSIGNAL): to `to` (`None`: the
/// connected peer), from local address `from` when given (IP_PKTINFO/IPV6_PKTINFO).
///
/// # Errors
/// The sendmsg(2) error: EAGAIN when the socket buffer is full, ECONNREFUSED after
/// an ICMP port unreachable on a connected socket, ...
pub(crate) fn send_to_from(
    fd: RawFd,
    data: &[u8],
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let dest = to.map(SockAddr::from);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_SPACE / 8];
    // SAFETY: an all-zero msghdr is valid (no name, no control, no iov).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some(d) = &dest {
        msg.msg_name = d.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = d.len();
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(src) = from {
        // Reply from the address the datagram came to. An IPv4 address on an IPv6
        // socket (a v4-mapped client) still uses IP_PKTINFO.
        let v6_socket = matches!(to, Some(SocketAddr::V6(_)));
        let src = match (src, v6_socket) {
            (IpAddr::V6(a), false) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            (a, _) => a,
        };
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_* only compute sizes and walk the control buffer, which is
        // CONTROL_SPACE bytes, room for either pktinfo message; every write stays
        // inside it.
        unsafe {
            match src {
                IpAddr::V4(a) => {
                    msg.msg_controllen =
                        libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from_ne_bytes(a.octets()),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
                IpAddr::V6(a) => {
                    msg.msg_controllen =
                        libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::IPPROTO_IPV6;
                    (*c).cmsg_type = libc::IPV6_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: a.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                }
            }
        }
    }
    // SAFETY: every pointer in `msg` (name, iov, data, control) outlives the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The source address in `name` (a `sockaddr_in` or `sockaddr_in6`, as recvmsg
/// fills it), if it is one.
pub(crate) fn parse_name(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < size_of::<libc::sa_family_t>() {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes([name[0], name[1]]);
    match i32::from(family) {
        libc::AF_INET if name.len() >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: `name` holds at least a sockaddr_in; read_unaligned copes
            // with any alignment.
            let a: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(name.as_ptr().cast()) };
            Some(SocketAddr::from((
                a.sin_addr.s_addr.to_ne_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if name.len() >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(name.as_ptr().cast()) };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The destination address in the control messages `control` (IP_PKTINFO's
/// `ipi_addr` or IPV6_PKTINFO's `ipi6_addr`), if there is one.
pub(crate) fn parse_pktinfo(control: &[u8]) -> Option<IpAddr> {
    if control.is_empty() {
        return None;
    }
    // Copy into an aligned buffer: the CMSG macros expect cmsghdr alignment.
    let mut buf = [0u64; CONTROL_SPACE / 8];
    let len = control.len().min(CONTROL_SPACE);
    // SAFETY: copies `len` <= CONTROL_SPACE bytes into the buffer of that size.
    unsafe { std::ptr::copy_nonoverlapping(control.as_ptr(), buf.as_mut_ptr().cast::<u8>(), len) };
    // SAFETY: a zeroed msghdr with only the control fields set is what the CMSG
    // macros read; they never go past msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = len as _;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    return Some(IpAddr::from(info.ipi_addr.s_addr.to_ne_bytes()));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    return Some(IpAddr::from(info.ipi6_addr.s6_addr));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    None
}

/// One recvmsg(2) (MSG_DONTWAIT) on `fd` into `buf`: payload length, whether it
/// was cut (MSG_TRUNC), the source, and the destination (pktinfo).
///
/// # Errors
/// The recvmsg error: EAGAIN when nothing is queued, ECONNREFUSED on a connected
/// socket after an ICMP port unreachable, ...
pub(crate) fn recv_datagram(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, bool, Option<SocketAddr>, Option<IpAddr>)> {
    let mut name = [0u8; NAME_SPACE];
    let mut control = [0u64; CONTROL_SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; we then point it at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = NAME_SPACE as _;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_SPACE as _;
    // SAFETY: every buffer `msg` points to lives until the call returns.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
    let from = parse_name(&name[..(msg.msg_namelen as usize).min(NAME_SPACE)]);
    // SAFETY: reading the initialised control bytes as u8.
    let ctrl = unsafe {
        std::slice::from_raw_parts(
            control.as_ptr().cast::<u8>(),
            (msg.msg_controllen as usize).min(CONTROL_SPACE),
        )
    };
    Ok((
        (n as usize).min(buf.len()),
        truncated,
        from,
        parse_pktinfo(ctrl),
    ))
}
