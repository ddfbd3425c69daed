//! Shared helpers of the integration tests: namespaces made by the test, a ringress
//! process run from its binary with a config written by the test, and clients
//! whose sockets are created inside a namespace.
//!
//! Every resource is released by a Drop guard, also when a test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ringress::binder::{Binder, SocketSpec};
pub use ringress::netns::TempNetns;

/// The drivers every integration test runs against (epoll only in a build without
/// the `uring` feature).
#[cfg(feature = "uring")]
pub const DRIVERS: &[&str] = &["uring", "epoll"];
#[cfg(not(feature = "uring"))]
pub const DRIVERS: &[&str] = &["epoll"];

/// Defines `NAME_uring` and `NAME_epoll` tests calling `NAME(driver)`.
#[macro_export]
macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "uring")]
        mod uring { $( #[test] fn $name() { super::$name("uring") } )* }
        mod epoll { $( #[test] fn $name() { super::$name("epoll") } )* }
    };
}

/// Whether this machine lets us create namespaces (root). Tests that need them
/// fail loudly otherwise: they must not pass where they cannot run.
pub fn require_root() {
    assert!(
        ringress::procstat::has_cap_sys_admin(),
        "these tests create network namespaces: run them as root (CAP_SYS_ADMIN)"
    );
}

/// A namespace unique to this test process and `tag`.
pub fn netns(tag: &str) -> TempNetns {
    require_root();
    let name = format!("rgt-{tag}-{}", std::process::id());
    TempNetns::create(&name).unwrap_or_else(|e| panic!("creating netns {name}: {e}"))
}

/// A binder in the test process, for client sockets inside namespaces.
pub fn binder() -> &'static Binder {
    static B: OnceLock<Binder> = OnceLock::new();
    B.get_or_init(|| {
        // Tests open thousands of sockets: lift the soft fd limit to the hard one.
        let _ = ringress::procstat::raise_nofile_limit();
        Binder::start().expect("binder")
    })
}

/// A free TCP port on 127.0.0.1 in the root namespace (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to `addr` from inside `ns` (or the root namespace), blocking, with
/// 10 s read/write timeouts.
pub fn connect_in(ns: Option<&TempNetns>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let path = ns.map(|n| n.path());
    let label = ns.map_or("root".to_string(), |n| n.name().to_string());
    let fd = binder()
        .create(
            "test-client",
            path.as_deref(),
            &label,
            SocketSpec::TcpClient { family_of: addr },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .pop()
        .unwrap();
    let s = socket2::Socket::from(fd);
    s.set_nonblocking(false)?;
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s.into())
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ringress-test-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = PathBuf::from(p.to_string_lossy().replace([' ', '{', '}', ':', ','], ""));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ringress binary built by cargo for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringress")
}

/// A running `ringress run CONFIG`, killed on drop.
pub struct Ringress {
    pub child: Child,
    pub dir: TempDir,
    pub log: PathBuf,
}

impl Ringress {
    /// Writes `config` to a file and starts `ringress run` on it with `--io driver`;
    /// waits (up to 20 s) until it logs that it is running.
    pub fn start(tag: &str, driver: &str, config: &str) -> Ringress {
        Ringress::start_limited(tag, driver, config, None)
    }

    /// As [`Ringress::start`], with RLIMIT_NOFILE set to `nofile` in the server.
    pub fn start_limited(tag: &str, driver: &str, config: &str, nofile: Option<u64>) -> Ringress {
        Ringress::start_with(tag, driver, config, nofile, &[])
    }

    /// As [`Ringress::start`], with RLIMIT_NOFILE `nofile` and extra environment.
    pub fn start_with(
        tag: &str,
        driver: &str,
        config: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Ringress {
        Ringress::start_args(tag, driver, config, nofile, env, &[])
    }

    /// `ringress run CONFIG --io DRIVER --takeover PATH`: a binary upgrade of the
    /// ringress listening on takeover socket `path`; returns once the new process
    /// runs (the old one has then stopped accepting).
    pub fn start_takeover(tag: &str, driver: &str, config: &str, path: &Path) -> Ringress {
        let path = path.to_str().unwrap();
        Ringress::start_args(tag, driver, config, None, &[], &["--takeover", path])
    }

    /// As [`Ringress::start_with`], with `extra` arguments after `run CONFIG --io DRIVER`.
    pub fn start_args(
        tag: &str,
        driver: &str,
        config: &str,
        nofile: Option<u64>,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Ringress {
        use std::os::unix::process::CommandExt;
        let dir = TempDir::new(tag);
        let cfg = dir.0.join("ringress.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.0.join("stderr.log");
        let mut cmd = Command::new(bin());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .envs(env.iter().copied())
            .args(["run", cfg.to_str().unwrap(), "--io", driver])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ringress");
        let mut r = Ringress { child, dir, log };
        r.wait_running();
        r
    }

    /// Starts `ringress run` on `config` with `--io driver` and returns at once,
    /// without waiting for it to run. With `blocked`, the child starts with
    /// SIGINT, SIGTERM and SIGHUP already blocked (set before execve(2), which
    /// keeps the mask), as a supervisor would start it to close the window before
    /// ringress runs its first instruction.
    pub fn spawn(tag: &str, driver: &str, config: &str, blocked: bool) -> Ringress {
        let dir = TempDir::new(tag);
        let cfg = dir.0.join("ringress.toml");
        std::fs::write(&cfg, config).unwrap();
        Ringress::spawn_in(dir, driver, &cfg, blocked)
    }

    /// Starts `ringress run PATH --io driver` on a config the test provides (a
    /// FIFO, say) and returns at once.
    pub fn spawn_with_config_path(driver: &str, path: &Path) -> Ringress {
        Ringress::spawn_in(TempDir::new("path"), driver, path, false)
    }

    fn spawn_in(dir: TempDir, driver: &str, cfg: &Path, blocked: bool) -> Ringress {
        use std::os::unix::process::CommandExt;
        let log = dir.0.join("stderr.log");
        let mut cmd = Command::new(bin());
        if blocked {
            // SAFETY: sigemptyset, sigaddset and sigprocmask are async-signal-safe;
            // they run in the child before exec, on a local sigset_t.
            unsafe {
                cmd.pre_exec(|| {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                        libc::sigaddset(&mut set, sig);
                    }
                    if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["run", cfg.to_str().unwrap(), "--io", driver])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ringress");
        Ringress { child, dir, log }
    }

    /// Waits (up to 10 s, polling without sleeping) until the server's own code
    /// has blocked SIGINT, SIGTERM and SIGHUP: the process runs the ringress
    /// binary (/proc/PID/exe; before execve(2) the forked child may have every
    /// signal blocked for a moment) and its `SigBlk` mask in /proc/PID/status
    /// (proc(5)) holds them.
    pub fn wait_signals_blocked(&mut self) {
        let exe = std::fs::canonicalize(bin()).unwrap();
        let want: u64 = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
            .iter()
            .map(|&s| 1u64 << (s - 1))
            .sum();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
            let blk = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0);
            let execed =
                std::fs::read_link(format!("/proc/{}/exe", self.pid())).is_ok_and(|p| p == exe);
            if execed && blk & want == want {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "ringress exited with {st} before blocking signals:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ringress never blocked its signals"
            );
            std::thread::yield_now();
        }
    }

    /// Waits (up to 20 s) until the server logs that it is running; panics if it
    /// exits first.
    pub fn wait_running(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.stderr().contains("ringress running") {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "ringress exited with {st} before running:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ringress did not start:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the server was started with (rewrite it, then SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("ringress.toml")
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `secs` seconds until the server's log contains `needle` `times`
    /// times or more.
    pub fn wait_log(&self, needle: &str, times: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.stderr().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {times} times:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the admin endpoint at `addr`; returns (status, body).
    pub fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let status = all[9..12].parse().unwrap();
        let body = all
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn threads(&self) -> usize {
        ringress::procstat::threads(self.pid()).unwrap()
    }

    pub fn fds(&self) -> usize {
        ringress::procstat::open_fds(self.pid()).unwrap()
    }

    /// What the server's fds are, counted by kind ("socket", "anon_inode:[eventfd]",
    /// a path...), for failure messages.
    pub fn fd_kinds(&self) -> String {
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) {
            for e in dir.flatten() {
                let t = std::fs::read_link(e.path())
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let kind = if t.starts_with("socket:") {
                    "socket".to_string()
                } else {
                    t
                };
                *kinds.entry(kind).or_default() += 1;
            }
        }
        format!("{kinds:?}")
    }

    /// The server's open fds once the count holds still (three equal readings
    /// 100 ms apart, at most 5 s): a baseline not taken while a socket pool refills
    /// in the background (which, on one slow CPU under user-mode Linux, can take
    /// longer than a fixed pause).
    pub fn settled_fds(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.fds();
        let mut same = 0;
        while same < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.fds();
            same = if now == last { same + 1 } else { 0 };
            last = now;
        }
        last
    }

    /// CPU time (user + system) the server has used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Waits up to `secs` seconds for the server to exit by itself.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "ringress did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to 20 s for the exit status (open connections may
    /// delay the exit by up to `shutdown_timeout_ms`, 10 s by default).
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "ringress did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ringress {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The server's side of a failure: the tail of its log.
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- ringress log (last 80 lines) ---\n{}",
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ringress ARGS...` to completion; returns (exit code, stdout, stderr).
pub fn ringress_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Writes `data` and reads back as many bytes, on one thread each (so that a large
/// payload cannot deadlock on full socket buffers); returns what came back.
pub fn echo_roundtrip(s: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&owned).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    let mut r = s;
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

/// A deterministic, non-repeating-looking payload of `n` bytes.
pub fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether `path` exists (for leftover namespace checks).
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// A listening socket made inside `ns` (or the root namespace) by the test's binder.
pub fn listen_in(ns: Option<&TempNetns>, addr: SocketAddr, backlog: u32) -> TcpListener {
    let path = ns.map(|n| n.path());
    let label = ns.map_or("root".to_string(), |n| n.name().to_string());
    let fd = binder()
        .create(
            "test-upstream",
            path.as_deref(),
            &label,
            SocketSpec::TcpListeners {
                addr,
                backlog,
                count: 1,
                exclusive: false,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .unwrap();
    TcpListener::from(fd)
}

/// A test upstream server: accepts on a listener in a namespace and runs `handler`
/// for each connection on its own thread. Stops accepting on drop.
pub struct Upstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The address it listens on (the port the kernel chose for port 0).
    pub addr: SocketAddr,
}

impl Upstream {
    pub fn spawn<F>(ns: Option<&TempNetns>, addr: SocketAddr, handler: F) -> Upstream
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let l = listen_in(ns, addr, 4096);
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let (s2, a2) = (stop.clone(), accepted.clone());
        let handler = std::sync::Arc::new(handler);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((s, _)) => {
                        a2.fetch_add(1, Ordering::Relaxed);
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let h = handler.clone();
                        std::thread::spawn(move || h(s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Upstream {
            stop,
            thread: Some(thread),
            accepted,
            addr,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads until EOF or error; returns the bytes and the error that ended it, if any.
pub fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(e)),
        }
    }
}

/// A UDP socket made inside `ns` (or the root namespace), unbound, blocking, with a
/// 2 s read timeout.
pub fn udp_in(ns: Option<&TempNetns>, family_of: SocketAddr) -> std::net::UdpSocket {
    let path = ns.map(|n| n.path());
    let label = ns.map_or("root".to_string(), |n| n.name().to_string());
    let fd = binder()
        .create(
            "test-udp",
            path.as_deref(),
            &label,
            SocketSpec::UdpClients {
                family_of,
                count: 1,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .unwrap();
    let s = std::net::UdpSocket::from(fd);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// The value of metric `name` for listener `listener` (and error `kind`) in `s`.
pub fn sample(s: &prometheus_parse::Scrape, name: &str, listener: &str, kind: Option<&str>) -> f64 {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && x.labels.get("listener") == Some(listener)
                && kind.is_none_or(|k| x.labels.get("kind") == Some(k))
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name}{{listener={listener:?}}}"))
}

/// GET /metrics from the admin endpoint at `admin`, parsed by prometheus-parse
/// (an independent parser of the text format).
pub fn metrics(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (code, body) = Ringress::admin_get(admin, "/metrics");
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("metrics do not parse")
}

/// The value of metric `name` for listener `listener` from the admin endpoint.
pub fn scrape(admin: SocketAddr, name: &str, listener: &str, kind: Option<&str>) -> f64 {
    sample(&metrics(admin), name, listener, kind)
}
