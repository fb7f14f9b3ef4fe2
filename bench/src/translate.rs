//! Translation of `sample_record` from each client ABI into the broker's layout, against a plain
//! copy of the same bytes (both produce a new buffer, as a call does).

use std::{hint::black_box, time::Instant};

use portcullis_proto::layout::{ABIS, AbiId, Schema};

const LAYOUTS: &str = include_str!("../../broker/src/drivers/sample/layout.toml");

pub(crate) fn run(quick: bool) {
    let schema = Schema::from_toml(LAYOUTS).unwrap();
    let record = schema.index("sample_record").unwrap();
    let native = AbiId::native().abi();
    let iters: u32 = if quick { 200_000 } else { 2_000_000 };
    println!("### `sample_record` translation, client ABI → native, per struct\n");
    println!("{iters} translations per ABI, best of 5 runs; copy = `to_vec()` of the same client bytes\n");
    println!("| client ABI | size | translate ns | copy ns | ratio |");
    println!("|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for abi in &ABIS {
        let plan = schema.plan(record, abi, native);
        let input = vec![0u8; plan.src_size()];
        let time = |f: &dyn Fn() -> usize| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    let mut sink = 0usize;
                    for _ in 0..iters {
                        sink = sink.wrapping_add(f());
                    }
                    black_box(sink);
                    start.elapsed().as_secs_f64() * 1e9 / f64::from(iters)
                })
                .fold(f64::MAX, f64::min)
        };
        let translate = time(&|| black_box(plan.translate(black_box(&input)).unwrap()).len());
        let copy = time(&|| black_box(black_box(&input).to_vec()).len());
        worst = worst.max(translate);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1}× |",
            abi.name,
            plan.src_size(),
            translate,
            copy,
            translate / copy
        );
    }
    println!("\nslowest ABI: {worst:.1} ns per struct (target ≤ 100 ns)\n");
}
