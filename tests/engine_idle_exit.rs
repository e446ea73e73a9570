//! Exiting on idle, engine side, on tokio's paused clock over a scratch sysfs: when the notice
//! comes, what counts as idle, and what happens to calls that arrive while the bus edge is
//! releasing the name (the test plays the edge).

use std::time::Duration;

use kata_ksm_throttler::core::setting::{Mode, Pinned, Setting};
use kata_ksm_throttler::engine::{Drain, Ended, Verdict};
use kata_ksm_throttler_test_support::engine::Running;
use kata_ksm_throttler_test_support::scratch::{expected, Scratch};
use tokio::time::sleep;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(60);

fn start(scratch: &Scratch, mode: Mode) -> Running {
    Running::exiting_when_idle(scratch, mode, IDLE)
}

#[tokio::test(start_paused = true)]
async fn the_notice_comes_after_exactly_the_idle_time_and_the_exit_changes_nothing() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE - MS).await;
    assert!(!r.noticed().await, "1 ms early");
    sleep(2 * MS).await;
    assert!(r.noticed().await, "due at 60 s");
    sleep(10 * IDLE).await;
    assert!(!r.noticed().await, "one notice until it is answered");

    let verdict = r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit);
    assert_eq!(r.ended().await, Ended::Idle);
    assert_eq!(scratch.snapshot(), before);
    assert!(!scratch.state_dir().join("handover.json").exists(), "nothing to hand over");
}

#[tokio::test(start_paused = true)]
async fn a_cycle_or_any_call_restarts_the_idle_time() {
    let scratch = Scratch::fresh();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(10 * S).await;
    r.handle.kick().await.expect("kick");
    // The cycle lasts 30 s + 2 min + 2 min; idle counts from its end.
    sleep(270 * S + IDLE - MS).await;
    assert_eq!(r.setting(), Setting::Initial);
    assert!(!r.noticed().await, "60 s after the cycle ended, not after the kick");
    sleep(2 * MS).await;
    assert!(r.noticed().await);

    // A call that changes nothing still counts as activity.
    let answer = r.handle.conclude_idle(Drain::Unsure).await.expect("answer");
    assert_eq!(answer, Verdict::Stay, "the edge was unsure: stay");
    sleep(30 * S).await;
    r.handle.set_mode(Mode::Throttle).await.expect("same mode");
    sleep(IDLE - MS).await;
    assert!(!r.noticed().await);
    sleep(2 * MS).await;
    assert!(r.noticed().await);
}

#[tokio::test(start_paused = true)]
async fn a_mode_other_than_the_start_up_mode_keeps_it_running() {
    let scratch = Scratch::fresh();
    let mut r = start(&scratch, Mode::Throttle);
    // Every mode but the start-up one, from the one list of modes.
    for mode in Mode::ALL.into_iter().filter(|&m| m != Mode::Throttle) {
        r.handle.set_mode(mode).await.expect("set");
        sleep(10 * IDLE).await;
        assert!(!r.noticed().await, "{mode} would be lost by exiting");
    }
    r.handle.set_mode(Mode::Pinned(Pinned::Slow)).await.expect("slow");
    r.handle.set_mode(Mode::Throttle).await.expect("back");
    // Throttle carries on from slow: 2 min of it, then idle.
    sleep(120 * S + IDLE - MS).await;
    assert!(!r.noticed().await);
    sleep(2 * MS).await;
    assert!(r.noticed().await);
}

#[tokio::test(start_paused = true)]
async fn a_late_kick_with_no_possible_successor_keeps_it_serving() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    // Routed here before the name was released: served while the edge drains.
    r.handle.kick().await.expect("late kick");
    let verdict = r.handle.conclude_idle(Drain::Done { successor: false }).await.expect("answer");
    assert_eq!(verdict, Verdict::Stay, "not activatable: take the name back");
    assert_eq!((r.setting(), scratch.knobs()), (Setting::Aggressive, expected(10, 1)));
    sleep(30 * S + MS).await;
    assert_eq!(r.setting(), Setting::Standard, "the kick's cycle goes on");
    sleep(240 * S).await;
    assert_eq!(scratch.snapshot(), before);
    sleep(IDLE).await;
    assert!(r.noticed().await, "idle again after the cycle");
}

