//! The SCTP system calls: socket setup ([`socket`], [`configure`], [`available`]),
//! peel-off ([`peeloff`]) and message I/O ([`recv`], [`send`]) with the header
//! memory it needs ([`RecvHeader`], [`SendHeader`]).

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::{
    msg_info, EventSubscribe, InitMsg, MsgInfo, PeeloffFlagsArg, SndInfo, SocketOpts, Style,
    IPPROTO_SCTP, RECV_CONTROL_WORDS, SCTP_AUTOCLOSE, SCTP_EVENTS, SCTP_INITMSG, SCTP_NODELAY,
    SCTP_RECVRCVINFO, SCTP_SNDINFO, SCTP_SOCKOPT_PEELOFF_FLAGS, SEND_CONTROL_WORDS, SOL_SCTP,
};

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a live T of size_of::<T>() bytes; fd is a socket we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking, close-on-exec SCTP socket of `addr`'s family and `style`, with
/// [`configure`] applied.
///
/// # Errors
/// socket(2) failed (EPROTONOSUPPORT: no SCTP in this kernel) or an option could
/// not be set.
pub fn socket(addr: SocketAddr, style: Style, opts: &SocketOpts) -> io::Result<Socket> {
    let ty = match style {
        Style::OneToOne => Type::STREAM,
        Style::OneToMany => Type::SEQPACKET,
    };
    let s = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(Protocol::from(IPPROTO_SCTP)),
    )?;
    configure(std::os::fd::AsFd::as_fd(&s), opts)?;
    Ok(s)
}

/// Sets what every ringress SCTP socket needs: SCTP_INITMSG with `opts.streams`
/// both ways, SCTP_RECVRCVINFO on, SCTP_NODELAY on, notifications of association
/// change, peer address change and shutdown (RFC 6458 6.2), and send/receive
/// buffers of `opts.buffer_bytes` (the kernel doubles and caps them, socket(7)).
/// Accepted sockets inherit all of this from their listener.
///
/// # Errors
/// The failing setsockopt(2); EMSGSIZE, with a message naming the sysctl, when
/// the send buffer the kernel grants (capped by `net.core.wmem_max`, then
/// doubled) is smaller than `opts.max_message`.
pub fn configure(sock: std::os::fd::BorrowedFd<'_>, opts: &SocketOpts) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let init = InitMsg {
        sinit_num_ostreams: opts.streams,
        sinit_max_instreams: opts.streams,
        ..Default::default()
    };
    setsockopt(fd, SOL_SCTP, SCTP_INITMSG, &init)?;
    let one: libc::c_int = 1;
    setsockopt(fd, SOL_SCTP, SCTP_RECVRCVINFO, &one)?;
    setsockopt(fd, SOL_SCTP, SCTP_NODELAY, &one)?;
    let ev = EventSubscribe {
        association: 1,
        address: 1,
        shutdown: 1,
        ..Default::default()
    };
    setsockopt(fd, SOL_SCTP, SCTP_EVENTS, &ev)?;
    let buf = opts.buffer_bytes.min(i32::MAX as usize) as libc::c_int;
    // The kernel caps these at net.core.[wr]mem_max; what it granted is read back.
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &buf);
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &buf);
    let granted = socket2::SockRef::from(&sock).send_buffer_size()?;
    if granted < opts.max_message {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "max_message_bytes {} is larger than the SCTP send buffer the kernel grants \
                 ({granted} bytes; raise net.core.wmem_max to at least {}, or lower max_message_bytes): \
                 Linux refuses a message longer than the send buffer",
                opts.max_message,
                opts.max_message.div_ceil(2)
            ),
        ));
    }
    Ok(())
}

