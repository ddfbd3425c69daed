//! Operations into SQEs: what each [`Op`] becomes on the ring (stream
//! operations, SCTP messages with their headers, multishot datagram receives).

use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::{UringBackend, BGID, BGID_UDP, BUF_SIZE, RECVSEND_POLL_FIRST, UD_OP};
use crate::driver::backend::{MultiKind, Op, SpliceSock};
use crate::driver::slab::Key;

impl UringBackend {
    /// The SQE for operation `k` (already in the table), whose memory stays put.
    pub(super) fn entry(&mut self, k: Key) -> Option<(squeue::Entry, Option<Duration>)> {
        let m = &mut *self.mem;
        let ud = crate::driver::slab::token(UD_OP, k);
        let uop = m.ops.get_mut(k)?;
        let e = match &mut uop.op {
            Op::Accept { fd, multishot } => {
                let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
                if self.multishot_accept && *multishot {
                    opcode::AcceptMulti::new(types::Fd(*fd))
                        .flags(flags)
                        .build()
                } else {
                    opcode::Accept::new(types::Fd(*fd), std::ptr::null_mut(), std::ptr::null_mut())
                        .flags(flags)
                        .build()
                }
            }
            Op::PollIn { fd } => opcode::PollAdd::new(types::Fd(*fd), libc::POLLIN as u32)
                .multi(true)
                .build(),
            Op::Recv { fd, poll_first } => {
                // Null buffer: the kernel picks one from the ring (BUFFER_SELECT).
                opcode::Recv::new(types::Fd(*fd), std::ptr::null_mut(), BUF_SIZE as u32)
                    .buf_group(BGID)
                    .ioprio(if *poll_first { RECVSEND_POLL_FIRST } else { 0 })
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
            }
            Op::RecvMsg { fd, hdr } => {
                let h = hdr.prepare(std::ptr::null_mut(), BUF_SIZE);
                opcode::RecvMsg::new(types::Fd(*fd), h)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
            }
            Op::RecvMulti { fd, kind } => match kind {
                MultiKind::Datagram => {
                    opcode::RecvMsgMulti::new(types::Fd(*fd), &*m.udp_msghdr, BGID_UDP).build()
                }
                MultiKind::SctpMany => {
                    opcode::RecvMsgMulti::new(types::Fd(*fd), &*m.many_msghdr, BGID).build()
                }
                // IORING_RECV_MULTISHOT on IORING_OP_RECV (6.0): one buffer of the
                // stream ring per CQE; ended by the kernel after `limit` bytes.
                MultiKind::Stream { limit } => {
                    let e = opcode::RecvMulti::new(types::Fd(*fd), BGID).build();
                    if *limit > 0 && self.multishot_recv_limit {
                        with_optlen(e, *limit)
                    } else {
                        e
                    }
                }
            },
            Op::Send { fd, buf, off } => {
                let rest = &buf[*off..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                opcode::Send::new(types::Fd(*fd), rest.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            Op::SendMsg {
                fd,
                msg,
                hdr,
                bound,
            } => {
                let h = hdr.prepare(&msg.data, msg.info, msg.flags);
                let e = opcode::SendMsg::new(types::Fd(*fd), h)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build();
                if let Some(d) = *bound {
                    return Some((e.flags(squeue::Flags::IO_LINK).user_data(ud), Some(d)));
                }
                e
            }
            // Run from the worker: a one-shot poll of the socket, whose CQE
            // runs splice(2) (see `event`).
            Op::Splice {
                fd_in,
                fd_out,
                sock,
                ..
            } if self.splice_now => {
                let (fd, mask) = match sock {
                    SpliceSock::In => (*fd_in, libc::POLLIN),
                    SpliceSock::Out => (*fd_out, libc::POLLOUT),
                };
                opcode::PollAdd::new(types::Fd(fd), mask as u32).build()
            }
            // IORING_OP_SPLICE (5.7), always run by an io-wq worker; non-blocking
            // on both ends, so it never holds that worker.
            Op::Splice {
                fd_in, fd_out, len, ..
            } => opcode::Splice::new(types::Fd(*fd_in), -1, types::Fd(*fd_out), -1, *len)
                .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                .build(),
            Op::Connect { fd, addr } => {
                opcode::Connect::new(types::Fd(*fd), addr.as_ptr().cast(), addr.len()).build()
            }
        };
        Some((e.user_data(ud), None))
    }
}

/// Byte offset of `optlen` (the union with `splice_fd_in` and `file_index`) in
/// a 64-byte SQE (`struct io_uring_sqe`, include/uapi/linux/io_uring.h).
const SQE_OPTLEN_OFFSET: usize = 44;

const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

/// `e` with `sqe->optlen` set to `v`: the total byte limit of a multishot
/// `IORING_OP_RECV` (Linux 6.18; older kernels fail the request with EINVAL). The
/// io-uring crate has no setter for it.
pub(super) fn with_optlen(mut e: squeue::Entry, v: u32) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around `io_uring_sqe` (64 bytes,
    // checked above), whose `__u32` at offset 44 is `optlen`; the write stays
    // inside the entry and is unaligned-safe.
    unsafe {
        (&mut e as *mut squeue::Entry)
            .cast::<u8>()
            .add(SQE_OPTLEN_OFFSET)
            .cast::<u32>()
            .write_unaligned(v);
    }
    e
}