#[tokio::test(start_paused = true)]
async fn a_late_kick_is_handed_over_and_the_successor_carries_on() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    r.handle.kick().await.expect("late kick");
    sleep(10 * S).await;
    let verdict = r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit);
    assert_eq!(r.ended().await, Ended::HandedOver);
    assert_eq!(scratch.knobs(), expected(10, 1), "left in force for the successor");
    assert!(scratch.state_dir().join("initial-settings.json").exists(), "the administrator's settings stay recorded");
    assert!(scratch.state_dir().join("handover.json").exists());

    let mut next = start(&scratch, Mode::Throttle);
    tokio::task::yield_now().await;
    sleep(MS).await;
    assert_eq!(next.setting(), Setting::Aggressive, "carried on, not restored");
    assert!(!scratch.state_dir().join("handover.json").exists(), "used once");
    assert_eq!(next.status.borrow().kick_count, 0, "KickCount counts since start-up");
    // 10 s of the 30 had passed: 20 s to go (less the real time the hand-over took).
    sleep(19 * S).await;
    assert_eq!(next.setting(), Setting::Aggressive);
    sleep(S + MS).await;
    assert_eq!((next.setting(), scratch.knobs()), (Setting::Standard, expected(100, 10)));
    sleep(240 * S).await;
    assert_eq!(next.setting(), Setting::Initial);
    assert_eq!(scratch.snapshot(), before, "restored byte for byte by the successor");
    sleep(IDLE).await;
    assert!(next.noticed().await);
}

#[tokio::test(start_paused = true)]
async fn a_late_mode_change_is_handed_over_too() {
    let scratch = Scratch::fresh();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    r.handle.set_mode(Mode::Off).await.expect("late SetMode");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(r.ended().await, Ended::HandedOver);
    let mut next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!((next.status.borrow().mode, next.setting()), (Mode::Off, Setting::Off));
    sleep(10 * IDLE).await;
    assert!(!next.noticed().await, "off is not the start-up mode: it keeps running");
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_exchange_waits_for_the_verdict() {
    let scratch = Scratch::fresh();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    // systemd stops a Type=dbus unit as soon as its name is released.
    r.stop();
    r.handle.kick().await.expect("late kick, still served");
    sleep(S).await;
    assert!(!r.task.is_finished(), "waits for the edge's answer");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(r.ended().await, Ended::HandedOver, "the late kick is not lost to the stop");
    assert_eq!(scratch.knobs(), expected(10, 1));

    // With no successor possible, a stop is a stop: restore.
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    r.stop();
    r.handle.kick().await.expect("late kick");
    let verdict = r.handle.conclude_idle(Drain::Done { successor: false }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit, "stopping: the edge must not take the name back");
    assert_eq!(r.ended().await, Ended::Shutdown);
    assert_eq!(scratch.snapshot(), before);
}

#[tokio::test(start_paused = true)]
async fn a_handover_that_does_not_hold_together_is_ignored_and_the_host_restored() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    r.handle.kick().await.expect("late kick");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(r.ended().await, Ended::HandedOver);
    // Damaged: aggressive in mode off is nowhere the policy goes.
    let path = scratch.state_dir().join("handover.json");
    let text = std::fs::read_to_string(&path).expect("read").replace("\"throttle\"", "\"off\"");
    std::fs::write(&path, text).expect("write");

    let next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!(next.setting(), Setting::Initial);
    assert_eq!(scratch.snapshot(), before, "restored from the record, as after a crash");
    assert!(!path.exists());
}

#[tokio::test(start_paused = true)]
async fn a_late_switch_to_hands_off_is_kept_by_the_successor() {
    let scratch = Scratch::fresh();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(r.noticed().await);
    r.handle.set_mode(Mode::Initial).await.expect("late SetMode");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(r.ended().await, Ended::HandedOver, "a fresh instance would be in throttle, not initial");
    assert_eq!(scratch.snapshot(), before, "hands off: nothing was changed");

    let mut next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!((next.status.borrow().mode, next.setting()), (Mode::Initial, Setting::Initial));
    next.handle.kick().await.expect("kick");
    assert_eq!(scratch.snapshot(), before, "kicks ignored while hands off");
    sleep(10 * IDLE).await;
    assert!(!next.noticed().await);
}
