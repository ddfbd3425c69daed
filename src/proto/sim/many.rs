//! The session of a one-to-many SCTP socket (echo, proxy) against simulated
//! associations: COMM_UP / SHUTDOWN_COMP / COMM_LOST notifications, pieces of
//! several associations interleaved, associations that stop reading (the send
//! back-off, and the abort after `SEND_STALL_LIMIT`), sends to associations that
//! are gone, receive errors, and for proxy the peel-off of every new association,
//! answered ok or failed.

use std::sync::Arc;

use super::sctp::{addr_change, assoc_change, note, script, Msg};
use super::{hit, run, Got, Net, Put, Rng, Sim};
use crate::config::{Action, Proto, ProxyConfig, SctpConfig};
use crate::proto::{ConnInfo, Origin, OutMessage, Session, Side, SEND_WINDOW};
use crate::sctp::{self, MsgInfo};

/// Where an association's traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// The one-to-many socket.
    Here,
    /// A peel-off was asked for and not answered.
    Peeling,
    /// Peeled off into a session of its own (not simulated here).
    Away,
}

#[derive(Debug)]
struct Assoc {
    id: i32,
    script: Vec<Msg>,
    written: usize,
    taken: usize,
    pos: usize,
    /// It exists (its COMM_UP is waiting), and the session was told.
    up: bool,
    up_taken: bool,
    /// Graceful end after its script (if patient, after it got every echo), or
    /// lost after this many messages.
    lost_at: Option<usize>,
    patient: bool,
    end_written: bool,
    end_taken: bool,
    /// The association no longer exists (ended, lost, aborted).
    gone: bool,
    /// The session aborted it (SCTP_ABORT).
    aborted: bool,
    /// Some of its messages were lost (a failed send, a stall, too big, lost).
    faulted: bool,
    /// Echoes received; `next` is the script index the next one may match.
    got: usize,
    next: usize,
    stalled: bool,
    stalls_left: u32,
    /// It never reads: only the stall abort (or its end) frees the socket.
    stuck: bool,
    home: Home,
    max_recv: usize,
}

impl Assoc {
    fn piece(&mut self, rng: &mut Rng) -> Got {
        let m = &self.script[self.taken];
        let n = rng.range(1, (m.data.len() - self.pos).min(self.max_recv));
        let data = m.data[self.pos..self.pos + n].to_vec();
        let info = MsgInfo {
            stream: m.stream,
            ppid: m.ppid,
            assoc: self.id,
        };
        self.pos += n;
        let eor = self.pos == m.data.len();
        if eor {
            self.taken += 1;
            self.pos = 0;
        }
        Got::Piece {
            data,
            info,
            eor,
            notification: false,
        }
    }

    /// Something of it can be read on the one-to-many socket now.
    fn readable(&self) -> bool {
        if !self.up || self.home != Home::Here {
            return false;
        }
        !self.up_taken
            || (!self.aborted && self.taken < self.written)
            || (self.end_written && !self.end_taken)
    }

    fn done(&self) -> bool {
        // (Once it ends, sends to it fail: whether it reads no longer matters.)
        self.home == Home::Away || self.aborted || (self.end_written && self.end_taken)
    }
}

#[derive(Debug)]
struct Assocs {
    a: Vec<Assoc>,
    proxy: bool,
    /// Receive errors left to inject, stray notifications, swallowed receives.
    errors: u32,
    notes: u32,
    spurious: u32,
    /// The listener's end was read.
    eof_taken: bool,
    closed: bool,
    /// COMM_UPs, ends (SHUTDOWN_COMP, COMM_LOST) and data pieces delivered.
    ups: u64,
    downs: u64,
    pieces: u64,
}

impl Assocs {
    fn all_done(&self) -> bool {
        self.a.iter().all(Assoc::done)
    }

    fn get(&mut self, id: i32) -> &mut Assoc {
        self.a
            .iter_mut()
            .find(|a| a.id == id)
            .unwrap_or_else(|| panic!("no association {id}"))
    }

    fn moves(&self) -> Vec<(usize, u8)> {
        let mut v = Vec::new();
        for (i, a) in self.a.iter().enumerate() {
            if self.closed || a.gone || a.end_written || a.home == Home::Away {
                continue;
            }
            if !a.up {
                v.push((i, 0));
                continue;
            }
            let stop = a.lost_at.unwrap_or(a.script.len());
            if a.written < stop && a.home != Home::Away {
                v.push((i, 1));
            }
            let ends_now = match a.lost_at {
                Some(at) => a.written >= at,
                None => {
                    a.written == a.script.len()
                        && (!a.patient || a.faulted || a.got >= a.script.len() || self.proxy)
                }
            };
            if !a.end_written && ends_now && a.home == Home::Here {
                v.push((i, 2));
            }
            if a.stalls_left > 0 && !a.stalled {
                v.push((i, 3));
            }
            if a.stalled {
                v.push((i, 4));
            }
        }
        v
    }
}

