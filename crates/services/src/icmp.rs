//! What an ICMP / ICMPv6 type means to connection tracking.

/// The role of an ICMP message for connection tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IcmpClass {
    /// Reports a problem with another packet and quotes it (destination unreachable, time exceeded,
    /// packet too big, parameter problem, redirect, source quench). Related to the quoted flow;
    /// never creates state.
    Error,
    /// A query that may start a pseudo-connection (echo, timestamp, information, address mask,
    /// node information).
    Request,
    /// The answer to a query: passes only as part of a tracked query.
    Reply,
    /// Anything else (neighbor discovery, router advertisements, MLD, unknown types): checked
    /// against the rules packet by packet, no state.
    Other,
}

/// Class of an ICMPv4 (`v6 == false`) or ICMPv6 message type.
pub fn classify(v6: bool, icmp_type: u8) -> IcmpClass {
    if v6 {
        match icmp_type {
            // RFC 4443: types 0..=127 are errors (1..=4 defined so far).
            0..=127 => IcmpClass::Error,
            128 | 139 => IcmpClass::Request,
            129 | 140 => IcmpClass::Reply,
            _ => IcmpClass::Other,
        }
    } else {
        match icmp_type {
            3 | 4 | 5 | 11 | 12 => IcmpClass::Error,
            8 | 13 | 15 | 17 => IcmpClass::Request,
            0 | 14 | 16 | 18 => IcmpClass::Reply,
            _ => IcmpClass::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let cases = [
            (false, 8, IcmpClass::Request),
            (false, 0, IcmpClass::Reply),
            (false, 3, IcmpClass::Error),
            (false, 11, IcmpClass::Error),
            (false, 5, IcmpClass::Error),
            (false, 9, IcmpClass::Other),
            (true, 128, IcmpClass::Request),
            (true, 129, IcmpClass::Reply),
            (true, 1, IcmpClass::Error),
            (true, 2, IcmpClass::Error),
            (true, 135, IcmpClass::Other),
        ];
        for (v6, t, want) in cases {
            assert_eq!(classify(v6, t), want, "v6={v6} type={t}");
        }
    }
}
