//! Exiting on idle, engine side, on tokio's paused clock over a scratch sysfs: when the notice
//! comes, what counts as idle, and what happens to calls that arrive while the bus edge is
//! releasing the name (the test plays the edge).

mod common;

use std::time::Duration;

use common::{expected, Scratch};
use kata_ksm_throttler::core::policy::Durations;
use kata_ksm_throttler::core::setting::{Mode, Setting};
use kata_ksm_throttler::engine::{Config, Drain, Ended, Engine, EngineError, Handle, Status, Verdict};
use kata_ksm_throttler::io::state_file::StateFile;
use kata_ksm_throttler::io::sysfs::Ksm;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::sleep;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(60);

struct Running {
    handle: Handle,
    status: watch::Receiver<Status>,
    notices: mpsc::Receiver<()>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Ended, EngineError>>,
}

fn start(scratch: &Scratch, mode: Mode) -> Running {
    let config = Config {
        ksm: Ksm::open(scratch.ksm()).expect("open"),
        meminfo: scratch.meminfo(),
        page_size: kata_ksm_throttler::io::meminfo::page_size(),
        state: StateFile::new(scratch.state_dir()),
        mode,
        durations: Durations::default(),
        profiles: kata_ksm_throttler::core::setting::Profiles::default(),
    };
    let (mut engine, handle, status) = Engine::new(config);
    let notices = engine.exit_when_idle(IDLE);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(engine.run(async {
        let _ = stopped.await;
    }));
    Running { handle, status, notices, stop: Some(stop), task }
}

fn setting(r: &Running) -> Setting {
    r.status.borrow().setting
}

/// Whether a notice has come by now (after letting the engine run).
async fn noticed(r: &mut Running) -> bool {
    tokio::task::yield_now().await;
    r.notices.try_recv().is_ok()
}

async fn ended(r: Running) -> Ended {
    r.task.await.expect("join").expect("engine ran")
}

#[tokio::test(start_paused = true)]
async fn the_notice_comes_after_exactly_the_idle_time_and_the_exit_changes_nothing() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE - MS).await;
    assert!(!noticed(&mut r).await, "1 ms early");
    sleep(2 * MS).await;
    assert!(noticed(&mut r).await, "due at 60 s");
    sleep(10 * IDLE).await;
    assert!(!noticed(&mut r).await, "one notice until it is answered");

    let verdict = r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit);
    assert_eq!(ended(r).await, Ended::Idle);
    assert_eq!(scratch.snapshot(), before);
    assert!(!scratch.state_dir().join("handover.json").exists(), "nothing to hand over");
}

#[tokio::test(start_paused = true)]
async fn a_cycle_or_any_call_restarts_the_idle_time() {
    let scratch = Scratch::new();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(10 * S).await;
    r.handle.kick().await.expect("kick");
    // The cycle lasts 30 s + 2 min + 2 min; idle counts from its end.
    sleep(270 * S + IDLE - MS).await;
    assert_eq!(setting(&r), Setting::Initial);
    assert!(!noticed(&mut r).await, "60 s after the cycle ended, not after the kick");
    sleep(2 * MS).await;
    assert!(noticed(&mut r).await);

    // A call that changes nothing still counts as activity.
    let answer = r.handle.conclude_idle(Drain::Unsure).await.expect("answer");
    assert_eq!(answer, Verdict::Stay, "the edge was unsure: stay");
    sleep(30 * S).await;
    r.handle.set_mode(Mode::Throttle).await.expect("same mode");
    sleep(IDLE - MS).await;
    assert!(!noticed(&mut r).await);
    sleep(2 * MS).await;
    assert!(noticed(&mut r).await);
}

#[tokio::test(start_paused = true)]
async fn a_mode_other_than_the_start_up_mode_keeps_it_running() {
    let scratch = Scratch::new();
    let mut r = start(&scratch, Mode::Throttle);
    for mode in [Mode::Off, Mode::Initial, "slow".parse().expect("mode")] {
        r.handle.set_mode(mode).await.expect("set");
        sleep(10 * IDLE).await;
        assert!(!noticed(&mut r).await, "{mode} would be lost by exiting");
    }
    r.handle.set_mode(Mode::Throttle).await.expect("back");
    // Throttle carries on from slow: 2 min of it, then idle.
    sleep(120 * S + IDLE - MS).await;
    assert!(!noticed(&mut r).await);
    sleep(2 * MS).await;
    assert!(noticed(&mut r).await);
}

#[tokio::test(start_paused = true)]
async fn a_late_kick_with_no_possible_successor_keeps_it_serving() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    // Routed here before the name was released: served while the edge drains.
    r.handle.kick().await.expect("late kick");
    let verdict = r.handle.conclude_idle(Drain::Done { successor: false }).await.expect("answer");
    assert_eq!(verdict, Verdict::Stay, "not activatable: take the name back");
    assert_eq!((setting(&r), scratch.knobs()), (Setting::Aggressive, expected(10, 1)));
    sleep(30 * S + MS).await;
    assert_eq!(setting(&r), Setting::Standard, "the kick's cycle goes on");
    sleep(240 * S).await;
    assert_eq!(scratch.snapshot(), before);
    sleep(IDLE).await;
    assert!(noticed(&mut r).await, "idle again after the cycle");
}

