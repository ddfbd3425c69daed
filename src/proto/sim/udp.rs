//! The UDP session table ([`UdpSessions`]) against a plain model: datagrams from
//! clients (new, known, over the limit), replies on live and stale upstream
//! sockets (whose slot may have been reused), sweeps at random times, removals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{hit, run, Rng, STEPS};
use crate::proto::udp::{Lookup, UdpSessions};

/// The model's view of one session: its id, last traffic, upstream handle.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u32,
    last: Instant,
    upstream: u64,
    local: Option<IpAddr>,
}

fn udp_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let idle = Duration::from_millis(rng.pick(&[1, 50, 1000]));
    let max = rng.range(1, 5);
    let clients: Vec<SocketAddr> = (0..rng.range(1, 8))
        .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 5000 + i as u16)))
        .collect();
    let mut t: UdpSessions<u64> = UdpSessions::new(idle);
    let mut model: HashMap<SocketAddr, Entry> = HashMap::new();
    // Sessions that ended: (id, upstream handle); their sockets may still get
    // a datagram.
    let mut dead: Vec<(u32, u64)> = Vec::new();
    let t0 = Instant::now();
    let mut now = t0;
    let mut handles = 0u64;
    let steps = rng.range(1, 300);
    for step in 1..=steps {
        STEPS.with(|s| s.set(step));
        let ev = rng.below(10);
        if trace {
            eprintln!(
                "{step:>4} {:>6}ms ev {ev}: {model:?}",
                (now - t0).as_millis()
            );
        }
        match ev {
            0..=4 => {
                // A datagram from a client; other workers hold 0..=1 sessions.
                let c = rng.pick(&clients);
                let open = model.len() + rng.range(0, 1);
                let want = match model.get(&c) {
                    Some(e) => Lookup::Existing(e.id),
                    None if open >= max => Lookup::Full,
                    None => Lookup::Vacant,
                };
                let got = t.lookup(c, open, max);
                assert_eq!(got, want, "lookup of {c} with {open} open, limit {max}");
                match got {
                    Lookup::Existing(id) => {
                        hit("udp: datagram of a known client");
                        t.touch(id, now);
                        model.get_mut(&c).expect("known").last = now;
                    }
                    Lookup::Full => hit("udp: datagram dropped at the session limit"),
                    Lookup::Vacant => {
                        hit("udp: new session");
                        handles += 1;
                        let local = rng
                            .one_in(2)
                            .then(|| IpAddr::from([192, 168, 0, rng.below(3) as u8]));
                        let id = t.insert(c, local, handles, now);
                        assert!(
                            model.values().all(|e| e.id != id),
                            "id {id} given to two live sessions"
                        );
                        model.insert(
                            c,
                            Entry {
                                id,
                                last: now,
                                upstream: handles,
                                local,
                            },
                        );
                    }
                }
            }
            5 | 6 => {
                // A reply on an upstream socket, live or stale (as the driver
                // checks it: the slot must still hold that socket's session).
                let live: Vec<Entry> = model.values().copied().collect();
                if !dead.is_empty() && (live.is_empty() || rng.one_in(2)) {
                    let (id, h) = dead[rng.below(dead.len())];
                    if let Some(s) = t.get(id) {
                        hit("udp: stale reply on a reused slot");
                        assert_ne!(s.upstream, h, "a stale socket matched a live session");
                    }
                } else if !live.is_empty() {
                    let e = live[rng.below(live.len())];
                    let s = t.get(e.id).expect("a live session");
                    assert_eq!((s.upstream, s.local), (e.upstream, e.local));
                    let c = s.client;
                    t.touch(e.id, now);
                    model.get_mut(&c).expect("known").last = now;
                }
            }
            7 => {
                now += Duration::from_millis(rng.range(0, 2 * idle.as_millis() as usize) as u64);
            }
            8 => {
                let mut gone: Vec<u64> = t.expire(now).iter().map(|s| s.upstream).collect();
                let mut want: Vec<u64> = model
                    .values()
                    .filter(|e| now.duration_since(e.last) >= idle)
                    .map(|e| e.upstream)
                    .collect();
                gone.sort_unstable();
                want.sort_unstable();
                assert_eq!(gone, want, "expired at {:?}", now - t0);
                if !gone.is_empty() {
                    hit("udp: sessions expired");
                }
                model.retain(|_, e| {
                    let idle_now = now.duration_since(e.last) >= idle;
                    if idle_now {
                        dead.push((e.id, e.upstream));
                    }
                    !idle_now
                });
            }
            _ => {
                let live: Vec<SocketAddr> = model.keys().copied().collect();
                if !live.is_empty() {
                    let c = live[rng.below(live.len())];
                    let e = model.remove(&c).expect("known");
                    let s = t.remove(e.id).expect("a live session");
                    assert_eq!((s.client, s.upstream), (c, e.upstream));
                    assert!(t.remove(e.id).is_none(), "removed twice");
                    dead.push((e.id, e.upstream));
                }
            }
        }
        assert_eq!(t.len(), model.len());
        assert_eq!(t.is_empty(), model.is_empty());
        for (c, e) in &model {
            let s = t.get(e.id).expect("a live session");
            assert_eq!((s.client, s.upstream, s.last), (*c, e.upstream, e.last));
        }
    }
    steps
}

#[test]
fn udp_sessions() {
    run(module_path!(), "udp_sessions", 3000, udp_one);
}
