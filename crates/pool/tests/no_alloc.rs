//! The hot path allocates nothing: a counting global allocator watches this thread while it
//! acquires and releases idle resources (hits) many times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{config, MockManager};
use kiln_pool::{Pool, PoolConfig};

thread_local! {
    /// Allocations made by the current thread (const-initialised, no destructor: safe to use
    /// from inside the allocator).
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every method forwards to the system allocator unchanged; counting touches only a
// thread-local Cell, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's; `ptr` came from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's; `ptr` came from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn acquire_and_release_of_an_idle_resource_does_not_allocate() {
    let (m, _c) = MockManager::new();
    let pool = Pool::new(
        m,
        PoolConfig {
            max_size: 8,
            health_check_interval: 1,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(pool.warm(4).unwrap(), 4);
    // Warm-up: the first round trips may touch lazily initialised state.
    for _ in 0..10 {
        drop(pool.acquire().unwrap());
    }
    let before = allocations();
    for _ in 0..10_000 {
        let mut h = pool.acquire().unwrap();
        h.dirty = true;
        drop(h);
    }
    let after = allocations();
    assert_eq!(
        after - before,
        0,
        "the hit path allocated {} times",
        after - before
    );
    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (10_010, 0));

    // Sanity check of the counter itself: a Vec allocates.
    let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(16));
    assert!(allocations() > after);
    drop(v);
}
