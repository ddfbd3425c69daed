//! The PROXY protocol header sent to an upstream before the client's bytes
//! (HAProxy's "The PROXY protocol", versions 1 and 2), so that the upstream learns
//! the client's source and destination addresses.
//!
//! Version 2 also carries the TLV `PP2_TYPE_NETNS` (0x30) with the name of the
//! listener's network namespace, as HAProxy does, so that a backend can tell
//! tenants apart (section 2.2.8 of the specification). Its value is the
//! namespace's label, US-ASCII/UTF-8 bytes without a terminating NUL: the name as
//! written in `netns` (resolved under `netns_dir`), the matched entry name for a
//! template instance, or the path exactly as written for a path such as
//! `/proc/PID/ns/net`; a listener in ringress's own namespace sends no NETNS TLV.
//! The config check bounds it to [`MAX_NETNS_TLV_BYTES`].

use std::net::{IpAddr, SocketAddr};

/// Which PROXY protocol version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The human-readable line, e.g. `PROXY TCP4 10.0.0.1 10.0.0.2 5555 80\r\n`.
    V1,
    /// The binary header, with the NETNS TLV.
    V2,
}

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type of the namespace name (`PP2_TYPE_NETNS`).
pub const PP2_TYPE_NETNS: u8 = 0x30;

/// Longest NETNS TLV value a listener may send (bytes): the specification
/// (section 2.2) asks that a v2 header fit in 536 bytes (the minimal TCP MSS,
/// RFC 879) so that a receiver can read it in one segment; 536 less the 16-byte
/// fixed part, 36 bytes of IPv6 addresses and ports, and the TLV's own 3 bytes
/// leaves 481.
pub const MAX_NETNS_TLV_BYTES: usize = 536 - 16 - 36 - 3;

/// An IPv4-mapped IPv6 address as IPv4, any other unchanged (a dual-stack
/// listener reports IPv4 clients as `::ffff:a.b.c.d`).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Builds the header for a connection from `src` to `dst` accepted in namespace
/// `netns` (a name; `None` for the root namespace: no NETNS TLV).
/// Unknown or mixed-family addresses give `PROXY UNKNOWN` (v1) or the UNSPEC
/// family (v2), as the specification asks.
pub fn encode(
    version: ProxyProtocol,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    netns: Option<&str>,
) -> Vec<u8> {
    let pair = match (src.map(canonical), dst.map(canonical)) {
        (Some(s @ SocketAddr::V4(_)), Some(d @ SocketAddr::V4(_)))
        | (Some(s @ SocketAddr::V6(_)), Some(d @ SocketAddr::V6(_))) => Some((s, d)),
        _ => None,
    };
    match version {
        ProxyProtocol::V1 => match pair {
            Some((s, d)) => format!(
                "PROXY {} {} {} {} {}\r\n",
                if s.is_ipv4() { "TCP4" } else { "TCP6" },
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes(),
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        ProxyProtocol::V2 => {
            let mut body = Vec::with_capacity(64);
            let fam = match pair {
                Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
                    body.extend_from_slice(&s.ip().octets());
                    body.extend_from_slice(&d.ip().octets());
                    body.extend_from_slice(&s.port().to_be_bytes());
                    body.extend_from_slice(&d.port().to_be_bytes());
                    0x11 // AF_INET, STREAM
                }
                Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
                    body.extend_from_slice(&s.ip().octets());
                    body.extend_from_slice(&d.ip().octets());
                    body.extend_from_slice(&s.port().to_be_bytes());
                    body.extend_from_slice(&d.port().to_be_bytes());
                    0x21 // AF_INET6, STREAM
                }
                _ => 0x00, // UNSPEC
            };
            if let Some(ns) = netns {
                // A TLV value is at most 65535 bytes; namespace names are far shorter.
                let v = &ns.as_bytes()[..ns.len().min(u16::MAX as usize - 3)];
                body.push(PP2_TYPE_NETNS);
                body.extend_from_slice(&(v.len() as u16).to_be_bytes());
                body.extend_from_slice(v);
            }
            let mut h = Vec::with_capacity(16 + body.len());
            h.extend_from_slice(&V2_SIGNATURE);
            h.push(0x21); // version 2, command PROXY
            h.push(fam);
            h.extend_from_slice(&(body.len() as u16).to_be_bytes());
            h.extend_from_slice(&body);
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let s = "10.0.0.1:5555".parse().ok();
        let d = "10.0.0.2:80".parse().ok();
        assert_eq!(
            encode(ProxyProtocol::V1, s, d, Some("x")),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5555 80\r\n"
        );
        let s6 = "[2001:db8::1]:1".parse().ok();
        let d6 = "[2001:db8::2]:2".parse().ok();
        assert_eq!(
            encode(ProxyProtocol::V1, s6, d6, None),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
        );
        assert_eq!(encode(ProxyProtocol::V1, s, d6, None), b"PROXY UNKNOWN\r\n");
        // A dual-stack listener's IPv4-mapped addresses become TCP4.
        let m = "[::ffff:10.0.0.1]:7".parse().ok();
        let n = "[::ffff:10.0.0.2]:8".parse().ok();
        assert_eq!(
            encode(ProxyProtocol::V1, m, n, None),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 7 8\r\n"
        );
    }

    #[test]
    fn v2_ipv4_with_netns_tlv() {
        let h = encode(
            ProxyProtocol::V2,
            "192.0.2.1:1000".parse().ok(),
            "192.0.2.2:80".parse().ok(),
            Some("tenant-a"),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        assert_eq!(h.len(), 16 + len);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[192, 0, 2, 2]);
        assert_eq!(&h[24..26], &1000u16.to_be_bytes());
        assert_eq!(&h[26..28], &80u16.to_be_bytes());
        assert_eq!(h[28], PP2_TYPE_NETNS);
        assert_eq!(u16::from_be_bytes([h[29], h[30]]), 8);
        assert_eq!(&h[31..], b"tenant-a");
    }

    #[test]
    fn v2_ipv6_and_unspec() {
        let h = encode(
            ProxyProtocol::V2,
            "[2001:db8::1]:1".parse().ok(),
            "[2001:db8::2]:2".parse().ok(),
            None,
        );
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        let u = encode(ProxyProtocol::V2, None, None, None);
        assert_eq!(u[13], 0x00);
        assert_eq!(u.len(), 16);
    }
}
