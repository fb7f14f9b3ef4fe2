#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portcullis_broker::fuzzing::helper_request(data);
});
