//! How the fake ends operations: receives and sends against the peers, lent
//! buffers, connects, and what it learns from each submission.

use super::*;

impl FakeBackend {
    /// Ends operation `id` if it can end now, and checks that its last event
    /// hands back exactly the memory it was given.
    pub(super) fn complete(&mut self, id: u64, out: &mut Vec<Event>) {
        let before = out.len();
        self.complete_op(id, out);
        if out.len() > before && !self.ops.0.iter().any(|(i, _)| *i == id) {
            self.ended.insert(id);
            let m = self.mem.remove(&id);
            let last = out.last().expect("an event");
            assert!(!last.more, "op {id}: its last event says more");
            assert_eq!(
                returned_mem(&last.owned),
                m,
                "op {id}: its last event does not hand back the memory it was given"
            );
        }
    }

    pub(super) fn complete_op(&mut self, id: u64, out: &mut Vec<Event>) {
        let Some(p) = self.ops.get(&id) else { return };
        let natural = self.natural(p);
        if !p.cancelled && !natural {
            return;
        }
        let by_cancel = p.cancelled && (!natural || !self.rng.one_in(3));
        let Some(Pending {
            token,
            op,
            cancelled,
        }) = self.ops.remove(&id)
        else {
            return;
        };
        if by_cancel {
            if let Op::Connect { fd, .. } = &op {
                let (s, _) = self.peer_of(*fd);
                if self.sessions[s].connect.is_none() {
                    hit("connect: never answered, cancelled (connect timeout)");
                }
            }
            self.tr(|| format!("op {id} ends: ECANCELED ({op:?})"));
            let mut ev = Event::new(token, -libc::ECANCELED, false);
            ev.owned = op.into_owned();
            out.push(ev);
            return;
        }
        if cancelled {
            hit("a cancelled operation finished first");
        }
        match op {
            Op::PollIn { fd } => {
                self.cmd_pending = false;
                let more = !self.rng.one_in(8);
                if !more {
                    hit("wake-up poll ended (re-armed)");
                }
                self.tr(|| format!("op {id} wake-up poll fires (more {more})"));
                out.push(Event::new(token, i32::from(libc::POLLIN), more));
                if more {
                    self.ops.insert(
                        id,
                        Pending {
                            token,
                            op: Op::PollIn { fd },
                            cancelled,
                        },
                    );
                }
            }
            Op::Accept { fd, multishot } => {
                let due = self
                    .accept_error
                    .filter(|&(after, _)| !cancelled && self.next_client >= after);
                if let Some((_, errno)) = due {
                    self.accept_error = None;
                    if crate::driver::accept_error_pauses(errno) {
                        hit("accept error: paused, re-armed after the pause");
                    } else {
                        hit("accept error: re-armed at once");
                    }
                    if !crate::driver::accept_error_benign(errno) && errno != libc::EINTR {
                        self.accept_errors += 1;
                        self.counted_accept_error = Some(id);
                    }
                    self.tr(|| format!("op {id} accept fails: errno {errno}"));
                    out.push(Event::new(token, -errno, false));
                    return;
                }
                let s = self.next_client;
                self.next_client += 1;
                self.arrive_at = self.steps + self.rng.range(0, 30);
                let raw = self.open_client(s);
                self.tr(|| format!("op {id} accepts session {s} (fd {raw})"));
                out.push(Event::new(token, raw, multishot));
                if multishot {
                    self.ops.insert(
                        id,
                        Pending {
                            token,
                            op: Op::Accept { fd, multishot },
                            cancelled,
                        },
                    );
                }
            }
            Op::Recv { fd, .. } => self.end_recv(id, token, fd, cancelled, out),
            Op::Send { fd, buf, off } => self.end_send(id, token, fd, buf, off, cancelled, out),
            Op::Connect { fd, addr } => {
                let (s, _) = self.peer_of(fd);
                let r = self.sessions[s].connect.expect("natural");
                let st = &mut self.sessions[s];
                hit(match r {
                    Ok(()) => "connect: succeeded",
                    Err(libc::ECONNREFUSED) => "connect: refused",
                    Err(_) => "connect: timed out (ETIMEDOUT)",
                });
                let res = match r {
                    Ok(()) => {
                        st.p[1].connected = true;
                        st.p[1].live = !cancelled;
                        0
                    }
                    Err(e) => {
                        if !cancelled {
                            self.batch.insert(
                                id,
                                Effect {
                                    s,
                                    side: 1,
                                    bytes_in: 0,
                                    bytes_out: 0,
                                    error: true,
                                },
                            );
                        }
                        -e
                    }
                };
                self.tr(|| format!("op {id} session {s} connect ends: {res}"));
                let mut ev = Event::new(token, res, false);
                ev.owned = crate::driver::backend::Owned::Addr(addr);
                out.push(ev);
            }
            other => unreachable!("{other:?}"),
        }
    }

