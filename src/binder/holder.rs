//! Who already holds a listener's address: the first socket of a SO_REUSEPORT
//! group is bound *without* SO_REUSEPORT, so that ringress's sockets never join a
//! group some other process made (the kernel would split connections between the
//! two).
//!
//! [`bind_exclusive`] binds the group's first socket with SO_REUSEPORT off:
//! EADDRINUSE means a socket in the calling thread's namespace holds the address
//! (for TCP the socket has SO_REUSEADDR, so connections in TIME_WAIT do not count;
//! a listening socket does, ip(7)). Once bound, SO_REUSEPORT is turned on, so the
//! group's other sockets can join it: the kernel checks both sockets' flags at the
//! time of each bind and at listen (`inet_csk_bind_conflict`, `udp_lib_lport_inuse`,
//! `reuseport_add_sock`; tried on 6.1 and 6.18). Only on EADDRINUSE are
//! `/proc/thread-self/net/{tcp,udp}{,6}` read (proc(5): the sockets of the
//! thread's namespace, with their inodes) and compared with this process's own
//! sockets (`/proc/self/fd`): holders that are all ringress's own (sockets taken
//! over in a binary upgrade, or a listener being replaced) are fine, and the same
//! socket is bound again with SO_REUSEPORT; any other is refused, named by pid and
//! command when a `/proc/PID/fd` holds it (a process whose fds cannot be read
//! stays "another process"). The check costs nothing on the common path (one
//! setsockopt(2) after the bind), /proc reads on the refusal or takeover path.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{SockAddr, Socket};

/// Binds `sock` (fresh, unbound, TCP or UDP (`udp`), with no SO_REUSEPORT yet) to
/// `addr` as the first socket of a SO_REUSEPORT group, failing if a socket that
/// this process does not hold is bound to `addr` (or to an overlapping wildcard)
/// in the calling thread's namespace. On success `sock` is bound with SO_REUSEADDR
/// and SO_REUSEPORT on (a UDP socket gets SO_REUSEADDR only after its bind, so that
/// a foreign UDP socket with SO_REUSEADDR is seen).
///
/// # Errors
/// `("bind", AddrInUse)` naming the holder (`pid N (COMM)` or "another process")
/// and the address; or the socket's own setsockopt(2)/bind(2) error
/// (EADDRNOTAVAIL, EACCES, ...).
pub(super) fn bind_exclusive(
    sock: &Socket,
    addr: SocketAddr,
    udp: bool,
) -> Result<(), (&'static str, io::Error)> {
    let so = |e| ("setsockopt", e);
    if !udp {
        sock.set_reuse_address(true).map_err(so)?;
    }
    let e = match sock.bind(&SockAddr::from(addr)) {
        Ok(()) => {
            if udp {
                sock.set_reuse_address(true).map_err(so)?;
            }
            sock.set_reuse_port(true).map_err(so)?;
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => e,
        Err(e) => return Err(("bind", e)),
    };
    // Our own sockets first: one that a worker closes between the two reads (a
    // drained listener) then drops out of `holders` too, instead of counting as
    // another process's.
    let own = own_socket_inodes();
    let holders = holders(addr, udp);
    let foreign: Vec<u64> = holders
        .iter()
        .copied()
        .filter(|i| !own.contains(i))
        .collect();
    if !holders.is_empty() && foreign.is_empty() {
        // Every socket on the address is ringress's own (a takeover or a reload):
        // join their group. A failed bind(2) leaves the socket unbound.
        sock.set_reuse_address(true)
            .and_then(|_| sock.set_reuse_port(true))
            .map_err(so)?;
        return sock.bind(&SockAddr::from(addr)).map_err(|e| ("bind", e));
    }
    let who = foreign.iter().find_map(|&ino| process_of(ino)).map_or_else(
        || "another process".to_string(),
        |(pid, comm)| format!("pid {pid} ({comm})"),
    );
    let proto = if udp { "udp" } else { "tcp" };
    Err((
        "bind",
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{e}: {proto} {addr} is already held by {who}; ringress never joins a \
                 SO_REUSEPORT group it did not create (a binary upgrade shares sockets \
                 through `ringress run --takeover`)"
            ),
        ),
    ))
}

/// Inodes of the sockets in the calling thread's namespace bound to `addr`'s port
/// on `addr` or an overlapping address (either side a wildcard): TCP ones that
/// listen, or any UDP one. Unreadable files count as empty.
fn holders(addr: SocketAddr, udp: bool) -> Vec<u64> {
    let files: [&str; 2] = if udp {
        ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"]
    } else {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
    };
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some((local, state, inode)) = parse_line(line) {
                // TCP_LISTEN is 0x0A (include/net/tcp_states.h).
                if !udp && state != 0x0A {
                    continue;
                }
                if overlaps(local, addr) && inode != 0 {
                    out.push(inode);
                }
            }
        }
    }
    out
}

/// Whether a socket bound to `held` keeps `want` from being bound: same port, and
/// the same address or a wildcard on either side.
fn overlaps(held: SocketAddr, want: SocketAddr) -> bool {
    held.port() == want.port()
        && (held.ip().is_unspecified()
            || want.ip().is_unspecified()
            || canonical(held.ip()) == canonical(want.ip()))
}

