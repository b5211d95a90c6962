//! Fuzz target `lora_file`: [`loracast::fuzzing::check_lora_file`] on every input (a panic is a bug; `Err` is
//! a clean refusal). Run with `scripts/fuzz.sh lora_file`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tch::set_num_threads(1);
    let _ = loracast::fuzzing::check_lora_file(data);
});
