//! The Criteo TSV format: `label \t I1..I13 \t C1..C26`, one row per line.
//!
//! - The label is `0` or `1`.
//! - An integer column may be empty (missing: 0). A value `x` becomes `ln(1 + max(x, 0))`,
//!   the usual Criteo transform and the one the PyTorch peer applies.
//! - A categorical column is any byte string, hashed with its field's salt
//!   ([`super::hash`]). An empty value is a missing value; it hashes to its own id, as in the
//!   peer, so "missing" can carry signal.
//!
//! A row with the wrong column count, a non-numeric or non-finite integer column, a magnitude
//! over [`MAX_ABS_VALUE`] or a label other than 0/1 is refused; the parser never panics.

use std::io::BufRead;

use anyhow::Context;

use super::hash::salted_id;
use super::{RejectReason, RejectSink, SampleBlock, Schema, MAX_ABS_VALUE};

pub const NUM_DENSE: usize = 13;
pub const NUM_CATEGORICAL: usize = 26;
pub const NUM_COLUMNS: usize = 1 + NUM_DENSE + NUM_CATEGORICAL;

/// Parses Criteo lines into blocks shaped by a Criteo-layout schema.
#[derive(Debug)]
pub struct CriteoParser {
    salts: Vec<u64>,
    dense_names: Vec<String>,
    label_name: String,
}

impl CriteoParser {
    /// The schema must have the Criteo shape: one label (more are not in the format),
    /// 13 dense values and 26 fields.
    pub fn new(schema: &Schema) -> anyhow::Result<Self> {
        anyhow::ensure!(
            schema.labels.len() == 1
                && schema.dense.len() == NUM_DENSE
                && schema.fields.len() == NUM_CATEGORICAL,
            "the criteo format needs a schema with 1 label, {NUM_DENSE} dense values and \
             {NUM_CATEGORICAL} fields; this one has {}, {} and {}",
            schema.labels.len(),
            schema.dense.len(),
            schema.fields.len()
        );
        Ok(Self {
            salts: schema.salts(),
            dense_names: schema.dense.clone(),
            label_name: schema.labels[0].clone(),
        })
    }

    /// Parses one line (without its newline) into `block`. On error the block is unchanged.
    pub fn parse_line(&self, line: &[u8], block: &mut SampleBlock) -> Result<(), RejectReason> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let found = line.iter().filter(|&&b| b == b'\t').count() + 1;
        if found != NUM_COLUMNS {
            return Err(RejectReason::ColumnCount {
                expected: NUM_COLUMNS,
                found,
            });
        }
        let mut cols = line.split(|&b| b == b'\t');
        let mark = block.mark();
        let result = self.parse_columns(&mut cols, block);
        if result.is_err() {
            block.rollback(mark);
        }
        result
    }

    fn parse_columns<'a>(
        &self,
        cols: &mut impl Iterator<Item = &'a [u8]>,
        block: &mut SampleBlock,
    ) -> Result<(), RejectReason> {
        let label = cols.next().unwrap_or_default();
        match label {
            b"0" => block.push_label(0.0),
            b"1" => block.push_label(1.0),
            other => {
                return Err(RejectReason::BadLabel {
                    column: self.label_name.clone(),
                    value: String::from_utf8_lossy(other).into_owned(),
                })
            }
        }
        for name in &self.dense_names {
            let raw = cols.next().unwrap_or_default();
            let x = parse_count(raw, name)?;
            block.push_dense((x.max(0.0)).ln_1p() as f32);
        }
        for &salt in &self.salts {
            let raw = cols.next().unwrap_or_default();
            block.push_id(salted_id(salt, raw), 1.0);
            block.end_field();
        }
        block.end_row(1.0);
        Ok(())
    }
}

/// A numeric column: empty is missing (0); otherwise a finite number within the bound.
pub(crate) fn parse_count(raw: &[u8], column: &str) -> Result<f64, RejectReason> {
    if raw.is_empty() {
        return Ok(0.0);
    }
    let not_a_number = || RejectReason::NotANumber {
        column: column.to_string(),
        value: String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned(),
    };
    let s = std::str::from_utf8(raw).map_err(|_| not_a_number())?;
    let x = match s.parse::<i64>() {
        Ok(i) => i as f64,
        Err(_) => s.parse::<f64>().map_err(|_| not_a_number())?,
    };
    check_value(x, column)
}

/// Finite and within [`MAX_ABS_VALUE`].
pub(crate) fn check_value(x: f64, column: &str) -> Result<f64, RejectReason> {
    if !x.is_finite() {
        return Err(RejectReason::NotFinite {
            column: column.to_string(),
        });
    }
    if x.abs() > MAX_ABS_VALUE {
        return Err(RejectReason::Magnitude {
            column: column.to_string(),
            value: x,
            max: MAX_ABS_VALUE,
        });
    }
    Ok(x)
}

