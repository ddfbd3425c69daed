//! Capabilities per thread, on both drivers: after start-up the workers
//! (`ringress-w*`) and the main thread hold none, the binder only what it needs
//! (capabilities(7) sets from /proc/PID/task/TID/status), and the server still
//! serves, reloads (SIGHUP adding a listener in a namespace) and follows a
//! namespace that appears (a glob template).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;

both_drivers!(threads_hold_only_what_they_need,);

/// CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_SYS_PTRACE (19) and
/// CAP_SYS_ADMIN (21), linux/capability.h: what the binder keeps
/// (`ringress::privs::BINDER_CAPS`).
const BINDER_MASK: u64 = (1 << 10) | (1 << 12) | (1 << 19) | (1 << 21);

/// (thread name, CapEff, CapPrm) of every thread of `pid`; the main thread (tid
/// = pid) is named "main".
fn thread_caps(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let e = e.unwrap();
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let main = e.file_name().to_str() == Some(pid.to_string().as_str());
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let hex = |k: &str| u64::from_str_radix(&field(k), 16).unwrap();
        let name = if main { "main".into() } else { field("Name:") };
        out.push((name, hex("CapEff:"), hex("CapPrm:")));
    }
    out.sort();
    out
}

/// Every thread is a worker, the binder or main, with the sets the model says
/// (io_uring's own io-wq threads, `iou-wrk-*`, are copies of a worker: none).
fn assert_caps(r: &Ringress, workers: usize, when: &str) {
    let threads = thread_caps(r.pid());
    let mut seen = (0, 0, 0);
    for (name, eff, prm) in &threads {
        if name.starts_with("iou-") {
            assert_eq!((*eff, *prm), (0, 0), "{when}: {name}: {threads:x?}");
        } else if name.starts_with("ringress-w") {
            seen.0 += 1;
            assert_eq!((*eff, *prm), (0, 0), "{when}: worker {name}: {threads:x?}");
        } else if name == "ringress-binder" {
            seen.1 += 1;
            assert_eq!(
                (*eff, *prm),
                (BINDER_MASK, BINDER_MASK),
                "{when}: binder: {threads:x?}"
            );
        } else {
            assert_eq!(name, "main", "{when}: an unexpected thread: {threads:x?}");
            seen.2 += 1;
            assert_eq!((*eff, *prm), (0, 0), "{when}: main thread: {threads:x?}");
        }
    }
    assert_eq!(seen, (workers, 1, 1), "{when}: {threads:x?}");
}

/// Echo through `addr` in `ns` works within `secs` seconds.
fn serves_within(ns: Option<&TempNetns>, addr: SocketAddr, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = connect_in(ns, addr) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(echo_roundtrip(s, b"caps"), b"caps");
            return;
        }
        assert!(Instant::now() < deadline, "{addr} not served");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn threads_hold_only_what_they_need(driver: &str) {
    require_root();
    // The process starts with every capability: the model is what takes them away.
    let pid = std::process::id();
    let glob = format!("rgt-capt{driver}-{pid}-*");
    let later = format!("capt{driver}-{pid}-x");
    let named = netns(&format!("capn{driver}"));
    let (p_own, p_tpl, p_new, admin) = (free_port(), free_port(), free_port(), free_port());
    let p_path = free_port();
    // A process in `named` holding every capability: its /proc/PID/ns/net opens
    // only with CAP_SYS_PTRACE (the binder's, not main's).
    let mut holder = std::process::Command::new("ip")
        .args(["netns", "exec", named.name(), "sleep", "60"])
        .spawn()
        .unwrap();
    let holder_ns = format!("/proc/{}/ns/net", holder.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&holder_ns).map(|m| m.ino()).ok()
        != std::fs::metadata(named.path()).map(|m| m.ino()).ok()
    {
        assert!(Instant::now() < deadline, "ip netns exec did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = format!(
        "[runtime]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listener]]\nname = \"own\"\nlisten = \"127.0.0.1:{p_own}\"\naction = \"echo\"\n\
         [[listener]]\nname = \"tpl\"\nnetns = \"{glob}\"\nlisten = \"127.0.0.1:{p_tpl}\"\n\
         action = \"echo\"\n"
    );
    let r = Ringress::start(&format!("caps-{driver}"), driver, &base);
    assert_caps(&r, 2, "after start");
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    serves_within(None, at(p_own), 5);

    // A namespace that appears is followed (the binder enters it).
    let appeared = netns(&later);
    serves_within(Some(&appeared), at(p_tpl), 10);

    // A reload adds a listener in a namespace.
    std::fs::write(
        r.config_path(),
        format!(
            "{base}[[listener]]\nname = \"new\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{p_new}\"\n\
             action = \"echo\"\n[[listener]]\nname = \"path\"\nnetns = \"{holder_ns}\"\n\
             listen = \"127.0.0.1:{p_path}\"\naction = \"echo\"\n",
            named.name()
        ),
    )
    .unwrap();
    r.signal(libc::SIGHUP);
    r.wait_log("config reloaded", 1, 10);
    serves_within(Some(&named), at(p_new), 5);
    serves_within(Some(&named), at(p_path), 5);
    let (code, body) = Ringress::admin_get(at(admin), "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_caps(&r, 2, "after a reload and a new namespace");
    let st = r.stop();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(st.success(), "{st}");
}
