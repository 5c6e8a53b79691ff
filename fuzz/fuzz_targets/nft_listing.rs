#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| encryptd::fuzz::nft_listing(data));
