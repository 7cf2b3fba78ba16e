//! Summary statistics of latency samples: mean and percentiles (linear
//! interpolation between the closest ranks, as numpy's default does).

use serde::{Deserialize, Serialize};

/// Mean, extremes and percentiles of a set of samples (seconds, usually).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `q`-quantile (`q` in [0, 1]) of samples sorted ascending; `None` for
/// no samples.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let (first, last) = (sorted.first()?, sorted.last()?);
    if sorted.len() == 1 || q <= 0.0 {
        return Some(*first);
    }
    if q >= 1.0 {
        return Some(*last);
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let hi = (lo + 1).min(sorted.len() - 1);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

impl Summary {
    /// `None` when there are no samples. Non-finite samples are ignored.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p| quantile(&v, p).expect("not empty");
        Some(Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v[0],
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// Events per second over a wall-clock span; 0 for an empty span.
pub fn rate(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.count, 10);
        assert_eq!(s.mean, 5.5);
        assert_eq!((s.min, s.max), (1.0, 10.0));
        // numpy.percentile(range(1, 11), [50, 90, 99]) = 5.5, 9.1, 9.91
        assert!((s.p50 - 5.5).abs() < 1e-12);
        assert!((s.p90 - 9.1).abs() < 1e-12);
        assert!((s.p99 - 9.91).abs() < 1e-12);
    }

    #[test]
    fn order_of_samples_does_not_matter_and_non_finite_ones_are_ignored() {
        let a = Summary::of(&[3.0, 1.0, f64::NAN, 2.0, f64::INFINITY]).unwrap();
        let b = Summary::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.p50, 2.0);
    }

    #[test]
    fn one_sample_is_every_percentile_and_none_is_no_summary() {
        let s = Summary::of(&[0.25]).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.mean), (0.25, 0.25, 0.25, 0.25));
        assert!(Summary::of(&[]).is_none());
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[1.0, 3.0], 0.0), Some(1.0));
        assert_eq!(quantile(&[1.0, 3.0], 1.0), Some(3.0));
        assert_eq!(quantile(&[1.0, 3.0], 0.25), Some(1.5));
    }

    #[test]
    fn rates_divide_by_the_span() {
        assert_eq!(rate(50.0, 2.0), 25.0);
        assert_eq!(rate(5.0, 0.0), 0.0);
    }
}
