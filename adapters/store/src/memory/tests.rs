use std::sync::Arc;

use super::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_conformance_suite() {
    crate::conformance::run_all(Arc::new(MemoryStore::new())).await;
}
