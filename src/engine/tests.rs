//! The engine driven directly (its commands and timers served one at a time) or through its loop,
//! on tokio's paused clock over a scratch sysfs: what it reads, what it asks the core, and what
//! it writes.

use std::time::Duration;

use kata_ksm_throttler_test_support::scratch::{expected, Scratch, ANON_KB};
use tokio::sync::oneshot;

use super::*;
use crate::core::need::Gate;
use crate::core::policy::{Cause, UNPROFITABLE_SCANS};
use crate::core::setting::Setting;
use crate::quick_kick;

const S: Duration = Duration::from_secs(1);

fn config(scratch: &Scratch, mode: Mode) -> Config {
    Config {
        ksm: Ksm::open(scratch.ksm()).expect("the scratch sysfs"),
        meminfo: scratch.meminfo(),
        page_size: crate::io::meminfo::page_size(),
        state: StateFile::new(scratch.state_dir()),
        mode,
        durations: Durations::default(),
        profiles: Profiles::default(),
        proc_root: scratch.proc_root(),
        gate: Gate::Always,
        need: Thresholds::default(),
        unprofitable_scans: UNPROFITABLE_SCANS,
    }
}

/// An engine started on `config`, for the test to serve commands and timers by hand.
fn started(config: Config) -> (Engine, Handle, watch::Receiver<Status>) {
    let (mut engine, handle, status) = Engine::new(config);
    engine.start().expect("start-up");
    (engine, handle, status)
}

/// Serves `make`'s command as the loop would, and returns the answer the caller gets.
fn serve(engine: &mut Engine, make: impl FnOnce(Reply) -> Command) -> Result<(), EngineError> {
    let (tx, mut rx) = oneshot::channel();
    assert_eq!(engine.handle(make(tx)), None, "the engine goes on");
    rx.try_recv().expect("answered at once")
}

/// The timers as the loop sees them before it sleeps.
fn armed(engine: &mut Engine) -> Timers {
    engine.timers.follow(&engine.policy);
    engine.timers.set(Timer::Idle, engine.idle_due());
    engine.timers
}

/// A meminfo with `available` percent of MemTotal available, and the scratch AnonPages.
fn meminfo_with_available(scratch: &Scratch, available: u64) {
    let total = 24_000_000;
    let text = format!("MemTotal: {total} kB\nMemAvailable: {} kB\nAnonPages: {ANON_KB} kB\n", total * available / 100);
    scratch.set_meminfo(&text);
}

#[tokio::test(start_paused = true)]
async fn at_rest_and_ungated_nothing_is_armed_and_a_kick_arms_the_step() {
    let scratch = Scratch::fresh();
    let (mut engine, _handle, status) = started(config(&scratch, Mode::Throttle));
    assert_eq!(armed(&mut engine).next_timeout(), None, "an idle throttler never wakes");

    serve(&mut engine, Command::Kick).expect("kick");
    let timers = armed(&mut engine);
    let deadline = now() + Durations::default().aggressive;
    assert_eq!(timers.get(Timer::Step), Some(deadline));
    assert!(timers.is_armed(Timer::Resize), "AnonPages is followed while a cycle runs");
    assert!(!timers.is_armed(Timer::NeedPoll) && !timers.is_armed(Timer::KickRetry));
    // Published before the answer: a caller reads what its call did.
    assert_eq!(status.borrow().setting, Setting::Aggressive);
    assert_eq!(status.borrow().transitions.get(Cause::Kick), 1);
    assert_eq!(scratch.knobs(), expected(10, 1));

    tokio::time::advance(Durations::default().aggressive).await;
    assert!(engine.timers.due(now()).is_some_and(Timer::is_policy));
    engine.on_timer();
    assert_eq!((status.borrow().setting, scratch.knobs()), (Setting::Standard, expected(100, 10)));
}

#[tokio::test(start_paused = true)]
async fn kicks_answered_in_a_storm_have_anon_pages_read_again_at_most_every_quarter_second() {
    let scratch = Scratch::fresh();
    let (mut engine, handle, status) = started(config(&scratch, Mode::Throttle));
    serve(&mut engine, Command::Kick).expect("kick");
    let pages = |s: &Scratch| s.knobs().1;
    // Aggressive scans a tenth of AnonPages a wake-up.
    let sized = |kb: u64| kb * 1024 / crate::io::meminfo::page_size() / 10;
    assert_eq!(pages(&scratch), sized(ANON_KB));
    // AnonPages doubles while aggressive: a kick answered by the handle, taken in by the engine,
    // sizes the setting again...
    scratch.set_anon_kb(2 * ANON_KB);
    handle.kick().await.expect("answered by the handle");
    engine.take_quick_kicks();
    assert_eq!(pages(&scratch), sized(2 * ANON_KB), "sized again for the first kicks taken");
    // ...but kicks taken within a quarter second of that do not read it again...
    scratch.set_anon_kb(4 * ANON_KB);
    tokio::time::advance(quick_kick::SIZE_AT_MOST_EVERY / 2).await;
    handle.kick().await.expect("answered by the handle");
    let deadline_before = engine.policy.deadline();
    engine.take_quick_kicks();
    assert_eq!(pages(&scratch), sized(2 * ANON_KB), "not read again so soon");
    assert!(engine.policy.deadline() > deadline_before, "the deadline still moved with the kick");
    // ...and the next ones after it do.
    tokio::time::advance(quick_kick::SIZE_AT_MOST_EVERY / 2).await;
    handle.kick().await.expect("answered by the handle");
    engine.take_quick_kicks();
    assert_eq!(pages(&scratch), sized(4 * ANON_KB));
    assert_eq!((status.borrow().setting, status.borrow().kick_count), (Setting::Aggressive, 4));
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_step_is_undone_and_the_kick_retried_on_its_timer() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let (mut engine, _handle, status) = started(config(&scratch, Mode::Throttle));
    scratch.set_meminfo("MemTotal: 24000000 kB\n");

    assert!(serve(&mut engine, Command::Kick).is_err(), "no AnonPages to size the setting on");
    assert_eq!(status.borrow().setting, Setting::Initial, "the policy is back as it was");
    assert!(engine.saved.is_none(), "the cycle is undone");
    assert_eq!(scratch.snapshot(), before);
    assert!(!scratch.state_dir().join("initial-settings.json").exists(), "nothing left recorded");
    let timers = armed(&mut engine);
    assert_eq!(timers.get(Timer::KickRetry), Some(now() + RETRY_AFTER));
    assert!(!lifecycle_at_rest(&engine), "a kick waits to be retried");

    scratch.set_anon_kb(ANON_KB);
    tokio::time::advance(RETRY_AFTER).await;
    assert_eq!(engine.timers.due(now()), Some(Timer::KickRetry));
    engine.on_timer();
    assert_eq!((status.borrow().setting, scratch.knobs()), (Setting::Aggressive, expected(10, 1)));
    assert!(!armed(&mut engine).is_armed(Timer::KickRetry), "applied: no more retries");
}

