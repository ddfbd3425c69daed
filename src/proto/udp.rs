//! UDP proxy sessions, without I/O: one session per client address and local
//! address it sent to, their timeouts (unreplied and idle, as conntrack tells
//! unreplied from assured flows), the datagrams a session keeps while it waits for
//! its upstream socket, and the admission of new sessions. The drivers own the
//! sockets; this table only decides which session a datagram belongs to, what is
//! kept, and when sessions end.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Most datagrams one session keeps while it waits for its upstream socket (count).
pub const SESSION_QUEUE_DATAGRAMS: usize = 8;
/// Most payload bytes one session keeps while it waits for its upstream socket
/// (bytes; room for one datagram of the largest size, 65,507 bytes).
pub const SESSION_QUEUE_BYTES: usize = 64 * 1024;
/// Most payload bytes all waiting sessions of one table (one listener on one
/// worker) keep together (bytes).
pub const TABLE_QUEUE_BYTES: usize = 1024 * 1024;

/// What identifies a session: the client's address (the datagrams' source) and the
/// local address it sent to (`None` when the listener does not learn it, i.e. is
/// bound to one address). A client socket that sends to two local addresses of a
/// wildcard listener has two sessions, and each gets its replies from the address
/// it wrote to.
pub type SessionKey = (SocketAddr, Option<IpAddr>);

/// One client's session.
#[derive(Debug, Clone)]
pub struct UdpSession<U> {
    /// The client's address (the datagrams' source).
    pub client: SocketAddr,
    /// The local address the client sent to; replies leave from it (IP_PKTINFO).
    pub local: Option<IpAddr>,
    /// Last datagram either way.
    pub last: Instant,
    /// The driver's handle of the session's upstream socket; `None` while the
    /// session waits for one (the binder's pool was empty).
    pub upstream: Option<U>,
    /// The upstream has answered at least once (conntrack's "assured"): the idle
    /// timeout applies, not the unreplied one.
    pub replied: bool,
    /// Datagrams kept while waiting for the upstream socket, oldest first.
    queue: VecDeque<Box<[u8]>>,
    /// Their payload bytes.
    queued_bytes: usize,
}

impl<U> UdpSession<U> {
    /// Datagrams kept while waiting for the upstream socket (count).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// What [`UdpSessions::lookup`] found for a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The client has a session for that local address: this one.
    Existing(u32),
    /// The client has none, and admission leaves room for one.
    Vacant,
    /// The client has none, and admission refused a new one (the listener is at
    /// its session limit).
    Full,
}

/// Why a session ended in [`UdpSessions::expire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The upstream never answered, for the unreplied timeout.
    Unreplied,
    /// The upstream had answered; no datagram either way for the idle timeout.
    Idle,
}

/// Why [`UdpSessions::enqueue`] dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// The session already keeps [`SESSION_QUEUE_DATAGRAMS`] datagrams or
    /// [`SESSION_QUEUE_BYTES`] bytes.
    Session,
    /// The table's waiting sessions already keep [`TABLE_QUEUE_BYTES`] bytes.
    Table,
}

/// The one admission decision for a new session: whether a listener with `open`
/// sessions now (over all its workers, including those waiting for an upstream
/// socket) may open one more under its limit `max` (`max_sessions`). The drivers
/// call it, through [`UdpSessions::lookup`], for every datagram that would open a
/// session, and nowhere else: a process-wide fd budget hooks in here.
pub fn may_open_session(open: usize, max: usize) -> bool {
    open < max
}

/// The sessions of one UDP proxy listener on one worker.
#[derive(Debug)]
pub struct UdpSessions<U> {
    by_key: HashMap<SessionKey, u32>,
    slots: Vec<Option<UdpSession<U>>>,
    free: Vec<u32>,
    idle: Duration,
    unreplied: Duration,
    /// Sessions waiting for an upstream socket (count).
    waiting: usize,
    /// Payload bytes kept by waiting sessions.
    queued_bytes: usize,
}

