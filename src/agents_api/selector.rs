//! `labelSelector` and `fieldSelector` as Kubernetes reads them (the syntax of
//! k8s.io/apimachinery's `labels.Parse` and `fields.ParseSelector`), for the agents API.
//!
//! Written here because no maintained crate parses them (kube-rs builds selectors, it does not
//! read them). Both are bounded: at most [`MAX_SELECTOR_BYTES`] and [`MAX_REQUIREMENTS`].
use std::collections::BTreeMap;

/// The longest selector read.
pub const MAX_SELECTOR_BYTES: usize = 4096;
/// The most requirements in one selector.
pub const MAX_REQUIREMENTS: usize = 64;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Exists(String),
    DoesNotExist(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

/// A parsed label selector; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Label>);

/// Why a selector does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, SelectorError> {
    Err(SelectorError(msg.into()))
}

fn check_size(s: &str, parts: usize) -> Result<(), SelectorError> {
    if s.len() > MAX_SELECTOR_BYTES {
        return err(format!("selector longer than {MAX_SELECTOR_BYTES} bytes"));
    }
    if parts > MAX_REQUIREMENTS {
        return err(format!("more than {MAX_REQUIREMENTS} requirements"));
    }
    Ok(())
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, SelectorError> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return err("unbalanced parentheses");
        }
    }
    if depth != 0 {
        return err("unbalanced parentheses");
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn label_key(k: &str) -> Result<String, SelectorError> {
    let k = k.trim();
    if !super::object::valid_label_key(k) {
        return err(format!("invalid label key {k:?}"));
    }
    Ok(k.to_owned())
}

fn label_value(v: &str) -> Result<String, SelectorError> {
    let v = v.trim();
    if !super::object::valid_label_value(v) {
        return err(format!("invalid label value {v:?}"));
    }
    Ok(v.to_owned())
}

impl LabelSelector {
    /// Reads `a=b,c!=d,e in (x,y),f notin (z),g,!h,n>1`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        check_size(s, 0)?;
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let parts = split_top(s)?;
        check_size(s, parts.len())?;
        parts.into_iter().map(Self::requirement).collect::<Result<_, _>>().map(Self)
    }

    fn requirement(part: &str) -> Result<Label, SelectorError> {
        let p = part.trim();
        if p.is_empty() {
            return err("empty requirement");
        }
        if let Some(key) = p.strip_prefix('!') {
            return Ok(Label::DoesNotExist(label_key(key)?));
        }
        if let Some(open) = p.find('(') {
            let (head, list) = (p[..open].trim(), &p[open..]);
            let Some(values) = list.strip_prefix('(').and_then(|l| l.strip_suffix(')')) else {
                return err(format!("invalid set in {p:?}"));
            };
            let values: Vec<String> = values.split(',').map(label_value).collect::<Result<_, _>>()?;
            let words: Vec<&str> = head.split_whitespace().collect();
            return match words.as_slice() {
                [key, "in"] => Ok(Label::In(label_key(key)?, values)),
                [key, "notin"] => Ok(Label::NotIn(label_key(key)?, values)),
                _ => err(format!("expected `key in (…)` or `key notin (…)`, got {p:?}")),
            };
        }
        for (op, neg) in [("!=", true), ("==", false), ("=", false)] {
            if let Some((k, v)) = p.split_once(op) {
                let (key, value) = (label_key(k)?, label_value(v)?);
                return Ok(if neg { Label::NotIn(key, vec![value]) } else { Label::In(key, vec![value]) });
            }
        }
        for op in ['>', '<'] {
            if let Some((k, v)) = p.split_once(op) {
                let key = label_key(k)?;
                let Ok(n) = v.trim().parse::<i64>() else {
                    return err(format!("{op} needs an integer, got {:?}", v.trim()));
                };
                return Ok(if op == '>' { Label::Gt(key, n) } else { Label::Lt(key, n) });
            }
        }
        Ok(Label::Exists(label_key(p)?))
    }

    /// Whether `labels` meet every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Label::Exists(k) => labels.contains_key(k),
            Label::DoesNotExist(k) => !labels.contains_key(k),
            Label::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Label::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Label::Gt(k, n) => labels.get(k).and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > *n),
            Label::Lt(k, n) => labels.get(k).and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < *n),
        })
    }
}

