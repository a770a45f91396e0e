//! kiln-sync: the one poison-tolerant lock helper ([`lock`]) of Kiln's crates (the VMM, the
//! agent, the library, the test kit and xtask). Std only, so any crate can use it.
//!
//! Kiln's critical sections leave the guarded data consistent at every step (register state,
//! single map or queue operations, an `Option` swapped in one assignment), so a panic in
//! another thread while it held the lock does not make the data unusable: refusing it would
//! only wedge the caller. The panic itself is reported by the thread that panicked.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the guard if another thread panicked while holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_yields_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = std::sync::Arc::clone(&m);
        let r = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("poison it");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 2);
    }
}
