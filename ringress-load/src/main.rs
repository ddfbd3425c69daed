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
//!
//! Files: `main.rs` the command line and the load threads, [`histogram`] latency
//! quantiles, [`pingpong`] the TCP and SCTP modes, [`udp`] the UDP mode.

mod histogram;
mod pingpong;
mod udp;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use crate::histogram::Histogram;

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
        udp::run(&args)
    } else {
        pingpong::run(&args)
    }
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
