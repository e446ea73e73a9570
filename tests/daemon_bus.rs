//! The daemon binary on a private bus over a scratch sysfs, driven through a zbus client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kata_ksm_throttler::core::setting::{Mode, Profiles};
use kata_ksm_throttler::names::INTERFACE;
use kata_ksm_throttler_test_support::*;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;

const FAST: &[&str] = &["--aggressive-duration", "400ms", "--standard-duration", "400ms", "--slow-duration", "400ms"];

async fn properties(s: &Setup) -> PropertiesProxy<'static> {
    PropertiesProxy::builder(&s.conn)
        .destination(kata_ksm_throttler::names::BUS_NAME)
        .path(kata_ksm_throttler::names::OBJECT_PATH)
        .build()
        .await
        .expect("properties proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_runs_the_whole_timeline_on_time_and_restores_byte_identical() {
    let s = setup(FAST).await;
    let before = s.scratch.snapshot();
    let props = properties(&s).await;
    let mut changes = props.receive_properties_changed().await.expect("subscribe");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "initial");
    assert_eq!(s.proxy.next_step_down().await.expect("get"), 0);

    let kicked = Instant::now();
    s.proxy.kick().await.expect("kick");
    // The reply comes after the write: the files are aggressive already.
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
    let next = s.proxy.next_step_down().await.expect("get");
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as u64;
    assert!(next > now_us && next <= now_us + 400_000, "NextStepDown {next} should be within 400 ms of {now_us}");
    assert!(
        s.scratch.state_dir().join("initial-settings.json").exists(),
        "initial settings recorded before the first write"
    );

    let mut seen = vec![];
    while seen.last().map(|(s, _): &(String, Duration)| s.as_str()) != Some("initial") {
        let signal = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("a PropertiesChanged within 5 s")
            .expect("stream open");
        let args = signal.args().expect("args");
        assert_eq!(args.interface_name().as_str(), INTERFACE);
        if let Some(v) = args.changed_properties().get("CurrentSetting") {
            let setting: String = v.try_clone().expect("clone").try_into().expect("string");
            // Read the files as soon as the signal says the setting changed.
            let files = s.scratch.knobs();
            match setting.as_str() {
                "aggressive" => assert_eq!(files, expected(10, 1)),
                "standard" => assert_eq!(files, expected(100, 10)),
                "slow" => assert_eq!(files, expected(500, 100)),
                "initial" => assert_eq!(files, (0, 100, 20)),
                other => panic!("unexpected setting {other}"),
            }
            seen.push((setting, kicked.elapsed()));
        }
    }
    let names: Vec<_> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["aggressive", "standard", "slow", "initial"]);
    // Step i comes no sooner than i × 400 ms after the kick (the signal for aggressive is the
    // kick itself); the order is checked above. On the real clock only order and lower bounds
    // are: a loaded machine is late, and the timeline to the millisecond is checked on tokio's
    // paused clock (tests/engine_timeline.rs).
    for (i, (name, at)) in seen.iter().enumerate().skip(1) {
        let due = Duration::from_millis(400 * i as u64);
        assert!(*at >= due, "{name} at {at:?}, before {due:?}");
    }
    assert_eq!(s.scratch.snapshot(), before, "every knob back, byte for byte");
    assert!(!s.scratch.state_dir().join("initial-settings.json").exists(), "record removed once restored");
    assert_eq!(s.proxy.next_step_down().await.expect("get"), 0);
    assert_eq!(s.proxy.kick_count().await.expect("get"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicks_while_aggressive_restart_the_timer_without_writing() {
    let s = setup(&["--aggressive-duration", "1s"]).await;
    s.proxy.kick().await.expect("kick");
    // Mark the files: a rewrite would put the computed values back.
    s.scratch.set("sleep_millisecs", "7\n");
    for _ in 0..200 {
        s.proxy.kick().await.expect("kick");
    }
    assert_eq!(s.scratch.knob("sleep_millisecs"), "7\n", "no sysfs write after the first kick");
    assert_eq!(s.proxy.kick_count().await.expect("get"), 201);
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_mode_drives_every_mode_and_refuses_unknown_ones() {
    let s = setup(&[]).await;
    let before = s.scratch.snapshot();

    s.proxy.set_mode("off").await.expect("off");
    assert_eq!(s.scratch.knob("run"), "0\n");
    assert_eq!(
        (s.proxy.mode().await.expect("get"), s.proxy.current_setting().await.expect("get")),
        ("off".into(), "off".into())
    );
    s.proxy.kick().await.expect("a kick is accepted in any mode");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "off", "and ignored off throttle");

    // Every pinned mode, from the one list of modes.
    for pinned in Mode::ALL.into_iter().filter_map(|m| if let Mode::Pinned(p) = m { Some(p) } else { None }) {
        let mode = Mode::Pinned(pinned).as_str();
        let profile = Profiles::default().get(pinned.setting()).expect("a throttling setting");
        let want = expected(profile.anon_divisor, u64::from(profile.sleep_millisecs));
        s.proxy.set_mode(mode).await.expect(mode);
        assert_eq!(s.scratch.knobs(), want, "{mode}");
        assert_eq!(s.proxy.current_setting().await.expect("get"), mode);
        assert_eq!(s.proxy.next_step_down().await.expect("get"), 0, "a pinned setting schedules nothing");
    }

    s.proxy.set_mode("initial").await.expect("initial");
    assert_eq!(s.scratch.snapshot(), before);
    s.proxy.kick().await.expect("kick");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "initial", "initial mode is hands off");

    s.proxy.set_mode("auto").await.expect("the original's name for throttle");
    assert_eq!(s.proxy.mode().await.expect("get"), "throttle");
    s.proxy.kick().await.expect("kick");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");

    for bad in ["fast", "", "THROTTLE", &"x".repeat(1 << 20)] {
        let err = s.proxy.set_mode(bad).await.expect_err("bad mode refused");
        assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.InvalidArgs");
        let msg = error_message(&err);
        for valid in Mode::NAMES {
            assert!(msg.contains(valid), "{msg:.200} lacks {valid}");
        }
        assert!(msg.len() < 300, "the message does not echo a huge argument");
    }
    assert_eq!(s.proxy.mode().await.expect("still serving"), "throttle");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive", "nothing changed by bad calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_knob_that_cannot_be_written_is_a_sysfs_error_and_the_daemon_keeps_serving() {
    let s = setup(&[]).await;
    // A real read-only kernel attribute: a constant number (never the 1 ms it would be set to),
    // not writable even by root.
    let knob = s.scratch.ksm().join("sleep_millisecs");
    std::fs::remove_file(&knob).expect("rm");
    std::os::unix::fs::symlink("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", &knob).expect("symlink");

    let err = s.proxy.kick().await.expect_err("kick fails");
    assert_eq!(error_name(&err), "org.kata.KsmThrottler.Error.Sysfs");
    let msg = error_message(&err);
    assert!(msg.contains("sleep_millisecs") && msg.contains("os error 13"), "path and errno in {msg}");
    assert_eq!(s.proxy.current_setting().await.expect("still serving"), "initial", "what is shown is what is in force");

    // Fixed by the administrator: the next kick goes through, and the restore is complete.
    std::fs::remove_file(&knob).expect("rm");
    std::fs::write(&knob, "20\n").expect("write");
    s.proxy.set_mode("aggressive").await.expect("pinned");
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    s.proxy.set_mode("initial").await.expect("back");
    assert_eq!(s.scratch.knobs(), (0, 100, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_cycle_restores_and_exits_zero() {
    let mut s = setup(&[]).await;
    let before = s.scratch.snapshot();
    s.proxy.kick().await.expect("kick");
    assert_ne!(s.scratch.snapshot(), before);
    let status = s.daemon.terminate();
    assert!(status.success(), "exit status {status:?}; log:\n{}", s.daemon.log_text());
    assert_eq!(s.scratch.snapshot(), before);
    assert!(!s.scratch.state_dir().join("initial-settings.json").exists());
    assert!(s.daemon.log_text().contains("initial KSM settings restored"), "{}", s.daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_cycle_then_restart_puts_the_original_settings_back() {
    let mut s = setup(&[]).await;
    let before = s.scratch.snapshot();
    s.proxy.set_mode("slow").await.expect("slow");
    s.proxy.set_mode("throttle").await.expect("throttle");
    s.proxy.kick().await.expect("kick");
    s.daemon.kill9();
    assert_eq!(s.scratch.knobs(), expected(10, 1), "left aggressive by the crash");

    // The restarted daemon restores before it serves a single call.
    let daemon = Daemon::spawn(&s.bus, &s.scratch, &[]);
    wait_for_name(&s.conn, &daemon).await;
    // A call through the engine (to the mode in force, a no-op) is served after its start-up.
    s.proxy.set_mode("throttle").await.expect("serving");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "initial");
    assert_eq!(s.scratch.snapshot(), before);
    assert!(daemon.log_text().contains("previous instance stopped mid-cycle"), "{}", daemon.log_text());
    assert!(!s.scratch.state_dir().join("initial-settings.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_kept_aside_and_never_written_to_sysfs() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    std::fs::create_dir_all(scratch.state_dir()).expect("mkdir");
    let garbage = br#"{"version":1,"knobs":{"run":1,"pages_to_scan":"rm -rf""#;
    std::fs::write(scratch.state_dir().join("initial-settings.json"), garbage).expect("write");
    let before = scratch.snapshot();
    let daemon = Daemon::spawn(&bus, &scratch, &[]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    // The name is taken before the engine's start-up has read the record: a call to the mode in
    // force goes through the engine after it, changing nothing.
    proxy(&conn).await.set_mode("throttle").await.expect("serving");
    assert_eq!(scratch.snapshot(), before, "nothing written from a corrupt record");
    let kept = std::fs::read(scratch.state_dir().join("initial-settings.json.corrupt")).expect("kept aside");
    assert_eq!(kept, garbage);
    assert!(daemon.log_text().contains("corrupt"), "{}", daemon.log_text());
    assert_eq!(proxy(&conn).await.current_setting().await.expect("serving"), "initial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signal_per_transition_carries_every_changed_property() {
    let s = setup(&[]).await;
    let props = properties(&s).await;
    let mut changes = props.receive_properties_changed().await.expect("subscribe");
    s.proxy.set_mode("standard").await.expect("standard");
    let signal = tokio::time::timeout(Duration::from_secs(5), changes.next()).await.expect("signal").expect("open");
    let args = signal.args().expect("args");
    let changed: HashMap<String, String> =
        args.changed_properties().iter().map(|(k, v)| (k.to_string(), format!("{v}"))).collect();
    assert_eq!(changed.get("CurrentSetting").map(String::as_str), Some("\"standard\""), "{changed:?}");
    assert_eq!(changed.get("Mode").map(String::as_str), Some("\"standard\""), "{changed:?}");
    assert!(!changed.contains_key("KickCount"));
    let iface = InterfaceName::try_from(INTERFACE).expect("name");
    let all = props.get_all(iface).await.expect("GetAll");
    // Every property of the contract, and nothing else.
    let xml = include_str!("../dbus/org.kata.KsmThrottler.xml");
    let start = xml.find(&format!("<interface name=\"{INTERFACE}\">")).expect("the interface in the XML");
    let end = start + xml[start..].find("</interface>").expect("its end");
    assert_eq!(all.len(), xml[start..end].matches("<property ").count(), "{all:?}");
}

#[test]
fn a_missing_sysfs_root_is_a_one_line_error_and_a_failing_exit() {
    let out = std::process::Command::new(daemon_binary())
        .args(["--bus", "unix:path=/nonexistent", "--sysfs-root", "/nonexistent/ksm"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/ksm") && err.contains("CONFIG_KSM"), "{err}");
}

#[test]
fn no_system_bus_suggests_a_private_one() {
    let scratch = Scratch::fresh();
    let out = std::process::Command::new(daemon_binary())
        .env("DBUS_SYSTEM_BUS_ADDRESS", format!("unix:path={}/nobus", scratch.dir.path().display()))
        .arg("--sysfs-root")
        .arg(scratch.ksm())
        .arg("--state-dir")
        .arg(scratch.state_dir())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("system bus") && err.contains("--bus private"), "{err}");
    assert_eq!(scratch.knobs(), (0, 100, 20), "nothing touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let s = setup(&[]).await;
    let other_bus = start_bus();
    let mut second = Daemon::spawn(&other_bus, &s.scratch, &[]);
    let status = second.wait(Duration::from_secs(10));
    assert!(!status.success());
    assert!(second.log_text().contains("already drives KSM"), "{}", second.log_text());
    assert_eq!(s.proxy.current_setting().await.expect("first still serving"), "initial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_are_read_live_and_missing_counters_read_as_zero() {
    let s = setup(&[]).await;
    let write = |name: &str, v: &str| s.scratch.set(name, v);
    write("pages_shared", "1000\n");
    write("pages_sharing", "7000\n");
    write("pages_unshared", "300\n");
    write("pages_volatile", "20\n");
    write("full_scans", "12\n");
    write("general_profit", "-4096\n");
    let page = kata_ksm_throttler::io::meminfo::page_size();
    let p = &s.proxy;
    assert_eq!(p.pages_shared().await.expect("get"), 1000);
    assert_eq!(p.pages_sharing().await.expect("get"), 7000);
    assert_eq!(p.pages_unshared().await.expect("get"), 300);
    assert_eq!(p.pages_volatile().await.expect("get"), 20);
    assert_eq!(p.full_scans().await.expect("get"), 12);
    assert_eq!(p.general_profit().await.expect("get"), -4096);
    assert_eq!(p.ksm_zero_pages().await.expect("absent file"), 0);
    assert_eq!(p.saved_bytes().await.expect("get"), 7000 * page, "pages_sharing, not pages_shared, is saved");
    write("ksm_zero_pages", "10\n");
    write("pages_sharing", "8000\n");
    assert_eq!(p.saved_bytes().await.expect("get"), 8010 * page, "read live on each Get");
    assert_eq!(
        (p.run().await.expect("get"), p.pages_to_scan().await.expect("get"), p.sleep_millisecs().await.expect("get")),
        (0, 100, 20)
    );
    s.proxy.set_mode("slow").await.expect("slow");
    assert_eq!(p.sleep_millisecs().await.expect("get"), 100);
    write("pages_volatile", "lots\n");
    let err = p.pages_volatile().await.expect_err("garbage in a counter");
    assert!(error_message(&err).contains("pages_volatile"), "{err}");
    assert_eq!(p.pages_sharing().await.expect("the rest still reads"), 8000);
}

/// A stop gives the name up and answers every call the bus had routed here before that
/// (`ShuttingDown`, or the kick itself), so none is left to the bus's `NoReply` when the
/// connection closes; later calls find the name free. Callers keep 16 kicks in flight on 4
/// connections while the daemon is stopped, in 5 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_caught_by_a_stop_are_answered_shutting_down_never_no_reply() {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..5 {
        let mut s = setup(&[]).await;
        s.proxy.kick().await.expect("kick");
        let mut callers = Vec::new();
        for _ in 0..4 {
            let conn = connect(&s.bus).await;
            let proxy = proxy(&conn).await;
            for _ in 0..4 {
                let proxy = proxy.clone();
                callers.push(tokio::spawn(async move {
                    let mut kicks = 0usize;
                    loop {
                        match proxy.kick().await {
                            Ok(()) => kicks += 1,
                            Err(e) => return (kicks, error_name(&e)),
                        }
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = s.daemon.terminate();
        assert!(status.success(), "exit status {status:?}; log:\n{}", s.daemon.log_text());
        for caller in callers {
            let (kicks, error) = tokio::time::timeout(Duration::from_secs(30), caller)
                .await
                .expect("every caller is answered")
                .expect("the caller task");
            assert!(kicks > 0, "a caller was never served before the stop");
            *seen.entry(error).or_default() += 1;
        }
    }
    let allowed = ["org.kata.KsmThrottler.Error.ShuttingDown", "org.freedesktop.DBus.Error.ServiceUnknown"];
    assert!(seen.keys().all(|e| allowed.contains(&e.as_str())), "errors at the stop: {seen:?}");
    assert!(seen.contains_key(allowed[0]), "no call was caught by the stop: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_are_counted_by_cause_every_cause_present() {
    let s = setup(FAST).await;
    let counts = async || s.proxy.transition_counts().await.expect("TransitionCounts");
    let at_start = counts().await;
    let causes = [
        "kick",
        "timer",
        "mode-change",
        "mode-rewrite",
        "startup",
        "merging-settled",
        "memory-needed",
        "no-profit",
        "merging-stalled",
        "memory-arriving",
        "memory-arrived",
    ];
    let mut names: Vec<&str> = at_start.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut want = causes.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "every cause, 0 included: {at_start:?}");
    assert!(at_start.values().all(|&n| n == 0), "{at_start:?}");

    // One kick and a storm while aggressive: one transition by kick; then the timeline's three.
    for _ in 0..20 {
        s.proxy.kick().await.expect("kick");
    }
    eventually(Duration::from_secs(10), "the timeline back to initial", async || {
        s.proxy.current_setting().await.is_ok_and(|v| v == "initial")
    })
    .await;
    let after = counts().await;
    assert_eq!((after["kick"], after["timer"], after["mode-change"]), (1, 3, 0), "{after:?}");

    // SetMode during a cycle that keeps the setting (adaptive, then pinned aggressive) writes it
    // again: a re-write each; then off, a mode change; a kick in off moves nothing.
    s.proxy.kick().await.expect("kick");
    s.proxy.set_mode("adaptive").await.expect("adaptive");
    s.proxy.set_mode("aggressive").await.expect("aggressive");
    s.proxy.set_mode("off").await.expect("off");
    s.proxy.kick().await.expect("kick");
    let last = counts().await;
    assert_eq!((last["kick"], last["timer"], last["mode-change"], last["mode-rewrite"]), (2, 3, 1, 2), "{last:?}");
    assert_eq!(s.proxy.kick_count().await.expect("KickCount"), 22);
}
