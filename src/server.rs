//! The supervisor: binds every listener through the binder, starts the workers and
//! hands each worker its own SO_REUSEPORT socket of every listener.
//!
//! Thread budget: the calling thread (signals), the binder, and one thread per
//! worker. Nothing here grows with the number of namespaces, listeners or
//! connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::binder::{BindError, Binder, SocketSpec};
use crate::config::{Action, Config, IoChoice, ListenerConfig};
use crate::driver::{self, Command, DriverKind, ListenerShared, UpstreamSet, WorkerHandle};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The driver cannot run here (e.g. io = "uring" without io_uring).
    #[error("{0}")]
    Driver(String),
    /// Creating, binding or listening on a listener's socket failed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Two listeners would share one socket address in one namespace.
    #[error("listener {second}: {addr} in netns {netns} is already used by listener {first}")]
    Duplicate {
        /// The listener defined first.
        first: String,
        /// The listener defined later.
        second: String,
        /// The shared address.
        addr: SocketAddr,
        /// The namespace label.
        netns: String,
    },
    /// A thread, ring or epoll instance could not be created.
    #[error("starting workers: {0}")]
    Workers(#[source] std::io::Error),
}

/// A listener being served.
#[derive(Debug)]
pub struct RunningListener {
    /// Supervisor's id, unique in this process.
    pub id: u64,
    /// Its configuration.
    pub config: ListenerConfig,
    /// Name, action and counters shared with the workers.
    pub shared: Arc<ListenerShared>,
}

/// A running server: binder, workers, listeners.
pub struct Server {
    binder: Binder,
    workers: Vec<WorkerHandle>,
    listeners: Vec<RunningListener>,
    driver: DriverKind,
}

impl Server {
    /// Resolves the driver (`io` overrides `runtime.io`), binds every listener (one
    /// socket per worker, all made by the binder), starts `runtime.workers`
    /// workers and hands them their sockets.
    ///
    /// Nothing is left open on error: sockets already bound are closed and no
    /// worker keeps running.
    ///
    /// # Errors
    /// [`StartError`], naming the listener, namespace and errno where there is one.
    pub fn start(cfg: &Config, io: Option<IoChoice>) -> Result<Server, StartError> {
        let driver = driver::resolve(io.unwrap_or(cfg.runtime.io)).map_err(StartError::Driver)?;
        let binder = Binder::start().map_err(StartError::Workers)?;
        let workers = cfg.runtime.workers.max(1);

        // Bind everything first: a failure leaves no thread and no socket behind.
        let mut seen: HashMap<(Option<PathBuf>, SocketAddr), &str> = HashMap::new();
        let mut bound = Vec::with_capacity(cfg.listeners.len());
        for l in &cfg.listeners {
            let path = cfg.netns_path(l);
            if let Some(first) = seen.insert((path.clone(), l.listen), &l.name) {
                return Err(StartError::Duplicate {
                    first: first.to_string(),
                    second: l.name.clone(),
                    addr: l.listen,
                    netns: l.netns_label(),
                });
            }
            let fds = binder.create(
                &l.name,
                path.as_deref(),
                &l.netns_label(),
                SocketSpec::TcpListeners {
                    addr: l.listen,
                    backlog: l.backlog,
                    count: workers,
                },
            )?;
            let upstream = match &l.action {
                Action::Proxy(p) => {
                    let ns = p.upstream_netns_path.clone().map(|path| {
                        let label = p
                            .upstream_netns
                            .as_ref()
                            .map_or_else(String::new, |n| n.label());
                        (path, label)
                    });
                    Some(Arc::new(UpstreamSet::new(
                        p.upstreams.clone(),
                        ns,
                        &l.name,
                        &binder,
                    )?))
                }
                _ => None,
            };
            bound.push((l, fds, upstream));
        }

        let handles = driver::spawn_workers(workers, driver).map_err(StartError::Workers)?;
        let mut listeners = Vec::with_capacity(bound.len());
        for (id, (l, fds, upstream)) in bound.into_iter().enumerate() {
            let shared = Arc::new(ListenerShared {
                name: Arc::from(l.name.as_str()),
                action: l.action.clone(),
                netns: Arc::from(l.netns_label().as_str()),
                upstream,
                stats: Default::default(),
            });
            for (w, fd) in handles.iter().zip(fds) {
                if let Err(e) = w.send(Command::AddListener {
                    id: id as u64,
                    fd,
                    shared: shared.clone(),
                }) {
                    for h in handles {
                        h.shutdown();
                    }
                    return Err(StartError::Workers(e));
                }
            }
            tracing::info!(
                listener = %l.name,
                netns = %l.netns_label(),
                proto = %l.proto,
                address = %l.listen,
                action = l.action.kind(),
                driver = %driver,
                workers,
                "listener bound"
            );
            listeners.push(RunningListener {
                id: id as u64,
                config: l.clone(),
                shared,
            });
        }
        Ok(Server {
            binder,
            workers: handles,
            listeners,
            driver,
        })
    }

    /// The listeners being served, in config order.
    pub fn listeners(&self) -> &[RunningListener] {
        &self.listeners
    }

    /// The binder (for creating client sockets in namespaces).
    pub fn binder(&self) -> &Binder {
        &self.binder
    }

    /// The driver the workers run.
    pub fn driver(&self) -> DriverKind {
        self.driver
    }

    /// The workers' handles (for their counters).
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// Closes every listener and connection, and joins the workers.
    pub fn shutdown(self) {
        for w in self.workers {
            w.shutdown();
        }
        tracing::info!(listeners = self.listeners.len(), "listeners closed");
    }
}
