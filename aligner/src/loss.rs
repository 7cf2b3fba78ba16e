//! The training objectives: CLHA exactly as `design/clha.md` states it
//! (reward-filtered ranking loss with an adaptive margin, plus the adaptive
//! SFT term), and DPO for comparison. Both take per-candidate log-prob sums
//! as differentiable tensors over all candidates of a batch, laid out example
//! after example, best candidate first.

use candle_core::{Result, Tensor};

/// CLHA's constants (defaults: the reference values for HH-RLHF).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClhaParams {
    /// τ: pairs whose rewards differ by no more than this are dropped.
    pub tau: f64,
    /// μ: the margin per unit of rank distance.
    pub mu: f64,
    /// w: the SFT weight.
    pub sft_weight: f64,
}

impl Default for ClhaParams {
    fn default() -> Self {
        Self {
            tau: 3.0,
            mu: 3.0,
            sft_weight: 0.05,
        }
    }
}

/// Where one example's candidates sit among the batch's candidates, and their
/// rewards (best first, in the order the loss sees).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub start: usize,
    pub rewards: Vec<f64>,
}

impl Group {
    pub fn len(&self) -> usize {
        self.rewards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rewards.is_empty()
    }
}

/// A loss and its parts as numbers, for logging.
#[derive(Debug, Clone)]
pub struct Loss {
    pub total: Tensor,
    pub ranking: f64,
    pub sft: f64,
    /// Pairs that passed the reward filter, over all offsets.
    pub pairs: usize,
}

/// The per-candidate tensors a loss reads.
#[derive(Debug, Clone)]
pub struct Scores {
    /// `S_k`: sums of response-token log-probs, `(candidates,)`.
    pub sums: Tensor,
    /// `|T_k|`: response tokens of each candidate.
    pub lens: Vec<usize>,
}

impl Scores {
    /// `s_k = S_k / |T_k|`.
    pub fn means(&self) -> Result<Tensor> {
        let inv: Vec<f32> = self.lens.iter().map(|&n| 1.0 / n.max(1) as f32).collect();
        let inv = Tensor::from_vec(inv, self.lens.len(), self.sums.device())?;
        self.sums.mul(&inv)
    }
}

fn index(ids: &[u32], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(ids.to_vec(), ids.len(), like.device())
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// `L = L_rank + L_sft` (see `design/clha.md`):
/// `L_rank = Σ_d mean_{(k,k+d): |r_k − r_{k+d}| > τ} max(0, μ·d − (s_k − s_{k+d}))`,
/// pairs pooled over the whole batch per offset `d`;
/// `L_sft = w · mean_examples((n − 1)² · −S_0 · [r_0 > 0])`.
pub fn clha_loss(scores: &Scores, groups: &[Group], p: &ClhaParams) -> Result<Loss> {
    let sums = &scores.sums;
    let means = scores.means()?;
    let device = sums.device();
    let max_n = groups.iter().map(Group::len).max().unwrap_or(0);
    let mut ranking = Tensor::zeros((), sums.dtype(), device)?;
    let mut pairs = 0;
    for d in 1..max_n {
        let (mut better, mut worse) = (Vec::new(), Vec::new());
        for g in groups {
            for k in 0..g.len().saturating_sub(d) {
                if (g.rewards[k] - g.rewards[k + d]).abs() > p.tau {
                    better.push((g.start + k) as u32);
                    worse.push((g.start + k + d) as u32);
                }
            }
        }
        if better.is_empty() {
            continue; // no qualifying pair at this offset: it contributes 0
        }
        pairs += better.len();
        let gap = (means.index_select(&index(&better, sums)?, 0)?
            - means.index_select(&index(&worse, sums)?, 0)?)?;
        let hinge = gap.neg()?.affine(1.0, p.mu * d as f64)?.relu()?.mean(0)?;
        ranking = (ranking + hinge)?;
    }
    // SFT on each example's best candidate, weighted (n − 1)² and masked by r_0 > 0.
    let firsts: Vec<u32> = groups.iter().map(|g| g.start as u32).collect();
    let weights: Vec<f32> = groups
        .iter()
        .map(|g| {
            let n1 = g.len().saturating_sub(1) as f32;
            if g.rewards.first().is_some_and(|&r| r > 0.0) {
                n1 * n1
            } else {
                0.0
            }
        })
        .collect();
    let sft = if groups.is_empty() {
        Tensor::zeros((), sums.dtype(), device)?
    } else {
        let s0 = sums.index_select(&index(&firsts, sums)?, 0)?;
        let w = Tensor::from_vec(weights, groups.len(), device)?;
        (s0.mul(&w)?.mean(0)? * -p.sft_weight)?
    };
    Ok(Loss {
        ranking: scalar(&ranking)?,
        sft: scalar(&sft)?,
        total: (ranking + sft)?,
        pairs,
    })
}

/// Rewards that make the human order count in full when rescoring is off:
/// every pair differs by more than τ and the best candidate's reward is
/// positive, `r_k = (n − 1 − k)·(τ + 1)`.
pub fn rank_rewards(n: usize, tau: f64) -> Vec<f64> {
    (0..n).map(|k| (n - 1 - k) as f64 * (tau + 1.0)).collect()
}

/// Re-orders candidates by reward, best first (stable for ties); answers the
/// permutation (new position → old index).
pub fn order_by_reward(rewards: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rewards.len()).collect();
    order.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]));
    order
}

