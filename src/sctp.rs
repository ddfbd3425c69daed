//! SCTP system bindings that the libc crate lacks, and the small socket helpers
//! built on them (both drivers, the binder and the tests use these).
//!
//! Every constant and struct below is from the Linux UAPI header
//! `include/uapi/linux/sctp.h` (RFC 6458 "Sockets API Extensions for SCTP" names
//! them); the kernel version that added each is noted. Layouts are `#[repr(C)]`
//! copies of the header's structs and are checked by size in the unit tests.
//!
//! Linux builds SCTP as a module (`CONFIG_IP_SCTP`); where it is missing,
//! socket(2) with `IPPROTO_SCTP` fails with EPROTONOSUPPORT ([`available`]).

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// `IPPROTO_SCTP` (132), the protocol number and the socket option level
/// (`SOL_SCTP`, linux/socket.h).
pub const IPPROTO_SCTP: libc::c_int = 132;
/// `SOL_SCTP` (linux/socket.h): `setsockopt` level of the options below.
pub const SOL_SCTP: libc::c_int = 132;

/// `SCTP_INITMSG` (2, Linux 2.6): [`InitMsg`], stream counts for new associations.
pub const SCTP_INITMSG: libc::c_int = 2;
/// `SCTP_NODELAY` (3, Linux 2.6): int, 1 turns Nagle-like bundling delay off.
pub const SCTP_NODELAY: libc::c_int = 3;
/// `SCTP_EVENTS` (11, Linux 2.6): [`EventSubscribe`], which notifications arrive.
pub const SCTP_EVENTS: libc::c_int = 11;
/// `SCTP_SOCKOPT_PEELOFF_FLAGS` (122, Linux 4.13): getsockopt that branches one
/// association of a one-to-many socket off into its own one-to-one socket.
pub const SCTP_SOCKOPT_PEELOFF_FLAGS: libc::c_int = 122;
/// `SCTP_RECVRCVINFO` (32, Linux 3.19): int, 1 adds an `SCTP_RCVINFO` control
/// message ([`RcvInfo`]) to every received data message.
pub const SCTP_RECVRCVINFO: libc::c_int = 32;

/// Control message type `SCTP_SNDINFO` (enum sctp_cmsg_type, Linux 3.19): a
/// [`SndInfo`] on sendmsg(2).
pub const SCTP_SNDINFO: libc::c_int = 2;
/// Control message type `SCTP_RCVINFO` (Linux 3.19): a [`RcvInfo`] on recvmsg(2).
pub const SCTP_RCVINFO: libc::c_int = 3;

/// `MSG_NOTIFICATION` (0x8000): recvmsg(2) returned an event, not user data.
pub const MSG_NOTIFICATION: libc::c_int = 0x8000;
/// `SCTP_ABORT` (0x0004) in [`SndInfo::snd_flags`]: abort the association
/// (one-to-many sockets).
pub const SCTP_ABORT: u16 = 0x0004;
/// `SCTP_EOF` (MSG_FIN, 0x0200) in [`SndInfo::snd_flags`]: shut the association
/// down gracefully (one-to-many and peeled-off sockets; shutdown(2) on
/// one-to-one ones).
pub const SCTP_EOF: u16 = 0x0200;

/// Notification types (`enum sctp_sn_type`, base 1 << 15, Linux 2.6).
pub const SCTP_ASSOC_CHANGE: u16 = 0x8001;
/// A peer address changed state.
pub const SCTP_PEER_ADDR_CHANGE: u16 = 0x8002;
/// The peer sent SHUTDOWN: no more data will arrive on the association.
pub const SCTP_SHUTDOWN_EVENT: u16 = 0x8005;

/// `sac_state` of an `SCTP_ASSOC_CHANGE` (`enum sctp_sac_state`).
pub const SCTP_COMM_UP: u16 = 0;
/// The association failed (abort, or too many retransmissions).
pub const SCTP_COMM_LOST: u16 = 1;
/// The peer restarted.
pub const SCTP_RESTART: u16 = 2;
/// A graceful shutdown completed.
pub const SCTP_SHUTDOWN_COMP: u16 = 3;
/// The association could not be set up.
pub const SCTP_CANT_STR_ASSOC: u16 = 4;

