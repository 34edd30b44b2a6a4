//! EC2 response XML.
//!
//! EC2 responses put the members of the result directly under `<ActionResponse>` (no `Result`
//! wrapper), call every list element `<item>`, and clients need empty lists to be present as
//! `<name/>`: botocore turns an absent list into an absent key, which breaks client code that
//! indexes it. Errors use a different envelope, [`error_response`].

use std::borrow::Cow;
use std::fmt::{Display, Write as _};

use chrono::{DateTime, Utc};

use crate::XMLNS;

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// Builds one success response. Element names are trusted (they come from Canopy's code); all text
/// is escaped.
#[derive(Debug)]
pub struct XmlWriter {
    buf: String,
    root: String,
    /// The names of the open elements, innermost last, one after another; `open` holds where
    /// each begins. Two buffers rather than a `String` per element: a response opens dozens.
    names: String,
    open: Vec<usize>,
}

/// Room reserved for a response up front: one instance's `<item>` is about 2 KiB, and growing
/// the buffer from small copies it every time it doubles.
const INITIAL_CAPACITY: usize = 4096;

/// A [`std::fmt::Write`] that escapes what is written into it (see [`escape`]), so that text
/// is formatted straight into the response. Escaping works character by character, so
/// escaping each piece a formatter writes gives the same as escaping their concatenation.
struct Escaped<'a>(&'a mut String);

impl std::fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.push_str(&escape(s));
        Ok(())
    }
}

impl XmlWriter {
    /// Starts `<?xml version="1.0" encoding="UTF-8"?>` + `<{action}Response xmlns="…">` and writes
    /// `<requestId>`.
    ///
    /// `action` normally comes from the request's `Action` parameter; anything but ASCII letters
    /// and digits is dropped from the element name so that a hostile action cannot break the XML.
    pub fn response(action: &str, request_id: &str) -> XmlWriter {
        let root: String = action
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .chain("Response".chars())
            .collect();
        let mut buf = String::with_capacity(INITIAL_CAPACITY);
        buf.push_str(XML_DECL);
        let _ = write!(buf, "<{root} xmlns=\"{XMLNS}\">");
        let mut writer = XmlWriter {
            buf,
            root,
            names: String::new(),
            open: Vec::new(),
        };
        writer.elem("requestId", request_id);
        writer
    }

    /// `<name>text</name>`, with `text` escaped.
    pub fn elem(&mut self, name: &str, text: impl Display) -> &mut Self {
        debug_assert!(is_name(name), "invalid XML element name {name:?}");
        open_tag(&mut self.buf, name);
        self.text(text);
        close_tag(&mut self.buf, name);
        self
    }

    /// [`elem`](Self::elem) when `text` is `Some`, nothing when `None` (for optional members, which
    /// EC2 omits rather than sending empty).
    pub fn opt_elem(&mut self, name: &str, text: Option<impl Display>) -> &mut Self {
        if let Some(text) = text {
            self.elem(name, text);
        }
        self
    }

    /// `<name>true</name>` or `<name>false</name>`, the only spellings botocore accepts.
    pub fn bool_elem(&mut self, name: &str, v: bool) -> &mut Self {
        self.elem(name, if v { "true" } else { "false" })
    }

    /// Escaped character data inside the current element, e.g. the text of a string-list
    /// `<item>` written by [`XmlWriter::list`].
    pub fn text(&mut self, text: impl Display) -> &mut Self {
        let _ = write!(Escaped(&mut self.buf), "{text}");
        self
    }

    /// Opens `<name>`; close it with [`end`](Self::end).
    pub fn start(&mut self, name: &str) -> &mut Self {
        debug_assert!(is_name(name), "invalid XML element name {name:?}");
        open_tag(&mut self.buf, name);
        self.open.push(self.names.len());
        self.names.push_str(name);
        self
    }

    /// Closes the element opened last by [`start`](Self::start). Does nothing when none is open
    /// (a bug in the caller, but one that must not take the server down).
    pub fn end(&mut self) -> &mut Self {
        debug_assert!(!self.open.is_empty(), "XmlWriter::end without start");
        if let Some(at) = self.open.pop() {
            close_tag(&mut self.buf, &self.names[at..]);
            self.names.truncate(at);
        }
        self
    }

    /// `<name>`, whatever `f` writes, `</name>`.
    pub fn nested(&mut self, name: &str, f: impl FnOnce(&mut XmlWriter)) -> &mut Self {
        self.start(name);
        let depth = self.open.len();
        f(self);
        // Close whatever `f` left open so that its mistakes stay inside this element.
        while self.open.len() >= depth {
            self.end();
        }
        self
    }

