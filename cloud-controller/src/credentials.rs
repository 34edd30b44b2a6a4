//! New access keys, shaped like AWS's: an `AKIA` id of 16 more base-32 characters and a
//! 40-character secret.

use rand::Rng;

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

/// A fresh (access key id, secret access key).
pub fn new_access_key() -> (String, String) {
    (
        format!(
            "AKIA{}",
            random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)
        ),
        random_string(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            40,
        ),
    )
}

/// A bearer token for the admin API.
pub fn new_token() -> String {
    random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 48)
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_look_like_aws_keys_and_differ() {
        let (a, s) = super::new_access_key();
        assert!(a.starts_with("AKIA") && a.len() == 20, "{a}");
        assert_eq!(s.len(), 40);
        assert_ne!(super::new_access_key().0, a);
    }
}
