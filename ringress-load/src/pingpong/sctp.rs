//! SCTP ping-pong: one association's whole messages (stream and PPID checked),
//! the notifications that end it, and the probe that fails fast.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringress::sctp::{self, Notification};

use super::{connect, Outcome, Worker};

/// Largest `--size` with `--sctp` (bytes): ringress's default `max_message_bytes`,
/// and it fits the send buffer [`ringress::sctp::SocketOpts::default`] asks for, so one sendmsg
/// takes a whole message.
pub(super) const MAX_MESSAGE: usize = 256 * 1024;

/// Why a notification (its bytes) ends the association, if it does: association
/// lost, shut down, or never set up.
fn ended(b: &[u8]) -> Option<&'static str> {
    match Notification::parse(b)? {
        Notification::AssocChange { state, .. } => match state {
            sctp::SCTP_COMM_LOST => Some("association lost (SCTP_COMM_LOST: aborted or timed out)"),
            sctp::SCTP_SHUTDOWN_COMP => Some("server shut the association down (SHUTDOWN_COMP)"),
            sctp::SCTP_CANT_STR_ASSOC => Some("association setup failed (SCTP_CANT_STR_ASSOC)"),
            _ => None,
        },
        Notification::Shutdown { .. } => Some("server shut the association down (shutdown event)"),
        Notification::Other(_) => None,
    }
}

/// Sets up one SCTP association to `addr` within 2 s and closes it again.
pub(super) fn probe(addr: SocketAddr) -> io::Result<()> {
    let s = connect(addr, true)?;
    // Not POLLOUT: an SCTP socket is writable while its association is being set
    // up. The COMM_UP notification makes it readable; a failure sets POLLERR.
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let give_up = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(e) = s.take_error()? {
            return Err(e);
        }
        if s.peer_addr().is_ok() {
            return Ok(());
        }
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no SCTP association within 2 s",
            ));
        }
        // SAFETY: one live pollfd; waits at most 50 ms.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(50) as libc::c_int) } > 0 {
            // Readable but not connected (a notification before COMM_UP?): no spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Worker {
    /// SCTP: sends the current message of running association `slot` (whole, one
    /// sendmsg), reads its echo until MSG_EOR and checks bytes, length, stream and
    /// PPID, and repeats until a call would block.
    pub(super) fn pump_sctp(&mut self, slot: usize) -> Outcome {
        let Some(c) = self.conns[slot].as_mut() else {
            return Outcome::Ok;
        };
        let fd = c.sock.as_raw_fd();
        let size = self.payload.len();
        loop {
            if c.wpos < size {
                match sctp::send(fd, &self.payload, c.info, 0, &mut self.send_hdr) {
                    Ok(n) if n == size => c.wpos = size,
                    Ok(n) => {
                        return Outcome::Failed(format!(
                            "sendmsg took {n} of a {size}-byte message"
                        ))
                    }
                    // No room in the send buffer: EPOLLOUT wakes us.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Ok,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Outcome::Failed(format!("sendmsg: {e}")),
                }
            }
            // Read the echo, piece by piece, up to MSG_EOR.
            loop {
                let (n, flags, info) = match sctp::recv(fd, &mut self.rbuf, &mut self.recv_hdr) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Ok,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Outcome::Failed(format!("recvmsg: {e}")),
                };
                if flags & sctp::MSG_NOTIFICATION != 0 {
                    if let Some(why) = ended(&self.rbuf[..n]) {
                        return Outcome::Failed(why.into());
                    }
                    continue;
                }
                if n == 0 {
                    return Outcome::Failed("server ended the association (recvmsg 0)".into());
                }
                if c.rpos + n > size || self.rbuf[..n] != self.payload[c.rpos..c.rpos + n] {
                    return Outcome::Failed(format!(
                        "echo differs from what was sent ({} bytes or more to a {size}-byte \
                         message, or other bytes)",
                        c.rpos + n
                    ));
                }
                c.rpos += n;
                if flags & libc::MSG_EOR == 0 {
                    continue;
                }
                if c.rpos != size {
                    return Outcome::Failed(format!(
                        "echo of {} bytes to a {size}-byte message",
                        c.rpos
                    ));
                }
                if (info.stream, info.ppid) != (c.info.stream, c.info.ppid) {
                    return Outcome::Failed(format!(
                        "echo on stream {} with PPID {:#x}, sent on stream {} with PPID {:#x}",
                        info.stream, info.ppid, c.info.stream, c.info.ppid
                    ));
                }
                break;
            }
            Worker::round_trip(c, &mut self.hist, &mut self.counters, self.measure_from);
            c.info.ppid = (c.info.ppid & !0xffff) | (c.info.ppid.wrapping_add(1) & 0xffff);
        }
    }
}
