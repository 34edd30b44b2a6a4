//! Decoded EC2 Query parameters: the form body of a `POST` or the query string of a `GET`.
//!
//! EC2 flattens lists and structures into dotted names: `InstanceId.1`, `InstanceId.2` for a list,
//! `Filter.1.Name` and `Filter.1.Value.2` for a list of structures, `Placement.AvailabilityZone` for
//! a plain structure. Indices are 1-based and clients may leave gaps, so lists are ordered by the
//! numeric index, never by the text of the key (`.10` after `.9`).

use std::collections::HashMap;
use std::str::FromStr;

/// A parameter that is missing or does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A required parameter is absent or empty (EC2 code `MissingParameter`). Holds the name.
    #[error("The request must contain the parameter {0}")]
    Missing(String),
    /// A parameter has a value EC2 would refuse (EC2 code `InvalidParameterValue`).
    #[error("{message}")]
    Invalid {
        /// The full wire name of the parameter, e.g. `Filter.x.Name`.
        name: String,
        /// A message for the client, naming the parameter and what was wrong.
        message: String,
    },
}

impl ParamError {
    /// The EC2 error code: `MissingParameter` or `InvalidParameterValue`.
    pub fn code(&self) -> &'static str {
        match self {
            ParamError::Missing(_) => "MissingParameter",
            ParamError::Invalid { .. } => "InvalidParameterValue",
        }
    }

    /// The HTTP status EC2 uses for both codes: 400.
    pub fn http_status(&self) -> u16 {
        400
    }

    fn invalid(name: &str, message: String) -> ParamError {
        ParamError::Invalid {
            name: name.to_owned(),
            message,
        }
    }
}

/// The parameters of one request, in the order they first appeared.
///
/// A key given twice keeps its first position and its last value, like most form parsers; EC2
/// clients never repeat a key, so which one wins matters only to be predictable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    entries: Vec<(String, String)>,
    /// Where each key is in `entries`, once there are more than [`LINEAR_MAX`] of them, so that
    /// parsing stays linear however many parameters a request has (`InstanceId.1` …
    /// `InstanceId.1000`). Most requests carry a handful, found faster by a scan than by
    /// hashing, and without a second copy of every key.
    index: Option<HashMap<String, usize>>,
}

/// The most keys looked up by a scan of [`Params`]' entries.
const LINEAR_MAX: usize = 16;

impl Params {
    /// Decodes an `application/x-www-form-urlencoded` body or a raw query string (without `?`).
    ///
    /// `+` is a space and `%XX` is a byte, as botocore encodes them; invalid UTF-8 becomes U+FFFD
    /// rather than an error because no valid EC2 parameter contains it and the value will be
    /// refused where it is used.
    pub fn parse(urlencoded: &[u8]) -> Params {
        let mut params = Params::default();
        params.extend_urlencoded(urlencoded);
        params
    }

    /// Adds the parameters of another encoded string, as [`insert`](Self::insert) does each:
    /// a `POST` body after the query string.
    pub fn extend_urlencoded(&mut self, urlencoded: &[u8]) {
        for (key, value) in form_urlencoded::parse(urlencoded) {
            self.insert(key.into_owned(), value.into_owned());
        }
    }

    /// Sets `key` to `value`, replacing an earlier value but keeping the key's position.
    pub fn insert(&mut self, key: String, value: String) {
        if let Some(at) = self.position(&key) {
            self.entries[at].1 = value;
            return;
        }
        let at = self.entries.len();
        if self.index.is_none() && at == LINEAR_MAX {
            let keys = self.entries.iter().enumerate();
            self.index = Some(keys.map(|(i, (k, _))| (k.clone(), i)).collect());
        }
        if let Some(index) = &mut self.index {
            index.insert(key.clone(), at);
        }
        self.entries.push((key, value));
    }

