//! Crash safety: the daemon is killed with SIGKILL at 100 random instants across cycles (during
//! start-up and restore, mid-transition, with steps pending, in every mode), and every restart
//! must put back exactly the settings that were in force before the first cycle.
//!
//! The instants come from a seeded generator; the seed is printed, and `KSM_CRASH_SEED=<n>`
//! replays a run.

use std::path::Path;
use std::time::{Duration, Instant};

use kata_ksm_throttler::core::setting::Mode;
use kata_ksm_throttler::io::sysfs::Ksm;
use kata_ksm_throttler_test_support::*;

const CYCLES: usize = 100;
/// Fast steps, so that a cycle of a few hundred milliseconds crosses several transitions.
const FAST: &[&str] = &["--aggressive-duration", "40ms", "--standard-duration", "40ms", "--slow-duration", "40ms"];

/// xorshift64*: small, seedable, good enough to spread instants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// On sysfs a write(2) is all or nothing; on a scratch file, a kill between the daemon's
/// open(O_TRUNC) and its write(2) leaves the file empty. Such a torn write can only happen while
/// the record of the initial settings exists (every write of a cycle is made under it), which is
/// checked; the restart must then restore it with the rest (it writes every recorded knob when
/// the knobs in force cannot be read). Returns how many there were.
fn torn_writes(scratch: &Scratch) -> usize {
    let mut torn = 0;
    for (name, bytes) in scratch.snapshot() {
        if bytes.is_empty() {
            assert!(
                scratch.state_dir().join("initial-settings.json").exists(),
                "{name} was torn by the kill with no record of the initial settings to restore from"
            );
            torn += 1;
        }
    }
    torn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_a_hundred_random_instants_and_every_restart_restores_the_original_settings() {
    let seed = std::env::var("KSM_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64 | 1
    });
    eprintln!("KSM_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let bus = start_bus();
    let scratch = Scratch::fresh();
    // The advisor scanning by time, so every cycle also turns it off and must put it back.
    scratch.set("advisor_mode", "none [scan-time]\n");
    let ksm = Ksm::open(scratch.ksm()).expect("open");
    let original = ksm.read().expect("read");
    let conn = connect(&bus).await;
    let p = proxy(&conn).await;

    let (mut checked, mut during_startup, mut torn) = (0, 0, 0);
    for cycle in 0..CYCLES {
        let mut daemon = Daemon::spawn(&bus, &scratch, FAST);
        // A third of the kills land in the first milliseconds: start-up, which is where a
        // restore from the previous kill is under way.
        if rng.below(3) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(15_000)));
            daemon.kill9();
            during_startup += 1;
        } else {
            wait_for_name(&conn, &daemon).await;
            // Through the engine, so after its start-up restore: the mode in force, a no-op.
            p.set_mode("throttle").await.unwrap_or_else(|e| panic!("cycle {cycle}: {e}\n{}", daemon.log_text()));
            assert_eq!(
                ksm.read().expect("read"),
                original,
                "cycle {cycle} (seed {seed}): the restart did not restore\n{}",
                daemon.log_text()
            );
            assert!(!scratch.state_dir().join("initial-settings.json").exists(), "cycle {cycle}: record left");
            assert!(!scratch.state_dir().join("initial-settings.backup.json").exists(), "cycle {cycle}: backup left");
            checked += 1;

            // Drive it for a random while, killed at a random instant of it.
            let kill_at = Instant::now() + Duration::from_micros(rng.below(250_000));
            while Instant::now() < kill_at {
                let r = match rng.below(4) {
                    0 => p.set_mode(Mode::NAMES[rng.below(Mode::NAMES.len() as u64) as usize]).await,
                    _ => p.kick().await,
                };
                r.unwrap_or_else(|e| panic!("cycle {cycle}: {e}\n{}", daemon.log_text()));
                let pause = Duration::from_micros(rng.below(60_000));
                tokio::time::sleep(pause.min(kill_at.saturating_duration_since(Instant::now()))).await;
            }
            daemon.kill9();
        }
        torn += torn_writes(&scratch);
        // The daemons of a test process share one log; keep the scratch folder small.
        let _ = std::fs::remove_file(daemon.log());
        drop(daemon);
    }

    // The last word: a clean start after the hundredth kill, then a clean stop.
    let mut daemon = Daemon::spawn(&bus, &scratch, FAST);
    wait_for_name(&conn, &daemon).await;
    p.set_mode("throttle").await.expect("serving");
    assert_eq!(ksm.read().expect("read"), original, "seed {seed}: final restart\n{}", daemon.log_text());
    let status = daemon.terminate();
    assert!(status.success());
    assert_eq!(ksm.read().expect("read"), original);
    assert!(!Path::new(&scratch.state_dir().join("initial-settings.json")).exists());
    eprintln!(
        "{CYCLES} kills: {during_startup} during start-up, {checked} restarts checked, \
         {torn} torn scratch writes restored by the next start"
    );
    assert!(checked >= CYCLES / 2, "most restarts are checked");
}