/// Reads every line of `input` into `block`, refusing malformed rows into `rejects`.
/// Stops after `max_rows` accepted rows when given. Returns the lines read.
pub fn read_into(
    parser: &CriteoParser,
    mut input: impl BufRead,
    block: &mut SampleBlock,
    rejects: &mut RejectSink,
    max_rows: Option<usize>,
) -> anyhow::Result<u64> {
    let mut line = Vec::with_capacity(512);
    let mut line_no = 0u64;
    loop {
        if max_rows.is_some_and(|m| block.len() >= m) {
            break;
        }
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading line {}", line_no + 1))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        if let Err(reason) = parser.parse_line(body, block) {
            rejects.reject(line_no, &reason, body)?;
        }
    }
    Ok(line_no)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;
    use crate::sample::feature_id;

    fn valid_line(rng: &mut Xoshiro256) -> String {
        let mut cols = vec![(rng.below(2)).to_string()];
        for _ in 0..NUM_DENSE {
            cols.push(match rng.below(4) {
                0 => String::new(),
                1 => "-1".into(),
                _ => rng.below(100_000).to_string(),
            });
        }
        for _ in 0..NUM_CATEGORICAL {
            cols.push(if rng.below(10) == 0 {
                String::new()
            } else {
                format!("{:08x}", rng.next_u64() as u32)
            });
        }
        cols.join("\t")
    }

    #[test]
    fn parses_a_row() {
        let p = CriteoParser::new(&Schema::criteo(16)).unwrap();
        let mut b = SampleBlock::for_schema(&Schema::criteo(16));
        let mut line = String::from("1\t5\t\t-3");
        line.push_str(&"\t0".repeat(10));
        line.push_str("\t68fd1e64\t");
        line.push_str(&"\tx".repeat(24));
        p.parse_line(line.as_bytes(), &mut b).unwrap();
        let r = b.row(0);
        assert_eq!(r.label(), 1.0);
        assert_eq!(r.dense()[0], 6f32.ln());
        assert_eq!(r.dense()[1], 0.0, "missing is 0");
        assert_eq!(r.dense()[2], 0.0, "negative clamps to 0");
        assert_eq!(r.field(0).0, &[feature_id("C1", "68fd1e64")]);
        assert_eq!(r.field(1).0, &[feature_id("C2", "")], "missing hashes");
        assert_eq!(r.field(25).0, &[feature_id("C26", "x")]);
    }

    #[test]
    fn refuses_malformed_rows_with_a_reason() {
        let p = CriteoParser::new(&Schema::criteo(16)).unwrap();
        let mut b = SampleBlock::for_schema(&Schema::criteo(16));
        let good = format!("0{}{}", "\t1".repeat(13), "\ta".repeat(26));
        let cases: Vec<(String, &str)> = vec![
            (good.replacen("\ta", "", 1), "column_count"),
            (format!("{good}\textra"), "column_count"),
            (String::new(), "column_count"),
            (good.replacen("\t1", "\tabc", 1), "not_a_number"),
            (good.replacen("\t1", "\tnan", 1), "not_finite"),
            (good.replacen("\t1", "\tinf", 1), "not_finite"),
            (good.replacen("\t1", "\t1e300", 1), "magnitude"),
            (good.replacen("\t1", "\t-99999999999999", 1), "magnitude"),
            (good.replacen('0', "2", 1), "bad_label"),
            (good.replacen('0', "", 1), "bad_label"),
        ];
        for (line, kind) in cases {
            let e = p.parse_line(line.as_bytes(), &mut b).unwrap_err();
            assert_eq!(e.kind(), kind, "{line:?}: {e}");
            assert!(b.is_empty(), "a refused row leaves nothing behind");
        }
        p.parse_line(good.as_bytes(), &mut b).unwrap();
        p.parse_line(format!("{good}\r").as_bytes(), &mut b)
            .unwrap();
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn reject_file_names_line_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rejects.tsv");
        let schema = Schema::criteo(16);
        let p = CriteoParser::new(&schema).unwrap();
        let mut rng = Xoshiro256::seed_from_u64(1);
        let input = format!(
            "{}\n1\tbad\n{}\n",
            valid_line(&mut rng),
            valid_line(&mut rng)
        );
        let mut sink = RejectSink::to_file(&path).unwrap();
        let mut b = SampleBlock::for_schema(&schema);
        let lines = read_into(&p, input.as_bytes(), &mut b, &mut sink, None).unwrap();
        sink.flush().unwrap();
        assert_eq!((lines, b.len(), sink.stats().total), (3, 2, 1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "2\texpected 40 tab-separated columns, found 2\t1\\tbad\n"
        );
    }

    /// Mutates valid rows at random (byte flips, dropped and doubled tabs, junk, truncation)
    /// and checks the parser never panics, every line is either accepted or refused, and an
    /// accepted row always has the full shape with finite dense values.
    #[test]
    fn fuzzed_rows_never_panic_and_are_accounted() {
        let seed = crate::testkit::seed("criteo_fuzz");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let schema = Schema::criteo(16);
        let p = CriteoParser::new(&schema).unwrap();
        let mut input = Vec::new();
        let n = 3000;
        for _ in 0..n {
            let mut line = valid_line(&mut rng).into_bytes();
            for _ in 0..rng.below(4) {
                let at = rng.below(line.len() as u64 + 1) as usize;
                match rng.below(6) {
                    0 if at < line.len() => line[at] = rng.next_u64() as u8,
                    1 if at < line.len() => drop(line.remove(at)),
                    2 => line.insert(at, b'\t'),
                    3 => line.truncate(at),
                    4 => drop(line.splice(at..at, *b"NaN")),
                    _ => drop(line.splice(at..at, *b"\xff\xfe9e99")),
                }
            }
            line.retain(|&b| b != b'\n');
            input.extend_from_slice(&line);
            input.push(b'\n');
        }
        let mut b = SampleBlock::for_schema(&schema);
        let mut sink = RejectSink::counting();
        let lines = read_into(&p, &input[..], &mut b, &mut sink, None).unwrap();
        assert_eq!(lines, n);
        assert_eq!(b.len() as u64 + sink.stats().total, n, "seed {seed}");
        assert!(sink.stats().total > 0 && !b.is_empty(), "seed {seed}");
        for r in b.rows() {
            assert!(r.label() == 0.0 || r.label() == 1.0);
            assert_eq!(r.dense().len(), NUM_DENSE);
            assert!(r.dense().iter().all(|x| x.is_finite() && *x >= 0.0));
            assert!((0..NUM_CATEGORICAL).all(|f| r.field(f).0.len() == 1));
        }
    }
}
