//! `ringress-load`: a load generator for echo servers, TCP or SCTP ping-pong, or
//! paced UDP.
//!
//! **TCP** (the default): every connection sends one message of `--size` bytes,
//! waits until the whole message has come back (and checks it), and sends the next
//! one, until `--duration` seconds have passed. Connections are spread over
//! `--threads` threads; each thread drives its connections with non-blocking sockets
//! and one edge-triggered epoll instance, so hundreds of connections need one thread.
//! A connection that fails (reset, EOF, wrong bytes, connect error) counts one
//! error and is reconnected.
//!
//! **SCTP** (`--sctp`): the same ping-pong over `--connections` one-to-one SCTP
//! associations (SOCK_STREAM, [`ringress::sctp::socket`]: 16 streams, SCTP_NODELAY,
//! association and shutdown notifications). Connection `i` (0-based, counted over
//! all threads) sends each message whole with one sendmsg on stream `i % 8` with PPID
//! `(i << 16) | (n & 0xffff)`, `n` being its message counter; the echo is read with
//! recvmsg until MSG_EOR, and a round trip counts only if the echo has the same
//! bytes, the same length, the same stream and the same PPID (otherwise: one error,
//! the association is closed and made again). Notifications are skipped, except
//! those that end the association (COMM_LOST, SHUTDOWN_COMP, CANT_STR_ASSOC, a
//! shutdown event), which count as an error like recvmsg returning 0 (the server
//! ended the association), ECONNRESET or a failed association setup.
//!
//! **UDP** (`--udp`): `--connections` connected UDP sockets send datagrams of
//! `--size` bytes (at least 16) at a total of `--rate` datagrams per second, round
//! robin over the sockets, for `--duration` seconds. Sending is paced by a schedule
//! (datagram k is due at k / rate), woken by a timerfd every `--tick-us` (or every
//! 1 / rate, up to 1 ms); a generator that falls behind catches up by at most 2 ms
//! worth of datagrams and skips the rest (`skipped=`), so the rate is never
//! unbounded. Each datagram carries its sequence number and send time; replies are
//! read with non-blocking sockets and epoll, checked (length, bytes, sequence,
//! duplicates) and timed. After the last send it waits up to `--grace-ms` for late
//! replies; what is still unanswered is lost.
//!
//! Output: a human summary on stderr and one machine-readable line on stdout:
//! `RESULT rps=... p50_us=... p99_us=... p999_us=... max_us=... errors=... msgs=...`
//! (`rps` is messages per second, for UDP replies per second; latencies are round
//! trips in microseconds; `errors` counts failed connections or associations,
//! including connect errors, for UDP bad or failed datagrams). UDP adds `sent= received= loss_pct= offered_pps=
//! sent_pps= skipped=`; the drops the kernel counted (receive buffer full,
//! /proc/net/udp) at the server's sockets bound to the port of `--addr` and at ours,
//! `server_sock_drops= client_sock_drops=`; and the change of the namespace's UDP
//! counters in /proc/net/snmp over the run, `udp_rcvbuf_errors= udp_sndbuf_errors=
//! udp_in_errors=` (every socket of the namespace, other programs' included).

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use ringress::sctp::{self, MsgInfo, MsgSpace, Notification, SocketOpts, Style};
use socket2::{Domain, Protocol, Socket, Type};

