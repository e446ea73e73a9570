//! D-Bus activation and exit on idle with the real binary: a private bus whose `<servicedir>`
//! holds a copy of `dbus/org.kata.KsmThrottler.service` (its `Exec=` pointed at the built binary
//! on a scratch sysfs), started by the first call, gone when idle, started again by the next.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus};
use kata_ksm_throttler::core::knobs::Knobs;
use kata_ksm_throttler::io::state_file::{Handover, StateFile};
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler_test_support::child::{alive, end_foreign};
use kata_ksm_throttler_test_support::*;
use tempfile::TempDir;
use zbus::fdo::DBusProxy;
use zbus::names::BusName;

const SHIPPED_EXEC: &str = "/usr/libexec/kata-ksm-throttler --exit-idle-after 60s";
// Aggressive lasts long enough for the knobs to be read after the kick's reply on a loaded
// machine (at 300 ms, a busy `cargo test` once saw the step down to standard first).
const FAST: &str = "--aggressive-duration 1s --standard-duration 300ms --slow-duration 300ms";

/// A private bus that can start the throttler, and the scratch sysfs the throttler drives.
struct Activatable {
    bus: PrivateBus,
    _services: TempDir,
    scratch: Scratch,
    /// Every throttler PID seen; any still running is ended when the test ends (if it still
    /// runs the daemon binary: dbus-daemon, not the test, is its parent).
    pids: Vec<u32>,
}

impl Drop for Activatable {
    fn drop(&mut self) {
        for &pid in &self.pids {
            end_foreign(pid, daemon_binary(), Duration::from_secs(5));
        }
    }
}

fn shipped_service_file() -> String {
    std::fs::read_to_string(project_file("dbus/org.kata.KsmThrottler.service")).expect("read .service")
}

fn activatable(flags: &str) -> Activatable {
    let scratch = Scratch::fresh();
    let services = tempfile::tempdir().expect("tempdir");
    let exec = format!("{} {} {flags}", daemon_binary().display(), scratch.args().join(" "));
    let shipped = shipped_service_file();
    let copy = shipped.replace(&format!("Exec={SHIPPED_EXEC}"), &format!("Exec={exec}"));
    assert_ne!(copy, shipped, "the shipped file has Exec={SHIPPED_EXEC}");
    std::fs::write(services.path().join("org.kata.KsmThrottler.service"), copy).expect("write .service");
    // No --bus in Exec=: the throttler finds the bus that started it in DBUS_SYSTEM_BUS_ADDRESS,
    // as it does on a real system bus.
    let bus = start_bus_with(BusConfig { service_dirs: vec![services.path().to_owned()], ..BusConfig::default() });
    Activatable { bus, _services: services, scratch, pids: vec![] }
}

impl Activatable {
    /// The PID owning the name now, remembered for clean-up.
    async fn owner_pid(&mut self, dbus: &DBusProxy<'_>) -> u32 {
        let pid = dbus.get_connection_unix_process_id(name()).await.expect("owner's PID");
        if !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
        pid
    }

    fn log(&self) -> String {
        self.bus.log_text()
    }
}

fn name() -> BusName<'static> {
    BusName::try_from(BUS_NAME).expect("name")
}

/// Waits until nobody owns the name and `pid` has ended (a zombie has: dbus-daemon reaps what
/// it started); how long that took.
async fn wait_for_exit(dbus: &DBusProxy<'_>, pid: u32, log: impl Fn() -> String) -> Duration {
    let start = Instant::now();
    let what = || format!("throttler {pid} to exit; log:\n{}", log());
    eventually(Duration::from_secs(10), what, async || {
        !dbus.name_has_owner(name()).await.expect("NameHasOwner") && !alive(pid)
    })
    .await;
    start.elapsed()
}

