"""Persistence in data_dir: atomic files, the supervision record, allocations, the lock."""
