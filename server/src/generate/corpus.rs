//! The prompts of a run: documents read from local files (plain text, JSONL, Parquet), shuffled with
//! the seed, tokenized, joined with the EOS token and cut into consecutive windows of `n_ctx` tokens,
//! as the original trainer formed its training prompts. Or prompts given directly as token ids.
//!
//! Every prompt has a global index (its window number in this order); shards take every N-th window,
//! and a resumed run skips the windows it already wrote.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::model::synthetic::Rng;

/// Errors of reading a corpus or tokens file.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {msg}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, CorpusError>;

/// How documents are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One document per line, or (when the file has blank lines) blank-line separated paragraphs.
    Text,
    /// One JSON object per line; the document is the string under the column.
    Jsonl,
    /// Apache Parquet (as Hugging Face datasets ship); the document is the string in the column.
    Parquet,
}

/// A corpus: one file, or a directory whose files of one format are read in name order.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub files: Vec<PathBuf>,
    pub format: Format,
    /// The JSONL key or Parquet column holding the text.
    pub column: String,
}

fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Format::Parquet,
        Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
        _ => Format::Text,
    }
}

impl Corpus {
    /// Resolves `path` (a file, or a directory of `.parquet`, `.jsonl`/`.json` or text files) and the
    /// format from the file extension.
    pub fn open(path: &Path, column: &str) -> Result<Self> {
        let io = |source| CorpusError::Io {
            path: path.to_owned(),
            source,
        };
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            files.sort();
            // One format per directory: Parquet if any, else JSONL if any, else everything as text.
            let pick = [Format::Parquet, Format::Jsonl]
                .into_iter()
                .find(|f| files.iter().any(|p| format_of(p) == *f));
            if let Some(f) = pick {
                files.retain(|p| format_of(p) == f);
            }
            files
        } else if path.is_file() {
            vec![path.to_owned()]
        } else {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or directory",
            )));
        };
        let Some(first) = files.first() else {
            return Err(CorpusError::Format {
                path: path.to_owned(),
                msg: "the directory has no corpus files".into(),
            });
        };
        Ok(Self {
            format: format_of(first),
            files,
            column: column.to_owned(),
        })
    }

    /// Total size of the files in bytes (part of what identifies a corpus for resuming).
    pub fn size(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// The documents in file order.
    pub fn documents(&self) -> impl Iterator<Item = Result<String>> + Send + 'static {
        let (format, column) = (self.format, self.column.clone());
        self.files.clone().into_iter().flat_map(
            move |f| -> Box<dyn Iterator<Item = Result<String>> + Send> {
                let docs = match format {
                    Format::Text => text_documents(&f),
                    Format::Jsonl => jsonl_documents(&f, &column),
                    Format::Parquet => parquet_documents(&f, &column),
                };
                match docs {
                    Ok(it) => it,
                    Err(e) => Box::new(std::iter::once(Err(e))),
                }
            },
        )
    }
}

type Docs = Box<dyn Iterator<Item = Result<String>> + Send>;

fn open_lines(path: &Path) -> Result<impl Iterator<Item = Result<String>> + Send + use<>> {
    let owned = path.to_owned();
    let file = File::open(path).map_err(|source| CorpusError::Io {
        path: owned.clone(),
        source,
    })?;
    Ok(BufReader::new(file).lines().map(move |l| {
        l.map_err(|source| CorpusError::Io {
            path: owned.clone(),
            source,
        })
    }))
}

fn text_documents(path: &Path) -> Result<Docs> {
    let paragraphs = open_lines(path)?
        .map_while(|l| l.ok())
        .any(|l| l.trim().is_empty());
    let lines = open_lines(path)?;
    if !paragraphs {
        return Ok(Box::new(
            lines.filter(|l| !matches!(l, Ok(s) if s.is_empty())),
        ));
    }
    // Blank-line separated: join each paragraph's lines with newlines.
    let mut lines = lines.peekable();
    Ok(Box::new(std::iter::from_fn(move || {
        let mut doc = String::new();
        for line in lines.by_ref() {
            match line {
                Err(e) => return Some(Err(e)),
                Ok(l) if l.trim().is_empty() => {
                    if !doc.is_empty() {
                        return Some(Ok(doc));
                    }
                }
                Ok(l) => {
                    if !doc.is_empty() {
                        doc.push('\n');
                    }
                    doc.push_str(&l);
                }
            }
        }
        (!doc.is_empty()).then_some(Ok(doc))
    })))
}

