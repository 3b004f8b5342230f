fn main() -> std::process::ExitCode {
    auditbridge::main()
}
