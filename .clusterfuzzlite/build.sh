#!/bin/bash -eu
# Builds every cargo-fuzz target of fuzz/ and copies each, with its seed corpus (zipped) and
# dictionary, to $OUT, where ClusterFuzzLite and OSS-Fuzz look for them.
cd "$SRC/portcullis"
cargo fuzz build -O --fuzz-dir fuzz
release=fuzz/target/x86_64-unknown-linux-gnu/release
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  cp "$release/$target" "$OUT/"
  if [ -d "fuzz/corpus/$target" ] && [ -n "$(ls -A "fuzz/corpus/$target")" ]; then
    (cd "fuzz/corpus/$target" && zip -q -r "$OUT/${target}_seed_corpus.zip" .)
  fi
  if [ -f "fuzz/dict/$target.dict" ]; then
    cp "fuzz/dict/$target.dict" "$OUT/$target.dict"
  fi
done