/// A parsed field selector over the fields an object allows; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Reads `f=v,g!=w` (`==` too; `\,` `\=` `\!` `\\` escape), refusing fields not in `allowed`
    /// as the API server does ("field label not supported").
    pub fn parse(s: &str, allowed: &[&str]) -> Result<Self, SelectorError> {
        check_size(s, 0)?;
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let parts = split_escaped(s, ',');
        check_size(s, parts.len())?;
        let mut out = Vec::new();
        for part in parts {
            let (field, equal, value) = if let Some((f, v)) = split_op(&part, "!=") {
                (f, false, v)
            } else if let Some((f, v)) = split_op(&part, "==") {
                (f, true, v)
            } else if let Some((f, v)) = split_op(&part, "=") {
                (f, true, v)
            } else {
                return err(format!("invalid field selector requirement {part:?}: expected field=value"));
            };
            let field = field.trim().to_owned();
            if !allowed.contains(&field.as_str()) {
                return err(format!(
                    "field label not supported: {field} (supported: {})",
                    allowed.join(", ")
                ));
            }
            out.push((field, equal, unescape(&value)));
        }
        Ok(Self(out))
    }

    /// Whether the object whose fields `field` reads meets every requirement.
    pub fn matches(&self, field: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|(f, equal, v)| (field(f).unwrap_or_default() == *v) == *equal)
    }

    /// The value the selector requires of `field` (`field=value`), if any.
    pub fn required(&self, field: &str) -> Option<&str> {
        self.0.iter().find(|(f, equal, _)| f == field && *equal).map(|(_, _, v)| v.as_str())
    }
}

/// Splits on `sep` not preceded by a backslash (keeping the escapes).
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let (mut parts, mut cur, mut escaped) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if escaped {
        cur.push('\\');
    }
    parts.push(cur);
    parts
}

/// Splits at the first unescaped `op`.
fn split_op(s: &str, op: &str) -> Option<(String, String)> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if s[i..].starts_with(op) {
            return Some((s[..i].to_owned(), s[i + op.len()..].to_owned()));
        }
        i += 1;
    }
    None
}

fn unescape(s: &str) -> String {
    let (mut out, mut escaped) = (String::new(), false);
    for c in s.chars() {
        if escaped || c != '\\' {
            out.push(c);
            escaped = false;
        } else {
            escaped = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn label_selectors_read_as_kubernetes_writes_them() {
        let l = labels(&[("service.name", "checkout"), ("env", "prod"), ("replicas", "3")]);
        let yes = [
            "",
            "service.name=checkout",
            "service.name==checkout,env",
            "env in (prod, staging)",
            "env notin (dev),!team",
            "service.name!=cart",
            "replicas>2,replicas<4",
            " env = prod ",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = ["service.name=cart", "team", "!env", "env in (dev)", "env notin (prod)", "replicas>3"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        for bad in ["env in prod", "=x", "a=b=c d", "env in (prod", "x>y", ",", "Bad Key=1"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        assert!(LabelSelector::parse(&"a,".repeat(100)).is_err());
        assert!(LabelSelector::parse(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn field_selectors_take_only_the_supported_fields() {
        let allowed = ["status.connected", "metadata.name"];
        let s = FieldSelector::parse("status.connected=true,metadata.name!=x", &allowed).unwrap();
        let field = |f: &str| match f {
            "status.connected" => Some("true".to_owned()),
            "metadata.name" => Some("y".to_owned()),
            _ => None,
        };
        assert!(s.matches(field));
        assert!(!FieldSelector::parse("metadata.name==x", &allowed).unwrap().matches(field));
        assert_eq!(s.required("status.connected"), Some("true"));
        let e = FieldSelector::parse("spec.nodeName=x", &allowed).unwrap_err();
        assert!(e.to_string().contains("field label not supported: spec.nodeName"), "{e}");
        assert!(FieldSelector::parse("metadata.name", &allowed).is_err());
        let escaped = FieldSelector::parse(r"metadata.name=a\,b", &allowed).unwrap();
        assert_eq!(escaped.required("metadata.name"), Some("a,b"));
    }
}
