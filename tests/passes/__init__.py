"""One test file per pass class of `graph_passes` (the list, and which file covers which class: README.md here)."""
