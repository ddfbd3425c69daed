//! The binder's cost to create, bind and listen one TCP socket (127.0.0.1:0,
//! backlog 16) in the root namespace and in another namespace (setns in and back,
//! with the namespace fd cached by the binder). The namespace variant needs root
//! (CAP_SYS_ADMIN) and `ip`; without them it is skipped with a note on stderr.
//!
//! `cargo bench --bench binder`.

// criterion_group! generates functions without docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ringress::binder::{Binder, SocketSpec};
use ringress::netns::TempNetns;

fn spec() -> SocketSpec {
    SocketSpec::TcpListeners {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        backlog: 16,
        count: 1,
        exclusive: false,
    }
}

fn create_listener(c: &mut Criterion) {
    let binder = Binder::start().expect("binder");
    let mut g = c.benchmark_group("binder_create_listener");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    g.bench_function("root", |b| {
        b.iter(|| {
            let fds = binder
                .create("bench", None, "root", spec())
                .expect("create in root");
            black_box(fds);
        })
    });
    let ns = if ringress::procstat::has_cap_sys_admin() {
        let name = format!("rgb-bench-{}", std::process::id());
        match TempNetns::create(&name) {
            Ok(ns) => Some(ns),
            Err(e) => {
                eprintln!("binder bench: skipping the namespace variant: {e}");
                None
            }
        }
    } else {
        eprintln!("binder bench: skipping the namespace variant: needs root (CAP_SYS_ADMIN)");
        None
    };
    if let Some(ns) = &ns {
        let path = ns.path();
        g.bench_function("other_netns", |b| {
            b.iter(|| {
                let fds = binder
                    .create("bench", Some(&path), ns.name(), spec())
                    .expect("create in namespace");
                black_box(fds);
            })
        });
    }
    g.finish();
    drop(binder);
    drop(ns); // deletes the namespace
}

criterion_group!(benches, create_listener);
criterion_main!(benches);
