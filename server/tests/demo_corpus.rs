//! The demo's corpus and tokenizer: seeded, the same as the shipped files, and lossless.

use server::demo::{self, DemoSpec, tokenizer};

#[test]
fn corpus_is_deterministic_and_matches_the_shipped_file() {
    let spec = DemoSpec::default();
    let (train, heldout) = demo::stories(&spec);
    assert_eq!(demo::stories(&spec), (train.clone(), heldout.clone()));
    assert_eq!(train.len(), spec.n_train_stories);
    let shipped = std::fs::read_to_string(demo::default_dir().join("corpus.txt")).unwrap();
    assert_eq!(
        shipped,
        heldout.join("\n") + "\n",
        "server/demo/corpus.txt is stale"
    );
    let train: std::collections::HashSet<&String> = train.iter().collect();
    assert!(
        heldout.iter().all(|s| !train.contains(s)),
        "held-out stories repeat training ones"
    );
}

#[test]
fn tokenizer_is_deterministic_matches_the_shipped_file_and_round_trips() {
    let spec = DemoSpec::default();
    let (train, heldout) = demo::stories(&spec);
    let all: Vec<String> = train.into_iter().chain(heldout).collect();
    let (json, tok) = tokenizer::build(&all).unwrap();
    assert_eq!(tokenizer::build(&all).unwrap().0, json);
    let shipped = std::fs::read_to_string(demo::default_dir().join("run/tokenizer.json")).unwrap();
    assert_eq!(shipped, json, "server/demo/run/tokenizer.json is stale");
    // The shipped file loads through the same path real runs use.
    let loaded =
        tokenizers::Tokenizer::from_file(demo::default_dir().join("run/tokenizer.json")).unwrap();
    let unk = loaded.token_to_id(tokenizer::UNK).unwrap();
    assert!(loaded.token_to_id(tokenizer::EOS).is_some());
    let vocab = loaded.get_vocab_size(true);
    assert!((150..1000).contains(&vocab), "vocabulary of {vocab}");
    for story in &all {
        let ids = loaded
            .encode(story.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(!ids.contains(&unk), "unknown token in {story}");
        assert_eq!(&loaded.decode(&ids, false).unwrap(), story);
    }
    assert_eq!(tok.get_vocab_size(true), vocab);
}
