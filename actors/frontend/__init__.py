"""The frontend role: routing over many workers, prefill -> decode, migration."""