impl<U> UdpSessions<U> {
    /// An empty table whose sessions end after `idle` without traffic once their
    /// upstream has answered, and after `unreplied` without a datagram from the
    /// client while it has not (the smaller of the two applies then: a session is
    /// never kept longer for having had no answer).
    pub fn new(idle: Duration, unreplied: Duration) -> UdpSessions<U> {
        UdpSessions {
            by_key: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            idle,
            unreplied,
            waiting: 0,
            queued_bytes: 0,
        }
    }

    /// New timeouts from now on (a reload changed `session_idle_timeout_ms` or
    /// `session_unreplied_timeout_ms`), as in [`UdpSessions::new`].
    pub fn set_timeouts(&mut self, idle: Duration, unreplied: Duration) {
        self.idle = idle;
        self.unreplied = unreplied;
    }

    /// The session of `client` sent to `local`, or whether a new one may be made;
    /// `admit` is asked only when there is none (it is [`may_open_session`] with
    /// the listener's numbers).
    pub fn lookup(
        &self,
        client: SocketAddr,
        local: Option<IpAddr>,
        admit: impl FnOnce() -> bool,
    ) -> Lookup {
        match self.by_key.get(&(client, local)) {
            Some(&id) => Lookup::Existing(id),
            None if admit() => Lookup::Vacant,
            None => Lookup::Full,
        }
    }