fn jsonl_documents(path: &Path, column: &str) -> Result<Docs> {
    let (owned, column) = (path.to_owned(), column.to_owned());
    Ok(Box::new(open_lines(path)?.enumerate().filter_map(
        move |(i, line)| {
            let bad = |msg: String| CorpusError::Line {
                path: owned.clone(),
                line: i + 1,
                msg,
            };
            let line = match line {
                Ok(l) if l.trim().is_empty() => return None,
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            let value: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(format!("not a JSON object: {e}")))),
            };
            Some(match value.get(&column) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Null) => return None,
                Some(other) => Err(bad(format!(
                    "`{column}` is not a string but {}",
                    json_kind(other)
                ))),
                None => Err(bad(format!(
                    "no key `{column}` (keys: {}); choose one with --column",
                    value
                        .as_object()
                        .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_else(|| json_kind(&value).into())
                ))),
            })
        },
    )))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parquet_documents(path: &Path, column: &str) -> Result<Docs> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::record::reader::RowIter;
    use parquet::schema::types::Type;

    let owned = path.to_owned();
    let bad = move |msg: String| CorpusError::Format {
        path: owned.clone(),
        msg,
    };
    let file = File::open(path).map_err(|source| CorpusError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let fields = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .to_vec();
    let Some(field) = fields.iter().find(|f| f.name() == column).cloned() else {
        let names: Vec<_> = fields.iter().map(|f| f.name().to_owned()).collect();
        return Err(bad(format!(
            "no column `{column}` (columns: {}); choose one with --column",
            names.join(", ")
        )));
    };
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![field])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = RowIter::from_file_into(Box::new(reader) as Box<dyn FileReader>)
        .project(Some(projection))
        .map_err(|e| bad(e.to_string()))?;
    let column = column.to_owned();
    Ok(Box::new(rows.filter_map(move |row| {
        let row = match row {
            Ok(r) => r,
            Err(e) => return Some(Err(bad(e.to_string()))),
        };
        match row.get_column_iter().next().map(|(_, f)| f) {
            Some(Field::Str(s)) => Some(Ok(s.clone())),
            Some(Field::Null) | None => None,
            Some(other) => Some(Err(bad(format!(
                "column `{column}` holds {other:?}, not text"
            )))),
        }
    })))
}

/// Documents kept in a shuffle buffer (as streaming dataset loaders shuffle).
pub const SHUFFLE_BUFFER: usize = 10_000;

/// Shuffles a stream with a buffer of `SHUFFLE_BUFFER` items: each output is drawn at random from
/// the buffer, which the input refills. Deterministic for a seed (SplitMix64); memory stays bounded.
pub fn shuffle<T>(items: impl Iterator<Item = T>, seed: u64) -> impl Iterator<Item = T> {
    let mut rng = Rng::new(seed);
    let mut items = items.fuse();
    let mut buf: Vec<T> = Vec::new();
    std::iter::from_fn(move || {
        while buf.len() < SHUFFLE_BUFFER {
            match items.next() {
                Some(x) => buf.push(x),
                None => break,
            }
        }
        if buf.is_empty() {
            return None;
        }
        let i = rng.below(buf.len());
        Some(buf.swap_remove(i))
    })
}

/// One prompt: its global index (window number) and token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub index: u64,
    pub tokens: Vec<u32>,
}

/// Finds the end-of-text token: `name` if given, else the first of the usual spellings that the
/// tokenizer knows.
pub fn eos_id(tokenizer: &Tokenizer, name: Option<&str>) -> Result<u32> {
    if let Some(name) = name {
        return tokenizer.token_to_id(name).ok_or_else(|| {
            CorpusError::Tokenizer(format!("the tokenizer has no token `{name}` (--eos-token)"))
        });
    }
    const USUAL: [&str; 7] = [
        "<|endoftext|>",
        "[EOS]",
        "</s>",
        "<eos>",
        "<|eos|>",
        "<|end_of_text|>",
        "[SEP]",
    ];
    USUAL
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| {
            CorpusError::Tokenizer(format!(
                "cannot find an end-of-text token (looked for {}); name it with --eos-token",
                USUAL.join(", ")
            ))
        })
}

/// Tokenizes documents and cuts their concatenation (joined with `eos`) into windows of `n_ctx`
/// tokens; the last partial window is dropped.
pub fn windows(
    docs: impl Iterator<Item = Result<String>>,
    tokenizer: Tokenizer,
    eos: u32,
    n_ctx: usize,
) -> impl Iterator<Item = Result<Window>> {
    let mut docs = docs.fuse();
    let mut buf: Vec<u32> = Vec::new();
    let mut start = 0usize;
    let mut first = true;
    let mut index = 0u64;
    std::iter::from_fn(move || {
        while buf.len() - start < n_ctx {
            let doc = match docs.next()? {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            let enc = match tokenizer.encode(doc, false) {
                Ok(e) => e,
                Err(e) => return Some(Err(CorpusError::Tokenizer(e.to_string()))),
            };
            buf.drain(..start);
            start = 0;
            if !first {
                buf.push(eos);
            }
            first = false;
            buf.extend_from_slice(enc.get_ids());
        }
        let w = Window {
            index,
            tokens: buf[start..start + n_ctx].to_vec(),
        };
        start += n_ctx;
        index += 1;
        Some(Ok(w))
    })
}

/// Prompts from a tokens file: a JSON array of arrays of token ids, or one JSON array per line. Each
/// array is one prompt, taken as is (no windowing, no shuffling).
pub fn token_prompts(path: &Path) -> Result<Vec<Window>> {
    let text = std::fs::read_to_string(path).map_err(|source| CorpusError::Io {
        path: path.to_owned(),
        source,
    })?;
    let prompts: Vec<Vec<u32>> = match serde_json::from_str(&text) {
        Ok(p) => p,
        Err(whole) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| CorpusError::Line {
                    path: path.to_owned(),
                    line: i + 1,
                    msg: format!(
                        "expected a JSON array of token ids per line, or one array of arrays \
                         ({whole}): {e}"
                    ),
                })
            })
            .collect::<Result<_>>()?,
    };
    Ok(prompts
        .into_iter()
        .enumerate()
        .map(|(i, tokens)| Window {
            index: i as u64,
            tokens,
        })
        .collect())
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| CorpusError::Tokenizer(format!("{}: cannot load: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a: Vec<u32> = shuffle(0..25_000u32, 7).collect();
        let b: Vec<u32> = shuffle(0..25_000u32, 7).collect();
        let c: Vec<u32> = shuffle(0..25_000u32, 8).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..25_000).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }
}
