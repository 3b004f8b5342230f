//! The `auditbridge` binary, built again inside the test package so that cargo builds it before
//! the end-to-end tests and tells them where it is (`CARGO_BIN_EXE_auditbridge-under-test`).
fn main() -> std::process::ExitCode {
    auditbridge::main()
}
