//! Sizes on the command line: `--memory 2G`, `--memory 512M`, `--disk 20G`.
//!
//! The suffixes K, M, G, T (also written KB, KiB, …, any case) are powers
//! of 1024, as QEMU reads `-m 2G` and qemu-img reads `20G`: memory and
//! disks are sized in binary units everywhere kumo's users meet them. A
//! plain number keeps the meaning it had before units were accepted: the
//! unit the API takes (MiB of memory, GiB of disk). Parsing is
//! `parse-size`'s; what is kumo's is the unit of a plain number and the
//! refusal of a size that is not a whole number of the API's unit.

/// The unit the API takes a size in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Mebibytes, 2^20 bytes (memory: `memory_mib`).
    MiB,
    /// Gibibytes, 2^30 bytes (disks: `disk_gib`).
    GiB,
}

impl Unit {
    fn bytes(self) -> u64 {
        match self {
            Unit::MiB => 1 << 20,
            Unit::GiB => 1 << 30,
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unit::MiB => "MiB",
            Unit::GiB => "GiB",
        })
    }
}

/// `text` as a whole number of `unit`s.
///
/// Errors (clap prints them after the flag's name and value): text that is
/// not a size, saying what is accepted; a size too large for 64 bits of
/// bytes; a size that is not a whole number of `unit`s (e.g. `1500K` of
/// memory), since the API takes whole units and kumo does not round.
pub fn parse(text: &str, unit: Unit) -> Result<u64, String> {
    let bytes = parse_size::Config::new()
        .with_binary()
        .with_default_factor(unit.bytes())
        .parse_size(text)
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => "too large".to_string(),
            _ => format!(
                "not a size: use a number with an optional unit K, M, G or T \
                 (powers of 1024), e.g. 512M or 2G; a plain number is in {unit}"
            ),
        })?;
    if bytes % unit.bytes() != 0 {
        return Err(format!("{bytes} bytes is not a whole number of {unit}"));
    }
    Ok(bytes / unit.bytes())
}

/// A clap value parser: a memory size in MiB.
pub fn mib(text: &str) -> Result<u64, String> {
    parse(text, Unit::MiB)
}

/// A clap value parser: a disk size in GiB.
pub fn gib(text: &str) -> Result<u64, String> {
    parse(text, Unit::GiB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_powers_of_1024_and_plain_numbers_keep_the_api_unit() {
        assert_eq!(mib("2G"), Ok(2048));
        assert_eq!(mib("512M"), Ok(512));
        assert_eq!(mib("512"), Ok(512));
        assert_eq!(mib("1.5GiB"), Ok(1536));
        assert_eq!(mib("2gb"), Ok(2048));
        assert_eq!(mib("1048576K"), Ok(1024));
        assert_eq!(gib("20G"), Ok(20));
        assert_eq!(gib("20"), Ok(20));
        assert_eq!(gib("1T"), Ok(1024));
        assert_eq!(gib("2048M"), Ok(2));
    }

    #[test]
    fn nonsense_and_partial_units_are_refused() {
        let err = mib("2X").unwrap_err();
        assert!(
            err.contains("not a size") && err.contains("K, M, G or T"),
            "{err}"
        );
        assert!(err.ends_with("a plain number is in MiB"), "{err}");
        assert!(mib("").unwrap_err().contains("not a size"));
        assert!(mib("G").unwrap_err().contains("not a size"));
        assert_eq!(
            mib("1500K").unwrap_err(),
            "1536000 bytes is not a whole number of MiB"
        );
        assert_eq!(
            gib("1.5G").unwrap_err(),
            "1610612736 bytes is not a whole number of GiB"
        );
        assert_eq!(gib("100E").unwrap_err(), "too large");
    }
}
