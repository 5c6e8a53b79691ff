#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| encryptd::fuzz::hello_datagram(data));
