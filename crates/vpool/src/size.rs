//! Sizes as people type and read them: `512`, `4K`, `20G`, `1.5T`, in
//! binary units (K = 1024). Decimal units (`GB`) are refused rather than
//! guessed at, since 20 GB and 20 GiB differ by 7%.

use vpool_engine::{BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES};

/// The units accepted after a number, with their multipliers.
const UNITS: [(&str, u64); 6] = [
    ("", 1),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
    ("P", 1 << 50),
];

/// Most digits accepted after the decimal point; more is never meaningful
/// for a size and would only risk overflow.
const MAX_FRACTION_DIGITS: u32 = 9;

/// Parses a size in bytes: digits, an optional fraction, an optional binary
/// unit (`K`, `M`, `G`, `T`, `P`, also as `KiB`…, case-insensitive) and an
/// optional `B` for plain bytes. The result must be a whole number of bytes.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(num_end);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!(
            "{input:?} is not a size: expected a number like 512, 4K, 20G or 1.5T"
        ));
    }
    let upper = unit.to_ascii_uppercase();
    let letter = match upper.as_str() {
        "" | "B" => "",
        u if u.len() == 3 && u.ends_with("IB") => &u[..1],
        u if u.len() == 2 && u.ends_with('B') => {
            return Err(format!(
                "{input:?}: decimal units like {unit:?} are ambiguous; use binary units such as {num}{} or {num}{}iB",
                &u[..1],
                &u[..1]
            ));
        }
        u => u,
    };
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == letter)
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            format!("{input:?}: unknown unit {unit:?}; use K, M, G, T or P (binary: 1K = 1024)")
        })?;
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(format!("{input:?} is not a number"));
    }
    let frac_digits = u32::try_from(frac_part.len()).unwrap_or(u32::MAX);
    if frac_digits > MAX_FRACTION_DIGITS {
        return Err(format!(
            "{input:?}: too many digits after the decimal point"
        ));
    }
    let too_big = || format!("{input:?} is too large");
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_big())?
    };
    let frac: u128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| too_big())?
    };
    let scale = 10u128.pow(frac_digits);
    // (int + frac/scale) * mult, exactly, in 128 bits.
    let scaled = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(u128::from(mult)))
        .ok_or_else(too_big)?;
    if scaled % scale != 0 {
        return Err(format!("{input:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_big())
}

/// Parses a volume size: a [`parse_size`] that is a positive multiple of
/// the pool's 4 KiB block, and within the pool's limit.
pub fn parse_volume_size(input: &str) -> Result<u64, String> {
    let bytes = parse_size(input)?;
    check_volume_size(bytes).map_err(|e| format!("{input:?}: {e}"))?;
    Ok(bytes)
}

/// Checks that `bytes` can be a volume's size.
pub fn check_volume_size(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Err("a volume size must be more than 0".into());
    }
    if !bytes.is_multiple_of(BLOCK_SIZE) {
        let up = round_up_to_block(bytes).unwrap_or(bytes);
        return Err(format!(
            "{bytes} bytes is not a multiple of {BLOCK_SIZE} (4K); the next size that is: {} ({up} bytes)",
            format_size(up)
        ));
    }
    if bytes > MAX_VOLUME_SIZE_BYTES {
        return Err(format!(
            "{} is over the limit of {}",
            format_size(bytes),
            format_size(MAX_VOLUME_SIZE_BYTES)
        ));
    }
    Ok(())
}

/// `bytes` rounded up to a whole number of blocks; `None` on overflow.
pub fn round_up_to_block(bytes: u64) -> Option<u64> {
    bytes.checked_next_multiple_of(BLOCK_SIZE)
}

/// Formats bytes for people: `512 B`, `4 KiB`, `1.5 GiB`, `20 GiB`. Up to
/// two decimals, trailing zeros dropped; the largest unit that keeps the
/// number at least 1.
pub fn format_size(bytes: u64) -> String {
    const NAMES: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut idx = 0;
    while idx + 1 < NAMES.len() && bytes >= 1u64 << (10 * (idx + 1)) {
        idx += 1;
    }
    if idx == 0 {
        return format!("{bytes} B");
    }
    let unit = 1u64 << (10 * idx);
    // Hundredths, rounded to nearest, in integers so 1.5 prints as 1.5.
    let hundredths = (u128::from(bytes) * 100 + u128::from(unit) / 2) / u128::from(unit);
    let whole = hundredths / 100;
    let frac = hundredths % 100;
    let name = NAMES[idx];
    if frac == 0 {
        format!("{whole} {name}")
    } else if frac % 10 == 0 {
        format!("{whole}.{} {name}", frac / 10)
    } else {
        format!("{whole}.{frac:02} {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20 G"), Ok(20 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size(" 8M "), Ok(8 << 20));
    }

    #[test]
    fn refuses_bad_sizes() {
        for bad in [
            "",
            "G",
            "abc",
            "1.2.3G",
            "4X",
            "-4K",
            "1.K.",
            ".",
            "4 KB",
            "4GB",
            "1.0000000001K",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_size("4GB").unwrap_err().contains("binary"));
        assert!(parse_size("0.1K").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999999999999999999").is_err());
        assert!(parse_size("16384P").is_err(), "over u64");
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn volume_sizes_are_block_multiples() {
        assert_eq!(parse_volume_size("4K"), Ok(4096));
        assert_eq!(parse_volume_size("1.5T"), Ok(3 << 39));
        let e = parse_volume_size("512").unwrap_err();
        assert!(e.contains("not a multiple of 4096"), "{e}");
        assert!(e.contains("4 KiB"), "suggests the next size: {e}");
        assert!(parse_volume_size("0").is_err());
        assert!(parse_volume_size("2P").unwrap_err().contains("limit"));
    }

    #[test]
    fn rounds_up_to_blocks() {
        assert_eq!(round_up_to_block(0), Some(0));
        assert_eq!(round_up_to_block(1), Some(4096));
        assert_eq!(round_up_to_block(4096), Some(4096));
        assert_eq!(round_up_to_block(4097), Some(8192));
        assert_eq!(round_up_to_block(u64::MAX), None);
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(20 << 30), "20 GiB");
        assert_eq!(format_size(3 << 39), "1.5 TiB");
        assert_eq!(format_size(1536 * 1024 + 10), "1.5 MiB");
        assert_eq!(format_size((1 << 30) + (1 << 30) / 4), "1.25 GiB");
        assert_eq!(format_size(u64::MAX), "16384 PiB");
    }

    #[test]
    fn format_then_parse_round_trips_exact_sizes() {
        for b in [4096u64, 8 << 20, 20 << 30, 3 << 39, 1 << 50] {
            let s = format_size(b).replace(' ', "");
            assert_eq!(parse_size(&s), Ok(b), "{s}");
        }
    }
}
