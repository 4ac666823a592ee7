"""Building blocks that already know about tensor parallelism (collectives live only here)."""
