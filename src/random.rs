//! The kernel's random generator (getrandom(2)), the one source of nonces, SPIs, keys
//! and temporary file names.

/// Fill `buf`. Blocks only until the kernel's pool is initialised, early at boot.
pub fn fill(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most buf.len() - filled bytes into the buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        // n < 0 is EINTR (or EAGAIN): try again.
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill(&mut b);
    b
}
