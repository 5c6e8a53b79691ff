#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| encryptd::fuzz::nodes_toml(data));