#[tokio::test(start_paused = true)]
async fn a_late_kick_is_handed_over_and_the_successor_carries_on() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    r.handle.kick().await.expect("late kick");
    sleep(10 * S).await;
    let verdict = r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit);
    assert_eq!(ended(r).await, Ended::HandedOver);
    assert_eq!(scratch.knobs(), expected(10, 1), "left in force for the successor");
    assert!(scratch.state_dir().join("initial-settings.json").exists(), "the administrator's settings stay recorded");
    assert!(scratch.state_dir().join("handover.json").exists());

    let mut next = start(&scratch, Mode::Throttle);
    tokio::task::yield_now().await;
    sleep(MS).await;
    assert_eq!(setting(&next), Setting::Aggressive, "carried on, not restored");
    assert!(!scratch.state_dir().join("handover.json").exists(), "used once");
    assert_eq!(next.status.borrow().kick_count, 0, "KickCount counts since start-up");
    // 10 s of the 30 had passed: 20 s to go (less the real time the hand-over took).
    sleep(19 * S).await;
    assert_eq!(setting(&next), Setting::Aggressive);
    sleep(S + MS).await;
    assert_eq!((setting(&next), scratch.knobs()), (Setting::Standard, expected(100, 10)));
    sleep(240 * S).await;
    assert_eq!(setting(&next), Setting::Initial);
    assert_eq!(scratch.snapshot(), before, "restored byte for byte by the successor");
    sleep(IDLE).await;
    assert!(noticed(&mut next).await);
}

#[tokio::test(start_paused = true)]
async fn a_late_mode_change_is_handed_over_too() {
    let scratch = Scratch::new();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    r.handle.set_mode(Mode::Off).await.expect("late SetMode");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(ended(r).await, Ended::HandedOver);
    let mut next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!((next.status.borrow().mode, setting(&next)), (Mode::Off, Setting::Off));
    sleep(10 * IDLE).await;
    assert!(!noticed(&mut next).await, "off is not the start-up mode: it keeps running");
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_exchange_waits_for_the_verdict() {
    let scratch = Scratch::new();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    // systemd stops a Type=dbus unit as soon as its name is released.
    r.stop.take().expect("stop").send(()).expect("stop");
    r.handle.kick().await.expect("late kick, still served");
    sleep(S).await;
    assert!(!r.task.is_finished(), "waits for the edge's answer");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(ended(r).await, Ended::HandedOver, "the late kick is not lost to the stop");
    assert_eq!(scratch.knobs(), expected(10, 1));

    // With no successor possible, a stop is a stop: restore.
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    r.stop.take().expect("stop").send(()).expect("stop");
    r.handle.kick().await.expect("late kick");
    let verdict = r.handle.conclude_idle(Drain::Done { successor: false }).await.expect("answer");
    assert_eq!(verdict, Verdict::Exit, "stopping: the edge must not take the name back");
    assert_eq!(ended(r).await, Ended::Shutdown);
    assert_eq!(scratch.snapshot(), before);
}

#[tokio::test(start_paused = true)]
async fn a_handover_that_does_not_hold_together_is_ignored_and_the_host_restored() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    r.handle.kick().await.expect("late kick");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(ended(r).await, Ended::HandedOver);
    // Damaged: aggressive in mode off is nowhere the policy goes.
    let path = scratch.state_dir().join("handover.json");
    let text = std::fs::read_to_string(&path).expect("read").replace("\"throttle\"", "\"off\"");
    std::fs::write(&path, text).expect("write");

    let next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!(setting(&next), Setting::Initial);
    assert_eq!(scratch.snapshot(), before, "restored from the record, as after a crash");
    assert!(!path.exists());
}

#[tokio::test(start_paused = true)]
async fn a_late_switch_to_hands_off_is_kept_by_the_successor() {
    let scratch = Scratch::new();
    let before = scratch.snapshot();
    let mut r = start(&scratch, Mode::Throttle);
    sleep(IDLE + MS).await;
    assert!(noticed(&mut r).await);
    r.handle.set_mode(Mode::Initial).await.expect("late SetMode");
    r.handle.conclude_idle(Drain::Done { successor: true }).await.expect("answer");
    assert_eq!(ended(r).await, Ended::HandedOver, "a fresh instance would be in throttle, not initial");
    assert_eq!(scratch.snapshot(), before, "hands off: nothing was changed");

    let mut next = start(&scratch, Mode::Throttle);
    sleep(MS).await;
    assert_eq!((next.status.borrow().mode, setting(&next)), (Mode::Initial, Setting::Initial));
    next.handle.kick().await.expect("kick");
    assert_eq!(scratch.snapshot(), before, "kicks ignored while hands off");
    sleep(10 * IDLE).await;
    assert!(!noticed(&mut next).await);
}
