//! The kernel's UDP counters of this network namespace: per-socket drops
//! (/proc/net/udp, udp6) and the namespace's totals (/proc/net/snmp).

/// UDP sockets of this network namespace (/proc/net/udp and udp6): (local port,
/// remote port, drops) of each.
pub(super) fn udp_sockets() -> Vec<(u16, u16, u64)> {
    let mut out = Vec::new();
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(l), Some(r), Some(d)) = (
                f.get(1).and_then(|a| port(a)),
                f.get(2).and_then(|a| port(a)),
                f.last().and_then(|d| d.parse().ok()),
            ) {
                out.push((l, r, d));
            }
        }
    }
    out
}

/// Drops of the unconnected sockets bound to `port` (the server's listeners).
pub(super) fn listener_drops(port: u16) -> u64 {
    udp_sockets()
        .iter()
        .filter(|(l, r, _)| *l == port && *r == 0)
        .map(|(_, _, d)| d)
        .sum()
}

/// UDP counters of this network namespace (/proc/net/snmp), by name.
pub(super) fn udp_snmp() -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return Vec::new();
    };
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// How much counter `key` grew from `before` to `after` (0 if it is missing).
pub(super) fn snmp_delta(before: &[(String, u64)], after: &[(String, u64)], key: &str) -> u64 {
    let get = |v: &[(String, u64)]| v.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n);
    get(after).saturating_sub(get(before))
}
