//! A decoder of the chunked transfer coding (RFC 9112 §7.1) that checks the
//! framing and discards the data: what `action = "http"` needs to find where a
//! chunked request body ends.
//!
//! ```text
//! chunked-body    = *chunk last-chunk trailer-section CRLF
//! chunk           = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size      = 1*HEXDIG
//! last-chunk      = 1*("0") [ chunk-ext ] CRLF
//! chunk-ext       = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
//! trailer-section = *( field-line CRLF )
//! ```
//!
//! A state machine fed any split of the input: the same bytes give the same
//! result whatever the read boundaries. Strict where framing is at stake (CRLF
//! only, never a bare LF; no obs-fold in trailers) and bounded: a chunk-size of at
//! most [`MAX_SIZE_DIGITS`] hex digits, a chunk line (size and extensions) of at
//! most [`MAX_CHUNK_LINE`] bytes, a trailer section of at most
//! [`super::MAX_HEAD_BYTES`] bytes and [`super::MAX_HEADERS`] field lines. The
//! chunk data itself is skipped without a bound of its own.

use super::http::{MAX_HEADERS, MAX_HEAD_BYTES};

/// Most hex digits of a chunk-size (count): 16 fill a u64, so no size overflows.
pub const MAX_SIZE_DIGITS: u8 = 16;
/// Longest chunk line, chunk-size and extensions, without its CRLF (bytes).
pub const MAX_CHUNK_LINE: usize = 4096;

/// Why a chunked body was refused (the request gets 400 and the connection
/// closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// The bytes do not follow the grammar (a bad size, a bare LF, a missing
    /// CRLF after the data, a bad trailer field line).
    Malformed,
    /// A bound was passed: chunk-size digits, chunk line length, trailer size or
    /// trailer field count.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Reading chunk-size hex digits.
    Size,
    /// Whitespace after the size: only `;` may follow (BWS before a chunk-ext).
    ExtBws,
    /// Inside the extensions, until CR.
    Ext,
    /// CR of the chunk line seen: LF must follow.
    SizeLf,
    /// Skipping chunk data.
    Data,
    /// After the data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer field line or of the final CRLF.
    TrailerStart,
    /// A trailer field name (tchar), until `:`.
    TrailerName,
    /// A trailer field value, until CR.
    TrailerValue,
    /// CR of a trailer field line seen: LF must follow.
    TrailerLf,
    /// CR of the final CRLF seen: LF ends the body.
    EndLf,
    /// The body has ended.
    Done,
}

/// The state of one chunked body being decoded and discarded.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    st: St,
    /// The chunk-size being read, then the data bytes left in the chunk.
    size: u64,
    /// Hex digits read of the chunk-size (count).
    digits: u8,
    /// Bytes of the current chunk line (without CRLF).
    line: usize,
    /// Bytes of the trailer section so far.
    trailer_bytes: usize,
    /// Trailer field lines so far (count).
    trailer_fields: usize,
    /// Bytes of the current trailer field name.
    name: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            st: St::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
            name: 0,
        }
    }
}

