//! The `auditbridge` binary. Everything is in the library (`lib.rs`), which the test harness
//! builds again as `auditbridge-under-test`.

fn main() -> std::process::ExitCode {
    auditbridge::main()
}
