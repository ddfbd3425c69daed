//! What sockets the binder makes and how ([`SocketSpec`], [`ClientProto`]):
//! listening TCP and SCTP sockets, bound UDP sockets and unbound client sockets,
//! made in the calling thread's namespace (the binder's, after setns).

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What to create.
#[derive(Debug, Clone)]
pub enum SocketSpec {
    /// `count` TCP listening sockets on `addr`, each with SO_REUSEADDR and
    /// SO_REUSEPORT, so that one can be given to each worker. Refused (bind,
    /// EADDRINUSE) when a socket of another process already listens there: the
    /// group is never joined (see `holder`).
    TcpListeners {
        /// Local address to bind.
        addr: SocketAddr,
        /// listen(2) backlog (connections).
        backlog: u32,
        /// Sockets to create (one per worker), at least 1.
        count: usize,
        /// Bind the first socket without SO_REUSEPORT, so that a socket another
        /// process holds on `addr` is refused, not joined (see `holder`); off
        /// when joining a group ringress already holds (a takeover's extra
        /// sockets), see [`SocketSpec::joining_own_group`].
        exclusive: bool,
    },
    /// One unconnected TCP socket of `addr`'s family, for the caller to connect
    /// from (used by clients).
    TcpClient {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
    },
    /// `count` UDP sockets bound to `addr`, each with SO_REUSEADDR and
    /// SO_REUSEPORT (one per worker), refused like `TcpListeners` when another
    /// process's socket is bound there; on a wildcard address also IP_PKTINFO /
    /// IPV6_RECVPKTINFO, so that replies can leave from the address a client sent to.
    UdpSockets {
        /// Local address to bind.
        addr: SocketAddr,
        /// Sockets to create (one per worker), at least 1.
        count: usize,
        /// As for `TcpListeners`.
        exclusive: bool,
    },
    /// `count` unbound UDP sockets of `addr`'s family (upstream pools).
    UdpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
    },
    /// `count` unconnected TCP sockets of `addr`'s family (upstream pools).
    TcpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
    },
    /// `count` SCTP listening sockets of `style` on `addr` (one-to-one: listen(2)
    /// with `backlog`; one-to-many: listen(2) to accept associations), each with
    /// SO_REUSEADDR and SO_REUSEPORT and the options of [`crate::sctp::configure`].
    SctpListeners {
        /// Local address to bind.
        addr: SocketAddr,
        /// listen(2) backlog (associations).
        backlog: u32,
        /// Sockets to create, at least 1.
        count: usize,
        /// One-to-one or one-to-many.
        style: crate::sctp::Style,
        /// Streams and buffer sizes.
        opts: crate::sctp::SocketOpts,
    },
    /// `count` unbound one-to-one SCTP sockets of `addr`'s family (upstream pools).
    SctpClients {
        /// The address family is taken from this address; nothing is bound.
        family_of: SocketAddr,
        /// Sockets to create.
        count: usize,
        /// Streams and buffer sizes.
        opts: crate::sctp::SocketOpts,
    },
}

/// The kind of client socket an upstream pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientProto {
    /// TCP (SOCK_STREAM).
    Tcp,
    /// UDP (SOCK_DGRAM).
    Udp,
    /// One-to-one SCTP with these options.
    Sctp(crate::sctp::SocketOpts),
}

impl ClientProto {
    /// A non-blocking, close-on-exec, unbound socket of this kind for `addr`'s
    /// family, made in the calling thread's namespace.
    ///
    /// # Errors
    /// socket(2) or, for SCTP, setsockopt(2) failed.
    pub fn socket(self, addr: SocketAddr) -> io::Result<Socket> {
        match self {
            ClientProto::Tcp => tcp_socket(addr),
            ClientProto::Udp => udp_socket(addr),
            ClientProto::Sctp(opts) => {
                crate::sctp::socket(addr, crate::sctp::Style::OneToOne, &opts)
            }
        }
    }

    /// The binder request for `count` sockets of this kind.
    pub(super) fn spec(self, family_of: SocketAddr, count: usize) -> SocketSpec {
        match self {
            ClientProto::Tcp => SocketSpec::TcpClients { family_of, count },
            ClientProto::Udp => SocketSpec::UdpClients { family_of, count },
            ClientProto::Sctp(opts) => SocketSpec::SctpClients {
                family_of,
                count,
                opts,
            },
        }
    }
}

impl SocketSpec {
    /// The same request without the check for another process's socket: for
    /// sockets joining a SO_REUSEPORT group that ringress already holds (the
    /// extra sockets of a takeover, whose group was handed over).
    pub fn joining_own_group(mut self) -> SocketSpec {
        match &mut self {
            SocketSpec::TcpListeners { exclusive, .. }
            | SocketSpec::UdpSockets { exclusive, .. } => *exclusive = false,
            _ => {}
        }
        self
    }

