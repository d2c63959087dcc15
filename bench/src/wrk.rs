//! Driving `wrk` against a served row: the request script, one timed run, and what it
//! measured.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
}

/// Which `Idempotency-Key` each request carries.
#[derive(Debug, Clone, Copy)]
pub enum Keys {
    /// None: the request runs unprotected (the floors).
    None,
    /// A new key on every request: every request is a first execution.
    Fresh,
    /// One key for all: every request after the first is a replay.
    Same,
}

impl Keys {
    fn mode(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fresh => "fresh",
            Self::Same => "same",
        }
    }
}

/// The request script, written to a temporary file for as long as the value lives.
pub struct Script(PathBuf);

impl Script {
    /// Writes the script.
    ///
    /// # Errors
    /// If the temporary directory cannot be written.
    pub fn write() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("idem-wrk-{}.lua", std::process::id()));
        std::fs::write(&path, SCRIPT)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const SCRIPT: &str = r#"
local mode = "none"
local prefix = "k"
local counter = 0
local body = '{"amount":2500,"currency":"EUR"}'
function init(args)
  mode = args[1] or "none"
  prefix = args[2] or "k"
end
function request()
  local headers = { ["Content-Type"] = "application/json" }
  if mode == "fresh" then
    counter = counter + 1
    headers["Idempotency-Key"] = prefix .. "-" .. counter
  elseif mode == "same" then
    headers["Idempotency-Key"] = prefix
  end
  return wrk.format("POST", nil, headers, body)
end
"#;

/// Fails unless `wrk` can be run.
///
/// # Errors
/// When `wrk` is not installed.
pub fn check_installed() -> Result<(), Box<dyn std::error::Error>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Err("wrk is not installed (apt-get install wrk)".into());
    }
    Ok(())
}

/// One run of `wrk` (one thread) against `url` for `seconds`; with [`Keys::Same`], one
/// request first primes the key, so that every measured request is a replay. Keys start
/// with `prefix`.
///
/// # Errors
/// If `wrk` fails or sees an answer other than `2xx`.
pub fn run(
    url: &str,
    script: &Script,
    keys: Keys,
    prefix: &str,
    seconds: u64,
    connections: u64,
) -> Result<Measured, Box<dyn std::error::Error>> {
    if let Keys::Same = keys {
        once(url, script, keys, prefix, 1, 1)?;
    }
    once(url, script, keys, prefix, seconds, connections)
}

fn once(
    url: &str,
    script: &Script,
    keys: Keys,
    prefix: &str,
    seconds: u64,
    connections: u64,
) -> Result<Measured, Box<dyn std::error::Error>> {
    let output = Command::new("wrk")
        .args(["-t", "1", "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(script.path())
        .arg(url)
        .args(["--", keys.mode(), prefix])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("Non-2xx") {
        return Err(format!("wrk against {url} failed or saw non-2xx answers:\n{text}").into());
    }
    let rps = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let percentile = |label: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(label))
            .map(|v| parse_latency(v.trim()))
            .ok_or_else(|| format!("no {label} latency in wrk output:\n{text}"))
    };
    Ok(Measured {
        rps,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

/// wrk prints latencies as `512.00us`, `1.20ms` or `1.05s`.
fn parse_latency(text: &str) -> f64 {
    let (number, scale) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * scale
}

/// The median of `values` (the upper one of an even count); `NaN` when empty.
#[must_use]
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
