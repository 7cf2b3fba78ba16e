//! attune-loadtest: a load generator for OpenAI-compatible servers (to be built;
//! see the loadtest issue). It prints its intended interface for now.

fn main() {
    eprintln!(
        "attune-loadtest is not built yet: see the loadtest issue. \
         Planned: attune-loadtest --url URL --model NAME [--concurrency C | --rate R] ..."
    );
    std::process::exit(2);
}