fn lifecycle_at_rest(engine: &Engine) -> bool {
    crate::core::lifecycle::at_rest(
        &engine.policy,
        engine.config.mode,
        engine.saved.is_some(),
        engine.timers.is_armed(Timer::KickRetry),
    )
}

#[tokio::test(start_paused = true)]
async fn the_same_setting_under_a_new_mode_is_written_again_without_a_transition() {
    let scratch = Scratch::fresh();
    let (mut engine, _handle, status) = started(config(&scratch, Mode::Throttle));
    serve(&mut engine, Command::Kick).expect("kick");
    assert_eq!(scratch.knob("smart_scan"), "1\n");
    serve(&mut engine, |r| Command::SetMode(Mode::Adaptive, r)).expect("adaptive");
    // Adaptive's aggressive setting turns smart_scan off while nothing is merged yet.
    assert_eq!((status.borrow().setting, scratch.knob("smart_scan")), (Setting::Aggressive, "0\n".into()));
    assert_eq!(scratch.knobs(), expected(10, 1), "at the same size");
    assert_eq!(status.borrow().transitions.get(Cause::ModeChange), 0, "the setting did not change");
}

#[tokio::test(start_paused = true)]
async fn the_need_gate_drives_a_cycle_and_polls_on_the_paused_clock() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    meminfo_with_available(&scratch, 5);
    let mut config = config(&scratch, Mode::Throttle);
    config.gate = Gate::WhenNeeded;
    let poll = config.need.poll_interval;
    let (engine, handle, status) = Engine::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(engine.run(async {
        let _ = stopped.await;
    }));
    tokio::task::yield_now().await;
    {
        let s = status.borrow();
        assert_eq!((s.setting, s.gate, s.need), (Setting::Aggressive, Gate::WhenNeeded, Need::Needed));
        assert_eq!(s.transitions.get(Cause::Need), 1);
        assert!(s.need_reason.starts_with("MemAvailable"), "{}", s.need_reason);
    }

    // Needed all along: the cycle steps down to slow and holds it there.
    tokio::time::sleep(Durations::default().aggressive + Durations::default().standard + S).await;
    assert_eq!((status.borrow().setting, scratch.knobs()), (Setting::Slow, expected(500, 100)));
    tokio::time::sleep(10 * Durations::default().slow).await;
    assert_eq!(status.borrow().setting, Setting::Slow, "held while memory is needed");

    // No longer needed: read at the next poll, then slow runs its course.
    meminfo_with_available(&scratch, 60);
    tokio::time::sleep(poll + S).await;
    assert_eq!(status.borrow().need, Need::NotNeeded);
    assert_eq!(status.borrow().setting, Setting::Slow);
    tokio::time::sleep(Durations::default().slow).await;
    assert_eq!(status.borrow().setting, Setting::Initial);
    assert_eq!(scratch.knobs(), (0, 100, 20), "the administrator's settings are back");

    // The gate off: no more polls, and nothing else to wake for.
    handle.set_need_gate(Gate::Always).await.expect("always");
    assert_eq!((status.borrow().need, status.borrow().need_reason.as_str()), (Need::NotGated, "every kick drives KSM"));
    let _ = stop.send(());
    assert_eq!(task.await.expect("the engine task").expect("ended"), Ended::Shutdown);
    assert_eq!(scratch.snapshot(), before);
}

#[tokio::test(start_paused = true)]
async fn an_idle_notice_comes_from_the_timer_table_and_an_unsure_drain_stays() {
    let scratch = Scratch::fresh();
    let (mut engine, _handle, _status) = started(config(&scratch, Mode::Throttle));
    let mut notices = engine.exit_when_idle(60 * S);
    engine.note_activity();
    assert_eq!(armed(&mut engine).next_timeout(), Some(now() + 60 * S), "the idle time is the only timer");

    tokio::time::advance(60 * S).await;
    assert_eq!(engine.timers.due(now()), Some(Timer::Idle));
    engine.on_timer();
    assert!(notices.try_recv().is_ok(), "noticed");
    assert_eq!(armed(&mut engine).next_timeout(), None, "one notice until it is answered");

    assert_eq!(engine.conclude_idle(Drain::Unsure), (Verdict::Stay, None));
    assert_eq!(armed(&mut engine).next_timeout(), Some(now() + 60 * S), "the idle time starts again");
    assert_eq!(engine.conclude_idle(Drain::Done { successor: false }), (Verdict::Exit, Some(Ended::Idle)));
}
