//! A `dbus-daemon` of our own, configured like the system bus (default deny, policy files
//! included): for `--bus private` on hosts with no system bus, and for the tests.

use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// The project's bus policy, for buses that have no copy of it installed.
pub const PROJECT_POLICY: &str = include_str!("../../dbus/org.kata.KsmThrottler.conf");

#[derive(Debug, Clone, Default)]
pub struct BusConfig {
    /// Policy files to `<include>`, as the system bus includes `system.d/*.conf`.
    pub policy_files: Vec<PathBuf>,
    /// Policy texts to write beside the configuration and include.
    pub policy_texts: Vec<String>,
    /// Folders to `<includedir>` (e.g. `/usr/share/dbus-1/system.d` for polkitd's own policy).
    pub policy_dirs: Vec<PathBuf>,
    /// Folders of activation files (`<servicedir>`).
    pub service_dirs: Vec<PathBuf>,
}

impl BusConfig {
    /// The system bus's own default policy with the given files and folders added.
    pub fn render(&self, listen: &Path, extra_files: &[PathBuf]) -> String {
        let mut includes = String::new();
        for f in self.policy_files.iter().chain(extra_files) {
            includes += &format!("  <include>{}</include>\n", xml_escape(&f.to_string_lossy()));
        }
        for d in &self.policy_dirs {
            includes += &format!("  <includedir>{}</includedir>\n", xml_escape(&d.to_string_lossy()));
        }
        for d in &self.service_dirs {
            includes += &format!("  <servicedir>{}</servicedir>\n", xml_escape(&d.to_string_lossy()));
        }
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{includes}</busconfig>
"#,
            listen = xml_escape(&listen.to_string_lossy()),
        )
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

const LOG_NAME: &str = "dbus-daemon.log";

/// A running `dbus-daemon`, ended (by its PID) when dropped.
pub struct PrivateBus {
    child: Child,
    address: String,
    dir: TempDir,
}

impl PrivateBus {
    /// Starts `dbus-daemon` and waits until it has printed its address, i.e. is listening.
    pub fn start(config: &BusConfig) -> io::Result<PrivateBus> {
        let dir = tempfile::Builder::new().prefix("ksm-throttler-bus-").tempdir()?;
        // Non-root test callers must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let mut texts = vec![];
        for (i, text) in config.policy_texts.iter().enumerate() {
            let path = dir.path().join(format!("policy-{i}.conf"));
            std::fs::write(&path, text)?;
            texts.push(path);
        }
        let conf = dir.path().join("bus.conf");
        std::fs::write(&conf, config.render(&dir.path().join("bus"), &texts))?;

        // A file rather than a pipe: services the bus activates inherit it, and write to it for
        // as long as they run.
        let log = std::fs::File::create(dir.path().join(LOG_NAME))?;
        let mut command = Command::new("dbus-daemon");
        // SAFETY: only an async-signal-safe prctl between fork and exec. The bus must not
        // outlive its owner even when that owner is killed with SIGKILL.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                    .map_err(io::Error::from)
            });
        }
        let mut child = command
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting dbus-daemon: {e}")))?;

        let mut line = String::new();
        let read = match child.stdout.take() {
            Some(out) => BufReader::new(out).read_line(&mut line),
            None => Ok(0),
        };
        if read.map_or(true, |n| n == 0) || line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(dir.path().join(LOG_NAME)).unwrap_or_default();
            return Err(io::Error::other(format!("dbus-daemon did not start: {}", err.trim())));
        }
        Ok(PrivateBus { child, address: line.trim().to_owned(), dir })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the bus, and the services it started, wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_NAME)).unwrap_or_default()
    }

    /// The folder holding the bus's socket and configuration.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
