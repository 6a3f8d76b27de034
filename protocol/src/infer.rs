//! Inference requests and their results.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Texts one request may carry.
pub const MAX_INFER_INPUTS: usize = 64;
/// Bytes of text one request may carry in all; the answer must fit in one frame too.
pub const MAX_INFER_INPUT_BYTES: usize = 256 * 1024;

/// What to do with the texts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One pooled sentence vector per text.
    Embed,
    /// Labels of the whole text, with scores.
    Classify,
    /// Labelled spans of the text (entities, roles), BIO tags merged.
    TokenClassify,
    /// The sentences of the text that best represent it, in their original order.
    Summarize,
    /// The text in another language.
    Translate,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::Embed,
        Task::Classify,
        Task::TokenClassify,
        Task::Summarize,
        Task::Translate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Classify => "classify",
            Task::TokenClassify => "token-classify",
            Task::Summarize => "summarize",
            Task::Translate => "translate",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown task `{0}`; tasks are embed, classify, token-classify, summarize and translate")]
pub struct UnknownTask(String);

impl FromStr for Task {
    type Err = UnknownTask;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTask(s.to_owned()))
    }
}

/// Run `task` with model bundle `model` on each of `inputs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    pub id: u64,
    pub model: String,
    pub task: Task,
    pub inputs: Vec<String>,
    #[serde(default)]
    pub options: InferOptions,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferOptions {
    /// `summarize`: sentences to keep (default: a third of the text's, at least one, at most 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentences: Option<u32>,
    /// `classify`: labels to return, best first (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
}

/// The answer to an [`InferRequest`]: one result per input, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferReply {
    pub id: u64,
    pub model: String,
    pub task: Task,
    pub results: Vec<InferResult>,
    pub timings: InferTimings,
}

/// Where the time of a request went, in microseconds, measured in the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferTimings {
    /// Loading the model; zero when the agent had it loaded already.
    pub load_us: u64,
    pub tokenize_us: u64,
    pub run_us: u64,
    /// Turning the model's outputs into results.
    pub decode_us: u64,
    /// Tokens fed to the model, all inputs together.
    pub tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InferResult {
    Embedding { vector: Vec<f32> },
    Labels { labels: Vec<LabelScore> },
    Entities { entities: Vec<Entity> },
    Summary { text: String, sentences: Vec<u32> },
    Translation { text: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// A labelled span: `text` is `input[start..end]`, offsets in bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    pub label: String,
    pub text: String,
    pub start: u32,
    pub end: u32,
    /// Mean probability of the span's tokens.
    pub score: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_parse_from_their_names_only() {
        for task in Task::ALL {
            assert_eq!(task.as_str().parse::<Task>().unwrap(), task);
            let json = serde_json::to_string(&task).unwrap();
            assert_eq!(json, format!("\"{task}\""));
        }
        let err = "sentiment".parse::<Task>().unwrap_err().to_string();
        assert!(err.contains("unknown task `sentiment`"), "{err}");
    }

    #[test]
    fn results_are_tagged_by_kind() {
        let r = InferResult::Labels {
            labels: vec![LabelScore {
                label: "positive".into(),
                score: 0.5,
            }],
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"kind":"labels","labels":[{"label":"positive","score":0.5}]}"#
        );
    }
}
