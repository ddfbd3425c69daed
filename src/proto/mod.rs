//! Per-connection protocol logic, written once for every driver.
//!
//! A [`Session`] never performs I/O. The driver reports what an operation did
//! ([`Completion`]: received bytes, end of stream, bytes sent, an errno), and the
//! session answers by filling in a [`ConnIo`]: bytes to send, whether it wants
//! another receive, whether to close. The io_uring driver turns those requests
//! into SQEs, the epoll driver into non-blocking syscalls; neither knows what
//! echo, respond or http mean. See [`crate::driver`] for the driver side.

mod http;

use crate::config::Action;
pub use http::HttpSession;

/// Largest number of bytes a session lets wait in its send queue before it stops
/// asking for more input (back-pressure toward a client that does not read).
pub const SEND_WINDOW: usize = 256 * 1024;

/// What one finished operation on a connection produced.
#[derive(Debug)]
pub enum Completion<'a> {
    /// A receive returned these bytes (never empty).
    Recv(&'a [u8]),
    /// A receive returned 0: the peer shut down its write side (FIN).
    Eof,
    /// Bytes from the send queue were accepted by the kernel (count in bytes).
    Sent(usize),
    /// An operation failed with this errno (for example ECONNRESET, EPIPE).
    Error(i32),
}

/// The requests a session makes of its driver, and the send queue.
///
/// The driver owns one per connection, hands it to the session with each
/// completion, and acts on it afterwards: it sends queued bytes (completing short
/// sends itself), arms one receive when [`ConnIo::recv`] was called, and closes the
/// connection after the queue drains when [`ConnIo::close`] was called.
#[derive(Debug, Default)]
pub struct ConnIo {
    /// Bytes queued by the session and not yet handed to the kernel.
    pub(crate) out: Vec<u8>,
    /// Bytes handed to the kernel and not yet reported sent (maintained by the driver).
    pub(crate) in_flight: usize,
    /// The session wants one more receive completion.
    pub(crate) want_recv: bool,
    /// Close once `out` is empty and nothing is in flight.
    pub(crate) close: bool,
    /// Shut down the write side (send FIN) once `out` is empty and nothing is in flight.
    pub(crate) shutdown_write: bool,
}

impl ConnIo {
    /// Queues `data` to be sent after everything queued before it.
    pub fn send(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }

    /// Asks for one more receive completion (idempotent until it arrives).
    pub fn recv(&mut self) {
        self.want_recv = true;
    }

    /// Closes the connection once every queued byte has been sent.
    pub fn close(&mut self) {
        self.close = true;
        self.want_recv = false;
    }

    /// Sends FIN once every queued byte has been sent; receiving may go on.
    pub fn shutdown_write(&mut self) {
        self.shutdown_write = true;
    }

    /// Bytes queued or in flight, not yet reported sent.
    pub fn unsent(&self) -> usize {
        self.out.len() + self.in_flight
    }
}

/// The per-connection state machine of one action.
#[derive(Debug)]
pub enum Session {
    /// Every byte received is sent back; EOF closes after the echo drains.
    Echo,
    /// Fixed bytes are written once, then the write side is shut down; input is
    /// read and discarded until EOF (so that closing does not reset the peer).
    Respond {
        /// Input discarded so far, in bytes; past [`RESPOND_DISCARD_LIMIT`] we close.
        discarded: usize,
    },
    /// A fixed `200 OK` per HTTP/1.x request, keep-alive and pipelining honoured.
    Http(HttpSession),
}

/// How much input a `respond` session reads and discards before closing anyway (bytes).
pub const RESPOND_DISCARD_LIMIT: usize = 64 * 1024;

impl Session {
    /// A fresh session for `action`.
    pub fn new(action: &Action) -> Session {
        match action {
            Action::Echo => Session::Echo,
            Action::Respond(_) => Session::Respond { discarded: 0 },
            Action::Http => Session::Http(HttpSession::default()),
        }
    }

    /// Called once, right after the connection is accepted.
    pub fn on_open(&mut self, action: &Action, io: &mut ConnIo) {
        match self {
            Session::Echo | Session::Http(_) => io.recv(),
            Session::Respond { .. } => {
                if let Action::Respond(bytes) = action {
                    io.send(bytes);
                }
                io.shutdown_write();
                io.recv();
            }
        }
    }

    /// Called for every completion on this connection.
    pub fn on_complete(&mut self, c: Completion<'_>, io: &mut ConnIo) {
        match c {
            Completion::Error(_) => {
                // The driver closes on error; nothing to flush.
                io.out.clear();
                io.close();
                return;
            }
            Completion::Eof => {
                io.close();
                return;
            }
            _ => {}
        }
        match self {
            Session::Echo => match c {
                Completion::Recv(data) => {
                    io.send(data);
                    if io.unsent() < SEND_WINDOW {
                        io.recv();
                    }
                }
                Completion::Sent(_) => resume_below_window(io),
                _ => {}
            },
            Session::Respond { discarded } => {
                if let Completion::Recv(data) = c {
                    *discarded += data.len();
                    if *discarded > RESPOND_DISCARD_LIMIT {
                        io.close();
                    } else {
                        io.recv();
                    }
                }
            }
            Session::Http(h) => match c {
                Completion::Recv(data) => {
                    h.on_input(data, io);
                    if !io.close && io.unsent() < SEND_WINDOW {
                        io.recv();
                    }
                }
                Completion::Sent(_) => resume_below_window(io),
                _ => {}
            },
        }
    }
}

/// Re-arms receiving once the send queue has drained below the window.
fn resume_below_window(io: &mut ConnIo) {
    if !io.close && io.unsent() < SEND_WINDOW {
        io.recv();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_stops_reading_above_window_and_resumes() {
        let mut s = Session::new(&Action::Echo);
        let mut io = ConnIo::default();
        s.on_open(&Action::Echo, &mut io);
        assert!(io.want_recv);
        io.want_recv = false;
        let big = vec![7u8; SEND_WINDOW];
        s.on_complete(Completion::Recv(&big), &mut io);
        assert!(!io.want_recv, "must not read while the window is full");
        assert_eq!(io.out.len(), SEND_WINDOW);
        // The driver hands the bytes to the kernel, which takes them all.
        io.in_flight = io.out.len();
        io.out.clear();
        io.in_flight = 0;
        s.on_complete(Completion::Sent(SEND_WINDOW), &mut io);
        assert!(io.want_recv);
    }

    #[test]
    fn respond_writes_then_half_closes() {
        let a = Action::Respond(b"ack".to_vec());
        let mut s = Session::new(&a);
        let mut io = ConnIo::default();
        s.on_open(&a, &mut io);
        assert_eq!(io.out, b"ack");
        assert!(io.shutdown_write && io.want_recv && !io.close);
        s.on_complete(Completion::Eof, &mut io);
        assert!(io.close);
    }

    #[test]
    fn error_drops_queue_and_closes() {
        let mut s = Session::new(&Action::Echo);
        let mut io = ConnIo::default();
        io.send(b"x");
        s.on_complete(Completion::Error(libc::ECONNRESET), &mut io);
        assert!(io.close && io.out.is_empty());
    }
}
