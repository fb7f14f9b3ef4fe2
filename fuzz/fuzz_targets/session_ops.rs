#![no_main]

libfuzzer_sys::fuzz_target!(|ops: Vec<portcullis_broker::fuzzing::Op>| portcullis_broker::fuzzing::session_ops(&ops));