/// Sets SCTP_AUTOCLOSE on a one-to-many socket: its associations idle for
/// `idle_ms` (rounded up to whole seconds, the option's unit; 0: never) are shut
/// down gracefully by the kernel (RFC 6458 8.1.8). Values past the kernel's
/// `net.sctp.max_autoclose` are capped by it.
///
/// # Errors
/// The setsockopt(2) error (EOPNOTSUPP on a one-to-one socket).
pub fn set_autoclose(sock: std::os::fd::BorrowedFd<'_>, idle_ms: u64) -> io::Result<()> {
    let secs = libc::c_int::try_from(idle_ms.div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    setsockopt(sock.as_raw_fd(), SOL_SCTP, SCTP_AUTOCLOSE, &secs)
}

/// Whether this kernel has SCTP: `Ok` when an SCTP socket can be made here.
///
/// # Errors
/// The socket(2) error, EPROTONOSUPPORT (93) where SCTP is not built or loaded.
pub fn available() -> io::Result<()> {
    Socket::new(
        Domain::IPV4,
        Type::STREAM.cloexec(),
        Some(Protocol::from(IPPROTO_SCTP)),
    )
    .map(drop)
}

/// Whether `e` means "this kernel has no SCTP".
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPROTONOSUPPORT) | Some(libc::ESOCKTNOSUPPORT) | Some(libc::EAFNOSUPPORT)
    )
}

/// Branches association `assoc` of one-to-many socket `fd` off into a new
/// one-to-one socket (non-blocking, close-on-exec), RFC 6458 9.2, with
/// `SCTP_SOCKOPT_PEELOFF_FLAGS`. Linux only allows it from the socket's own
/// network namespace (EINVAL otherwise): workers ask the binder
/// ([`crate::binder::Binder::peel_off`]).
///
/// # Errors
/// EINVAL: no such association, or called from another namespace; EBUSY: a
/// sender waits on the association.
pub fn peeloff(fd: RawFd, assoc: i32) -> io::Result<std::os::fd::OwnedFd> {
    let mut arg = PeeloffFlagsArg {
        assoc_id: assoc,
        sd: -1,
        flags: (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as libc::c_uint,
    };
    let mut len = size_of::<PeeloffFlagsArg>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `arg`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_SCTP,
            SCTP_SOCKOPT_PEELOFF_FLAGS,
            (&mut arg as *mut PeeloffFlagsArg).cast(),
            &mut len,
        )
    };
    // Linux returns the new fd (also in `sd`), not 0, on success.
    if r < 0 || arg.sd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel installed this new fd for us; nobody else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(arg.sd) })
}

/// recvmsg(2) memory of one SCTP socket: msghdr, one iovec, control room for
/// SCTP_RCVINFO. Boxed by its owner ([`RecvHeader::new`]) so that an io_uring
/// RECVMSG SQE may point at it until its CQE; the header points into the box, so
/// the box must not be freed while an operation uses it.
///
/// Not `Send` (it holds raw pointers): a thread makes the headers it uses.
pub struct RecvHeader {
    /// The header handed to the kernel.
    hdr: libc::msghdr,
    /// The one iovec (base set per receive, or null for io_uring's buffer pick).
    iov: libc::iovec,
    /// Control storage (u64 words: aligned for `cmsghdr`).
    ctl: [u64; RECV_CONTROL_WORDS],
}

impl std::fmt::Debug for RecvHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvHeader")
    }
}

