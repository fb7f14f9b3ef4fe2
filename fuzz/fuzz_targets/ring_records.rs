#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drop(portcullis_broker::fuzzing::ring_records(data)));