    fn position(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.entries.iter().position(|(k, _)| k == key),
        }
    }

    /// The value of `name`, if present (possibly empty).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|i| self.entries[i].1.as_str())
    }

    /// The value of `name`; absent or empty is [`ParamError::Missing`], as EC2 treats both.
    pub fn required(&self, name: &str) -> Result<&str, ParamError> {
        match self.get(name) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(ParamError::Missing(name.to_owned())),
        }
    }

    /// The values of the list `prefix.1`, `prefix.2`, … ordered by index (gaps allowed).
    ///
    /// Keys that continue past the index (`prefix.1.Foo`) or whose index is not a positive integer
    /// are refused, because they mean the client sent a shape this caller does not expect.
    /// An absent list is empty.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ParamError> {
        let mut items = Vec::new();
        for (key, value) in &self.entries {
            let Some(rest) = member_of(key, prefix) else {
                continue;
            };
            if rest.contains('.') {
                return Err(ParamError::invalid(
                    key,
                    format!(
                        "{key} is not a valid member of the list {prefix}: expected {prefix}.N"
                    ),
                ));
            }
            items.push((parse_index(key, prefix, rest)?, value.clone()));
        }
        // Stable sort: a duplicate index cannot occur because keys are unique and indices have no
        // leading zeros.
        items.sort_by_key(|(index, _)| *index);
        Ok(items.into_iter().map(|(_, value)| value).collect())
    }

    /// The structures `prefix.1.*`, `prefix.2.*`, … ordered by index, each with its members under
    /// relative names (`Filter.1.Value.2` becomes `Value.2` in the first element).
    ///
    /// `prefix.N` without a member, or an index that is not a positive integer, is refused.
    pub fn structs(&self, prefix: &str) -> Result<Vec<Params>, ParamError> {
        let mut groups: Vec<(u32, Params)> = Vec::new();
        let mut by_index: HashMap<u32, usize> = HashMap::new();
        for (key, value) in &self.entries {
            let Some(rest) = member_of(key, prefix) else {
                continue;
            };
            let Some((index, member)) = rest.split_once('.').filter(|(_, m)| !m.is_empty()) else {
                return Err(ParamError::invalid(
                    key,
                    format!(
                        "{key} is not a valid member of {prefix}: expected {prefix}.N.MemberName"
                    ),
                ));
            };
            let index = parse_index(key, prefix, index)?;
            let slot = *by_index.entry(index).or_insert_with(|| {
                groups.push((index, Params::default()));
                groups.len() - 1
            });
            groups[slot].1.insert(member.to_owned(), value.clone());
        }
        groups.sort_by_key(|(index, _)| *index);
        Ok(groups.into_iter().map(|(_, params)| params).collect())
    }

    /// The members of the plain structure `prefix.*` (`Placement.AvailabilityZone` becomes
    /// `AvailabilityZone`), or `None` when no such key is present.
    pub fn nested(&self, prefix: &str) -> Option<Params> {
        let mut out = Params::default();
        for (key, value) in &self.entries {
            if let Some(member) = member_of(key, prefix).filter(|m| !m.is_empty()) {
                out.insert(member.to_owned(), value.clone());
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// A boolean parameter: `true`/`false` in any case; absent is `None`, anything else is invalid.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ParamError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        if value.eq_ignore_ascii_case("true") {
            Ok(Some(true))
        } else if value.eq_ignore_ascii_case("false") {
            Ok(Some(false))
        } else {
            Err(ParamError::invalid(
                name,
                format!("Invalid value '{value}' for {name}. Expected 'true' or 'false'."),
            ))
        }
    }

    /// A numeric parameter parsed with `T::from_str`; absent is `None`, unparsable is invalid.
    pub fn int<T: FromStr>(&self, name: &str) -> Result<Option<T>, ParamError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        value.parse().map(Some).map_err(|_| {
            ParamError::invalid(
                name,
                format!("Invalid value '{value}' for {name}. Expected an integer in range."),
            )
        })
    }

    /// The `Action` parameter.
    pub fn action(&self) -> Option<&str> {
        self.get("Action")
    }

    /// All keys, in the order they first appeared.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(key, _)| key.as_str())
    }

    /// All `(key, value)` pairs, in the order the keys first appeared.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of distinct keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no parameters at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Params {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Params {
        let mut params = Params::default();
        for (key, value) in iter {
            params.insert(key.into(), value.into());
        }
        params
    }
}

/// The part of `key` after `prefix.`, or `None` when `key` is not under `prefix`.
fn member_of<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?.strip_prefix('.')
}

