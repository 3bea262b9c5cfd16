//! Invariant: a control command that parses emits to bytes that parse to
//! the same command (parse -> emit -> parse is the identity), and the
//! emitted form is a fixed point (emit(parse(emit(c))) == emit(c)).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnic_protocol::virtio::ctrl::CtrlCommand;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = CtrlCommand::parse_message(data) else {
        return;
    };
    let bytes = cmd.to_bytes().expect("a parsed command can be emitted");
    let again = CtrlCommand::parse_message(&bytes).expect("emitted command parses");
    assert_eq!(again, cmd);
    assert_eq!(again.to_bytes().expect("emits"), bytes);
    assert_eq!(&bytes[..2], &data[..2], "class and command survive");
});
