//! The admission rule, apart from the engine so it can be tested without a
//! model: first come, first served, while sequence and KV budgets allow.

/// What is in use and what is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_running: usize,
    pub max_kv_tokens: usize,
    pub running: usize,
    pub kv_reserved: usize,
}

/// How many of the waiting requests (in order; each `(sequences, kv_tokens)`)
/// to admit now. Stops at the first that does not fit, so a large request is
/// not starved by smaller ones behind it.
pub fn admit_count(waiting: &[(usize, usize)], budget: Budget) -> usize {
    let (mut running, mut kv) = (budget.running, budget.kv_reserved);
    let mut n = 0;
    for &(seqs, tokens) in waiting {
        if running + seqs > budget.max_running || kv + tokens > budget.max_kv_tokens {
            break;
        }
        running += seqs;
        kv += tokens;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(running: usize, kv: usize) -> Budget {
        Budget {
            max_running: 4,
            max_kv_tokens: 1000,
            running,
            kv_reserved: kv,
        }
    }

    #[test]
    fn admits_in_order_until_a_budget_is_reached() {
        assert_eq!(
            admit_count(&[(1, 100), (2, 100), (1, 100), (1, 100)], budget(0, 0)),
            3
        );
        assert_eq!(admit_count(&[(1, 600), (1, 600)], budget(0, 0)), 1);
        assert_eq!(admit_count(&[(1, 10)], budget(4, 0)), 0);
    }

    #[test]
    fn a_large_request_at_the_head_is_not_overtaken() {
        assert_eq!(admit_count(&[(1, 900), (1, 10)], budget(0, 200)), 0);
    }
}