/// Parses a list index: a positive decimal integer without sign or leading zeros (which would let
/// two keys such as `.1` and `.01` claim the same position).
fn parse_index(key: &str, prefix: &str, index: &str) -> Result<u32, ParamError> {
    let valid =
        !index.is_empty() && !index.starts_with('0') && index.bytes().all(|b| b.is_ascii_digit());
    match index.parse::<u32>() {
        Ok(n) if valid => Ok(n),
        _ => Err(ParamError::invalid(
            key,
            format!("Invalid index '{index}' in {key}: members of {prefix} are numbered from 1"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Params {
        Params::parse(s.as_bytes())
    }

    #[test]
    fn parse_decodes_plus_and_percent() {
        let params = p("Action=RunInstances&UserData=aGk%3D&Name=web+server&Tag=a%2Bb&Empty=&Bare");
        assert_eq!(params.action(), Some("RunInstances"));
        assert_eq!(params.get("UserData"), Some("aGk="));
        assert_eq!(params.get("Name"), Some("web server"));
        assert_eq!(params.get("Tag"), Some("a+b"));
        assert_eq!(params.get("Empty"), Some(""));
        assert_eq!(params.get("Bare"), Some(""));
        assert_eq!(params.get("Missing"), None);
        assert_eq!(params.len(), 6);
    }

    #[test]
    fn parse_decodes_utf8_and_survives_invalid_utf8() {
        let params = p("Key=%E1%88%B4&Bad=%FF%FE&%ZZ=x");
        assert_eq!(params.get("Key"), Some("\u{1234}"));
        assert_eq!(params.get("Bad"), Some("\u{FFFD}\u{FFFD}"));
        // A malformed escape is kept literally rather than refused.
        assert_eq!(params.get("%ZZ"), Some("x"));
    }

    #[test]
    fn repeated_key_last_value_wins_first_position_kept() {
        let params = p("A=1&B=2&A=3");
        assert_eq!(params.get("A"), Some("3"));
        assert_eq!(params.keys().collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(params.iter().collect::<Vec<_>>(), [("A", "3"), ("B", "2")]);
    }

    #[test]
    fn many_keys_are_found_and_replaced_on_both_sides_of_the_index() {
        // Keys 1..=40 in order, then every one again: the second value replaces the first in
        // place, whether the key came before the index was built or after.
        let count = 2 * LINEAR_MAX + 8;
        let first: Vec<String> = (1..=count).map(|i| format!("K.{i}=a{i}")).collect();
        let again: Vec<String> = (1..=count).rev().map(|i| format!("K.{i}=b{i}")).collect();
        for boundary in [LINEAR_MAX - 1, LINEAR_MAX, LINEAR_MAX + 1, count] {
            // The query string holds the first `boundary` keys, the body the rest and the repeats.
            let mut params = p(&first[..boundary].join("&"));
            params.extend_urlencoded(first[boundary..].join("&").as_bytes());
            for i in 1..=count {
                assert_eq!(
                    params.get(&format!("K.{i}")),
                    Some(format!("a{i}").as_str())
                );
            }
            params.extend_urlencoded(again.join("&").as_bytes());
            assert_eq!(params.len(), count, "boundary {boundary}");
            let expected: Vec<String> = (1..=count).map(|i| format!("b{i}")).collect();
            assert_eq!(params.list("K").unwrap(), expected, "boundary {boundary}");
            let keys: Vec<String> = (1..=count).map(|i| format!("K.{i}")).collect();
            assert_eq!(
                params.keys().collect::<Vec<_>>(),
                keys,
                "boundary {boundary}"
            );
            assert_eq!(params.get("K.0"), None);
            assert_eq!(params.get(&format!("K.{}", count + 1)), None);
        }
    }

    #[test]
    fn empty_input_has_no_params() {
        let params = p("");
        assert!(params.is_empty());
        assert_eq!(params.action(), None);
        assert_eq!(params.list("InstanceId").unwrap(), Vec::<String>::new());
        assert!(params.structs("Filter").unwrap().is_empty());
    }

    #[test]
    fn required_refuses_missing_and_empty() {
        let params = p("ImageId=ami-1&KeyName=");
        assert_eq!(params.required("ImageId").unwrap(), "ami-1");
        for name in ["KeyName", "InstanceType"] {
            let err = params.required(name).unwrap_err();
            assert_eq!(err, ParamError::Missing(name.into()));
            assert_eq!(err.code(), "MissingParameter");
            assert_eq!(err.http_status(), 400);
            assert_eq!(
                err.to_string(),
                format!("The request must contain the parameter {name}")
            );
        }
    }

    #[test]
    fn list_sorts_numerically_with_gaps() {
        let mut query = String::new();
        for i in (1..=12).rev() {
            query.push_str(&format!("InstanceId.{i}=i-{i}&"));
        }
        query.push_str("InstanceIdx.1=other&InstanceId=bare&Other.1=x");
        let ids = p(&query).list("InstanceId").unwrap();
        let expected: Vec<String> = (1..=12).map(|i| format!("i-{i}")).collect();
        assert_eq!(ids, expected);

        let gaps = p("InstanceId.10=c&InstanceId.2=b&InstanceId.9=x&InstanceId.1=a")
            .list("InstanceId")
            .unwrap();
        assert_eq!(gaps, ["a", "b", "x", "c"]);
    }

    #[test]
    fn list_refuses_garbage_indices() {
        for bad in [
            "InstanceId.0=x",
            "InstanceId.x=x",
            "InstanceId.-1=x",
            "InstanceId.+1=x",
            "InstanceId.01=x",
            "InstanceId.=x",
            "InstanceId.1%20=x",
            "InstanceId.99999999999=x",
            "InstanceId.1.Foo=x",
        ] {
            let err = p(bad).list("InstanceId").unwrap_err();
            assert_eq!(err.code(), "InvalidParameterValue", "{bad}");
            assert!(
                matches!(&err, ParamError::Invalid { name, .. } if name.starts_with("InstanceId."))
            );
        }
    }

    #[test]
    fn structs_group_members_by_index() {
        let params = p("Action=DescribeInstances\
            &Filter.2.Name=instance-state-name&Filter.2.Value.1=running\
            &Filter.1.Name=tag%3AName&Filter.1.Value.2=db+%26+cache&Filter.1.Value.1=web+server\
            &Filter.10.Name=late");
        let filters = params.structs("Filter").unwrap();
        assert_eq!(filters.len(), 3);
        assert_eq!(filters[0].get("Name"), Some("tag:Name"));
        assert_eq!(
            filters[0].list("Value").unwrap(),
            ["web server", "db & cache"]
        );
        assert_eq!(filters[1].get("Name"), Some("instance-state-name"));
        assert_eq!(filters[1].list("Value").unwrap(), ["running"]);
        assert_eq!(filters[2].get("Name"), Some("late"));
        assert!(filters[2].list("Value").unwrap().is_empty());
    }

    #[test]
    fn structs_nest_twice() {
        let params = p("TagSpecification.1.ResourceType=instance\
            &TagSpecification.1.Tag.1.Key=Name&TagSpecification.1.Tag.1.Value=web\
            &TagSpecification.1.Tag.2.Key=env&TagSpecification.1.Tag.2.Value=\
            &IpPermissions.1.IpRanges.1.CidrIp=0.0.0.0%2F0");
        let specs = params.structs("TagSpecification").unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].get("ResourceType"), Some("instance"));
        let tags = specs[0].structs("Tag").unwrap();
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0].required("Key").unwrap(), "Name");
        assert_eq!(tags[0].get("Value"), Some("web"));
        assert_eq!(tags[1].required("Key").unwrap(), "env");
        assert_eq!(tags[1].get("Value"), Some(""));

        let perms = params.structs("IpPermissions").unwrap();
        let ranges = perms[0].structs("IpRanges").unwrap();
        assert_eq!(ranges[0].get("CidrIp"), Some("0.0.0.0/0"));
    }

    #[test]
    fn structs_refuse_bad_shapes() {
        for bad in [
            "Filter.1=x",
            "Filter.1.=x",
            "Filter.a.Name=x",
            "Filter.0.Name=x",
        ] {
            let err = p(bad).structs("Filter").unwrap_err();
            assert_eq!(err.code(), "InvalidParameterValue", "{bad}");
        }
    }

    #[test]
    fn nested_plain_structure() {
        let params = p(
            "Placement.AvailabilityZone=canopy-1a&Placement.Tenancy=default\
            &BlockDeviceMapping.1.Ebs.VolumeSize=20",
        );
        let placement = params.nested("Placement").unwrap();
        assert_eq!(placement.get("AvailabilityZone"), Some("canopy-1a"));
        assert_eq!(placement.get("Tenancy"), Some("default"));
        assert!(params.nested("Monitoring").is_none());

        let bdm = params.structs("BlockDeviceMapping").unwrap();
        let ebs = bdm[0].nested("Ebs").unwrap();
        assert_eq!(ebs.int::<u32>("VolumeSize").unwrap(), Some(20));
    }

    #[test]
    fn bool_values() {
        let params = p("A=true&B=FALSE&C=True&D=yes&E=&F=1");
        assert_eq!(params.bool("A").unwrap(), Some(true));
        assert_eq!(params.bool("B").unwrap(), Some(false));
        assert_eq!(params.bool("C").unwrap(), Some(true));
        assert_eq!(params.bool("Missing").unwrap(), None);
        for bad in ["D", "E", "F"] {
            let err = params.bool(bad).unwrap_err();
            assert_eq!(err.code(), "InvalidParameterValue");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn int_values() {
        let params = p("MaxResults=5&MinCount=-1&Big=99999999999&Junk=5x&Empty=");
        assert_eq!(params.int::<u32>("MaxResults").unwrap(), Some(5));
        assert_eq!(params.int::<i64>("MinCount").unwrap(), Some(-1));
        assert_eq!(params.int::<u32>("Absent").unwrap(), None);
        assert_eq!(params.int::<u64>("Big").unwrap(), Some(99_999_999_999));
        for bad in ["MinCount", "Big", "Junk", "Empty"] {
            let err = params.int::<u32>(bad).unwrap_err();
            assert!(
                matches!(&err, ParamError::Invalid { name, .. } if name == bad),
                "{err:?}"
            );
        }
    }

    #[test]
    fn from_iterator_builds_params() {
        let params: Params = [("Action", "DescribeRegions"), ("Version", "2016-11-15")]
            .into_iter()
            .collect();
        assert_eq!(params.action(), Some("DescribeRegions"));
        assert_eq!(params.get("Version"), Some(crate::API_VERSION));
    }
}
