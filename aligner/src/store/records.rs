//! What the store holds and answers: completions served, feedback requests,
//! and the preference records the aligner reads.

use attune_models::ChatMessage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A completion as served, logged so that feedback can name it.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRecord {
    /// The `chatcmpl-…` id the client received.
    pub id: String,
    pub created_ms: i64,
    pub model: String,
    /// The adapter generation that produced it (0: the base model).
    pub generation: u64,
    pub messages: Vec<ChatMessage>,
    /// The prompt as the chat template rendered it.
    pub prompt: String,
    /// The sampling parameters, as JSON.
    pub params: serde_json::Value,
    pub choices: Vec<ChoiceRecord>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceRecord {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: String,
}

/// One choice of one served completion.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChoiceRef {
    pub completion_id: String,
    pub choice: usize,
}

/// What a client says about completions it was served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedbackRequest {
    /// Choices of one completion (made with `n >= 2`), best first; all or a subset.
    Ranking {
        completion_id: String,
        ranking: Vec<usize>,
    },
    /// Two choices, possibly of different completions of the same prompt.
    Pair {
        chosen: ChoiceRef,
        rejected: ChoiceRef,
    },
}

impl FeedbackRequest {
    /// The candidates, best first.
    pub fn candidates(&self) -> Vec<ChoiceRef> {
        match self {
            FeedbackRequest::Ranking {
                completion_id,
                ranking,
            } => ranking
                .iter()
                .map(|&choice| ChoiceRef {
                    completion_id: completion_id.clone(),
                    choice,
                })
                .collect(),
            FeedbackRequest::Pair { chosen, rejected } => vec![chosen.clone(), rejected.clone()],
        }
    }

    pub fn kind(&self) -> FeedbackKind {
        match self {
            FeedbackRequest::Ranking { .. } => FeedbackKind::Ranking,
            FeedbackRequest::Pair { .. } => FeedbackKind::Pair,
        }
    }

    pub(crate) fn hash(&self) -> Vec<u8> {
        Sha256::digest(serde_json::to_vec(self).expect("serializes")).to_vec()
    }
}

/// A feedback request with its optional idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFeedback {
    pub request: FeedbackRequest,
    /// A repeat with the same key is acknowledged again but stored once.
    pub idempotency_key: Option<String>,
}

/// The answer to stored feedback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackReceipt {
    pub id: i64,
    pub created_ms: i64,
    pub candidates: usize,
    /// True when the idempotency key was seen before: nothing new was stored.
    pub replayed: bool,
    /// The adapter generations that served the candidates (distinct,
    /// ascending; empty for a replay).
    pub generations: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackKind {
    Ranking,
    Pair,
    Import,
}

impl FeedbackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackKind::Ranking => "ranking",
            FeedbackKind::Pair => "pair",
            FeedbackKind::Import => "import",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "ranking" => Some(FeedbackKind::Ranking),
            "pair" => Some(FeedbackKind::Pair),
            "import" => Some(FeedbackKind::Import),
            _ => None,
        }
    }
}

/// A stored preference record: one prompt, two or more responses ranked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferenceRecord {
    pub id: i64,
    pub kind: FeedbackKind,
    pub created_ms: i64,
    pub messages: Vec<ChatMessage>,
    /// Best first.
    pub candidates: Vec<Candidate>,
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub text: String,
    /// Where it was served; `None` for imported records.
    pub served: Option<ChoiceRef>,
    pub generation: Option<u64>,
}

/// Which side of the stable train/held-out split a record falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

impl PreferenceRecord {
    /// Every (better, worse) pair the ranking implies, best pairs first.
    pub fn pairs(&self) -> impl Iterator<Item = (&Candidate, &Candidate)> + '_ {
        let c = &self.candidates;
        (0..c.len()).flat_map(move |i| (i + 1..c.len()).map(move |j| (&c[i], &c[j])))
    }

    /// A stable split by the record id: the same record always lands on the
    /// same side, and all pairs of one ranking land together.
    pub fn split(&self, held_out_fraction: f64) -> Split {
        split_of(self.id, held_out_fraction)
    }
}

/// The split of record `id` (see [`PreferenceRecord::split`]).
pub fn split_of(id: i64, held_out_fraction: f64) -> Split {
    let h = Sha256::digest(id.to_le_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    if x < held_out_fraction {
        Split::HeldOut
    } else {
        Split::Train
    }
}

/// A record to import: a prompt and responses, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRecord {
    pub messages: Vec<ChatMessage>,
    pub responses: Vec<String>,
}

impl ImportRecord {
    /// Identifies the content, so importing the same data twice stores it once.
    pub(crate) fn content_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&(&self.messages, &self.responses)).expect("serializes"));
        format!("import:{:x}", h.finalize())
    }
}

/// What happened to one imported record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    Stored(i64),
    /// The same content was stored before, as this record.
    AlreadyStored(i64),
}

/// Counts for `GET /v1/feedback/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreStats {
    pub completions: u64,
    pub records: u64,
    /// Preference pairs the records imply (k candidates give k(k-1)/2).
    pub pairs: u64,
    pub by_kind: Vec<KindCount>,
    /// A record counts once under each generation that served one of its
    /// candidates; imported records count under `None`.
    pub by_generation: Vec<GenerationCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindCount {
    pub kind: FeedbackKind,
    pub records: u64,
    pub pairs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationCount {
    pub generation: Option<u64>,
    pub records: u64,
}

pub(crate) fn tokens_to_blob(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

pub(crate) fn blob_to_tokens(blob: &[u8]) -> Vec<u32> {
    blob.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_of_three_implies_three_pairs_best_first() {
        let cand = |t: &str| Candidate {
            text: t.into(),
            served: None,
            generation: None,
        };
        let r = PreferenceRecord {
            id: 1,
            kind: FeedbackKind::Import,
            created_ms: 0,
            messages: vec![],
            candidates: vec![cand("a"), cand("b"), cand("c")],
            source: None,
        };
        let pairs: Vec<_> = r
            .pairs()
            .map(|(x, y)| (x.text.as_str(), y.text.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "b"), ("a", "c"), ("b", "c")]);
    }

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let held = (0..10_000)
            .filter(|&i| split_of(i, 0.1) == Split::HeldOut)
            .count();
        assert!((800..1200).contains(&held), "{held}");
        assert_eq!(split_of(42, 0.1), split_of(42, 0.1));
        assert!((0..100).all(|i| split_of(i, 0.0) == Split::Train));
        assert!((0..100).all(|i| split_of(i, 1.0) == Split::HeldOut));
    }

    #[test]
    fn token_blobs_round_trip() {
        let t = vec![0, 1, 49151, u32::MAX];
        assert_eq!(blob_to_tokens(&tokens_to_blob(&t)), t);
    }
}
