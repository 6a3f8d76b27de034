//! Model outputs to results: scores, BIO spans, sentence ranking. Pure functions over numbers, so
//! that each is tested without a model.

use agentos_protocol::{Entity, LabelScore};

pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    if sum > 0.0 && sum.is_finite() {
        for s in scores.iter_mut() {
            *s /= sum;
        }
    }
}

/// Labels with their scores, best first, at most `top_k`.
pub fn ranked_labels(scores: &[f32], labels: &[String], top_k: Option<u32>) -> Vec<LabelScore> {
    let mut ranked: Vec<LabelScore> = labels
        .iter()
        .zip(scores)
        .map(|(label, &score)| LabelScore {
            label: label.clone(),
            score,
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    if let Some(k) = top_k {
        ranked.truncate(k as usize);
    }
    ranked
}

/// Masked mean of token vectors `[seq, dim]`, L2-normalised.
pub fn mean_pool(tokens: &[f32], mask: &[i64], dim: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; dim];
    let mut count = 0.0f32;
    for (row, &m) in tokens.chunks_exact(dim).zip(mask) {
        if m != 0 {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
            count += 1.0;
        }
    }
    for s in &mut sum {
        *s /= count.max(1.0);
    }
    normalise(&mut sum);
    sum
}

pub fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in v {
        *x /= norm;
    }
}

/// One token of a labelled sequence: its byte span in the text (empty for special tokens) and its
/// probabilities over the labels.
pub struct TokenScores<'a> {
    pub start: usize,
    pub end: usize,
    pub probs: &'a [f32],
}

