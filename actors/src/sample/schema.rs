//! The sample schema: labels, dense features and sparse fields, each field mapped to an
//! embedding table with a dim and a pooling.

use serde::{Deserialize, Serialize};

use super::hash::field_salt;
use crate::embedding::InvalidValue;

/// How a multi-hot field's rows become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Weighted sum of the rows (weight 1 when the ids carry none).
    #[default]
    Sum,
    /// Weighted sum divided by the number of ids; an empty field pools to zeros.
    Mean,
}

/// One sparse field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The name that salts the string hash and names the field in JSON input.
    pub name: String,
    /// The embedding table the field's ids live in. Fields may share a table: the salted hash
    /// keeps their ids apart.
    pub table: String,
    /// The embedding dim; every field of one table must agree.
    #[serde(default = "default_dim")]
    pub dim: usize,
    #[serde(default)]
    pub pooling: Pooling,
}

fn default_dim() -> usize {
    16
}

/// Which columns a sample has. Configured under `[schema]`; the default is the Criteo layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Label names; the first is the CTR label the models train on.
    pub labels: Vec<String>,
    /// Dense feature names, in column order.
    pub dense: Vec<String>,
    /// Sparse fields, in column order.
    pub fields: Vec<FieldSpec>,
}

impl Default for Schema {
    fn default() -> Self {
        Self::criteo(16)
    }
}

impl Schema {
    /// The Criteo layout: one `click` label, dense I1..I13, fields C1..C26. All fields share
    /// one table `emb`, as the PyTorch peer's fused layout does: the salted hash keeps the
    /// fields' ids apart, and one table means one lookup per step instead of 26.
    pub fn criteo(dim: usize) -> Self {
        Self {
            labels: vec!["click".into()],
            dense: (1..=13).map(|i| format!("I{i}")).collect(),
            fields: (1..=26)
                .map(|i| FieldSpec {
                    name: format!("C{i}"),
                    table: "emb".into(),
                    dim,
                    pooling: Pooling::Sum,
                })
                .collect(),
        }
    }

    /// The FNV state after each field's `name=`, in field order.
    pub fn salts(&self) -> Vec<u64> {
        self.fields.iter().map(|f| field_salt(&f.name)).collect()
    }

    /// The distinct tables with their dims, in order of first use.
    pub fn tables(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for f in &self.fields {
            if !out.iter().any(|(t, _)| *t == f.table) {
                out.push((f.table.clone(), f.dim));
            }
        }
        out
    }

    /// Index of the field `name`.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        if self.labels.is_empty() {
            return Err(InvalidValue::new(
                format!("{prefix}.labels"),
                "[]",
                "at least one label (the CTR label first)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for n in self.labels.iter().chain(&self.dense) {
            if !names.insert(n.as_str()) {
                return Err(InvalidValue::new(
                    prefix.to_string(),
                    n,
                    "label and dense names that are unique",
                ));
            }
        }
        for (i, f) in self.fields.iter().enumerate() {
            if f.name.is_empty() || !names.insert(f.name.as_str()) {
                return Err(InvalidValue::new(
                    format!("{prefix}.fields[{i}].name"),
                    &f.name,
                    "a non-empty name that no other column uses",
                ));
            }
            if f.dim == 0 || f.dim > 1024 {
                return Err(InvalidValue::new(
                    format!("{prefix}.fields[{i}].dim"),
                    f.dim,
                    "a dim in 1..=1024",
                ));
            }
            if let Some(g) = self.fields[..i].iter().find(|g| g.table == f.table) {
                if g.dim != f.dim {
                    return Err(InvalidValue::new(
                        format!("{prefix}.fields[{i}].dim"),
                        f.dim,
                        format!(
                            "{} (the dim of field {} in table {})",
                            g.dim, g.name, g.table
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criteo_layout() {
        let s = Schema::criteo(16);
        assert_eq!((s.labels.len(), s.dense.len(), s.fields.len()), (1, 13, 26));
        assert_eq!(s.tables(), vec![("emb".to_string(), 16)]);
        s.validate("schema").unwrap();
    }

    #[test]
    fn refuses_mismatched_table_dims() {
        let mut s = Schema::criteo(16);
        s.fields[1].dim = 8;
        let e = s.validate("schema").unwrap_err();
        assert_eq!(e.key, "schema.fields[1].dim");
        assert!(e.expected.contains("16"), "{e}");
    }

    #[test]
    fn refuses_duplicate_names() {
        let mut s = Schema::criteo(16);
        s.fields[3].name = "I2".into();
        assert_eq!(
            s.validate("schema").unwrap_err().key,
            "schema.fields[3].name"
        );
    }
}