impl RecvHeader {
    /// A boxed, zeroed header; its pointers are set by [`RecvHeader::prepare`].
    pub fn new() -> Box<RecvHeader> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid
        // (null pointers, zero lengths); the control storage is plain u64s.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// Points the header at `buf` for up to `len` bytes (`buf` null with `len`
    /// for io_uring's provided-buffer selection) and at the control storage;
    /// returns the header. `buf` must stay valid until the receive completes.
    pub fn prepare(&mut self, buf: *mut u8, len: usize) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        self.ctl = [0; RECV_CONTROL_WORDS];
        self.hdr.msg_name = std::ptr::null_mut();
        self.hdr.msg_namelen = 0;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.ctl.as_mut_ptr().cast();
        self.hdr.msg_controllen = size_of::<[u64; RECV_CONTROL_WORDS]>() as _;
        self.hdr.msg_flags = 0;
        &mut self.hdr
    }

    /// What the last receive said: `(flags, info)` from the header the kernel wrote
    /// back (MSG_EOR, [`MSG_NOTIFICATION`](super::MSG_NOTIFICATION), the
    /// [`RcvInfo`](super::RcvInfo)).
    pub fn received(&self) -> (libc::c_int, MsgInfo) {
        // msg_controllen is size_t on glibc, socklen_t on musl.
        #[allow(clippy::unnecessary_cast)]
        let len = (self.hdr.msg_controllen as usize).min(size_of::<[u64; RECV_CONTROL_WORDS]>());
        // SAFETY: the control storage is ours and `len` bytes of it were written.
        let ctl = unsafe { std::slice::from_raw_parts(self.ctl.as_ptr().cast::<u8>(), len) };
        (self.hdr.msg_flags, msg_info(ctl))
    }
}

/// sendmsg(2) memory of one SCTP socket: msghdr, one iovec, one SCTP_SNDINFO
/// cmsg. Boxed by its owner ([`SendHeader::new`]) so that an io_uring SENDMSG SQE
/// may point at it until its CQE; the header points into the box, so the box must
/// not be freed while an operation uses it.
///
/// Not `Send` (it holds raw pointers): a thread makes the headers it uses.
pub struct SendHeader {
    /// The header handed to the kernel.
    hdr: libc::msghdr,
    /// The one iovec (points at the message being sent).
    iov: libc::iovec,
    /// Control storage: one `SCTP_SNDINFO` (u64 words: aligned for `cmsghdr`).
    ctl: [u64; SEND_CONTROL_WORDS],
}

impl std::fmt::Debug for SendHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendHeader")
    }
}

impl SendHeader {
    /// A boxed, zeroed header; its pointers are set by [`SendHeader::prepare`].
    pub fn new() -> Box<SendHeader> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid
        // (null pointers, zero lengths); the control storage is plain u64s.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// Points the header at `data` with an `SCTP_SNDINFO` for `info` (and
    /// `flags`, e.g. [`SCTP_ABORT`](super::SCTP_ABORT)); returns the header. `data` must stay put
    /// until the send completes.
    pub fn prepare(&mut self, data: &[u8], info: MsgInfo, flags: u16) -> *const libc::msghdr {
        self.iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        self.ctl = [0; SEND_CONTROL_WORDS];
        let snd = SndInfo {
            snd_sid: info.stream,
            snd_flags: flags,
            snd_ppid: info.ppid,
            snd_context: 0,
            snd_assoc_id: info.assoc,
        };
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic on a small constant.
        let (space, clen) = unsafe {
            (
                libc::CMSG_SPACE(size_of::<SndInfo>() as u32) as usize,
                libc::CMSG_LEN(size_of::<SndInfo>() as u32) as usize,
            )
        };
        debug_assert!(space <= size_of::<[u64; SEND_CONTROL_WORDS]>());
        self.hdr.msg_name = std::ptr::null_mut();
        self.hdr.msg_namelen = 0;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.ctl.as_mut_ptr().cast();
        self.hdr.msg_controllen = space as _;
        self.hdr.msg_flags = 0;
        // SAFETY: the control buffer holds `space` bytes (checked above) and is 8-byte
        // aligned, so CMSG_FIRSTHDR is non-null and the header and data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&self.hdr);
            (*c).cmsg_level = IPPROTO_SCTP;
            (*c).cmsg_type = SCTP_SNDINFO;
            (*c).cmsg_len = clen as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<SndInfo>(), snd);
        }
        &self.hdr
    }
}

