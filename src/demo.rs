//! `ringress demo`: the main job with no config file.
//!
//! Creates N namespaces (`ringress-demo-1..N`), serves a TCP echo listener on
//! 127.0.0.1:PORT in each of them and in the root namespace, drives traffic
//! through every listener with a built-in client whose sockets are made inside
//! each namespace by the binder, prints a table and the process figures, and
//! deletes the namespaces it created, also on Ctrl-C (SIGINT/SIGTERM) and on error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::binder::SocketSpec;
use crate::config::{Action, Config, IoChoice, ListenerConfig, Proto, Runtime};
use crate::netns::{NetnsRef, TempNetns};
use crate::server::Server;
use crate::{procstat, signals};

/// Options of `ringress demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Network namespaces to create (besides the root namespace), 0..=4096.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub namespaces: u32,
    /// How long to drive traffic, in seconds (every listener gets at least one round).
    #[arg(long, default_value_t = 3)]
    pub duration: u64,
    /// TCP port of the echo listeners (on 127.0.0.1 in every namespace).
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// I/O driver: uring, epoll or auto.
    #[arg(long, default_value = "auto")]
    pub io: IoChoice,
    /// Worker threads (default: online CPUs).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Connections per listener per round.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Bytes echoed per connection.
    #[arg(long, default_value_t = 16 * 1024)]
    pub bytes: usize,
}

#[derive(Default, Clone)]
struct Row {
    conns: u64,
    bytes: u64,
    ok: u64,
    failed: u64,
    last_error: Option<String>,
}