/// Merges per-token BIO labels into entities. A token takes the entity type with the highest
/// probability (`B-T` and `I-T` summed) when that beats `O`; consecutive tokens of one type join
/// when they touch (pieces of one word) or when only spaces part them and the later one is not a
/// `B-`. Labels without a `B-`/`I-` prefix are types of their own.
pub fn merge_entities(text: &str, tokens: &[TokenScores<'_>], labels: &[String]) -> Vec<Entity> {
    let types = entity_types(labels);
    let mut entities = Vec::new();
    let mut current: Option<(usize, usize, usize, Vec<f32>)> = None; // type, start, end, scores
    let flush = |current: &mut Option<(usize, usize, usize, Vec<f32>)>, out: &mut Vec<Entity>| {
        if let Some((t, start, end, scores)) = current.take()
            && let Some(span) = text.get(start..end)
        {
            out.push(Entity {
                label: types.names[t].clone(),
                text: span.to_owned(),
                start: start as u32,
                end: end as u32,
                score: scores.iter().sum::<f32>() / scores.len().max(1) as f32,
            });
        }
    };
    for token in tokens {
        if token.end <= token.start {
            continue;
        }
        let mut best: Option<(usize, f32)> = None;
        let mut outside = 0.0f32;
        let mut per_type = vec![0.0f32; types.names.len()];
        let mut begins = vec![0.0f32; types.names.len()];
        for (label, &p) in token.probs.iter().enumerate() {
            match types.of_label.get(label).copied().flatten() {
                Some((t, is_begin)) => {
                    per_type[t] += p;
                    if is_begin {
                        begins[t] += p;
                    }
                }
                None => outside += p,
            }
        }
        for (t, &p) in per_type.iter().enumerate() {
            if best.is_none_or(|(_, bp)| p > bp) {
                best = Some((t, p));
            }
        }
        let Some((t, p)) = best.filter(|&(_, p)| p > outside.max(0.5)) else {
            flush(&mut current, &mut entities);
            continue;
        };
        let begins_new = begins[t] > per_type[t] - begins[t];
        let joins = match &current {
            Some((ct, _, end, _)) if *ct == t => {
                let gap = text.get(*end..token.start).unwrap_or("x");
                gap.is_empty() || (!begins_new && gap.chars().all(char::is_whitespace))
            }
            _ => false,
        };
        if joins {
            if let Some((_, _, end, scores)) = current.as_mut() {
                *end = token.end;
                scores.push(p);
            }
        } else {
            flush(&mut current, &mut entities);
            current = Some((t, token.start, token.end, vec![p]));
        }
    }
    flush(&mut current, &mut entities);
    entities
}

struct EntityTypes {
    names: Vec<String>,
    /// Per label: its type and whether it begins a span; `None` for `O`.
    of_label: Vec<Option<(usize, bool)>>,
}

fn entity_types(labels: &[String]) -> EntityTypes {
    let mut names: Vec<String> = Vec::new();
    let mut of_label = Vec::with_capacity(labels.len());
    for label in labels {
        if label == "O" {
            of_label.push(None);
            continue;
        }
        let (name, is_begin) = match label.split_once('-') {
            Some(("B", rest)) => (rest, true),
            Some(("I", rest)) => (rest, false),
            _ => (label.as_str(), false),
        };
        let t = match names.iter().position(|n| n == name) {
            Some(t) => t,
            None => {
                names.push(name.to_owned());
                names.len() - 1
            }
        };
        of_label.push(Some((t, is_begin)));
    }
    EntityTypes { names, of_label }
}

/// Byte ranges of the sentences of `text`: a sentence ends at `.`, `!` or `?` (with any closing
/// quotes or brackets) followed by white space, or at a blank line.
pub fn split_sentences(text: &str) -> Vec<(usize, usize)> {
    let mut sentences = Vec::new();
    let mut start = None;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        if start.is_none() {
            if c.is_whitespace() {
                i += 1;
                continue;
            }
            start = Some(at);
        }
        let mut end_here = None;
        if matches!(c, '.' | '!' | '?') {
            let mut j = i + 1;
            while j < chars.len()
                && matches!(
                    chars[j].1,
                    '.' | '!' | '?' | '"' | '\'' | ')' | ']' | '”' | '’'
                )
            {
                j += 1;
            }
            if j == chars.len() || chars[j].1.is_whitespace() {
                end_here = Some(j);
            }
        } else if c == '\n' && chars.get(i + 1).is_some_and(|&(_, n)| n == '\n') {
            end_here = Some(i);
        }
        if let Some(j) = end_here {
            let end = chars.get(j).map_or(text.len(), |&(at, _)| at);
            if let Some(s) = start.take() {
                let trimmed = text[s..end].trim_end();
                if !trimmed.is_empty() {
                    sentences.push((s, s + trimmed.len()));
                }
            }
            i = j;
            continue;
        }
        i += 1;
    }
    if let Some(s) = start {
        let trimmed = text[s..].trim_end();
        if !trimmed.is_empty() {
            sentences.push((s, s + trimmed.len()));
        }
    }
    sentences
}

