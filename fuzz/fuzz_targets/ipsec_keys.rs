#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| encryptd::fuzz::ipsec_keys(data));
