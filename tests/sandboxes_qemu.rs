//! The Inspect interface against real QEMU processes (TCG, `-S`: no guest runs; QEMU allocates,
//! madvises and, with `prealloc=on`, touches guest RAM before it would start one), started the
//! way Kata starts them (`-name sandbox-<id>`) under fake sandbox folders, in both of Kata's
//! memory set-ups: private RAM (`mem-merge=on`, QEMU's default), and a shared memfd
//! (`memory-backend-memfd,share=on`, as virtio-fs needs). The daemon walks the real /proc.
//! One test merges the two private VMs' RAM on the real KSM (real-KSM lock, restored): with no
//! guest to write it, the same 16 MiB of distinct pages is loaded into each VM's RAM by QEMU's
//! generic loader (zero-filled RAM would not do: since Linux 6.12 the kernel maps a THP's zero
//! subpages to the zero page itself, and KSM finds nothing to merge).

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kata_ksm_throttler::core::accounting::{KsmStat, Report, Vmm};
use kata_ksm_throttler::core::doctor::DoctorAnswer;
use kata_ksm_throttler::core::knobs::{Knobs, Target};
use kata_ksm_throttler::io::sysfs::Ksm;
use kata_ksm_throttler_test_support::real_ksm::{self, REAL_KSM};
use kata_ksm_throttler_test_support::*;
use ksm_throttler_contract::proxy::InspectProxy;

const RAM_MIB: u64 = 64;
/// The pages loaded into every VM's RAM: distinct from each other, the same in every VM.
const BLOB_PAGES: u64 = 4096;

fn write_blob(path: &Path) {
    let mut blob = Vec::with_capacity((BLOB_PAGES * 4096) as usize);
    for i in 0..BLOB_PAGES {
        let mut page = [0u8; 4096];
        for (n, chunk) in page.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(i * 512 + n as u64 + 1).to_le_bytes());
        }
        blob.extend_from_slice(&page);
    }
    std::fs::write(path, blob).expect("the guest RAM blob");
}

/// How the guest RAM is backed.
#[derive(Clone, Copy, PartialEq)]
enum Memory {
    Private,
    Shared,
}

fn qemu(id: &str, memory: Memory, blob: &Path, log: &Path) -> Guarded {
    let backend = match memory {
        Memory::Private => format!("memory-backend-ram,id=mem,size={RAM_MIB}M,prealloc=on"),
        Memory::Shared => format!("memory-backend-memfd,id=mem,size={RAM_MIB}M,share=on,prealloc=on"),
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-name", &format!("sandbox-{id}"), "-machine", "pc,mem-merge=on"])
        .args(["-m", &format!("{RAM_MIB}M"), "-object", &backend, "-numa", "node,memdev=mem"])
        .args(["-device", &format!("loader,file={},addr=0x1000000,force-raw=on", blob.display())])
        .args(["-nographic", "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none", "-S"]);
    Guarded::spawn_logged(&mut cmd, format!("qemu {id}"), log)
        .unwrap_or_else(|e| panic!("{e} (is qemu-system-x86 installed?)"))
}

/// The process's own ksm_stat, parsed.
fn own_stat(pid: u32) -> KsmStat {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).expect("ksm_stat");
    KsmStat::parse(&text).expect("parses")
}

/// Waits until QEMU has mapped (and preallocated) its guest RAM.
fn wait_for_ram(q: &Guarded) -> u32 {
    let pid = q.pid().expect("running");
    let size = format!("Size:           {:>8} kB", RAM_MIB * 1024);
    eventually_blocking(
        Duration::from_secs(60),
        || format!("QEMU {pid} to map its guest RAM; log:\n{}", q.log_text()),
        || {
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss_kb: u64 = rss
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            smaps.contains(&size) && rss_kb >= RAM_MIB * 1024
        },
    );
    pid
}

struct Vms {
    _sandboxes: tempfile::TempDir,
    config: std::path::PathBuf,
    vms: Vec<(String, Guarded)>,
}