    /// Adds a session for `client` sent to `local` (after [`Lookup::Vacant`]), with
    /// its upstream socket or `None` while it waits for one; returns its id.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        local: Option<IpAddr>,
        upstream: Option<U>,
        now: Instant,
    ) -> u32 {
        if upstream.is_none() {
            self.waiting += 1;
        }
        let s = UdpSession {
            client,
            local,
            last: now,
            upstream,
            replied: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
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
        self.by_key.insert((client, local), id);
        id
    }

    /// The session `id`, if it exists.
    pub fn get(&self, id: u32) -> Option<&UdpSession<U>> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    /// Marks a datagram from the client on session `id` at `now`.
    pub fn touch(&mut self, id: u32, now: Instant) {
        if let Some(Some(s)) = self.slots.get_mut(id as usize) {
            s.last = now;
        }
    }

    /// Marks a datagram from the upstream on session `id` at `now`: the session is
    /// assured from now on.
    pub fn reply(&mut self, id: u32, now: Instant) {
        if let Some(Some(s)) = self.slots.get_mut(id as usize) {
            s.last = now;
            s.replied = true;
        }
    }

    /// Keeps a copy of `data` for session `id`, which waits for its upstream
    /// socket, to be sent once it has one.
    ///
    /// # Errors
    /// [`QueueFull`] when the session's or the table's queue has no room: the
    /// datagram is dropped (the caller counts it). A session with a socket or
    /// none at all keeps nothing ([`QueueFull::Session`]).
    pub fn enqueue(&mut self, id: u32, data: &[u8]) -> Result<(), QueueFull> {
        let table_bytes = self.queued_bytes;
        let Some(Some(s)) = self.slots.get_mut(id as usize) else {
            return Err(QueueFull::Session);
        };
        if s.upstream.is_some()
            || s.queue.len() >= SESSION_QUEUE_DATAGRAMS
            || s.queued_bytes + data.len() > SESSION_QUEUE_BYTES
        {
            return Err(QueueFull::Session);
        }
        if table_bytes + data.len() > TABLE_QUEUE_BYTES {
            return Err(QueueFull::Table);
        }
        s.queue.push_back(data.into());
        s.queued_bytes += data.len();
        self.queued_bytes += data.len();
        Ok(())
    }

    /// Gives waiting session `id` its upstream socket; returns the datagrams it
    /// kept, oldest first, for the caller to send now. Nothing happens to a
    /// session that has a socket already (it gets an empty list).
    pub fn set_upstream(&mut self, id: u32, upstream: U) -> Vec<Box<[u8]>> {
        let Some(Some(s)) = self.slots.get_mut(id as usize) else {
            return Vec::new();
        };
        if s.upstream.is_some() {
            return Vec::new();
        }
        s.upstream = Some(upstream);
        self.waiting -= 1;
        self.queued_bytes -= s.queued_bytes;
        s.queued_bytes = 0;
        s.queue.drain(..).collect()
    }

    /// Ids of the sessions waiting for an upstream socket, oldest slot first.
    pub fn waiting_ids(&self) -> Vec<u32> {
        if self.waiting == 0 {
            return Vec::new();
        }
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .filter(|s| s.upstream.is_none())
                    .map(|_| i as u32)
            })
            .collect()
    }

    /// Sessions waiting for an upstream socket (count).
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Payload bytes kept by waiting sessions.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Removes session `id` (with the datagrams it kept); returns it.
    pub fn remove(&mut self, id: u32) -> Option<UdpSession<U>> {
        let s = self.slots.get_mut(id as usize)?.take()?;
        self.by_key.remove(&(s.client, s.local));
        self.free.push(id);
        if s.upstream.is_none() {
            self.waiting -= 1;
        }
        self.queued_bytes -= s.queued_bytes;
        Some(s)
    }

    /// How a session last active at `last` ends if nothing comes by `now`: its
    /// timeout kind, if it is due.
    fn due(&self, s: &UdpSession<U>, now: Instant) -> Option<Expiry> {
        let quiet = now.saturating_duration_since(s.last);
        if s.replied {
            (quiet >= self.idle).then_some(Expiry::Idle)
        } else {
            (quiet >= self.unreplied.min(self.idle)).then_some(Expiry::Unreplied)
        }
    }

    /// Removes and returns the sessions whose timeout has passed at `now`, each
    /// with the kind of timeout that ended it.
    pub fn expire(&mut self, now: Instant) -> Vec<(UdpSession<U>, Expiry)> {
        let due: Vec<(u32, Expiry)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .and_then(|s| self.due(s, now))
                    .map(|e| (i as u32, e))
            })
            .collect();
        due.into_iter()
            .filter_map(|(id, e)| self.remove(id).map(|s| (s, e)))
            .collect()
    }

    /// Removes and returns every session (the listener goes away).
    pub fn drain(&mut self) -> Vec<UdpSession<U>> {
        (0..self.slots.len() as u32)
            .filter_map(|id| self.remove(id))
            .collect()
    }

    /// Sessions in the table, waiting ones included (count).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    fn table<U>(idle_ms: u64, unreplied_ms: u64) -> UdpSessions<U> {
        UdpSessions::new(
            Duration::from_millis(idle_ms),
            Duration::from_millis(unreplied_ms),
        )
    }

    #[test]
    fn one_session_per_client_and_the_limit_holds() {
        let mut t = table(30_000, 5_000);
        let now = Instant::now();
        assert_eq!(
            t.lookup(a(1), None, || may_open_session(0, 2)),
            Lookup::Vacant
        );
        let s1 = t.insert(a(1), None, Some("u1"), now);
        assert_eq!(
            t.lookup(a(1), None, || unreachable!()),
            Lookup::Existing(s1)
        );
        let s2 = t.insert(a(2), None, Some("u2"), now);
        assert_ne!(s1, s2);
        assert_eq!(
            t.lookup(a(3), None, || may_open_session(2, 2)),
            Lookup::Full
        );
        assert_eq!(t.get(s2).unwrap().upstream, Some("u2"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_session_per_local_address_the_client_sent_to() {
        let mut t = table(30_000, 5_000);
        let now = Instant::now();
        let l1 = Some(IpAddr::from([127, 0, 0, 1]));
        let l2 = Some(IpAddr::from([127, 0, 0, 2]));
        let s1 = t.insert(a(1), l1, Some(1), now);
        assert_eq!(t.lookup(a(1), l2, || true), Lookup::Vacant);
        let s2 = t.insert(a(1), l2, Some(2), now);
        assert_ne!(s1, s2);
        assert_eq!(t.lookup(a(1), l1, || true), Lookup::Existing(s1));
        assert_eq!(t.lookup(a(1), l2, || true), Lookup::Existing(s2));
        assert_eq!(t.get(s2).unwrap().local, l2);
        t.remove(s1);
        assert_eq!(t.lookup(a(1), l2, || true), Lookup::Existing(s2));
    }

    #[test]
    fn idle_sessions_expire_and_traffic_keeps_them() {
        let mut t = table(100, 100);
        let t0 = Instant::now();
        let s1 = t.insert(a(1), None, Some(()), t0);
        let _s2 = t.insert(a(2), None, Some(()), t0);
        t.touch(s1, t0 + Duration::from_millis(80));
        let gone = t.expire(t0 + Duration::from_millis(120));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0.client, a(2));
        assert_eq!(t.lookup(a(2), None, || true), Lookup::Vacant);
        assert!(matches!(t.lookup(a(1), None, || true), Lookup::Existing(_)));
        // A freed slot is reused.
        let s3 = t.insert(a(3), None, Some(()), t0);
        assert_eq!(t.get(s3).unwrap().client, a(3));
        assert_eq!(t.expire(t0 + Duration::from_secs(1)).len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn unreplied_sessions_expire_first_and_a_reply_assures_them() {
        let mut t = table(1000, 100);
        let t0 = Instant::now();
        let s1 = t.insert(a(1), None, Some(()), t0);
        let s2 = t.insert(a(2), None, Some(()), t0);
        t.reply(s1, t0 + Duration::from_millis(10));
        let gone = t.expire(t0 + Duration::from_millis(100));
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0.client, gone[0].1), (a(2), Expiry::Unreplied));
        assert!(t.get(s2).is_none());
        assert!(t.get(s1).unwrap().replied);
        assert!(t.expire(t0 + Duration::from_millis(1000)).is_empty());
        let gone = t.expire(t0 + Duration::from_millis(1010));
        assert_eq!(gone[0].1, Expiry::Idle);
        // An unreplied timeout longer than the idle one: the idle one applies.
        let mut t = table(50, 5000);
        t.insert(a(1), None, Some(()), t0);
        assert_eq!(
            t.expire(t0 + Duration::from_millis(50))[0].1,
            Expiry::Unreplied
        );
    }

    #[test]
    fn a_waiting_session_keeps_a_bounded_queue() {
        let mut t = table(30_000, 5_000);
        let t0 = Instant::now();
        let s = t.insert(a(1), None, None, t0);
        assert_eq!(t.waiting(), 1);
        assert_eq!(t.waiting_ids(), vec![s]);
        for i in 0..SESSION_QUEUE_DATAGRAMS {
            t.enqueue(s, &[i as u8; 10]).unwrap();
        }
        assert_eq!(t.enqueue(s, b"one more"), Err(QueueFull::Session));
        assert_eq!(t.queued_bytes(), 10 * SESSION_QUEUE_DATAGRAMS);
        let q = t.set_upstream(s, 7);
        assert_eq!(q.len(), SESSION_QUEUE_DATAGRAMS);
        assert!(q.iter().enumerate().all(|(i, d)| d[0] == i as u8), "order");
        assert_eq!((t.waiting(), t.queued_bytes()), (0, 0));
        assert!(t.waiting_ids().is_empty());
        assert_eq!(t.enqueue(s, b"x"), Err(QueueFull::Session), "has a socket");
        assert!(t.set_upstream(s, 8).is_empty());
        assert_eq!(t.get(s).unwrap().upstream, Some(7));
        // Bytes per session, then per table.
        let big = vec![0u8; 60_000];
        let s2 = t.insert(a(2), None, None, t0);
        t.enqueue(s2, &big).unwrap();
        assert_eq!(t.enqueue(s2, &big), Err(QueueFull::Session));
        let mut port = 3;
        let full = loop {
            let id = t.insert(a(port), None, None, t0);
            port += 1;
            if let Err(e) = t.enqueue(id, &big) {
                break e;
            }
        };
        assert_eq!(full, QueueFull::Table);
        assert!(t.queued_bytes() <= TABLE_QUEUE_BYTES);
        // Removing waiting sessions returns their bytes.
        for s in t.drain() {
            assert!(s.upstream.is_none() || s.queued() == 0);
        }
        assert_eq!((t.waiting(), t.queued_bytes(), t.len()), (0, 0, 0));
    }
}
