//! The `ringress` command line: `run`, `check`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use ringress::config::{Config, IoChoice, Proto};
use ringress::{control, demo, server::Server, signals};

/// ringress: an L4 ingress server for TCP, UDP and SCTP listeners in many network
/// namespaces, served by per-core io_uring rings (or epoll).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (or a tracing filter such as
    /// "ringress=debug"). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format: text (human) or json (one JSON object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the listeners of CONFIG until SIGINT or SIGTERM, then close them and exit 0.
    Run {
        /// Path to the TOML config.
        config: PathBuf,
        /// Override runtime.io: uring, epoll or auto.
        #[arg(long)]
        io: Option<IoChoice>,
        /// Override runtime.workers.
        #[arg(long)]
        workers: Option<usize>,
        /// Serve the other listeners when one needs a protocol this kernel lacks
        /// (SCTP without the sctp module); without it such a listener fails the start.
        #[arg(long)]
        skip_unavailable: bool,
        /// Binary upgrade: take the listening sockets of the ringress running with
        /// `[runtime] takeover_socket = PATH` (reusing those whose namespace,
        /// protocol and address match a listener of CONFIG), serve, then tell it to
        /// stop accepting and drain. Fails, binding nothing, if PATH does not answer.
        #[arg(long, value_name = "PATH")]
        takeover: Option<PathBuf>,
    },
    /// Validate CONFIG (syntax, keys, addresses, namespaces) and exit; non-zero on error.
    Check {
        /// Path to the TOML config.
        config: PathBuf,
    },
    /// Create N namespaces, serve a TCP echo listener in each and in the root
    /// namespace, drive traffic through all of them, print a report, clean up.
    Demo(demo::DemoArgs),
}

