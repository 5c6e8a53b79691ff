fn main() {
    std::process::exit(encryptd::cli::main(std::env::args_os().skip(1).collect()));
}
