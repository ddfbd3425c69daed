//! Paced UDP load (`--udp`): each load thread sends its share of the rate round
//! robin over its connected sockets on a timerfd schedule and checks and times the
//! replies; [`procnet`] reads the kernel's drop counters.

mod procnet;

use std::io::{self, Read};
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Protocol, Socket, Type};

use self::procnet::{listener_drops, snmp_delta, udp_snmp, udp_sockets};
use crate::histogram::Histogram;
use crate::{join_load, spawn_load, Args};

/// Bytes of the header every UDP datagram starts with: sequence number and send
/// time (ns since the run started), both little-endian u64.
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

/// Runs the paced UDP load described in the crate docs and prints its summary and
/// `RESULT` line; returns the exit code (2: bad arguments, 1: no echo to the probe,
/// a setup failure, or no reply at all).
pub(crate) fn run(args: &Args) -> ExitCode {
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