/// `struct sctp_initmsg` (Linux 2.6).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct InitMsg {
    /// Outbound streams asked for.
    pub sinit_num_ostreams: u16,
    /// Most inbound streams accepted.
    pub sinit_max_instreams: u16,
    /// INIT retransmissions (0 = the default).
    pub sinit_max_attempts: u16,
    /// Largest INIT timeout (ms, 0 = the default).
    pub sinit_max_init_timeo: u16,
}

/// `struct sctp_event_subscribe` (Linux 2.6), the fields up to `shutdown`; the
/// kernel accepts a shorter struct and leaves the rest off.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct EventSubscribe {
    /// `SCTP_SNDRCV` control messages (the older [`RcvInfo`]): off, we use RCVINFO.
    pub data_io: u8,
    /// `SCTP_ASSOC_CHANGE` notifications.
    pub association: u8,
    /// `SCTP_PEER_ADDR_CHANGE` notifications.
    pub address: u8,
    /// `SCTP_SEND_FAILED`.
    pub send_failure: u8,
    /// `SCTP_REMOTE_ERROR`.
    pub peer_error: u8,
    /// `SCTP_SHUTDOWN_EVENT`.
    pub shutdown: u8,
}

/// `struct sctp_sndinfo` (RFC 6458 5.3.4, Linux 3.19): 16 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SndInfo {
    /// Stream id to send on.
    pub snd_sid: u16,
    /// `SCTP_UNORDERED`, [`SCTP_ABORT`], ...
    pub snd_flags: u16,
    /// Payload protocol identifier, in network byte order as sent (opaque to SCTP).
    pub snd_ppid: u32,
    /// Opaque context for send failures.
    pub snd_context: u32,
    /// Association (one-to-many sockets; ignored on one-to-one).
    pub snd_assoc_id: i32,
}

/// `struct sctp_rcvinfo` (RFC 6458 5.3.5, Linux 3.19): 28 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RcvInfo {
    /// Stream id the message came on.
    pub rcv_sid: u16,
    /// Stream sequence number.
    pub rcv_ssn: u16,
    /// `SCTP_UNORDERED` when sent unordered.
    pub rcv_flags: u16,
    /// Payload protocol identifier, exactly as the sender gave it.
    pub rcv_ppid: u32,
    /// TSN of the first DATA chunk.
    pub rcv_tsn: u32,
    /// Cumulative TSN.
    pub rcv_cumtsn: u32,
    /// Context.
    pub rcv_context: u32,
    /// Association (meaningful on one-to-many sockets).
    pub rcv_assoc_id: i32,
}

/// `sctp_peeloff_flags_arg_t` (Linux 4.13): association in, new fd out, with
/// SOCK_NONBLOCK / SOCK_CLOEXEC for it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PeeloffFlagsArg {
    assoc_id: i32,
    sd: libc::c_int,
    flags: libc::c_uint,
}

/// Where a message goes or came from: stream id, PPID and association.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MsgInfo {
    /// Stream id (0..streams).
    pub stream: u16,
    /// Payload protocol identifier (as on the wire; not byte-swapped).
    pub ppid: u32,
    /// Association id on a one-to-many socket, 0 on a one-to-one socket.
    pub assoc: i32,
}

/// The one-to-one or one-to-many socket style (RFC 6458 sections 3 and 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Style {
    /// `SOCK_STREAM`: one socket per association, accept(2) on the listener.
    #[default]
    OneToOne,
    /// `SOCK_SEQPACKET`: one socket carries every association; messages name theirs.
    OneToMany,
}

impl Style {
    /// The config spelling: `"one-to-one"` or `"one-to-many"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Style::OneToOne => "one-to-one",
            Style::OneToMany => "one-to-many",
        }
    }
}

