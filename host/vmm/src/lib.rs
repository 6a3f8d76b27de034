//! agentos VMM