#[test]
fn the_shipped_activation_file_names_the_unit_and_runs_as_root() {
    let text = shipped_service_file();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(
        lines,
        [
            "[D-BUS Service]",
            "Name=org.kata.KsmThrottler",
            &format!("Exec={SHIPPED_EXEC}"),
            "User=root",
            "SystemdService=kata-ksm-throttler.service",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_starts_the_throttler_which_exits_when_idle_and_is_started_again() {
    let mut a = activatable(&format!("--exit-idle-after 1s {FAST}"));
    let before = a.scratch.snapshot();
    let conn = connect(&a.bus).await;
    let dbus = DBusProxy::new(&conn).await.expect("dbus proxy");
    assert!(!dbus.name_has_owner(name()).await.expect("NameHasOwner"), "not running yet");
    let activatable = dbus.list_activatable_names().await.expect("ListActivatableNames");
    assert!(activatable.iter().any(|n| n.as_str() == BUS_NAME));

    let throttler = proxy(&conn).await;
    throttler.kick().await.expect("the kick that starts it is answered");
    assert_eq!(a.scratch.knobs(), expected(10, 1), "and acted on");
    let first = a.owner_pid(&dbus).await;
    assert_eq!(throttler.kick_count().await.expect("get"), 1, "the starting kick was delivered once");

    // 1 s + 2 × 300 ms of cycle, then 1 s at rest: 2.6 s from the kick, less what the checks
    // above took.
    let took = wait_for_exit(&dbus, first, || a.log()).await;
    assert!(took >= Duration::from_millis(2000), "exited after {took:?}, before the cycle and the idle second");
    assert_eq!(a.scratch.snapshot(), before, "the cycle finished and restored before the exit");
    for f in ["initial-settings.json", "handover.json"] {
        assert!(!a.scratch.state_dir().join(f).exists(), "{f} left behind");
    }
    assert!(a.log().contains("exiting on idle"), "{}", a.log());

    throttler.kick().await.expect("the next kick starts it again");
    assert_eq!(a.scratch.knobs(), expected(10, 1), "and acted on");
    let second = a.owner_pid(&dbus).await;
    assert_ne!(second, first);
    assert_eq!(throttler.kick_count().await.expect("get"), 1, "a fresh instance");
    wait_for_exit(&dbus, second, || a.log()).await;
    assert_eq!(a.scratch.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_set_at_run_time_keeps_the_started_throttler_running() {
    let mut a = activatable("--exit-idle-after 1s");
    let before = a.scratch.snapshot();
    let conn = connect(&a.bus).await;
    let dbus = DBusProxy::new(&conn).await.expect("dbus proxy");
    let throttler = proxy(&conn).await;
    throttler.set_mode("off").await.expect("SetMode starts it");
    let pid = a.owner_pid(&dbus).await;
    assert_eq!(a.scratch.knob("run"), "0\n");
    // Three idle periods: an instance that exited would lose the mode.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.owner_pid(&dbus).await, pid, "still the same instance");
    assert_eq!(throttler.mode().await.expect("get"), "off");

    throttler.set_mode("throttle").await.expect("back to the start-up mode");
    wait_for_exit(&dbus, pid, || a.log()).await;
    assert_eq!(a.scratch.snapshot(), before);
}

fn write_handover(state_dir: &Path, setting: &str, next_step_in: Duration) {
    let state = StateFile::new(state_dir);
    state
        .save(&Knobs {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            advisor_mode: Some("none".into()),
            smart_scan: Some(1),
        })
        .expect("record");
    let due = SystemTime::now() + next_step_in;
    let us = due.duration_since(UNIX_EPOCH).expect("clock").as_micros() as u64;
    state
        .save_handover(&Handover { mode: "throttle".into(), setting: setting.into(), next_step_down_us: us })
        .expect("handover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_carries_on_from_a_handover_instead_of_restoring() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    // What an instance that handed over leaves: KSM standard, the record, the hand-over.
    scratch.set("run", "1\n");
    scratch.set("sleep_millisecs", "10\n");
    write_handover(&scratch.state_dir(), "standard", Duration::from_secs(3));
    let mut daemon = Daemon::spawn(&bus, &scratch, &["--standard-duration", "10s", "--slow-duration", "300ms"]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let throttler = proxy(&conn).await;
    assert_eq!(throttler.current_setting().await.expect("get"), "standard", "carried on");
    assert_eq!(scratch.knobs(), expected(100, 10), "applied again: pages_to_scan from AnonPages");
    assert!(!scratch.state_dir().join("handover.json").exists(), "used once");
    let next = throttler.next_step_down().await.expect("get");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros() as u64;
    assert!(next > now && next <= now + 3_000_000, "the hand-over's deadline ({next}), not a new 10 s one");

    let what = || format!("the steps down to initial; log:\n{}", daemon.log_text());
    eventually(Duration::from_secs(10), what, async || throttler.current_setting().await.expect("get") == "initial")
        .await;
    assert_eq!(scratch.snapshot(), before, "the recorded settings back");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_for_exit_on_idle_waits_for_the_one_still_exiting() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let mut first = Daemon::spawn(&bus, &scratch, &["--exit-idle-after", "1h"]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &first).await;

    let mut second = Daemon::spawn(&bus, &scratch, &["--exit-idle-after", "1h"]);
    let what = || format!("the second to wait for the first; log:\n{}", second.log_text());
    eventually(Duration::from_secs(10), what, async || second.log_text().contains("waiting up to")).await;
    assert!(first.terminate().success());
    let what = || format!("the second to take over; log:\n{}", second.log_text());
    eventually(Duration::from_secs(10), what, async || bus::owner_pid(&conn, BUS_NAME).await == Some(second.pid()))
        .await;
    assert!(second.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_bus_restores_and_exits_non_zero() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut daemon = Daemon::spawn(&bus, &scratch, &[]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    proxy(&conn).await.kick().await.expect("kick");
    assert_eq!(scratch.knobs(), expected(10, 1));
    drop(conn);
    drop(bus);
    let status = daemon.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("bus connection closed"), "{}", daemon.log_text());
    assert_eq!(scratch.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_reaching_a_handler_do_not_hold_off_the_idle_exit() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let mut daemon = Daemon::spawn(&bus, &scratch, &["--exit-idle-after", "1s"]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    // zbus answers these itself (wrong argument types); were they counted as calls in flight,
    // the throttler would never find itself idle.
    for (member, err) in [
        ("Kick", conn.call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), "Kick", &("x",)).await),
        ("SetMode", conn.call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), "SetMode", &(7u32,)).await),
    ] {
        let err = err.expect_err("wrong arguments refused");
        assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.InvalidArgs", "{member}");
    }
    proxy(&conn).await.set_mode("throttle").await.expect("a call that reaches its handler");
    // Not activatable here: nothing can be handed over, and nothing needs to be.
    let status = daemon.wait(Duration::from_secs(10));
    assert!(status.success(), "log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("exiting on idle"), "{}", daemon.log_text());
}