/// The `keep` sentences closest to the document's centroid (mean of the normalised sentence
/// vectors), returned as indices in document order.
pub fn central_sentences(vectors: &[Vec<f32>], keep: usize) -> Vec<usize> {
    let Some(dim) = vectors.first().map(Vec::len) else {
        return Vec::new();
    };
    let mut centroid = vec![0.0f32; dim];
    for v in vectors {
        for (c, x) in centroid.iter_mut().zip(v) {
            *c += x;
        }
    }
    normalise(&mut centroid);
    let mut scored: Vec<(usize, f32)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (i, v.iter().zip(&centroid).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen: Vec<usize> = scored.into_iter().take(keep).map(|(i, _)| i).collect();
    chosen.sort_unstable();
    chosen
}

/// Default summary length: a third of the sentences, at least one, at most five.
pub fn default_keep(sentences: usize) -> usize {
    sentences.div_ceil(3).clamp(1, 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut s = [1.0, 3.0, 2.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[1] > s[2] && s[2] > s[0]);
        let ranked = ranked_labels(&s, &labels(&["a", "b", "c"]), Some(2));
        assert_eq!(ranked.len(), 2);
        assert_eq!(ranked[0].label, "b");
    }

    #[test]
    fn bio_tokens_merge_into_entities() {
        let text = "Hi John Smith, mail john@x.org";
        let labels = labels(&["O", "B-NAME", "I-NAME", "B-EMAIL", "I-EMAIL"]);
        let o = [0.9, 0.05, 0.05, 0.0, 0.0];
        let b_name = [0.1, 0.8, 0.1, 0.0, 0.0];
        let i_name = [0.1, 0.1, 0.8, 0.0, 0.0];
        let b_mail = [0.1, 0.0, 0.0, 0.8, 0.1];
        let i_mail = [0.1, 0.0, 0.0, 0.1, 0.8];
        let tokens = [
            TokenScores {
                start: 0,
                end: 0,
                probs: &o,
            }, // [CLS]
            TokenScores {
                start: 0,
                end: 2,
                probs: &o,
            },
            TokenScores {
                start: 3,
                end: 7,
                probs: &b_name,
            },
            TokenScores {
                start: 8,
                end: 13,
                probs: &i_name,
            },
            TokenScores {
                start: 13,
                end: 14,
                probs: &o,
            },
            TokenScores {
                start: 15,
                end: 19,
                probs: &o,
            },
            TokenScores {
                start: 20,
                end: 24,
                probs: &b_mail,
            },
            TokenScores {
                start: 24,
                end: 25,
                probs: &i_mail,
            },
            TokenScores {
                start: 25,
                end: 30,
                probs: &i_mail,
            },
        ];
        let found = merge_entities(text, &tokens, &labels);
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|e| (e.label.as_str(), e.text.as_str()))
            .collect();
        assert_eq!(got, [("NAME", "John Smith"), ("EMAIL", "john@x.org")]);
        assert_eq!((found[0].start, found[0].end), (3, 13));
        assert!((found[0].score - 0.9).abs() < 1e-6);
    }

    #[test]
    fn a_begin_tag_after_a_space_starts_a_new_entity() {
        let text = "Ann Bob";
        let labels = labels(&["O", "B-NAME", "I-NAME"]);
        let b = [0.0, 1.0, 0.0];
        let tokens = [
            TokenScores {
                start: 0,
                end: 3,
                probs: &b,
            },
            TokenScores {
                start: 4,
                end: 7,
                probs: &b,
            },
        ];
        assert_eq!(merge_entities(text, &tokens, &labels).len(), 2);
    }

    #[test]
    fn offsets_outside_the_text_are_dropped_not_trusted() {
        let labels = labels(&["O", "B-X"]);
        let b = [0.0, 1.0];
        let tokens = [TokenScores {
            start: 2,
            end: 99,
            probs: &b,
        }];
        assert!(merge_entities("abc", &tokens, &labels).is_empty());
    }

    #[test]
    fn sentences_split_on_end_punctuation_and_blank_lines() {
        let text = "First one. Second (really)! Third? \"Quoted.\" Dr. Who\n\nLast line";
        let got: Vec<&str> = split_sentences(text)
            .iter()
            .map(|&(a, b)| &text[a..b])
            .collect();
        assert_eq!(
            got,
            [
                "First one.",
                "Second (really)!",
                "Third?",
                "\"Quoted.\"",
                "Dr.",
                "Who",
                "Last line"
            ]
        );
        assert!(split_sentences("   ").is_empty());
        assert_eq!(split_sentences("no end"), [(0, 6)]);
    }

    #[test]
    fn the_central_sentences_are_kept_in_order() {
        let v = |x: f32, y: f32| {
            let mut v = vec![x, y];
            normalise(&mut v);
            v
        };
        let vectors = [v(1.0, 0.0), v(0.0, 1.0), v(1.0, 0.1), v(1.0, 0.2)];
        assert_eq!(central_sentences(&vectors, 2), [2, 3]);
        assert_eq!(default_keep(1), 1);
        assert_eq!(default_keep(7), 3);
        assert_eq!(default_keep(100), 5);
    }

    #[test]
    fn mean_pool_ignores_padding() {
        let tokens = [1.0, 0.0, 3.0, 0.0, 100.0, 100.0];
        let pooled = mean_pool(&tokens, &[1, 1, 0], 2);
        assert!((pooled[0] - 1.0).abs() < 1e-6 && pooled[1].abs() < 1e-6);
    }
}