    pub(super) fn addr(&self) -> SocketAddr {
        match self {
            SocketSpec::TcpListeners { addr, .. } => *addr,
            SocketSpec::TcpClient { family_of } => *family_of,
            SocketSpec::TcpClients { family_of, .. } => *family_of,
            SocketSpec::UdpSockets { addr, .. } => *addr,
            SocketSpec::UdpClients { family_of, .. } => *family_of,
            SocketSpec::SctpListeners { addr, .. } => *addr,
            SocketSpec::SctpClients { family_of, .. } => *family_of,
        }
    }
}

/// Creates the sockets of `spec` in the calling thread's namespace.
pub(super) fn create_sockets(spec: &SocketSpec) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    match *spec {
        SocketSpec::TcpListeners {
            addr,
            backlog,
            count,
            exclusive,
        } => listening(count, addr, backlog, exclusive, tcp_socket),
        SocketSpec::TcpClient { family_of } => unbound(1, family_of, tcp_socket),
        SocketSpec::TcpClients { family_of, count } => unbound(count, family_of, tcp_socket),
        SocketSpec::UdpClients { family_of, count } => unbound(count, family_of, udp_socket),
        SocketSpec::SctpClients {
            family_of,
            count,
            opts,
        } => unbound(count, family_of, |a| ClientProto::Sctp(opts).socket(a)),
        SocketSpec::SctpListeners {
            addr,
            backlog,
            count,
            style,
            opts,
        } => listening(count, addr, backlog, false, |a| {
            crate::sctp::socket(a, style, &opts)
        }),
        SocketSpec::UdpSockets {
            addr,
            count,
            exclusive,
        } => {
            let mut fds = Vec::with_capacity(count);
            for i in 0..count.max(1) {
                let s = udp_socket(addr).map_err(|e| ("socket", e))?;
                if addr.ip().is_unspecified() {
                    set_pktinfo(&s, addr.is_ipv6()).map_err(|e| ("setsockopt", e))?;
                }
                group_bind(&s, addr, exclusive && i == 0, true)?;
                fds.push(OwnedFd::from(s));
            }
            Ok(fds)
        }
    }
}

/// `count` sockets from `make(family_of)`, none bound.
fn unbound(
    count: usize,
    family_of: SocketAddr,
    make: impl Fn(SocketAddr) -> io::Result<Socket>,
) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    (0..count)
        .map(|_| {
            make(family_of)
                .map(OwnedFd::from)
                .map_err(|e| ("socket", e))
        })
        .collect()
}

/// Binds `s` to `addr` as a member of a SO_REUSEPORT group (SO_REUSEADDR and
/// SO_REUSEPORT on). With `first_exclusive` it is the group's first socket and must
/// not join a group another process holds ([`super::holder::bind_exclusive`]).
///
/// # Errors
/// The failed step (`setsockopt`, `bind`) and its error.
fn group_bind(
    s: &Socket,
    addr: SocketAddr,
    first_exclusive: bool,
    udp: bool,
) -> Result<(), (&'static str, io::Error)> {
    if first_exclusive {
        return super::holder::bind_exclusive(s, addr, udp);
    }
    s.set_reuse_address(true)
        .and_then(|_| s.set_reuse_port(true))
        .map_err(|e| ("setsockopt", e))?;
    s.bind(&SockAddr::from(addr)).map_err(|e| ("bind", e))
}

/// `count` (at least 1) sockets from `make(addr)`, each with SO_REUSEADDR and
/// SO_REUSEPORT, bound to `addr` and listening with `backlog` (TCP, SCTP). With
/// `exclusive`, the first is bound before SO_REUSEPORT is on, so that no group
/// another process holds is joined (TCP only: [`super::holder::bind_exclusive`]).
fn listening(
    count: usize,
    addr: SocketAddr,
    backlog: u32,
    exclusive: bool,
    make: impl Fn(SocketAddr) -> io::Result<Socket>,
) -> Result<Vec<OwnedFd>, (&'static str, io::Error)> {
    let mut fds = Vec::with_capacity(count);
    for i in 0..count.max(1) {
        let s = make(addr).map_err(|e| ("socket", e))?;
        group_bind(&s, addr, exclusive && i == 0, false)?;
        s.listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| ("listen", e))?;
        fds.push(OwnedFd::from(s));
    }
    Ok(fds)
}

/// A non-blocking, close-on-exec UDP socket of `addr`'s family.
pub fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )
}

/// Asks for the destination address of each datagram (ip(7) IP_PKTINFO, ipv6(7)
/// IPV6_RECVPKTINFO; an IPv6 socket gets both, for IPv4-mapped clients).
fn set_pktinfo(s: &Socket, v6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let set = |level, name| {
        // SAFETY: setsockopt with a valid int pointer and its size on our socket.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                level,
                name,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if v6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
        // Dual-stack sockets also see IPv4 datagrams; ignore a v6-only socket's refusal.
        let _ = set(libc::IPPROTO_IP, libc::IP_PKTINFO);
        Ok(())
    } else {
        set(libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family with TCP_NODELAY
/// (tcp(7)): a proxy relays what it got at once. Connections a listener accepts
/// inherit TCP_NODELAY from it (Linux copies the listener's socket), so no
/// session sets it again.
fn tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}
