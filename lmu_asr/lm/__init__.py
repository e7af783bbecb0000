"""Word-level decoding: n-gram language models built from transcripts, and CTC beam search with them."""
