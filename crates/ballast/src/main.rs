use mimalloc::MiMalloc;

// The ingest path allocates per event (parsing, enrichment buffers); mimalloc is markedly
// faster than glibc malloc for that on two cores (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

// mimalloc returns freed memory to the OS after a short delay, but only when some thread
// calls into it again: once a delivery backlog has drained, idle runtime threads kept
// hundreds of MB of freed queues (236 MB after a 2-million-event backlog of one user,
// 57 MB with the delay at 0; docs/BENCHMARKS.md). A helper thread asks every few seconds
// (cheap when there is nothing to return).
extern "C" {
    fn mi_collect(force: bool);
}

fn spawn_memory_returner() {
    let started = std::thread::Builder::new()
        .name("ballast-mem".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: mi_collect takes no pointers; it is mimalloc's own, thread-safe
            // call (the allocator above is mimalloc, statically linked).
            unsafe { mi_collect(false) };
        });
    if let Err(e) = started {
        eprintln!("ballast: no memory-returning thread: {e}");
    }
}

fn main() {
    spawn_memory_returner();
    // Test builds read fault-injection points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let scenario = fail::FailScenario::setup();
    let code = ballast::cli::main();
    #[cfg(feature = "failpoints")]
    scenario.teardown();
    std::process::exit(code);
}
