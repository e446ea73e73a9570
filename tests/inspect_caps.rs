//! What the walk can read under the unit's sandboxing, with real QEMU processes of root and of
//! another user (nobody): the daemon runs as root with the capability bounding set the unit
//! gives it (`CapabilityBoundingSet=CAP_SYS_PTRACE`), no new privileges, and a /proc mounted
//! `hidepid=invisible` as `ProtectProc=invisible` does (unshare + setpriv: this host has no
//! systemd to run the unit itself). Then with no capability at all, to show why it is needed.

use std::process::Command;
use std::time::Duration;

use kata_ksm_throttler::core::accounting::{Report, SandboxRow};
use kata_ksm_throttler_test_support::*;
use ksm_throttler_contract::proxy::InspectProxy;

const ROOT_VM: &str = "caps-root";
const USER_VM: &str = "caps-nobody";

fn qemu(id: &str, as_nobody: bool, log: &std::path::Path) -> Guarded {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "qemu-system-x86_64"]);
        c
    } else {
        Command::new("qemu-system-x86_64")
    };
    cmd.args(["-accel", "tcg", "-name", &format!("sandbox-{id}"), "-machine", "pc,mem-merge=on", "-m", "64M"])
        .args(["-object", "memory-backend-ram,id=mem,size=64M,prealloc=on", "-numa", "node,memdev=mem"])
        .args(["-nographic", "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none", "-S"]);
    Guarded::spawn_logged(&mut cmd, format!("qemu {id}"), log).unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon under `bounding` (setpriv's syntax: `-all,+sys_ptrace`), on `bus`, walking a
/// hidepid=invisible /proc.
fn daemon(
    bus: &kata_ksm_throttler::bus::private::PrivateBus,
    scratch: &Scratch,
    config: &str,
    bounding: &str,
) -> Guarded {
    let mut args = scratch.path_args();
    args.extend(["--config".into(), config.into(), "--bus".into(), bus.address().into()]);
    let inner = format!(
        "mount -t proc -o hidepid=invisible proc /proc && exec setpriv --bounding-set {bounding} --inh-caps -all \
         --no-new-privs -- {} {}",
        daemon_binary().display(),
        args.join(" ")
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &inner]);
    let log = scratch.path().join("daemon.log");
    Guarded::spawn_logged(&mut cmd, "kata-ksm-throttler (sandboxed)", &log).unwrap_or_else(|e| panic!("{e}"))
}

async fn walk_under(bounding: &str, dir: &std::path::Path, config: &str) -> (Report, String) {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let d = daemon(&bus, &scratch, config, bounding);
    let conn = connect(&bus).await;
    kata_ksm_throttler_test_support::bus::wait_for_throttler(&conn, || format!("the daemon; log:\n{}", d.log_text()))
        .await;
    let answer = InspectProxy::new(&conn).await.expect("proxy").sandboxes().await.expect("Sandboxes");
    let _ = dir;
    (serde_json::from_str(&answer).expect("JSON"), d.log_text())
}

fn row<'a>(r: &'a Report, id: &str) -> &'a SandboxRow {
    r.sandboxes.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("{id} in {r:#?}"))
}

fn note(r: &Report, pid: Option<u32>) -> String {
    r.processes.iter().find(|p| Some(p.pid) == pid).and_then(|p| p.note.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cap_sys_ptrace_both_vmms_are_read_and_without_it_their_memory_maps_are_not() {
    assert!(rustix::process::geteuid().is_root(), "needs root, as the unit runs");
    let dir = tempfile::tempdir().expect("tempdir");
    for id in [ROOT_VM, USER_VM] {
        std::fs::create_dir_all(dir.path().join("vc/sbs").join(id)).expect("folder");
    }
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[trigger]\nvc-root = \"{}\"\nkata-root = \"\"\n", dir.path().join("vc").display()),
    )
    .expect("config");
    let config = config.display().to_string();
    let root_vm = qemu(ROOT_VM, false, &dir.path().join("root.log"));
    let user_vm = qemu(USER_VM, true, &dir.path().join("user.log"));
    for q in [&root_vm, &user_vm] {
        let pid = q.pid().expect("running");
        eventually_blocking(
            Duration::from_secs(60),
            || format!("QEMU {pid} mapped; log: {}", q.log_text()),
            || std::fs::read_to_string(format!("/proc/{pid}/smaps")).is_ok_and(|s| s.contains("65536 kB")),
        );
    }

    // As the unit runs it.
    let (r, log) = walk_under("-all,+sys_ptrace", dir.path(), &config).await;
    let root = row(&r, ROOT_VM);
    assert_eq!(root.vmm_pid, root_vm.pid(), "{log}");
    assert_eq!(root.guest_ram.as_ref().map(|g| g.size_bytes), Some(64 << 20), "{root:?}");
    let listed = r.processes.iter().find(|p| Some(p.pid) == root.vmm_pid).expect("listed");
    assert!(listed.ksm.rmap_items.is_some() && listed.note.is_none(), "root's own ksm_stat: {listed:?}");
    let user = row(&r, USER_VM);
    assert_eq!(user.vmm_pid, user_vm.pid(), "another user's VMM is visible and matched");
    assert_eq!(user.guest_ram.as_ref().map(|g| g.size_bytes), Some(64 << 20), "its smaps is read: {user:?}");
    let n = note(&r, user.vmm_pid);
    assert!(n.starts_with("ksm_stat: Permission denied") && n.contains("from smaps"), "{n}");

    // No capability: the memory maps of both are out of reach; the call still succeeds and says so.
    let (r, _) = walk_under("-all", dir.path(), &config).await;
    for id in [ROOT_VM, USER_VM] {
        let row = row(&r, id);
        assert!(row.vmm_pid.is_some() && row.guest_ram.is_none(), "{row:?}");
        let n = note(&r, row.vmm_pid);
        assert!(n.contains("smaps: Permission denied"), "{id}: {n}");
    }
}