/// Per-socket SCTP settings from the listener's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketOpts {
    /// Outbound and most inbound streams (SCTP_INITMSG).
    pub streams: u16,
    /// SO_SNDBUF / SO_RCVBUF asked for (bytes): at least the largest message, so a
    /// whole message fits a send.
    pub buffer_bytes: usize,
    /// The largest message that must fit one send (bytes): Linux refuses a message
    /// longer than the send buffer (EMSGSIZE), so the buffer the kernel grants is
    /// checked against it.
    pub max_message: usize,
}

impl Default for SocketOpts {
    fn default() -> Self {
        SocketOpts {
            streams: 16,
            buffer_bytes: 256 * 1024,
            max_message: 256 * 1024,
        }
    }
}

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

/// Control-message room for one `SCTP_RCVINFO` (bytes, 8-byte aligned storage).
pub const RECV_CONTROL_WORDS: usize = 8;
/// Control-message room for one `SCTP_SNDINFO` (bytes, 8-byte aligned storage).
pub const SEND_CONTROL_WORDS: usize = 5;

/// The stable memory of one recvmsg and one sendmsg on an SCTP socket: the
/// headers, their iovecs and control buffers. Boxed by its owner so that an
/// io_uring RECVMSG/SENDMSG SQE may point at it until its CQE.
pub struct MsgSpace {
    /// recvmsg header: one iovec, control room for [`RcvInfo`].
    pub recv_hdr: libc::msghdr,
    /// The receive iovec (base filled per receive, or by the kernel's buffer pick).
    pub recv_iov: libc::iovec,
    /// Control storage of the receive.
    pub recv_ctl: [u64; RECV_CONTROL_WORDS],
    /// sendmsg header: one iovec, one `SCTP_SNDINFO` control message.
    pub send_hdr: libc::msghdr,
    /// The send iovec (points at the message being sent).
    pub send_iov: libc::iovec,
    /// Control storage of the send.
    pub send_ctl: [u64; SEND_CONTROL_WORDS],
}

// SAFETY: the raw pointers inside point into the same boxed MsgSpace or at a
// message buffer owned by the same session; the space moves between threads only
// with its owner, never while an operation uses it.
unsafe impl Send for MsgSpace {}

impl std::fmt::Debug for MsgSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MsgSpace")
    }
}

impl MsgSpace {
    /// A boxed, zeroed space; pointers are set by [`MsgSpace::prepare_recv`] and
    /// [`MsgSpace::prepare_send`].
    pub fn new() -> Box<MsgSpace> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid
        // (null pointers, zero lengths).
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// Points the receive header at `buf` (null with `len` for io_uring's buffer
    /// selection) and at the control storage; returns the header.
    pub fn prepare_recv(&mut self, buf: *mut u8, len: usize) -> *mut libc::msghdr {
        self.recv_iov = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        self.recv_ctl = [0; RECV_CONTROL_WORDS];
        self.recv_hdr.msg_name = std::ptr::null_mut();
        self.recv_hdr.msg_namelen = 0;
        self.recv_hdr.msg_iov = &mut self.recv_iov;
        self.recv_hdr.msg_iovlen = 1;
        self.recv_hdr.msg_control = self.recv_ctl.as_mut_ptr().cast();
        self.recv_hdr.msg_controllen = size_of::<[u64; RECV_CONTROL_WORDS]>() as _;
        self.recv_hdr.msg_flags = 0;
        &mut self.recv_hdr
    }

    /// What the last receive said: `(flags, info)` from the header the kernel wrote
    /// back (MSG_EOR, [`MSG_NOTIFICATION`], the [`RcvInfo`]).
    pub fn received(&self) -> (libc::c_int, MsgInfo) {
        // msg_controllen is size_t on glibc, socklen_t on musl.
        #[allow(clippy::unnecessary_cast)]
        let len =
            (self.recv_hdr.msg_controllen as usize).min(size_of::<[u64; RECV_CONTROL_WORDS]>());
        // SAFETY: the control storage is ours and `len` bytes of it were written.
        let ctl = unsafe { std::slice::from_raw_parts(self.recv_ctl.as_ptr().cast::<u8>(), len) };
        (self.recv_hdr.msg_flags, msg_info(ctl))
    }

