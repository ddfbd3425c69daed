//! ringress: an L4 ingress server for Linux.
//!
//! One process serves listeners inside any number of network namespaces with a
//! fixed number of OS threads: a [`binder`] thread creates every namespace-scoped
//! socket (setns in, socket/bind/listen, setns back), and per-core workers
//! ([`driver`]) drive the sockets through an io_uring ring or an epoll instance.
//! The per-connection logic ([`proto`]) is written once for both drivers.
//!
//! Module map: [`config`] (TOML) → [`server`] (supervisor) → [`binder`] (sockets in
//! namespaces) and [`driver`] (workers) → [`proto`] (sessions).

pub mod admin;
pub mod binder;
pub mod config;
pub mod control;
pub mod demo;
pub mod driver;
pub mod eventfd;
pub mod health;
pub mod instance;
pub mod netns;
pub mod privs;
pub mod procstat;
pub mod proto;
pub mod sctp;
pub mod sdnotify;
pub mod server;
pub mod signals;
pub mod takeover;