    /// `<name>` + `<item>…</item>` per element (each written by `f`) + `</name>`, or `<name/>`
    /// when `items` is empty.
    pub fn list<T>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut XmlWriter, T),
    ) -> &mut Self {
        debug_assert!(is_name(name), "invalid XML element name {name:?}");
        let mut items = items.into_iter().peekable();
        if items.peek().is_none() {
            self.buf.push('<');
            self.buf.push_str(name);
            self.buf.push_str("/>");
            return self;
        }
        self.nested(name, |w| {
            for item in items {
                w.nested("item", |w| f(w, item));
            }
        })
    }

    /// Closes every open element and the root, and returns the document.
    pub fn finish(mut self) -> String {
        while !self.open.is_empty() {
            self.end();
        }
        close_tag(&mut self.buf, &self.root);
        self.buf
    }
}

/// The EC2 error document:
/// `<?xml…?><Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors><RequestID>…</RequestID></Response>`.
///
/// Note `RequestID` with a capital `ID`, unlike `requestId` in success responses: that is what EC2
/// sends and what botocore's error parser reads.
pub fn error_response(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "{XML_DECL}<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors>\
         <RequestID>{}</RequestID></Response>",
        escape(code),
        escape(message),
        escape(request_id)
    )
}

fn open_tag(buf: &mut String, name: &str) {
    buf.push('<');
    buf.push_str(name);
    buf.push('>');
}

fn close_tag(buf: &mut String, name: &str) {
    buf.push_str("</");
    buf.push_str(name);
    buf.push('>');
}

/// Escapes text for XML element content or attribute values.
///
/// `& < > " '` become entities. Characters XML 1.0 cannot represent at all (C0 controls other than
/// tab, newline and carriage return, U+FFFE, U+FFFF) are dropped: an escaped form such as `&#1;`
/// would still make the document ill-formed, and such characters can reach us from user data like
/// tag values. Carriage return is written as `&#13;` so that XML parsers, which turn a literal CR
/// into LF, give it back unchanged.
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs_work = |c: char| {
        matches!(
            c,
            '&' | '<' | '>' | '"' | '\'' | '\r' | '\u{FFFE}' | '\u{FFFF}'
        ) || (c < ' ' && c != '\t' && c != '\n')
    };
    let Some(first) = s.find(needs_work) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 16);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            '\t' | '\n' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// An EC2 timestamp: ISO 8601 in UTC with milliseconds, e.g. `2026-01-01T00:00:00.000Z`.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Whether `name` is a plain XML element name (the subset EC2 uses: ASCII letters, digits, `_`,
