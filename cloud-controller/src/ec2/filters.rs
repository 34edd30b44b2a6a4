//! `Filter.N.Name` / `Filter.N.Value.M` as every Describe call takes them.

use canopy_ec2_wire::params::Params;

use super::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

pub fn parse_filters(params: &Params) -> Result<Vec<Filter>, ApiError> {
    params
        .structs("Filter")?
        .into_iter()
        .map(|f| {
            let name = f
                .get("Name")
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ApiError::missing("Filter.N.Name"))?;
            Ok(Filter {
                name: name.to_owned(),
                values: f.list("Value")?,
            })
        })
        .collect()
}

/// What a resource answers for a filter name: its values, or `None` for a filter name the
/// resource does not know (an `InvalidParameterValue`, as on AWS).
pub trait Filterable {
    fn filter_values(&self, name: &str) -> Option<Vec<String>>;
}

/// The values of the tag filters every Describe call takes (`tag:KEY`, `tag-key`,
/// `tag-value`) for a resource with `tags`; `None` for any other filter name.
pub fn tag_values(tags: &[crate::state::Tag], name: &str) -> Option<Vec<String>> {
    if let Some(key) = name.strip_prefix("tag:") {
        return Some(
            tags.iter()
                .filter(|t| t.key == key)
                .map(|t| t.value.clone())
                .collect(),
        );
    }
    match name {
        "tag-key" => Some(tags.iter().map(|t| t.key.clone()).collect()),
        "tag-value" => Some(tags.iter().map(|t| t.value.clone()).collect()),
        _ => None,
    }
}

/// Checks every filter name against `probe` once, so an unknown filter fails even when no
/// resource is there to be filtered.
pub fn validate<T: Filterable>(filters: &[Filter], probe: &T) -> Result<(), ApiError> {
    for f in filters {
        if probe.filter_values(&f.name).is_none() {
            return Err(ApiError::invalid(format!(
                "The filter '{}' is invalid",
                f.name
            )));
        }
    }
    Ok(())
}

/// All filters must match (AND); within a filter any value may match (OR), with `*` and
/// `?` wildcards.
pub fn matches<T: Filterable>(item: &T, filters: &[Filter]) -> bool {
    filters.iter().all(|f| {
        let have = item.filter_values(&f.name).unwrap_or_default();
        f.values
            .iter()
            .any(|want| have.iter().any(|h| glob(want, h)))
    })
}

/// EC2's filter wildcards: `*` any run, `?` one character, `\` escapes the next.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|i| go(&p[1..], &t[i..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('\\') if p.len() > 1 => t.first() == Some(&p[1]) && go(&p[2..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    // Collapse runs of '*' so the recursion stays linear in practice.
    let mut collapsed = Vec::with_capacity(p.len());
    for c in p {
        if !(c == '*' && collapsed.last() == Some(&'*')) {
            collapsed.push(c);
        }
    }
    go(&collapsed, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_supports_ec2_wildcards() {
        assert!(glob("web-*", "web-1"));
        assert!(glob("*", ""));
        assert!(glob("w?b", "web"));
        assert!(!glob("w?b", "wb"));
        assert!(glob("a\\*", "a*"));
        assert!(!glob("a\\*", "ab"));
        assert!(!glob("web", "web-1"));
        assert!(glob("****a", "bbbba"));
    }

    struct Thing(&'static str);
    impl Filterable for Thing {
        fn filter_values(&self, name: &str) -> Option<Vec<String>> {
            (name == "n").then(|| vec![self.0.to_owned()])
        }
    }

    #[test]
    fn filters_and_across_or_within() {
        let params = Params::parse(b"Filter.1.Name=n&Filter.1.Value.1=a&Filter.1.Value.2=b&Filter.2.Name=n&Filter.2.Value.1=*");
        let f = parse_filters(&params).unwrap();
        assert_eq!(f.len(), 2);
        assert!(matches(&Thing("a"), &f));
        assert!(!matches(&Thing("c"), &f));
        assert!(validate(&f, &Thing("")).is_ok());
        let bad = parse_filters(&Params::parse(b"Filter.1.Name=zz&Filter.1.Value.1=a")).unwrap();
        assert_eq!(
            validate(&bad, &Thing("")).unwrap_err().code,
            "InvalidParameterValue"
        );
    }
}
