//! `MaxResults` / `NextToken`. A token is the opaque position after the last item
//! returned; a client sees only base64.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use canopy_ec2_wire::params::Params;

use super::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub max: Option<usize>,
    /// Items with a key greater than this come next.
    pub after: Option<i64>,
}

/// Reads MaxResults (within `min..=max`) and NextToken.
pub fn parse_page(params: &Params, min: usize, max: usize) -> Result<Page, ApiError> {
    let max_results = params.int::<i64>("MaxResults")?;
    if let Some(m) = max_results
        && (m < min as i64 || m > max as i64)
    {
        return Err(ApiError::invalid(format!(
            "Value ( {m} ) for parameter maxResults is invalid. Expecting a value between {min} and {max}."
        )));
    }
    let after = match params.get("NextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(token) => Some(
            decode(token)
                .ok_or_else(|| ApiError::invalid(format!("Invalid NextToken: {token}")))?,
        ),
    };
    Ok(Page {
        max: max_results.map(|m| m as usize),
        after,
    })
}

pub fn encode(key: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("canopy:{key}"))
}

fn decode(token: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    std::str::from_utf8(&bytes)
        .ok()?
        .strip_prefix("canopy:")?
        .parse()
        .ok()
}

/// Takes one page of `items` (already in key order) and the token for the next, if any.
pub fn paginate<T>(items: Vec<T>, page: Page, key: impl Fn(&T) -> i64) -> (Vec<T>, Option<String>) {
    let mut rest: Vec<T> = match page.after {
        Some(after) => items.into_iter().filter(|i| key(i) > after).collect(),
        None => items,
    };
    match page.max {
        Some(max) if rest.len() > max => {
            rest.truncate(max);
            let token = rest.last().map(|i| encode(key(i)));
            (rest, token)
        }
        _ => (rest, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<i64> = (1..=12).collect();
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = paginate(
                items.clone(),
                Page {
                    max: Some(5),
                    after,
                },
                |i| *i,
            );
            seen.extend(page);
            match next {
                Some(t) => after = decode(&t),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn max_results_bounds_and_bad_tokens_are_refused() {
        assert!(parse_page(&Params::parse(b"MaxResults=4"), 5, 1000).is_err());
        assert!(parse_page(&Params::parse(b"MaxResults=1001"), 5, 1000).is_err());
        assert_eq!(
            parse_page(&Params::parse(b"MaxResults=5"), 5, 1000)
                .unwrap()
                .max,
            Some(5)
        );
        assert!(parse_page(&Params::parse(b"NextToken=garbage"), 5, 1000).is_err());
        let t = encode(7);
        let q = format!("NextToken={t}");
        assert_eq!(
            parse_page(&Params::parse(q.as_bytes()), 5, 1000)
                .unwrap()
                .after,
            Some(7)
        );
    }
}
