//! Helpers for writing the crate's own code.

/// A consuming `with_*` setter of a settings struct: `setter!(/// doc, with_x, x: T)` sets the
/// field as given; `setter!(/// doc, with_x, x: T, |v| expr)` stores `expr` (to clamp a value).
macro_rules! setter {
    ($(#[$doc:meta])* $name:ident, $field:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
    };
    ($(#[$doc:meta])* $name:ident, $field:ident: $ty:ty, |$v:ident| $e:expr) => {
        $(#[$doc])*
        pub fn $name(mut self, $v: $ty) -> Self {
            self.$field = $e;
            self
        }
    };
}

pub(crate) use setter;
