//! The worker over a real backend, in-process: what happens when the backend
//! fails while operations are in flight.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::{Worker, WorkerCtx};
use crate::config::Action;
use crate::driver::backend::Backend;
use crate::driver::shared::{ListenerShared, WorkerStats};
use crate::driver::{eventfd, wake, Command};

/// A worker context and the supervisor's ends of it.
pub(super) fn ctx() -> (
    WorkerCtx,
    mpsc::Sender<Command>,
    Arc<OwnedFd>,
    Arc<WorkerStats>,
) {
    let (tx, rx) = mpsc::channel();
    let wake_fd = Arc::new(eventfd().expect("eventfd"));
    let stats = Arc::new(WorkerStats::default());
    let ctx = WorkerCtx {
        index: 0,
        rx,
        wake: wake_fd.clone(),
        stats: stats.clone(),
        peeled: Default::default(),
        binder: None,
        filtered: Default::default(),
    };
    (ctx, tx, wake_fd, stats)
}

/// An echo listener on a loopback port, as a worker command.
fn echo_listener(name: &str) -> (Command, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("addr");
    let shared = Arc::new(ListenerShared::test(name, Action::Echo, None));
    let cmd = Command::AddListener {
        id: 1,
        fd: OwnedFd::from(l).into(),
        shared,
    };
    (cmd, addr)
}

/// Starts an echo session so that a receive is in flight, then makes the
/// backend's next `io_uring_enter` fail.
#[cfg(feature = "uring")]
#[test]
fn uring_enter_error_leaks_in_flight_memory_and_reports_the_worker() {
    use crate::driver::uring::{probe, UringBackend, LEAKED_OPS};
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let (ctx, tx, wake_fd, _stats) = ctx();
    let fail = Arc::new(AtomicBool::new(false));
    let fail2 = fail.clone();
    let (cmd, addr) = echo_listener("fault");
    tx.send(cmd).expect("send");
    wake(wake_fd.as_raw_fd());
    let leaked_before = LEAKED_OPS.load(Relaxed);
    let worker = std::thread::spawn(move || {
        // A backend is not Send (its operations point into it): made where it runs.
        let mut backend = UringBackend::new(probe().as_ref().expect("io_uring")).expect("io_uring");
        backend.fail_wait = Some(fail2);
        let mut w = Worker::new(backend, ctx);
        let r = w.run();
        let left = w.backend().in_flight();
        drop(w);
        (r, left)
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    c.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"ping");
    // The session's next receive, the accept and the wake-up poll are in flight.
    fail.store(true, Relaxed);
    wake(wake_fd.as_raw_fd());
    let (r, left) = worker.join().expect("the worker must not panic");
    let e = r.expect_err("the worker must report the backend failure");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        left >= 3,
        "receive, accept and wake-up in flight, got {left}"
    );
    assert!(
        LEAKED_OPS.load(Relaxed) >= leaked_before + left as u64,
        "the backend must leak, not free, the memory of operations in flight"
    );
    // The client's socket is still open on the server side (the leaked ring
    // holds it): nothing was torn down under the kernel's feet.
    drop(c);
}

/// A worker whose backend fails is not silently missing: its counters and the
/// process-wide flag say so (the supervisor then stops the process).
#[cfg(feature = "uring")]
#[test]
fn a_failed_backend_marks_the_worker_failed() {
    use super::serve;
    use crate::driver::uring::{probe, UringBackend};
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let (ctx, _tx, wake_fd, stats) = ctx();
    let fail = Arc::new(AtomicBool::new(true));
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let t = std::thread::spawn(move || {
        serve(
            || {
                let mut b = UringBackend::new(probe().as_ref().expect("io_uring"))?;
                b.fail_wait = Some(fail);
                Ok(b)
            },
            ctx,
            ready_tx,
        )
    });
    ready_rx
        .recv()
        .expect("ready")
        .expect("the backend sets up");
    wake(wake_fd.as_raw_fd());
    t.join().expect("no panic");
    assert!(stats.failed.load(Relaxed));
    assert!(crate::driver::worker_failed());
}

/// Both backends end a worker the same way: on shutdown a session is closed
/// (not reset) and every operation ends before `run` returns.
#[test]
fn shutdown_ends_every_operation_on_both_backends() {
    fn check<B: Backend + 'static>(make: fn() -> B) {
        let (ctx, tx, wake_fd, _stats) = ctx();
        let (cmd, addr) = echo_listener("shutdown");
        tx.send(cmd).expect("send");
        wake(wake_fd.as_raw_fd());
        let worker = std::thread::spawn(move || {
            let mut w = Worker::new(make(), ctx);
            let r = w.run();
            (r.is_ok(), w.backend().in_flight())
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).expect("echo");
        tx.send(Command::Shutdown).expect("send");
        wake(wake_fd.as_raw_fd());
        let (ok, left) = worker.join().expect("no panic");
        assert!(ok);
        assert_eq!(left, 0, "operations left in flight after shutdown");
        let mut rest = Vec::new();
        let n = c.read_to_end(&mut rest).expect("a clean end, not a reset");
        assert_eq!(n, 0);
    }
    check(|| crate::driver::epoll::EpollBackend::new().expect("epoll"));
    #[cfg(feature = "uring")]
    check(|| {
        crate::driver::uring::UringBackend::new(
            crate::driver::uring::probe().as_ref().expect("io_uring"),
        )
        .expect("io_uring")
    });
}
