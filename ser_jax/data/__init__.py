"""Corpora: readers that list labelled recordings, and the built-in demo corpus."""
