//! Running with fewer privileges, on both drivers: with no capability at all,
//! listeners in ringress's own namespace serve; one that needs a namespace switch
//! is refused with an error naming the capability. Namespace paths that name
//! something else (FIFO, device, socket, plain file, another namespace type) are
//! refused by `check` and `run` at once.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

both_drivers!(no_capabilities_serve_own_namespace_and_name_what_is_missing,);

/// `ringress run CFG --io DRIVER` as uid/gid 65534 with every capability dropped.
fn run_as_nobody(
    cfg: &std::path::Path,
    driver: &str,
    log: &std::path::Path,
) -> std::process::Child {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            bin(),
            "run",
            cfg.to_str().unwrap(),
            "--io",
            driver,
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)")
}

fn no_capabilities_serve_own_namespace_and_name_what_is_missing(driver: &str) {
    let dir = TempDir::new(&format!("nocap-{driver}"));
    let port = free_port();
    let own = dir.0.join("own.toml");
    std::fs::write(
        &own,
        format!(
            "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[[listener]]\nname = \"u\"\n\
             listen = \"127.0.0.1:{port}\"\naction = \"echo\"\n"
        ),
    )
    .unwrap();
    // The config must be readable by nobody.
    for p in [&dir.0, &own] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let log = dir.0.join("own.log");
    let mut child = run_as_nobody(&own, driver, &log);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains("ringress running") {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "ringress without capabilities exited with {st}:\n{}",
                text()
            );
        }
        assert!(Instant::now() < deadline, "did not start:\n{}", text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        echo_roundtrip(connect_in(None, addr).unwrap(), b"nobody"),
        b"nobody"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}:\n{}", text());

    // A listener in another namespace needs setns(2), so CAP_SYS_ADMIN.
    let ns = netns(&format!("nocap-{driver}"));
    let other = dir.0.join("ns.toml");
    std::fs::write(
        &other,
        format!(
            "[[listener]]\nname = \"inns\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             action = \"echo\"\n",
            ns.name()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let log2 = dir.0.join("ns.log");
    let mut child = run_as_nobody(&other, driver, &log2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running without CAP_SYS_ADMIN");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("listener inns: enter") && err.contains("needs CAP_SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn odd_namespace_paths_are_refused_at_once() {
    let dir = TempDir::new("nspaths");
    let fifo = dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let sock = dir.0.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let file = dir.0.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let port = free_port();
    let cases = [
        (fifo.to_str().unwrap().to_string(), "is a FIFO"),
        ("/dev/null".to_string(), "is a device"),
        (sock.to_str().unwrap().to_string(), "is a socket"),
        (
            file.to_str().unwrap().to_string(),
            "is not a namespace file",
        ),
        (
            "/proc/self/ns/uts".to_string(),
            "not of a network namespace",
        ),
    ];
    for (path, want) in cases {
        let cfg = dir.0.join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[listener]]\nname = \"a\"\nnetns = \"{path}\"\nlisten = \"127.0.0.1:{port}\"\n\
                 action = \"echo\"\n"
            ),
        )
        .unwrap();
        for cmd in ["check", "run"] {
            let t0 = Instant::now();
            let out = Command::new("timeout")
                .args(["5", bin(), cmd, cfg.to_str().unwrap()])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {path}: {err}");
            assert!(err.contains(want), "{cmd} {path}: {err}");
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "{cmd} {path} took {:?}",
                t0.elapsed()
            );
        }
    }
}
