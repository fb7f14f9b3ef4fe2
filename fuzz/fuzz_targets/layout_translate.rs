#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_broker::fuzzing::layout_translate(data));
