//! The command line on bad input, the binder's namespace discipline, and the demo.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ringress::binder::SocketSpec;
use ringress::netns;

both_drivers!(
    bad_input_is_named_and_leaves_nothing_open,
    port_in_use_closes_earlier_listeners
);

fn write_cfg(dir: &TempDir, text: &str) -> String {
    let p = dir.0.join("bad.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// `check` and `run` both fail, non-zero, with a message holding every `needles`.
fn assert_rejected(driver: &str, path: &str, needles: &[&str]) {
    for args in [vec!["check", path], vec!["run", path, "--io", driver]] {
        let (code, _out, err) = ringress_cmd(&args);
        assert_ne!(code, 0, "`ringress {args:?}` succeeded on bad input");
        for n in needles {
            assert!(err.contains(n), "`ringress {args:?}`: {n:?} not in:\n{err}");
        }
    }
}

fn bad_input_is_named_and_leaves_nothing_open(driver: &str) {
    let dir = TempDir::new(&format!("bad-{driver}"));
    let port = free_port();
    let missing = format!("rgt-missing-{}", std::process::id());
    // A namespace that does not exist: file, line, listener and key are named.
    let p = write_cfg(
        &dir,
        &format!(
            "[[listener]]\nname = \"ok\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n\n\
             [[listener]]\nname = \"lost\"\nnetns = \"{missing}\"\nlisten = \"127.0.0.1:1\"\naction = \"echo\"\n"
        ),
    );
    assert_rejected(driver, &p, &["bad.toml:", "lost", "netns", &missing]);
    // Nothing was left listening by the failed run.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // Malformed TOML names the line.
    let p = write_cfg(&dir, "[[listener]]\nname = \"x\nlisten = 1\n");
    assert_rejected(driver, &p, &["bad.toml:2"]);

    // An unknown action names the key.
    let p = write_cfg(
        &dir,
        "[[listener]]\nname = \"weird\"\nlisten = \"127.0.0.1:1\"\naction = \"teleport\"\n",
    );
    assert_rejected(driver, &p, &["bad.toml:4", "action", "teleport"]);

    // An unknown key, a bad address, and respond without `respond`.
    let p = write_cfg(&dir, "[runtime]\nwrkers = 2\n");
    assert_rejected(driver, &p, &["bad.toml:2", "wrkers"]);
    let p = write_cfg(
        &dir,
        "[[listener]]\nname = \"a\"\nlisten = \"1.2.3:80\"\naction = \"echo\"\n",
    );
    assert_rejected(driver, &p, &["bad.toml:3", "listen", "1.2.3:80"]);
    let p = write_cfg(
        &dir,
        "[[listener]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\naction = \"respond\"\n",
    );
    assert_rejected(driver, &p, &["bad.toml:", "\"r\"", "respond"]);
    // A missing file.
    assert_rejected(
        driver,
        "/nonexistent/ringress.toml",
        &["/nonexistent/ringress.toml"],
    );
}

fn port_in_use_closes_earlier_listeners(driver: &str) {
    let dir = TempDir::new(&format!("inuse-{driver}"));
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let first = free_port();
    let p = write_cfg(
        &dir,
        &format!(
            "[[listener]]\nname = \"first\"\nlisten = \"127.0.0.1:{first}\"\naction = \"echo\"\n\n\
             [[listener]]\nname = \"alpha\"\nlisten = \"127.0.0.1:{busy_port}\"\naction = \"echo\"\n"
        ),
    );
    let (code, _, err) = ringress_cmd(&["run", &p, "--io", driver]);
    assert_ne!(code, 0);
    let want = format!("listener alpha: bind 127.0.0.1:{busy_port} in netns root: ");
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    assert!(err.contains("os error 98"), "{err}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", first)).is_err(),
        "listener `first` was left open"
    );
    // `check` validates the file and the namespaces; a port in use is only seen at run.
    let (code, out, _) = ringress_cmd(&["check", &p]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn binder_returns_to_root_after_every_request() {
    require_root();
    let ns = netns("binder");
    let b = ringress::binder::Binder::start().unwrap();
    let root = netns::current_netns_inode().unwrap();
    assert_eq!(b.root_inode(), root);
    let addr: SocketAddr = "127.0.0.1:7400".parse().unwrap();
    let listeners = b
        .create(
            "in-ns",
            Some(&ns.path()),
            ns.name(),
            SocketSpec::TcpListeners {
                addr,
                backlog: 128,
                count: 2,
                exclusive: false,
            },
        )
        .unwrap();
    assert_eq!(netns::thread_netns_inode(b.tid()).unwrap(), root);
    // The listener lives in the namespace: not reachable from the root one...
    assert!(std::net::TcpStream::connect(addr).is_err());
    // ...but from a client socket the binder makes in the namespace.
    for i in 0..50 {
        let c = connect_in(Some(&ns), addr);
        assert!(c.is_ok(), "request {i}: {c:?}");
        // A request that fails inside the namespace (no such local address there:
        // EADDRNOTAVAIL) must return to the root namespace as well.
        let e = b
            .create(
                "x",
                Some(&ns.path()),
                ns.name(),
                SocketSpec::TcpListeners {
                    addr: "192.0.2.1:7400".parse().unwrap(),
                    backlog: 1,
                    count: 1,
                    exclusive: false,
                },
            )
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::EADDRNOTAVAIL), "{e}");
        assert_eq!(netns::thread_netns_inode(b.tid()).unwrap(), root);
        let fds = b.create(
            "c",
            Some(&ns.path()),
            ns.name(),
            SocketSpec::TcpClient { family_of: addr },
        );
        assert!(fds.is_ok());
        assert_eq!(
            netns::thread_netns_inode(b.tid()).unwrap(),
            root,
            "binder thread left outside the root namespace after request {i}"
        );
    }
    drop(listeners);
}

#[test]
fn demo_runs_and_cleans_up() {
    require_root();
    // One test runs both drivers in turn: the demo's namespace names are fixed.
    for &driver in DRIVERS {
        let port = free_port().to_string();
        let (code, out, err) = ringress_cmd(&[
            "demo",
            "--namespaces",
            "3",
            "--duration",
            "1",
            "--port",
            &port,
            "--io",
            driver,
        ]);
        assert_eq!(code, 0, "demo on {driver} failed:\n{out}\n{err}");
        assert!(out.contains("all echoes intact"), "{out}");
        for i in 1..=3 {
            let p = std::path::PathBuf::from(format!("/run/netns/ringress-demo-{i}"));
            assert!(!exists(&p), "demo left {p:?} behind");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
