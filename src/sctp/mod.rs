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
//!
//! Files: `mod.rs` holds the definitions (constants, `#[repr(C)]` structs,
//! [`MsgInfo`], [`Style`], [`SocketOpts`], notification and control-message
//! parsing); `sys.rs` makes the system calls ([`socket`], [`configure`],
//! [`peeloff`], [`recv`], [`send`]) and holds the header memory they use
//! ([`RecvHeader`], [`SendHeader`]).

mod sys;

use std::mem::size_of;

pub use self::sys::{
    available, configure, is_unsupported, peeloff, recv, send, set_autoclose, socket, RecvHeader,
    SendHeader,
};

/// `IPPROTO_SCTP` (132), the protocol number and the socket option level
/// (`SOL_SCTP`, linux/socket.h).
pub const IPPROTO_SCTP: libc::c_int = 132;
/// `SOL_SCTP` (linux/socket.h): `setsockopt` level of the options below.
pub const SOL_SCTP: libc::c_int = 132;

/// `SCTP_INITMSG` (2, Linux 2.6): [`InitMsg`], stream counts for new associations.
pub const SCTP_INITMSG: libc::c_int = 2;
/// `SCTP_NODELAY` (3, Linux 2.6): int, 1 turns Nagle-like bundling delay off.
pub const SCTP_NODELAY: libc::c_int = 3;
/// `SCTP_AUTOCLOSE` (4, Linux 2.6; RFC 6458 8.1.8): int seconds (0: off); a
/// one-to-many socket's associations idle that long are shut down gracefully.
/// Read when an association is set up: a change applies to later ones.
pub const SCTP_AUTOCLOSE: libc::c_int = 4;
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

/// Control-message room for one `SCTP_RCVINFO`, in 8-byte words (u64 storage keeps
/// it aligned for `cmsghdr`).
pub const RECV_CONTROL_WORDS: usize = 8;
/// Control-message room for one `SCTP_SNDINFO`, in 8-byte words.
pub const SEND_CONTROL_WORDS: usize = 5;

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
        // SAFETY: arithmetic only.
        let space = unsafe { libc::CMSG_SPACE(size_of::<SndInfo>() as u32) } as usize;
        assert!(space <= SEND_CONTROL_WORDS * 8);
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