/// `−log σ(z) = softplus(−z) = max(−z, 0) + log(1 + e^{−|z|})`, stable for any `z`.
pub fn neg_log_sigmoid(z: &Tensor) -> Result<Tensor> {
    z.neg()?.relu()? + z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// The (better, worse) pairs a ranking implies, as candidate indices.
fn ranked_pairs(groups: &[Group]) -> (Vec<u32>, Vec<u32>) {
    let (mut better, mut worse) = (Vec::new(), Vec::new());
    for g in groups {
        for i in 0..g.len() {
            for j in i + 1..g.len() {
                better.push((g.start + i) as u32);
                worse.push((g.start + j) as u32);
            }
        }
    }
    (better, worse)
}

/// Bradley–Terry loss of a reward model: mean over every (better, worse)
/// pair of `−log σ(r_better − r_worse)`.
pub fn bradley_terry_loss(rewards: &Tensor, groups: &[Group]) -> Result<Loss> {
    let (better, worse) = ranked_pairs(groups);
    if better.is_empty() {
        candle_core::bail!("bradley-terry: no pairs in the batch");
    }
    pairwise_logistic(rewards, &better, &worse, 1.0)
}

/// Mean of `−log σ(scale·(x_better − x_worse))` over the given pairs.
fn pairwise_logistic(x: &Tensor, better: &[u32], worse: &[u32], scale: f64) -> Result<Loss> {
    let z = ((x.index_select(&index(better, x)?, 0)? - x.index_select(&index(worse, x)?, 0)?)?
        * scale)?;
    let total = neg_log_sigmoid(&z)?.mean(0)?;
    Ok(Loss {
        ranking: scalar(&total)?,
        sft: 0.0,
        total,
        pairs: better.len(),
    })
}

/// DPO: mean over every (better, worse) pair of each group of
/// `−log σ(β·((π_b − ref_b) − (π_w − ref_w)))`, with `π`, `ref` the
/// candidates' log-prob sums under the policy and the reference (the model
/// without the adapter).
pub fn dpo_loss(policy: &Tensor, reference: &Tensor, groups: &[Group], beta: f64) -> Result<Loss> {
    let (better, worse) = ranked_pairs(groups);
    if better.is_empty() {
        candle_core::bail!("dpo: no pairs in the batch");
    }
    let ratio = (policy - reference.detach())?;
    pairwise_logistic(&ratio, &better, &worse, beta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// clha.md's worked example: s = [−1.2, −1.0], S = [−24, −30].
    fn worked(rewards: [f64; 2]) -> Loss {
        let sums = Tensor::new(&[-24f32, -30.0], &Device::Cpu).unwrap();
        // |T| chosen so that S/|T| = s: 24/1.2 = 20, 30/1.0 = 30.
        let scores = Scores {
            sums,
            lens: vec![20, 30],
        };
        let groups = [Group {
            start: 0,
            rewards: rewards.to_vec(),
        }];
        clha_loss(&scores, &groups, &ClhaParams::default()).unwrap()
    }

    #[test]
    fn clha_worked_example_from_the_design() {
        let l = worked([4.0, 0.5]);
        assert!(
            (l.ranking - 3.2).abs() < 1e-6 && (l.sft - 1.2).abs() < 1e-6,
            "{l:?}"
        );
        assert!((scalar(&l.total).unwrap() - 4.4).abs() < 1e-5);
        let l = worked([1.0, 0.5]);
        assert_eq!(l.pairs, 0);
        assert!((scalar(&l.total).unwrap() - 1.2).abs() < 1e-5);
        let l = worked([-0.5, -3.9]);
        assert!((scalar(&l.total).unwrap() - 3.2).abs() < 1e-5);
    }

    #[test]
    fn clha_pools_pairs_per_offset_over_the_batch_and_weights_sft_by_n() {
        // Two examples: n = 3 and n = 2. Means are the sums (lens 1).
        let sums = Var::new(&[-1.0f32, -2.0, -9.0, -1.5, -1.0], &Device::Cpu).unwrap();
        let scores = Scores {
            sums: sums.as_tensor().clone(),
            lens: vec![1; 5],
        };
        let groups = [
            Group {
                start: 0,
                rewards: vec![10.0, 5.0, 0.0],
            },
            Group {
                start: 3,
                rewards: vec![4.0, 0.0],
            },
        ];
        let l = clha_loss(&scores, &groups, &ClhaParams::default()).unwrap();
        // d = 1: (0,1): 3 − 1 = 2; (1,2): 3 − 7 → 0; (3,4): 3 − (−0.5) = 3.5 → mean 5.5/3.
        // d = 2: (0,2): 6 − 8 → 0 → mean 0.
        assert!((l.ranking - 5.5 / 3.0).abs() < 1e-5, "{l:?}");
        assert_eq!(l.pairs, 4);
        // SFT: 0.05 · mean(4 · 1.0, 1 · 1.5) = 0.05 · 2.75.
        assert!((l.sft - 0.05 * 2.75).abs() < 1e-6, "{l:?}");
        // Gradient flows to the scores.
        let g = l.total.backward().unwrap();
        assert!(g.get(sums.as_tensor()).is_some());
    }

    #[test]
    fn rank_rewards_make_every_pair_count() {
        let r = rank_rewards(4, 3.0);
        assert_eq!(r, [12.0, 8.0, 4.0, 0.0]);
        assert_eq!(order_by_reward(&[0.5, 3.0, -1.0, 3.0]), [1, 3, 0, 2]);
    }

    #[test]
    fn bradley_terry_matches_a_hand_computed_case() {
        // r = (1.5, 0.5): −log σ(1) = log(1 + e^{−1}).
        let r = Tensor::new(&[1.5f32, 0.5], &Device::Cpu).unwrap();
        let groups = [Group {
            start: 0,
            rewards: vec![1.0, 0.0],
        }];
        let l = bradley_terry_loss(&r, &groups).unwrap();
        assert!((l.ranking - (1.0 + (-1.0f64).exp()).ln()).abs() < 1e-6);
    }

    #[test]
    fn dpo_matches_a_hand_computed_case() {
        // Pair: policy sums (−10, −12), reference (−11, −11), β = 0.1:
        // z = 0.1·((−10 + 11) − (−12 + 11)) = 0.2; −log σ(0.2) = log(1 + e^{−0.2}).
        let policy = Tensor::new(&[-10f32, -12.0], &Device::Cpu).unwrap();
        let reference = Tensor::new(&[-11f32, -11.0], &Device::Cpu).unwrap();
        let groups = [Group {
            start: 0,
            rewards: vec![1.0, 0.0],
        }];
        let l = dpo_loss(&policy, &reference, &groups, 0.1).unwrap();
        let want = (1.0 + (-0.2f64).exp()).ln();
        assert!((l.ranking - want).abs() < 1e-6, "{} vs {want}", l.ranking);
        // Large margins stay finite.
        let policy = Tensor::new(&[0f32, -1e4], &Device::Cpu).unwrap();
        let l = dpo_loss(&policy, &reference, &groups, 1.0).unwrap();
        assert!(l.ranking.is_finite() && l.ranking < 1e-6);
    }
}
