//! Loading and tokenizing training data: the shipped data set, both formats, labels that
//! count only answers, and a clear error for every kind of bad input.

use std::path::{Path, PathBuf};

use fhe_train::data::{load_examples, Block, DataError, Encoder, Example, IGNORE};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn encoder() -> Encoder {
    Encoder::load(&repo("models/gpt2-tiny/tokenizer.json")).unwrap()
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn the_shipped_data_set_loads_in_both_formats() {
    let pairs = load_examples(&repo("data_finetune/private_ml_qa.txt")).unwrap();
    assert!(pairs.len() >= 30, "{} pairs", pairs.len());
    assert!(pairs.iter().all(|e| matches!(e, Example::QuestionAnswer { question, .. } if question.ends_with('?'))));
    let jsonl = load_examples(&repo("data_finetune/private_ml_qa.jsonl")).unwrap();
    assert_eq!(jsonl.len(), 3);
    assert!(matches!(&jsonl[2], Example::Text(t) if t.starts_with("Private fine-tuning")));
}

#[test]
fn tokenization_matches_gpt2() {
    let e = encoder();
    assert_eq!(e.encode("Hello world, what is FHE?"), vec![15496, 995, 11, 644, 318, 376, 13909, 30]);
    assert_eq!(e.eos(), 50256);
    assert_eq!(e.decode(&[15496, 995]), "Hello world");
}

#[test]
fn labels_count_only_the_answer_and_its_end() {
    let e = encoder();
    let example = Example::QuestionAnswer { question: "Hello world".into(), answer: "what is FHE?".into() };
    let blocks = e.blocks(&[example], 12, 128).unwrap();
    let Block { ids, labels } = &blocks[0];
    // Hello world EOS what is FHE ? EOS pad pad pad pad ("what" opens the answer: no space, 10919)
    assert_eq!(ids, &vec![15496, 995, 50256, 10919, 318, 376, 13909, 30, 50256, 50256, 50256, 50256]);
    // Position t predicts ids[t+1]; only answer tokens and the closing EOS are targets.
    assert_eq!(labels, &vec![IGNORE, IGNORE, 10919, 318, 376, 13909, 30, 50256, IGNORE, IGNORE, IGNORE, IGNORE]);
    // Plain text learns every next token.
    let text = e.blocks(&[Example::Text("Hello world".into())], 4, 128).unwrap();
    assert_eq!(text[0].labels, vec![995, 50256, IGNORE, IGNORE]);
    // Long examples are cut to the block.
    assert_eq!(e.blocks(&[Example::Text("a b c d e f g h i j".into())], 3, 128).unwrap()[0].ids.len(), 3);
}

#[test]
fn bad_data_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let message = |r: Result<Vec<Example>, DataError>| r.err().expect("must fail").to_string();
    assert!(message(load_examples(&dir.path().join("missing.txt"))).contains("cannot read"));
    assert!(message(load_examples(&write(dir.path(), "empty.txt", b"\n\n"))).contains("is empty"));
    assert!(message(load_examples(&write(dir.path(), "binary.txt", &[0x89, b'P', b'N', b'G', 0, 0xff]))).contains("not UTF-8 text"));
    assert!(message(load_examples(&write(dir.path(), "nul.txt", b"abc\0def\n"))).contains("not UTF-8 text"));
    let odd = message(load_examples(&write(dir.path(), "odd.txt", b"Q1?\nA1.\nQ2?\n")));
    assert!(odd.contains("line 3") && odd.contains("no answer"), "{odd}");
    let bad_json = message(load_examples(&write(dir.path(), "bad.jsonl", b"{\"text\": \"ok\"}\n{\"question\": \"q\"\n")));
    assert!(bad_json.contains("line 2") && bad_json.contains("JSON"), "{bad_json}");
    let wrong_keys = message(load_examples(&write(dir.path(), "keys.jsonl", b"{\"question\": \"q\"}\n")));
    assert!(wrong_keys.contains("line 1") && wrong_keys.contains("expected"), "{wrong_keys}");
    let e = encoder();
    let too_long = e.blocks(&[Example::Text("x".into())], 200, 128).err().unwrap().to_string();
    assert!(too_long.contains("larger than the model's context of 128"), "{too_long}");
    let no_tokenizer = Encoder::load(&dir.path().join("tokenizer.json")).err().unwrap().to_string();
    assert!(no_tokenizer.contains("tokenizer"), "{no_tokenizer}");
}
