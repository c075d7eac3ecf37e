use mimalloc::MiMalloc;

// The ingest path allocates per event (parsing, enrichment buffers); mimalloc is markedly
// faster than glibc malloc for that on two cores (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    std::process::exit(ballast::cli::main());
}
