//! postgres: see ../postgres/ (added with the type).
