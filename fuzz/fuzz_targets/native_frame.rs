#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portcullis_proto::fuzzing::native_frame(data);
});
