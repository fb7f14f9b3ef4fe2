#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_policy::fuzzing::policy_text(data));
