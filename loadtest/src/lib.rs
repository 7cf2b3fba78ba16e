//! attune-loadtest: a load generator for any OpenAI-compatible chat server
//! (closed or open loop, streaming or not, optional attune feedback traffic)
//! and its report: throughput, TTFT, inter-token and end-to-end latency
//! percentiles, errors by status. It depends on nothing else in the
//! workspace, so it measures attune and other servers alike.

pub mod client;
pub mod prompts;
pub mod run;
pub mod stats;

pub use run::{compare, run, LoadConfig, Mode, Report};
pub use stats::Summary;

/// Whether `url`'s host is a loopback address (`localhost`, `127.x.x.x`,
/// `::1`); `None` when the URL has no host.
pub fn is_loopback(url: &str) -> Option<bool> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    if host.is_empty() {
        return None;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Some(true);
    }
    Some(
        host.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
    )
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_hosts_are_recognised_and_others_are_not() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/v1",
            "http://[::1]:9000",
            "127.0.0.2:1",
            "https://user@127.0.0.1/x",
        ] {
            assert_eq!(is_loopback(url), Some(true), "{url}");
        }
        for url in [
            "http://10.0.0.1:8080",
            "https://api.openai.com/v1",
            "http://[2001:db8::1]:80",
        ] {
            assert_eq!(is_loopback(url), Some(false), "{url}");
        }
        assert_eq!(is_loopback("http://"), None);
    }
}
