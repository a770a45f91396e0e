//! Fuzz the kiln-proto decoders: arbitrary bytes through the blocking reader, the incremental
//! decoder (fed in uneven pieces) and the payload decoder. None may panic, allocate past the
//! frame limit, or decode something that does not re-encode to an equal message.
#![no_main]

use kiln_proto::{decode_payload, encode_frame, read_frame, FrameDecoder, Message, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fn check_round_trip(m: &Message) {
    if let Ok(frame) = encode_frame(m) {
        let back = decode_payload(&frame[4..]).expect("re-encoded message decodes");
        assert_eq!(&back, m);
    }
    let _ = m.validate();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_payload(data) {
        check_round_trip(&m);
    }

    let mut r = data;
    for _ in 0..64 {
        match read_frame(&mut r) {
            Ok(m) => check_round_trip(&m),
            Err(e) if e.is_fatal() => break,
            Err(_) => {}
        }
    }

    let mut d = FrameDecoder::new();
    let step = 1 + data.first().copied().unwrap_or(0) as usize % 13;
    for chunk in data.chunks(step) {
        d.feed(chunk);
        loop {
            match d.next_message() {
                Ok(Some(m)) => check_round_trip(&m),
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
        assert!(d.buffered() <= MAX_FRAME + 4 + step);
    }
    let _ = d.finish();
});