/// TCP ping-pong load, SCTP ping-pong (`--sctp`) or paced UDP load (`--udp`), against
/// an echo server.
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    /// Address of the echo server.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: SocketAddr,
    /// Concurrent connections (in total, over all threads); with --sctp,
    /// associations; with --udp, sockets.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 64)]
    size: usize,
    /// How long to run, in seconds (fractions allowed).
    #[arg(long, short = 'd', default_value_t = 5.0)]
    duration: f64,
    /// Threads (each runs one epoll loop over its share of the connections).
    #[arg(long, short = 't', default_value_t = 1)]
    threads: usize,
    /// Seconds of warm-up before measuring (not counted).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// UDP: send paced datagrams instead of TCP ping-pong.
    #[arg(long, conflicts_with = "sctp")]
    udp: bool,
    /// SCTP: ping-pong whole messages over one-to-one SCTP associations (stream
    /// i % 8, PPID checked) instead of TCP.
    #[arg(long)]
    sctp: bool,
    /// UDP: datagrams per second, in total over all sockets and threads.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// UDP: how long to wait for replies after the last send (ms); later is lost.
    #[arg(long, default_value_t = 200)]
    grace_ms: u64,
    /// UDP: finest pacing tick (µs); the tick is 1 / rate per thread, between this and 1 ms.
    #[arg(long, default_value_t = 100)]
    tick_us: u64,
}

/// Runs `run` on a new thread named `load-T`.
///
/// # Errors
/// The thread could not be spawned (printed; the exit code to return).
fn spawn_load<R: Send + 'static>(
    t: usize,
    run: impl FnOnce() -> R + Send + 'static,
) -> Result<std::thread::JoinHandle<R>, ExitCode> {
    std::thread::Builder::new()
        .name(format!("load-{t}"))
        .spawn(run)
        .map_err(|e| {
            eprintln!("error: spawning thread: {e}");
            ExitCode::FAILURE
        })
}

/// Joins the load threads: merges their latency histograms and hands each
/// thread's counters to `add`.
///
/// # Errors
/// A load thread panicked (printed; the exit code to return).
fn join_load<C>(
    joins: Vec<std::thread::JoinHandle<(Histogram, C)>>,
    mut add: impl FnMut(C),
) -> Result<Histogram, ExitCode> {
    let mut hist = Histogram::new();
    for j in joins {
        let (h, k) = j.join().map_err(|_| {
            eprintln!("error: a load thread panicked");
            ExitCode::FAILURE
        })?;
        hist.merge(&h);
        add(k);
    }
    Ok(hist)
}

