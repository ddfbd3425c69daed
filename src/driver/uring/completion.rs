//! CQEs into events: results, lent buffers, and what a multishot RECVMSG wrote
//! into its buffer (`io_uring_recvmsg_out`, name, control, payload).

use io_uring::{cqueue, types};

use std::os::fd::IntoRawFd;

use super::{UringBackend, BGID, BGID_UDP, UD_CLOSE, UD_OP};
use crate::driver::backend::{Backend, BufRef, Event, Meta, MultiKind, Op, Owned};
use crate::driver::udp;

impl UringBackend {
    /// Turns one CQE into an event (`None` for cancels, link timeouts and
    /// closes).
    pub(super) fn event(&mut self, ud: u64, res: i32, flags: u32) -> Option<Event> {
        let (kind, k) = crate::driver::slab::untoken(ud);
        if kind == UD_CLOSE {
            if let Some(fd) = self.mem.closes.remove(k) {
                if res == -libc::EINVAL {
                    // Refused at prep, before the fd left the table: still ours,
                    // close(2) it.
                    tracing::debug!("IORING_OP_CLOSE refused (EINVAL); closing with close(2)");
                    drop(fd);
                } else {
                    // 0: closed by the kernel. Any other result came after io_close
                    // took the fd out of the table (or it was not there: EBADF), so
                    // the number may already be another file's: forget it, never
                    // close it again (a leak is safer than a double close).
                    let raw = fd.into_raw_fd();
                    if res < 0 {
                        tracing::warn!(
                            fd = raw,
                            errno = -res,
                            "IORING_OP_CLOSE failed; fd forgotten"
                        );
                    }
                }
            }
            return None;
        }
        if kind != UD_OP {
            self.aux = self.aux.saturating_sub(1);
            return None;
        }
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let splice_now = self.splice_now;
        let m = &mut *self.mem;
        let uop = m.ops.get(k)?;
        let token = uop.token;
        let mut res = res;
        if let (
            Op::Splice {
                fd_in, fd_out, len, ..
            },
            true,
        ) = (&uop.op, splice_now)
        {
            // The poll of a splice run from the worker fired (or failed, or was
            // cancelled: that result stands): run it now.
            if res >= 0 {
                res = crate::driver::pipe::splice_nonblock(*fd_in, *fd_out, *len)
                    .unwrap_or_else(|errno| -errno);
            }
        }
        let mut meta = Meta::None;
        let mut buf = None;
        match (&uop.op, bid) {
            (Op::RecvMulti { kind, .. }, Some(bid))
                if res >= 0 && !matches!(kind, MultiKind::Stream { .. }) =>
            {
                // (A stream's CQE holds bare bytes: the generic arm below.)
                let (ring, tmpl, g) = match kind {
                    MultiKind::Datagram => (m.udp_bufs.as_ref()?, &*m.udp_msghdr, BGID_UDP),
                    _ => (&m.bufs, &*m.many_msghdr, BGID),
                };
                let raw = ring.data(bid, res as usize);
                let base = raw.as_ptr() as usize;
                match types::RecvMsgOut::parse(raw, tmpl) {
                    Ok(out) => {
                        let payload = out.payload_data();
                        meta = match kind {
                            MultiKind::Datagram => Meta::Datagram {
                                from: udp::parse_name(out.name_data()),
                                to: udp::parse_pktinfo(out.control_data()),
                                truncated: out.is_payload_truncated(),
                            },
                            MultiKind::SctpMany | MultiKind::Stream { .. } => Meta::Message {
                                flags: out.flags() as i32,
                                info: crate::sctp::msg_info(out.control_data()),
                            },
                        };
                        buf = Some(BufRef {
                            group: g,
                            id: bid,
                            off: (payload.as_ptr() as usize - base) as u32,
                            len: payload.len() as u32,
                        });
                    }
                    Err(()) => {
                        // Too short to parse: give the buffer back, report nothing.
                        self.release(BufRef {
                            group: g,
                            id: bid,
                            off: 0,
                            len: 0,
                        });
                    }
                }
            }
            (Op::RecvMsg { hdr, .. }, bid) => {
                let (flags, info) = hdr.received();
                meta = Meta::Message { flags, info };
                buf = bid.map(|id| BufRef {
                    group: BGID,
                    id,
                    off: 0,
                    len: res.max(0) as u32,
                });
            }
            (_, Some(id)) => {
                buf = Some(BufRef {
                    group: if matches!(
                        uop.op,
                        Op::RecvMulti {
                            kind: MultiKind::Datagram,
                            ..
                        }
                    ) {
                        BGID_UDP
                    } else {
                        BGID
                    },
                    id,
                    off: 0,
                    len: res.max(0) as u32,
                });
            }
            _ => {}
        }
        let owned = if more {
            Owned::None
        } else {
            self.mem
                .ops
                .remove(k)
                .map_or(Owned::None, |u| u.op.into_owned())
        };
        Some(Event {
            token,
            res,
            more,
            buf,
            meta,
            owned,
        })
    }
}