/// Issue 14, item 2: an instance that finds a crashed one's record restores it before it takes
/// the bus name, so the first reader (what `ksmtctl status` does after a crash) already sees the
/// administrator's knobs, not the dead instance's beside `CurrentSetting=initial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_first_reader_sees_the_restored_knobs() {
    use kata_ksm_throttler::core::knobs::Knobs;
    use kata_ksm_throttler::io::state_file::StateFile;
    use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
    let bus = start_bus();
    let conn = connect(&bus).await;
    for round in 0..10 {
        let scratch = Scratch::fresh();
        let (run, pages, sleep) = scratch.knobs();
        let original = Knobs {
            run: run as u8,
            pages_to_scan: pages,
            sleep_millisecs: sleep,
            advisor_mode: Some("none".into()),
            smart_scan: Some(1),
        };
        StateFile::new(scratch.state_dir()).save(&original).expect("the dead instance's record");
        // What the dead instance left in force.
        scratch.set("run", "1\n");
        scratch.set("pages_to_scan", "98765\n");
        scratch.set("sleep_millisecs", "1\n");
        let mut daemon = Daemon::spawn(&bus, &scratch, &[]);
        // The very first Get that finds an owner: asked again and again from before the start.
        let get = async |name: &str| -> zbus::Result<zbus::OwnedVariant> {
            let reply = conn
                .call_method(
                    Some(BUS_NAME),
                    OBJECT_PATH,
                    Some("org.freedesktop.DBus.Properties"),
                    "Get",
                    &(INTERFACE, name),
                )
                .await?;
            reply.body().deserialize::<zbus::OwnedVariant>()
        };
        let started = std::time::Instant::now();
        let first_run = loop {
            match get("Run").await {
                Ok(v) => break u32::try_from(v).expect("Run is a u32"),
                Err(e) => {
                    assert!(started.elapsed() < Duration::from_secs(20), "never served: {e}\n{}", daemon.log_text())
                }
            }
        };
        let setting = String::try_from(get("CurrentSetting").await.expect("CurrentSetting")).expect("a string");
        assert_eq!((setting.as_str(), first_run), ("initial", run as u32), "round {round}: the first reader");
        assert_eq!(scratch.knobs(), (run, pages, sleep), "round {round}");
        assert!(daemon.terminate().success());
    }
}

/// Issue 14, item 3: a knob left empty by a kill mid-write (on a scratch directory) does not stop
/// the restore: every recorded knob is written, the record goes once all are back, and the
/// throttler serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_knob_left_empty_by_a_crash_is_restored_with_the_rest() {
    use kata_ksm_throttler::core::knobs::Knobs;
    use kata_ksm_throttler::io::state_file::StateFile;
    let bus = start_bus();
    let conn = connect(&bus).await;
    let scratch = Scratch::fresh();
    let (run, pages, sleep) = scratch.knobs();
    let original =
        Knobs { run: run as u8, pages_to_scan: pages, sleep_millisecs: sleep, advisor_mode: None, smart_scan: Some(1) };
    StateFile::new(scratch.state_dir()).save(&original).expect("the dead instance's record");
    scratch.set("run", "1\n");
    scratch.set("pages_to_scan", "");
    scratch.set("sleep_millisecs", "1\n");
    let mut daemon = Daemon::spawn(&bus, &scratch, &[]);
    wait_for_name(&conn, &daemon).await;
    assert_eq!(scratch.knobs(), (run, pages, sleep), "log:\n{}", daemon.log_text());
    assert!(!scratch.state_dir().join("initial-settings.json").exists(), "the record goes once all are back");
    assert_eq!(proxy(&conn).await.current_setting().await.expect("serving"), "initial");
    assert!(daemon.log_text().contains("writing every recorded knob"), "{}", daemon.log_text());
    assert!(daemon.terminate().success());
}

/// Issue 14, item 4: the record deleted (or damaged) mid-cycle, then a crash: the successor
/// restores the administrator's settings from the record's backup, not the dead instance's
/// aggressive knobs taken for "initial".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_deleted_or_damaged_mid_cycle_then_a_crash_still_restores_the_originals() {
    let bus = start_bus();
    let conn = connect(&bus).await;
    let p = proxy(&conn).await;
    for damage in ["deleted", "damaged"] {
        let scratch = Scratch::fresh();
        let original = scratch.knobs();
        let record = scratch.state_dir().join("initial-settings.json");
        let mut daemon = Daemon::spawn(&bus, &scratch, &[]);
        wait_for_name(&conn, &daemon).await;
        p.kick().await.expect("kick");
        assert_ne!(scratch.knobs(), original, "{damage}: aggressive in force");
        match damage {
            "deleted" => std::fs::remove_file(&record).expect("delete the record"),
            _ => std::fs::write(&record, b"{\"version\":1,\"knobs\":{\"run\":").expect("damage the record"),
        }
        daemon.kill9();
        drop(daemon);

        let mut daemon = Daemon::spawn(&bus, &scratch, &[]);
        wait_for_name(&conn, &daemon).await;
        assert_eq!(scratch.knobs(), original, "{damage}: the originals, from the backup\n{}", daemon.log_text());
        assert!(daemon.log_text().contains("taken from the backup"), "{damage}: said loudly\n{}", daemon.log_text());
        assert!(!record.exists(), "{damage}: the record goes once the knobs are back");
        assert!(!scratch.state_dir().join("initial-settings.backup.json").exists(), "{damage}: and its backup");
        // The next cycle records the true originals again.
        p.kick().await.expect("kick");
        assert!(daemon.terminate().success());
        assert_eq!(scratch.knobs(), original, "{damage}: restored at exit");
    }
}
