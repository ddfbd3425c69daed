//! TCP and SCTP ping-pong (the default mode and `--sctp`): each load thread drives
//! its share of the connections (or associations) with one edge-triggered epoll
//! instance; [`tcp`] and [`sctp`] move the bytes of one connection.

mod sctp;
mod tcp;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use ringress::sctp::{MsgInfo, RecvHeader, SendHeader, SocketOpts, Style};
use socket2::{Domain, Protocol, Socket, Type};

use crate::histogram::Histogram;
use crate::{join_load, spawn_load, Args};

#[derive(Default)]
struct Counters {
    msgs: u64,
    errors: u64,
    connect_errors: u64,
    last_error: Option<String>,
}

enum Phase {
    Connecting,
    Running,
}

struct Conn {
    sock: Socket,
    phase: Phase,
    /// SCTP: the stream and PPID of the current message (see the module docs).
    info: MsgInfo,
    /// Bytes of the current message written.
    wpos: usize,
    /// Bytes of the current echo read.
    rpos: usize,
    started: Instant,
}

/// Starts a non-blocking connect to `addr`: TCP with TCP_NODELAY, or (with `sctp`)
/// a one-to-one SCTP association with [`ringress::sctp::socket`]'s settings.
fn connect(addr: SocketAddr, sctp: bool) -> io::Result<Socket> {
    let s = if sctp {
        ringress::sctp::socket(addr, Style::OneToOne, &SocketOpts::default())?
    } else {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        s
    };
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s)
}

const EVENTS: EpollFlags = EpollFlags::EPOLLIN
    .union(EpollFlags::EPOLLOUT)
    .union(EpollFlags::EPOLLRDHUP)
    .union(EpollFlags::EPOLLET);

struct Worker {
    args: Args,
    epoll: Epoll,
    conns: Vec<Option<Conn>>,
    payload: Vec<u8>,
    rbuf: Vec<u8>,
    hist: Histogram,
    counters: Counters,
    measure_from: Instant,
    /// Pending reconnects (slot indices).
    retry: Vec<usize>,
    /// The index (over all threads) of this worker's slot 0: slot + first = `i`.
    first: usize,
    /// SCTP: the msghdr, iovec and control room of the recvmsg and of the sendmsg
    /// in flight (each completes before the next, so one of each per thread; made
    /// by the load thread itself, as they are not `Send`).
    recv_hdr: Box<RecvHeader>,
    send_hdr: Box<SendHeader>,
}

/// What to do with a connection after driving it.
enum Outcome {
    Ok,
    Failed(String),
}

impl Worker {
    fn open(&mut self, slot: usize) {
        match connect(self.args.addr, self.args.sctp) {
            Ok(sock) => {
                let i = self.first + slot;
                if let Err(e) = self.epoll.add(&sock, EpollEvent::new(EVENTS, slot as u64)) {
                    self.fail_connect(slot, format!("epoll_ctl: {e}"));
                    return;
                }
                self.conns[slot] = Some(Conn {
                    sock,
                    phase: Phase::Connecting,
                    info: MsgInfo {
                        stream: (i % 8) as u16,
                        ppid: (i as u32) << 16,
                        assoc: 0,
                    },
                    wpos: 0,
                    rpos: 0,
                    started: Instant::now(),
                });
            }
            Err(e) => self.fail_connect(slot, format!("connect {}: {e}", self.args.addr)),
        }
    }

    fn fail_connect(&mut self, slot: usize, msg: String) {
        self.counters.errors += 1;
        self.counters.connect_errors += 1;
        self.counters.last_error = Some(msg);
        self.retry.push(slot);
    }

    /// Drives connection `slot` as far as it goes without blocking.
    fn drive(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        if let Phase::Connecting = c.phase {
            match c.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let msg = format!("connect {}: {e}", self.args.addr);
                    self.conns[slot] = None;
                    self.fail_connect(slot, msg);
                    return;
                }
            }
            // Not connected yet (spurious wake-up; for SCTP, e.g. writable while
            // the association is still being set up)?
            if c.sock.peer_addr().is_err() {
                return;
            }
            c.phase = Phase::Running;
            c.started = Instant::now();
        }
        let outcome = if self.args.sctp {
            self.pump_sctp(slot)
        } else {
            self.pump_tcp(slot)
        };
        if let Outcome::Failed(msg) = outcome {
            self.counters.errors += 1;
            self.counters.last_error = Some(msg);
            if let Some(c) = self.conns[slot].take() {
                let _ = self.epoll.delete(&c.sock);
            }
            self.retry.push(slot);
        }
    }

    /// Records the round trip connection `c` just completed (if it started after
    /// the warm-up) and starts its next message.
    fn round_trip(c: &mut Conn, hist: &mut Histogram, counters: &mut Counters, from: Instant) {
        let now = Instant::now();
        if c.started >= from {
            hist.record(now.duration_since(c.started).as_nanos() as u64);
            counters.msgs += 1;
        }
        c.started = now;
        c.wpos = 0;
        c.rpos = 0;
    }

    fn run(mut self, deadline: Instant) -> (Histogram, Counters) {
        for slot in 0..self.conns.len() {
            self.open(slot);
        }
        let mut events = vec![EpollEvent::empty(); 256];
        let mut last_retry = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = deadline - now;
            let timeout = left.as_millis().clamp(1, 50) as u16;
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    self.counters.errors += 1;
                    self.counters.last_error = Some(format!("epoll_wait: {e}"));
                    break;
                }
            };
            for ev in &events[..n] {
                self.drive(ev.data() as usize);
            }
            if !self.retry.is_empty() && last_retry.elapsed() >= Duration::from_millis(10) {
                last_retry = Instant::now();
                for slot in std::mem::take(&mut self.retry) {
                    self.open(slot);
                }
            }
        }
        (self.hist, self.counters)
    }
}