/// Runs the demo; the exit code is 0 when every connection echoed its bytes intact.
pub fn run(args: DemoArgs) -> ExitCode {
    if !procstat::has_cap_sys_admin() {
        eprintln!(
            "error: ringress demo creates network namespaces and enters them with setns(2): \
             it needs CAP_SYS_ADMIN (run it as root, e.g. with sudo)"
        );
        return ExitCode::from(77);
    }
    if let Err(e) = signals::block() {
        eprintln!("error: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    match run_inner(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &DemoArgs) -> Result<bool, String> {
    let started = Instant::now();
    // Dropped at the end of this function, whatever happens: deletes the namespaces.
    let mut namespaces: Vec<TempNetns> = Vec::with_capacity(args.namespaces as usize);
    for i in 1..=args.namespaces {
        if signals::wait(Duration::ZERO).is_some() {
            return Err("interrupted while creating namespaces".into());
        }
        let name = format!("ringress-demo-{i}");
        namespaces.push(TempNetns::create(&name).map_err(|e| format!("netns {name}: {e}"))?);
    }
    let ns_time = started.elapsed();

    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let mut labels: Vec<(Option<NetnsRef>, String)> = vec![(None, "root".into())];
    labels.extend(
        namespaces
            .iter()
            .map(|n| (Some(NetnsRef::Named(n.name().into())), n.name().to_string())),
    );
    let listeners = labels
        .iter()
        .enumerate()
        .map(|(i, (ns, label))| ListenerConfig {
            name: format!("echo-{label}"),
            netns: ns.clone(),
            proto: Proto::Tcp,
            listen: addr,
            action: Action::Echo,
            backlog: 1024,
            line: i + 1,
            netns_line: i + 1,
            max_datagram_bytes: crate::config::MAX_DATAGRAM_BYTES,
            sctp: Default::default(),
            idle_timeout_ms: crate::config::DEFAULT_IDLE_TIMEOUT_MS,
            max_connections: 0,
            shards: Default::default(),
        })
        .collect();
    let cfg = Config {
        source: "<demo>".into(),
        runtime: Runtime {
            workers: args.workers.unwrap_or_else(default_workers).max(1),
            io: args.io,
            ..Default::default()
        },
        listeners,
        ..Default::default()
    };
    let bind_start = Instant::now();
    let server = Server::start(&cfg, None).map_err(|e| e.to_string())?;
    let bind_time = bind_start.elapsed();
    println!(
        "ringress demo: {} listeners ({} namespaces + root) on {addr}, driver {}, {} workers; \
         namespaces created in {:.0} ms, listeners bound in {:.0} ms",
        server.listeners().count(),
        namespaces.len(),
        server.driver(),
        cfg.runtime.workers,
        ns_time.as_secs_f64() * 1e3,
        bind_time.as_secs_f64() * 1e3,
    );

    let payload: Vec<u8> = (0..args.bytes).map(|i| (i * 131 + 7) as u8).collect();
    let mut rows = vec![Row::default(); labels.len()];
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut interrupted = false;
    'rounds: loop {
        for (i, (_, label)) in labels.iter().enumerate() {
            if signals::wait(Duration::ZERO).is_some() {
                interrupted = true;
                break 'rounds;
            }
            let path = namespaces
                .get(i.wrapping_sub(1))
                .filter(|_| i > 0)
                .map(|n| n.path());
            for _ in 0..args.connections {
                let row = &mut rows[i];
                row.conns += 1;
                match echo_once(&server, path.as_deref(), label, addr, &payload) {
                    Ok(n) => {
                        row.ok += 1;
                        row.bytes += n as u64;
                    }
                    Err(e) => {
                        row.failed += 1;
                        row.last_error = Some(e);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }

    // Give workers a moment to see the last closes before reading the counters.
    std::thread::sleep(Duration::from_millis(50));
    let me = std::process::id();
    println!();
    println!(
        "{:<22} {:>7} {:>12} {:>7} {:>7}   {:>9} {:>12}",
        "namespace", "conns", "bytes", "ok", "failed", "accepted", "server-in"
    );
    let mut all_ok = !interrupted;
    for ((_, label), row) in labels.iter().zip(&rows) {
        let Some(l) = server.listener(&format!("echo-{label}")) else {
            continue;
        };
        println!(
            "{:<22} {:>7} {:>12} {:>7} {:>7}   {:>9} {:>12}",
            label,
            row.conns,
            row.bytes,
            row.ok,
            row.failed,
            l.shared.stats.accepted.load(Relaxed),
            l.shared.stats.bytes_in.load(Relaxed),
        );
        if let Some(e) = &row.last_error {
            println!("  last error: {e}");
        }
        all_ok &= row.failed == 0 && row.ok > 0;
    }
    println!();
    println!(
        "process {me}: {} OS threads ({} workers + binder + main), {} open fds, RSS {} KiB",
        procstat::threads(me).unwrap_or(0),
        cfg.runtime.workers,
        procstat::open_fds(me).unwrap_or(0),
        procstat::rss_kib(me).unwrap_or(0),
    );
    server.shutdown();
    drop(namespaces);
    if interrupted {
        println!("interrupted; namespaces removed");
    } else {
        println!(
            "{}; {} namespaces removed",
            if all_ok {
                "all echoes intact"
            } else {
                "FAILURES above"
            },
            args.namespaces
        );
    }
    Ok(all_ok)
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One connection from inside namespace `netns`: send `payload`, read it back,
/// half-close, expect EOF. Returns the bytes echoed.
fn echo_once(
    server: &Server,
    netns: Option<&std::path::Path>,
    label: &str,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<usize, String> {
    let fd = server
        .binder()
        .create(
            "demo-client",
            netns,
            label,
            SocketSpec::TcpClient { family_of: addr },
        )
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or("binder returned no socket")?;
    let sock = socket2::Socket::from(fd);
    let io = |what: &str, e: std::io::Error| format!("{what} {addr} from netns {label}: {e}");
    sock.set_nonblocking(false).map_err(|e| io("fcntl", e))?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(2))
        .map_err(|e| io("connect", e))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| io("setsockopt", e))?;
    let mut s: TcpStream = sock.into();
    s.write_all(payload).map_err(|e| io("write", e))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).map_err(|e| io("read", e))?;
    if back != payload {
        return Err(format!(
            "echo from {addr} in netns {label} differs from what was sent"
        ));
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| io("shutdown", e))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).map_err(|e| io("read", e))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes after the echo", rest.len()));
    }
    Ok(payload.len())
}