    /// Points the send header at `data` with an `SCTP_SNDINFO` for `info` (and
    /// `flags`, e.g. [`SCTP_ABORT`]); returns the header. `data` must stay put
    /// until the send completes.
    pub fn prepare_send(&mut self, data: &[u8], info: MsgInfo, flags: u16) -> *const libc::msghdr {
        self.send_iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        self.send_ctl = [0; SEND_CONTROL_WORDS];
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
        self.send_hdr.msg_name = std::ptr::null_mut();
        self.send_hdr.msg_namelen = 0;
        self.send_hdr.msg_iov = &mut self.send_iov;
        self.send_hdr.msg_iovlen = 1;
        self.send_hdr.msg_control = self.send_ctl.as_mut_ptr().cast();
        self.send_hdr.msg_controllen = space as _;
        self.send_hdr.msg_flags = 0;
        // SAFETY: the control buffer holds `space` bytes (checked above) and is 8-byte
        // aligned, so CMSG_FIRSTHDR is non-null and the header and data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&self.send_hdr);
            (*c).cmsg_level = IPPROTO_SCTP;
            (*c).cmsg_type = SCTP_SNDINFO;
            (*c).cmsg_len = clen as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<SndInfo>(), snd);
        }
        &self.send_hdr
    }
}

/// Stream id, PPID and association from the `SCTP_RCVINFO` in received control
/// bytes (all zero when there is none, e.g. for a notification).
pub fn msg_info(ctl: &[u8]) -> MsgInfo {
    parse_rcvinfo(ctl).map_or_else(MsgInfo::default, |r| MsgInfo {
        stream: r.rcv_sid,
        ppid: r.rcv_ppid,
        assoc: r.rcv_assoc_id,
    })
}

/// Finds an `SCTP_RCVINFO` in received control bytes.
pub fn parse_rcvinfo(ctl: &[u8]) -> Option<RcvInfo> {
    let hdr = size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + hdr <= ctl.len() {
        // SAFETY: `hdr` bytes at `off` are inside `ctl`; read unaligned.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctl[off..].as_ptr().cast()) };
        let len = c.cmsg_len as usize;
        if len < hdr || off + len > ctl.len() {
            break;
        }
        if c.cmsg_level == IPPROTO_SCTP
            && c.cmsg_type == SCTP_RCVINFO
            && len - hdr >= size_of::<RcvInfo>()
        {
            // SAFETY: the data holds a whole RcvInfo (checked); read unaligned.
            return Some(unsafe { std::ptr::read_unaligned(ctl[off + hdr..].as_ptr().cast()) });
        }
        off += (len + 7) & !7;
    }
    None
}

/// A received notification (RFC 6458 6.1), the parts ringress acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// `SCTP_ASSOC_CHANGE`: `state` is [`SCTP_COMM_UP`], [`SCTP_COMM_LOST`], ...
    AssocChange {
        /// `sac_state`.
        state: u16,
        /// The association.
        assoc: i32,
    },
    /// `SCTP_SHUTDOWN_EVENT` for the association.
    Shutdown {
        /// The association.
        assoc: i32,
    },
    /// Any other type (peer address change, ...), with its `sn_type`.
    Other(u16),
}