/// Runs the TCP (or, with `--sctp`, SCTP) ping-pong described in the crate docs
/// and prints its summary and `RESULT` line; returns the exit code (2: bad
/// arguments, 1: nothing listens or no round trip completed).
pub(crate) fn run(args: &Args) -> ExitCode {
    if args.sctp && args.size > sctp::MAX_MESSAGE {
        eprintln!(
            "error: with --sctp, --size must be at most {}",
            sctp::MAX_MESSAGE
        );
        return ExitCode::from(2);
    }
    // Fail fast with a clear message when nothing listens.
    let probe = if args.sctp {
        sctp::probe(args.addr)
    } else {
        TcpStream::connect_timeout(&args.addr, Duration::from_secs(2)).map(drop)
    };
    if let Err(e) = probe {
        let hint = if args.sctp && ringress::sctp::is_unsupported(&e) {
            " (this kernel has no SCTP: run it inside tools/uml-run, whose Linux 6.1 has it)"
        } else {
            ""
        };
        eprintln!("error: cannot connect to {}: {e}{hint}", args.addr);
        return ExitCode::FAILURE;
    }
    let threads = args.threads.min(args.connections);
    let payload: Vec<u8> = (0..args.size).map(|i| (i * 131 + 7) as u8).collect();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let deadline = measure_from + Duration::from_secs_f64(args.duration);
    let mut joins = Vec::new();
    let mut first = 0;
    for t in 0..threads {
        let share = args.connections / threads + usize::from(t < args.connections % threads);
        let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("error: epoll_create: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (args, payload) = (args.clone(), payload.clone());
        // The worker is made in its load thread (its SCTP headers are not `Send`).
        let work = move || {
            // SCTP: room for a whole notification too (they are < 200 bytes).
            let rbuf = vec![
                0u8;
                args.size
                    .clamp(if args.sctp { 1024 } else { 1 }, 256 * 1024)
            ];
            Worker {
                args,
                epoll,
                conns: (0..share).map(|_| None).collect(),
                payload,
                rbuf,
                hist: Histogram::new(),
                counters: Counters::default(),
                measure_from,
                retry: Vec::new(),
                first,
                recv_hdr: RecvHeader::new(),
                send_hdr: SendHeader::new(),
            }
            .run(deadline)
        };
        first += share;
        match spawn_load(t, work) {
            Ok(j) => joins.push(j),
            Err(code) => return code,
        }
    }
    let mut c = Counters::default();
    let hist = match join_load(joins, |k: Counters| {
        c.msgs += k.msgs;
        c.errors += k.errors;
        c.connect_errors += k.connect_errors;
        if k.last_error.is_some() {
            c.last_error = k.last_error;
        }
    }) {
        Ok(h) => h,
        Err(code) => return code,
    };
    let secs = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    let us = |ns: u64| ns as f64 / 1e3;
    let rps = c.msgs as f64 / secs;
    eprintln!(
        "ringress-load: {} {} x {} B to {} for {:.1} s on {} thread(s): {} round trips, \
         {:.0} msg/s, {:.1} MB/s each way; latency p50 {:.1} us, p99 {:.1} us, max {:.1} us; \
         {} errors ({} connect)",
        args.connections,
        if args.sctp {
            "SCTP associations"
        } else {
            "TCP conns"
        },
        args.size,
        args.addr,
        secs,
        threads,
        c.msgs,
        rps,
        rps * args.size as f64 / 1e6,
        us(hist.quantile(0.50)),
        us(hist.quantile(0.99)),
        us(hist.max),
        c.errors,
        c.connect_errors
    );
    if let Some(e) = &c.last_error {
        eprintln!("ringress-load: last error: {e}");
    }
    println!(
        "RESULT rps={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} errors={} msgs={} \
         conns={} size={} threads={} secs={:.2}",
        rps,
        us(hist.quantile(0.50)),
        us(hist.quantile(0.99)),
        us(hist.quantile(0.999)),
        us(hist.max),
        c.errors,
        c.msgs,
        args.connections,
        args.size,
        threads,
        secs
    );
    if c.msgs == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
