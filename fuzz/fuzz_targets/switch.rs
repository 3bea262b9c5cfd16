//! Invariant: the embedded switch takes any sequence of frames (from the
//! ports' drivers, the wire and the representors), driver headers, VF
//! settings, control commands, feature sets and attach/detach without
//! panicking; every transmitted frame is counted once, as a packet or
//! as a drop with a reason; every frame it queues for a port carries a
//! 12-byte header that parses and a whole Ethernet header, within the
//! largest frame; every backlog stays within its byte bound; and frames
//! it writes to the wire from a VF with a port VLAN carry that VLAN's
//! tag.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_backend::{
    nic::{default_vf_mac, vf::VfSettings, DeviceConfig, Nic, TxScratch, BACKLOG_BYTES, MAX_FRAME},
    uplink::{fake::FakeUplink, Offloads, Uplink},
    vhost::offered_features,
};
use vnic_fuzz::Input;
use vnic_protocol::{
    virtio::{ctrl::CtrlCommand, Features, VirtioNetHdr},
    wire::ethernet::Address,
};

const VFS: usize = 3;
const PF: Address = Address([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

const KEYS: [&str; 9] = [
    "mac",
    "vlan",
    "qos",
    "proto",
    "spoofchk",
    "trust",
    "max_tx_rate",
    "min_tx_rate",
    "state",
];
const VALUES: [&str; 16] = [
    "0",
    "1",
    "7",
    "100",
    "4094",
    "4095",
    "on",
    "off",
    "802.1Q",
    "802.1ad",
    "auto",
    "enable",
    "disable",
    "02:00:00:00:00:09",
    "52:54:00:12:f0:01",
    "ff:ff:ff:ff:ff:ff",
];

/// A frame from the input, addressed (most of the time) to one of the
/// switch's ports so that the interesting paths are reached.
fn frame(inp: &mut Input<'_>) -> Vec<u8> {
    let sel = inp.byte().unwrap_or(0);
    let len = usize::from(inp.u16().unwrap_or(60)) % 2100;
    let mut f = inp.take(len).to_vec();
    if f.len() >= 12 && sel & 0x80 == 0 {
        let dst = match sel % 6 {
            0 => PF,
            1 => Address::BROADCAST,
            5 => Address([2, 0, 0, 0, 9, 9]),
            n => default_vf_mac(PF, usize::from(n) - 2),
        };
        f[..6].copy_from_slice(&dst.0);
        let src = default_vf_mac(PF, usize::from(sel >> 4) % VFS);
        f[6..12].copy_from_slice(&src.0);
    }
    f
}

fn hdr(inp: &mut Input<'_>) -> [u8; 12] {
    let mut h = [0u8; 12];
    if inp.byte().unwrap_or(0) & 1 == 1 {
        let b = inp.take(12);
        h[..b.len()].copy_from_slice(b);
    }
    h
}

/// Takes every frame queued for every port and checks it.
fn drain(nic: &Nic) {
    for port in &nic.ports {
        for b in &port.backlogs {
            assert!(b.held_bytes() <= BACKLOG_BYTES);
            while b
                .deliver_front(|f| {
                    assert!(f.len() >= 12 + 14, "a queued frame of {} bytes", f.len());
                    assert!(f.len() <= 12 + MAX_FRAME + 4);
                    assert!(VirtioNetHdr::parse(&f[..12], false).is_ok());
                    true
                })
                .is_some()
            {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let switchdev = inp.byte().unwrap_or(0) & 1 == 1;
    let offloads = |b: u8| {
        if b & 1 == 1 {
            Offloads::ALL
        } else {
            Offloads::default()
        }
    };
    let flags = inp.byte().unwrap_or(0);
    let up = FakeUplink::with_offloads(offloads(flags));
    let reps: Vec<FakeUplink> = (0..VFS)
        .map(|i| {
            let r = FakeUplink::with_offloads(offloads(flags >> (i + 1)));
            r.lock().discard = true;
            r
        })
        .collect();
    let boxed: Vec<Box<dyn Uplink>> = if switchdev {
        reps.iter()
            .map(|r| Box::new(r.clone()) as Box<dyn Uplink>)
            .collect()
    } else {
        Vec::new()
    };
    let cfg = DeviceConfig {
        // Now and then a link the ports share (min_tx_rate guarantees).
        link_speed: if switchdev { 0 } else { 1000 },
        ..DeviceConfig::new(2, PF)
    };
    let vfs = (0..VFS)
        .map(|i| VfSettings::new(default_vf_mac(PF, i)))
        .collect();
    let Ok(nic) = Nic::new(cfg, vfs, Box::new(up.clone()), boxed) else {
        return;
    };
    for p in 0..=VFS {
        nic.attach(p, true);
        let _ = nic.set_guest_features(p, offered_features());
    }
    let mut scratch = TxScratch::default();
    for _ in 0..64 {
        let Some(op) = inp.byte() else { break };
        let p = usize::from(inp.byte().unwrap_or(0)) % (VFS + 1);
        match op % 7 {
            0 => {
                let n = usize::from(inp.byte().unwrap_or(0) % 3) + 1;
                let pairs: Vec<(&str, &str)> = (0..n)
                    .map(|_| {
                        let k = KEYS[usize::from(inp.byte().unwrap_or(0)) % KEYS.len()];
                        let v = VALUES[usize::from(inp.byte().unwrap_or(0)) % VALUES.len()];
                        (k, v)
                    })
                    .collect();
                let _ = nic.set_vf(p, &pairs);
            }
            1 | 2 => {
                let h = hdr(&mut inp);
                let f = frame(&mut inp);
                let q = usize::from(op >> 4) % 2;
                let st = &nic.ports[p].stats.tx[q];
                let before =
                    st.packets.load(std::sync::atomic::Ordering::Relaxed) + st.total_drops();
                up.lock().sent.clear();
                let _ = nic.transmit(p, q, &h, &f, &mut scratch);
                let after =
                    st.packets.load(std::sync::atomic::Ordering::Relaxed) + st.total_drops();
                assert_eq!(after, before + 1, "a transmitted frame is counted once");
                // A port VLAN's frames reach the wire tagged with it.
                let vlan = nic.ports[p].settings().vlan;
                if let Some(pv) = vlan.filter(|_| p > 0 && !switchdev) {
                    for s in &up.lock().sent {
                        assert!(
                            s.len() >= 12 + 16,
                            "a frame on the wire of {} bytes",
                            s.len()
                        );
                        assert_eq!(u16::from_be_bytes([s[24], s[25]]), pv.proto);
                        assert_eq!(u16::from_be_bytes([s[26], s[27]]), pv.tci());
                    }
                }
                up.lock().sent.clear();
            }
            3 => {
                let mut buf = hdr(&mut inp).to_vec();
                buf.extend_from_slice(&frame(&mut inp));
                let view = nic.switch.view();
                let _ = nic.uplink_route(&view, &buf[12.min(buf.len())..], buf.len());
                nic.from_uplink(&buf, &view, &nic.pf().stats.rx[0], &mut scratch);
            }
            4 => {
                let Ok(cmd) = CtrlCommand::parse_message(inp.take(64)) else {
                    continue;
                };
                let _ = nic.control(p, &cmd, offered_features());
            }
            5 => {
                let bits =
                    u64::from(inp.u16().unwrap_or(0)) | (u64::from(inp.u16().unwrap_or(0)) << 16);
                let _ = nic
                    .set_guest_features(p, Features::from_bits_retain(bits) & offered_features());
            }
            _ => {
                if switchdev && p > 0 {
                    let mut buf = hdr(&mut inp).to_vec();
                    buf.extend_from_slice(&frame(&mut inp));
                    let view = nic.switch.view();
                    let st = &nic.ports[p].stats.rx[0];
                    nic.from_representor(p - 1, &buf, &view, st, &mut scratch);
                } else {
                    nic.attach(p, inp.byte().unwrap_or(1) & 1 == 1);
                }
            }
        }
        nic.wake(&mut scratch.wakes);
        drain(&nic);
    }
});
