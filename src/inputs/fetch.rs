//! Downloads into the cache: resumable, verified before they are renamed into place.
