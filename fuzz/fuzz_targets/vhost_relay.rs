//! Invariant: whatever vhost-user message stream a frontend sends, the
//! relay between it and vnicd's backend (a well-behaved model here, which
//! answers what asks for an answer and may refuse a memory region) holds
//! at most one early SET_VRING_ENABLE per vring of the device and at most
//! MAX_REGIONS regions; a region counts only once the backend accepted
//! it, and with nothing owed the relay's regions are exactly the
//! backend's; the frontend never hears more answers to a request than it
//! asked for, and with REPLY_ACK every ADD_MEM_REG that asked is answered
//! once the backend has answered everything; a message over the
//! protocol's largest payload does not parse; nothing panics.

#![no_main]

use std::collections::{BTreeSet, HashMap, VecDeque};

use libfuzzer_sys::fuzz_target;
use vnic_backend::vhost::relay::{
    reply, Msg, Out, RelayCore, ADD_MEM_REG, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION,
    GET_FEATURES, HDR_LEN, MAX_PAYLOAD, MAX_REGIONS, REM_MEM_REG, SET_FEATURES, SET_MEM_TABLE,
    SET_PROTOCOL_FEATURES, SET_VRING_ENABLE,
};
use vnic_fuzz::Input;

const VRINGS: u32 = 5;
const REQUESTS: [u32; 8] = [
    SET_FEATURES,
    SET_PROTOCOL_FEATURES,
    SET_VRING_ENABLE,
    SET_MEM_TABLE,
    ADD_MEM_REG,
    REM_MEM_REG,
    GET_FEATURES,
    24,
];

#[derive(Default)]
struct Model {
    /// Accepted regions, as the backend has them.
    backend: BTreeSet<[u8; 32]>,
    /// GET_FEATURES was answered (with PROTOCOL_FEATURES offered).
    offered: bool,
    /// SET_PROTOCOL_FEATURES acked REPLY_ACK.
    acked_reply_ack: bool,
    /// Answers the backend owes (request, value), oldest first.
    outstanding: VecDeque<(u32, u64)>,
    /// Decides which regions the backend refuses (about one in eight).
    rng: u64,
    /// ADD_MEM_REG that asked for an answer while REPLY_ACK was on.
    asked_with_ack: u64,
    /// Per request: answers the frontend asked for, answers it got.
    asked: HashMap<u32, u64>,
    heard: HashMap<u32, u64>,
    /// The backend refused something: the connection ends.
    over: bool,
}

fn key(m: &Msg) -> Option<[u8; 32]> {
    m.payload.get(8..40)?.try_into().ok()
}

impl Model {
    /// REPLY_ACK in force in the backend (the vhost crate's rule).
    fn reply_ack(&self) -> bool {
        self.offered && self.acked_reply_ack
    }

    fn deliver(&mut self, out: Vec<Out>) {
        for o in out {
            match o {
                Out::ToFrontend(m) => {
                    assert!(
                        m.flags() & FLAG_REPLY != 0,
                        "only answers go to the frontend"
                    );
                    let h = self.heard.entry(m.request()).or_default();
                    *h += 1;
                    assert!(
                        *h <= self.asked.get(&m.request()).copied().unwrap_or(0),
                        "more answers to request {} than asked for",
                        m.request()
                    );
                }
                Out::ToBackend(m) => self.backend_takes(m),
            }
        }
    }

    /// The backend handles a request in order (its effect happens now);
    /// answers wait in `outstanding` until the input lets it send them.
    fn backend_takes(&mut self, m: Msg) {
        let mut value = 0;
        match m.request() {
            GET_FEATURES => {
                // Always answered, with PROTOCOL_FEATURES offered.
                self.offered = true;
                self.outstanding.push_back((GET_FEATURES, 1 << 30));
                return;
            }
            SET_PROTOCOL_FEATURES => match m.ack_value() {
                Some(v) => self.acked_reply_ack = v & (1 << 3) != 0,
                // vhost ends the connection on a short message.
                None => self.over = true,
            },
            SET_MEM_TABLE => self.backend.clear(),
            REM_MEM_REG => {
                if let Some(k) = key(&m) {
                    if !self.backend.remove(&k) {
                        // vhost refuses to remove what it does not have.
                        self.over = true;
                    }
                }
            }
            ADD_MEM_REG => {
                self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                match key(&m) {
                    Some(k) if self.rng >> 61 != 0 => {
                        self.backend.insert(k);
                    }
                    // Refused: answered if asked, and the connection ends.
                    _ => {
                        value = 1;
                        if !(m.needs_reply() && self.reply_ack()) {
                            self.over = true;
                        }
                    }
                }
            }
            _ => {}
        }
        if m.needs_reply() && self.reply_ack() {
            self.outstanding.push_back((m.request(), value));
        }
    }

