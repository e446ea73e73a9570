//! The Inspect interface (Sandboxes, Doctor) of the real daemon on a private bus, over a fake
//! /proc and fake sandbox folders; and `ksmtctl sandboxes` / `doctor` against it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use kata_ksm_throttler::bus::inspect::REUSE;
use kata_ksm_throttler::core::accounting::{Report, Vmm};
use kata_ksm_throttler::core::doctor::DoctorAnswer;
use kata_ksm_throttler_test_support::fakeproc::{ksm_stat, smaps_entry, FakeProc};
use kata_ksm_throttler_test_support::*;
use ksm_throttler_contract::proxy::InspectProxy;

const PRIVATE: &str = "aaaa1111";
const SHARED: &str = "bbbb2222";
const MIB: u64 = 1 << 20;

/// Sandbox folders as the Go runtime makes them, a config naming them, and a fake /proc with
/// one QEMU per sandbox (one with private mergeable RAM, one with a shared memfd), a mergeable
/// workload, an unreadable process and a bash.
struct World {
    proc: FakeProc,
    _runs: tempfile::TempDir,
    config: std::path::PathBuf,
}

fn world() -> World {
    let proc = FakeProc::new();
    let runs = tempfile::tempdir().expect("tempdir");
    for id in [PRIVATE, SHARED, "cccc3333"] {
        std::fs::create_dir_all(runs.path().join("vc/sbs").join(id)).expect("sandbox folder");
    }
    std::fs::create_dir_all(runs.path().join("vc/sbs/.not-an-id")).expect("folder");
    let config = runs.path().join("config.toml");
    let toml = format!(
        "[trigger]\nvc-root = \"{}\"\nkata-root = \"{}\"\n",
        runs.path().join("vc").display(),
        runs.path().join("kata").display()
    );
    std::fs::write(&config, toml).expect("config");

    let private_name = format!("sandbox-{PRIVATE}");
    let ram = smaps_entry(0x7f00_0000_0000, 512 * MIB, "rw-p", "ac mg", "");
    proc.add(
        100,
        "qemu-system-x86",
        &["qemu-system-x86_64", "-name", &private_name],
        Some(&ksm_stat(1000, 24, 3_000_000, true)),
        &ram,
    );
    let shared_name = format!("sandbox-{SHARED}");
    let memfd = smaps_entry(0x7f10_0000_0000, 512 * MIB, "rw-s", "sh", "/memfd:mem (deleted)");
    proc.add(
        200,
        "qemu-system-x86",
        &["qemu-system-x86_64", "-name", &shared_name],
        Some(&ksm_stat(0, 0, 0, false)),
        &memfd,
    );
    let work = smaps_entry(0x7f20_0000_0000, 64 * MIB, "rw-p", "mg", "");
    proc.add(300, "ksm-workload", &["ksm-workload"], Some(&ksm_stat(10, 0, 30_000, true)), &work);
    proc.add(400, "bash", &["bash"], Some(&ksm_stat(0, 0, 0, false)), "");
    let unreadable = proc.add(500, "locked", &["locked"], None, "");
    std::fs::create_dir(unreadable.join("ksm_stat")).expect("a ksm_stat that cannot be read");
    World { proc, _runs: runs, config }
}

async fn start(w: &World) -> Setup {
    let config = w.config.display().to_string();
    let proc = w.proc.path().display().to_string();
    setup(&["--config", &config, "--proc-root", &proc]).await
}