/// An IPv4-mapped IPv6 address as IPv4; others unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One line of /proc/net/{tcp,udp}{,6} (proc(5)): `sl local rem st ... inode`,
/// the local address as hex words in host byte order then `:PORT` in hex.
/// Returns (local address, state, inode).
fn parse_line(line: &str) -> Option<(SocketAddr, u8, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    let (ip, port) = f[1].split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    let state = u8::from_str_radix(f[3], 16).ok()?;
    let inode = f[9].parse().ok()?;
    Some((SocketAddr::new(ip, port), state, inode))
}

/// The socket inode behind an fd link target `socket:[INODE]`.
fn socket_inode(target: &std::path::Path) -> Option<u64> {
    let t = target.to_str()?;
    t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Inodes of the sockets this process holds (`/proc/self/fd`).
fn own_socket_inodes() -> HashSet<u64> {
    let mut out = HashSet::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        for e in rd.flatten() {
            if let Some(i) = std::fs::read_link(e.path())
                .ok()
                .and_then(|t| socket_inode(&t))
            {
                out.insert(i);
            }
        }
    }
    out
}

/// The first process (pid, command name) found holding socket `inode` in its fd
/// table (`/proc/PID/fd`, `/proc/PID/comm`); `None` if none is readable.
fn process_of(inode: u64) -> Option<(u32, String)> {
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path())
                .ok()
                .and_then(|t| socket_inode(&t))
                == Some(inode)
            {
                let comm = std::fs::read_to_string(p.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, comm));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines_parse() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let (a, st, ino) = parse_line(v4).unwrap();
        assert_eq!(a, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!((st, ino), (0x0A, 12345));
        let v6 = "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        let (a, _, ino) = parse_line(v6).unwrap();
        assert_eq!(a, "[::1]:80".parse::<SocketAddr>().unwrap());
        assert_eq!(ino, 777);
        assert!(parse_line("  sl  local_address rem_address   st").is_none());
    }

    #[test]
    fn overlapping_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(overlaps(a("127.0.0.1:80"), a("[::]:80")));
        assert!(overlaps(a("[::ffff:127.0.0.1]:80"), a("127.0.0.1:80")));
        assert!(!overlaps(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!overlaps(a("0.0.0.0:81"), a("127.0.0.1:80")));
    }

    fn mk(a: SocketAddr, udp: bool) -> Socket {
        let (ty, proto) = if udp {
            (socket2::Type::DGRAM, socket2::Protocol::UDP)
        } else {
            (socket2::Type::STREAM, socket2::Protocol::TCP)
        };
        Socket::new(socket2::Domain::for_address(a), ty, Some(proto)).unwrap()
    }

    /// A socket of ours in a SO_REUSEPORT group on `a`, as ringress binds them.
    fn member(a: SocketAddr, udp: bool) -> io::Result<Socket> {
        let s = mk(a, udp);
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&SockAddr::from(a))?;
        Ok(s)
    }

    /// Our own sockets on the address are joined; a free address is bound and its
    /// group can then be joined (TCP and UDP); a socket bound without SO_REUSEPORT
    /// elsewhere is never joined.
    #[test]
    fn own_groups_are_joined_and_first_sockets_open_their_group() {
        for udp in [false, true] {
            // On 127.0.0.77, not 127.0.0.1: once dropped, other tests' outgoing
            // connections (local address 127.0.0.1) could take the port.
            let own = member("127.0.0.77:0".parse().unwrap(), udp).unwrap();
            let addr = own.local_addr().unwrap().as_socket().unwrap();
            let joined = mk(addr, udp);
            bind_exclusive(&joined, addr, udp).unwrap();
            assert_eq!(joined.local_addr().unwrap().as_socket(), Some(addr));
            drop((own, joined));
            // A free address: bound first, then others join it, and a socket
            // without SO_REUSEPORT is refused. Another process may take a
            // just-freed port in between (the suite runs many): a few fresh
            // ports are tried; one must pass.
            let passed = (0..5).any(|_| {
                let free = member("127.0.0.77:0".parse().unwrap(), udp)
                    .and_then(|s| s.local_addr())
                    .unwrap()
                    .as_socket()
                    .unwrap();
                let first = mk(free, udp);
                if bind_exclusive(&first, free, udp).is_err() {
                    return false;
                }
                assert!(first.reuse_port().unwrap());
                if !udp {
                    first.listen(8).unwrap();
                }
                let second = member(free, udp).expect("a second socket joins the group");
                let plain = mk(free, udp);
                assert_eq!(
                    plain
                        .bind(&SockAddr::from(free))
                        .unwrap_err()
                        .raw_os_error(),
                    Some(libc::EADDRINUSE)
                );
                drop(second);
                true
            });
            assert!(passed, "no free address passed (udp {udp})");
        }
    }

    /// A holder outside this process is refused and named.
    #[test]
    fn a_foreign_holder_is_refused_and_named() {
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import socket,sys,time\n\
                 s=socket.socket()\n\
                 s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n\
                 s.bind(('127.0.0.78',0)); s.listen(1)\n\
                 print(s.getsockname()[1],flush=True)\n\
                 time.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let addr: SocketAddr = format!("127.0.0.78:{port}").parse().unwrap();
        let r = bind_exclusive(&mk(addr, false), addr, false);
        let _ = child.kill();
        let _ = child.wait();
        let (step, e) = r.unwrap_err();
        assert_eq!((step, e.kind()), ("bind", io::ErrorKind::AddrInUse));
        assert!(
            e.to_string().contains(&format!("pid {}", child.id())),
            "{e}"
        );
    }
}
