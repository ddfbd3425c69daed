//! The UDP session table ([`UdpSessions`]) against a plain model: datagrams from
//! clients to one or two local addresses (new, known, over the limit, kept while
//! the session waits for its upstream socket), sockets arriving for waiting
//! sessions, replies on live and stale upstream sockets (whose slot may have been
//! reused), sweeps at random times (unreplied and idle timeouts), removals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{hit, run, Rng, STEPS};
use crate::proto::udp::{
    may_open_session, Expiry, Lookup, QueueFull, SessionKey, UdpSessions, SESSION_QUEUE_BYTES,
    SESSION_QUEUE_DATAGRAMS, TABLE_QUEUE_BYTES,
};

/// The model's view of one session.
#[derive(Debug, Clone)]
struct Entry {
    id: u32,
    last: Instant,
    /// Its upstream handle; `None` while it waits for one.
    upstream: Option<u64>,
    replied: bool,
    /// Datagrams kept while waiting, oldest first.
    queue: Vec<Vec<u8>>,
}

impl Entry {
    fn due(&self, now: Instant, idle: Duration, unreplied: Duration) -> Option<Expiry> {
        let quiet = now.duration_since(self.last);
        if self.replied {
            (quiet >= idle).then_some(Expiry::Idle)
        } else {
            (quiet >= unreplied.min(idle)).then_some(Expiry::Unreplied)
        }
    }

    fn queued_bytes(&self) -> usize {
        self.queue.iter().map(Vec::len).sum()
    }
}

