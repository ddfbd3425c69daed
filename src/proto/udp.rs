//! UDP proxy sessions, without I/O: one session per client address, its idle
//! timeout, and the session limit. The drivers own the sockets; this table only
//! decides which session a datagram belongs to and when sessions end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// One client's session.
#[derive(Debug, Clone)]
pub struct UdpSession<U> {
    /// The client's address (the datagrams' source).
    pub client: SocketAddr,
    /// The local address the client sent to; replies leave from it (IP_PKTINFO).
    pub local: Option<IpAddr>,
    /// Last datagram either way.
    pub last: Instant,
    /// The driver's handle of the session's upstream socket.
    pub upstream: U,
}

/// What [`UdpSessions::lookup`] found for a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The client has a session: this one.
    Existing(u32),
    /// The client has none, and the limit leaves room for one.
    Vacant,
    /// The client has none, and the listener is at its session limit.
    Full,
}

/// The sessions of one UDP proxy listener on one worker.
#[derive(Debug)]
pub struct UdpSessions<U> {
    by_client: HashMap<SocketAddr, u32>,
    slots: Vec<Option<UdpSession<U>>>,
    free: Vec<u32>,
    idle: Duration,
}

impl<U> UdpSessions<U> {
    /// Sessions end after `idle` without traffic from now on (a reload changed
    /// `session_idle_timeout_ms`).
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// An empty table whose sessions end after `idle` without traffic.
    pub fn new(idle: Duration) -> UdpSessions<U> {
        UdpSessions {
            by_client: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            idle,
        }
    }

    /// The session of `client`, or whether a new one may be made, given `open`
    /// sessions of the listener now (over all workers) and its limit `max`.
    pub fn lookup(&self, client: SocketAddr, open: usize, max: usize) -> Lookup {
        match self.by_client.get(&client) {
            Some(&id) => Lookup::Existing(id),
            None if open >= max => Lookup::Full,
            None => Lookup::Vacant,
        }
    }

    /// Adds a session for `client` (after [`Lookup::Vacant`]); returns its id.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        local: Option<IpAddr>,
        upstream: U,
        now: Instant,
    ) -> u32 {
        let s = UdpSession {
            client,
            local,
            last: now,
            upstream,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(s);
                id
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_client.insert(client, id);
        id
    }

    /// The session `id`, if it exists.
    pub fn get(&self, id: u32) -> Option<&UdpSession<U>> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    /// Marks traffic on session `id` at `now`.
    pub fn touch(&mut self, id: u32, now: Instant) {
        if let Some(Some(s)) = self.slots.get_mut(id as usize) {
            s.last = now;
        }
    }

    /// Removes session `id`; returns it.
    pub fn remove(&mut self, id: u32) -> Option<UdpSession<U>> {
        let s = self.slots.get_mut(id as usize)?.take()?;
        self.by_client.remove(&s.client);
        self.free.push(id);
        Some(s)
    }

    /// Removes and returns the sessions idle since `now - idle` or longer.
    pub fn expire(&mut self, now: Instant) -> Vec<UdpSession<U>> {
        let idle = self.idle;
        let ids: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .filter(|s| now.duration_since(s.last) >= idle)
                    .map(|_| i as u32)
            })
            .collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Sessions in the table (count).
    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    #[test]
    fn one_session_per_client_and_the_limit_holds() {
        let mut t = UdpSessions::new(Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(t.lookup(a(1), 0, 2), Lookup::Vacant);
        let s1 = t.insert(a(1), None, "u1", now);
        assert_eq!(t.lookup(a(1), 1, 2), Lookup::Existing(s1));
        let s2 = t.insert(a(2), None, "u2", now);
        assert_ne!(s1, s2);
        assert_eq!(t.lookup(a(3), 2, 2), Lookup::Full);
        assert_eq!(t.get(s2).unwrap().upstream, "u2");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn idle_sessions_expire_and_traffic_keeps_them() {
        let mut t = UdpSessions::new(Duration::from_millis(100));
        let t0 = Instant::now();
        let s1 = t.insert(a(1), None, (), t0);
        let _s2 = t.insert(a(2), None, (), t0);
        t.touch(s1, t0 + Duration::from_millis(80));
        let gone = t.expire(t0 + Duration::from_millis(120));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].client, a(2));
        assert_eq!(t.lookup(a(2), 1, 10), Lookup::Vacant);
        assert!(matches!(t.lookup(a(1), 1, 10), Lookup::Existing(_)));
        // A freed slot is reused.
        let s3 = t.insert(a(3), None, (), t0);
        assert_eq!(t.get(s3).unwrap().client, a(3));
        assert_eq!(t.expire(t0 + Duration::from_secs(1)).len(), 2);
        assert!(t.is_empty());
    }
}
