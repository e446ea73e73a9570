//! Which Kata sandbox a process runs, from its command line, matched against the sandbox ids
//! found in the folders the trigger watches. How each runtime names its VMM (kata-containers,
//! read at HEAD):
//! - QEMU, both runtimes: `-name sandbox-<id>` (src/runtime/virtcontainers/qemu.go,
//!   `Name: fmt.Sprintf("sandbox-%s", q.id)`; src/runtime-rs/crates/hypervisor/src/qemu/
//!   cmdline_generator.rs, `"-name"`, `format!("sandbox-{}", self.id)`).
//! - Cloud Hypervisor: `--api-socket <VMStorePath>/<id>/clh-api.sock` (virtcontainers/clh.go,
//!   `apiSocketPath`; runtime-rs ch/utils.rs `get_api_socket_path`).
//! - Firecracker: `--id <id>` and `--api-sock /run/vc/firecracker/<id>/root/run/firecracker.socket`
//!   (virtcontainers/fc.go), `/run/kata/<id>/run/fc.sock` (runtime-rs firecracker/inner_hypervisor.rs).
//! - Dragonball runs inside runtime-rs's shim, `containerd-shim-kata-v2 … -id <id>`.
//!
//! So: `-name sandbox-<id>` first; else an `--id`/`-id` argument, or a path with the id as one of
//! its components. Only ids of existing folders match, so a stray path component matches nothing.

use std::collections::HashSet;

use crate::core::accounting::Vmm;

/// The longest id accepted: containerd's are 64 hex digits; its own limit is 76.
pub const ID_MAX: usize = 128;

/// A sandbox id as containerd and Kata make them: letters, digits, `_`, `.`, `-`, starting with a
/// letter or a digit (containerd's identifiers.Validate; Kata's ids are containerd's). Anything
/// else (`.`, `..`, a leftover `foo.tmp~`, a 300-byte name) is not a sandbox.
pub fn valid_id(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    first_ok && name.len() <= ID_MAX && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The VMM kind from the executable's name (`comm` or argv\[0\]'s base name).
pub fn vmm_kind(name: &str) -> Vmm {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.starts_with("qemu") {
        Vmm::Qemu
    } else if base.starts_with("cloud-hyperviso") {
        // comm is cut at 15 bytes: "cloud-hyperviso".
        Vmm::CloudHypervisor
    } else if base.starts_with("firecracker") || base == "jailer" {
        Vmm::Firecracker
    } else if base.starts_with("containerd-shim") {
        Vmm::Shim
    } else {
        Vmm::Other
    }
}

/// The sandbox `argv` runs, among `ids`, and what kind of process it is.
pub fn match_process<'a>(argv: &[&str], comm: &str, ids: &'a HashSet<String>) -> Option<(&'a str, Vmm)> {
    let known = |s: &str| ids.get(s).map(String::as_str);
    let exe = argv.first().copied().filter(|a| !a.is_empty()).unwrap_or(comm);
    // QEMU's -name may carry options: `sandbox-<id>,debug-threads=on`.
    for pair in argv.windows(2) {
        if pair[0] == "-name" {
            let name = pair[1].split(',').next().unwrap_or_default();
            if let Some(id) = name.strip_prefix("sandbox-").and_then(known) {
                return Some((id, Vmm::Qemu));
            }
        }
    }
    for (i, arg) in argv.iter().enumerate().skip(1) {
        let prev = argv[i - 1];
        if matches!(prev, "--id" | "-id") {
            if let Some(id) = known(arg) {
                return Some((id, vmm_kind(exe)));
            }
        }
        // `--api-socket=/run/vc/vm/<id>/clh-api.sock` and `path=/run/…/<id>/…` forms too.
        let value = arg.rsplit_once('=').map_or(*arg, |(_, v)| v);
        if value.contains('/') {
            if let Some(id) = value.split(['/', ',']).find_map(known) {
                return Some((id, vmm_kind(exe)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const ID: &str = "3f2c9a0b1d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    #[test]
    fn ids_as_containerd_makes_them() {
        assert!(valid_id(ID));
        assert!(valid_id("pod-1.sandbox_2"));
        for bad in ["", ".", "..", "-x", ".hidden", "a/b", "a b", "ünï", &"a".repeat(ID_MAX + 1)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_id(&"a".repeat(ID_MAX)));
    }

    #[test]
    fn each_runtime_s_vmm_is_matched_by_how_kata_starts_it() {
        let known = ids(&[ID, "other"]);
        let name = format!("sandbox-{ID}");
        let qemu = ["/opt/kata/bin/qemu-system-x86_64", "-name", &name, "-uuid", "x", "-machine", "q35"];
        assert_eq!(match_process(&qemu, "qemu-system-x86", &known), Some((ID, Vmm::Qemu)));
        let with_opts = format!("sandbox-{ID},debug-threads=on");
        assert_eq!(match_process(&["qemu", "-name", &with_opts], "qemu", &known), Some((ID, Vmm::Qemu)));

        let sock = format!("/run/vc/vm/{ID}/clh-api.sock");
        let clh = ["/opt/kata/bin/cloud-hypervisor", "--api-socket", &sock];
        assert_eq!(match_process(&clh, "cloud-hyperviso", &known), Some((ID, Vmm::CloudHypervisor)));
        let clh_eq = format!("--api-socket=path={sock}");
        assert_eq!(
            match_process(&["cloud-hypervisor", &clh_eq], "cloud-hyperviso", &known),
            Some((ID, Vmm::CloudHypervisor))
        );

        let fc = ["/opt/kata/bin/jailer", "--id", ID, "--exec-file", "/opt/kata/bin/firecracker"];
        assert_eq!(match_process(&fc, "jailer", &known), Some((ID, Vmm::Firecracker)));
        let fc_sock = format!("/run/kata/{ID}/run/fc.sock");
        assert_eq!(
            match_process(&["firecracker", "--api-sock", &fc_sock], "firecracker", &known),
            Some((ID, Vmm::Firecracker))
        );

        let shim = ["/opt/kata/runtime-rs/bin/containerd-shim-kata-v2", "-namespace", "k8s.io", "-id", ID];
        assert_eq!(match_process(&shim, "containerd-shim", &known), Some((ID, Vmm::Shim)));
    }

    #[test]
    fn unknown_ids_and_unrelated_processes_match_nothing() {
        let known = ids(&[ID]);
        assert_eq!(match_process(&["qemu", "-name", "sandbox-unknown"], "qemu", &known), None);
        assert_eq!(match_process(&["qemu", "-name", "guest"], "qemu", &known), None);
        assert_eq!(match_process(&["bash", "-c", "ls /run/vc/sbs"], "bash", &known), None);
        assert_eq!(match_process(&[], "kworker/0:1", &known), None);
        // The id as an argument that is not a path, and not after --id, is no claim.
        assert_eq!(match_process(&["grep", ID], "grep", &known), None);
        assert_eq!(match_process(&["qemu", "-name"], "qemu", &known), None);
    }
}
