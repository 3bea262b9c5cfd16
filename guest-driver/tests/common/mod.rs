//! Set-up shared by the vnic-guest tests against the kernel in a namespace.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::{path::Path, process::Command};

use serde_json::Value;
use vnic_guest::cli::NetArgs;
use vnic_tests::PortInNs;

/// The workspace's vnicd, built beside the test binaries.
pub fn vnicd() -> String {
    vnic_tests::sibling_binary(env!("CARGO_BIN_EXE_vnic-iperf"), "vnicd")
}

/// vnicd (2 queue pairs) with its TAP in a namespace as 192.0.2.1/24 and
/// 2001:db8::1/64; the guest stack resolves addresses itself.
pub fn setup() -> PortInNs {
    let s = PortInNs::start(&vnicd(), &["--queues", "2"], "192.0.2.1/24", &[])
        .expect("vnicd with its TAP in a namespace");
    s.ns.exec(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=0", s.tap)],
    )
    .expect("enable IPv6");
    s.ns.ip(&["addr", "add", "2001:db8::1/64", "dev", &s.tap, "nodad"])
        .expect("IPv6 address");
    s
}

/// The stack in this process on vnicd's socket, as 192.0.2.2/24 and
/// 2001:db8::2/64 on 2 queue pairs.
pub fn start_stack(
    socket: &Path,
    no_tso: bool,
    busy_poll_us: Option<u64>,
) -> vnic_guest::stack::Stack {
    stack_args(socket, no_tso, busy_poll_us)
        .start()
        .expect("stack")
}

/// [`start_stack`]'s arguments.
pub fn stack_args(socket: &Path, no_tso: bool, busy_poll_us: Option<u64>) -> NetArgs {
    NetArgs {
        socket: Some(socket.to_path_buf()),
        pci: None,
        addr: Some("192.0.2.2/24".into()),
        addr6: Some("2001:db8::2/64".into()),
        queues: 2,
        queue_size: 256,
        no_tso,
        no_csum: false,
        busy_poll_us,
        reassembly_kib: 4096,
        toe: false,
        toe_conns: 0,
        toe_ring_kib: 256,
    }
}

/// One vnicd counter summed over the RX queues (`packets`, `drop.filtered`).
pub fn rx_total(s: &PortInNs, what: &str) -> u64 {
    let st = s.vnicd.stats().expect("vnicd stats");
    (0..2).map(|q| st[&format!("rx{q}.{what}")]).sum()
}

/// The tools' arguments for the stack of [`start_stack`].
pub fn net_args(s: &PortInNs) -> Vec<String> {
    vec![
        "--socket".into(),
        s.vnicd.socket.display().to_string(),
        "--addr".into(),
        "192.0.2.2/24".into(),
        "--addr6".into(),
        "2001:db8::2/64".into(),
        "--queues".into(),
        "2".into(),
    ]
}

/// `cmd args` inside the namespace of `s`.
pub fn in_ns(s: &PortInNs, cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &s.ns.name, cmd]).args(args);
    c
}

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// `end.<k>.bytes` of an iperf3 JSON report.
pub fn bytes(v: &Value, k: &str) -> u64 {
    v["end"][k]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no end.{k}.bytes in {v}"))
}
