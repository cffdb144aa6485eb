//! Training data: question/answer text files and JSONL, tokenized with the GPT-2 tokenizer
//! into fixed-size blocks whose labels count only the answers.
//!
//! Text format: a question line, then its answer line; blank lines are ignored.
//! JSONL: one object per line, `{"question": ..., "answer": ...}` or `{"text": ...}`.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

/// Label value of positions that do not count (questions, padding), as in PyTorch.
pub const IGNORE: i64 = -100;
/// GPT-2's `<|endoftext|>`.
pub const EOS_TOKEN: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("`{path}` is empty: it needs at least one question/answer pair or text")]
    Empty { path: String },
    #[error("`{path}` is not UTF-8 text (invalid byte at offset {offset}); give a .txt or .jsonl file")]
    NotText { path: String, offset: usize },
    #[error("`{path}` line {line}: {what}")]
    Line { path: String, line: usize, what: String },
    #[error("tokenizer `{path}`: {what}")]
    Tokenizer { path: String, what: String },
    #[error("--block-size {block} is larger than the model's context of {context} tokens; use at most {context}")]
    BlockTooLarge { block: usize, context: usize },
    #[error("--block-size must be at least 2")]
    BlockTooSmall,
}

/// One training example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Example {
    /// Only the answer is learned.
    QuestionAnswer { question: String, answer: String },
    /// Every token is learned.
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonExample {
    question: Option<String>,
    answer: Option<String>,
    text: Option<String>,
}

/// Reads a `.jsonl` file as JSONL and anything else as question/answer lines.
pub fn load_examples(path: &Path) -> Result<Vec<Example>, DataError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| DataError::Io { path: name.clone(), error })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::NotText { path: name.clone(), offset: e.valid_up_to() })?;
    if text.contains('\0') {
        return Err(DataError::NotText { path: name, offset: text.find('\0').unwrap_or(0) });
    }
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let examples = if is_jsonl { parse_jsonl(text, &name)? } else { parse_pairs(text, &name)? };
    if examples.is_empty() {
        return Err(DataError::Empty { path: name });
    }
    Ok(examples)
}

fn parse_pairs(text: &str, path: &str) -> Result<Vec<Example>, DataError> {
    let lines: Vec<(usize, &str)> = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty()).collect();
    if lines.len() % 2 == 1 {
        let (line, _) = lines[lines.len() - 1];
        return Err(DataError::Line { path: path.into(), line, what: "this question has no answer line after it".into() });
    }
    Ok(lines
        .chunks_exact(2)
        .map(|pair| Example::QuestionAnswer { question: pair[0].1.to_string(), answer: pair[1].1.to_string() })
        .collect())
}

fn parse_jsonl(text: &str, path: &str) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |what: String| DataError::Line { path: path.into(), line: i + 1, what };
        if line.trim().is_empty() {
            continue;
        }
        let e: JsonExample = serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object of the expected form ({e})")))?;
        out.push(match e {
            JsonExample { question: Some(question), answer: Some(answer), text: None } => Example::QuestionAnswer { question, answer },
            JsonExample { question: None, answer: None, text: Some(text) } => Example::Text(text),
            _ => return Err(bad("expected {\"question\", \"answer\"} or {\"text\"}".into())),
        });
    }
    Ok(out)
}

/// Token ids and next-token labels of one block; `labels[t]` is the token that position t
/// should predict, or [`IGNORE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

pub struct Encoder {
    tokenizer: Tokenizer,
    eos: i64,
}

impl Encoder {
    pub fn load(path: &Path) -> Result<Encoder, DataError> {
        let name = path.display().to_string();
        let tokenizer = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer { path: name.clone(), what: e.to_string() })?;
        let eos = tokenizer
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| DataError::Tokenizer { path: name, what: format!("it has no `{EOS_TOKEN}` token") })? as i64;
        Ok(Encoder { tokenizer, eos })
    }

    pub fn eos(&self) -> i64 {
        self.eos
    }

    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.tokenizer.encode(text, false).map(|e| e.get_ids().iter().map(|&i| i as i64).collect()).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).unwrap_or_default()
    }

    /// One block per example: `question EOS answer EOS`, padded with EOS to `block_size`
    /// (truncated if longer). Labels: the next token where that token is part of what is
    /// learned (the answer and its closing EOS, or all of a text), otherwise [`IGNORE`].
    pub fn blocks(&self, examples: &[Example], block_size: usize, context: usize) -> Result<Vec<Block>, DataError> {
        if block_size > context {
            return Err(DataError::BlockTooLarge { block: block_size, context });
        }
        if block_size < 2 {
            return Err(DataError::BlockTooSmall);
        }
        Ok(examples
            .iter()
            .map(|example| {
                // (token, learned) pairs.
                let mut tokens: Vec<(i64, bool)> = Vec::new();
                match example {
                    Example::QuestionAnswer { question, answer } => {
                        tokens.extend(self.encode(question).into_iter().map(|t| (t, false)));
                        tokens.push((self.eos, false));
                        tokens.extend(self.encode(answer).into_iter().map(|t| (t, true)));
                        tokens.push((self.eos, true));
                    }
                    Example::Text(text) => {
                        tokens.extend(self.encode(text).into_iter().map(|t| (t, true)));
                        tokens.push((self.eos, true));
                    }
                }
                tokens.truncate(block_size);
                let real = tokens.len();
                tokens.resize(block_size, (self.eos, false));
                let ids: Vec<i64> = tokens.iter().map(|t| t.0).collect();
                let labels = (0..block_size)
                    .map(|t| match tokens.get(t + 1) {
                        Some(&(next, true)) if t + 1 < real => next,
                        _ => IGNORE,
                    })
                    .collect();
                Block { ids, labels }
            })
            .collect())
    }
}
