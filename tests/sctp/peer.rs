//! SCTP peers for the tests: a client association made inside a namespace with
//! its own recvmsg/sendmsg headers, and an upstream that answers in a known way.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringress::binder::SocketSpec;
use ringress::sctp::{self, MsgInfo, Notification, RecvHeader, SendHeader, SocketOpts, Style};
use socket2::Socket;

use crate::common::*;

/// A port unlikely to be used by another test of this process.
pub fn port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    (20_000 + (std::process::id() as usize % 1000) * 40 + NEXT.fetch_add(1, Ordering::Relaxed))
        as u16
}

pub fn wait_fd(fd: i32, events: i16, secs: u64) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, (secs * 1000) as i32) };
    match r {
        1 => Ok(()),
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "poll timed out",
        )),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A one-to-one SCTP association to `addr` from inside `ns` (socket made by a
/// binder there), non-blocking, connected within 10 s.
pub fn sctp_connect(ns: Option<&TempNetns>, addr: SocketAddr) -> std::io::Result<Socket> {
    let path = ns.map(|n| n.path());
    let label = ns.map_or("root".to_string(), |n| n.name().to_string());
    let fd = binder()
        .create(
            "sctp-test-client",
            path.as_deref(),
            &label,
            SocketSpec::SctpClients {
                family_of: addr,
                count: 1,
                opts: SocketOpts::default(),
            },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .pop()
        .unwrap();
    let s = Socket::from(fd);
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            wait_fd(s.as_raw_fd(), libc::POLLOUT, 10)?;
            if let Some(e) = s.take_error()? {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    Ok(s)
}

/// A peer's SCTP socket and its recvmsg and sendmsg headers (made by the thread
/// that uses them: they are not `Send`).
pub struct Peer {
    pub s: Socket,
    recv_hdr: Box<RecvHeader>,
    send_hdr: Box<SendHeader>,
}

/// What [`Peer::recv`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Msg(Vec<u8>, MsgInfo),
    /// Graceful end (shutdown event, or recvmsg returned 0).
    Shutdown,
    /// The association was aborted (COMM_LOST, or ECONNRESET).
    Aborted,
}

impl Peer {
    pub fn new(s: Socket) -> Peer {
        Peer {
            s,
            recv_hdr: RecvHeader::new(),
            send_hdr: SendHeader::new(),
        }
    }

    pub fn send(&mut self, data: &[u8], stream: u16, ppid: u32) {
        let info = MsgInfo {
            stream,
            ppid,
            assoc: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match sctp::send(self.s.as_raw_fd(), data, info, 0, &mut self.send_hdr) {
                Ok(n) => {
                    assert_eq!(n, data.len(), "SCTP sends whole messages");
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    assert!(Instant::now() < deadline, "send stalled for 20 s");
                    let _ = wait_fd(self.s.as_raw_fd(), libc::POLLOUT, 1);
                }
                Err(e) => panic!("sctp send: {e}"),
            }
        }
    }

    /// The next whole message (or the end), within 20 s; notifications other than
    /// the end are skipped.
    pub fn recv(&mut self) -> Got {
        let mut whole = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match sctp::recv(self.s.as_raw_fd(), &mut buf, &mut self.recv_hdr) {
                Ok((0, _, _)) => return Got::Shutdown,
                Ok((n, flags, _)) if flags & sctp::MSG_NOTIFICATION != 0 => {
                    match Notification::parse(&buf[..n]) {
                        Some(Notification::AssocChange { state, .. })
                            if state == sctp::SCTP_COMM_LOST =>
                        {
                            return Got::Aborted
                        }
                        Some(Notification::AssocChange { state, .. })
                            if state == sctp::SCTP_SHUTDOWN_COMP =>
                        {
                            return Got::Shutdown
                        }
                        Some(Notification::Shutdown { .. }) => return Got::Shutdown,
                        _ => {}
                    }
                }
                Ok((n, flags, info)) => {
                    whole.extend_from_slice(&buf[..n]);
                    if flags & libc::MSG_EOR != 0 {
                        return Got::Msg(whole, info);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    assert!(Instant::now() < deadline, "no message for 20 s");
                    let _ = wait_fd(self.s.as_raw_fd(), libc::POLLIN, 1);
                }
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE)) =>
                {
                    return Got::Aborted
                }
                Err(e) => panic!("sctp recv: {e}"),
            }
        }
    }

    pub fn expect(&mut self, data: &[u8], stream: u16, ppid: u32) {
        match self.recv() {
            Got::Msg(d, info) => {
                assert_eq!(d.len(), data.len(), "message length");
                assert!(
                    d == data,
                    "message bytes differ: got {:?}.. want {:?}.. (stream {}, ppid {})",
                    &d[..d.len().min(8)],
                    &data[..data.len().min(8)],
                    info.stream,
                    info.ppid
                );
                assert_eq!((info.stream, info.ppid), (stream, ppid), "stream and PPID");
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// An SCTP upstream in `ns`: answers each message on stream+1 with PPID+1000 and
/// the bytes reversed; a message with PPID 999 makes it abort the association.
/// Records every (stream, PPID) it received and whether each association ended
/// with a clean shutdown.
pub struct SctpUpstream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub got: Arc<Mutex<Vec<(u16, u32, usize)>>>,
    pub clean_ends: Arc<AtomicUsize>,
}

impl SctpUpstream {
    pub fn spawn(ns: &TempNetns, addr: SocketAddr) -> SctpUpstream {
        let fd = binder()
            .create(
                "sctp-upstream",
                Some(&ns.path()),
                ns.name(),
                SocketSpec::SctpListeners {
                    addr,
                    backlog: 128,
                    count: 1,
                    style: Style::OneToOne,
                    opts: SocketOpts::default(),
                },
            )
            .unwrap()
            .pop()
            .unwrap();
        let l = Socket::from(fd);
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let clean_ends = Arc::new(AtomicUsize::new(0));
        let (s2, g2, c2) = (stop.clone(), got.clone(), clean_ends.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut handlers = Vec::new();
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((s, _)) => {
                        let (g, c) = (g2.clone(), c2.clone());
                        handlers.push(std::thread::spawn(move || {
                            let mut p = Peer::new(s);
                            loop {
                                match p.recv() {
                                    Got::Msg(d, info) => {
                                        g.lock().unwrap().push((info.stream, info.ppid, d.len()));
                                        if info.ppid == 999 {
                                            let _ = p.s.set_linger(Some(Duration::ZERO));
                                            return;
                                        }
                                        let back: Vec<u8> = d.iter().rev().copied().collect();
                                        p.send(&back, info.stream + 1, info.ppid + 1000);
                                    }
                                    Got::Shutdown => {
                                        c.fetch_add(1, Ordering::Relaxed);
                                        return;
                                    }
                                    Got::Aborted => return,
                                }
                            }
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        SctpUpstream {
            stop,
            thread: Some(thread),
            got,
            clean_ends,
        }
    }
}

impl Drop for SctpUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