/// `-`, `.`, not starting with a digit, `-` or `.`).
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const HEAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

    #[test]
    fn escape_specials() {
        assert_eq!(escape(r#"a&b<c>d"e'f"#), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(escape("&&"), "&amp;&amp;");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn escape_borrows_when_clean() {
        assert!(matches!(escape("i-0123456789abcdef0"), Cow::Borrowed(_)));
        assert!(matches!(escape("tab\tand\nnewline ሴ"), Cow::Borrowed(_)));
        assert!(matches!(escape(""), Cow::Borrowed(_)));
        assert!(matches!(escape("a<b"), Cow::Owned(_)));
    }

    #[test]
    fn escape_drops_characters_xml_cannot_carry() {
        assert_eq!(escape("a\u{0}b\u{1}c\u{8}d\u{b}e\u{c}f\u{1f}g"), "abcdefg");
        assert_eq!(escape("x\u{FFFE}y\u{FFFF}z"), "xyz");
        assert_eq!(escape("line\r\nnext\ttab"), "line&#13;\nnext\ttab");
        // Multi-byte characters around a dropped one survive intact.
        assert_eq!(escape("ሴ\u{7}ሴ<"), "ሴሴ&lt;");
        // Other non-ASCII, including DEL and C1 controls, is legal XML 1.0 and kept.
        assert_eq!(escape("\u{7f}\u{85}\u{10FFFF}"), "\u{7f}\u{85}\u{10FFFF}");
    }

    #[test]
    fn timestamp_has_milliseconds() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(timestamp(t), "2026-01-01T00:00:00.000Z");
        let t = Utc.timestamp_millis_opt(1_767_323_045_123).unwrap();
        assert_eq!(timestamp(t), "2026-01-02T03:04:05.123Z");
        // Sub-millisecond precision is truncated, not rounded into a 4th digit.
        let t = Utc.timestamp_opt(0, 999_999_999).unwrap();
        assert_eq!(timestamp(t), "1970-01-01T00:00:00.999Z");
    }

    #[test]
    fn minimal_response() {
        let xml = XmlWriter::response("DescribeRegions", "req-1").finish();
        assert_eq!(
            xml,
            format!(
                "{HEAD}<DescribeRegionsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                 <requestId>req-1</requestId></DescribeRegionsResponse>"
            )
        );
    }

    #[test]
    fn golden_run_instances_shape() {
        let launch = Utc.with_ymd_and_hms(2026, 1, 1, 12, 30, 0).unwrap();
        let mut w = XmlWriter::response("RunInstances", "r-1");
        w.elem("reservationId", "r-0abc")
            .elem("ownerId", 123_456_789_012u64)
            .list("groupSet", Vec::<&str>::new(), |_, _: &str| {})
            .list("instancesSet", ["i-1", "i-2"], |w, id| {
                w.elem("instanceId", id)
                    .nested("instanceState", |w| {
                        w.elem("code", 0).elem("name", "pending");
                    })
                    .opt_elem("privateIpAddress", None::<&str>)
                    .opt_elem("keyName", Some("my<key>"))
                    .bool_elem("ebsOptimized", false)
                    .elem("launchTime", timestamp(launch))
                    .list("tagSet", [("Name", "a&b")], |w, (k, v)| {
                        w.elem("key", k).elem("value", v);
                    });
            });
        let xml = w.finish();
        let item = |id: &str| {
            format!(
                "<item><instanceId>{id}</instanceId>\
                 <instanceState><code>0</code><name>pending</name></instanceState>\
                 <keyName>my&lt;key&gt;</keyName><ebsOptimized>false</ebsOptimized>\
                 <launchTime>2026-01-01T12:30:00.000Z</launchTime>\
                 <tagSet><item><key>Name</key><value>a&amp;b</value></item></tagSet></item>"
            )
        };
        assert_eq!(
            xml,
            format!(
                "{HEAD}<RunInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                 <requestId>r-1</requestId><reservationId>r-0abc</reservationId>\
                 <ownerId>123456789012</ownerId><groupSet/><instancesSet>{}{}</instancesSet>\
                 </RunInstancesResponse>",
                item("i-1"),
                item("i-2")
            )
        );
    }

    #[test]
    fn text_written_in_pieces_is_escaped_as_a_whole() {
        // A Display that hands the formatter several pieces, specials at their edges.
        struct Pieces;
        impl Display for Pieces {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a<")?;
                f.write_str("&b\u{1}")?;
                let (n, cr) = (7, "\r");
                write!(f, "{n}'{cr}")
            }
        }
        let mut w = XmlWriter::response("A", "id");
        w.elem("x", Pieces).start("y").text(Pieces).end();
        let xml = w.finish();
        assert!(
            xml.ends_with(
                "<x>a&lt;&amp;b7&apos;&#13;</x><y>a&lt;&amp;b7&apos;&#13;</y></AResponse>"
            ),
            "{xml}"
        );
    }

    #[test]
    fn empty_list_is_self_closing() {
        let mut w = XmlWriter::response("DescribeInstances", "x");
        w.list("reservationSet", std::iter::empty::<u8>(), |_, _| {});
        assert!(
            w.finish()
                .contains("<requestId>x</requestId><reservationSet/></Describe")
        );
    }

    #[test]
    fn start_end_and_finish_close_everything() {
        let mut w = XmlWriter::response("A", "id");
        w.start("outer")
            .start("inner")
            .elem("x", 1)
            .end()
            .elem("y", 2);
        let xml = w.finish();
        assert!(
            xml.ends_with("<outer><inner><x>1</x></inner><y>2</y></outer></AResponse>"),
            "{xml}"
        );
    }

    #[test]
    fn nested_closes_what_the_closure_left_open() {
        let mut w = XmlWriter::response("A", "id");
        w.nested("outer", |w| {
            w.start("forgotten").elem("x", 1);
        })
        .elem("after", 2);
        let xml = w.finish();
        assert!(
            xml.ends_with(
                "<outer><forgotten><x>1</x></forgotten></outer><after>2</after></AResponse>"
            ),
            "{xml}"
        );
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn unbalanced_end_is_harmless_in_release() {
        let mut w = XmlWriter::response("A", "id");
        w.end().end();
        assert!(w.finish().ends_with("</AResponse>"));
    }

    #[test]
    fn hostile_action_and_request_id() {
        let xml = XmlWriter::response("Run\"><x>Instances", "<id>&").finish();
        assert!(xml.contains("<RunxInstancesResponse xmlns="), "{xml}");
        assert!(
            xml.contains("<requestId>&lt;id&gt;&amp;</requestId>"),
            "{xml}"
        );
        assert!(xml.ends_with("</RunxInstancesResponse>"));
    }

    #[test]
    fn error_document() {
        assert_eq!(
            error_response(
                "InvalidInstanceID.NotFound",
                "The instance ID 'i-1<' does not exist",
                "req-9"
            ),
            format!(
                "{HEAD}<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code>\
                 <Message>The instance ID &apos;i-1&lt;&apos; does not exist</Message></Error>\
                 </Errors><RequestID>req-9</RequestID></Response>"
            )
        );
    }

    #[test]
    fn element_names() {
        assert!(is_name("instancesSet"));
        assert!(is_name("item"));
        assert!(is_name("_x-y.z1"));
        assert!(!is_name(""));
        assert!(!is_name("1abc"));
        assert!(!is_name("a b"));
        assert!(!is_name("a<b"));
    }
}