impl Net for Assocs {
    fn can_recv(&self, side: Side) -> bool {
        assert_eq!(side, Side::Client, "a one-to-many session has one socket");
        !self.closed
            && (self.a.iter().any(Assoc::readable)
                || self.errors > 0
                || self.notes > 0
                || self.spurious > 0
                || self.all_done())
    }

    fn recv(&mut self, _side: Side, rng: &mut Rng) -> Got {
        let ready: Vec<usize> = (0..self.a.len())
            .filter(|&i| self.a[i].readable())
            .collect();
        let extra =
            u32::from(self.errors > 0) + u32::from(self.notes > 0) + u32::from(self.spurious > 0);
        if ready.is_empty() || (extra > 0 && rng.one_in(6)) {
            if self.spurious > 0 && rng.one_in(2) {
                self.spurious -= 1;
                return Got::Nothing;
            }
            if self.notes > 0 && rng.one_in(2) {
                self.notes -= 1;
                return note(addr_change(rng.range(1, 50) as i32));
            }
            if self.errors > 0 {
                self.errors -= 1;
                return Got::Error(rng.pick(&[libc::ENOMEM, libc::EINVAL]));
            }
            if ready.is_empty() {
                if self.all_done() {
                    // The listener's socket ends (it is being removed).
                    self.eof_taken = true;
                    return Got::Eof;
                }
                self.spurious = self.spurious.saturating_sub(1);
                self.notes = self.notes.saturating_sub(1);
                return Got::Nothing;
            }
        }
        let a = &mut self.a[ready[rng.below(ready.len())]];
        if !a.up_taken {
            a.up_taken = true;
            self.ups += 1;
            if self.proxy {
                // The session asks for its peel-off (checked at the end).
                a.home = Home::Peeling;
            }
            return note(assoc_change(sctp::SCTP_COMM_UP, a.id));
        }
        if !a.aborted && a.taken < a.written && !(a.end_written && a.gone && rng.one_in(2)) {
            self.pieces += 1;
            return a.piece(rng);
        }
        a.end_taken = true;
        a.taken = a.written;
        a.pos = 0;
        self.downs += 1;
        let state = if a.lost_at.is_some() || a.aborted {
            sctp::SCTP_COMM_LOST
        } else {
            sctp::SCTP_SHUTDOWN_COMP
        };
        note(assoc_change(state, a.id))
    }

    fn can_send(&self, _side: Side) -> bool {
        !self.closed
    }

    fn send_bytes(&mut self, _: Side, _: &[u8], _: &mut Rng) -> Put {
        unreachable!("bytes on an SCTP socket")
    }

    fn send_msg(&mut self, _side: Side, m: &OutMessage, rng: &mut Rng) -> Put {
        assert!(!self.closed, "a message after the close");
        let proxy = self.proxy;
        let a = self.get(m.info.assoc);
        let abort = m.flags & sctp::SCTP_ABORT != 0;
        if a.gone || a.home == Home::Away || (a.end_written && !abort) {
            // Gone, or shutting down (no new data, RFC 9260 9.2; an ABORT may
            // still go).
            a.faulted = true;
            return Put::Failed(rng.pick(&[libc::EPIPE, libc::EINVAL, libc::ESHUTDOWN]));
        }
        if abort {
            assert!(m.data.is_empty());
            a.aborted = true;
            a.gone = true;
            a.faulted = true;
            // The stack reports its own abort as COMM_LOST, unless its end
            // was read already.
            if !a.end_taken {
                a.end_written = true;
            }
            return Put::Took(0);
        }
        assert_eq!(m.flags, 0, "association {}: flags", a.id);
        assert!(!proxy, "a one-to-many proxy socket forwards no data itself");
        if a.stalled || a.stuck {
            return Put::NoRoom;
        }
        let got = Msg {
            data: m.data.clone(),
            stream: m.info.stream,
            ppid: m.info.ppid,
        };
        let at = if a.faulted {
            (a.next..a.script.len()).find(|&j| a.script[j] == got)
        } else {
            (a.script.get(a.next) == Some(&got)).then_some(a.next)
        };
        let Some(at) = at else {
            panic!(
                "association {}: echo {} ({} bytes, stream {}, PPID {}) is not the next of its \
                 script (at {}, faulted {})",
                a.id,
                a.got,
                got.data.len(),
                got.stream,
                got.ppid,
                a.next,
                a.faulted
            );
        };
        a.next = at + 1;
        a.got += 1;
        Put::Took(m.data.len())
    }

    fn shutdown(&mut self, _side: Side) {
        panic!("shutdown(2) on a one-to-many socket");
    }

    fn peel(&mut self, assoc: i32, rng: &mut Rng) -> bool {
        let ok = !rng.one_in(4);
        let a = self.get(assoc);
        assert_eq!(
            a.home,
            Home::Peeling,
            "association {assoc}: a peel-off it was not due"
        );
        a.home = if ok { Home::Away } else { Home::Here };
        if !ok {
            a.faulted = true;
        }
        ok
    }

