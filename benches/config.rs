//! Parsing and validating a large config: 1,000 and 10,000 TCP echo listeners,
//! 10 per namespace (ports 20000..=20009) over 100 and 1,000 namespaces.
//!
//! - `config_parse/N`: [`Config::parse`] of the text: TOML, every key's checks,
//!   derived names, duplicate names and addresses, line numbers. No filesystem
//!   access, so it needs no namespace and no root. This is what the issue's
//!   "parse and validate" means and what must grow linearly.
//! - `config_check_namespaces/N`: [`Config::check_namespaces`] on the parsed config
//!   (one open + fstatfs(2) per distinct namespace file). Needs root and `ip`: the
//!   setup creates the namespaces with `ip -batch` and deletes them at the end;
//!   without root it is skipped with a note on stderr.
//!
//! `ringress check FILE` is read + `config_parse` + `config_check_namespaces`.
//! Throughput is reported per listener. `cargo bench --bench config`.

// criterion_group! generates functions without docs.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringress::config::Config;

/// Listeners per namespace.
const PER_NS: usize = 10;
/// (listeners, namespaces) of each size.
const SIZES: [(usize, usize); 2] = [(1_000, 100), (10_000, 1_000)];

/// The namespace names of this run: `rgb-cfg-PID-I`.
fn ns_name(i: usize) -> String {
    format!("rgb-cfg-{}-{i}", std::process::id())
}

/// A config with `namespaces * PER_NS` TCP echo listeners, names derived.
fn config_text(namespaces: usize) -> String {
    let mut t = String::from("[runtime]\nworkers = 1\n");
    for i in 0..namespaces {
        let ns = ns_name(i);
        for p in 0..PER_NS {
            t += &format!(
                "\n[[listener]]\nnetns = \"{ns}\"\nlisten = \"127.0.0.1:{}\"\naction = \"echo\"\n",
                20000 + p
            );
        }
    }
    t
}

/// Runs `ip [-force] -batch -` with one command per line.
fn ip_batch(lines: &str, force: bool) -> std::io::Result<()> {
    let mut cmd = Command::new("ip");
    if force {
        cmd.arg("-force");
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(lines.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Namespaces `ns_name(0..n)`, deleted on drop.
struct Namespaces(usize);

impl Namespaces {
    fn create(n: usize) -> std::io::Result<Namespaces> {
        let ns = Namespaces(n);
        let add: String = (0..n)
            .map(|i| format!("netns add {}\n", ns_name(i)))
            .collect();
        ip_batch(&add, false)?;
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let del: String = (0..self.0)
            .map(|i| format!("netns del {}\n", ns_name(i)))
            .collect();
        if let Err(e) = ip_batch(&del, true) {
            eprintln!("config bench: could not delete the namespaces: {e}");
        }
    }
}

fn config(c: &mut Criterion) {
    let file = Path::new("bench.toml");
    let texts: Vec<(usize, usize, String)> = SIZES
        .iter()
        .map(|&(n, ns)| (n, ns, config_text(ns)))
        .collect();

    let mut g = c.benchmark_group("config_parse");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (n, _, text) in &texts {
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), text, |b, text| {
            b.iter(|| {
                let cfg = Config::parse(text, file).expect("valid config");
                assert_eq!(cfg.listeners.len(), *n);
                black_box(cfg);
            })
        });
    }
    g.finish();

    if !ringress::procstat::has_cap_sys_admin() {
        eprintln!("config bench: skipping config_check_namespaces: needs root (CAP_SYS_ADMIN)");
        return;
    }
    let most = SIZES.iter().map(|&(_, ns)| ns).max().unwrap_or(0);
    let _ns = match Namespaces::create(most) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("config bench: skipping config_check_namespaces: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("config_check_namespaces");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (n, _, text) in &texts {
        let cfg = Config::parse(text, file).expect("valid config");
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &cfg, |b, cfg| {
            b.iter(|| cfg.check_namespaces().expect("namespaces exist"))
        });
    }
    g.finish();
    // `_ns` drops here: the namespaces are deleted.
}

criterion_group!(benches, config);
criterion_main!(benches);
