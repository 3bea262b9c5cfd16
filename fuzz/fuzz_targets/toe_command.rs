//! Invariant: TOE commands, events and completions from any bytes either
//! are refused with an error or parse, emit, and parse back to the same
//! value, with the emitted form a fixed point; ring spans never reach
//! past their ring.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::toe::{spans, Command, Completion, Event, CMD_LEN, COMPLETION_LEN, EVENT_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Command::parse(data.get(..CMD_LEN).unwrap_or(data)) {
        let b = c.to_bytes();
        assert_eq!(Command::parse(&b), Ok(c));
        assert_eq!(Command::parse(&b).map(|c| c.to_bytes()), Ok(b));
        if let Command::Connect { rx, tx, .. } | Command::Accept { rx, tx, .. } = c {
            for r in [rx, tx] {
                let o = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let [(s0, l0), (s1, l1)] = spans(o, o.rotate_left(7), r.size);
                assert!(s0 + l0 <= r.size as usize && s1 == 0 && l0 + l1 <= r.size as usize);
            }
        }
    }
    if let Ok(e) = Event::parse(data.get(..EVENT_LEN).unwrap_or(data)) {
        let b = e.to_bytes();
        assert_eq!(Event::parse(&b), Ok(e));
        assert_eq!(Event::parse(&b).map(|e| e.to_bytes()), Ok(b));
    }
    if let Ok(c) = Completion::parse(data.get(..COMPLETION_LEN).unwrap_or(data)) {
        assert_eq!(Completion::parse(&c.to_bytes()), Ok(c));
    }
});
