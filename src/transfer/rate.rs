//! [`Ewma`]: a rate smoothed over its recent samples.

/// An exponentially weighted moving average: each sample moves the value by `alpha` of the
/// difference. No value until the first sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    /// An average in which a new sample weighs `alpha` (0 to 1).
    pub(crate) const fn new(alpha: f64) -> Self {
        Self { alpha, value: None }
    }

    /// Adds a sample; returns the new value.
    pub(crate) fn update(&mut self, sample: f64) -> f64 {
        let v = match self.value {
            Some(v) => v + self.alpha * (sample - v),
            None => sample,
        };
        self.value = Some(v);
        v
    }

    /// The value, once there was a sample.
    pub(crate) fn get(&self) -> Option<f64> {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_is_taken_whole_then_each_moves_it_by_alpha() {
        let mut r = Ewma::new(0.5);
        assert_eq!(r.get(), None);
        assert_eq!(r.update(10.0), 10.0);
        assert_eq!(r.update(20.0), 15.0);
        assert_eq!(r.get(), Some(15.0));
    }
}
