//! The configuration files end to end: precedence, --check-config, refusal of bad files, SIGHUP.

use std::process::Command;
use std::time::Duration;

use kata_ksm_throttler_test_support::*;
use rustix::process::Signal;

fn write_config(scratch: &Scratch, main: &str, dropins: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = scratch.dir.path().join("etc");
    std::fs::create_dir_all(dir.join("config.d")).expect("mkdir");
    let path = dir.join("config.toml");
    std::fs::write(&path, main).expect("write");
    for (name, text) in dropins {
        std::fs::write(dir.join("config.d").join(name), text).expect("write");
    }
    path
}

#[test]
fn check_config_prints_files_then_drop_ins_then_flags() {
    let scratch = Scratch::fresh();
    let path = write_config(
        &scratch,
        "mode = \"off\"\n[aggressive]\nduration = \"10m\"\nsleep-millisecs = 2\n",
        &[("50-site.toml", "mode = \"adaptive\"\n[slow]\nanon-divisor = 1000\n")],
    );
    let out = Command::new(daemon_binary())
        .arg("--config")
        .arg(&path)
        .args(["--aggressive-duration", "45s", "--check-config"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("TOML");
    assert_eq!(printed["mode"].as_str(), Some("adaptive"), "the drop-in over the main file");
    assert_eq!(printed["aggressive"]["duration"].as_str(), Some("45s"), "the flag over both");
    assert_eq!(printed["aggressive"]["sleep-millisecs"].as_integer(), Some(2));
    assert_eq!(printed["slow"]["anon-divisor"].as_integer(), Some(1000));
    assert_eq!(printed["standard"]["duration"].as_str(), Some("2m"), "untouched keys keep the defaults");
    assert_eq!(scratch.knobs(), (0, 100, 20), "checking touches nothing");
}

#[test]
fn a_bad_file_is_refused_with_file_key_and_reason_and_nothing_starts() {
    let scratch = Scratch::fresh();
    let path = write_config(&scratch, "", &[("10-typo.toml", "[standard]\nduration = \"two minutes\"\n")]);
    for extra in [&["--check-config"][..], &[]] {
        let out = Command::new(daemon_binary())
            .arg("--config")
            .arg(&path)
            .arg("--sysfs-root")
            .arg(scratch.ksm())
            .arg("--state-dir")
            .arg(scratch.state_dir())
            .args(["--bus", "unix:path=/nonexistent"])
            .args(extra)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("10-typo.toml: standard.duration: \"two minutes\""), "{err}");
    }
    assert_eq!(scratch.knobs(), (0, 100, 20));
}

async fn wait_for_knob(scratch: &Scratch, name: &str, want: &str) {
    let what = || format!("{name} to become {want:?} (it reads {:?})", scratch.knob(name));
    eventually(Duration::from_secs(10), what, async || scratch.knob(name) == want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_losing_the_cycle_and_refuses_a_bad_file() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let path = write_config(&scratch, "[aggressive]\nsleep-millisecs = 1\n", &[]);
    let config = path.to_string_lossy().into_owned();
    let daemon = Daemon::spawn(&bus, &scratch, &["--config", &config]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let proxy = proxy(&conn).await;
    proxy.kick().await.expect("kick");
    let deadline = proxy.next_step_down().await.expect("get");
    assert_eq!(scratch.knob("sleep_millisecs"), "1\n");

    std::fs::write(&path, "[aggressive]\nsleep-millisecs = 3\n").expect("write");
    daemon.signal(Signal::HUP);
    wait_for_knob(&scratch, "sleep_millisecs", "3\n").await;
    assert_eq!(proxy.current_setting().await.expect("get"), "aggressive", "the cycle goes on");
    // The same deadline, published again: its wall-clock form is recomputed from two clocks read
    // a moment apart, so it may move by a microsecond or so (a restarted cycle would move it by
    // at least the time the calls above took).
    let again = proxy.next_step_down().await.expect("get");
    assert!(again.abs_diff(deadline) <= 10, "and keeps its deadline: {again} vs {deadline}");

    std::fs::write(&path, "[aggressive]\nsleep-millisecs = \"fast\"\n").expect("write");
    daemon.signal(Signal::HUP);
    let what = || format!("the refusal to be logged; log:\n{}", daemon.log_text());
    eventually(Duration::from_secs(10), what, async || daemon.log_text().contains("keeping the running configuration"))
        .await;
    assert!(daemon.log_text().contains("config.toml: line 2"), "{}", daemon.log_text());
    assert_eq!(scratch.knob("sleep_millisecs"), "3\n", "the running configuration is kept");
    assert_eq!(proxy.current_setting().await.expect("still serving"), "aggressive");
}
