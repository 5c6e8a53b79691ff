#!/bin/bash
# tests/run.sh — the project's one test command:   bash tests/run.sh
#
# As root on a fresh Debian 12 it first installs what the tests need (apt, with
# --no-install-recommends) and prepares the kernel VM (tests/vm/setup.sh, cached under
# ~/.cache/encryptd-kernel-vm), then runs, stopping at the first failure:
#   cargo fmt --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test            (unit and integration tests on the host, then the kernel tests
#                          in one VM boot: tests/kernel, via tests/vm/vmrun.sh)
# Arguments go to `cargo test` (e.g. `bash tests/run.sh -- nft` to filter).
# Cargo itself must already be installed (rustup); rustfmt/clippy are added if missing.
# With CI set, cargo runs with --locked. Exit status: 0 when everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export PATH="$HOME/.cargo/bin:$PATH"
T0=$SECONDS
declare -a TIMES=()
step() {   # step NAME CMD...: run, time, and stop the script on failure
    local name=$1 t=$SECONDS; shift
    echo "==> $name: $*"
    if "$@"; then
        TIMES+=("$(printf '%-14s %4d s' "$name" $((SECONDS - t)))")
    else
        local rc=$?
        echo "==> FAILED: $name (exit $rc, after $((SECONDS - t)) s): $*" >&2
        exit "$rc"
    fi
}

if ! command -v cargo >/dev/null; then
    echo "tests/run.sh: cargo not found on PATH (nor in ~/.cargo/bin)." >&2
    echo "  Install Rust with rustup (https://rustup.rs), then run: bash tests/run.sh" >&2
    exit 1
fi

# Packages beyond the VM's own (tests/vm/setup.sh installs those): systemd-analyze for
# tests/unit_file.rs, a C linker for rustc when the machine has none, CA certificates
# for crates.io.
extra="systemd ca-certificates"
command -v cc >/dev/null || extra="$extra gcc libc6-dev"
step setup env VM_EXTRA_PKGS="$extra" tests/vm/setup.sh
for c in rustfmt clippy; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || { echo "tests/run.sh: cargo $c is missing and there is no rustup to add it" >&2; exit 1; }
        step "add $c" rustup component add "$c"
    fi
done

locked=()
[ -n "${CI:-}" ] && locked=(--locked)
step fmt cargo fmt --check
step clippy cargo clippy "${locked[@]}" --all-targets -- -D warnings
echo "==> test: cargo test ${locked[*]} $*"
T1=$SECONDS
# The output is kept so that the kernel cases' times, which the harness prints in the
# middle of cargo's output, can be shown again at the end, slowest first.
LOG=$(mktemp "${TMPDIR:-/tmp}/encryptd-test.XXXXXX")
trap 'rm -f "$LOG"' EXIT
kernel_times() {
    awk '/^kernel case times, slowest first/{on=1} on&&/^$/{on=0} on' "$LOG"
}
tested() { cargo test "${locked[@]}" "$@" 2>&1 | tee "$LOG"; }
if ! (set -o pipefail; tested "$@"); then
    echo "==> FAILED: test (cargo test exited non-zero)" >&2
    kernel_times
    exit 1
fi
TIMES+=("$(printf '%-14s %4d s' test $((SECONDS - T1)))")

echo "==> all passed in $((SECONDS - T0)) s:"
printf '    %s\n' "${TIMES[@]}"
kernel_times
