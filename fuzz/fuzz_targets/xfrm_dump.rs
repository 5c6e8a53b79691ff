#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| encryptd::fuzz::xfrm_dump(data));