    pub(super) fn end_recv(
        &mut self,
        id: u64,
        token: u64,
        fd: RawFd,
        cancelled: bool,
        out: &mut Vec<Event>,
    ) {
        let (s, side) = self.peer_of(fd);
        let r = self.sessions[s].p[side].recv(&mut self.rng, self.buf_size);
        let mut ev = Event::new(token, 0, false);
        let mut effect = Effect {
            s,
            side,
            bytes_in: 0,
            bytes_out: 0,
            error: false,
        };
        match r {
            RecvOut::Spurious(e) => {
                hit(match e {
                    libc::ENOBUFS => "receive: ENOBUFS",
                    libc::EAGAIN => "receive: EAGAIN",
                    _ => "receive: ECANCELED not cancelled",
                });
                ev.res = -e;
            }
            RecvOut::Bytes(buf, off) => {
                let n = buf.len() - off;
                ev.res = n as i32;
                ev.buf = Some(self.lend(buf, off));
                effect.bytes_in = n;
                if cancelled {
                    self.sessions[s].p[side].ignored += n;
                } else {
                    self.check_window(s);
                }
            }
            RecvOut::Eof => {
                self.sessions[s].p[side].eof_taken = true;
            }
            RecvOut::Err(e) => {
                hit("receive: reset");
                effect.error = true;
                ev.res = -e;
            }
        }
        if !cancelled {
            self.batch.insert(id, effect);
        }
        self.tr(|| {
            format!(
                "op {id} session {s} {} receive ends: {}",
                name(side),
                ev.res
            )
        });
        out.push(ev);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_send(
        &mut self,
        id: u64,
        token: u64,
        fd: RawFd,
        buf: Vec<u8>,
        off: usize,
        cancelled: bool,
        out: &mut Vec<Event>,
    ) {
        let (s, side) = self.peer_of(fd);
        let len = buf.len() - off;
        let mark = (buf.as_ptr() as usize, buf.len());
        let r = self.sessions[s].p[side].send(&mut self.rng, len);
        let st = &mut self.sessions[s];
        let mut effect = Effect {
            s,
            side,
            bytes_in: 0,
            bytes_out: 0,
            error: false,
        };
        let res = match r {
            SendOut::Took(n) => {
                st.deliver(side, &buf[off..off + n]);
                effect.bytes_out = n;
                let p = &mut st.p[side];
                p.buffered += n;
                if cancelled {
                    p.got_ignored += n;
                } else if n < len {
                    hit("short send");
                    p.next_send = Some((mark.0, mark.1, off + n));
                }
                n as i32
            }
            SendOut::Again(e) => {
                hit(if e == libc::EAGAIN {
                    "send: EAGAIN (back-off, same bytes again)"
                } else {
                    "send: ECANCELED not cancelled"
                });
                if !cancelled {
                    st.p[side].next_send = Some((mark.0, mark.1, off));
                }
                -e
            }
            SendOut::Failed(e) => {
                hit("send: reset");
                effect.error = true;
                -e
            }
        };
        if !cancelled {
            self.batch.insert(id, effect);
        }
        self.tr(|| {
            format!(
                "op {id} session {s} {} send of {len} ends: {res}",
                name(side)
            )
        });
        let mut ev = Event::new(token, res, false);
        ev.owned = crate::driver::backend::Owned::Bytes(buf);
        out.push(ev);
    }

    /// The receive windows hold: a side is read only while the other has less
    /// than the window unsent, so at most one receive more is in the engine.
    pub(super) fn check_window(&self, s: usize) {
        let st = &self.sessions[s];
        let one = self.buf_size;
        match &st.kind {
            Kind::Echo => {
                let unsent = st.p[0].eff() - (st.p[0].got - st.p[0].got_ignored);
                assert!(
                    unsent < SEND_WINDOW + one,
                    "session {s}: echo holds {unsent} bytes, past its window"
                );
            }
            Kind::Proxy { header, .. } => {
                let w = self.setup.window;
                let up = header.len() + st.p[0].eff() - (st.p[1].got - st.p[1].got_ignored);
                let down = st.p[1].eff() - (st.p[0].got - st.p[0].got_ignored);
                assert!(
                    up < (w + one).max(header.len() + 1) && down < w + one,
                    "session {s}: proxy holds {up} bytes toward the upstream and {down} toward the client, past the window {w}"
                );
            }
            Kind::Fixed(..) => {}
        }
    }

    /// Lends `buf`, whose payload starts at `off`.
    pub(super) fn lend(&mut self, buf: Vec<u8>, off: usize) -> BufRef {
        let id = self.free_bufs.pop().unwrap_or_else(|| {
            self.next_buf += 1;
            self.next_buf
        });
        let b = BufRef {
            group: 0,
            id,
            off: off as u32,
            len: (buf.len() - off) as u32,
        };
        self.lent.insert(id, (b, buf));
        b
    }

    /// Client `s` connects: its fd, to be handed out by an accept.
    pub(super) fn open_client(&mut self, s: usize) -> RawFd {
        let st = &mut self.sessions[s];
        let (engine, end) = if st.p[0].tcp {
            tcp_pair()
        } else {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (OwnedFd::from(a), OwnedFd::from(b))
        };
        if let Kind::Proxy {
            pp: Some(v),
            header,
        } = &mut st.kind
        {
            let sock = socket2::SockRef::from(&engine);
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            if peer.is_some() {
                hit("PROXY header with TCP addresses");
            }
            *header = proxy_header::encode(*v, peer, local, None);
        }
        let raw = engine.into_raw_fd();
        st.accepted = true;
        let c = &mut st.p[0];
        c.fd = Some(raw);
        c.end_fd = Some(end);
        c.live = true;
        c.connected = true;
        self.set_use(raw, Use::Peer(s, 0));
        self.unlinked.push(s);
        raw
    }

    /// The session an operation with `token` belongs to; `by_fd`: the session
    /// whose socket it is on, if known.
    pub(super) fn link(&mut self, token: u64, by_fd: Option<usize>) -> usize {
        let key = token & KEY_MASK;
        if let Some(&s) = self.keys.get(&key) {
            if let Some(f) = by_fd {
                assert_eq!(s, f, "an operation of session {s} on session {f}'s socket");
            }
            return s;
        }
        let s = match by_fd {
            Some(f) => f,
            None => *self
                .unlinked
                .first()
                .expect("an upstream connect for no accepted client"),
        };
        let at = self
            .unlinked
            .iter()
            .position(|&x| x == s)
            .expect("a session with two keys");
        self.unlinked.remove(at);
        self.sessions[s].key = Some(key);
        self.keys.insert(key, s);
        s
    }

    /// Checks an operation the worker starts.
    pub(super) fn on_submit(&mut self, token: u64, op: &Op) {
        let (kind, _) = untoken(token);
        let fd = op.fd();
        assert!(
            !self.engine_shutdown,
            "{op:?} started after the worker began its shutdown"
        );
        assert!(
            !self.closed.contains(&fd),
            "{op:?} on fd {fd} after the worker closed it"
        );
        match op {
            Op::PollIn { fd } => {
                assert_eq!((*fd, kind), (self.wake_fd, K_WAKE));
                assert!(
                    !self.ops.values().any(|p| matches!(p.op, Op::PollIn { .. })),
                    "two wake-up polls"
                );
            }
            Op::Accept { fd, .. } => {
                assert_eq!((*fd, kind), (self.listener, K_ACCEPT));
                assert!(
                    !self.ops.values().any(|p| matches!(p.op, Op::Accept { .. })),
                    "two accepts on one listener"
                );
            }
            Op::Connect { fd, addr } => {
                assert_eq!(kind, K_CONNECT);
                assert!(
                    self.use_of(*fd).is_none(),
                    "a connect on fd {fd}, which is in use"
                );
                let s = self.link(token, None);
                let st = &mut self.sessions[s];
                assert!(
                    matches!(st.kind, Kind::Proxy { .. }) && st.p[1].fd.is_none(),
                    "session {s}: a second upstream"
                );
                assert_eq!(st.errors(), 0, "session {s}: a connect after an error");
                let a = addr.as_socket().expect("an IP address");
                assert!(
                    self.setup.upstreams.contains(&a),
                    "connect to {a}, not an upstream"
                );
                st.p[1].fd = Some(*fd);
                st.p[1].end_fd = Some(replace_with_pair(*fd));
                self.set_use(*fd, Use::Peer(s, 1));
            }
            Op::Recv { fd, .. } | Op::Send { fd, .. } => {
                let recv = matches!(op, Op::Recv { .. });
                let Some(Use::Peer(s, side)) = self.use_of(*fd) else {
                    panic!("{op:?} on fd {fd}, not a session's socket");
                };
                let want = if recv { K_RECV } else { K_SEND } + side as u8;
                assert_eq!(kind, want, "{op:?}: a token of the other side");
                self.link(token, Some(s));
                let st = &self.sessions[s];
                let p = &st.p[side];
                assert!(
                    p.connected,
                    "session {s}: {op:?} before the connect completed"
                );
                assert_eq!(
                    st.errors(),
                    0,
                    "session {s}: {op:?} after an error ended the session"
                );
                assert!(
                    !self.pending_on(*fd, recv),
                    "session {s}: two {} in flight on the {}",
                    if recv { "receives" } else { "sends" },
                    name(side)
                );
                if let Op::Recv {
                    poll_first: true, ..
                } = op
                {
                    hit("a receive after a short one waits for data (poll_first)");
                }
                if recv {
                    assert!(
                        !p.eof_taken,
                        "session {s}: a receive on the {} after its end of stream",
                        name(side)
                    );
                } else if let Op::Send { buf, off, .. } = op {
                    assert!(*off < buf.len(), "session {s}: an empty send");
                    // Only where the session asks for a half-close (respond; proxy
                    // once the other side ended): a peek per send is not free.
                    let half_close = match &st.kind {
                        Kind::Fixed(_, h) => *h,
                        Kind::Proxy { .. } => st.p[1 - side].eof_taken,
                        Kind::Echo => false,
                    };
                    if !p.tcp && half_close && p.end_fd.as_ref().is_some_and(fin_arrived) {
                        panic!("session {s}: a send to the {} after its FIN", name(side));
                    }
                    let mark = (buf.as_ptr() as usize, buf.len(), *off);
                    let st = &mut self.sessions[s];
                    if let Some(want) = st.p[side].next_send.take() {
                        assert_eq!(
                            mark,
                            want,
                            "session {s}: the {} send does not go on with the same buffer (pointer, length, offset)",
                            name(side)
                        );
                    }
                }
            }
            other => panic!("no such operation on a TCP listener: {other:?}"),
        }
    }
}
