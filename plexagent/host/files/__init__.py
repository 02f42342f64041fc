"""Host files: the path policy, safe tar extraction and chunked uploads."""
