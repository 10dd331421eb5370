"""The disk, below everything: package paths, JSON and weights-only reads, atomic writes, disk space,
and the GGUF reader."""