/// recvmsg(2) on SCTP socket `fd` into `buf` with `hdr`'s control storage:
/// `(bytes, flags, info)`. 0 bytes without MSG_NOTIFICATION is the end of the
/// association (one-to-one).
///
/// # Errors
/// The recvmsg(2) errno (EAGAIN when nothing is waiting).
pub fn recv(fd: RawFd, buf: &mut [u8], hdr: &mut RecvHeader) -> io::Result<(usize, i32, MsgInfo)> {
    let msg = hdr.prepare(buf.as_mut_ptr(), buf.len());
    // SAFETY: the header points at `buf` and at its own control storage, both
    // live and writable for the call.
    let n = unsafe { libc::recvmsg(fd, msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (flags, info) = hdr.received();
    Ok((n as usize, flags, info))
}

/// sendmsg(2) of one whole message on SCTP socket `fd` with an `SCTP_SNDINFO`
/// for `info` and `flags` (`snd_flags`, e.g. [`SCTP_ABORT`](super::SCTP_ABORT)): the
/// bytes sent.
///
/// # Errors
/// The sendmsg(2) errno (EAGAIN: not enough send buffer room now).
pub fn send(
    fd: RawFd,
    data: &[u8],
    info: MsgInfo,
    flags: u16,
    hdr: &mut SendHeader,
) -> io::Result<usize> {
    let msg = hdr.prepare(data, info, flags);
    // SAFETY: the header points at `data` and at its own control storage, both
    // live for the call.
    let n = unsafe { libc::sendmsg(fd, msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sctp::{RcvInfo, SCTP_RCVINFO};

    #[test]
    fn sndinfo_round_trips_through_the_control_parser() {
        let mut s = SendHeader::new();
        let info = MsgInfo {
            stream: 7,
            ppid: 0x0102_0304,
            assoc: 42,
        };
        let hdr = s.prepare(b"x", info, 0);
        #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
        // SAFETY: reading the header we just built.
        let (ctl, len) = unsafe { ((*hdr).msg_control, (*hdr).msg_controllen as usize) };
        // SAFETY: the control storage is `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(ctl.cast::<u8>(), len) };
        // SAFETY: the buffer starts with the cmsghdr written by prepare.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!((c.cmsg_level, c.cmsg_type), (IPPROTO_SCTP, SCTP_SNDINFO));
        let off = size_of::<libc::cmsghdr>();
        // SAFETY: the data follows the header inside `bytes`.
        let snd: SndInfo = unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
        assert_eq!(
            (snd.snd_sid, snd.snd_ppid, snd.snd_assoc_id),
            (7, 0x0102_0304, 42)
        );
    }

    #[test]
    fn recv_header_reads_back_what_the_kernel_wrote() {
        let mut h = RecvHeader::new();
        let mut buf = [0u8; 16];
        let msg = h.prepare(buf.as_mut_ptr(), buf.len());
        // What recvmsg(2) leaves behind: one SCTP_RCVINFO, MSG_EOR.
        let r = RcvInfo {
            rcv_sid: 5,
            rcv_ppid: 0x0a0b_0c0d,
            rcv_assoc_id: 3,
            ..Default::default()
        };
        let hdr_len = size_of::<libc::cmsghdr>();
        // SAFETY: `msg` is h's header; its control storage holds RECV_CONTROL_WORDS
        // words, more than a cmsghdr and an RcvInfo (layouts_match_linux_sctp_h).
        unsafe {
            let c = (*msg).msg_control.cast::<u8>();
            std::ptr::write_unaligned(
                c.cast::<libc::cmsghdr>(),
                libc::cmsghdr {
                    cmsg_len: (hdr_len + size_of::<RcvInfo>()) as _,
                    cmsg_level: IPPROTO_SCTP,
                    cmsg_type: SCTP_RCVINFO,
                },
            );
            std::ptr::write_unaligned(c.add(hdr_len).cast::<RcvInfo>(), r);
            (*msg).msg_controllen = (hdr_len + size_of::<RcvInfo>()) as _;
            (*msg).msg_flags = libc::MSG_EOR;
        }
        assert_eq!(
            h.received(),
            (
                libc::MSG_EOR,
                MsgInfo {
                    stream: 5,
                    ppid: 0x0a0b_0c0d,
                    assoc: 3
                }
            )
        );
    }
}
