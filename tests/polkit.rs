//! Authorization with a real `polkitd` on the test's private bus, the project's polkit actions
//! installed where polkitd reads them, and callers that are really not root: a child process
//! (this test binary, run again as `nobody`) makes the calls.
//!
//! polkitd is started as root and switches to its `polkitd` user itself (started as `polkitd`, it
//! fails to drop its groups). Its bus policy, `/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf`,
//! is included in the private bus. Tests that put files in /usr/share/polkit-1 or /etc/polkit-1
//! hold an exclusive flock, since cargo runs tests (and other checkouts run theirs) in parallel.
//!
//! Those tests edit the host, so they run only when asked: `KSM_THROTTLER_EDIT_HOST_POLKIT=1`
//! (CI sets it). Without it they say they were skipped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kata_ksm_throttler::bus::authorize::{POLKIT_INTERACTIVE_LIMIT, POLKIT_LIMIT, POLKIT_PENDING_PER_CALLER};
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus};
use kata_ksm_throttler::names::BUS_NAME;
use kata_ksm_throttler_test_support::*;
use kata_ksm_throttler_test_support::{bus, daemon, switch};
use rustix::process::Signal;
use zbus::proxy::MethodFlags;

const POLKITD: &str = "/usr/lib/polkit-1/polkitd";
const POLKIT_BUS_POLICY: &str = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf";
const ACTIONS: &str = "/usr/share/polkit-1/actions/org.kata.KsmThrottler.policy";
const RULES: &str = "/etc/polkit-1/rules.d/10-kata-ksm-throttler-test.rules";
const LOCK: &str = "/run/lock/kata-ksm-throttler-polkit.lock";
const NOBODY: u32 = 65534;

const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
const INTERACTIVE_REQUIRED: &str = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";

/// The polkit files, installed while the lock is held and put back as found when dropped.
struct PolkitFiles {
    /// What was at [`ACTIONS`] before (`None`: nothing, so remove it after).
    actions_before: Option<Vec<u8>>,
    wrote_actions: bool,
    _lock: File,
}

impl PolkitFiles {
    fn install(rules: Option<&str>) -> PolkitFiles {
        let lock = File::options().create(true).truncate(false).write(true).open(LOCK).expect("lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        // A run killed before its clean-up left this one; it is ours by name.
        let _ = std::fs::remove_file(RULES);

        let ours = std::fs::read(project_file("polkit/org.kata.KsmThrottler.policy")).expect("read actions");
        let actions_before = std::fs::read(ACTIONS).ok();
        let wrote_actions = actions_before.as_deref() != Some(&ours[..]);
        let files = PolkitFiles { actions_before, wrote_actions, _lock: lock };
        if wrote_actions {
            std::fs::write(ACTIONS, &ours).expect("install the actions");
        }
        if let Some(rules) = rules {
            std::fs::write(RULES, rules).expect("install the rules");
        }
        files
    }
}

impl Drop for PolkitFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(RULES);
        if self.wrote_actions {
            let _ = match &self.actions_before {
                Some(before) => std::fs::write(ACTIONS, before),
                None => std::fs::remove_file(ACTIONS),
            };
        }
    }
}

/// A real polkitd on `bus`, ended by PID when dropped.
struct Polkitd {
    process: Guarded,
}

