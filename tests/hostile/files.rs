//! Keys and files (issue 12, point 7).