    fn peer_moves(&self) -> usize {
        self.moves().len()
    }

    fn peer_step(&mut self, rng: &mut Rng) {
        let moves = self.moves();
        let (i, k) = moves[rng.below(moves.len())];
        let a = &mut self.a[i];
        match k {
            0 => a.up = true,
            1 => a.written += 1,
            2 => {
                a.end_written = true;
                if a.lost_at.is_some() {
                    a.gone = true;
                    a.faulted = true;
                }
            }
            3 => {
                a.stalled = true;
                a.stalls_left -= 1;
            }
            _ => a.stalled = false,
        }
    }

    fn closed(&mut self, _aborted: bool) {
        self.closed = true;
    }

    fn quiet(&self) -> bool {
        self.moves().is_empty()
    }
}

fn many_one(seed: u64, trace: bool, proxy: bool) -> usize {
    let mut rng = Rng::new(seed);
    let max_message = rng.pick(&[64, 1000, 65_536]);
    let sctp_cfg = SctpConfig {
        max_message_bytes: max_message,
        ..SctpConfig::default()
    };
    let n = rng.range(1, 6);
    let a: Vec<Assoc> = (0..n)
        .map(|k| {
            let len = rng.range(0, 8);
            let too_big = rng.one_in(15);
            let script = script(
                &mut rng,
                seed * 16 + k as u64,
                len,
                max_message.min(2000),
                too_big,
            );
            let bytes: usize = script.iter().map(|m| m.data.len()).sum();
            Assoc {
                id: 100 + k as i32,
                script,
                written: 0,
                taken: 0,
                pos: 0,
                up: false,
                up_taken: false,
                lost_at: rng.one_in(8).then(|| rng.range(0, len)),
                patient: !rng.one_in(4),
                end_written: false,
                end_taken: false,
                gone: false,
                aborted: false,
                faulted: too_big,
                got: 0,
                next: 0,
                stalled: false,
                stalls_left: rng.range(0, 2) as u32,
                stuck: !proxy && rng.one_in(10),
                home: Home::Here,
                // Tiny pieces only for little data, so that a sequence stays short.
                max_recv: rng.pick(&[7, 100, 16 * 1024]).max(bytes / 100),
            }
        })
        .collect();
    let net = Assocs {
        a,
        proxy,
        errors: rng.range(0, 2) as u32,
        notes: rng.range(0, 2) as u32,
        spurious: rng.range(0, 2) as u32,
        eof_taken: false,
        closed: false,
        ups: 0,
        downs: 0,
        pieces: 0,
    };
    let action = if proxy {
        Action::Proxy(Arc::new(ProxyConfig::test()))
    } else {
        Action::Echo
    };
    let session = Session::for_listener(&action, Proto::Sctp, &sctp_cfg, Origin::Many);
    let info = ConnInfo {
        peer: None,
        local: None,
    };
    let mut s = Sim::open(session, &action, &info, net, rng, true, true, trace);
    let window = SEND_WINDOW.max(max_message);
    s.max_unsent = [window + max_message, 0];
    // Without a stuck association, a peeling association never waits.
    s.run(300_000, 30_000);
    let aborted = s.closed == Some(true);
    let net = &s.net;
    assert!(
        !aborted,
        "a one-to-many session aborted (errors: {:?})",
        s.errors
    );
    assert!(net.eof_taken, "closed before the listener's end");
    if proxy {
        let mut ups: Vec<i32> = s.peel_requests.clone();
        ups.sort_unstable();
        let mut seen: Vec<i32> = net.a.iter().filter(|a| a.up_taken).map(|a| a.id).collect();
        seen.sort_unstable();
        assert_eq!(ups, seen, "one peel-off per association that came up");
        assert_eq!(
            s.counts.dropped, net.pieces,
            "every piece on the proxy socket is dropped"
        );
        assert_eq!((s.counts.assoc_up, s.counts.assoc_down), (0, 0));
    } else {
        assert_eq!(s.counts.assoc_up, net.ups, "COMM_UPs counted");
        assert_eq!(s.counts.assoc_down, net.downs, "association ends counted");
        for a in &net.a {
            if !a.faulted && a.patient && a.lost_at.is_none() && !a.stuck {
                assert_eq!(a.got, a.script.len(), "association {}: echoes lost", a.id);
                hit("clean end: everything delivered, checked");
            }
            if a.stuck && a.got < a.script.len() && a.taken > 0 {
                assert!(
                    a.aborted || a.end_written,
                    "association {}: stuck, yet neither aborted nor ended",
                    a.id
                );
            }
        }
    }
    s.steps
}

#[test]
fn sctp_many_echo() {
    run(module_path!(), "sctp_many_echo", 2000, |seed, trace| {
        many_one(seed, trace, false)
    });
}

#[test]
fn sctp_many_proxy() {
    run(module_path!(), "sctp_many_proxy", 5000, |seed, trace| {
        many_one(seed, trace, true)
    });
}