    /// The backend sends its oldest answer.
    fn answer(&mut self, core: &mut RelayCore) {
        let Some((request, value)) = self.outstanding.pop_front() else {
            return;
        };
        let out = core.from_backend(reply(request, value));
        self.deliver(out);
        if value != 0 {
            self.over = true;
        }
    }

    fn check(&self, core: &RelayCore) {
        assert!(core.held() <= VRINGS as usize);
        let regions: BTreeSet<[u8; 32]> = core.regions().map(|r| r.0).collect();
        assert!(regions.len() <= MAX_REGIONS);
        assert!(
            regions.is_subset(&self.backend),
            "a region counted before the backend took it"
        );
        let owed_adds = self
            .outstanding
            .iter()
            .filter(|m| m.0 == ADD_MEM_REG)
            .count();
        assert!(core.owed() <= owed_adds);
        if core.owed() == 0 && !self.over {
            assert_eq!(regions, self.backend);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut core = RelayCore::new(VRINGS);
    let mut model = Model {
        rng: data.len() as u64,
        ..Model::default()
    };
    while let Some(op) = input.byte() {
        if model.over {
            break;
        }
        match op % 4 {
            // The backend answers.
            0 => model.answer(&mut core),
            // A message from the frontend.
            _ => {
                let Some(sel) = input.byte() else { break };
                let Some(fl) = input.byte() else { break };
                let Some(len) = input.byte() else { break };
                let request = REQUESTS[usize::from(sel) % REQUESTS.len()];
                let mut flags = FLAG_VERSION;
                if fl & 1 != 0 {
                    flags |= FLAG_NEED_REPLY;
                }
                // Region messages mostly name one of a few regions.
                let mut payload = match (request, fl & 2 != 0) {
                    (ADD_MEM_REG | REM_MEM_REG, false) => {
                        let mut p = vec![0u8; 40];
                        p[8] = fl >> 4;
                        p
                    }
                    (SET_VRING_ENABLE, false) => {
                        let mut p = vec![0u8; 8];
                        p[0] = fl >> 3;
                        p
                    }
                    _ => input.take(usize::from(len) * 4).to_vec(),
                };
                if fl & 4 != 0 {
                    payload.extend_from_slice(input.take(8));
                }
                // Through the parser, as the bytes arrive on the socket;
                // now and then with a size over the protocol's largest.
                let m = Msg::new(request, flags, payload);
                let mut bytes = m.hdr.to_vec();
                bytes.extend_from_slice(&m.payload);
                if fl & 8 != 0 && op & 0x40 != 0 {
                    bytes[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
                    assert!(Msg::parse(&bytes).is_err());
                    continue;
                }
                let (m, used) = Msg::parse(&bytes)
                    .expect("a message within the limits parses")
                    .expect("whole");
                assert_eq!(used, HDR_LEN + m.payload.len());

                if m.needs_reply() || m.request() == GET_FEATURES {
                    *model.asked.entry(m.request()).or_default() += 1;
                    if m.request() == ADD_MEM_REG && core.reply_ack() {
                        model.asked_with_ack += 1;
                    }
                }
                match core.from_frontend(m) {
                    Ok(out) => model.deliver(out),
                    // The relay ends the connection (too many regions).
                    Err(_) => break,
                }
            }
        }
        if !model.over {
            model.check(&core);
        }
    }
    // The backend answers everything it owes.
    while !model.over && !model.outstanding.is_empty() {
        model.answer(&mut core);
        if !model.over {
            model.check(&core);
        }
    }
    if !model.over {
        assert_eq!(core.owed(), 0);
        let heard = model.heard.get(&ADD_MEM_REG).copied().unwrap_or(0);
        assert!(
            heard >= model.asked_with_ack,
            "an ADD_MEM_REG that asked under REPLY_ACK went unanswered"
        );
    }
});
