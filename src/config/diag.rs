//! [`ConfigError`], the one error type of config loading, and [`Lines`], which
//! turns byte offsets (serde spans) into the 1-based line numbers errors show.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{ListenerId, Scope};

/// Why a configuration could not be loaded or validated.
///
/// Every variant's `Display` starts with the file, and all but [`ConfigError::Io`]
/// and [`ConfigError::NoListeners`] with `FILE:LINE:` (1-based line).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (or is not UTF-8).
    #[error("{}: cannot read config: {source}", file.display())]
    Io {
        /// The config file.
        file: PathBuf,
        /// The error from reading it.
        #[source]
        source: io::Error,
    },
    /// Malformed TOML, or a value of the wrong TOML type (then `key` is its dotted
    /// path, e.g. `runtime.workers`).
    #[error("{}:{line}: {}{message}", file.display(), parse_prefix(key))]
    Parse {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// Dotted path of the key whose value has the wrong type, when known.
        key: Option<String>,
        /// The toml crate's one-line message.
        message: String,
    },
    /// A key that the format does not define.
    #[error("{}:{line}: unknown key `{key}` in {table}{}", file.display(), expected_suffix(expected))]
    UnknownKey {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the key.
        line: usize,
        /// The unknown key.
        key: String,
        /// `[runtime]`, `[[listener]]` or `the top-level table`.
        table: String,
        /// The accepted keys, as serde lists them (may be empty).
        expected: String,
    },
    /// A key with an unacceptable value, a missing required key, or a conflict
    /// between keys or listeners.
    #[error("{}:{line}: {scope}key `{key}`: {message}", file.display())]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the key's value (or of the listener when a key is missing).
        line: usize,
        /// The table the key belongs to.
        scope: Scope,
        /// The key at fault, e.g. `listen`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The file defines no `[[listener]]` table.
    #[error("{}: no [[listener]] defined", file.display())]
    NoListeners {
        /// The config file.
        file: PathBuf,
    },
    /// A listener's namespace is missing or is not a namespace
    /// (from [`Config::check_namespaces`](super::Config::check_namespaces)).
    #[error(
        "{}:{line}: {listener}: key `{key}`: namespace {label:?} {} ({})",
        file.display(),
        netns_problem(source),
        netns_detail(path, source)
    )]
    Netns {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the listener.
        line: usize,
        /// The listener.
        listener: ListenerId,
        /// The key naming the namespace: `netns` or `upstream_netns`.
        key: &'static str,
        /// The namespace as written in the config.
        label: Box<str>,
        /// The namespace file that was checked.
        path: Box<Path>,
        /// The error from opening or inspecting it (`NotFound` when missing,
        /// `InvalidInput` when the file is not a namespace).
        #[source]
        source: io::Error,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, if it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Io { .. } | ConfigError::NoListeners { .. } => None,
            ConfigError::Parse { line, .. }
            | ConfigError::UnknownKey { line, .. }
            | ConfigError::Invalid { line, .. }
            | ConfigError::Netns { line, .. } => Some(*line),
        }
    }
}

fn parse_prefix(key: &Option<String>) -> String {
    match key {
        Some(k) => format!("key `{k}`: "),
        None => "TOML parse error: ".to_string(),
    }
}

fn expected_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" (expected {expected})")
    }
}

/// `PATH: ERROR`, or just `ERROR` when the error message already names the path.
fn netns_detail(path: &Path, e: &io::Error) -> String {
    let p = path.display().to_string();
    let m = e.to_string();
    if m.starts_with(&p) {
        m
    } else {
        format!("{p}: {m}")
    }
}

fn netns_problem(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "not found",
        io::ErrorKind::InvalidInput => "is not a namespace",
        _ => "cannot be opened",
    }
}

/// Maps byte offsets in the config text to 1-based line numbers.
///
/// Built once per file ([`Lines::new`], one pass over the text); each lookup is a
/// binary search over the line starts, O(log lines), so mapping the spans of n
/// listeners costs O(n log n) rather than O(n × file size).
pub(super) struct Lines {
    /// Byte offset of the start of every line: `starts[0] == 0`, then one past
    /// each `\n`.
    starts: Vec<usize>,
    /// Length of the text (bytes); offsets beyond it map to the last line.
    len: usize,
}

impl Lines {
    /// Indexes the line starts of `text`.
    pub(super) fn new(text: &str) -> Lines {
        let mut starts = Vec::with_capacity(text.len() / 32 + 1);
        starts.push(0);
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Lines {
            starts,
            len: text.len(),
        }
    }

    /// The 1-based line of byte `offset`: one more than the number of `\n` before
    /// it (an offset past the end counts the newlines of the whole text).
    pub(super) fn of(&self, offset: usize) -> usize {
        let end = offset.min(self.len);
        // Line starts at or before `end`; a `\n` at byte `end - 1` starts a line
        // at `end`, which is counted, as the newline before `end` is.
        self.starts.partition_point(|&s| s <= end)
    }

    pub(super) fn of_span(&self, span: Range<usize>) -> usize {
        self.of(span.start)
    }
}

#[cfg(test)]
mod tests {
    use super::Lines;

    /// The index agrees with counting newlines from the start, at every offset.
    #[test]
    fn line_index_matches_counting() {
        for text in [
            "",
            "a",
            "\n",
            "a\n",
            "a\nb",
            "\n\nab\n\ncd\n",
            "x\r\ny\n\nz",
        ] {
            let lines = Lines::new(text);
            for off in 0..=text.len() + 2 {
                let end = off.min(text.len());
                let want = 1 + text.as_bytes()[..end]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                assert_eq!(lines.of(off), want, "text {text:?} offset {off}");
            }
        }
    }
}