/// Sandbox folders (`<tmp>/vc/sbs/<id>`) and one QEMU per (id, memory).
fn start_vms(list: &[(&str, Memory)]) -> Vms {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[trigger]\nvc-root = \"{}\"\nkata-root = \"\"\n", dir.path().join("vc").display()),
    )
    .expect("config");
    let blob = dir.path().join("ram.bin");
    write_blob(&blob);
    let mut vms = vec![];
    for (id, memory) in list {
        std::fs::create_dir_all(dir.path().join("vc/sbs").join(id)).expect("sandbox folder");
        vms.push((id.to_string(), qemu(id, *memory, &blob, &dir.path().join(format!("qemu-{id}.log")))));
    }
    for (_, q) in &vms {
        wait_for_ram(q);
    }
    Vms { _sandboxes: dir, config, vms }
}

async fn daemon_for(vms: &Vms) -> Setup {
    setup(&["--config", &vms.config.display().to_string()]).await
}

async fn sandboxes(s: &Setup) -> Report {
    let answer = InspectProxy::new(&s.conn).await.expect("proxy").sandboxes().await.expect("Sandboxes");
    serde_json::from_str(&answer).expect("JSON")
}

/// The real KSM, locked and put back as found when dropped (even on a panic).
struct RealKsm {
    ksm: Ksm,
    found: Knobs,
    _lock: File,
}

impl Drop for RealKsm {
    fn drop(&mut self) {
        if let Err(e) = self.ksm.apply(&Target::from(&self.found)) {
            eprintln!("could not restore the real KSM to {:?}: {e}", self.found);
        }
    }
}

fn take_real_ksm(test: &str) -> Option<RealKsm> {
    if real_ksm::skip_real_ksm(test) {
        return None;
    }
    let lock = real_ksm::lock_within(Duration::from_secs(300));
    let ksm = Ksm::open(REAL_KSM).expect("the real KSM");
    let found = ksm.read().expect("reading the real KSM");
    Some(RealKsm { ksm, found, _lock: lock })
}

