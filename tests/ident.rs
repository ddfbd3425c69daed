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

both_drivers!(
    link_local_upstream_by_interface_name_in_its_namespace,
    a_path_that_names_another_namespace_is_not_followed,
    template_serves_a_placeholder_once_a_namespace_is_mounted_on_it,
    template_instance_and_alias_never_share_an_address,
    foreign_reuseport_socket_is_never_joined,
    second_run_of_one_config_is_refused_but_takeover_shares,
);

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

/// A `sleep` process holding a socket bound to `addr` with SO_REUSEADDR and
/// SO_REUSEPORT (listening, for TCP), as a foreign server would; killed on drop.
struct ForeignHolder(Child);

impl ForeignHolder {
    fn new(addr: std::net::SocketAddr, udp: bool) -> ForeignHolder {
        use socket2::{Domain, Protocol, Socket, Type};
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (ty, proto) = match udp {
            true => (Type::DGRAM, Protocol::UDP),
            false => (Type::STREAM, Protocol::TCP),
        };
        let s = Socket::new(Domain::for_address(addr), ty, Some(proto)).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        if !udp {
            s.listen(16).unwrap();
        }
        let fd = s.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("60").stdin(Stdio::null());
        // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child
        // before exec and give the socket to `sleep` as fd 3 without FD_CLOEXEC
        // (dup2 onto itself would keep the flag: clear it then).
        unsafe {
            cmd.pre_exec(move || {
                let r = match fd {
                    3 => libc::fcntl(3, libc::F_SETFD, 0),
                    _ => libc::dup2(fd, 3),
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The socket is now `sleep`'s only.
        drop(s);
        ForeignHolder(child)
    }
}

impl Drop for ForeignHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Another process listens on the address with SO_REUSEPORT (TCP) or holds it
/// (UDP): `run` refuses to start, naming the address and the holder, and the
/// holder keeps the address alone.
fn foreign_reuseport_socket_is_never_joined(driver: &str) {
    for udp in [false, true] {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let holder = ForeignHolder::new(addr, udp);
        let dir = TempDir::new(&format!("foreign-{driver}-{udp}"));
        let cfg = dir.0.join("c.toml");
        let proto = if udp { "udp" } else { "tcp" };
        std::fs::write(
            &cfg,
            format!(
                "[runtime]\nworkers = 2\n[[listener]]\nname = \"f\"\nproto = \"{proto}\"\n\
                 listen = \"{addr}\"\naction = \"echo\"\n"
            ),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        // Bounded: a server that wrongly starts must not hang the test.
        let out = Command::new("timeout")
            .args(["10", bin(), "run", cfg.to_str().unwrap(), "--io", driver])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (code, err) = (out.status.code(), String::from_utf8_lossy(&out.stderr));
        assert_eq!(code, Some(1), "{err}");
        assert!(t0.elapsed().as_secs() < 10);
        let want = format!(
            "{proto} {addr} is already held by pid {} (sleep); ringress never joins a SO_REUSEPORT group it did not create",
            holder.0.id()
        );
        assert!(err.contains(&want), "{want:?} not in:\n{err}");
        assert!(err.contains("listener f: bind"), "{err}");
        // `check` cannot know: a port in use is seen at run time only.
        let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
}

/// A second `run` of the same config (another spelling of its path, even) is
/// refused naming the first one's pid; `run --takeover` of the same config goes
/// on, takes the instance lock when the old process exits, and from then on
/// the lock names the new process.
fn second_run_of_one_config_is_refused_but_takeover_shares(driver: &str) {
    let port = free_port();
    let dir = TempDir::new(&format!("lock-{driver}"));
    let sock = dir.0.join("takeover.sock");
    let cfg_text = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\ntakeover_socket = \"{}\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:{port}\"\naction = \"echo\"\n",
        sock.display()
    );
    let mut first = Ringress::start(&format!("lock1-{driver}"), driver, &cfg_text);
    let cfg = first.config_path();
    let dotted = cfg
        .parent()
        .unwrap()
        .join("..")
        .join(cfg.parent().unwrap().file_name().unwrap())
        .join("ringress.toml");
    let (code, _, err) = ringress_cmd(&["run", dotted.to_str().unwrap(), "--io", driver]);
    assert_eq!(code, 1, "{err}");
    let want = format!(
        "is already served by ringress pid {} (instance lock ",
        first.pid()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    // The first one still serves alone.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(echo_roundtrip(connect_in(None, addr).unwrap(), b"a"), b"a");

    // The sanctioned way: a takeover of the same config file.
    let log = dir.0.join("new.log");
    let child = Command::new(bin())
        .args(["run", cfg.to_str().unwrap(), "--io", driver, "--takeover"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut new = Ringress {
        child,
        dir: TempDir::new(&format!("lock2-{driver}")),
        log,
    };
    new.wait_running();
    assert!(first.wait_exit(15).success(), "{}", first.stderr());
    new.wait_log("instance lock taken over from the previous process", 1, 5);
    assert_eq!(echo_roundtrip(connect_in(None, addr).unwrap(), b"b"), b"b");
    let (code, _, err) = ringress_cmd(&["run", cfg.to_str().unwrap(), "--io", driver]);
    assert_eq!(code, 1, "{err}");
    let want = format!(
        "is already served by ringress pid {} (instance lock ",
        new.pid()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    assert!(new.stop().success());
    // Once it has exited, the config may run again.
    let mut again = Ringress::spawn_with_config_path(driver, &cfg);
    again.wait_running();
    assert!(again.stop().success());
}

/// A file under /run/netns (a placeholder, later a mount point); unmounted and
/// removed on drop.
struct Placeholder(PathBuf);

impl Drop for Placeholder {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", self.0.to_str().unwrap()])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Connects to `addr` from inside the namespace file `ns`, once.
fn connect_at(ns: &Path, addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let fd = binder()
        .create(
            "test-client",
            Some(ns),
            "late",
            ringress::binder::SocketSpec::TcpClient { family_of: addr },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .pop()
        .unwrap();
    let s = socket2::Socket::from(fd);
    s.set_nonblocking(false)?;
    s.connect_timeout(&addr.into(), std::time::Duration::from_secs(1))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    Ok(s.into())
}

/// A template's entry appears as a placeholder file and stays one for 4 s (past
/// the 3 s settle time; the mount makes no inotify event): once a namespace is
/// mounted on it, the template serves there within 1 s.
fn template_serves_a_placeholder_once_a_namespace_is_mounted_on_it(driver: &str) {
    use std::time::{Duration, Instant};
    require_root();
    let name = format!("rgt-late{}-{}", &driver[..1], std::process::id());
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n\
         [[listener]]\nname = \"late\"\nnetns = \"{name}*\"\nlisten = \"{addr}\"\naction = \"echo\"\n"
    );
    let r = Ringress::start(&format!("late-{driver}"), driver, &cfg);
    // A process in a fresh namespace with its loopback up.
    let child = Command::new("unshare")
        .args(["--net", "sh", "-c", "ip link set lo up && exec sleep 60"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare(1)");
    let inside = Inside(child);
    let t0 = Instant::now();
    while std::fs::read_to_string(format!("/proc/{}/comm", inside.0.id()))
        .map_or(true, |c| c.trim() != "sleep")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "unshare did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let entry = Placeholder(Path::new("/run/netns").join(&name));
    std::fs::write(&entry.0, b"").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    r.wait_log(
        "retrying with back-off until it is served or goes away",
        1,
        2,
    );
    let st = Command::new("mount")
        .args([
            "--bind",
            &inside.ns_path().to_string_lossy(),
            entry.0.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let mounted = Instant::now();
    loop {
        if let Ok(s) = connect_at(&entry.0, addr) {
            assert_eq!(echo_roundtrip(s, b"late"), b"late");
            break;
        }
        assert!(
            mounted.elapsed() < Duration::from_secs(3),
            "not served 3 s after the mount:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = mounted.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "served {took:?} after the mount"
    );
    r.stop();
}

/// `check` and `run` refuse a listen port of 0 and an fd limit too low for the
/// listeners' sockets (naming RLIMIT_NOFILE and the count), and `check` warns
/// about a loopback upstream of a listener inside a namespace.
#[test]
fn check_gaps_port_zero_fd_limit_and_loopback_upstream() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("gaps");
    let cfg = dir.0.join("c.toml");
    let path = cfg.to_str().unwrap();
    std::fs::write(
        &cfg,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\naction = \"echo\"\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let (code, _, err) = ringress_cmd(&[cmd, path]);
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(err.contains("port 0 is not allowed"), "{cmd}: {err}");
    }
    // 20 listeners × 8 workers need 160 sockets and more: a hard limit of 100.
    let mut text = String::from("[runtime]\nworkers = 8\n");
    for i in 0..20 {
        text += &format!(
            "[[listener]]\nlisten = \"127.0.0.1:{}\"\naction = \"echo\"\n",
            7100 + i
        );
    }
    std::fs::write(&cfg, &text).unwrap();
    for cmd in ["check", "run"] {
        let mut c = Command::new(bin());
        c.args([cmd, path]).stdin(Stdio::null());
        // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 100,
                    rlim_max: 100,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("RLIMIT_NOFILE) is 100, but 208 file descriptors are needed"),
            "{cmd}: {err}"
        );
    }
    let ns = netns("gaps");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"p\"\nnetns = \"{}\"\nlisten = \"127.0.0.1:80\"\n\
             action = \"proxy\"\nupstream = \"127.0.0.1:8080\"\n",
            ns.name()
        ),
    )
    .unwrap();
    let (code, out, err) = ringress_cmd(&["check", path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 listener)"), "{out}");
    assert!(
        err.contains("warning: ") && err.contains("upstream 127.0.0.1:8080 is a loopback address"),
        "{err}"
    );
}

/// A listener on a namespace path (a bind mount of namespace A) holds A: when the
/// path is re-pointed to namespace B, the listener goes down in /status within
/// about a second, and nothing listens in B.
fn a_path_that_names_another_namespace_is_not_followed(driver: &str) {
    use std::time::{Duration, Instant};
    let tag = format!("held{}", &driver[..1]);
    let (a, b) = (netns(&format!("{tag}a")), netns(&format!("{tag}b")));
    let dir = TempDir::new(&tag);
    let mount = BindMount::new(&a.path(), &dir.0.join("ns"));
    let (port, admin) = (free_port(), free_port());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = format!(
        "[runtime]\nworkers = 2\nshutdown_timeout_ms = 1000\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
        listener("held", mount.0.to_str().unwrap(), &addr.to_string())
    );
    let r = Ringress::start(&tag, driver, &cfg);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let state = || {
        let (_, body) = Ringress::admin_get(admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "held")
            .map(|x| x["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state(), "serving");
    assert_eq!(
        echo_roundtrip(connect_in(Some(&a), addr).unwrap(), b"a"),
        b"a"
    );
    // Re-point the path to B.
    // Lazily: the server's binder may still have the file open.
    let st = Command::new("umount")
        .arg("-l")
        .arg(&mount.0)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("mount")
        .args([
            "--bind",
            b.path().to_str().unwrap(),
            mount.0.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    while state() == "serving" {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still serving:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    r.wait_log("now names another namespace: not followed", 1, 2);
    let e = connect_in(Some(&b), addr).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    let e = connect_in(Some(&a), addr).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(r.stop().success());
}

/// A link-local upstream whose zone is an interface name that exists only in the
/// upstream's namespace: `check` resolves it there (and refuses it without
/// `upstream_netns`, naming the interface), and `run` proxies to it.
fn link_local_upstream_by_interface_name_in_its_namespace(driver: &str) {
    let tag = format!("zone{}", &driver[..1]);
    let ns = netns(&tag);
    ns.ip(&[
        "link", "add", "rgz0", "type", "veth", "peer", "name", "rgz1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "rgz1", "up"]).unwrap();
    ns.ip(&["addr", "add", "fe80::7/64", "dev", "rgz0", "nodad"])
        .unwrap();
    ns.ip(&["link", "set", "rgz0", "up"]).unwrap();
    let index: u32 = ringress::netns::if_index_in(Some(&ns.path()), "rgz0").unwrap();
    let up_port = free_port();
    let up_addr: std::net::SocketAddr = format!("[fe80::7%{index}]:{up_port}").parse().unwrap();
    let _up = Upstream::spawn(Some(&ns), up_addr, |mut s| {
        use std::io::{Read, Write};
        let mut b = [0u8; 64];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 || s.write_all(&b[..n]).is_err() {
                break;
            }
        }
    });
    let port = free_port();
    let body = |upstream_netns: &str| {
        format!(
            "[runtime]\nworkers = 1\nshutdown_timeout_ms = 1000\n[[listener]]\nname = \"z\"\n\
             listen = \"127.0.0.1:{port}\"\naction = \"proxy\"\nupstream = \"[fe80::7%rgz0]:{up_port}\"\n{upstream_netns}"
        )
    };
    let dir = TempDir::new(&tag);
    let cfg = dir.0.join("c.toml");
    std::fs::write(&cfg, body("")).unwrap();
    let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("zone %rgz0 of upstream")
            && err.contains("no such interface in namespace \"root\""),
        "{err}"
    );
    let with_ns = body(&format!("upstream_netns = \"{}\"\n", ns.name()));
    std::fs::write(&cfg, &with_ns).unwrap();
    let (code, _, err) = ringress_cmd(&["check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let r = Ringress::start(&tag, driver, &with_ns);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        echo_roundtrip(connect_in(None, addr).unwrap(), b"zone"),
        b"zone"
    );
    assert!(r.stop().success());
}
