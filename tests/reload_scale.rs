//! A reload of many listeners leaves the control loop responsive: with 2,000
//! listeners over 200 namespaces, /healthz answers within 100 ms while reloads
//! run, the thread count stays workers + 2, and a SIGTERM sent during a reload
//! ends the process with status 0. (The figure is 10,000 listeners over
//! 1,000 namespaces, measured by tools/bench; a fifth of it keeps the suite's
//! time on two CPUs and in the 6.1 guest.)

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Namespaces made for the test.
const NAMESPACES: usize = 200;
/// Listeners in each.
const PER_NS: usize = 10;
/// Longest /healthz answer allowed while a reload runs (ms).
const HEALTHZ_MS: u128 = 100;

/// `NAMESPACES` namespaces made with one `ip -batch`, deleted (the same way) when
/// dropped, also when the test fails.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(tag: &str) -> Namespaces {
        require_root();
        let names: Vec<String> = (0..NAMESPACES)
            .map(|i| format!("rgt-{tag}-{}-{i}", std::process::id()))
            .collect();
        // Owned before the batch runs: a batch that fails half-way is cleaned up.
        let ns = Namespaces(names);
        let batch: String = ns.0.iter().map(|n| format!("netns add {n}\n")).collect();
        ip_batch(&batch);
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let batch: String = self.0.iter().map(|n| format!("netns del {n}\n")).collect();
        // -force: go on past a name that is already gone.
        let _ = run_ip_batch(&batch);
    }
}

fn run_ip_batch(batch: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ip_batch(batch: &str) {
    let out = run_ip_batch(batch);
    assert!(
        out.status.success(),
        "ip -batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One worker, an admin endpoint, `PER_NS` echo listeners on 0.0.0.0 (no need
/// for lo to be up) in every namespace.
fn config(ns: &Namespaces, admin: u16) -> String {
    let mut c = format!("[runtime]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    for n in &ns.0 {
        for p in 0..PER_NS {
            c += &format!(
                "[[listener]]\nnetns = \"{n}\"\nlisten = \"0.0.0.0:{}\"\naction = \"echo\"\n",
                7000 + p
            );
        }
    }
    c
}

/// Polls /healthz every 5 ms until `stop`; returns the slowest answer (ms) and
/// how many were not 200.
fn poll_healthz(
    admin: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u128, usize, usize)> {
    std::thread::spawn(move || {
        let (mut worst, mut bad, mut n) = (0, 0, 0);
        while !stop.load(Relaxed) {
            let t0 = Instant::now();
            let (code, _) = Ringress::admin_get(admin, "/healthz");
            worst = worst.max(t0.elapsed().as_millis());
            bad += usize::from(code != 200);
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (worst, bad, n)
    })
}

#[test]
fn healthz_answers_during_a_large_reload_and_sigterm_ends_it() {
    let ns = Namespaces::create("rsc");
    let admin = free_port();
    let cfg = config(&ns, admin);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let r = Ringress::start("rsc", "epoll", &cfg);
    assert_eq!(r.threads(), 1 + 2, "workers + 2 threads at rest");
    // The fd table was grown once, before the binder started (growing a table
    // shared by threads waits for an RCU grace period per doubling).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", r.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let table = ringress::procstat::fd_table_size(r.pid()).unwrap();
    let want = ringress::procstat::FD_TABLE_MIN.min(soft);
    assert!(
        table >= want,
        "fd table of {table} slots, at least {want} reserved at start"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll_healthz(admin, stop.clone());
    std::thread::sleep(Duration::from_millis(100));
    for i in 1..=3 {
        r.signal(libc::SIGHUP);
        r.wait_log("config reloaded", i, 30);
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Relaxed);
    let (worst, bad, n) = poller.join().unwrap();
    eprintln!("{n} /healthz answers during 3 reloads, slowest {worst} ms");
    let log = r.stderr();
    assert!(
        log.contains(&format!("kept={}", NAMESPACES * PER_NS)),
        "{log}"
    );
    assert_eq!(bad, 0, "/healthz not 200 during reloads");
    assert!(n >= 5, "too few /healthz requests to tell: {n}");
    // The one-CPU 6.1 guest is ~10x slower than the host: a looser bound there.
    let limit = if std::env::var_os("INSIDE_UML").is_some() {
        4 * HEALTHZ_MS
    } else {
        HEALTHZ_MS
    };
    assert!(
        worst <= limit,
        "/healthz took {worst} ms during a reload of {} listeners (at most {limit})",
        NAMESPACES * PER_NS
    );
    // The reload thread is gone once the reload is applied.
    assert_eq!(r.threads(), 1 + 2, "workers + 2 threads after reloads");

    // A SIGTERM while a reload reads the file: the process shuts down, exit 0.
    let mut r = r;
    r.signal(libc::SIGHUP);
    r.wait_log("SIGHUP: reloading", 4, 10);
    r.signal(libc::SIGTERM);
    let t0 = Instant::now();
    // Acted on at once: the shutdown starts within a second.
    r.wait_log("shutting down", 1, 1);
    // Then every listener drains its queue (a SYN filter each, attached by the
    // binder) before the exit: 2,000 of them take well under a second here, but
    // up to the shutdown timeout (10 s) and the workers' grace in the one-CPU
    // 6.1 guest, whose filter attaches are far slower.
    let inside_uml = std::env::var_os("INSIDE_UML").is_some();
    let st = r.wait_exit(if inside_uml { 90 } else { 30 });
    assert!(st.success(), "exit status {st}: {}", r.stderr());
    let bound = Duration::from_secs(if inside_uml { 60 } else { 10 });
    assert!(
        t0.elapsed() < bound,
        "SIGTERM during a reload took {:?}",
        t0.elapsed()
    );
    let log = r.stderr();
    assert!(log.contains("shutting down"), "{log}");
    // Per-listener lines are bounded: 2,000 listeners bound and closed are a few
    // dozen info lines, and a count of the rest.
    for (line, summary) in [
        ("listener bound", "listeners bound:"),
        ("listener closed", "listeners closed:"),
    ] {
        let n = log
            .lines()
            .filter(|l| l.contains(" INFO ") && l.contains(line))
            .count();
        assert!(n <= 16, "{n} info lines \"{line}\" (at most 16)");
        assert!(log.contains(summary), "no \"{summary}\" summary");
    }
}
