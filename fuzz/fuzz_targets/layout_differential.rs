#![no_main]

libfuzzer_sys::fuzz_target!(|record: portcullis_proto::fuzzing::SampleRecord| portcullis_broker::fuzzing::layout_differential(&record));
