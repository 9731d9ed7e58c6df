//! The one mutex helper of the workspace.

/// Locks `m`, also when a panic elsewhere poisoned it. Every mutex it is used on guards a
/// value changed in single steps that do not panic halfway, so a poisoned lock still guards
/// a consistent value.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
