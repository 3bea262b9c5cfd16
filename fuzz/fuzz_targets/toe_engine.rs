//! Invariant: the device's TOE engines (two of one port, sharing its
//! table) take any sequence of driver commands, wire frames, timer runs
//! and event reads without panicking; they never read or write outside
//! the driver's memory, never hold more connections together than HELLO
//! granted, the shared table counts exactly the connections they hold,
//! and each one's event queue stays within five events per connection and
//! one per waiting one.

#![no_main]

use std::{
    cell::{Cell, RefCell},
    sync::Arc,
};

use libfuzzer_sys::fuzz_target;
use vnic_backend::nic::toe::{RingMemory, Toe, ToeConfig, ToeTable};
use vnic_protocol::{
    frag,
    tcp::{self, Instant},
    toe::{Command, CMD_LEN},
    wire::ethernet::Address,
};

const BASE: u64 = 0x1_0000;
const SIZE: usize = 1 << 18;

struct Mem {
    bytes: RefCell<Vec<u8>>,
    outside: Cell<bool>,
}

impl Mem {
    fn check(&self, addr: u64, len: usize) -> Option<usize> {
        let end = addr.checked_add(len as u64)?;
        if addr < BASE || end > BASE + SIZE as u64 {
            self.outside.set(true);
            return None;
        }
        Some((addr - BASE) as usize)
    }
}

impl RingMemory for Mem {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= BASE
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= BASE + SIZE as u64)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(o) = self.check(addr, buf.len()) else {
            return false;
        };
        buf.copy_from_slice(&self.bytes.borrow()[o..o + buf.len()]);
        true
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(o) = self.check(addr, data.len()) else {
            return false;
        };
        self.bytes.borrow_mut()[o..o + data.len()].copy_from_slice(data);
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = Mem {
        bytes: RefCell::new(vec![0; SIZE]),
        outside: Cell::new(false),
    };
    let cfg = ToeConfig {
        mac: Address([2, 0, 0, 0, 0, 1]),
        mtu: 1500,
        max_conns: 16,
        offload: data.first().is_some_and(|b| b & 1 == 1),
        tcp: tcp::Config::default(),
        reassembly: frag::Limits {
            max_memory: 64 << 10,
            ..frag::Limits::default()
        },
    };
    let table = Arc::new(ToeTable::default());
    let mut toes = [
        Toe::engine(cfg, 0, table.clone()),
        Toe::engine(cfg, 1, table.clone()),
    ];
    let mut now = 0u64;
    let mut granted = 0u32;
    let mut rest = data.get(1..).unwrap_or(&[]);
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        now += u64::from(op) * 997;
        let t = Instant(now);
        // The engine this step is for; the other sees broadcast commands
        // and the frames the first passes on.
        let k = usize::from(op >> 6 & 1);
        let (toe, other) = match &mut toes {
            [a, b] if k == 0 => (a, b),
            [a, b] => (b, a),
        };
        let sink = &mut |_: &vnic_protocol::virtio::VirtioNetHdr, f: &[u8]| {
            assert!(f.len() >= 14 && f.len() <= 65535 + 14 + 12);
        };
        match op % 5 {
            0 => {
                // A command: 64 bytes (short ones padded with zeros).
                let mut b = [0u8; CMD_LEN];
                let n = rest.len().min(CMD_LEN);
                b[..n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                if let Ok(c) = Command::parse(&b) {
                    let r = toe.command(&c, t, &mem);
                    if matches!(
                        c,
                        Command::Hello { .. }
                            | Command::IfConfig { .. }
                            | Command::Listen { .. }
                            | Command::Unlisten { .. }
                    ) {
                        other.replicate(&c, t, &mem);
                    }
                    if let Command::Hello { .. } = c {
                        if r.status == vnic_protocol::toe::Status::Ok {
                            granted = r.value;
                        }
                    }
                }
            }
            1 => {
                // A frame: a length byte pair, then that many bytes.
                let Some((len, tail)) = rest.split_first_chunk::<2>() else {
                    break;
                };
                let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
                let (frame, tail) = tail.split_at(len);
                rest = tail;
                let verified = op & 0x80 != 0;
                if !toe.input(frame, verified, t, &mem) {
                    other.input_owned(frame, verified, t, &mem);
                }
                if let Some(w) = toe.take_whole() {
                    other.input_owned(&w, false, t, &mem);
                }
            }
            2 => toe.on_timer(t, &mem, sink),
            3 => toe.transmit(t, &mem, sink),
            _ => while toe.pop_event().is_some() {},
        }
        let held: usize = toes.iter().map(Toe::connections).sum();
        assert!(held as u32 <= granted, "past the table granted");
        assert_eq!(table.connections() as usize, held, "the table miscounts");
        for toe in &toes {
            assert!(
                toe.queued_events() <= 5 * granted as usize,
                "event queue unbounded"
            );
        }
    }
    assert!(
        !mem.outside.get(),
        "the engine reached outside the driver's memory"
    );
});
