//! Host facts: which kind of KVM this host offers, and where Kiln's built assets live.
//!
//! (Owned by the harness work; see docs/ARCHITECTURE.md "Assets".)