/// tchar of RFC 9110 §5.6.2.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What may stand in an extension or a field value: VCHAR, SP, HTAB, obs-text.
fn text(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    /// Whether the whole body (last chunk, trailers, final CRLF) has been read.
    pub fn done(&self) -> bool {
        self.st == St::Done
    }

    /// Consumes the body bytes at the start of `data`; returns how many it took
    /// (all of `data` unless the body ended inside it: then the bytes after the
    /// final CRLF belong to the next request).
    ///
    /// # Errors
    /// [`ChunkError`] when the bytes break the grammar or a bound; the decoder
    /// must not be fed again.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            if self.st == St::Done {
                return Ok(i);
            }
            if self.st == St::Data {
                let n = self.size.min((data.len() - i) as u64);
                self.size -= n;
                i += n as usize;
                if self.size == 0 {
                    self.st = St::DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.step(b)?;
        }
        Ok(i)
    }

    /// One byte outside chunk data.
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use ChunkError::{Malformed, TooLarge};
        match self.st {
            St::Size | St::ExtBws | St::Ext if b != b'\r' => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(TooLarge);
                }
            }
            St::TrailerStart | St::TrailerName | St::TrailerValue | St::TrailerLf | St::EndLf => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_HEAD_BYTES {
                    return Err(TooLarge);
                }
            }
            _ => {}
        }
        self.st = match (self.st, b) {
            (St::Size, _) if b.is_ascii_hexdigit() => {
                if self.digits == MAX_SIZE_DIGITS {
                    return Err(TooLarge);
                }
                self.digits += 1;
                // At most 16 digits: no overflow.
                self.size = (self.size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
                St::Size
            }
            (St::Size, _) if self.digits == 0 => return Err(Malformed),
            (St::Size | St::ExtBws, b' ' | b'\t') => St::ExtBws,
            (St::Size | St::ExtBws, b';') => St::Ext,
            (St::Size | St::Ext, b'\r') => St::SizeLf,
            (St::Ext, _) if text(b) => St::Ext,
            (St::SizeLf, b'\n') => {
                self.line = 0;
                self.digits = 0;
                if self.size == 0 {
                    St::TrailerStart
                } else {
                    St::Data
                }
            }
            (St::DataCr, b'\r') => St::DataLf,
            (St::DataLf, b'\n') => St::Size,
            (St::TrailerStart, b'\r') => St::EndLf,
            (St::TrailerStart, _) if tchar(b) => {
                self.trailer_fields += 1;
                if self.trailer_fields > MAX_HEADERS {
                    return Err(TooLarge);
                }
                self.name = 1;
                St::TrailerName
            }
            (St::TrailerName, b':') => St::TrailerValue,
            (St::TrailerName, _) if tchar(b) => {
                self.name += 1;
                St::TrailerName
            }
            (St::TrailerValue, b'\r') => St::TrailerLf,
            (St::TrailerValue, _) if text(b) => St::TrailerValue,
            (St::TrailerLf, b'\n') => St::TrailerStart,
            (St::EndLf, b'\n') => St::Done,
            _ => return Err(Malformed),
        };
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Feeds `data` whole; returns (consumed, done) or the error.
    fn whole(data: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let n = d.feed(data)?;
        Ok((n, d.done()))
    }

    /// Feeds `data` cut at `cuts` (sorted offsets), stopping when done.
    fn split(data: &[u8], cuts: &[usize]) -> Result<(usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut pos = 0;
        let mut used = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            if c < pos {
                continue;
            }
            let n = d.feed(&data[pos..c])?;
            used += n;
            if d.done() {
                return Ok((used, true));
            }
            pos = c;
        }
        Ok((used, d.done()))
    }

    #[test]
    fn simple_body_then_next_request() {
        let body = b"5\r\nhello\r\n6;name=val;x\r\n world\r\n0\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let all = [&body[..], &next[..]].concat();
        assert_eq!(whole(&all), Ok((body.len(), true)));
        // Byte by byte.
        let cuts: Vec<usize> = (1..all.len()).collect();
        assert_eq!(split(&all, &cuts), Ok((body.len(), true)));
    }

    #[test]
    fn trailers_and_big_sizes() {
        let body = b"0000A\r\n0123456789\r\n0;last\r\nX-Sum: 1\r\nEtag:\"a\"\r\n\r\n";
        assert_eq!(whole(body), Ok((body.len(), true)));
        // 16 digits are fine (the data just is not there yet).
        assert_eq!(whole(b"ffffffffffffffff\r\nab"), Ok((20, false)));
    }

    #[test]
    fn malformed_and_oversized() {
        use ChunkError::*;
        for (bad, err) in [
            (&b"x\r\n"[..], Malformed),
            (b"\r\n", Malformed),
            (b"5\nhello\r\n", Malformed),           // bare LF
            (b"5\r\nhelloX\r\n", Malformed),        // no CRLF after data
            (b"5 \r\nhello\r\n", Malformed),        // BWS without an extension
            (b"-5\r\n", Malformed),                 // sign
            (b"0x5\r\n", Malformed),                // prefix
            (b"5;a\x00b\r\n", Malformed),           // CTL in an extension
            (b"0\r\n folded\r\n\r\n", Malformed),   // obs-fold in trailers
            (b"0\r\n: novalue\r\n\r\n", Malformed), // empty field name
            (b"0\r\nName\r\n\r\n", Malformed),      // no colon
            (b"0\r\n\r\r", Malformed),              // final CRLF broken
            (b"10000000000000000\r\n", TooLarge),   // 17 digits
            (b"00000000000000001\r\n", TooLarge),   // leading zeros count too
        ] {
            assert_eq!(
                whole(bad).err(),
                Some(err),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_ext = [&b"1;"[..], &vec![b'a'; MAX_CHUNK_LINE], b"\r\n"].concat();
        assert_eq!(whole(&long_ext).err(), Some(TooLarge));
        let many = [&b"0\r\n"[..], &b"a: b\r\n".repeat(MAX_HEADERS + 1), b"\r\n"].concat();
        assert_eq!(whole(&many).err(), Some(TooLarge));
        let big = [&b"0\r\nx: "[..], &vec![b'v'; MAX_HEAD_BYTES], b"\r\n\r\n"].concat();
        assert_eq!(whole(&big).err(), Some(TooLarge));
    }

    /// A small xorshift generator.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// A random valid chunked body: sizes in upper or lower case with leading
    /// zeros, extensions, trailers.
    fn body(rng: &mut Rng) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..rng.below(6) {
            let n = 1 + rng.below(300);
            let size = if rng.below(2) == 0 {
                format!("{n:x}")
            } else {
                format!("{:0w$X}", n, w = 1 + rng.below(8))
            };
            b.extend_from_slice(size.as_bytes());
            if rng.below(3) == 0 {
                b.extend_from_slice(b" ;ext=\"q v\"; e2");
            }
            b.extend_from_slice(b"\r\n");
            b.extend((0..n).map(|i| (i * 7) as u8));
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(&b"0".repeat(1 + rng.below(3)));
        if rng.below(3) == 0 {
            b.extend_from_slice(b";end");
        }
        b.extend_from_slice(b"\r\n");
        for i in 0..rng.below(4) {
            b.extend_from_slice(format!("X-T{i}: v {i}\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b
    }

    /// Randomized: a valid body followed by other bytes, and a corrupted copy,
    /// give the same result (bytes consumed, done, or the same error) fed whole
    /// and fed in random pieces.
    #[test]
    fn same_result_whatever_the_read_boundaries() {
        for seed in 1..=3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let b = body(&mut rng);
            let mut all = b.clone();
            all.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            if rng.below(2) == 0 {
                // Corrupt one byte: the result may be an error or not, but must
                // not depend on the split.
                let at = rng.below(all.len());
                all[at] = [b'\n', b'\r', b'z', b' ', b'0', 0][rng.below(6)];
            } else {
                assert_eq!(whole(&all), Ok((b.len(), true)), "seed {seed}");
            }
            let mut cuts: Vec<usize> = (0..rng.below(12)).map(|_| rng.below(all.len())).collect();
            cuts.sort_unstable();
            assert_eq!(
                split(&all, &cuts),
                whole(&all),
                "seed {seed}, cuts {cuts:?}"
            );
        }
    }
}
