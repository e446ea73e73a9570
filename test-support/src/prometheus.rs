//! A real Prometheus server (Debian's `prometheus`, 2.42) for the tests: a temporary storage
//! folder, 127.0.0.1 on a free port, a 1 s scrape interval on the given targets, rule files
//! loaded, and its HTTP query API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::child::Guarded;
use crate::eventually::until_some_blocking;
use crate::http::{free_port, get, url_encode};

/// How long Prometheus may take to be ready.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

pub struct Prometheus {
    pub addr: SocketAddr,
    process: Guarded,
    dir: TempDir,
}

impl Prometheus {
    /// Scrapes `targets` (job `ksm`) every second, with `rule_files` loaded.
    pub fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Result<Prometheus, String> {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        Prometheus::start_with(&format!("static_configs:\n      - targets: [{}]", targets.join(", ")), rule_files)
    }

    /// Scrapes what the file-based service discovery file `sd_file` lists (job `ksm`, re-read
    /// every second), as a fleet's Prometheus does. Its configuration is `prometheus.yml` in
    /// [`Prometheus::dir`].
    pub fn start_file_sd(sd_file: &Path, rule_files: &[PathBuf]) -> Result<Prometheus, String> {
        let sd = format!("file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s", sd_file.display());
        Prometheus::start_with(&sd, rule_files)
    }

    /// Prometheus with one scrape job `ksm` whose discovery is `discovery` (YAML at its indent).
    fn start_with(discovery: &str, rule_files: &[PathBuf]) -> Result<Prometheus, String> {
        let dir = tempfile::Builder::new().prefix("prometheus-").tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let rules: Vec<String> = rule_files.iter().map(|r| format!("'{}'", r.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: ksm\n    {discovery}\n",
            rules.join(", "),
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).map_err(|e| format!("writing the configuration: {e}"))?;
        let addr = free_port();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let process = Guarded::spawn_logged(&mut command, "prometheus", &dir.path().join("prometheus.log"))
            .map_err(|e| format!("{e} (Debian's prometheus package; .ci/run installs it)"))?;
        let mut p = Prometheus { addr, process, dir };
        let ready = until_some_blocking(READY_LIMIT, "Prometheus to be ready", || {
            get(addr, "/-/ready", &[]).ok().filter(|r| r.status == 200).map(|_| ())
        });
        if let Err(e) = ready {
            let _ = p.process.kill();
            return Err(format!("{e}; log:\n{}", p.log()));
        }
        Ok(p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GET path` of the API, its `data` once `status` is `success`; the error it gave otherwise.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let r = get(self.addr, path, &[]).map_err(|e| format!("GET {path}: {e}"))?;
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("GET {path}: {e}: {}", r.text()))?;
        if v["status"] != "success" {
            return Err(format!("GET {path}: {} {}: {}", r.status, v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// An instant query: its `data` (`resultType`, `result`).
    pub fn query(&self, q: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", url_encode(q)))
    }

    /// A range query over the last `seconds`, one point a second.
    pub fn query_range(&self, q: &str, seconds: u64) -> Result<Value, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs_f64();
        self.api(&format!(
            "/api/v1/query_range?query={}&start={:.3}&end={:.3}&step=1",
            url_encode(q),
            now - seconds as f64,
            now
        ))
    }

    /// The value of a query with one series and a number, if it has them now.
    pub fn scalar(&self, q: &str) -> Option<f64> {
        let data = self.query(q).ok()?;
        let result = data["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

/// The exporter binary (`binary`: the tests' `CARGO_BIN_EXE_…`) on a free localhost port over
/// `bus` and the sysfs folder `ksm`, logging to `log`; returns once it answers HTTP.
pub fn spawn_exporter(binary: &str, bus: &str, ksm: &Path, log: &Path, extra: &[&str]) -> (Guarded, SocketAddr) {
    let addr = free_port();
    let mut command = Command::new(binary);
    command.args(["--bus", bus, "--listen", &addr.to_string(), "--sysfs-root"]).arg(ksm).args(extra);
    let process = Guarded::spawn_logged(&mut command, "kata-ksm-throttler-exporter", log).expect("start the exporter");
    crate::eventually::eventually_blocking(
        Duration::from_secs(10),
        || format!("the exporter to answer; log:\n{}", process.log_text()),
        || get(addr, "/", &[]).is_ok_and(|r| r.status == 200),
    );
    (process, addr)
}

/// The value of the sample `series` (name and labels exactly as written) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `promtool check metrics` (Debian's prometheus package) on `text`.
pub fn promtool_check_metrics(text: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child.stdin.take().expect("stdin").write_all(text).expect("feed promtool");
    child.wait_with_output().expect("promtool")
}