fn init_logs(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if format == "json" {
        b.json().init();
    } else {
        b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    let mut cfg = Config::load(path).map_err(|e| e.to_string())?;
    cfg.check_namespaces().map_err(|e| e.to_string())?;
    cfg.resolve_zones().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Blocks the handled signals before `main`, as early as a program can: from the
/// `.init_array` constructors, which the dynamic loader runs once the libraries
/// are loaded and relocated, before the Rust runtime's set-up and `main` (System V
/// gABI, "Initialization and Termination Functions"). A SIGHUP or SIGTERM sent
/// right after `fork`+`execve` then stays pending instead of ending the process
/// (see `signals`); `main` blocks them again and reports a failure.
#[used]
#[link_section = ".init_array"]
static BLOCK_SIGNALS_EARLY: extern "C" fn() = block_signals_early;

extern "C" fn block_signals_early() {
    let _ = signals::block();
}

fn main() -> ExitCode {
    // First of all, before the command line and the config are read: a SIGHUP or
    // SIGTERM sent while `run` starts up stays pending until the control loop
    // reads it, instead of ending the process (see `signals`).
    let blocked = signals::block();
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Check { .. }) {
        // `check` keeps the default dispositions, as it always had.
        let _ = signals::unblock();
    }
    init_logs(&cli.log_level, &cli.log_format);
    if !matches!(cli.cmd, Cmd::Check { .. }) {
        match ringress::procstat::raise_nofile_limit() {
            Ok(n) => tracing::debug!(nofile = n, "open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    match cli.cmd {
        Cmd::Check { config } => match load(&config).and_then(|cfg| {
            // `run` raises the soft limit to the hard one: that is what it gets.
            cfg.check_fd_limit(ringress::procstat::nofile_limits().1)?;
            Ok(cfg)
        }) {
            Ok(cfg) => {
                for w in cfg.warnings() {
                    eprintln!("warning: {w}");
                }
                // Valid, but `run` would refuse it here: say so now.
                if let Err(e) = ringress::sctp::available() {
                    for l in cfg.listeners.iter().filter(|l| l.proto == Proto::Sctp) {
                        eprintln!(
                            "warning: listener {}: this kernel has no SCTP support ({e}); \
                             `run` fails unless given --skip-unavailable",
                            l.name
                        );
                    }
                }
                println!(
                    "{}: ok ({} listener{})",
                    config.display(),
                    cfg.listeners.len(),
                    if cfg.listeners.len() == 1 { "" } else { "s" }
                );
                if let Some(p) = &cfg.runtime.takeover_socket {
                    println!(
                        "takeover socket: {} (binary upgrade: ringress run NEW.toml --takeover {})",
                        p.display(),
                        p.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run {
            config,
            io,
            workers,
            skip_unavailable,
            takeover,
        } => {
            let mut cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(w) = workers {
                cfg.runtime.workers = w.max(1);
            }
            if let Err(e) = cfg.check_fd_limit(ringress::procstat::nofile_limits().0) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            // Still one thread: grow the fd table once, for the listeners and the
            // first sessions, before growing it would wait for RCU grace periods.
            let want = (cfg.fds_needed() + 1024).max(ringress::procstat::FD_TABLE_MIN);
            match ringress::procstat::reserve_fd_table(want) {
                Ok(n) => tracing::debug!(slots = n, "fd table reserved"),
                Err(e) => tracing::debug!(error = %e, "fd table not reserved"),
            }
            // One `run` per config (ringress::instance); a takeover shares on purpose.
            let waiting_lock = match ringress::instance::acquire(&config) {
                Ok(Ok(lock)) => {
                    tracing::debug!(lock = %lock.path().display(), "instance lock taken");
                    lock.hold_until_exit();
                    None
                }
                Ok(Err(held)) if takeover.is_some() => Some(held),
                Ok(Err(held)) => {
                    let who = held
                        .pid
                        .map_or_else(|| "another process".to_string(), |p| format!("pid {p}"));
                    eprintln!(
                        "error: {} is already served by ringress {who} (instance lock {}); \
                         stop it first, or upgrade it with `ringress run --takeover`",
                        config.display(),
                        held.path.display()
                    );
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no instance lock: a second `run` of this config would not be refused");
                    None
                }
            };
            if let Err(e) = blocked {
                eprintln!("error: blocking signals: {e}");
                return ExitCode::FAILURE;
            }
            // Takeover: receive the running process's sockets before binding anything.
            let inherited = match &takeover {
                Some(path) => match ringress::takeover::receive(path) {
                    Ok(i) => Some(Arc::new(Mutex::new(i))),
                    Err(e) => {
                        eprintln!("error: takeover failed, nothing was bound: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => None,
            };
            let opts = ringress::server::StartOptions {
                skip_unavailable,
                inherited: inherited.clone(),
            };
            let server = match Server::start_with(&cfg, io, opts) {
                Ok(s) => s,
                Err(e) => {
                    // Dropping the received sockets and the connection abandons the
                    // takeover: the running process goes on serving.
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(i) = inherited {
                // The workers have taken their sockets once they answer this.
                let _ = server.export_listeners();
                let done = Arc::try_unwrap(i)
                    .map_err(|_| "the received sockets are still shared".to_string())
                    .and_then(|m| m.into_inner().map_err(|e| e.to_string()))
                    .and_then(|i| i.finish().map_err(|e| e.to_string()));
                if let Err(e) = done {
                    eprintln!("error: takeover failed: {e}");
                    server.shutdown();
                    return ExitCode::FAILURE;
                }
                // The old process has let go of the shared sockets: accept again, in
                // case a connection's wake-up went to its accept (Command::AcceptAgain).
                for w in server.workers() {
                    let _ = w.send(ringress::driver::Command::AcceptAgain);
                }
                // The old process holds the lock until it has drained and exits.
                if let Some(held) = waiting_lock {
                    held.take_over_when_free();
                }
            }
            match control::run(server, &config) {
                Ok(control::Exit::Clean) => ExitCode::SUCCESS,
                // A second signal: leave now, without waiting for the workers.
                Ok(control::Exit::Forced) => std::process::exit(130),
                Ok(control::Exit::WorkerFailed) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Demo(args) => demo::run(args),
    }
}
