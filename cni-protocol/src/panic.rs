//! Turning a panic into a CNI error, so a runtime always gets one JSON object.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::codes::ErrorCode;
use crate::error::CniError;

/// Run `f`; if it panics, return a CNI error (code 100) carrying the panic message
/// instead of letting the process abort with nothing on stdout. The default panic
/// hook still prints the panic and location to stderr (the log), which is wanted.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T, CniError>) -> Result<T, CniError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_owned());
            Err(CniError::new(
                ErrorCode::Internal,
                "internal error (panic): this is a bug, please report it with the plugin log",
            )
            .with_details(what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_code_100_with_its_message() {
        let e = catch_panic::<()>(|| panic!("boom {}", 42)).unwrap_err();
        assert_eq!(e.code, 100);
        assert_eq!(e.details, "boom 42");
    }

    #[test]
    fn results_pass_through() {
        assert_eq!(catch_panic(|| Ok(3)).unwrap(), 3);
        let e = CniError::new(ErrorCode::TryAgainLater, "x");
        assert_eq!(catch_panic::<()>(|| Err(e.clone())).unwrap_err(), e);
    }
}