const PRIVATE: &str = "qemu-private-1";
const SHARED: &str = "qemu-shared-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_s_row_matches_its_qemu_s_own_ksm_stat_and_the_doctor_names_the_shared_one() {
    // Under the lock: ksmd must not change the counters between the walk and the check.
    let Some(_ksm) = take_real_ksm("each_sandbox_s_row_matches_its_qemu_s_own_ksm_stat") else { return };
    let vms = start_vms(&[(PRIVATE, Memory::Private), (SHARED, Memory::Shared)]);
    let s = daemon_for(&vms).await;
    let r = sandboxes(&s).await;
    for (id, q) in &vms.vms {
        let pid = q.pid().expect("running");
        let row = r.sandboxes.iter().find(|row| &row.id == id).unwrap_or_else(|| panic!("{id} in {r:#?}"));
        assert_eq!((row.vmm_pid, row.vmm), (Some(pid), Some(Vmm::Qemu)), "{id}");
        let own = own_stat(pid);
        assert_eq!(row.merging_pages, own.merging_pages, "{id}");
        assert_eq!(row.zero_pages, own.zero_pages.unwrap_or(0), "{id}");
        assert_eq!(row.profit_bytes, own.process_profit.unwrap_or(0), "{id}");
        let listed = r.processes.iter().find(|p| p.pid == pid).expect("the VMM is listed");
        assert_eq!(listed.ksm, own, "{id}: the whole ksm_stat");
        let ram = row.guest_ram.as_ref().expect("guest RAM found");
        assert_eq!(ram.size_bytes, RAM_MIB << 20, "{id}: the guest RAM, not TCG's translation buffer");
    }
    let private = r.sandboxes.iter().find(|r| r.id == PRIVATE).and_then(|r| r.guest_ram.clone()).expect("private");
    assert!(private.mergeable && !private.shared, "{private:?}");
    let shared = r.sandboxes.iter().find(|r| r.id == SHARED).and_then(|r| r.guest_ram.clone()).expect("shared");
    assert!(shared.shared && !shared.mergeable && shared.path.contains("memfd"), "{shared:?}");

    let answer = InspectProxy::new(&s.conn).await.expect("proxy").doctor().await.expect("Doctor");
    let d: DoctorAnswer = serde_json::from_str(&answer).expect("JSON");
    let codes = |id: &str| {
        d.findings.iter().filter(|f| f.sandbox.as_deref() == Some(id)).map(|f| f.code.clone()).collect::<Vec<_>>()
    };
    assert_eq!(codes(SHARED), ["sandbox-shared-memory"], "{d:#?}");
    assert_eq!(codes(PRIVATE), ["sandbox-mergeable"], "{d:#?}");
    assert!(d.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_private_qemus_merge_on_the_real_ksm_and_each_sandbox_shows_its_savings() {
    let Some(real) = take_real_ksm("two_private_qemus_merge_on_the_real_ksm") else { return };
    let vms = start_vms(&[("merge-a", Memory::Private), ("merge-b", Memory::Private), (SHARED, Memory::Shared)]);
    let s = daemon_for(&vms).await;
    let before = sandboxes(&s).await;
    let saved = |r: &Report, id: &str| r.sandboxes.iter().find(|row| row.id == id).map_or(0, |row| row.saved_bytes);

    // Fast enough to scan 3 x 64 MiB in seconds, even on a loaded machine.
    real.ksm.write("pages_to_scan", 5000).expect("pages_to_scan");
    real.ksm.write("sleep_millisecs", 5).expect("sleep_millisecs");
    real.ksm.write("run", 1).expect("run");
    eventually_blocking(Duration::from_secs(120), "both private VMs to have merged the loaded pages", || {
        ["merge-a", "merge-b"].iter().all(|id| {
            let pid = vms.vms.iter().find(|(v, _)| v == id).and_then(|(_, q)| q.pid()).expect("running");
            own_stat(pid).saved_pages() >= BLOB_PAGES
        })
    });
    // Stopped (merged pages stay merged): the walk and the processes' own figures then agree.
    real.ksm.write("run", 0).expect("run=0");
    let r = sandboxes_after_reuse(&s).await;
    for id in ["merge-a", "merge-b"] {
        let row = r.sandboxes.iter().find(|row| row.id == id).expect("row");
        let own = own_stat(row.vmm_pid.expect("pid"));
        assert_eq!(row.saved_bytes, own.saved_pages() * r.page_size, "{id}");
        assert!(row.saved_bytes >= BLOB_PAGES * r.page_size, "{id} saved {} bytes", row.saved_bytes);
        assert!(row.saved_bytes > saved(&before, id), "{id} saves more than before the scan");
    }
    // Its guest RAM never merges (QEMU's own small mergeable mappings may).
    let shared_ram =
        r.sandboxes.iter().find(|row| row.id == SHARED).and_then(|row| row.guest_ram.clone()).expect("ram");
    assert_eq!(shared_ram.ksm_bytes, 0, "shared memory never merges: {shared_ram:?}");
    for id in ["merge-a", "merge-b"] {
        let ram = r.sandboxes.iter().find(|row| row.id == id).and_then(|row| row.guest_ram.clone()).expect("ram");
        assert!(ram.ksm_bytes >= BLOB_PAGES * r.page_size, "{id}: the loaded pages merged in its guest RAM: {ram:?}");
    }
    let ids: Vec<&str> = r.sandboxes.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.last(), Some(&SHARED), "sorted by savings: {ids:?}");
    drop(s);
    drop(vms);
    drop(real);
    let after = Ksm::open(REAL_KSM).expect("open").read().expect("read");
    eprintln!("real KSM after the test: {after:?}");
}

/// A fresh walk (the previous answer is reused for up to REUSE).
async fn sandboxes_after_reuse(s: &Setup) -> Report {
    tokio::time::sleep(kata_ksm_throttler::bus::inspect::REUSE).await;
    sandboxes(s).await
}