/// A log-linear latency histogram over nanoseconds: exact below 1024 ns, then 512
/// sub-buckets per power of two (relative error below 0.2 %).
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 9;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; (2 * SUB + 64 * SUB) as usize],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let top = v >> shift; // in [SUB, 2*SUB)
        (2 * SUB + (shift as u64 - 1) * SUB + (top - SUB)) as usize
    }

    /// The middle of bucket `i`, in ns.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = (i - 2 * SUB) / SUB + 1;
        let top = (i - 2 * SUB) % SUB + SUB;
        (top << shift) + (1u64 << shift) / 2
    }

    fn record(&mut self, ns: u64) {
        self.counts[Histogram::index(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// The `q` quantile (0..=1) in ns; 0 when empty.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Histogram::value(i).min(self.max);
            }
        }
        self.max
    }
}

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
/// a one-to-one SCTP association with [`sctp::socket`]'s settings.
fn connect(addr: SocketAddr, sctp: bool) -> io::Result<Socket> {
    let s = if sctp {
        sctp::socket(addr, Style::OneToOne, &SocketOpts::default())?
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
    /// SCTP: the msghdr, iovec and control room of the one sendmsg or recvmsg in
    /// flight (each completes before the next, so one per thread).
    space: Box<MsgSpace>,
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

    /// TCP: writes and reads running connection `slot` until it would block.
    fn pump_tcp(&mut self, slot: usize) -> Outcome {
        let Some(c) = self.conns[slot].as_mut() else {
            return Outcome::Ok;
        };
        let size = self.payload.len();
        loop {
            // Write what is left of the message.
            while c.wpos < size {
                match (&c.sock).write(&self.payload[c.wpos..]) {
                    Ok(n) => c.wpos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Outcome::Failed(format!("write: {e}")),
                }
            }
            // Read the echo.
            while c.rpos < size {
                let want = (size - c.rpos).min(self.rbuf.len());
                match (&c.sock).read(&mut self.rbuf[..want]) {
                    Ok(0) => {
                        return Outcome::Failed("server closed the connection (EOF)".into());
                    }
                    Ok(n) => {
                        if self.rbuf[..n] != self.payload[c.rpos..c.rpos + n] {
                            return Outcome::Failed("echo differs from what was sent".into());
                        }
                        c.rpos += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Ok,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Outcome::Failed(format!("read: {e}")),
                }
            }
            // A whole round trip: record it and start the next message at once.
            Worker::round_trip(c, &mut self.hist, &mut self.counters, self.measure_from);
        }
    }

    /// SCTP: sends the current message of running association `slot` (whole, one
    /// sendmsg), reads its echo until MSG_EOR and checks bytes, length, stream and
    /// PPID, and repeats until a call would block.
    fn pump_sctp(&mut self, slot: usize) -> Outcome {
        let Some(c) = self.conns[slot].as_mut() else {
            return Outcome::Ok;
        };
        let fd = c.sock.as_raw_fd();
        let size = self.payload.len();
        loop {
            if c.wpos < size {
                match sctp::send(fd, &self.payload, c.info, 0, &mut self.space) {
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
                let (n, flags, info) = match sctp::recv(fd, &mut self.rbuf, &mut self.space) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Ok,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Outcome::Failed(format!("recvmsg: {e}")),
                };
                if flags & sctp::MSG_NOTIFICATION != 0 {
                    if let Some(why) = sctp_ended(&self.rbuf[..n]) {
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

fn main() -> ExitCode {
    let args = Args::parse();
    if args.connections == 0 || args.size == 0 || args.threads == 0 {
        eprintln!("error: --connections, --size and --threads must be at least 1");
        return ExitCode::from(2);
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) || args.warmup < 0.0 {
        eprintln!("error: --duration must be > 0 and --warmup >= 0");
        return ExitCode::from(2);
    }
    if args.udp {
        return udp_main(&args);
    }
    if args.sctp && args.size > SCTP_MAX_MESSAGE {
        eprintln!("error: with --sctp, --size must be at most {SCTP_MAX_MESSAGE}");
        return ExitCode::from(2);
    }
    // Fail fast with a clear message when nothing listens.
    let probe = if args.sctp {
        sctp_probe(args.addr)
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
        let w = Worker {
            args: args.clone(),
            epoll,
            conns: (0..share).map(|_| None).collect(),
            payload: payload.clone(),
            // SCTP: room for a whole notification too (they are < 200 bytes).
            rbuf: vec![
                0u8;
                args.size
                    .clamp(if args.sctp { 1024 } else { 1 }, 256 * 1024)
            ],
            hist: Histogram::new(),
            counters: Counters::default(),
            measure_from,
            retry: Vec::new(),
            first,
            space: MsgSpace::new(),
        };
        first += share;
        match spawn_load(t, move || w.run(deadline)) {
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

// ---------------------------------------------------------------- UDP mode

/// Bytes of the header every UDP datagram starts with: sequence number and send
/// time (ns since the run started), both little-endian u64.
/// Largest `--size` with `--sctp` (bytes): ringress's default `max_message_bytes`,
/// and it fits the send buffer [`SocketOpts::default`] asks for, so one sendmsg
/// takes a whole message.
const SCTP_MAX_MESSAGE: usize = 256 * 1024;

/// Why a notification (its bytes) ends the association, if it does: association
/// lost, shut down, or never set up.
fn sctp_ended(b: &[u8]) -> Option<&'static str> {
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
fn sctp_probe(addr: SocketAddr) -> io::Result<()> {
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

const UDP_HEADER: usize = 16;
/// Catch-up limit of a late sender: at most this much of the schedule at once.
const UDP_MAX_BURST: Duration = Duration::from_millis(2);
/// epoll data of the pacing timer.
const TIMER_KEY: u64 = u64::MAX;

/// The byte at offset `i` (past the header) of datagram `seq` of socket `id`.
fn udp_byte(i: usize, seq: u64, id: u32) -> u8 {
    (i as u64)
        .wrapping_mul(131)
        .wrapping_add(seq.wrapping_mul(7))
        .wrapping_add(u64::from(id).wrapping_mul(13)) as u8
}

struct UdpSock {
    sock: Socket,
    id: u32,
    /// Sequence number of the next datagram.
    next_seq: u64,
    /// Datagrams below this sequence number were sent during the warm-up.
    warm: u64,
    /// One bit per sequence number: answered.
    seen: Vec<u64>,
}

#[derive(Default)]
struct UdpCounters {
    /// Datagrams sent in the measured window.
    sent: u64,
    /// Replies to datagrams of the measured window.
    received: u64,
    /// Datagrams sent in all (warm-up included), and replies to them.
    sent_all: u64,
    received_all: u64,
    /// Scheduled datagrams not sent: the generator fell behind by more than
    /// [`UDP_MAX_BURST`], or its own send buffer was full.
    skipped: u64,
    /// Datagrams the kernel dropped at our sockets (receive buffer full).
    client_drops: u64,
    errors: u64,
    last_error: Option<String>,
}

impl UdpCounters {
    fn error(&mut self, msg: String) {
        self.errors += 1;
        self.last_error = Some(msg);
    }
}

struct UdpWorker {
    epoll: Epoll,
    timer: OwnedFd,
    socks: Vec<UdpSock>,
    size: usize,
    /// Datagrams per second of this thread.
    rate: f64,
    start: Instant,
    measure_from: Instant,
    send_end: Instant,
    grace: Duration,
    /// Datagrams of the schedule dealt with so far (sent or skipped).
    issued: u64,
    /// Next socket to send on.
    rr: usize,
    out: Vec<u8>,
    buf: Vec<u8>,
    hist: Histogram,
    c: UdpCounters,
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Replies may come in bursts; keep client-side drops out of the figures: 4 MiB,
    // past net.core.rmem_max when we may (SO_RCVBUFFORCE needs CAP_NET_ADMIN).
    let want: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a valid int option value.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&want as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = s.set_recv_buffer_size(want as usize);
    }
    s.set_nonblocking(true)?;
    s.connect(&addr.into())?;
    Ok(s)
}

/// A periodic CLOCK_MONOTONIC timerfd (non-blocking), every `period`.
fn timer(period: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_timer(&fd, period)?;
    Ok(fd)
}

/// Arms `fd` to fire every `period` from now on (a zero period disarms it).
fn set_timer(fd: &OwnedFd, period: Duration) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: period.as_secs() as libc::time_t,
        tv_nsec: period.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: fd is a timerfd; spec is a valid itimerspec.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl UdpWorker {
    /// Sends what the schedule says is due by `now`.
    fn send_due(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let due = (elapsed * self.rate) as u64;
        let burst = ((UDP_MAX_BURST.as_secs_f64() * self.rate) as u64).max(1);
        if due > self.issued + burst {
            self.c.skipped += due - self.issued - burst;
            self.issued = due - burst;
        }
        let measuring = now >= self.measure_from;
        let ts = now.saturating_duration_since(self.start).as_nanos() as u64;
        while self.issued < due {
            self.issued += 1;
            let n = self.socks.len();
            let s = &mut self.socks[self.rr];
            self.rr = (self.rr + 1) % n;
            if measuring && s.warm == u64::MAX {
                s.warm = s.next_seq;
            }
            let seq = s.next_seq;
            self.out[..8].copy_from_slice(&seq.to_le_bytes());
            self.out[8..16].copy_from_slice(&ts.to_le_bytes());
            for (i, b) in self.out.iter_mut().enumerate().skip(UDP_HEADER) {
                *b = udp_byte(i, seq, s.id);
            }
            match s.sock.send(&self.out) {
                Ok(_) => {
                    s.next_seq += 1;
                    self.c.sent_all += 1;
                    if measuring {
                        self.c.sent += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.c.skipped += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.c.skipped += 1,
                Err(e) => self.c.error(format!("send: {e}")),
            }
        }
    }

    /// Reads and checks every reply waiting on socket `slot`.
    fn receive(&mut self, slot: usize) {
        let size = self.size;
        loop {
            let s = &mut self.socks[slot];
            let n = match (&s.sock).read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. ECONNREFUSED: an ICMP port unreachable came back.
                    self.c.error(format!("recv: {e}"));
                    continue;
                }
            };
            let now = Instant::now();
            let d = &self.buf[..n];
            if n != size {
                self.c
                    .error(format!("reply of {n} bytes to a {size}-byte datagram"));
                continue;
            }
            let seq = u64::from_le_bytes(d[..8].try_into().unwrap());
            let ts = u64::from_le_bytes(d[8..16].try_into().unwrap());
            if seq >= s.next_seq {
                self.c
                    .error(format!("reply with sequence number {seq}, never sent"));
                continue;
            }
            if d[UDP_HEADER..]
                .iter()
                .enumerate()
                .any(|(i, &b)| b != udp_byte(i + UDP_HEADER, seq, s.id))
            {
                self.c.error("reply differs from what was sent".into());
                continue;
            }
            let (word, bit) = ((seq / 64) as usize, seq % 64);
            if s.seen.len() <= word {
                s.seen.resize(word + 1, 0);
            }
            if s.seen[word] & (1 << bit) != 0 {
                self.c.error(format!("duplicate reply to datagram {seq}"));
                continue;
            }
            s.seen[word] |= 1 << bit;
            self.c.received_all += 1;
            if seq >= s.warm {
                self.c.received += 1;
                let sent_at = self.start + Duration::from_nanos(ts);
                self.hist
                    .record(now.saturating_duration_since(sent_at).as_nanos() as u64);
            }
        }
    }

    fn run(mut self) -> (Histogram, UdpCounters) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut sending = true;
        let grace_end = self.send_end + self.grace;
        loop {
            let now = Instant::now();
            if sending && now >= self.send_end {
                sending = false;
                if let Err(e) = set_timer(&self.timer, Duration::ZERO) {
                    self.c.error(format!("timerfd_settime: {e}"));
                }
            }
            if sending {
                self.send_due(now);
            } else if now >= grace_end || self.c.received_all >= self.c.sent_all {
                break;
            }
            let left = if sending {
                self.send_end - now
            } else {
                grace_end - now
            };
            let timeout = left.as_millis().clamp(1, 50) as u16;
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    self.c.error(format!("epoll_wait: {e}"));
                    break;
                }
            };
            for ev in &events[..n] {
                if ev.data() == TIMER_KEY {
                    let mut t = [0u8; 8];
                    // SAFETY: reads 8 bytes into a live 8-byte buffer.
                    unsafe { libc::read(self.timer.as_raw_fd(), t.as_mut_ptr().cast(), 8) };
                } else {
                    self.receive(ev.data() as usize);
                }
            }
        }
        // Drops of our own sockets (their receive buffers were full).
        let mine: Vec<u16> = self
            .socks
            .iter()
            .filter_map(|s| s.sock.local_addr().ok()?.as_socket().map(|a| a.port()))
            .collect();
        self.c.client_drops = udp_sockets()
            .iter()
            .filter(|(l, r, _)| mine.contains(l) && *r != 0)
            .map(|(_, _, d)| d)
            .sum();
        (self.hist, self.c)
    }
}

/// UDP sockets of this network namespace (/proc/net/udp and udp6): (local port,
/// remote port, drops) of each.
fn udp_sockets() -> Vec<(u16, u16, u64)> {
    let mut out = Vec::new();
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(l), Some(r), Some(d)) = (
                f.get(1).and_then(|a| port(a)),
                f.get(2).and_then(|a| port(a)),
                f.last().and_then(|d| d.parse().ok()),
            ) {
                out.push((l, r, d));
            }
        }
    }
    out
}

/// Drops of the unconnected sockets bound to `port` (the server's listeners).
fn listener_drops(port: u16) -> u64 {
    udp_sockets()
        .iter()
        .filter(|(l, r, _)| *l == port && *r == 0)
        .map(|(_, _, d)| d)
        .sum()
}

/// UDP counters of this network namespace (/proc/net/snmp), by name.
fn udp_snmp() -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return Vec::new();
    };
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn snmp_delta(before: &[(String, u64)], after: &[(String, u64)], key: &str) -> u64 {
    let get = |v: &[(String, u64)]| v.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n);
    get(after).saturating_sub(get(before))
}

/// Sends one datagram and waits up to 2 s for it to come back.
fn udp_probe(addr: SocketAddr, size: usize) -> Result<(), String> {
    let s = udp_socket(addr).map_err(|e| format!("socket for {addr}: {e}"))?;
    let probe: Vec<u8> = (0..size).map(|i| (i * 31 + 1) as u8).collect();
    let mut buf = vec![0u8; size + 1];
    let give_up = Instant::now() + Duration::from_secs(2);
    let mut last = String::from("no reply");
    while Instant::now() < give_up {
        if let Err(e) = s.send(&probe) {
            last = format!("send: {e}");
        }
        let again = Instant::now() + Duration::from_millis(200);
        while Instant::now() < again {
            match (&s).read(&mut buf) {
                Ok(n) if buf[..n] == probe[..] => return Ok(()),
                Ok(n) => last = format!("a {n}-byte reply that differs from the probe"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => last = format!("recv: {e}"),
            }
        }
    }
    Err(format!("no echo from {addr} within 2 s ({last})"))
}

fn udp_main(args: &Args) -> ExitCode {
    if args.size < UDP_HEADER || args.size > 65_507 {
        eprintln!("error: with --udp, --size must be between {UDP_HEADER} and 65507");
        return ExitCode::from(2);
    }
    if args.rate == 0 || args.rate > 10_000_000 || args.tick_us == 0 {
        eprintln!("error: --rate must be between 1 and 10000000, --tick-us at least 1");
        return ExitCode::from(2);
    }
    if let Err(e) = udp_probe(args.addr, args.size) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let threads = args.threads.min(args.connections);
    let snmp0 = udp_snmp();
    let server_drops0 = listener_drops(args.addr.port());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let send_end = measure_from + Duration::from_secs_f64(args.duration);
    let mut joins = Vec::new();
    let mut next_id = 0u32;
    for t in 0..threads {
        let share = args.connections / threads + usize::from(t < args.connections % threads);
        let rate = args.rate as f64 / threads as f64;
        let tick = Duration::from_secs_f64(1.0 / rate).clamp(
            Duration::from_micros(args.tick_us),
            Duration::from_millis(1).max(Duration::from_micros(args.tick_us)),
        );
        let setup = || -> io::Result<UdpWorker> {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            let timer = timer(tick)?;
            epoll.add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER_KEY))?;
            let mut socks = Vec::with_capacity(share);
            for slot in 0..share {
                let sock = udp_socket(args.addr)?;
                let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
                epoll.add(&sock, EpollEvent::new(flags, slot as u64))?;
                socks.push(UdpSock {
                    sock,
                    id: next_id + slot as u32,
                    next_seq: 0,
                    warm: if args.warmup > 0.0 { u64::MAX } else { 0 },
                    seen: Vec::new(),
                });
            }
            Ok(UdpWorker {
                epoll,
                timer,
                socks,
                size: args.size,
                rate,
                start,
                measure_from,
                send_end,
                grace: Duration::from_millis(args.grace_ms),
                issued: 0,
                rr: 0,
                out: vec![0u8; args.size],
                buf: vec![0u8; args.size + 1],
                hist: Histogram::new(),
                c: UdpCounters::default(),
            })
        };
        let w = match setup() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: setting up UDP sockets: {e}");
                return ExitCode::FAILURE;
            }
        };
        next_id += share as u32;
        match spawn_load(t, move || w.run()) {
            Ok(j) => joins.push(j),
            Err(code) => return code,
        }
    }
    let mut c = UdpCounters::default();
    let hist = match join_load(joins, |k: UdpCounters| {
        c.sent += k.sent;
        c.received += k.received;
        c.sent_all += k.sent_all;
        c.received_all += k.received_all;
        c.skipped += k.skipped;
        c.client_drops += k.client_drops;
        c.errors += k.errors;
        if k.last_error.is_some() {
            c.last_error = k.last_error;
        }
    }) {
        Ok(h) => h,
        Err(code) => return code,
    };
    let snmp1 = udp_snmp();
    let server_drops = listener_drops(args.addr.port()).saturating_sub(server_drops0);
    let secs = send_end
        .min(Instant::now())
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    let us = |ns: u64| ns as f64 / 1e3;
    let rps = c.received as f64 / secs;
    let lost = c.sent.saturating_sub(c.received);
    let loss_pct = if c.sent == 0 {
        0.0
    } else {
        100.0 * lost as f64 / c.sent as f64
    };
    let rcvbuf = snmp_delta(&snmp0, &snmp1, "RcvbufErrors");
    let sndbuf = snmp_delta(&snmp0, &snmp1, "SndbufErrors");
    let in_errors = snmp_delta(&snmp0, &snmp1, "InErrors");
    eprintln!(
        "ringress-load: UDP, {} sockets x {} B to {} at {} datagrams/s for {:.1} s on {} \
         thread(s): sent {} ({:.0}/s, {} skipped), {} replies ({:.0}/s), lost {} ({:.3} %) \
         after {} ms; latency p50 {:.1} us, p99 {:.1} us, max {:.1} us; {} errors; \
         dropped at the server's sockets on port {} {}, at ours {}; \
         namespace UDP RcvbufErrors +{}, SndbufErrors +{}, InErrors +{}",
        args.connections,
        args.size,
        args.addr,
        args.rate,
        secs,
        threads,
        c.sent,
        c.sent as f64 / secs,
        c.skipped,
        c.received,
        rps,
        lost,
        loss_pct,
        args.grace_ms,
        us(hist.quantile(0.50)),
        us(hist.quantile(0.99)),
        us(hist.max),
        c.errors,
        args.addr.port(),
        server_drops,
        c.client_drops,
        rcvbuf,
        sndbuf,
        in_errors
    );
    if let Some(e) = &c.last_error {
        eprintln!("ringress-load: last error: {e}");
    }
    println!(
        "RESULT rps={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} errors={} msgs={} \
         conns={} size={} threads={} secs={:.2} sent={} received={} loss_pct={:.3} \
         offered_pps={} sent_pps={:.0} skipped={} server_sock_drops={} client_sock_drops={} \
         udp_rcvbuf_errors={} udp_sndbuf_errors={} udp_in_errors={}",
        rps,
        us(hist.quantile(0.50)),
        us(hist.quantile(0.99)),
        us(hist.quantile(0.999)),
        us(hist.max),
        c.errors,
        c.received,
        args.connections,
        args.size,
        threads,
        secs,
        c.sent,
        c.received,
        loss_pct,
        args.rate,
        c.sent as f64 / secs,
        c.skipped,
        server_drops,
        c.client_drops,
        rcvbuf,
        sndbuf,
        in_errors
    );
    if c.received == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_buckets_round_trip() {
        for v in [0u64, 1, 1023, 1024, 1025, 5000, 123_456, 10_000_000_000] {
            let i = Histogram::index(v);
            let back = Histogram::value(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.005, "{v} -> {i} -> {back}");
        }
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01, "{p50}");
    }
}
