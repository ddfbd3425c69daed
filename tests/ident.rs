//! Namespace identity, not spelling: a namespace named `X`, `/run/netns/X`, by a
//! bind mount of it elsewhere or by `/proc/PID/ns/net` of a process inside it is
//! one namespace, and two listeners on one address in it are refused by `check`
//! and never share the address in `run` (both drivers).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A bind mount of a namespace file on `target` (a file made for it); unmounted
/// and removed on drop, also when a test fails.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> BindMount {
        std::fs::write(target, b"").unwrap();
        let m = BindMount(target.to_path_buf());
        let st = Command::new("mount")
            .args(["--bind", source.to_str().unwrap(), target.to_str().unwrap()])
            .status()
            .expect("mount(8)");
        assert!(st.success(), "mount --bind {}", source.display());
        m
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", self.0.to_str().unwrap()])
            .status();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A process sleeping inside namespace `ns`, killed on drop.
struct Inside(Child);

impl Inside {
    fn new(ns: &TempNetns) -> Inside {
        let c = Command::new("ip")
            .args(["netns", "exec", ns.name(), "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("ip netns exec");
        let me = Inside(c);
        // `ip netns exec` enters the namespace, then execs sleep: wait for it.
        let want = std::fs::metadata(ns.path()).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        let t0 = std::time::Instant::now();
        loop {
            let now = std::fs::metadata(me.ns_path()).map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            });
            if now.is_ok() && now.as_ref().ok() == want.as_ref().ok() {
                return me;
            }
            assert!(
                t0.elapsed().as_secs() < 5,
                "sleep never entered the namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.0.id()))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listener(name: &str, netns: &str, listen: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\nnetns = \"{netns}\"\nlisten = \"{listen}\"\naction = \"echo\"\n")
}

#[test]
fn check_refuses_one_namespace_under_two_spellings() {
    let ns = netns("idchk");
    let dir = TempDir::new("idchk");
    let alias = BindMount::new(&ns.path(), &dir.0.join("alias"));
    let inside = Inside::new(&ns);
    let full = ns.path().to_str().unwrap().to_string();
    let proc_path = inside.ns_path().to_str().unwrap().to_string();
    let alias_path = alias.0.to_str().unwrap().to_string();
    let cfg = dir.0.join("c.toml");
    for other in [&full, &alias_path, &proc_path] {
        let text = format!(
            "{}{}",
            listener("first", ns.name(), "127.0.0.1:7000"),
            listener("second", other, "127.0.0.1:7000")
        );
        std::fs::write(&cfg, &text).unwrap();
        let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{other}: {err}");
        for want in [
            "listener \"second\"",
            "already used by listener \"first\"",
            &format!("in namespace {other:?}"),
            &format!("in namespace \"{}\"", ns.name()),
            "same namespace",
        ] {
            assert!(err.contains(want), "{other}: {err:?} lacks {want:?}");
        }
        // `run` refuses it the same way, before binding anything.
        let (code, _, err) = ringress_cmd(&["run", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{other}: {err}");
        assert!(err.contains("same namespace"), "{err}");
        // Another address, or another protocol, in the same namespace is fine.
        let text = format!(
            "{}{}",
            listener("first", ns.name(), "127.0.0.1:7000"),
            listener("second", other, "127.0.0.1:7001")
        );
        std::fs::write(&cfg, &text).unwrap();
        let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "{other}: {err}");
    }
    // The root namespace by path (of a process in it) is the root namespace.
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let text = "[[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:7000\"\naction = \"echo\"\n"
        .to_string()
        + &listener(
            "pid1",
            &format!("/proc/{}/ns/net", sleeper.id()),
            "127.0.0.1:7000",
        );
    std::fs::write(&cfg, &text).unwrap();
    let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("listener \"pid1\"") && err.contains("already used by listener \"plain\""),
        "{err}"
    );
}

both_drivers!(template_instance_and_alias_never_share_an_address);

/// A template instance in namespace X and an explicit listener on a bind-mount
/// alias of X, on one address (which `check` cannot see: templates expand at run
/// time): one serves, the other is not bound, and the log says why.
fn template_instance_and_alias_never_share_an_address(driver: &str) {
    let tag = format!("idt{}", &driver[..1]);
    let ns = netns(&tag);
    let dir = TempDir::new(&tag);
    let alias = BindMount::new(&ns.path(), &dir.0.join("alias"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n{}{}",
        listener("explicit", alias.0.to_str().unwrap(), &addr),
        listener("tpl", &format!("{}*", ns.name()), &addr),
    );
    let r = Ringress::start(&tag, driver, &cfg);
    r.wait_log("is already used by listener explicit", 1, 5);
    let log = r.stderr();
    assert!(log.contains("template instance not bound"), "{log}");
    // Only the explicit listener's sockets are on the port: 2, one per worker.
    let s = connect_in(Some(&ns), addr.parse().unwrap()).unwrap();
    assert_eq!(echo_roundtrip(s, b"x"), b"x");
    r.stop();
}