impl Polkitd {
    async fn start(bus: &PrivateBus, log_dir: &Path) -> Polkitd {
        let mut command = Command::new(POLKITD);
        command.env("DBUS_SYSTEM_BUS_ADDRESS", bus.address());
        let process = Guarded::spawn_logged(&mut command, "polkitd", &log_dir.join("polkitd.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        let polkitd = Polkitd { process };
        let conn = connect(bus).await;
        let what = || format!("polkitd to take its name; log:\n{}", polkitd.log_text());
        bus::wait_for_owner(&conn, "org.freedesktop.PolicyKit1", what).await;
        polkitd
    }

    fn signal(&self, sig: Signal) {
        self.process.signal(sig).unwrap_or_else(|e| panic!("{e}"));
    }

    fn stop(&mut self) {
        self.process.kill().unwrap_or_else(|e| panic!("killing polkitd: {e}"));
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// Bus with both policies, polkitd, the throttler on a scratch sysfs, and a root client.
struct World {
    setup: Setup,
    polkitd: Polkitd,
    _files: PolkitFiles,
}

/// The world of a test that edits the host's polkit folders; `None` (and a line saying so)
/// when it was not asked to.
async fn world(test: &str, rules: Option<&str>, daemon_flags: &[&str]) -> Option<World> {
    let what = "installs polkit actions in /usr/share/polkit-1 and a rule in /etc/polkit-1 on this host";
    if !switch::asked(switch::EDIT_HOST_POLKIT, test, what) {
        return None;
    }
    let files = PolkitFiles::install(rules);
    let bus = start_bus_with(BusConfig { policy_files: vec![POLKIT_BUS_POLICY.into()], ..BusConfig::default() });
    let scratch = Scratch::fresh();
    let polkitd = Polkitd::start(&bus, scratch.path()).await;
    let daemon = Daemon::spawn(&bus, &scratch, daemon_flags);
    let setup = daemon::serve(bus, scratch, daemon).await;
    Some(World { setup, polkitd, _files: files })
}

/// What a call made as `nobody` came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok(String),
    Err { name: String, message: String },
}

impl Outcome {
    fn error_name(&self) -> &str {
        match self {
            Outcome::Err { name, .. } => name,
            Outcome::Ok(_) => "(succeeded)",
        }
    }
}

/// Runs `call` in a child process as `nobody` (this binary's `nobody_client`), waiting for it.
fn as_nobody(bus: &PrivateBus, call: &str, interactive: bool) -> Outcome {
    let out = nobody_command(bus, call, interactive).output().expect("run the client");
    parse_client_output(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr))
}

fn nobody_command(bus: &PrivateBus, call: &str, interactive: bool) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--ignored", "--exact", "nobody_client", "--nocapture", "--test-threads=1"])
        .env("KSM_TEST_ADDRESS", bus.address())
        .env("KSM_TEST_CALL", call)
        .env("KSM_TEST_INTERACTIVE", if interactive { "1" } else { "0" })
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn parse_client_output(stdout: &str, stderr: &str) -> Outcome {
    // The test harness starts its "test nobody_client ..." line before the client prints.
    let after = |tag: &str| stdout.lines().find_map(|l| l.split_once(tag).map(|(_, rest)| rest.to_owned()));
    let uid = after("CLIENT-UID ").unwrap_or_default();
    assert_eq!(uid, NOBODY.to_string(), "the client runs as nobody; stdout:\n{stdout}\nstderr:\n{stderr}");
    let result = after("CLIENT-RESULT ")
        .unwrap_or_else(|| panic!("no result from the client; stdout:\n{stdout}\nstderr:\n{stderr}"));
    match result.split_once(' ') {
        Some(("ok", value)) => Outcome::Ok(value.to_owned()),
        Some(("err", rest)) => {
            let (name, message) = rest.split_once(' ').unwrap_or((rest, ""));
            Outcome::Err { name: name.to_owned(), message: message.to_owned() }
        }
        _ => panic!("unreadable client result {result:?}"),
    }
}

/// Not a test: the client the tests run as `nobody`. It prints its uid and what its one call
/// came to, on lines the parent reads.
#[test]
#[ignore = "run by the polkit tests as a child process, as nobody"]
fn nobody_client() {
    let address = std::env::var("KSM_TEST_ADDRESS").expect("KSM_TEST_ADDRESS");
    let call = std::env::var("KSM_TEST_CALL").expect("KSM_TEST_CALL");
    let flags = match std::env::var("KSM_TEST_INTERACTIVE").as_deref() {
        Ok("1") => MethodFlags::ALLOW_INTERACTIVE_AUTH,
        _ => MethodFlags::empty(),
    };
    println!("CLIENT-UID {}", rustix::process::getuid().as_raw());
    // A bound of the caller's own, as libdbus and sd-bus callers have (25 s by default).
    let timeout = std::env::var("KSM_TEST_TIMEOUT_S").ok().and_then(|s| s.parse().ok()).map(Duration::from_secs);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result: zbus::Result<String> = runtime.block_on(async {
        let mut builder = zbus::connection::Builder::address(address.as_str());
        if let Some(timeout) = timeout {
            builder = builder.method_timeout(timeout);
        }
        let conn = builder.build().await?;
        let throttler = bus::proxy_result(&conn).await?;
        match call.as_str() {
            "kick" => throttler.inner().call_with_flags::<_, _, ()>("Kick", flags, &()).await.map(|_| String::new()),
            "set-mode-off" => {
                throttler.inner().call_with_flags::<_, _, ()>("SetMode", flags, &("off",)).await.map(|_| String::new())
            }
            "set-need-gate" => throttler
                .inner()
                .call_with_flags::<_, _, ()>("SetNeedGate", flags, &("when-needed",))
                .await
                .map(|_| String::new()),
            "read" => throttler.current_setting().await,
            "sandboxes" => {
                let inspect = ksm_throttler_contract::proxy::InspectProxy::new(&conn).await?;
                inspect.inner().call_with_flags::<_, _, String>("Sandboxes", flags, &()).await.map(|a| match a {
                    Some(json) if json.starts_with('{') => "json".to_owned(),
                    other => format!("{other:?}"),
                })
            }
            "own" => conn.request_name(BUS_NAME).await.map(|()| String::new()),
            // More Kicks at once than one caller may have waiting for polkit: the error names (or
            // "ok") in the order the answers came.
            "kick-burst" => {
                use futures_util::StreamExt;
                let calls: futures_util::stream::FuturesUnordered<_> = (0..POLKIT_PENDING_PER_CALLER + 2)
                    .map(|_| throttler.inner().call_with_flags::<_, _, ()>("Kick", flags, &()))
                    .collect();
                let answers: Vec<String> =
                    calls.map(|r| r.map_or_else(|e| error_name(&e), |_| "ok".to_owned())).collect().await;
                Ok(answers.join(","))
            }
            other => panic!("unknown call {other}"),
        }
    });
    match result {
        Ok(value) => println!("CLIENT-RESULT ok {value}"),
        Err(e) => println!("CLIENT-RESULT err {} {}", error_name(&e), error_message(&e).replace('\n', " ")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_rule_nobody_is_refused_both_actions_and_root_is_served() {
    let Some(w) = world("with_no_rule_nobody_is_refused_both_actions_and_root_is_served", None, &[]).await else {
        return;
    };
    let s = &w.setup;
    let before = s.scratch.snapshot();

    // kick: allow_active only, and a process with no session has none.
    let kick = as_nobody(&s.bus, "kick", false);
    assert_eq!(kick.error_name(), ACCESS_DENIED, "{kick:?}");
    assert!(format!("{kick:?}").contains("org.kata.KsmThrottler.kick"), "{kick:?}");
    let kick = as_nobody(&s.bus, "kick", true);
    assert_eq!(kick.error_name(), ACCESS_DENIED, "no authentication can help: {kick:?}");

    // set-mode: auth_admin_keep, so an administrator's password would do, if the caller allows
    // being asked; it did not.
    let set = as_nobody(&s.bus, "set-mode-off", false);
    assert_eq!(set.error_name(), INTERACTIVE_REQUIRED, "{set:?}");
    assert!(format!("{set:?}").contains("org.kata.KsmThrottler.set-mode"), "{set:?}");
    // Allowed to ask, polkit finds no authentication agent to ask with: refused.
    let set = as_nobody(&s.bus, "set-mode-off", true);
    assert_eq!(set.error_name(), ACCESS_DENIED, "{set:?}");
    // SetNeedGate is under the same action.
    let gate = as_nobody(&s.bus, "set-need-gate", false);
    assert_eq!(gate.error_name(), INTERACTIVE_REQUIRED, "{gate:?}");
    assert!(format!("{gate:?}").contains("org.kata.KsmThrottler.set-mode"), "{gate:?}");
    assert_eq!(s.proxy.need_gate().await.expect("get"), "always", "refused: unchanged");

    assert_eq!(s.scratch.snapshot(), before, "nothing done for refused calls");
    assert_eq!(s.proxy.kick_count().await.expect("get"), 0, "refused kicks are not counted");
    assert_eq!(as_nobody(&s.bus, "read", false), Outcome::Ok("initial".into()), "properties are open");
    // inspect: read-only but auth_admin_keep, like set-mode.
    let look = as_nobody(&s.bus, "sandboxes", false);
    assert_eq!(look.error_name(), INTERACTIVE_REQUIRED, "{look:?}");
    assert!(format!("{look:?}").contains("org.kata.KsmThrottler.inspect"), "{look:?}");
    let inspect = ksm_throttler_contract::proxy::InspectProxy::new(&s.conn).await.expect("proxy");
    assert!(inspect.sandboxes().await.expect("root inspects").starts_with('{'));

    // Root is not asked about.
    s.proxy.kick().await.expect("root kicks");
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    s.proxy.set_mode("off").await.expect("root sets the mode");
    assert_eq!(s.scratch.knob("run"), "0\n");
    assert!(w.polkitd.log_text().contains("Acquired the name"), "{}", w.polkitd.log_text());
}

const GRANT_NOBODY: &str = r#"// Test rule of kata-ksm-throttler's tests/polkit.rs; removed after the test.
polkit.addRule(function(action, subject) {
    if ((action.id == "org.kata.KsmThrottler.kick" || action.id == "org.kata.KsmThrottler.set-mode"
         || action.id == "org.kata.KsmThrottler.inspect")
        && subject.user == "nobody") {
        return polkit.Result.YES;
    }
});
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_granting_the_actions_lets_nobody_kick_and_set_the_mode() {
    let Some(w) = world("a_rule_granting_the_actions_lets_nobody_kick_and_set_the_mode", Some(GRANT_NOBODY), &[]).await
    else {
        return;
    };
    let s = &w.setup;
    assert_eq!(as_nobody(&s.bus, "kick", false), Outcome::Ok(String::new()));
    assert_eq!(s.scratch.knobs(), expected(10, 1), "the kick acted");
    assert_eq!(s.proxy.kick_count().await.expect("get"), 1);
    assert_eq!(as_nobody(&s.bus, "set-mode-off", false), Outcome::Ok(String::new()));
    assert_eq!(s.proxy.mode().await.expect("get"), "off");
    assert_eq!(s.scratch.knob("run"), "0\n");
    assert_eq!(as_nobody(&s.bus, "sandboxes", false), Outcome::Ok("json".into()));
    assert_eq!(as_nobody(&s.bus, "set-need-gate", false), Outcome::Ok(String::new()));
    assert_eq!(s.proxy.need_gate().await.expect("get"), "when-needed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_polkitd_gone_nobody_is_refused_clearly_and_root_is_still_served() {
    let Some(mut w) =
        world("with_polkitd_gone_nobody_is_refused_clearly_and_root_is_still_served", Some(GRANT_NOBODY), &[]).await
    else {
        return;
    };
    w.polkitd.stop();
    let s = &w.setup;
    // Even with a rule that would grant it: polkit cannot be asked, so no.
    match as_nobody(&s.bus, "kick", false) {
        Outcome::Err { name, message } => {
            assert_eq!(name, ACCESS_DENIED);
            assert!(message.contains("polkit could not be asked"), "{message}");
        }
        ok => panic!("allowed without polkit: {ok:?}"),
    }
    assert_eq!(as_nobody(&s.bus, "set-mode-off", true).error_name(), ACCESS_DENIED);
    assert_eq!(s.scratch.knobs(), (0, 100, 20));
    s.proxy.kick().await.expect("root needs no polkit");
    assert_eq!(s.scratch.knobs(), expected(10, 1));
    assert_eq!(s.proxy.current_setting().await.expect("still serving"), "aggressive");
}

/// Issue 14, item 7: a hung polkitd is waited for a bounded time, then the caller is refused
/// (fail closed), and root is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_polkitd_is_waited_for_a_bounded_time_then_refused_and_root_is_served_meanwhile() {
    let Some(w) = world(
        "a_hung_polkitd_is_waited_for_a_bounded_time_then_refused_and_root_is_served_meanwhile",
        Some(GRANT_NOBODY),
        &[],
    )
    .await
    else {
        return;
    };
    let s = &w.setup;
    w.polkitd.signal(Signal::STOP);
    let started = std::time::Instant::now();
    let client = nobody_command(&s.bus, "kick", false).spawn().expect("client");
    let client = Guarded::new(client, "the client as nobody");
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.proxy.kick().await.expect("root needs no polkit, hung or not");
    assert_eq!(s.proxy.current_setting().await.expect("serving"), "aggressive");
    let out = client.wait_with_output().expect("wait for the client");
    let waited = started.elapsed();
    w.polkitd.signal(Signal::CONT);
    match parse_client_output(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr)) {
        Outcome::Err { name, message } => {
            assert_eq!(name, ACCESS_DENIED);
            assert!(message.contains("did not answer within"), "{message}");
        }
        ok => panic!("allowed by a polkitd that never answered: {ok:?}"),
    }
    assert!(waited >= POLKIT_LIMIT, "refused after {waited:?}, before the limit");
    eprintln!("a hung polkitd: nobody refused after {waited:?}");
}

/// Issue 30, item 2: a call that allows interactive authorization is bounded too (longer: a
/// person may be typing a password), and the refusal comes before the caller's own 25 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_polkitd_refuses_an_interactive_call_within_its_longer_bound() {
    let Some(w) = world("a_hung_polkitd_refuses_an_interactive_call_within_its_longer_bound", None, &[]).await else {
        return;
    };
    let s = &w.setup;
    w.polkitd.signal(Signal::STOP);
    let started = std::time::Instant::now();
    let mut client = nobody_command(&s.bus, "kick", true);
    client.env("KSM_TEST_TIMEOUT_S", "25");
    let client = Guarded::new(client.spawn().expect("client"), "the client as nobody");
    let out = client.wait_with_output().expect("wait for the client");
    let waited = started.elapsed();
    w.polkitd.signal(Signal::CONT);
    match parse_client_output(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr)) {
        Outcome::Err { name, message } => {
            assert_eq!(name, ACCESS_DENIED, "answered before the caller's 25 s: {message}");
            assert!(message.contains("did not answer within 20s"), "{message}");
        }
        ok => panic!("allowed by a polkitd that never answered: {ok:?}"),
    }
    assert!(waited >= POLKIT_INTERACTIVE_LIMIT, "refused after {waited:?}, before the limit");
    assert_eq!(s.scratch.knobs(), (0, 100, 20), "nothing done");
    eprintln!("a hung polkitd: an interactive call refused after {waited:?}");
}

/// Issue 30, item 2: one caller may have only so many checks waiting for polkit; the ones over
/// are refused at once with LimitsExceeded, before polkit's bound ends the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_may_have_only_so_many_checks_waiting_for_polkit() {
    let Some(w) = world("one_caller_may_have_only_so_many_checks_waiting_for_polkit", None, &[]).await else {
        return;
    };
    let s = &w.setup;
    w.polkitd.signal(Signal::STOP);
    let outcome = as_nobody(&s.bus, "kick-burst", false);
    w.polkitd.signal(Signal::CONT);
    let Outcome::Ok(answers) = outcome else { panic!("the burst: {outcome:?}") };
    let answers: Vec<&str> = answers.split(',').collect();
    let over = ["org.freedesktop.DBus.Error.LimitsExceeded"; 2];
    assert_eq!(answers[..2], over, "the two over the cap first, at once: {answers:?}");
    assert_eq!(answers[2..], [ACCESS_DENIED; POLKIT_PENDING_PER_CALLER], "the others once polkit's bound passed");
    // The count went back down: the same caller is asked about again (and refused by polkit).
    assert_eq!(as_nobody(&s.bus, "kick", false).error_name(), ACCESS_DENIED);
    assert_eq!(s.scratch.knobs(), (0, 100, 20), "nothing done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_polkit_keeps_an_idle_throttler_from_exiting() {
    let Some(w) =
        world("a_call_waiting_for_polkit_keeps_an_idle_throttler_from_exiting", None, &["--exit-idle-after", "1s"])
            .await
    else {
        return;
    };
    let s = &w.setup;
    w.polkitd.signal(Signal::STOP);
    let client = nobody_command(&s.bus, "kick", false).spawn().expect("client");
    let client = Guarded::new(client, "the client as nobody");
    // The engine is at rest; only the call in flight keeps the throttler on the bus.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bus::owner_pid(&s.conn, BUS_NAME).await, Some(s.daemon.pid()), "still owned");

    w.polkitd.signal(Signal::CONT);
    let out = client.wait_with_output().expect("wait for the client");
    let outcome = parse_client_output(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr));
    assert_eq!(outcome.error_name(), ACCESS_DENIED, "answered by polkit, not cut off: {outcome:?}");
    let what = || format!("the idle throttler to exit; log:\n{}", s.daemon.log_text());
    eventually(Duration::from_secs(10), what, async || !bus::has_owner(&s.conn, BUS_NAME).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_policy_lets_no_one_but_root_own_the_name() {
    // The project's policy file, as loaded by every test bus: here the name is free.
    let bus = start_bus();
    let own = as_nobody(&bus, "own", false);
    assert_eq!(own.error_name(), ACCESS_DENIED, "{own:?}");
    let conn = connect(&bus).await;
    conn.request_name(BUS_NAME).await.expect("root may own it");
}
