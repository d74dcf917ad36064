//! Helpers for writing the crate's own code.

/// A setting of a settings struct: a consuming `with_*` setter and a getter of the same name as
/// the field, both with the doc given. `setting!(/// doc, with_x, x: T)` for a field of the
/// struct itself, `setting!(/// doc, with_x, x: T, in part)` for a field of its `part`.
/// Values are checked by the struct's `validate`, not here: what is set is what is read back.
macro_rules! setting {
    ($(#[$doc:meta])* $set:ident, $get:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $set(mut self, value: $ty) -> Self {
            self.$get = value;
            self
        }

        $(#[$doc])*
        ///
        /// (The value set.)
        pub fn $get(&self) -> $ty {
            self.$get
        }
    };
    ($(#[$doc:meta])* $set:ident, $get:ident: $ty:ty, in $part:ident) => {
        $(#[$doc])*
        pub fn $set(mut self, value: $ty) -> Self {
            self.$part.$get = value;
            self
        }

        $(#[$doc])*
        ///
        /// (The value set.)
        pub fn $get(&self) -> $ty {
            self.$part.$get
        }
    };
}

pub(crate) use setting;