impl Notification {
    /// Parses the start of a notification (its first piece is enough).
    pub fn parse(b: &[u8]) -> Option<Notification> {
        let u16_at = |o: usize| b.get(o..o + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
        let i32_at = |o: usize| {
            b.get(o..o + 4)
                .map(|x| i32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
        };
        let ty = u16_at(0)?;
        Some(match ty {
            // struct sctp_assoc_change: type, flags, length(u32), state, error,
            // outbound streams, inbound streams, assoc_id at 16.
            SCTP_ASSOC_CHANGE => Notification::AssocChange {
                state: u16_at(8)?,
                assoc: i32_at(16)?,
            },
            // struct sctp_shutdown_event: type, flags, length(u32), assoc_id at 8.
            SCTP_SHUTDOWN_EVENT => Notification::Shutdown { assoc: i32_at(8)? },
            other => Notification::Other(other),
        })
    }
}

/// recvmsg(2) on SCTP socket `fd` into `buf` with `space`'s control storage:
/// `(bytes, flags, info)`. 0 bytes without MSG_NOTIFICATION is the end of the
/// association (one-to-one).
///
/// # Errors
/// The recvmsg(2) errno (EAGAIN when nothing is waiting).
pub fn recv(fd: RawFd, buf: &mut [u8], space: &mut MsgSpace) -> io::Result<(usize, i32, MsgInfo)> {
    let hdr = space.prepare_recv(buf.as_mut_ptr(), buf.len());
    // SAFETY: the header points at `buf` and at the space's control storage, both
    // live and writable for the call.
    let n = unsafe { libc::recvmsg(fd, hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (flags, info) = space.received();
    Ok((n as usize, flags, info))
}

/// sendmsg(2) of one whole message on SCTP socket `fd` with an `SCTP_SNDINFO`.
///
/// # Errors
/// The sendmsg(2) errno (EAGAIN: not enough send buffer room now).
pub fn send(
    fd: RawFd,
    data: &[u8],
    info: MsgInfo,
    flags: u16,
    space: &mut MsgSpace,
) -> io::Result<usize> {
    let hdr = space.prepare_send(data, info, flags);
    // SAFETY: the header points at `data` and at the space's control storage, both
    // live for the call.
    let n = unsafe { libc::sendmsg(fd, hdr, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recvmsg(2) memory of one SCTP socket: msghdr, one iovec, control room for
/// SCTP_RCVINFO. Boxed, so that an io_uring RECVMSG may point at it.
pub struct RecvHeader {
    hdr: libc::msghdr,
    iov: libc::iovec,
    ctl: [u64; RECV_CONTROL_WORDS],
}

impl std::fmt::Debug for RecvHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvHeader")
    }
}

impl RecvHeader {
    /// A zeroed header.
    pub fn new() -> Box<RecvHeader> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// Points the header at `buf` (null with `len` for io_uring's buffer
    /// selection) and at the control storage; returns it.
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

    /// What the last receive said: `(flags, info)`.
    pub fn received(&self) -> (libc::c_int, MsgInfo) {
        #[allow(clippy::unnecessary_cast)]
        let len = (self.hdr.msg_controllen as usize).min(size_of::<[u64; RECV_CONTROL_WORDS]>());
        // SAFETY: the control storage is ours and `len` bytes of it were written.
        let ctl = unsafe { std::slice::from_raw_parts(self.ctl.as_ptr().cast::<u8>(), len) };
        (self.hdr.msg_flags, msg_info(ctl))
    }
}

/// sendmsg(2) memory of one SCTP socket: msghdr, one iovec, one SCTP_SNDINFO.
pub struct SendHeader {
    space: Box<MsgSpace>,
}

impl std::fmt::Debug for SendHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendHeader")
    }
}

impl SendHeader {
    /// A zeroed header.
    pub fn new() -> Box<SendHeader> {
        Box::new(SendHeader {
            space: MsgSpace::new(),
        })
    }

    /// Points the header at `data` with an SCTP_SNDINFO; returns it.
    pub fn prepare(&mut self, data: &[u8], info: MsgInfo, flags: u16) -> *const libc::msghdr {
        self.space.prepare_send(data, info, flags)
    }
}

/// recvmsg(2) with a [`RecvHeader`].
///
/// # Errors
/// The recvmsg(2) errno.
pub fn recv_with(
    fd: RawFd,
    buf: &mut [u8],
    h: &mut RecvHeader,
) -> io::Result<(usize, i32, MsgInfo)> {
    let hdr = h.prepare(buf.as_mut_ptr(), buf.len());
    // SAFETY: the header points at `buf` and the header's control storage.
    let n = unsafe { libc::recvmsg(fd, hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (flags, info) = h.received();
    Ok((n as usize, flags, info))
}

/// sendmsg(2) with a [`SendHeader`].
///
/// # Errors
/// The sendmsg(2) errno.
pub fn send_with(
    fd: RawFd,
    data: &[u8],
    info: MsgInfo,
    flags: u16,
    h: &mut SendHeader,
) -> io::Result<usize> {
    let hdr = h.prepare(data, info, flags);
    // SAFETY: the header points at `data` and the header's control storage.
    let n = unsafe { libc::sendmsg(fd, hdr, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_linux_sctp_h() {
        assert_eq!(size_of::<InitMsg>(), 8);
        assert_eq!(size_of::<SndInfo>(), 16);
        assert_eq!(size_of::<RcvInfo>(), 28);
        assert_eq!(size_of::<PeeloffFlagsArg>(), 12);
        // SAFETY: arithmetic only.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RcvInfo>() as u32) } as usize;
        assert!(space <= RECV_CONTROL_WORDS * 8);
    }

    #[test]
    fn sndinfo_round_trips_through_the_control_parser() {
        let mut s = MsgSpace::new();
        let info = MsgInfo {
            stream: 7,
            ppid: 0x0102_0304,
            assoc: 42,
        };
        let hdr = s.prepare_send(b"x", info, 0);
        #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
        // SAFETY: reading the header we just built.
        let (ctl, len) = unsafe { ((*hdr).msg_control, (*hdr).msg_controllen as usize) };
        // SAFETY: the control storage is `len` bytes long.
        let bytes = unsafe { std::slice::from_raw_parts(ctl.cast::<u8>(), len) };
        // SAFETY: the buffer starts with the cmsghdr written by prepare_send.
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
    fn rcvinfo_is_found_and_garbage_is_not() {
        let hdr = size_of::<libc::cmsghdr>();
        let mut ctl = vec![0u8; 64];
        let c = libc::cmsghdr {
            cmsg_len: (hdr + size_of::<RcvInfo>()) as _,
            cmsg_level: IPPROTO_SCTP,
            cmsg_type: SCTP_RCVINFO,
        };
        let r = RcvInfo {
            rcv_sid: 3,
            rcv_ppid: 99,
            rcv_assoc_id: 5,
            ..Default::default()
        };
        // SAFETY: both writes fit inside the 64-byte vector.
        unsafe {
            std::ptr::write_unaligned(ctl.as_mut_ptr().cast(), c);
            std::ptr::write_unaligned(ctl[hdr..].as_mut_ptr().cast(), r);
        }
        assert_eq!(parse_rcvinfo(&ctl), Some(r));
        assert_eq!(parse_rcvinfo(&ctl[..hdr]), None);
        assert_eq!(parse_rcvinfo(&[0xff; 7]), None);
    }

    #[test]
    fn notifications_parse() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&SCTP_ASSOC_CHANGE.to_ne_bytes());
        b[8..10].copy_from_slice(&SCTP_COMM_LOST.to_ne_bytes());
        b[16..20].copy_from_slice(&9i32.to_ne_bytes());
        assert_eq!(
            Notification::parse(&b),
            Some(Notification::AssocChange {
                state: SCTP_COMM_LOST,
                assoc: 9
            })
        );
        assert_eq!(Notification::parse(&b[..10]), None);
        b[0..2].copy_from_slice(&SCTP_PEER_ADDR_CHANGE.to_ne_bytes());
        assert_eq!(
            Notification::parse(&b),
            Some(Notification::Other(SCTP_PEER_ADDR_CHANGE))
        );
    }
}
