//! Single byte-range requests (`Range: bytes=a-b | a- | -n`) on blobs.

use std::ops::Range;

#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range header: send everything.
    Full,
    /// Send these bytes with 206.
    Partial(Range<u64>),
    /// A well-formed range outside the blob: 416.
    Unsatisfiable,
}

/// Reads a Range header for a blob of `len` bytes. Headers this registry
/// does not serve (other units, several ranges, bad syntax) are ignored, as
/// RFC 9110 allows, and the whole blob is sent.
pub fn parse(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (start.trim(), end.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(len.saturating_sub(n)..len),
            None => RangeRequest::Full,
        },
        (first, "") => match num(first) {
            Some(a) if a < len => RangeRequest::Partial(a..len),
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Full,
        },
        (first, last) => match (num(first), num(last)) {
            (Some(a), Some(b)) if a > b => RangeRequest::Full,
            (Some(a), Some(_)) if a >= len => RangeRequest::Unsatisfiable,
            (Some(a), Some(b)) => RangeRequest::Partial(a..b.saturating_add(1).min(len)),
            _ => RangeRequest::Full,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeRequest::*;

    #[test]
    fn forms() {
        assert_eq!(parse(None, 10), Full);
        assert_eq!(parse(Some("bytes=0-3"), 10), Partial(0..4));
        assert_eq!(parse(Some("bytes=5-"), 10), Partial(5..10));
        assert_eq!(parse(Some("bytes=-3"), 10), Partial(7..10));
        assert_eq!(parse(Some("bytes=-30"), 10), Partial(0..10));
        assert_eq!(parse(Some("bytes=8-100"), 10), Partial(8..10));
        assert_eq!(parse(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse(Some("bytes=-1"), 0), Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(parse(Some("items=0-1"), 10), Full);
        assert_eq!(parse(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse(Some("bytes=x-2"), 10), Full);
        assert_eq!(parse(Some("bytes=99999999999999999999999-"), 10), Full);
        assert_eq!(
            parse(Some("bytes=100-18446744073709551615"), 10),
            Unsatisfiable
        );
        assert_eq!(
            parse(Some("bytes=0-18446744073709551615"), 10),
            Partial(0..10)
        );
        assert_eq!(
            parse(Some("bytes=-18446744073709551615"), 10),
            Partial(0..10)
        );
    }

    /// A partial answer is never empty and never past the end.
    fn check(request: RangeRequest, len: u64) -> Result<(), TestCaseError> {
        if let Partial(r) = request {
            prop_assert!(r.start < r.end && r.end <= len, "{r:?} of {len}");
        }
        Ok(())
    }

    use proptest::prelude::*;
    proptest! {
        #[test]
        fn any_text_is_safe(header in "\\PC{0,40}", len in any::<u64>()) {
            check(parse(Some(&header), len), len)?;
        }

        #[test]
        fn any_numbers_are_safe(
            a in any::<u64>(),
            b in any::<u64>(),
            len in prop_oneof![0..1000u64, any::<u64>()],
        ) {
            for header in [format!("bytes={a}-{b}"), format!("bytes={a}-"), format!("bytes=-{b}")] {
                check(parse(Some(&header), len), len)?;
            }
            if a <= b && a < len {
                prop_assert_eq!(
                    parse(Some(&format!("bytes={a}-{b}")), len),
                    Partial(a..b.saturating_add(1).min(len))
                );
            }
        }
    }
}