async fn inspect(s: &Setup) -> InspectProxy<'static> {
    InspectProxy::new(&s.conn).await.expect("Inspect proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_lists_each_sandbox_with_its_vmm_the_skipped_rows_and_the_host() {
    let w = world();
    let s = start(&w).await;
    s.scratch.set("pages_sharing", "1010\n");
    s.scratch.set("general_profit", "2900000\n");
    let answer = inspect(&s).await.sandboxes().await.expect("Sandboxes");
    let r: Report = serde_json::from_str(&answer).expect("the documented JSON");

    let ids: Vec<&str> = r.sandboxes.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [PRIVATE, SHARED, "cccc3333"], "by savings; the sandbox with no process last");
    let private = &r.sandboxes[0];
    assert_eq!((private.vmm_pid, private.vmm), (Some(100), Some(Vmm::Qemu)));
    assert_eq!((private.merging_pages, private.zero_pages, private.profit_bytes), (1000, 24, 3_000_000));
    assert_eq!(private.saved_bytes, 1024 * r.page_size);
    assert_eq!(private.mergeable_bytes, 512 * MIB);
    let shared = &r.sandboxes[1];
    assert_eq!(shared.vmm_pid, Some(200));
    let ram = shared.guest_ram.as_ref().expect("the shared VM's guest RAM");
    assert!(ram.shared && !ram.mergeable && ram.path.contains("memfd"), "{ram:?}");
    assert_eq!(r.sandboxes[2].vmm_pid, None);

    let pids: Vec<u32> = r.processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [100, 300, 200], "mergeable ones and the VMMs; not bash");
    assert_eq!(r.skipped.iter().map(|s| s.pid).collect::<Vec<_>>(), [500]);
    assert!(r.skipped[0].reason.starts_with("ksm_stat:"), "{:?}", r.skipped);
    assert_eq!(r.folders.invalid_count, 1);
    assert_eq!(r.walked, 5);
    assert_eq!(r.host.pages_sharing, 1010);
    assert_eq!(r.host.general_profit, Some(2_900_000));
    assert_eq!(r.host.process_profit_sum, 3_030_000);
    assert!(r.host.caveat.contains("20 %"), "{}", r.host.caveat);
    // The daemon keeps serving its own interface.
    assert_eq!(s.proxy.current_setting().await.expect("get"), "initial");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_names_the_shared_sandbox_and_not_the_private_one() {
    let w = world();
    let s = start(&w).await;
    let answer = inspect(&s).await.doctor().await.expect("Doctor");
    let d: DoctorAnswer = serde_json::from_str(&answer).expect("the documented JSON");
    assert!(d.failed, "{d:#?}");
    let about = |id: &str| d.findings.iter().filter(|f| f.sandbox.as_deref() == Some(id)).collect::<Vec<_>>();
    let shared = about(SHARED);
    assert_eq!(shared.len(), 1, "{d:#?}");
    assert_eq!(shared[0].code, "sandbox-shared-memory");
    assert!(shared[0].fix.contains("shared_fs"), "{}", shared[0].fix);
    let private = about(PRIVATE);
    assert_eq!(private.iter().map(|f| f.code.as_str()).collect::<Vec<_>>(), ["sandbox-mergeable"]);
    assert_eq!(about("cccc3333")[0].code, "sandbox-no-vmm");
    let codes: Vec<&str> = d.findings.iter().map(|f| f.code.as_str()).collect();
    assert!(codes.contains(&"processes-unreadable") && codes.contains(&"run-0-idle"), "{codes:?}");
    assert_eq!(d.findings[0].severity.as_str(), "error", "errors first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_calls_is_answered_from_one_walk_and_a_later_call_walks_again() {
    let w = world();
    let s = start(&w).await;
    let proxy = inspect(&s).await;
    let started = Instant::now();
    let calls = (0..50).map(|_| {
        let p = proxy.clone();
        async move { p.sandboxes().await }
    });
    let answers: Vec<String> =
        futures_util::future::join_all(calls).await.into_iter().map(|a| a.expect("every call answered")).collect();
    let took = started.elapsed();
    // One walk answers them all unless the flood outlasted the reuse window (a very loaded machine).
    if took < REUSE {
        assert!(answers.iter().all(|a| a == &answers[0]), "50 calls within {took:?}: one walk");
    }
    // A process that appears is seen once the window is over: the walk runs again.
    let work = smaps_entry(0x7f30_0000_0000, 8 * MIB, "rw-p", "mg", "");
    w.proc.add(600, "late", &["late"], Some(&ksm_stat(5, 0, 1, true)), &work);
    tokio::time::sleep(REUSE).await;
    let r: Report = serde_json::from_str(&proxy.sandboxes().await.expect("Sandboxes")).expect("json");
    assert!(r.processes.iter().any(|p| p.pid == 600), "a new walk after {REUSE:?}");
}

fn ksmtctl(address: &str, args: &[&str]) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_ksmtctl"));
    Command::new(bin).arg("--bus").arg(address).args(args).output().expect("running ksmtctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksmtctl_sandboxes_and_doctor_show_it_and_the_doctor_exits_6_on_an_error() {
    let w = world();
    let s = start(&w).await;
    let address = s.bus.address().to_owned();
    let out = tokio::task::spawn_blocking({
        let a = address.clone();
        move || ksmtctl(&a, &["sandboxes"])
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let first = text.lines().nth(1).expect("a row");
    assert!(first.starts_with(PRIVATE) && first.contains("qemu") && first.contains("mergeable"), "{text}");
    assert!(text.contains("shared /memfd:mem (deleted)"), "{text}");
    assert!(text.contains("general_profit") && text.contains("20 %"), "{text}");

    let out = tokio::task::spawn_blocking({
        let a = address.clone();
        move || ksmtctl(&a, &["doctor"])
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(text.starts_with("error   sandbox-shared-memory:"), "{text}");
    assert!(text.contains("fix: in Kata's configuration.toml"), "{text}");

    let out = tokio::task::spawn_blocking(move || ksmtctl(&address, &["doctor", "--json"])).await.expect("join");
    let d: DoctorAnswer = serde_json::from_slice(&out.stdout).expect("--json is the answer");
    assert!(d.failed);
    assert_eq!(out.status.code(), Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksmtctl_top_refreshes_until_ctrl_c() {
    let w = world();
    let s = start(&w).await;
    let log = s.scratch.path().join("top.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ksmtctl"));
    cmd.args(["--bus", s.bus.address(), "top", "--interval", "300ms"]);
    let mut top = Guarded::spawn_logged(&mut cmd, "ksmtctl top", &log).expect("ksmtctl top");
    let refreshes = |text: &str| text.matches("(every 300ms; Ctrl-C ends)").count();
    eventually(std::time::Duration::from_secs(20), "two refreshes of ksmtctl top", async || {
        refreshes(&top.log_text()) >= 2
    })
    .await;
    top.signal(rustix::process::Signal::INT).expect("SIGINT");
    let status = top.wait_within(std::time::Duration::from_secs(10)).expect("exits on Ctrl-C");
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains(PRIVATE) && text.contains("walked 5 processes"), "{text}");
}