fn udp_one(seed: u64, trace: bool) -> usize {
    let mut rng = Rng::new(seed);
    let idle = Duration::from_millis(rng.pick(&[1, 50, 1000]));
    let unreplied = Duration::from_millis(rng.pick(&[1, 20, 50, 5000]));
    let max = if rng.one_in(4) { 40 } else { rng.range(1, 5) };
    let clients: Vec<SocketAddr> = (0..rng.range(1, 30))
        .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 5000 + i as u16)))
        .collect();
    // A wildcard listener learns the local address each datagram was sent to.
    let locals: Vec<Option<IpAddr>> = if rng.one_in(2) {
        vec![None]
    } else {
        vec![
            Some(IpAddr::from([127, 0, 0, 1])),
            Some(IpAddr::from([127, 0, 0, 2])),
        ]
    };
    let mut t: UdpSessions<u64> = UdpSessions::new(idle, unreplied);
    let mut model: HashMap<SessionKey, Entry> = HashMap::new();
    // Sessions that ended: (id, upstream handle); their sockets may still get
    // a datagram.
    let mut dead: Vec<(u32, u64)> = Vec::new();
    let t0 = Instant::now();
    let mut now = t0;
    let mut handles = 0u64;
    let mut salt = 0u64;
    let steps = rng.range(1, 400);
    for step in 1..=steps {
        STEPS.with(|s| s.set(step));
        let ev = rng.below(12);
        if trace {
            eprintln!(
                "{step:>4} {:>6}ms ev {ev}: {model:?}",
                (now - t0).as_millis()
            );
        }
        match ev {
            0..=4 => {
                // A datagram from a client; other workers hold 0..=1 sessions.
                let key = (rng.pick(&clients), rng.pick(&locals));
                let open = model.len() + rng.range(0, 1);
                salt += 1;
                // Sizes that fill a session's queue by count or by bytes; each
                // datagram distinct, so that order is checked.
                let mut data = vec![0u8; rng.pick(&[0, 1, 100, 20_000, 65_507])];
                if let Some(b) = data.first_mut() {
                    *b = salt as u8;
                }
                if data.len() > 8 {
                    data[..8].copy_from_slice(&salt.to_le_bytes());
                }
                let want = match model.get(&key) {
                    Some(e) => Lookup::Existing(e.id),
                    None if open >= max => Lookup::Full,
                    None => Lookup::Vacant,
                };
                let got = t.lookup(key.0, key.1, || may_open_session(open, max));
                assert_eq!(got, want, "lookup of {key:?} with {open} open, limit {max}");
                let id = match got {
                    Lookup::Existing(id) => {
                        hit("udp: datagram of a known client");
                        t.touch(id, now);
                        model.get_mut(&key).expect("known").last = now;
                        id
                    }
                    Lookup::Full => {
                        hit("udp: datagram dropped at the session limit");
                        continue;
                    }
                    Lookup::Vacant => {
                        // The pool has a socket, or the session waits for one.
                        let upstream = rng.one_in(2).then(|| {
                            handles += 1;
                            handles
                        });
                        hit(if upstream.is_some() {
                            "udp: new session with its socket"
                        } else {
                            "udp: new session waiting for a socket"
                        });
                        let id = t.insert(key.0, key.1, upstream, now);
                        assert!(
                            model.values().all(|e| e.id != id),
                            "id {id} given to two live sessions"
                        );
                        let e = Entry {
                            id,
                            last: now,
                            upstream,
                            replied: false,
                            queue: Vec::new(),
                        };
                        model.insert(key, e);
                        id
                    }
                };
                let table_bytes: usize = model.values().map(Entry::queued_bytes).sum();
                let e = model.get_mut(&key).expect("known");
                let want = if e.upstream.is_some()
                    || e.queue.len() >= SESSION_QUEUE_DATAGRAMS
                    || e.queued_bytes() + data.len() > SESSION_QUEUE_BYTES
                {
                    Err(QueueFull::Session)
                } else if table_bytes + data.len() > TABLE_QUEUE_BYTES {
                    Err(QueueFull::Table)
                } else {
                    Ok(())
                };
                if e.upstream.is_some() {
                    // The driver sends it at once; the table keeps nothing.
                    continue;
                }
                assert_eq!(t.enqueue(id, &data), want, "enqueue on {key:?}");
                match want {
                    Ok(()) => {
                        hit("udp: datagram kept while waiting");
                        e.queue.push(data);
                    }
                    Err(QueueFull::Session) => hit("udp: session queue full"),
                    Err(QueueFull::Table) => hit("udp: table queue full"),
                }
            }
            5 => {
                // The pool was refilled: a waiting session gets its socket.
                let waiting: Vec<SessionKey> = model
                    .iter()
                    .filter(|(_, e)| e.upstream.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                if !waiting.is_empty() {
                    let key = waiting[rng.below(waiting.len())];
                    let e = model.get_mut(&key).expect("known");
                    handles += 1;
                    let sent = t.set_upstream(e.id, handles);
                    let sent: Vec<Vec<u8>> = sent.iter().map(|d| d.to_vec()).collect();
                    assert!(sent == e.queue, "kept datagrams changed or reordered");
                    if !sent.is_empty() {
                        hit("udp: kept datagrams sent once the socket came");
                    }
                    e.queue.clear();
                    e.upstream = Some(handles);
                    assert!(t.set_upstream(e.id, 0).is_empty(), "a second socket");
                }
            }
            6 | 7 => {
                // A reply on an upstream socket, live or stale (as the driver
                // checks it: the slot must still hold that socket's session).
                let live: Vec<SessionKey> = model
                    .iter()
                    .filter(|(_, e)| e.upstream.is_some())
                    .map(|(k, _)| *k)
                    .collect();
                if !dead.is_empty() && (live.is_empty() || rng.one_in(2)) {
                    let (id, h) = dead[rng.below(dead.len())];
                    if let Some(s) = t.get(id) {
                        hit("udp: stale reply on a reused slot");
                        assert_ne!(s.upstream, Some(h), "a stale socket matched a live session");
                    }
                } else if !live.is_empty() {
                    let key = live[rng.below(live.len())];
                    let m = model.get_mut(&key).expect("known");
                    let s = t.get(m.id).expect("a live session");
                    assert_eq!((s.upstream, s.local, s.client), (m.upstream, key.1, key.0));
                    t.reply(m.id, now);
                    m.last = now;
                    m.replied = true;
                    hit("udp: reply assures a session");
                }
            }
            8 => {
                let most = 2 * idle.max(unreplied).as_millis() as usize;
                now += Duration::from_millis(rng.range(0, most) as u64);
            }
            9 | 10 => {
                type Gone = (SessionKey, Option<u64>, Expiry);
                let mut gone: Vec<Gone> = t
                    .expire(now)
                    .into_iter()
                    .map(|(s, why)| ((s.client, s.local), s.upstream, why))
                    .collect();
                let mut want: Vec<Gone> = model
                    .iter()
                    .filter_map(|(k, e)| {
                        e.due(now, idle, unreplied).map(|why| (*k, e.upstream, why))
                    })
                    .collect();
                gone.sort_unstable_by_key(|g| g.0);
                want.sort_unstable_by_key(|w| w.0);
                assert_eq!(gone, want, "expired at {:?}", now - t0);
                if want.iter().any(|w| w.2 == Expiry::Unreplied) {
                    hit("udp: unreplied sessions expired");
                }
                if want.iter().any(|w| w.2 == Expiry::Idle) {
                    hit("udp: idle sessions expired");
                }
                model.retain(|_, e| {
                    let due = e.due(now, idle, unreplied).is_some();
                    if let (true, Some(h)) = (due, e.upstream) {
                        dead.push((e.id, h));
                    }
                    !due
                });
            }
            _ => {
                let live: Vec<SessionKey> = model.keys().copied().collect();
                if !live.is_empty() {
                    let key = live[rng.below(live.len())];
                    let e = model.remove(&key).expect("known");
                    let s = t.remove(e.id).expect("a live session");
                    assert_eq!(
                        (s.client, s.local, s.upstream, s.queued()),
                        (key.0, key.1, e.upstream, e.queue.len())
                    );
                    assert!(t.remove(e.id).is_none(), "removed twice");
                    if let Some(h) = e.upstream {
                        dead.push((e.id, h));
                    }
                }
            }
        }
        assert_eq!(t.len(), model.len());
        assert_eq!(t.is_empty(), model.is_empty());
        let waiting = model.values().filter(|e| e.upstream.is_none()).count();
        assert_eq!(t.waiting(), waiting);
        let bytes: usize = model.values().map(Entry::queued_bytes).sum();
        assert_eq!(t.queued_bytes(), bytes);
        assert!(bytes <= TABLE_QUEUE_BYTES);
        let mut ids = t.waiting_ids();
        ids.sort_unstable();
        let mut want: Vec<u32> = model
            .values()
            .filter(|e| e.upstream.is_none())
            .map(|e| e.id)
            .collect();
        want.sort_unstable();
        assert_eq!(ids, want, "waiting sessions");
        for (key, e) in &model {
            let s = t.get(e.id).expect("a live session");
            assert_eq!(
                (s.client, s.local, s.upstream, s.last, s.replied, s.queued()),
                (key.0, key.1, e.upstream, e.last, e.replied, e.queue.len())
            );
        }
    }
    steps
}

#[test]
fn udp_sessions() {
    run(module_path!(), "udp_sessions", 3000, udp_one);
}
