//! Issue 30, item 7: the bus going away under the daemon (dbus-daemon restarted). Nobody can
//! reach the throttler any more, so it must not go on driving KSM: it puts the administrator's
//! settings back and exits with a failure (systemd's `Restart=on-failure` and D-Bus activation
//! bring it back on the new bus).

use std::process::{Command, Stdio};
use std::time::Duration;

use kata_ksm_throttler_test_support::child::signal_pid;
use kata_ksm_throttler_test_support::*;
use rustix::process::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bus_makes_the_daemon_restore_and_exit_and_a_new_one_serves_the_new_bus() {
    restarted_bus(&[]).await;
}

/// As the unit runs it: exiting on idle, whose edge watches the bus too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bus_under_a_daemon_that_exits_on_idle_makes_it_restore_and_exit() {
    restarted_bus(&["--exit-idle-after", "60s"]).await;
}

async fn restarted_bus(flags: &[&str]) {
    // Long steps: only the bus going away can end this cycle within the test.
    let mut args = vec!["--aggressive-duration", "10m"];
    args.extend_from_slice(flags);
    let mut s = setup(&args).await;
    let before = s.scratch.snapshot();
    s.proxy.kick().await.expect("kick");
    assert_eq!(s.scratch.knobs(), expected(10, 1), "KSM driven");
    assert!(s.scratch.state_dir().join("initial-settings.json").exists());

    // dbus-daemon restarted on the same socket, as `systemctl restart dbus` does.
    let conf = s.bus.dir().join("bus.conf");
    let stopped = std::time::Instant::now();
    signal_pid(s.bus.pid(), Signal::TERM);
    let socket = s.bus.dir().join("bus");
    eventually(Duration::from_secs(10), "the old bus gone", async || !socket.exists()).await;
    let mut new_bus = Command::new("dbus-daemon");
    new_bus
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--nopidfile"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _new_bus = Guarded::new(new_bus.spawn().expect("dbus-daemon"), "the restarted dbus-daemon");

    let status = s.daemon.wait(Duration::from_secs(20));
    eprintln!(
        "bus restarted under the daemon {flags:?}: restored and exited {:?} after the bus was stopped",
        stopped.elapsed()
    );
    assert!(!status.success(), "a failure, for systemd to restart it: {status:?}\n{}", s.daemon.log_text());
    assert_eq!(s.scratch.snapshot(), before, "the originals are back, byte for byte:\n{}", s.daemon.log_text());
    assert!(!s.scratch.state_dir().join("initial-settings.json").exists(), "the record is gone");
    assert!(
        s.daemon.log_text().contains("the bus connection closed: restoring and exiting"),
        "{}",
        s.daemon.log_text()
    );

    // What systemd does next: a new instance, on a bus (a fresh one here: the restarted one has
    // a new GUID that the fixture's address does not carry), from a clean state.
    let bus = start_bus();
    let daemon = Daemon::spawn(&bus, &s.scratch, &[]);
    let conn = connect(&bus).await;
    daemon::wait_for_name(&conn, &daemon).await;
    proxy(&conn).await.kick().await.expect("kick on the new bus");
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    assert!(!daemon.log_text().contains("stopped mid-cycle"), "nothing left to restore: {}", daemon.log_text());
}
