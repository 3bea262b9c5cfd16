//! The retransmission timer's estimator (RFC 6298).

/// Smoothed RTT, its variation and the resulting RTO, all in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimator {
    srtt: Option<u64>,
    rttvar: u64,
    rto: u64,
    min: u64,
    max: u64,
    /// Clock granularity G.
    granularity: u64,
}

impl RttEstimator {
    /// Before any sample the RTO is `initial` (RFC 6298 (2.1): 1 s).
    pub fn new(initial: u64, min: u64, max: u64, granularity: u64) -> RttEstimator {
        RttEstimator {
            srtt: None,
            rttvar: 0,
            rto: initial.clamp(min, max),
            min,
            max,
            granularity,
        }
    }

    /// Takes one measurement `r` (RFC 6298 (2.2) and (2.3)).
    pub fn sample(&mut self, r: u64) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                self.rttvar = (3 * self.rttvar + srtt.abs_diff(r)) / 4;
                self.srtt = Some((7 * srtt + r) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(r);
        self.rto = (srtt + self.granularity.max(4 * self.rttvar)).clamp(self.min, self.max);
    }

    pub fn rto(&self) -> u64 {
        self.rto
    }

    pub fn srtt(&self) -> Option<u64> {
        self.srtt
    }

    pub fn rttvar(&self) -> u64 {
        self.rttvar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rfc6298() {
        let mut e = RttEstimator::new(1_000_000, 0, 60_000_000, 1000);
        assert_eq!(e.rto(), 1_000_000);
        e.sample(100_000);
        // SRTT = R, RTTVAR = R/2, RTO = SRTT + 4 RTTVAR.
        assert_eq!(e.srtt(), Some(100_000));
        assert_eq!(e.rttvar(), 50_000);
        assert_eq!(e.rto(), 300_000);
        e.sample(200_000);
        // RTTVAR = 3/4 * 50000 + 1/4 * |100000 - 200000| = 62500
        // SRTT = 7/8 * 100000 + 1/8 * 200000 = 112500
        assert_eq!(e.rttvar(), 62_500);
        assert_eq!(e.srtt(), Some(112_500));
        assert_eq!(e.rto(), 112_500 + 250_000);
    }

    #[test]
    fn clamps_to_bounds() {
        let mut e = RttEstimator::new(1_000_000, 200_000, 60_000_000, 1000);
        e.sample(10);
        assert_eq!(e.rto(), 200_000);
        e.sample(500_000_000);
        assert_eq!(e.rto(), 60_000_000);
    }
}
