use mimalloc::MiMalloc;

// The ingest path allocates per event (parsing, enrichment buffers); mimalloc is markedly
// faster than glibc malloc for that on two cores (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    // Test builds read fault-injection points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let scenario = fail::FailScenario::setup();
    let code = ballast::cli::main();
    #[cfg(feature = "failpoints")]
    scenario.teardown();
    std::process::exit(code);
}
