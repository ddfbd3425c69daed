//! The raw, span-carrying serde form of the file: what TOML gives before any value
//! is checked. Every key is optional here (so a missing key is reported by
//! `validate` with a line), and unknown keys are rejected by serde.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) netns_dir: Option<Spanned<String>>,
    pub(super) runtime: Option<Spanned<RawRuntime>>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub(super) listener: Vec<Spanned<RawListener>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) io: Option<Spanned<String>>,
    pub(super) shutdown_timeout_ms: Option<Spanned<i64>>,
    pub(super) takeover_socket: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) fd_reserve: Option<Spanned<i64>>,
    pub(super) netns_fd_share: Option<Spanned<i64>>,
    /// `"by-worker"` or a socket count: checked by `validate`.
    pub(super) shards: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<Spanned<String>>,
    pub(super) netns: Option<Spanned<String>>,
    pub(super) proto: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<String>>,
    pub(super) action: Option<Spanned<String>>,
    pub(super) respond: Option<Spanned<String>>,
    pub(super) backlog: Option<Spanned<i64>>,
    pub(super) upstream: Option<Spanned<String>>,
    pub(super) upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) upstream_netns: Option<Spanned<String>>,
    pub(super) connect_timeout_ms: Option<Spanned<i64>>,
    pub(super) idle_timeout_ms: Option<Spanned<i64>>,
    pub(super) buffer_bytes: Option<Spanned<i64>>,
    pub(super) proxy_protocol: Option<Spanned<String>>,
    pub(super) splice: Option<Spanned<String>>,
    pub(super) session_idle_timeout_ms: Option<Spanned<i64>>,
    pub(super) session_unreplied_timeout_ms: Option<Spanned<i64>>,
    pub(super) max_sessions: Option<Spanned<i64>>,
    pub(super) max_datagram_bytes: Option<Spanned<i64>>,
    pub(super) sctp_style: Option<Spanned<String>>,
    pub(super) sctp_streams: Option<Spanned<i64>>,
    pub(super) max_message_bytes: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) header_timeout_ms: Option<Spanned<i64>>,
    pub(super) keepalive_timeout_ms: Option<Spanned<i64>>,
    /// `"by-worker"` or a socket count: checked by `validate`.
    pub(super) shards: Option<Spanned<toml::Value>>,
}
