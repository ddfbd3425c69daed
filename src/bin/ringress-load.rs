//! `ringress-load`: a TCP ping-pong load generator for echo servers.
//!
//! Every connection sends one message of `--size` bytes, waits until the whole
//! message has come back (and checks it), and sends the next one, until
//! `--duration` seconds have passed. Connections are spread over `--threads`
//! threads; each thread drives its connections with non-blocking sockets and one
//! edge-triggered epoll instance, so hundreds of connections need one thread.
//!
//! Output: a human summary on stderr and one machine-readable line on stdout:
//! `RESULT rps=... p50_us=... p99_us=... p999_us=... max_us=... errors=... msgs=...`
//! (`rps` is messages per second; latencies are round trips in microseconds).
//! A connection that fails (reset, EOF, wrong bytes, connect error) counts one
//! error and is reconnected.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// TCP ping-pong load against an echo server.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Address of the echo server.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: SocketAddr,
    /// Concurrent connections (in total, over all threads).
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
    /// Bytes of the current message written.
    wpos: usize,
    /// Bytes of the current echo read.
    rpos: usize,
    started: Instant,
}

fn connect(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
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
}

/// What to do with a connection after driving it.
enum Outcome {
    Ok,
    Failed(String),
}

impl Worker {
    fn open(&mut self, slot: usize) {
        match connect(self.args.addr) {
            Ok(sock) => {
                if let Err(e) = self.epoll.add(&sock, EpollEvent::new(EVENTS, slot as u64)) {
                    self.fail_connect(slot, format!("epoll_ctl: {e}"));
                    return;
                }
                self.conns[slot] = Some(Conn {
                    sock,
                    phase: Phase::Connecting,
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
        let size = self.payload.len();
        let mut outcome = Outcome::Ok;
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
            // Not connected yet (spurious wake-up)?
            if c.sock.peer_addr().is_err() {
                return;
            }
            c.phase = Phase::Running;
            c.started = Instant::now();
        }
        'conn: loop {
            // Write what is left of the message.
            while c.wpos < size {
                match (&c.sock).write(&self.payload[c.wpos..]) {
                    Ok(n) => c.wpos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        outcome = Outcome::Failed(format!("write: {e}"));
                        break 'conn;
                    }
                }
            }
            // Read the echo.
            loop {
                if c.rpos == size {
                    break;
                }
                let want = (size - c.rpos).min(self.rbuf.len());
                match (&c.sock).read(&mut self.rbuf[..want]) {
                    Ok(0) => {
                        outcome = Outcome::Failed("server closed the connection (EOF)".into());
                        break 'conn;
                    }
                    Ok(n) => {
                        if self.rbuf[..n] != self.payload[c.rpos..c.rpos + n] {
                            outcome = Outcome::Failed("echo differs from what was sent".into());
                            break 'conn;
                        }
                        c.rpos += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'conn,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        outcome = Outcome::Failed(format!("read: {e}"));
                        break 'conn;
                    }
                }
            }
            // A whole round trip: record it and start the next message at once.
            let now = Instant::now();
            if c.started >= self.measure_from {
                self.hist
                    .record(now.duration_since(c.started).as_nanos() as u64);
                self.counters.msgs += 1;
            }
            c.started = now;
            c.wpos = 0;
            c.rpos = 0;
        }
        if let Outcome::Failed(msg) = outcome {
            self.counters.errors += 1;
            self.counters.last_error = Some(msg);
            if let Some(c) = self.conns[slot].take() {
                let _ = self.epoll.delete(&c.sock);
            }
            self.retry.push(slot);
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
    // Fail fast with a clear message when nothing listens.
    if let Err(e) = TcpStream::connect_timeout(&args.addr, Duration::from_secs(2)) {
        eprintln!("error: cannot connect to {}: {e}", args.addr);
        return ExitCode::FAILURE;
    }
    let threads = args.threads.min(args.connections);
    let payload: Vec<u8> = (0..args.size).map(|i| (i * 131 + 7) as u8).collect();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let deadline = measure_from + Duration::from_secs_f64(args.duration);
    let mut joins = Vec::new();
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
            rbuf: vec![0u8; args.size.clamp(1, 256 * 1024)],
            hist: Histogram::new(),
            counters: Counters::default(),
            measure_from,
            retry: Vec::new(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || w.run(deadline));
        match spawned {
            Ok(j) => joins.push(j),
            Err(e) => {
                eprintln!("error: spawning thread: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut hist = Histogram::new();
    let mut c = Counters::default();
    for j in joins {
        match j.join() {
            Ok((h, k)) => {
                hist.merge(&h);
                c.msgs += k.msgs;
                c.errors += k.errors;
                c.connect_errors += k.connect_errors;
                if k.last_error.is_some() {
                    c.last_error = k.last_error;
                }
            }
            Err(_) => {
                eprintln!("error: a load thread panicked");
                return ExitCode::FAILURE;
            }
        }
    }
    let secs = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    let us = |ns: u64| ns as f64 / 1e3;
    let rps = c.msgs as f64 / secs;
    eprintln!(
        "ringress-load: {} conns x {} B to {} for {:.1} s on {} thread(s): {} round trips, \
         {:.0} msg/s, {:.1} MB/s each way; latency p50 {:.1} us, p99 {:.1} us, max {:.1} us; \
         {} errors ({} connect)",
        args.connections,
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
